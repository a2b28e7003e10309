"""The serving directory: everything needed to answer queries, nothing from training.

Layout of ``<workdir>/serving``::

  serving.json        format version, the feature spec, both towers, the key columns, the
                      index kind and options (``ann``)
  encoders.json/.npz  the fitted feature encoders (plain data)
  query_params.npz    the query tower's parameters, keys joined with '/'
  candidate_params.npz  the candidate tower's (``catalog.add_items`` embeds new items)
  index.faiss         the FAISS index, for serve.index = faiss_ivf or faiss_hnsw
  candidates.npz      embeddings [N, D] and the item key of each row
  items.npz           the items table's display columns (title, genres, price, ...)
  users.npz           per known user: the query columns of their latest training
                      interaction, and the catalogue rows they interacted with (CSR)

``load(path)`` reads it back with numpy alone (plus JAX for the query tower) and gives a
:class:`Recommender`. Queries are dicts keyed by the spec's column names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import numbers
import pathlib
import zipfile
from typing import Any, Mapping, Sequence

import flax
import jax
import ml_collections
import numpy as np
import pyarrow as pa

from twotower_jax import ann
from twotower_jax import arrays
from twotower_jax import config as config_lib
from twotower_jax import features as feat
from twotower_jax import history
from twotower_jax import model as model_lib

# 3: the candidate tower (candidate_params.npz, "candidate_tower") and the index kind
# ("index", index.faiss for FAISS kinds). Version 2 directories still load for serving.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
_FILES = ("serving.json", "encoders.json", "encoders.npz", "query_params.npz", "candidates.npz",
          "items.npz", "users.npz")
_CSR = ("rated_indptr", "rated_rows")
_log = logging.getLogger(__name__)


class ServingError(ValueError):
  """A serving directory or a query is unusable; the message says why and what to do."""


# ----------------------------------------------------------------------------
# Writing.


def save(path: pathlib.Path, config, prep, model: model_lib.TwoTower, params) -> None:
  """Writes the serving directory for a trained model."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  feat.save_encoders(prep.encoders, path)
  ds = prep.dataset
  meta = {
      "format_version": FORMAT_VERSION,
      "config_name": config.name,
      "features": {t: {n: s.to_dict() for n, s in specs.items()}
                   for t, specs in prep.specs.items()},
      "query_tower": {"features": [list(f) for f in model.query.features],
                      "mlp": list(model.query.mlp), "l2_normalize": model.query.l2_normalize},
      "keys": {"user": ds.user_key, "item": ds.item_key, "time": ds.time_key},
      "title_column": _title_column(config, ds),
      "candidate_tower": {"features": [list(f) for f in model.candidate.features],
                          "mlp": list(model.candidate.mlp),
                          "l2_normalize": model.candidate.l2_normalize},
  }
  # A history sharing a candidate table gets a copy of it: the query tower stands alone.
  by_tower = {"query": model_lib.query_tower_params(model, params),
              "candidate": params["candidate"]}
  for tower in ("query", "candidate"):
    flat = flax.traverse_util.flatten_dict(jax.device_get(by_tower[tower]), sep="/")
    np.savez(path / f"{tower}_params.npz", **{k: np.asarray(v) for k, v in flat.items()})
  c_NxD = model_lib.embed_in_batches(model_lib.embed_candidates, params, prep.cand,
                                     config.eval.batch_size, model=model)
  np.savez(path / "candidates.npz", embeddings=c_NxD.astype(np.float32),
           item_id=_plain(prep.item_ids_N))
  index = ann.build(config.serve.get("index", "exact"), c_NxD, ann.options_of(config.serve))
  meta["index"] = ann.save(index, path)
  (path / "serving.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  np.savez(path / "items.npz", **display_columns(ds))
  np.savez(path / "users.npz", **_user_table(prep))


def _plain(values) -> np.ndarray:
  """A column as a numpy array that npz stores without pickling (strings as str)."""
  if isinstance(values, (pa.Array, pa.ChunkedArray)):
    values = values.to_numpy(zero_copy_only=False)
  values = np.asarray(values)
  return values.astype(str) if values.dtype == object else values


def _title_column(config, ds) -> str:
  """``serve.title_column``, else the first text column of the items table."""
  if config.serve.get("title_column"):
    return config.serve.title_column
  for name, values in ds.movies.items():
    if name != ds.item_key and _plain(values[:1]).dtype.kind == "U":
      return name
  return ""


def display_columns(ds) -> dict[str, np.ndarray]:
  """The items table's columns for people: 1-D ones as they are, [N, L] id lists with names
  (MovieLens genres) joined by '|'."""
  out = {}
  for name, values in ds.movies.items():
    if name == ds.item_key:
      continue
    arr = _plain(values)
    if arr.ndim == 2 and ds.genre_names and arr.dtype.kind in "iu":
      names = np.asarray(list(ds.genre_names) + [""])
      arr = np.array(["|".join(names[row[row >= 0]]) for row in arr])  # once per item
    if arr.ndim == 1:
      out[name] = arr
  return out


def _user_table(prep) -> dict[str, np.ndarray]:
  """Per user: the query columns of their latest training interaction, and the catalogue rows
  of all their training interactions (CSR)."""
  ds, train = prep.dataset, prep.train
  time = np.asarray(train[ds.time_key]) if ds.time_key else np.arange(len(prep.train_user))
  order = np.lexsort((time, prep.train_user))
  users, first, counts = np.unique(prep.train_user[order], return_index=True,
                                   return_counts=True)
  last = order[first + counts - 1]
  table = {"user_key": _plain(feat.take(train[ds.user_key], last)),
           "rated_indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
           "rated_rows": prep.train_item[order].astype(np.int64)}
  for name, s in prep.specs["query"].items():
    if s.kind == "history":  # the user's last items in training, as item keys
      seqs, width = prep.histories[name], prep.encoders[name]["width"]
      pos_UxL = history.positions(seqs, users, seqs.indptr_U1[1:][users], width)
      item_rows = history.take(prep.train_item[order].astype(np.int64), pos_UxL, -1)
      keys = _plain(prep.item_ids_N)[np.maximum(item_rows, 0)]
      table[f"hist:{name}"] = np.where(item_rows >= 0, keys, "" if keys.dtype.kind == "U"
                                       else -1)
      for c in feat.side_columns(s):  # raw side values, as a query gives them (NaN: none)
        table[f"hist:{name}.{c}"] = history.take(
            np.asarray(train[c], np.float64)[order], pos_UxL, np.nan)
      if s.get("time_since"):  # each item's time, and the query time of the latest row
        table[f"hist:{name}.time"] = history.take(time[order].astype(np.int64), pos_UxL, 0)
        table[f"col:{ds.time_key}"] = _plain(feat.take(train[ds.time_key], last))
    elif s.column != ds.user_key and s.column in train:
      table[f"col:{s.column}"] = _plain(feat.take(train[s.column], last))
  return table


# ----------------------------------------------------------------------------
# Answers.


@dataclasses.dataclass(frozen=True)
class Recommendations:
  """Top-k per query: the item keys, their scores and display columns, each [Q, k].

  The arrays keep the fixed shape [Q, k] even when fewer than k candidates are available
  (k above the catalogue size, or after exclusions): the missing slots come last, with
  ``valid`` False, ``score`` -inf, ``item_id`` -1 (or '' for string keys) and empty columns.
  """

  item_id: np.ndarray
  score: np.ndarray
  valid: np.ndarray
  columns: dict[str, np.ndarray]
  title_column: str = ""

  @property
  def title(self) -> np.ndarray:
    """The title column ([Q, k]); the item keys as text when the items have none."""
    if self.title_column in self.columns:
      return self.columns[self.title_column]
    return np.where(self.valid, self.item_id.astype(str), "")

  def rows(self, q: int = 0) -> list[dict[str, Any]]:
    """Query ``q``'s results as plain dicts (item id, score, display columns)."""
    out = []
    for j in np.flatnonzero(self.valid[q]):
      row = {"item_id": self.item_id[q, j].item(), "score": float(self.score[q, j])}
      row.update({k: v[q, j].item() for k, v in self.columns.items()})
      out.append(row)
    return out


@dataclasses.dataclass(frozen=True)
class Recommender:
  """A loaded serving directory: checks and encodes raw query columns, scores exactly."""

  meta: dict[str, Any]
  encoders: feat.Encoders
  query_params: Any
  index: Any  # index.BruteForceIndex, or ann.FaissIndex (serve.index); ids are row numbers
  item_ids_N: np.ndarray
  items: dict[str, np.ndarray]
  users: dict[str, np.ndarray]

  # -- the model and its inputs

  @functools.cached_property
  def specs(self) -> dict[str, ml_collections.ConfigDict]:
    """The query tower's feature specs, by feature name."""
    return {n: ml_collections.ConfigDict(s) for n, s in self.meta["features"]["query"].items()}

  @property
  def tower(self) -> model_lib.Tower:
    t = self.meta["query_tower"]
    return model_lib.Tower(features=tuple(tuple(f) for f in t["features"]),
                           mlp=tuple(t["mlp"]), l2_normalize=t["l2_normalize"])

  @property
  def user_key(self) -> str:
    return self.meta["keys"]["user"]

  def query_columns(self) -> list[str]:
    """The raw columns a query needs (each once); a history feature's is its name."""
    return list(dict.fromkeys(_key(n, s) for n, s in self.specs.items()))

  def id_columns(self) -> list[str]:
    """Columns of ``id`` features: a query may leave them out (a new user, say)."""
    return [s.column for s in self.specs.values() if s.kind == "id"]

  def history_columns(self) -> list[str]:
    """History features (item keys, most recent last): a query may leave them out."""
    return [n for n, s in self.specs.items() if s.kind == "history"]

  def history_value_columns(self) -> list[str]:
    """Optional per-item lists beside a history ``h``, aligned with its items: each side
    column as "h.<column>" and, for the time since, each item's time as "h.time" (with the
    query time in the data's time column); left out, they read the training mean."""
    out = []
    for n, s in self.specs.items():
      if s.kind == "history":
        out += [f"{n}.{c}" for c in feat.side_columns(s)]
        out += [f"{n}.time"] if s.get("time_since") else []
    return out

  def known_values(self, feature: str) -> list:
    return self.encoders[feature]["vocab"].tolist()

  # -- known users

  def _user_rows(self, user_ids) -> np.ndarray:
    keys = self.users["user_key"]
    values = np.asarray(user_ids if not np.isscalar(user_ids) else [user_ids])
    if keys.dtype.kind == "U":
      values = values.astype(str)
    elif values.dtype.kind not in "iu":
      return np.full(len(values), -1, np.int64)
    return arrays.find_rows(keys, values)

  def is_known_user(self, user_id) -> bool:
    """Whether ``user_id`` has training interactions (its features are stored)."""
    return bool(self._user_rows([user_id])[0] >= 0)

  def user_features(self, user_ids: Sequence[Any]) -> dict[str, np.ndarray]:
    """The query columns of known users (from their latest training interaction)."""
    rows = self._user_rows(user_ids)
    if (rows < 0).any():
      bad = np.asarray(user_ids)[rows < 0][0].item()
      raise ServingError(f"User {bad!r} has no training interactions, so its features are "
                         f"unknown. Pass them explicitly: {self.query_columns()}.")
    out = {k[4:]: v[rows] for k, v in self.users.items() if k.startswith("col:")}
    for k, v in self.users.items():
      if k.startswith("hist:"):  # the items; "hist:<name>.<x>": values aligned with them
        items = self.users[k.split(".")[0]][rows]
        keep = items != ("" if items.dtype.kind == "U" else -1)
        out[k[5:]] = np.array([list(r[m]) for r, m in zip(v[rows], keep)] + [None],
                              object)[:-1]
    out[self.user_key] = self.users["user_key"][rows]
    return out

  def rated(self, user_ids: Sequence[Any]) -> list[np.ndarray]:
    """The item keys each user interacted with in training (empty for unknown users)."""
    ptr, rated = self.users["rated_indptr"], self.users["rated_rows"]
    return [self.item_ids_N[rated[ptr[i]:ptr[i + 1]]] if i >= 0 else self.item_ids_N[:0]
            for i in self._user_rows(user_ids)]

  def query(self, user_id=None, values: Mapping[str, Any] | None = None) -> dict[str, list]:
    """One query's raw columns: a known user's own (latest training interaction), with
    ``values`` overriding them; for an unknown or absent user, ``values`` alone (a model
    with a user-id feature then serves it through the out-of-vocabulary id)."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    if user_id is not None and self.is_known_user(user_id):
      feats = {k: list(v) for k, v in self.user_features([user_id]).items()}
      feats.update({k: [v] for k, v in values.items()})
      return feats
    optional = self.id_columns() + self.history_columns()
    needed = [c for c in self.query_columns() if c not in optional]
    missing = [c for c in needed if c not in values]
    if missing:
      who = "No user given" if user_id is None else (
          f"User {user_id!r} has no training interactions")
      raise ServingError(f"{who}: a query needs {needed}; missing {missing}.")
    feats = {k: [v] for k, v in values.items()}
    if user_id is not None and self.user_key in self.id_columns():
      feats[self.user_key] = [user_id]
    return feats

  def queries(self, user_ids: Sequence[Any],
              values: Sequence[Mapping[str, Any] | None]) -> dict[str, np.ndarray]:
    """Many queries' raw columns at once, each as :meth:`query` gives it for one (a known
    user's stored columns, overridden by its ``values``); known users are looked up
    together. Raises :class:`ServingError` for the first query :meth:`query` refuses."""
    num_q = len(user_ids)
    if len(values) != num_q:
      raise ServingError(f"{len(values)} value dicts for {num_q} users; pass one per query.")
    values = [{k: v for k, v in (vals or {}).items() if v is not None} for vals in values]
    rows = np.full(num_q, -1, np.int64)
    given = [q for q, u in enumerate(user_ids) if u is not None]
    if given:
      rows[given] = self._user_rows([user_ids[q] for q in given])
    known = np.flatnonzero(rows >= 0)
    others = {int(q): self.query(user_ids[q], values[q]) for q in np.flatnonzero(rows < 0)}
    cols: dict[str, np.ndarray] = {}
    if known.size:
      stored = self.user_features([user_ids[q] for q in known])
      for name, col in stored.items():
        if known.size == num_q:
          cols[name] = col
        else:
          cols[name] = np.full(num_q, None, object)
          cols[name][known] = col
    for q, feats in [(int(q), values[q]) for q in known if values[q]] + list(others.items()):
      for name, v in feats.items():
        if name not in cols or cols[name].dtype != object:
          cols[name] = (np.full(num_q, None, object) if name not in cols
                        else cols[name].astype(object))
        cols[name][q] = v[0] if q in others else v
    return cols

  # -- scoring

  def embed(self, features: Mapping[str, Any], *, check_range: bool = False) -> np.ndarray:
    """Query embeddings [Q, D] of raw query columns (one value per query in each).

    Columns of ``id`` features may be left out or hold None (a new user): such queries, and
    unknown ids or categories, are served through the out-of-vocabulary index (one info
    line). Bad columns (lengths, types, non-finite numbers) raise :class:`ServingError`
    naming the column; with ``check_range``, so do numbers outside the training range.
    """
    return self.embed_inputs(self.encode(features, check_range=check_range))

  def encode(self, features: Mapping[str, Any], *,
             check_range: bool = False) -> dict[str, np.ndarray]:
    """The query tower's inputs ({input name: [Q, ...]}) of raw query columns, checked as
    in :meth:`embed`; :meth:`embed_inputs` turns them into embeddings."""
    cols = self._validated(features, check_range)
    xq = {}
    for name, s in self.specs.items():
      xq.update(feat.encode(name, s, self.encoders[name], cols[_key(name, s)]))
    self._note_unknown(cols, xq)
    return xq

  def embed_inputs(self, xq: Mapping[str, np.ndarray]) -> np.ndarray:
    """Query embeddings [Q, D] of encoded inputs (one jitted call; compiled per Q)."""
    return np.asarray(_query_fn(self.tower)(self.query_params, dict(xq)))

  def _validated(self, features: Mapping[str, Any], check_range: bool) -> dict[str, Any]:
    if not hasattr(features, "items"):
      raise ServingError(f"Query features must be a mapping of column name to values; got "
                         f"{type(features).__name__}.")
    histories, per_item = set(self.history_columns()), set(self.history_value_columns())
    known = [*self.query_columns(), *sorted(per_item), self.user_key]
    if per_item and self.meta["keys"].get("time"):
      known.append(self.meta["keys"]["time"])  # the query time, for the time since
    for k in features:
      if str(k) not in known:  # a typo would otherwise be served as a missing column
        raise ServingError(f"Unknown query column {k!r}.{config_lib.suggest(str(k), known)} "
                           f"This model reads {list(dict.fromkeys(known))}.")
    cols = {str(k): _histories(str(k), v) if k in histories else
            _histories(str(k), v, numbers=True) if k in per_item else _column(str(k), v)
            for k, v in features.items()}
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
      common = max(lengths.values(), key=list(lengths.values()).count)
      odd = next(k for k, n in lengths.items() if n != common)
      raise ServingError(f"Query column {odd!r} has {lengths[odd]} value"
                         f"{'s' * (lengths[odd] != 1)} but the others have "
                         f"{common}; every column needs one value per query. Lengths: "
                         f"{lengths}.")
    needed, ids = self.query_columns(), self.id_columns() + self.history_columns()
    missing = [c for c in needed if c not in cols and c not in ids]
    if missing:
      raise ServingError(f"Query columns missing: {missing}. This model needs {needed}"
                         + (f" ({ids} may be left out: served as new)." if ids else "."))
    num_q = next(iter(lengths.values()), 0)
    if num_q == 0:
      raise ServingError(f"The query holds no values; give each of {needed} one value per "
                         "query.")
    out = {}
    for name, s in self.specs.items():
      key = _key(name, s)
      if key in out:
        continue
      col = cols.get(key)
      if col is None:
        col = np.full(num_q, None, object)
      out[key] = (self._history_queries(name, s, col, cols) if s.kind == "history"
                  else _checked(s, self.encoders[name], col, check_range))
    return out

  def _history_queries(self, name: str, s, items, cols: Mapping[str, Any]) -> np.ndarray:
    """A history's per-query item lists; with side columns or the time since, per query a
    dict of the items and their aligned values (``features.encode_history``)."""
    side, timed = feat.side_columns(s), bool(s.get("time_since"))
    if not side and not timed:
      return items
    time_key = self.meta["keys"].get("time") or ""
    if timed and f"{name}.time" in cols and time_key not in cols:
      raise ServingError(f"Query column {name + '.time'!r} gives each history item's time; "
                         f"the time since needs the query's time too: add {time_key!r}.")
    out = np.empty(len(items), object)
    for q, h in enumerate(items):
      given = {c: cols[f"{name}.{c}"][q] for c in side if f"{name}.{c}" in cols}
      times = cols[f"{name}.time"][q] if timed and f"{name}.time" in cols else None
      for what, values in [*given.items(), ("time", times)]:
        if values is not None and len(values) != len(h):
          raise ServingError(
              f"Query column {name}.{what} has {len(values)} values in query {q} but its "
              f"history {name!r} has {len(h)} items; give one value per item (None for "
              "unknown), most recent last.")
      out[q] = {"items": h, "side": given, "times": times,
                "query_time": _scalar(cols[time_key][q]) if timed and time_key in cols
                else None}
    return out

  def _note_unknown(self, cols: Mapping[str, Any], xq: Mapping[str, np.ndarray]) -> None:
    """One info line per vocabulary feature with values served as out-of-vocabulary."""
    for name, s in self.specs.items():
      if s.kind not in ("id", "categorical") or self.encoders[name]["kind"] == "hash":
        continue
      oov = xq[name] == feat.OOV
      if oov.any():
        value = _scalar(cols[s.column][int(np.flatnonzero(oov)[0])])
        hint = ""
        if isinstance(value, str):
          hint = config_lib.suggest(value, [str(v) for v in self.known_values(name)])
        missing = value is None or value == "" or (_is_int(value) and value == feat.PAD)
        what = "No value" if missing else f"Unknown value {value!r}"
        _log.info("%s for %s (column %r) in %d of %d queries: served through the "
                  "out-of-vocabulary index.%s", what, name, s.column, int(oov.sum()),
                  len(oov), hint)

  def recommend(self, features: Mapping[str, Any], k: int = 10, *,
                exclude_ids: Sequence[Any] | None = None,
                allow_ids: Sequence[Any] | None = None, exclude_rated: bool = False,
                lowest: bool = False, check_range: bool = True) -> Recommendations:
    """The k best (or, with ``lowest``, the k worst) items for each query.

    ``features`` as for :meth:`embed`; ``exclude_ids``: per query, item keys not to return;
    ``allow_ids``: per query, None or the only item keys that may be returned;
    ``exclude_rated``: also leave out each query's user's training items (the query needs
    the user key column, as :meth:`query` gives it). ``check_range`` (the default) rejects
    numbers outside the range seen in training (pass False to score data as it is). Fewer
    than k available items leave padding slots (see :class:`Recommendations`).
    """
    k = _checked_k(k)
    q_QxD = self.embed(features, check_range=check_range)
    users = None
    if exclude_rated:
      if self.user_key not in features:
        raise ServingError(f"exclude_rated needs the user key column {self.user_key!r} in "
                           "the query (rec.query(user_id) adds it).")
      users = _column(self.user_key, features[self.user_key])
    exclude = self.exclusions(len(q_QxD), exclude_ids, users)
    return self.search(q_QxD, k, exclude_rows=exclude, allow_ids=allow_ids, lowest=lowest)

  @functools.cached_property
  def _items_index(self) -> arrays.KeyIndex:
    return arrays.KeyIndex.build(self.item_ids_N)

  @functools.cached_property
  def candidates_NxD(self) -> np.ndarray:
    """The candidate embeddings [N, D] as a host array (rows in catalogue order)."""
    return np.asarray(self.index.embeddings_NxD, np.float32)

  def item_rows(self, item_ids: Any) -> np.ndarray:
    """The catalogue row of each item key (any shape), -1 for keys not in the catalogue
    (also for keys of the wrong type, e.g. text where the keys are integers)."""
    values = np.asarray(item_ids)
    keys_kind = self.item_ids_N.dtype.kind
    if keys_kind == "U":
      values = values.astype(str)
    elif values.dtype.kind not in "iu":
      if values.size == 0:
        values = values.astype(np.int64)
      else:
        return np.full(values.shape, -1, np.int64)
    return self._items_index.rows(values)

  def exclusions(self, num_q: int, exclude_ids: Sequence[Any] | None = None,
                 rated_by: Sequence[Any] | None = None) -> np.ndarray | None:
    """Per query, the catalogue rows not to return, as a [Q, E] array padded with -1: the
    rows of ``exclude_ids`` (per query, a list of item keys; unknown keys are ignored) and
    the training items of the users in ``rated_by`` (one user key, or None, per query). E
    is a power of two (>= 8), so that few shapes reach the index. None when both are
    empty."""
    per_q = [[] for _ in range(num_q)]
    if exclude_ids is not None:
      if len(exclude_ids) != num_q:
        raise ServingError(f"exclude_ids has {len(exclude_ids)} lists for {num_q} queries; "
                           "pass one list of item keys per query.")
      lengths = [len(e) for e in exclude_ids]
      if sum(lengths):
        flat = np.concatenate([np.asarray(e).reshape(-1) for e in exclude_ids if len(e)])
        rows = np.split(self.item_rows(flat), np.cumsum(lengths)[:-1])
        for q in range(num_q):
          per_q[q].append(rows[q])
    if rated_by is not None:
      if len(rated_by) != num_q:
        raise ServingError(f"The user key column has {len(rated_by)} values for {num_q} "
                           "queries.")
      ptr, rated = self.users["rated_indptr"], self.users["rated_rows"]
      known = [q for q, u in enumerate(rated_by) if u is not None]
      if known:
        user_rows = self._user_rows([rated_by[q] for q in known])
        for q, u in zip(known, user_rows):
          if u >= 0:
            per_q[q].append(rated[ptr[u]:ptr[u + 1]])
    lengths = np.array([sum(len(r) for r in rows) for rows in per_q], np.int64)
    if not lengths.sum():
      return None
    flat = np.concatenate([r for rows in per_q for r in rows]).astype(np.int64)
    out = np.full((num_q, arrays.size_bucket(int(lengths.max()))), -1, np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[np.repeat(np.arange(num_q), lengths), np.arange(len(flat)) - starts] = flat
    return out

  def search(self, q_QxD: np.ndarray, k: int, *, exclude_rows: np.ndarray | None = None,
             allow_ids: Sequence[Any] | None = None, lowest: bool = False) -> Recommendations:
    """The top-k items of query embeddings [Q, D] (see :meth:`recommend`);
    ``exclude_rows`` as :meth:`exclusions` gives them. Queries with an allow-list are
    scored exactly over their allowed items only."""
    k = _checked_k(k)
    q_QxD = np.asarray(q_QxD, np.float32)
    if lowest:
      q_QxD = -q_QxD
    scores, rows = self._search_excluding(q_QxD, k, exclude_rows)
    if allow_ids is not None:
      if len(allow_ids) != len(q_QxD):
        raise ServingError(f"allow_ids has {len(allow_ids)} entries for {len(q_QxD)} "
                           "queries; pass one list of item keys (or None) per query.")
      for q in (q for q, a in enumerate(allow_ids) if a is not None):  # allow-lists only
        excluded = None if exclude_rows is None else exclude_rows[q]
        scores[q], rows[q] = self._allowed_top_k(q_QxD[q], allow_ids[q], excluded, k)
    valid = rows >= 0
    if lowest:
      scores = np.where(valid, -scores, -np.inf).astype(scores.dtype)
    safe = np.maximum(rows, 0)
    ids = self.item_ids_N[safe]
    ids = np.where(valid, ids, "" if ids.dtype.kind == "U" else -1)
    columns = {}
    for name, col in self.items.items():
      v = col[safe]
      columns[name] = np.where(valid, v, "" if v.dtype.kind == "U" else np.nan)
    return Recommendations(item_id=ids, score=scores, valid=valid, columns=columns,
                           title_column=self.meta.get("title_column", ""))

  def _search_excluding(self, q_QxD: np.ndarray, k: int, exclude_rows: np.ndarray | None):
    """``index.search`` with exclusions. Above _OVERFETCH_MIN_ITEMS items, where the exact
    index pays k + E blocks per query for E exclusions, long exclusion lists are applied
    here instead: the index returns the best k + _OVERFETCH with none, the excluded ones
    are dropped, and a query left with fewer than k (more than _OVERFETCH of its best
    items excluded) is searched again with its exclusions. The answer is the same."""
    if (exclude_rows is None or exclude_rows.shape[1] <= _OVERFETCH
        or len(self.item_ids_N) <= _OVERFETCH_MIN_ITEMS):
      scores, rows = self.index.search(q_QxD, k, exclude=exclude_rows)
      return np.array(scores, np.float32), np.array(rows, np.int64)
    wide = k + _OVERFETCH
    scores, rows = self.index.search(q_QxD, wide)
    scores, rows = np.asarray(scores, np.float32), np.asarray(rows, np.int64)
    num_q, n = len(rows), len(self.item_ids_N) + 1
    query_QxK = np.arange(num_q)[:, None] * n
    excluded = np.isin(rows + 1 + query_QxK, (exclude_rows + 1 + query_QxK[:, :1]).ravel())
    keep = (rows >= 0) & ~excluded
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept results first, in order
    kept = np.take_along_axis(keep, order, axis=1)
    out_s = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
    out_r = np.where(kept, np.take_along_axis(rows, order, axis=1), -1)
    redo = np.flatnonzero((keep.sum(axis=1) < k) & ((rows >= 0).sum(axis=1) == wide))
    for q in redo:  # rare: most of a query's best items excluded
      s1, r1 = self.index.search(q_QxD[q:q + 1], k, exclude=exclude_rows[q:q + 1])
      out_s[q], out_r[q] = np.asarray(s1)[0], np.asarray(r1)[0]
    return out_s.astype(np.float32), out_r.astype(np.int64)

  def _allowed_top_k(self, q_D, allow_ids, excluded, k: int):
    """One query's exact top-k among its allowed rows (score desc, then row asc)."""
    rows = self.item_rows(np.asarray(allow_ids).reshape(-1))
    rows = np.unique(rows[rows >= 0])
    if excluded is not None:
      rows = rows[~np.isin(rows, excluded)]
    s = self.candidates_NxD[rows] @ q_D
    best = np.lexsort((rows, -s))[:k]
    scores, out = np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64)
    scores[:len(best)], out[:len(best)] = s[best], rows[best]
    return scores, out

  def similar(self, item_ids: Sequence[Any], k: int = 10) -> Recommendations:
    """For each item key, the k items whose candidate embeddings score highest against its
    own (dot product), the item itself left out. An unknown key raises ServingError."""
    k = _checked_k(k)
    ids = np.asarray(item_ids).reshape(-1)
    rows = self.item_rows(ids)
    if (rows < 0).any():
      bad = _scalar(ids[rows < 0][0])
      raise ServingError(f"Unknown item id {bad!r}: not in the catalogue of "
                         f"{len(self.item_ids_N)} items (e.g. "
                         f"{self.item_ids_N[:3].tolist()}).")
    exclude = np.full((len(rows), 8), -1, np.int64)
    exclude[:, 0] = rows
    return self.search(self.candidates_NxD[rows], k, exclude_rows=exclude)


