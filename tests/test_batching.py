"""Dynamic batching: the generic Batcher, and the service answering concurrent requests in
batches exactly as the Python API answers each alone."""

import asyncio
import time

import httpx
import numpy as np
import pytest

from twotower_jax import batching
from twotower_jax import serving
from twotower_jax import service
from conftest import train_tiny_history_run


def _run(coro):
  return asyncio.run(coro)


def test_concurrent_items_are_gathered_and_each_gets_its_own_result():
  seen = []

  def process(items):
    seen.append(list(items))
    time.sleep(0.02)  # while this batch runs, the others queue up
    return [x * 10 for x in items]

  async def main():
    b = batching.Batcher(process, max_batch=4, max_wait_ms=50)
    await b.start()
    out = await asyncio.gather(*(b.submit(i) for i in range(10)))
    await b.stop()
    return out, b

  out, b = _run(main())
  assert out == [i * 10 for i in range(10)]
  assert sorted(x for batch in seen for x in batch) == list(range(10))
  assert max(len(batch) for batch in seen) == 4  # gathered, up to max_batch
  assert len(seen) < 10 and b.num_items == 10 and b.num_batches == len(seen)


def test_an_exception_goes_to_its_item_only_and_the_batcher_keeps_serving():
  def process(items):
    if "crash" in items:
      raise RuntimeError("the whole batch failed")
    return [ValueError(f"bad {x}") if x < 0 else x for x in items]

  async def main():
    b = batching.Batcher(process, max_batch=8, max_wait_ms=5)
    await b.start()
    res = await asyncio.gather(b.submit(1), b.submit(-2), b.submit(3), return_exceptions=True)
    crashed = await asyncio.gather(b.submit("crash"), return_exceptions=True)
    after = await b.submit(7)
    await b.stop()
    return res, crashed, after

  res, crashed, after = _run(main())
  assert res[0] == 1 and res[2] == 3
  assert isinstance(res[1], ValueError) and str(res[1]) == "bad -2"
  assert isinstance(crashed[0], RuntimeError)
  assert after == 7


def test_max_batch_one_processes_each_item_alone():
  sizes = []

  def process(items):
    sizes.append(len(items))
    return items

  async def main():
    b = batching.Batcher(process, max_batch=1, max_wait_ms=0)
    await b.start()
    out = await asyncio.gather(*(b.submit(i) for i in range(6)))
    await b.stop()
    return out

  assert _run(main()) == list(range(6))
  assert sizes == [1] * 6


def test_a_lone_request_does_not_wait_but_an_announced_one_is_waited_for():
  batches = []

  def process(items):
    batches.append(list(items))
    return items

  async def main():
    b = batching.Batcher(process, max_batch=8, max_wait_ms=400)
    await b.start()
    start = time.perf_counter()
    await b.submit("alone")
    lone_s = time.perf_counter() - start

    async def late():
      with b.arriving():  # announced at once, submitted 50 ms later
        await asyncio.sleep(0.05)
      return await b.submit("late")

    task = asyncio.create_task(late())
    await asyncio.sleep(0)  # let it announce itself
    out = await asyncio.gather(b.submit("early"), task)
    await b.stop()
    return lone_s, out

  lone_s, out = _run(main())
  assert lone_s < 0.2  # not the 400 ms wait
  assert out == ["early", "late"]
  assert batches[-1] == ["early", "late"]  # the batch waited for the announced request


def test_bad_limits_are_refused():
  with pytest.raises(ValueError, match="max_batch"):
    batching.Batcher(lambda x: x, max_batch=0)
  with pytest.raises(ValueError, match="max_wait_ms"):
    batching.Batcher(lambda x: x, max_wait_ms=-1)


# ----------------------------------------------------------------------------
# The service under concurrent requests.


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  return train_tiny_history_run(tmp_path_factory, seed=11)


def _requests(rec):
  users = rec.users["user_key"][:24].tolist()
  items = rec.item_ids_N.tolist()
  bodies = []
  for i, u in enumerate(users):
    body = {"user_id": u, "k": [3, 10, 25][i % 3]}
    if i % 4 == 1:
      body["exclude_rated"] = True
    if i % 4 == 2:
      body["exclude_ids"] = items[i:i + 5]
    if i % 4 == 3:
      body["allow_ids"] = items[i:i + 40:2]
    if i % 6 == 5:
      body["history"] = items[:3]
    bodies.append(body)
  bodies.append({"features": {"raw_user_age": 30, "user_gender": True,
                              "user_occupation_text": "engineer", "timestamp": 880000000},
                 "history": items[5:8], "k": 7})
  return bodies


