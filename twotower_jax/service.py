"""The HTTP service: a Starlette app over a serving directory, JSON in and out.

Routes (``create_app(serving_dir)``; ``serve.py`` runs it under uvicorn):

  POST /recommend           {"user_id", "features", "history", "k", "exclude_ids",
                             "allow_ids", "exclude_rated"} -> {"items": [...]}
  GET  /items/{id}/similar  ?k=10: the items nearest to one item's candidate embedding
  GET  /healthz             {"status": "ok", ...}
  GET  /metadata            the model, catalogue, query spec, training metrics, index kind
  POST /reload              reads the serving directory again and swaps it in
  GET  /                    a small HTML page for people (``page.py``)

Requests to ``/recommend`` (and the page) are checked here, then go through a
:class:`batching.Batcher`: concurrent requests become one batch whose raw columns are
assembled and encoded together, padded to one of a few fixed batch sizes (1, 4, 16, 64,
...), embedded by one jitted query-tower call and scored by one index search. Exclusions
are padded to powers of two and k rounded up to a power of two (>= 16), so the compiled
shapes are few; all batch sizes are compiled at start (``warm_up``). Per-request
exclusions, allow-lists and k still apply to each request alone. Known users' stored
columns are encoded once at load (``Served``), so a request naming only a known user skips
encoding. If anything in a batch is refused, each of its requests is answered alone, so a
bad request gets its own error and the others their answers.

Every error is a JSON ``{"error": message}`` with a 4xx status (400 bad values, 404
unknown item or route, 405, 413, 415 wrong content type) carrying the same messages as
the Python API (``serving.ServingError``); an unexpected failure is a 500 with a one-line
message (the traceback goes to the server log), and the server keeps serving.

``POST /reload`` (or a change of the directory seen by the optional file watch) loads the
directory in a worker thread, compiles its shapes, then swaps the in-memory Recommender
in one assignment: batches already running finish on the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Mapping

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from twotower_jax import ann
from twotower_jax import arrays
from twotower_jax import batching
from twotower_jax import config as config_lib
from twotower_jax import page
from twotower_jax import serving

_log = logging.getLogger(__name__)

MAX_K = 1000  # the largest k a request may ask for
MAX_IDS = 10_000  # the most item ids in exclude_ids, allow_ids or history
MAX_BODY = 1 << 20  # bytes
MAX_ENCODED_USERS = 200_000  # known users whose encoded inputs are kept (see Served)
_FIELDS = ("user_id", "features", "history", "k", "exclude_ids", "allow_ids", "exclude_rated")
_BASELINES = ("popularity", "random", "itemcf", "ease")


class RequestError(ValueError):
  """A request the service refuses: an HTTP status and a message for the client."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Served:
  """A Recommender with what request checking needs of it, computed once per load."""

  rec: serving.Recommender
  columns: tuple[str, ...]  # the query columns a request's "features" may hold
  histories: tuple[str, ...]  # history features
  users: arrays.KeyIndex  # rows of the known users
  # The query tower's inputs of every known user's stored columns ([U, ...] each), encoded
  # once: a request naming a known user and nothing else is a gather. None above
  # MAX_ENCODED_USERS users.
  user_inputs: dict[str, np.ndarray] | None

  @classmethod
  def of(cls, rec: serving.Recommender) -> "Served":
    histories = tuple(rec.history_columns())
    columns = [c for c in rec.query_columns() if c not in histories]
    keys = rec.users["user_key"]
    user_inputs = None
    if 0 < len(keys) <= MAX_ENCODED_USERS:
      user_inputs = rec.encode(rec.user_features(keys), check_range=False)
    return cls(rec=rec, columns=tuple(columns), histories=histories,
               users=arrays.KeyIndex.build(keys), user_inputs=user_inputs)

  def user_rows(self, user_ids: list) -> np.ndarray:
    """The users-table row of each key (-1: unknown, None, or a key of another type)."""
    text = self.users.keys_N.dtype.kind == "U"
    ok = [u is not None and isinstance(u, str) == text for u in user_ids]
    rows = np.full(len(user_ids), -1, np.int64)
    if any(ok):
      rows[np.flatnonzero(ok)] = self.users.rows(np.asarray(
          [u for u, good in zip(user_ids, ok) if good]))
    return rows