# ----------------------------------------------------------------------------
# Checking one raw column.


def _key(name: str, s) -> str:
  """The query dict key of a feature: its column, or for a history its name (its column is
  the interactions' item key, which a query does not hold)."""
  return name if s.kind == "history" else s.column


def _histories(name: str, value: Any, numbers: bool = False) -> np.ndarray:
  """A history column: per query, a list of item keys (most recent last), a '|'-joined
  string, or None (no history); a single list stands for one query. ``numbers``: a list of
  numbers per query instead (a side column or the times of a history's items)."""
  if numbers:
    return _history_numbers(name, value)
  if isinstance(value, np.ndarray) and value.ndim == 2:
    value = list(value)
  elif value is None or isinstance(value, str) or (
      isinstance(value, (list, tuple, np.ndarray)) and all(np.ndim(v) == 0 and v is not None
                                                           and not isinstance(v, str)
                                                           for v in value) and len(value)):
    value = [value]
  out = np.empty(len(value), object)
  for q, h in enumerate(value):
    if h is None or isinstance(h, str):
      out[q] = [v for v in (h or "").split("|") if v]
      continue
    items = list(np.asarray(h).reshape(-1).tolist()) if np.ndim(h) else None
    if items is None or any(isinstance(v, (float, bool)) for v in items):
      raise ServingError(f"Query column {name!r} (a history) must hold, per query, a list of "
                         f"item keys (most recent last); got {h!r} (row {q}).")
    out[q] = items
  return out


