"""The HTTP service: the JSON API and its errors, reload, the page, and the real server.

One tiny model with a history feature, trained once; the app is driven with Starlette's
TestClient, and once as ``python -m twotower_jax.serve`` under uvicorn in a subprocess.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from twotower_jax import serving
from twotower_jax import service
from conftest import load_benchmark, train_tiny_history_run

REPO = pathlib.Path(__file__).resolve().parents[1]
FEATURES = {"raw_user_age": 30, "user_gender": True, "user_occupation_text": "engineer",
            "timestamp": 880000000}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return train_tiny_history_run(tmp_path_factory, seed=3)


@pytest.fixture(scope="module")
def client(workdir):
  with TestClient(service.create_app(workdir, max_batch=4), raise_server_exceptions=False) as c:
    yield c


@pytest.fixture(scope="module")
def rec(workdir):
  return serving.load(workdir)


def _ids(items):
  return [i["item_id"] for i in items]


# ----------------------------------------------------------------------------
# The Recommender's additions.


def test_exclude_rated_and_allow_ids_in_the_python_api(rec):
  user = rec.users["user_key"][3].item()
  feats = rec.query(user)
  rated = set(rec.rated([user])[0].tolist())
  r = rec.recommend(feats, 20, exclude_rated=True)
  assert rated and not rated & set(r.item_id[0].tolist())
  assert (r.item_id == rec.recommend(feats, 20, exclude_ids=rec.rated([user])).item_id).all()
  # An allow-list: the unrestricted ranking, filtered.
  allow = rec.item_ids_N[::3].tolist()
  full = rec.recommend(feats, len(rec.item_ids_N), exclude_ids=[[allow[0]]])
  want = [i for i in full.item_id[0].tolist() if i in set(allow)][:8]
  got = rec.recommend(feats, 8, allow_ids=[allow], exclude_ids=[[allow[0]]])
  assert got.item_id[0].tolist() == want
  few = rec.recommend(feats, 5, allow_ids=[allow[:2]])
  assert few.valid[0].tolist() == [True, True, False, False, False]
  with pytest.raises(serving.ServingError, match="exclude_rated needs the user key"):
    rec.recommend({k: [v] for k, v in FEATURES.items()}, 5, exclude_rated=True)


def test_similar_ranks_by_candidate_embeddings_without_the_item(rec):
  c_NxD = np.asarray(rec.index.embeddings_NxD)
  item = rec.item_ids_N[4].item()
  r = rec.similar([item], 6)
  s = c_NxD @ c_NxD[4]
  s[4] = -np.inf
  assert r.item_id[0].tolist() == rec.item_ids_N[np.argsort(-s, kind="stable")[:6]].tolist()
  with pytest.raises(serving.ServingError, match="Unknown item id 123456"):
    rec.similar([123456], 3)


def test_queries_of_many_users_equal_query_one_by_one(rec):
  users = [rec.users["user_key"][0].item(), None, rec.users["user_key"][5].item(), 424242]
  values = [None, FEATURES, {"raw_user_age": 20}, FEATURES]
  many = rec.recommend(rec.queries(users, values), 5)
  for q, (u, v) in enumerate(zip(users, values)):
    one = rec.recommend(rec.query(u, v), 5)
    assert one.item_id[0].tolist() == many.item_id[q].tolist()
  with pytest.raises(serving.ServingError, match="missing"):
    rec.queries([424242], [None])


# ----------------------------------------------------------------------------
# The JSON API.


def test_recommend_a_known_user_as_the_python_api(client, rec):
  user = rec.users["user_key"][7].item()
  resp = client.post("/recommend", json={"user_id": user, "k": 5, "exclude_rated": True})
  assert resp.status_code == 200, resp.text
  items = resp.json()["items"]
  want = rec.recommend(rec.query(user), 5, exclude_ids=rec.rated([user])).rows(0)
  assert _ids(items) == [w["item_id"] for w in want]
  np.testing.assert_allclose([i["score"] for i in items], [w["score"] for w in want],
                             rtol=1e-5, atol=1e-6)
  assert {"movie_title", "movie_genres"} <= set(items[0])
  assert items[0]["movie_title"] == want[0]["movie_title"]


def test_recommend_from_features_and_a_history(client, rec):
  history = rec.item_ids_N[[10, 20, 30]].tolist()
  resp = client.post("/recommend", json={"features": FEATURES, "history": history, "k": 4,
                                         "exclude_ids": history[:1]})
  assert resp.status_code == 200, resp.text
  want = rec.recommend(rec.query(None, {**FEATURES, "history": history}), 4,
                       exclude_ids=[history[:1]])
  assert _ids(resp.json()["items"]) == want.item_id[0].tolist()
  other = client.post("/recommend", json={"features": FEATURES, "k": 4}).json()["items"]
  assert _ids(other) != want.item_id[0].tolist()  # the history changes the answer


def test_exclude_rated_leaves_out_the_given_history(client, rec):
  history = rec.item_ids_N[[10, 20, 30]].tolist()
  query = {"features": FEATURES, "history": history, "k": 50}
  kept = _ids(client.post("/recommend", json=query).json()["items"])
  assert set(history) & set(kept)  # scored like any item when nothing is left out
  items = client.post("/recommend", json={**query, "exclude_rated": True}).json()["items"]
  want = rec.recommend(rec.query(None, {**FEATURES, "history": history}), 50,
                       exclude_ids=[history])
  assert _ids(items) == want.item_id[0].tolist()
  assert not set(history) & set(_ids(items))


def test_allow_ids_and_k_above_the_catalogue(client, rec):
  user = rec.users["user_key"][1].item()
  allow = rec.item_ids_N[:6].tolist()
  items = client.post("/recommend", json={"user_id": user, "allow_ids": allow,
                                          "k": 10}).json()["items"]
  assert sorted(_ids(items)) == sorted(allow)  # only 6 allowed: 6 answers
  scores = [i["score"] for i in items]
  assert scores == sorted(scores, reverse=True)
  n = len(rec.item_ids_N)
  assert len(client.post("/recommend", json={"user_id": user, "k": 1000}).json()["items"]) == n


def test_similar_items(client, rec):
  item = rec.item_ids_N[4].item()
  resp = client.get(f"/items/{item}/similar?k=5")
  assert resp.status_code == 200, resp.text
  assert _ids(resp.json()["items"]) == rec.similar([item], 5).item_id[0].tolist()
  assert item not in _ids(resp.json()["items"])


BAD = [
    # (method, path, body or raw, headers, status, message part)
    ("post", "/recommend", b"{not json", {"content-type": "application/json"}, 400,
     "not valid JSON"),
    ("post", "/recommend", b'{"k": 3}', {"content-type": "text/plain"}, 415,
     "Content-Type must be application/json"),
    ("post", "/recommend", [1, 2], None, 400, "must be a JSON object"),
    ("post", "/recommend", {"usr_id": 1}, None, 400, "Unknown field 'usr_id'. Did you mean "
     "'user_id'?"),
    ("post", "/recommend", {"features": {"raw_user_agee": 3}}, None, 400,
     "Unknown query column 'raw_user_agee'. Did you mean 'raw_user_age'?"),
    ("post", "/recommend", {"features": {**FEATURES, "raw_user_age": "old"}}, None, 400,
     "Query column 'raw_user_age' must be finite numbers; got 'old'"),
    ("post", "/recommend", {"features": {**FEATURES, "raw_user_age": 500}}, None, 400,
     "outside the range seen in training"),
    ("post", "/recommend", {"features": {**FEATURES, "raw_user_age": [1, 2]}}, None, 400,
     "must hold one value"),
    ("post", "/recommend", {"user_id": 1, "k": 0}, None, 400, "'k' (the number of "
     "recommendations) must be an integer from 1 to 1000; got 0"),
    ("post", "/recommend", {"user_id": 1, "k": True}, None, 400, "got true"),
    ("post", "/recommend", {"user_id": 1, "k": 1001}, None, 400, "from 1 to 1000"),
    ("post", "/recommend", {"user_id": 424242}, None, 400, "User 424242 has no training "
     "interactions: a query needs"),
    ("post", "/recommend", {"user_id": 1, "history": "1,2"}, None, 400,
     "'history' must be a list of item ids"),
    ("post", "/recommend", {"user_id": 1, "exclude_ids": [1.5]}, None, 400,
     "'exclude_ids' must be a list of item ids"),
    ("post", "/recommend", {"user_id": 1, "exclude_rated": "yes"}, None, 400,
     "'exclude_rated' must be true or false"),
    ("post", "/recommend", {"user_id": [1]}, None, 400, "'user_id' must be a string or an "
     "integer"),
    ("get", "/items/123456/similar", None, None, 404, "Unknown item id 123456"),
    ("get", "/items/1/similar?k=abc", None, None, 400, "'k' must be an integer"),
    ("get", "/recommend", None, None, 405, "GET is not allowed"),
    ("get", "/nowhere", None, None, 404, "No route '/nowhere'"),
]


@pytest.mark.parametrize("method,path,body,headers,status,message", BAD,
                         ids=[f"{b[1]}-{b[4]}-{b[5][:25]}" for b in BAD])
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(
    client, method, path, body, headers, status, message):
  kwargs = {"content": body} if isinstance(body, bytes) else (
      {"json": body} if body is not None else {})
  resp = getattr(client, method)(path, headers=headers, **kwargs)
  assert resp.status_code == status, resp.text
  assert resp.headers["content-type"].startswith("application/json")
  assert message in resp.json()["error"], resp.json()
  assert "Traceback" not in resp.text
  ok = client.post("/recommend", json={"user_id": 1, "k": 3})
  assert ok.status_code == 200 and len(ok.json()["items"]) == 3


def test_healthz_and_metadata(client, rec, workdir):
  assert client.get("/healthz").json() == {"status": "ok",
                                           "catalogue_size": len(rec.item_ids_N)}
  meta = client.get("/metadata").json()
  assert meta["model"] == "tiny" and meta["format_version"] == serving.FORMAT_VERSION
  assert meta["catalogue_size"] == len(rec.item_ids_N)
  assert meta["embedding_dim"] == np.asarray(rec.index.embeddings_NxD).shape[1]
  assert meta["index"] == "exact"
  assert set(meta["query_spec"]) == {"age", "gender", "occupation", "time", "history"}
  trained = json.loads((workdir / "metrics.json").read_text())
  assert meta["training_metrics"]["include_seen/hr_10"] == trained["include_seen/hr_10"]
  assert meta["batching"]["batch_sizes"] == [1, 4]


def test_reload_swaps_in_a_replaced_directory(workdir, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(workdir / "serving", work / "serving")
  with TestClient(service.create_app(work, max_batch=4, watch_s=0)) as c:
    before = c.post("/recommend", json={"user_id": 1, "k": 3}).json()["items"]
    # Replace the directory as add_items does: write aside, then rename over it.
    aside = work / "serving.new"
    shutil.copytree(work / "serving", aside)
    with np.load(aside / "items.npz") as f:
      items = {k: f[k] for k in f.files}
    items["movie_title"] = np.char.add("New ", items["movie_title"])
    np.savez(aside / "items.npz", **items)
    os.rename(work / "serving", tmp_path / "old")
    os.rename(aside, work / "serving")
    stale = c.post("/recommend", json={"user_id": 1, "k": 3}).json()["items"]
    assert stale == before  # nothing changes before the reload
    resp = c.post("/reload")
    assert resp.status_code == 200 and resp.json()["reloaded"] is True
    after = c.post("/recommend", json={"user_id": 1, "k": 3}).json()["items"]
    assert _ids(after) == _ids(before)
    assert [a["movie_title"] for a in after] == ["New " + b["movie_title"] for b in before]
    # A broken directory is refused and the previous one keeps serving.
    (work / "serving" / "candidates.npz").write_bytes(b"garbage")
    bad = c.post("/reload")
    assert bad.status_code == 500 and "still serving the previous" in bad.json()["error"]
    assert c.post("/recommend", json={"user_id": 1, "k": 3}).json()["items"] == after


def test_the_file_watch_reloads_a_changed_directory(workdir, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(workdir / "serving", work / "serving")
  with TestClient(service.create_app(work, max_batch=4, warm=False, watch_s=0.1)) as c:
    aside = work / "serving.new"
    shutil.copytree(work / "serving", aside)
    with np.load(aside / "items.npz") as f:
      items = {k: f[k] for k in f.files}
    items["movie_title"] = np.char.add("Watched ", items["movie_title"])
    np.savez(aside / "items.npz", **items)
    os.rename(work / "serving", tmp_path / "old")
    os.rename(aside, work / "serving")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
      title = c.post("/recommend", json={"user_id": 1, "k": 1}).json()["items"][0]["movie_title"]
      if title.startswith("Watched "):
        break
      time.sleep(0.1)
    assert title.startswith("Watched ")


# ----------------------------------------------------------------------------
# The page.


def test_the_page_shows_a_form_and_recommendations(client, rec):
  empty = client.get("/")
  assert empty.status_code == 200 and "<form" in empty.text and "raw_user_age" in empty.text
  user = rec.users["user_key"][2].item()
  page = client.get(f"/?user_id={user}&k=5&exclude_rated=on")
  assert page.status_code == 200
  want = rec.recommend(rec.query(user), 5, exclude_rated=True)
  for title in want.title[0]:
    assert title.replace("&", "&amp;").replace("'", "&#x27;") in page.text
  assert page.text.count("<tr>") == 1 + 5  # the header and five items
  genres = want.columns["movie_genres"][0][0].split("|")[0]
  assert f'<span class="tag">{genres}</span>' in page.text.replace("&#x27;", "'")
  # Typed features and a history, as strings from the form.
  history = ",".join(map(str, rec.item_ids_N[[1, 2]].tolist()))
  form = client.get("/", params={**{k: str(v) for k, v in FEATURES.items()},
                                 "user_gender": "true", "history": history, "k": "3"})
  assert form.status_code == 200, form.text
  want = rec.recommend(rec.query(None, {**FEATURES, "history": rec.item_ids_N[[1, 2]]}), 3)
  for title in want.title[0]:
    assert title.replace("&", "&amp;").replace("'", "&#x27;") in form.text
  bad = client.get("/", params={"raw_user_age": "abc", "user_id": ""})
  assert bad.status_code == 400 and "must be a number" in bad.text


# ----------------------------------------------------------------------------
# The real server.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_the_real_server_answers_over_http(workdir):
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "twotower_jax.serve", "--workdir",
                           str(workdir), "--port", str(port), "--max_batch", "4"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
      try:
        if httpx.get(url + "/healthz", timeout=2).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.monotonic() < deadline, "the server did not start"
      time.sleep(0.3)
    resp = httpx.post(url + "/recommend", json={"user_id": 1, "k": 3}, timeout=10)
    assert resp.status_code == 200 and len(resp.json()["items"]) == 3
    bad = httpx.post(url + "/recommend", content=b"{", timeout=10,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    assert "<form" in httpx.get(url + "/", timeout=10).text
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def test_long_exclusions_on_a_large_catalogue_are_exact(workdir, tmp_path):
  """Above 8,192 items long exclusion lists are applied after the index search (with a
  second search for queries that lose too many): the answer equals brute force."""
  load_test = load_benchmark("load_test")
  large = serving.load(load_test.make_large_serving(workdir, tmp_path / "large", 10_000))
  c_NxD = np.asarray(large.index.embeddings_NxD)
  users = large.users["user_key"][:6].tolist()
  feats = large.queries(users, [None] * len(users))
  q_QxD = large.embed(feats)
  s_QxN = q_QxD @ c_NxD.T
  best = np.argsort(-s_QxN, axis=1, kind="stable")
  # Query 0 loses its 100 best items (more than the over-fetch: searched again), the others
  # 40 random ones, or none.
  rng = np.random.default_rng(0)
  exclude = [large.item_ids_N[best[0, :100]].tolist()] + [
      large.item_ids_N[rng.choice(10_000, 40, replace=False)].tolist() for _ in users[1:4]
  ] + [[] for _ in users[4:]]
  got = large.recommend(feats, 12, exclude_ids=exclude)
  for q, ex in enumerate(exclude):
    rows = [r for r in best[q] if large.item_ids_N[r] not in set(ex)][:12]
    assert got.item_id[q].tolist() == large.item_ids_N[rows].tolist(), q
    np.testing.assert_allclose(got.score[q], s_QxN[q, rows], rtol=1e-4, atol=1e-4)


def test_items_added_without_retraining_are_served_after_reload(workdir, tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.csv as pacsv  # pylint: disable=g-import-not-at-top
  from twotower_jax import catalog  # pylint: disable=g-import-not-at-top
  work = tmp_path / "w"
  shutil.copytree(workdir / "serving", work / "serving")
  with TestClient(service.create_app(work, max_batch=4)) as c:
    size = c.get("/healthz").json()["catalogue_size"]
    pacsv.write_csv(pa.table({"movie_id": pa.array([9001, 9002], pa.int64()),
                              "movie_title": ["Brand New Film A (2026)",
                                              "Brand New Film B (2026)"],
                              "movie_genres": ["1|5", "7"],
                              "movie_release_year": [2026, 2026]}), tmp_path / "new.csv")
    catalog.add_items(work, tmp_path / "new.csv")
    assert c.get("/items/9001/similar").status_code == 404  # not before the reload
    assert c.post("/reload").json()["catalogue_size"] == size + 2
    assert c.get("/healthz").json()["catalogue_size"] == size + 2
    similar = c.get("/items/9001/similar?k=3")
    assert similar.status_code == 200 and len(similar.json()["items"]) == 3
    items = c.post("/recommend", json={"user_id": 1, "allow_ids": [9001, 9002, 1],
                                       "k": 3}).json()["items"]
    assert {"Brand New Film A (2026)", "Brand New Film B (2026)"} <= {
        i["movie_title"] for i in items}