@dataclasses.dataclass(frozen=True)
class Query:
  """One checked /recommend request."""

  user_id: Any = None
  values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  k: int = 10
  exclude_ids: tuple = ()
  allow_ids: tuple | None = None
  exclude_rated: bool = False


# ----------------------------------------------------------------------------
# Checking requests.


def _scalar_ok(v: Any) -> bool:
  return v is None or isinstance(v, (str, int, float, bool))


def _keys_of(rec: serving.Recommender, name: str, value: Any, what: str) -> tuple:
  """A JSON list of item keys as a tuple in the catalogue's key type."""
  if value is None:
    return ()
  if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(
      v, bool) for v in value):
    raise RequestError(f"{name!r} must be a list of {what}; got {json.dumps(value)[:80]}.")
  if len(value) > MAX_IDS:
    raise RequestError(f"{name!r} holds {len(value)} ids; at most {MAX_IDS} are accepted.")
  return tuple(item_key(rec, v) for v in value)


def item_key(rec: serving.Recommender, value: Any) -> Any:
  """An item key from JSON or a URL in the catalogue's key type (digit strings become
  integers where the keys are integers)."""
  if rec.item_ids_N.dtype.kind in "iu" and isinstance(value, str):
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else value
  if rec.item_ids_N.dtype.kind == "U":
    return str(value)
  return value