def _history_numbers(name: str, value: Any) -> np.ndarray:
  """Per query, a list of numbers (None: unknown) aligned with a history's items."""
  if isinstance(value, np.ndarray) and value.ndim == 2:
    value = list(value)
  elif value is None or (isinstance(value, (list, tuple, np.ndarray))
                         and all(np.ndim(v) == 0 for v in value) and len(value)):
    value = [value]
  out = np.empty(len(value), object)
  for q, h in enumerate(value):
    items = [] if h is None else list(np.asarray(h, object).reshape(-1).tolist()) \
        if np.ndim(h) else None
    if items is None or any(v is not None and (isinstance(v, (str, bool))
                                               or not isinstance(v, numbers.Number))
                            for v in items):
      raise ServingError(f"Query column {name!r} must hold, per query, a list of numbers "
                         f"(one per history item, None for unknown); got {h!r} (row {q}).")
    out[q] = [None if v is None else float(v) for v in items]
  return out


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


# Exclusion lists longer than _OVERFETCH on catalogues above _OVERFETCH_MIN_ITEMS items are
# applied after the index search (see Recommender._search_excluding).
_OVERFETCH = 32
_OVERFETCH_MIN_ITEMS = 8192


def _checked_k(k: Any) -> int:
  if not _is_int(k) or int(k) < 1:
    raise ServingError(f"k (the number of recommendations) must be an integer >= 1; got "
                       f"{k!r}.")
  return int(k)