def _python_api(rec, body):
  values = dict(body.get("features", {}))
  if "history" in body:
    values["history"] = body["history"]
  feats = rec.query(body.get("user_id"), values)
  exclude = list(body.get("exclude_ids", []))
  if body.get("exclude_rated") and "history" in body:  # the service leaves the history out too
    exclude += body["history"]
  r = rec.recommend(feats, body["k"], exclude_ids=[exclude],
                    allow_ids=[body.get("allow_ids")],
                    exclude_rated=body.get("exclude_rated", False))
  return r.rows(0)


def test_concurrent_requests_are_batched_and_each_answered_as_alone(served):
  app = service.create_app(served, max_batch=16, max_wait_ms=20)
  state = app.state.service
  rec = state.rec
  bodies = _requests(rec)

  async def main():
    async with app.router.lifespan_context(app):
      transport = httpx.ASGITransport(app=app)
      async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post("/recommend", json=b) for b in bodies))

  responses = _run(main())
  assert [r.status_code for r in responses] == [200] * len(bodies)
  assert max(state.batcher.batch_sizes) > 1  # requests were answered together
  for body, resp in zip(bodies, responses):
    got, want = resp.json()["items"], _python_api(rec, body)
    assert [g["item_id"] for g in got] == [w["item_id"] for w in want], body
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want],
                               rtol=1e-5, atol=1e-5)
    if body.get("allow_ids") is not None:
      assert {g["item_id"] for g in got} <= set(body["allow_ids"])
    for excluded in body.get("exclude_ids", []):
      assert excluded not in {g["item_id"] for g in got}


def test_a_bad_request_in_a_batch_fails_alone(served):
  app = service.create_app(served, max_batch=16, max_wait_ms=20)
  rec = app.state.service.rec
  good = {"user_id": rec.users["user_key"][0].item(), "k": 5}
  bad = {"features": {"raw_user_age": 1000, "user_gender": True,
                      "user_occupation_text": "engineer", "timestamp": 880000000}}

  async def main():
    async with app.router.lifespan_context(app):
      transport = httpx.ASGITransport(app=app)
      async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post("/recommend", json=b)
                                      for b in [good, bad, good]))

  r1, r2, r3 = _run(main())
  assert r1.status_code == r3.status_code == 200 and r1.json() == r3.json()
  assert r2.status_code == 400
  assert "outside the range seen in training" in r2.json()["error"]


def test_no_shape_is_compiled_after_warm_up(served):
  """Every batch size, with and without exclusions, is compiled at start: answering
  batches of each size afterwards reuses those compilations."""
  rec = serving.load(served)
  sv = service.Served.of(rec)
  sizes = service.batch_sizes(16)
  service.warm_up(sv, sizes)
  user = rec.users["user_key"][0].item()
  import jax  # pylint: disable=g-import-not-at-top
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: compiles.append(name) if "compile" in name else None)
  for n in (1, 3, 4, 9, 16):
    service.answer(sv, [service.Query(user_id=user, exclude_rated=True)] * n, sizes)
    service.answer(sv, [service.Query(user_id=user)] * n, sizes)
  assert not [c for c in compiles if "backend_compile" in c], compiles


def test_fill_wait_waits_for_unannounced_requests_after_a_costly_batch():
  def run(fill_wait):
    batches = []

    def process(items):
      batches.append(list(items))
      time.sleep(0.1)  # a costly batch: 100 ms whatever its size
      return items

    async def main():
      b = batching.Batcher(process, max_batch=8, max_wait_ms=1000, fill_wait=fill_wait)
      await b.start()
      await b.submit("first")  # sets the last batch's time (100 ms)

      async def later(x):  # never announced: submitted 20 ms after the batch opened
        await asyncio.sleep(0.02)
        return await b.submit(x)

      start = time.perf_counter()
      out = await asyncio.gather(b.submit("a"), later("b"), later("c"))
      waited = time.perf_counter() - start
      await b.stop()
      return out, waited

    out, waited = _run(main())
    assert out == ["a", "b", "c"]
    return batches, waited

  batches, _ = run(0.0)  # goes at once: "a" alone, then the two later ones
  assert batches[1:] == [["a"], ["b", "c"]]
  batches, waited = run(0.5)  # waits up to 50 ms for more: one batch
  assert batches[1:] == [["a", "b", "c"]]
  assert waited < 0.5  # bounded by half the last batch's time, not max_wait_ms
  with pytest.raises(ValueError, match="fill_wait"):
    batching.Batcher(lambda x: x, fill_wait=2.0)