def user_key(rec: serving.Recommender, value: Any) -> Any:
  """A user key in the users table's key type (as ``item_key``)."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise RequestError(f"'user_id' must be a string or an integer; got {json.dumps(value)}.")
  if rec.users["user_key"].dtype.kind in "iu" and isinstance(value, str):
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else text
  if rec.users["user_key"].dtype.kind == "U":
    return str(value)
  return value


def parse_query(served: Served, body: Any) -> Query:
  """A /recommend body checked against the model; RequestError says what is wrong."""
  rec = served.rec
  if not isinstance(body, dict):
    raise RequestError('The request body must be a JSON object, e.g. {"user_id": 42, '
                       f'"k": 10}}; got {type(body).__name__}.')
  unknown = [f for f in body if f not in _FIELDS]
  if unknown:
    raise RequestError(f"Unknown field {unknown[0]!r}.{config_lib.suggest(unknown[0], _FIELDS)}"
                       f" Valid fields: {list(_FIELDS)}.")
  k = body.get("k", 10)
  if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
    raise RequestError(f"'k' (the number of recommendations) must be an integer from 1 to "
                       f"{MAX_K}; got {json.dumps(k)}.")
  features = body.get("features") or {}
  if not isinstance(features, dict):
    raise RequestError("'features' must be an object of query column to value, e.g. "
                       f'{{"raw_user_age": 30}}; got {json.dumps(features)[:80]}.')
  columns = list(served.columns)
  known = columns + ([rec.user_key] if rec.user_key not in columns else [])
  values = {}
  for name, value in features.items():
    if name not in known:
      hint = config_lib.suggest(name, known)
      if name in served.histories:
        hint = " A history goes in the 'history' field."
      raise RequestError(f"Unknown query column {name!r}.{hint} This model reads {columns}.")
    if not _scalar_ok(value):
      raise RequestError(f"Query column {name!r} must hold one value (a string, number, "
                         f"boolean or null); got {json.dumps(value)[:80]}.")
    values[name] = value
  user = user_key(rec, body.get("user_id"))
  if rec.user_key in values:
    user = user if user is not None else user_key(rec, values.pop(rec.user_key))
  history = body.get("history")
  if history is not None:
    names = served.histories
    if not names:
      raise RequestError("This model has no history feature, so 'history' cannot be used; "
                         f"it reads {columns}.")
    items = list(_keys_of(rec, "history", history, "item ids (most recent last)"))
    for name in names:
      values[name] = items
  exclude_rated = body.get("exclude_rated", False)
  if not isinstance(exclude_rated, bool):
    raise RequestError(f"'exclude_rated' must be true or false; got {json.dumps(exclude_rated)}.")
  exclude_ids = _keys_of(rec, "exclude_ids", body.get("exclude_ids"), "item ids")
  if exclude_rated and history is not None:  # what the user has: the given history too
    exclude_ids += tuple(items)
  allow = body.get("allow_ids")
  return Query(user_id=user, values=values, k=k, exclude_ids=exclude_ids,
               allow_ids=None if allow is None else _keys_of(rec, "allow_ids", allow,
                                                             "item ids"),
               exclude_rated=exclude_rated)


# ----------------------------------------------------------------------------
# Answering a batch.


def batch_sizes(max_batch: int) -> tuple[int, ...]:
  """The padded batch sizes: powers of 4 below ``max_batch``, then ``max_batch``."""
  sizes, b = [], 1
  while b < max_batch:
    sizes.append(b)
    b *= 4
  return tuple(sizes + [max_batch])


def _k_bucket(k: int) -> int:
  return arrays.size_bucket(k, minimum=16)


def _pad_inputs(x: np.ndarray, size: int) -> np.ndarray:
  """Rows of ``x`` repeated from its first one up to ``size`` (any real input will do)."""
  if len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


def _inputs(served: Served, queries: list[Query]) -> dict[str, np.ndarray]:
  """The query tower's inputs of a batch: gathered for known users given alone, encoded
  (in one call) for the others."""
  rec, num_q = served.rec, len(queries)
  rows = np.full(num_q, -1, np.int64)
  if served.user_inputs is not None:
    rows = served.user_rows([None if q.values else q.user_id for q in queries])
  known = np.flatnonzero(rows >= 0)
  if known.size == num_q:
    return {name: x[rows] for name, x in served.user_inputs.items()}
  others = np.flatnonzero(rows < 0)
  cols = rec.queries([queries[i].user_id for i in others], [queries[i].values for i in others])
  encoded = rec.encode(cols, check_range=True)
  if not known.size:
    return encoded
  xq = {}
  for name, x in encoded.items():
    xq[name] = np.empty((num_q,) + x.shape[1:], x.dtype)
    xq[name][others] = x
    xq[name][known] = served.user_inputs[name][rows[known]]
  return xq


def answer(served: Served, queries: list[Query], sizes: tuple[int, ...]) -> list:
  """The items of each query, computed as one batch padded to the next of ``sizes``."""
  rec, num_q = served.rec, len(queries)
  size = next((s for s in sizes if s >= num_q), num_q)
  pad = size - num_q
  xq = _inputs(served, queries)
  q_BxD = rec.embed_inputs({name: _pad_inputs(x, size) for name, x in xq.items()})
  exclude = rec.exclusions(
      size, [q.exclude_ids for q in queries] + [()] * pad,
      [q.user_id if q.exclude_rated else None for q in queries] + [None] * pad)
  allow = None
  if any(q.allow_ids is not None for q in queries):
    allow = [q.allow_ids for q in queries] + [None] * pad
  k = _k_bucket(max(q.k for q in queries))
  r = rec.search(q_BxD, k, exclude_rows=exclude, allow_ids=allow)
  return item_lists(r, [q.k for q in queries])


def item_lists(r: serving.Recommendations, ks: list[int]) -> list[list[dict]]:
  """The first ``ks[q]`` valid results of each query as JSON-ready dicts (NaN -> null)."""
  num_q, width = len(ks), max(ks)
  cols = {"item_id": r.item_id[:num_q, :width], "score": r.score[:num_q, :width],
          **{name: v[:num_q, :width] for name, v in r.columns.items()}}
  for name, v in cols.items():
    if v.dtype.kind == "f" and np.isnan(v).any():
      nan = np.isnan(v)
      v = v.astype(object)
      v[nan] = None
    cols[name] = v.tolist()
  counts = r.valid[:num_q, :width].sum(axis=1).tolist()
  names = list(cols)
  return [[dict(zip(names, row)) for row in zip(*(cols[n][q][:min(ks[q], counts[q])]
                                                    for n in names))]
          for q in range(num_q)]


def process(state: "State", queries: list[Query]) -> list:
  """One batch on the current Recommender; if it is refused, each query alone."""
  served = state.served  # one snapshot: a reload during the batch does not affect it
  try:
    return answer(served, queries, state.sizes)
  except serving.ServingError:
    if len(queries) == 1:
      raise
  out = []
  for q in queries:
    try:
      out.append(answer(served, [q], state.sizes)[0])
    except serving.ServingError as e:
      out.append(e)
  return out


def warm_up(served: Served, sizes: tuple[int, ...]) -> float:
  """Compiles every batch size (with no exclusions and with each exclusion width up to the
  most training items of a user) for the default k; returns the seconds it took."""
  start = time.perf_counter()
  rec = served.rec
  keys = rec.users["user_key"]
  if not len(keys):
    return 0.0
  top = arrays.size_bucket(int(np.diff(rec.users["rated_indptr"]).max()))
  widths = [0] + [8 << i for i in range(32) if 8 << i <= top]
  user = keys[0].item()
  for size in sizes:
    for e in widths:
      ids = tuple(rec.item_ids_N[:e].tolist())
      answer(served, [Query(user_id=user, exclude_ids=ids)] * size, sizes)
  q_1xD = np.zeros((1, rec.candidates_NxD.shape[1]), np.float32)
  for e in widths[1:]:  # one query searched with its own exclusions (see Recommender.search)
    rec.index.search(q_1xD, _k_bucket(10), exclude=np.full((1, e), -1, np.int64))
  rec.similar(rec.item_ids_N[:1], _k_bucket(10))
  return time.perf_counter() - start


# ----------------------------------------------------------------------------
# The app.


class State:
  """What the app serves: the serving directory, its Recommender, the batcher."""

  def __init__(self, serving_dir: str | os.PathLike, *, max_batch: int = 64,
               max_wait_ms: float = 2.0, batching_on: bool = True, warm: bool = True,
               watch_s: float = 0.0, fill_wait: float = 0.0):
    self.path = pathlib.Path(serving_dir)
    self.max_batch = max_batch if batching_on else 1
    self.sizes = batch_sizes(self.max_batch)
    self.warm = warm
    self.watch_s = watch_s
    self.served = Served.of(serving.load(self.path))
    self.loaded_at = time.time()
    self.warm_up_s = 0.0
    self.batcher = batching.Batcher(lambda qs: process(self, qs), max_batch=self.max_batch,
                                    max_wait_ms=max_wait_ms if batching_on else 0.0,
                                    fill_wait=fill_wait if batching_on else 0.0)
    self._reload_lock: asyncio.Lock | None = None
    self._stamp = self._dir_stamp()

  @property
  def rec(self) -> serving.Recommender:
    return self.served.rec

  def _dir_stamp(self):
    """What changes when the directory is replaced (by rename) or rewritten."""
    path = self.path / "serving" if (self.path / "serving").is_dir() else self.path
    try:
      return (os.stat(path).st_ino, os.stat(path / "serving.json").st_mtime_ns)
    except OSError:
      return None

  async def reload(self) -> dict[str, Any]:
    """Loads the directory again, compiles it, and swaps it in."""
    if self._reload_lock is None:
      self._reload_lock = asyncio.Lock()
    async with self._reload_lock:
      start = time.perf_counter()
      stamp = self._dir_stamp()
      served = await run_in_threadpool(lambda: Served.of(serving.load(self.path)))
      warm_s = await run_in_threadpool(warm_up, served, self.sizes) if self.warm else 0.0
      old, self.served = self.rec, served  # the swap: later batches see the new one
      rec = served.rec
      _freeze_loaded()
      self.loaded_at, self.warm_up_s, self._stamp = time.time(), warm_s, stamp
      _log.info("Reloaded %s: %d items (was %d), %.2f s.", self.path, len(rec.item_ids_N),
                len(old.item_ids_N), time.perf_counter() - start)
      return {"reloaded": True, "catalogue_size": len(rec.item_ids_N),
              "previous_catalogue_size": len(old.item_ids_N),
              "seconds": round(time.perf_counter() - start, 3)}

  async def watch(self) -> None:
    """Reloads whenever the directory changes (polled every ``watch_s`` seconds)."""
    while True:
      await asyncio.sleep(self.watch_s)
      stamp = self._dir_stamp()
      if stamp is not None and stamp != self._stamp:
        try:
          await self.reload()
        except Exception:  # pylint: disable=broad-except
          _log.exception("Reload after a change of %s failed; still serving the previous "
                         "directory.", self.path)
          self._stamp = stamp

  def metadata(self) -> dict[str, Any]:
    rec = self.rec
    metrics = None
    workdir = self.path if (self.path / "serving").is_dir() else self.path.parent
    with contextlib.suppress(OSError, ValueError):
      raw = json.loads((workdir / "metrics.json").read_text())
      metrics = {k: v for k, v in raw.items()
                 if k.split("/")[0] not in _BASELINES and k != "config"}
    return {
        "model": rec.meta.get("config_name"),
        "format_version": rec.meta.get("format_version"),
        "serving_dir": str(self.path),
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
        "catalogue_size": len(rec.item_ids_N),
        "embedding_dim": int(rec.candidates_NxD.shape[1]),
        "index": ann.kind_of(rec.index),
        "known_users": len(rec.users["user_key"]),
        "keys": rec.meta.get("keys"),
        "query_columns": rec.query_columns(),
        "optional_columns": rec.id_columns() + rec.history_columns(),
        "query_spec": rec.meta["features"]["query"],
        "display_columns": list(rec.items),
        "title_column": rec.meta.get("title_column", ""),
        "batching": {"max_batch": self.max_batch, "max_wait_ms": self.batcher.max_wait_s * 1e3,
                     "batch_sizes": list(self.sizes), "batches": self.batcher.num_batches,
                     "requests": self.batcher.num_items, "warm_up_s": round(self.warm_up_s, 3)},
        "max_k": MAX_K,
        "training_metrics": metrics,
    }


def _error(message: str, status: int) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Request) -> Any:
  ctype = request.headers.get("content-type", "")
  if ctype.split(";")[0].strip().lower() != "application/json":
    raise RequestError(f"Content-Type must be application/json; got {ctype or 'none'!r}. "
                       "Send the body as JSON with that header.", 415)
  body = await request.body()
  if len(body) > MAX_BODY:
    raise RequestError(f"The body has {len(body)} bytes; at most {MAX_BODY} are accepted.",
                       413)
  try:
    return json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise RequestError(f"The body is not valid JSON ({e}).") from e


def _finite(items: list[dict]) -> list[dict]:
  for row in items:
    if not math.isfinite(row["score"]):
      row["score"] = None
  return items


async def recommend(request: Request) -> JSONResponse:
  state: State = request.app.state.service
  with state.batcher.arriving():
    query = parse_query(state.served, await _json_body(request))
  items = await state.batcher.submit(query)
  return JSONResponse({"items": _finite(items)})


async def similar(request: Request) -> JSONResponse:
  state: State = request.app.state.service
  rec = state.rec
  raw = request.query_params.get("k", "10")
  if not raw.strip().isdigit() or not 1 <= int(raw) <= MAX_K:
    raise RequestError(f"'k' must be an integer from 1 to {MAX_K}; got {raw!r}.")
  k = int(raw)
  item = item_key(rec, request.path_params["item_id"])
  if (rec.item_rows([item]) < 0).any():
    raise RequestError(f"Unknown item id {item!r}: not in the catalogue of "
                       f"{len(rec.item_ids_N)} items (e.g. {rec.item_ids_N[:3].tolist()}).",
                       404)
  r = await state.batcher.run(rec.similar, [item], _k_bucket(k))
  return JSONResponse({"item_id": item, "items": _finite(item_lists(r, [k])[0])})


async def healthz(request: Request) -> JSONResponse:
  state: State = request.app.state.service
  return JSONResponse({"status": "ok", "catalogue_size": len(state.rec.item_ids_N)})


async def metadata(request: Request) -> JSONResponse:
  return JSONResponse(request.app.state.service.metadata())


async def reload(request: Request) -> JSONResponse:
  state: State = request.app.state.service
  try:
    return JSONResponse(await state.reload())
  except serving.ServingError as e:
    return _error(f"Reload failed; still serving the previous directory. {e}", 500)


def form_body(rec: serving.Recommender, params: Mapping[str, str]) -> dict[str, Any] | None:
  """The page's form fields as a /recommend body (None when the form is empty): numbers
  for numeric columns, item ids split at commas."""
  kinds = {s.column: s.kind for s in rec.specs.values()}
  features = {}
  for column in rec.query_columns():
    text = params.get(column, "").strip()
    if not text or column in rec.history_columns():
      continue
    if kinds.get(column) in ("numeric", "timestamp"):
      try:
        number = float(text)
      except ValueError as e:
        raise RequestError(f"Query column {column!r} must be a number; got {text!r}.") from e
      features[column] = int(number) if number.is_integer() else number
    else:
      features[column] = text
  body: dict[str, Any] = {}
  if params.get("user_id", "").strip():
    body["user_id"] = params["user_id"].strip()
  if features:
    body["features"] = features
  history = [v.strip() for v in params.get("history", "").split(",") if v.strip()]
  if history:
    body["history"] = history
  if not body:
    return None
  k = params.get("k", "10").strip() or "10"
  if not k.isdigit():
    raise RequestError(f"'k' must be an integer from 1 to {MAX_K}; got {k!r}.")
  body["k"] = int(k)
  body["exclude_rated"] = params.get("exclude_rated", "") in ("1", "on", "true")
  return body


async def home(request: Request) -> HTMLResponse:
  state: State = request.app.state.service
  served = state.served
  rec = served.rec
  params = dict(request.query_params)
  items, error = None, None
  try:
    body = form_body(rec, params)
    if body is not None:
      with state.batcher.arriving():
        query = parse_query(served, body)
      items = await state.batcher.submit(query)
  except (RequestError, serving.ServingError) as e:
    error = str(e)
  status = 400 if error else 200
  return HTMLResponse(page.render(rec, params, items, error), status_code=status)


async def _on_request_error(request: Request, exc: Exception) -> JSONResponse:
  return _error(str(exc), getattr(exc, "status", 400))


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
  detail = exc.detail
  if exc.status_code == 404:
    detail = (f"No route {request.url.path!r}. Routes: POST /recommend, GET /items/ID/similar, "
              "GET /healthz, GET /metadata, POST /reload, GET /.")
  elif exc.status_code == 405:
    detail = f"{request.method} is not allowed on {request.url.path}."
  return _error(str(detail), exc.status_code)


async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
  _log.exception("Unexpected error on %s %s", request.method, request.url.path)
  return _error(f"Internal error ({type(exc).__name__}); the server log has the details.",
                500)


def _freeze_loaded() -> None:
  """Moves what is loaded (the model, the catalogue, compiled functions: objects that live as
  long as the server) out of the garbage collector's reach. Its full passes over them
  paused requests: p99 at 16 / 64 connections went from 57 / 68 ms to 6 / 25 ms
  (BENCHMARKS.md, "HTTP service"). Objects are still freed by reference counting."""
  gc.collect()
  gc.freeze()


def create_app(serving_dir: str | os.PathLike, *, max_batch: int = 64,
               max_wait_ms: float = 2.0, batching_on: bool = True, warm: bool = True,
               watch_s: float = 0.0, fill_wait: float = 0.0) -> Starlette:
  """The app over ``serving_dir`` (a serving directory, or a workdir holding one).

  ``max_batch`` / ``max_wait_ms`` / ``fill_wait``: the batcher's limits (see
  ``batching.Batcher``); ``batching_on=False`` answers
  each request alone. ``warm`` compiles every batch size at start; ``watch_s`` > 0 polls
  the directory and reloads on a change.
  """
  state = State(serving_dir, max_batch=max_batch, max_wait_ms=max_wait_ms,
                batching_on=batching_on, warm=warm, watch_s=watch_s, fill_wait=fill_wait)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if state.warm:
      state.warm_up_s = await run_in_threadpool(warm_up, state.served, state.sizes)
      _log.info("Compiled batch sizes %s in %.2f s.", state.sizes, state.warm_up_s)
    _freeze_loaded()
    await state.batcher.start()
    watcher = asyncio.get_running_loop().create_task(state.watch()) if watch_s > 0 else None
    try:
      yield
    finally:
      if watcher is not None:
        watcher.cancel()
      await state.batcher.stop()

  routes = [
      Route("/recommend", recommend, methods=["POST"]),
      Route("/items/{item_id}/similar", similar, methods=["GET"]),
      Route("/healthz", healthz, methods=["GET"]),
      Route("/metadata", metadata, methods=["GET"]),
      Route("/reload", reload, methods=["POST"]),
      Route("/", home, methods=["GET"]),
  ]
  handlers = {RequestError: _on_request_error, serving.ServingError: _on_request_error,
              HTTPException: _on_http_error, Exception: _on_crash}
  app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
  app.state.service = state
  return app