def _column(name: str, value: Any) -> np.ndarray:
  """One raw column as a 1-D array; Python lists keep their element types (object)."""
  if isinstance(value, np.ndarray) or (hasattr(value, "__array__")
                                       and not isinstance(value, (list, tuple))):
    arr = np.asarray(value)
  elif value is None or isinstance(value, (str, bytes)) or np.isscalar(value):
    arr = np.empty(1, object)
    arr[0] = value
  else:
    items = list(value)
    if any(np.ndim(v) != 0 for v in items):
      raise ServingError(f"Query column {name!r} must hold one value per query; got nested "
                         "values.")
    arr = np.empty(len(items), object)
    arr[:] = items
  if arr.ndim == 0:
    arr = arr.reshape(1)
  if arr.ndim != 1:
    raise ServingError(f"Query column {name!r} must hold one value per query (1-D); got "
                       f"shape {arr.shape}.")
  return arr


def _scalar(v: Any) -> Any:
  """A numpy scalar as the Python value (so messages show 'x', not np.str_('x'))."""
  return v.item() if isinstance(v, np.generic) else v


def _bad(column: str, col: np.ndarray, row: int, expected: str) -> ServingError:
  v = _scalar(col[row])
  return ServingError(f"Query column {column!r} must be {expected}; got {v!r} "
                      f"(row {row}, {type(v).__name__}).")


def _fmt(x: float) -> str:
  return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _checked(s, enc: Mapping[str, Any], col: np.ndarray, check_range: bool):
  """The column as the encoder takes it, or a ServingError naming what is expected."""
  if s.kind in ("numeric", "timestamp"):
    values = _numbers(s.column, col)
    lo_hi = feat.value_range(enc)
    if s.kind == "numeric" and check_range and lo_hi is not None:
      bad = np.flatnonzero((values < lo_hi[0]) | (values > lo_hi[1]))
      if bad.size:
        raise ServingError(
            f"Query column {s.column!r} is {_fmt(values[bad[0]])} (row {int(bad[0])}), "
            f"outside the range seen in training: {_fmt(lo_hi[0])} to {_fmt(lo_hi[1])}. "
            "Pass a value in that range.")
    if s.kind == "timestamp" and lo_hi is not None:
      lo, hi = lo_hi[0] - (lo_hi[1] - lo_hi[0]), lo_hi[1] + (lo_hi[1] - lo_hi[0])
      far = np.flatnonzero((values < lo) | (values > hi))
      if far.size:
        _log.warning("Query column %r is %s (row %d), more than one training span from the "
                     "training times (%s to %s): its value is clipped to %s to %s.", s.column,
                     _fmt(values[far[0]]), int(far[0]), _fmt(lo_hi[0]), _fmt(lo_hi[1]),
                     _fmt(lo), _fmt(hi))
    return values
  if s.kind in ("multi_hot", "text"):
    if col.dtype.kind == "U":
      return col
    bad = [i for i, v in enumerate(col) if v is not None and not isinstance(v, str)]
    if bad:
      raise _bad(s.column, col, bad[0], "text (several values joined by "
                 f"{s.get('sep', '|')!r})" if s.kind == "multi_hot" else "text")
    return np.array(["" if v is None else v for v in col])
  return _keys(s.column, enc, col)


def _keys(column: str, enc: Mapping[str, Any], col: np.ndarray) -> np.ndarray:
  """A vocabulary column in the vocabulary's type; None becomes the missing value."""
  kind = enc["vocab"].dtype.kind if enc["kind"] == "vocab" else (
      "U" if col.dtype.kind in "UO" and any(isinstance(v, str) for v in col) else "i")
  if kind == "U":
    bad = [i for i, v in enumerate(col) if v is not None and not isinstance(v, (str, int,
                                                                              np.integer))]
    if bad:
      raise _bad(column, col, bad[0], "text")
    return np.array(["" if v is None else str(v) for v in col])
  if col.dtype.kind in "iub":
    return col.astype(np.int64)
  out = np.full(len(col), feat.PAD, np.int64)
  for i, v in enumerate(col):
    if v is None:
      continue
    if isinstance(v, (bool, np.bool_)) or _is_int(v):
      out[i] = int(v)
    elif isinstance(v, str) and v.strip().lower() in ("true", "false"):
      out[i] = int(v.strip().lower() == "true")
    elif isinstance(v, str) and v.strip().lstrip("-").isdigit():
      out[i] = int(v)
    else:
      raise _bad(column, col, i, "an integer (or a boolean), or None when unknown")
  return out


def _numbers(column: str, col: np.ndarray) -> np.ndarray:
  """A numeric column as float64; only finite real numbers (no bools, strings or None)."""
  if col.dtype.kind in "iuf":
    values = col.astype(np.float64)
  elif col.dtype.kind == "O":
    bad = [i for i, v in enumerate(col)
           if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_))]
    if bad:
      raise _bad(column, col, bad[0], "finite numbers")
    values = np.array([_to_float(v) for v in col], np.float64)
  else:
    raise _bad(column, col, 0, "finite numbers")
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise ServingError(f"Query column {column!r} must be a finite number; got "
                       f"{values[bad[0]]} (row {int(bad[0])}).")
  return values


def _to_float(v: numbers.Real) -> float:
  try:
    return float(v)
  except OverflowError:  # an int beyond float range
    return float("inf") if v > 0 else float("-inf")


@functools.lru_cache(maxsize=8)
def _query_fn(tower: model_lib.Tower):
  """One jitted query tower per tower configuration (compiled once per input shape)."""
  return jax.jit(lambda p, x: tower.apply({"params": p}, x))


# ----------------------------------------------------------------------------
# Loading.


def load(path: str | pathlib.Path) -> Recommender:
  """Loads a serving directory written by training (``<workdir>/serving``).

  A directory replaced while it is read (``catalog.add_items`` swaps in a new one) is read
  again, so the result is always one whole directory, the old or the new.
  """
  for _ in range(_LOAD_ATTEMPTS):
    before = _identity(path)
    try:
      rec = _load_once(path)
    except ServingError:
      if _identity(path) == before:
        raise
      continue
    if _identity(path) == before:
      return rec
  raise ServingError(f"{path} was replaced {_LOAD_ATTEMPTS} times while being read; retry "
                     "when the updates pause.")


_LOAD_ATTEMPTS = 5


def _identity(path: str | pathlib.Path) -> tuple:
  """(device, inode) of ``path`` and of ``path/serving``: they change when the directory is
  swapped; None for one that is missing."""
  out = []
  for p in (pathlib.Path(path), pathlib.Path(path) / "serving"):
    try:
      st = p.stat()
      out.append((st.st_dev, st.st_ino))
    except OSError:
      out.append(None)
  return tuple(out)


def _load_once(path: str | pathlib.Path) -> Recommender:
  path = pathlib.Path(path)
  if not path.is_dir():
    raise ServingError(f"Serving directory not found: {path}. Train first "
                       "(python -m twotower_jax.main --config ... --workdir DIR) and pass "
                       "DIR/serving, or the workdir itself.")
  if (path / "serving").is_dir() and not (path / "serving.json").exists():
    path = path / "serving"
  missing = [f for f in _FILES if not (path / f).is_file()]
  if len(missing) == len(_FILES):
    raise ServingError(f"{path} holds no serving directory. Train first (python -m "
                       "twotower_jax.main --config configs/default.py --workdir DIR) and pass "
                       "DIR or DIR/serving.")
  reading = "serving.json"
  try:
    meta = json.loads((path / "serving.json").read_text())
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
      raise ServingError(
          f"{path}/serving.json has format_version {version!r}; this version reads "
          f"{' and '.join(map(str, READABLE_VERSIONS))}. Version 1 directories (from before feature specs) cannot be "
          "served: retrain into a new workdir (python -m twotower_jax.main --config ... "
          "--workdir NEW).")
    if missing:
      raise ServingError(f"Serving directory {path} is incomplete: missing {missing}. It was "
                         "not written by a finished training run; retrain into a fresh "
                         "workdir.")
    reading = "encoders.json / encoders.npz"
    encoders = feat.load_encoders(path)
    loaded = {}
    for reading in ("query_params.npz", "candidates.npz", "items.npz", "users.npz"):
      with np.load(path / reading, allow_pickle=False) as f:
        loaded[reading] = {k: f[k] for k in f.files}
    params = flax.traverse_util.unflatten_dict(loaded["query_params.npz"], sep="/")
    cands = loaded["candidates.npz"]
    embeddings, item_ids = cands["embeddings"], cands["item_id"]
    reading = (meta.get("index") or {}).get("file", "the index")
    index = ann.load(path, meta.get("index"), embeddings)
  except ServingError:
    raise
  except ImportError as e:
    raise ServingError(f"{path} holds a {meta['index']['kind']} index: {e}") from e
  except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ServingError(f"Serving directory {path} is corrupt: {reading} is unreadable "
                       f"({type(e).__name__}: {e}); retrain into a fresh workdir.") from e
  return Recommender(meta=meta, encoders=encoders, query_params=params, index=index,
                     item_ids_N=item_ids, items=loaded["items.npz"],
                     users=loaded["users.npz"])
