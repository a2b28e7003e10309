"""The serving directory: everything needed to answer queries, nothing from training.

Layout of ``<workdir>/serving``::

  serving.json        format version, query-tower settings, feature settings
  encoders.json/.npz  the fitted feature encoders (plain data)
  query_params.npz    the query tower's parameters, keys joined with '/'
  candidates.npz      embeddings [N, D], movie ids, titles, genre ids
  users.npz           per known user: raw features, latest timestamp, rated movies (CSR)

``load(path)`` reads it back with numpy alone (plus JAX for the query tower)
and gives a :class:`Recommender`.
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
import numpy as np

from twotower_jax import arrays
from twotower_jax import config as config_lib
from twotower_jax import features as feat
from twotower_jax import index as index_lib
from twotower_jax import model as model_lib

FORMAT_VERSION = 1
_FILES = ("serving.json", "encoders.json", "encoders.npz", "query_params.npz", "candidates.npz",
          "users.npz")
_log = logging.getLogger(__name__)

# Each raw query column, the command-line flag that sets it (named in error messages) and
# the normalizer whose training range bounds it.
QUERY_FLAGS = {"user_id": "--user_id", "raw_user_age": "--age", "user_gender": "--gender",
               "user_occupation_text": "--occupation", "timestamp": "--time"}
_RANGE_ENCODER = {"raw_user_age": "age", "timestamp": "time"}


class ServingError(ValueError):
  """A serving directory or a query is unusable; the message says why and what to do."""


def save(path: pathlib.Path, config, prep, model: model_lib.TwoTower, params) -> None:
  """Writes the serving directory for a trained model."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  feat.save_encoders(prep.encoders, path)
  q = model.query
  meta = {
      "format_version": FORMAT_VERSION,
      "config_name": config.name,
      "query_tower": {"vocab_sizes": dict(q.vocab_sizes), "mlp": list(q.mlp),
                      "user_dim": q.user_dim, "gender_dim": q.gender_dim,
                      "occupation_dim": q.occupation_dim, "time_dim": q.time_dim,
                      "l2_normalize": q.l2_normalize},
      "features": config.features.to_dict(),
      "genre_names": list(prep.dataset.genre_names),
  }
  (path / "serving.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  flat = flax.traverse_util.flatten_dict(jax.device_get(params["query"]), sep="/")
  np.savez(path / "query_params.npz", **{k: np.asarray(v) for k, v in flat.items()})
  c_NxD = model_lib.embed_in_batches(model_lib.embed_candidates, params, prep.cand,
                                     config.eval.batch_size, model=model)
  movies = prep.dataset.movies
  np.savez(path / "candidates.npz", embeddings=c_NxD.astype(np.float32),
           movie_id=np.asarray(movies["movie_id"], np.int64),
           movie_title=np.asarray(movies["movie_title"]).astype(str),
           movie_genres=np.asarray(movies["movie_genres"], np.int32))
  np.savez(path / "users.npz", **_user_table(prep.train))


def _user_table(train: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per user: features from their latest training rating, and all rated movies (CSR)."""
  order = np.lexsort((train["timestamp"], train["user_id"]))
  uid = np.asarray(train["user_id"])[order]
  users, first, counts = np.unique(uid, return_index=True, return_counts=True)
  last = order[first + counts - 1]
  table = {"user_id": users.astype(np.int64),
           "rated_indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
           "rated_movie_id": np.asarray(train["movie_id"], np.int64)[order]}
  for col in feat.QUERY_COLUMNS.values():
    if col != "user_id" and col in train:
      table[col] = np.asarray(train[col])[last]
  return table


@dataclasses.dataclass(frozen=True)
class Recommendations:
  """Top-N per query: ids, titles, genre names and scores, each [Q, N].

  The arrays keep the fixed shape [Q, N] even when fewer than N candidates are available
  (N above the catalogue size, or after ``exclude_ids``): the missing slots come last, with
  ``movie_id`` -1, ``score`` -inf, an empty ``movie_title`` and no genres.
  """

  movie_id: np.ndarray
  movie_title: np.ndarray
  genres: list[list[str]]
  score: np.ndarray


@dataclasses.dataclass(frozen=True)
class Recommender:
  """A loaded serving directory: encodes raw query features, scores with the exact index."""

  meta: dict[str, Any]
  encoders: feat.Encoders
  query_params: Any
  index: index_lib.BruteForceIndex
  genres_N: np.ndarray
  users: dict[str, np.ndarray]

  @property
  def tower(self) -> model_lib.QueryTower:
    t = dict(self.meta["query_tower"])
    t["mlp"] = tuple(t["mlp"])
    t["vocab_sizes"] = tuple(sorted(t["vocab_sizes"].items()))
    return model_lib.QueryTower(**t)

  def known_values(self, feature: str) -> list:
    return self.encoders[feature]["vocab"].tolist()

  def user_features(self, user_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Raw query features of known users (from their latest training rating)."""
    user_ids = np.asarray(user_ids, np.int64)
    pos = arrays.find_rows(self.users["user_id"], user_ids)
    unknown = pos < 0
    if unknown.any():
      raise ServingError(
          f"User id {int(user_ids[unknown][0])} has no training ratings, so its features are "
          "unknown. Pass the features explicitly (--age --gender --occupation --time).")
    return {k: v[pos] for k, v in self.users.items()
            if k not in ("rated_indptr", "rated_movie_id")}

  def rated(self, user_ids: Sequence[int]) -> list[np.ndarray]:
    """Movie ids each user rated in training (an empty array for unknown users)."""
    ptr = self.users["rated_indptr"]
    rows = arrays.find_rows(self.users["user_id"], np.asarray(user_ids, np.int64))
    return [self.users["rated_movie_id"][ptr[i]:ptr[i + 1]] if i >= 0
            else np.zeros(0, np.int64) for i in rows]

  def embed(self, features: Mapping[str, Any], *, check_range: bool = False) -> np.ndarray:
    """Query embeddings [Q, D] of raw feature columns (TFDS names).

    Each column holds one value per query (a scalar is one query). ``user_gender`` is "M",
    "F" or a boolean (True = M); an unknown occupation is encoded as out-of-vocabulary with
    a warning. For a model with the user id as a feature, ``user_id`` may be left out or hold
    ``None`` (a new user), and ids without training ratings are new users too: all are
    served through the out-of-vocabulary id plus their other features. Bad columns (lengths,
    types, non-finite numbers) raise :class:`ServingError` naming the column; with
    ``check_range`` so do ages and times outside the range seen in training.
    """
    cols, new_user_Q = self._validated(features, check_range=check_range)
    xq = feat.encode_queries(self.encoders, cols)
    if "user_id" in xq:  # new users (and any id without a row) -> the OOV row
      xq["user_id"] = np.where(new_user_Q | (xq["user_id"] < 0), feat.OOV,
                               xq["user_id"]).astype(np.int32)
    return np.asarray(_apply_query(self.tower, self.query_params, xq))

  def _validated(self, features: Mapping[str, Any], *,
                 check_range: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The needed columns as clean 1-D arrays of one length, and the new-user mask [Q]."""
    if not hasattr(features, "items"):  # a dict, or e.g. a pandas DataFrame
      raise ServingError(f"Query features must be a mapping of column name to values; got "
                         f"{type(features).__name__}.")
    cols = {str(k): _column(str(k), v) for k, v in features.items()}
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
      values = list(lengths.values())
      common = max(values, key=values.count)  # the length most columns have
      odd = next(k for k, n in lengths.items() if n != common)
      raise ServingError(
          f"Query feature {odd!r} has {lengths[odd]} value{'s' * (lengths[odd] != 1)} but "
          f"the other columns have {common}; every column needs one value per query. "
          f"Lengths: {lengths}.")
    needed = feat.query_columns(self.encoders)
    missing = [c for c in needed if c not in cols and c != "user_id"]
    if missing:
      raise ServingError(f"Query features missing: {missing}. This model needs {needed}"
                         + (" (user_id may be left out for new users)." if "user_id" in needed
                            else "."))
    num_q = next(iter(lengths.values()), 0)
    if num_q == 0:
      raise ServingError(f"Query features hold no queries; give each of {needed} one value "
                         "per query.")
    out: dict[str, np.ndarray] = {}
    new_user_Q, note = np.zeros(num_q, bool), ""
    for name in needed:
      if name == "user_id":
        out[name], new_user_Q, note = self._user_ids(cols.get(name), num_q)
      elif name in _RANGE_ENCODER:
        out[name] = _numbers(name, cols[name])
        lo_hi = feat.value_range(self.encoders[_RANGE_ENCODER[name]])
        if check_range and lo_hi is not None:
          _check_range(name, out[name], *lo_hi)
      elif name == "user_gender":
        out[name] = _genders(cols[name])
      else:
        out[name] = _strings(name, cols[name])
    if "user_occupation_text" in out:
      occ = out["user_occupation_text"]
      oov = feat.lookup(self.encoders["occupation"], occ) == feat.OOV
      if oov.any():
        logging.warning("Unknown occupation %r: encoded as out-of-vocabulary.", str(occ[oov][0]))
    if note:
      _log.info("%s", note)
    return out, new_user_Q

  def _user_ids(self, col: np.ndarray | None,
                num_q: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Integer user ids (0 for new users), the new-user mask (no id, or not in the vocab)
    and a note saying which queries are served as new users ('' when none)."""
    if col is None:
      who = "the query is served as a new user" if num_q == 1 else (
          f"all {num_q} queries are served as new users")
      return np.zeros(num_q, np.int64), np.ones(num_q, bool), (
          f"No user_id given: {who} through the out-of-vocabulary id plus the features given.")
    if col.dtype.kind in "iu":
      ids, none = col.astype(np.int64), np.zeros(num_q, bool)
    else:
      none = np.array([v is None for v in col], bool)
      bad = [i for i, v in enumerate(col) if not none[i] and not _is_int(v)]
      if bad:
        raise ServingError(_bad_value("user_id", col, bad[0], "integer ids (None for a new "
                                      "user)"))
      ids = np.array([0 if v is None else int(v) for v in col], np.int64)
    unknown = ~none & (feat.lookup(self.encoders["user_id"], ids) <= feat.OOV)
    note = ""
    if unknown.any():
      more = int(unknown.sum()) - 1
      note = (f"User id {int(ids[unknown][0])}{f' and {more} more' if more else ''} "
              f"{'are' if more else 'is'} not in the id vocabulary (no training ratings): "
              "served as new users through the out-of-vocabulary id plus the features given.")
    return ids, none | unknown, note

  def is_known_user(self, user_id: int) -> bool:
    """Whether ``user_id`` has training ratings (its features are stored)."""
    return bool(arrays.find_rows(self.users["user_id"], np.asarray([user_id], np.int64))[0] >= 0)

  def query(self, *, user_id: int | None = None, age: float | None = None,
            gender: str | None = None, occupation: str | None = None,
            time: int | None = None, allow_unknown: bool = False) -> dict[str, list]:
    """One query's raw features from a known user's id and/or explicit values.

    A known ``user_id`` (one with training ratings) starts from that user's own features
    (latest training rating); explicit values override them. Otherwise (no id, or an id
    without training ratings) every other feature the model needs must be given, and a model
    with the user id as a feature serves the query as a new user, through the
    out-of-vocabulary id (said in one info line). ``gender`` is "M" or "F"; an unknown
    ``occupation`` is an error naming the known ones unless ``allow_unknown`` (then it is
    encoded as out-of-vocabulary). Values are checked when the query is embedded.
    """
    explicit = {"raw_user_age": age, "user_gender": gender,
                "user_occupation_text": occupation, "timestamp": time}
    if user_id is not None and not _is_int(user_id):
      raise ServingError(f"user_id must be an integer id; got {user_id!r}.")
    if user_id is not None and self.is_known_user(user_id):
      feats = {k: list(v) for k, v in self.user_features([user_id]).items()}
      feats["user_id"] = [user_id]
      for k, v in explicit.items():  # explicit values override the user's own
        if v is not None:
          feats[k] = [v]
    else:
      needed = feat.query_columns(self.encoders)
      flags = [QUERY_FLAGS[c] for c in needed if c != "user_id"]
      missing = [QUERY_FLAGS[c] for c in needed if c in explicit and explicit[c] is None]
      if missing and user_id is None:
        raise ServingError(f"recommend needs --user_id or all of {' '.join(flags)}; missing "
                           f"{' '.join(missing)}.")
      if missing:
        raise ServingError(
            f"User id {user_id} has no training ratings, so its features are unknown: pass "
            f"them to recommend for it as a new user; missing {' '.join(missing)}.")
      feats = {k: [v] for k, v in explicit.items() if v is not None}
      if "user_id" in self.encoders:
        feats["user_id"] = [None]  # a new user: the out-of-vocabulary id
        who = "No --user_id" if user_id is None else (
            f"User id {user_id} has no training ratings")
        _log.info("%s: recommending for a new user through the out-of-vocabulary id plus the "
                  "features given.", who)
      elif user_id is not None:
        _log.info("User id %d has no training ratings: recommending from the features given.",
                  user_id)
    occ = feats.get("user_occupation_text")
    if occ is not None and "occupation" in self.encoders and not allow_unknown:
      known = [str(v) for v in self.known_values("occupation")]
      if str(occ[0]) not in known:
        raise ServingError(
            f"Unknown occupation {occ[0]!r}.{config_lib.suggest(str(occ[0]), known)} Known: "
            f"{', '.join(sorted(known))}. Pass --allow_unknown to score it as "
            "out-of-vocabulary.")
    return feats

  def recommend(self, features: Mapping[str, Any], k: int = 10, *,
                exclude_ids: Sequence[np.ndarray] | None = None,
                lowest: bool = False, check_range: bool = True) -> Recommendations:
    """The k best (or, with ``lowest``, the k worst) candidates for each query.

    ``features`` as for :meth:`embed`; ``check_range`` (the default) rejects ages and times
    outside the range seen in training (pass False to score data as-is, e.g. a later test
    period). Fewer than k available candidates leave padding slots (see
    :class:`Recommendations`).
    """
    if not _is_int(k) or int(k) < 1:
      raise ServingError(f"k (the number of recommendations) must be an integer >= 1; got "
                         f"{k!r}.")
    q_QxD = self.embed(features, check_range=check_range)
    if lowest:
      q_QxD = -q_QxD
    scores, ids = self.index.search(q_QxD, int(k), exclude=exclude_ids)
    scores, ids = np.asarray(scores), np.asarray(ids)
    if lowest:
      scores = np.where(ids >= 0, -scores, -np.inf).astype(scores.dtype)
    valid = ids >= 0
    pos = np.where(valid, self.index.rows(ids), 0)
    names = np.asarray(self.meta["genre_names"] + [""])
    genres = [[[str(names[g]) for g in self.genres_N[p] if g >= 0] if ok else []
               for p, ok in zip(row, ok_row)] for row, ok_row in zip(pos, valid)]
    titles = np.where(valid, np.asarray(self.index.titles_N)[pos], "")
    return Recommendations(movie_id=ids, movie_title=titles, genres=genres, score=scores)


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


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
      raise ServingError(f"Query feature {name!r} must hold one value per query; got nested "
                         "values.")
    arr = np.empty(len(items), object)
    arr[:] = items
  if arr.ndim == 0:
    arr = arr.reshape(1)
  if arr.ndim != 1:
    raise ServingError(f"Query feature {name!r} must hold one value per query (1-D); got "
                       f"shape {arr.shape}.")
  return arr


def _label(name: str) -> str:
  flag = QUERY_FLAGS.get(name)
  return f"{name!r} ({flag})" if flag else repr(name)


def _bad_value(name: str, col: np.ndarray, row: int, expected: str) -> str:
  return (f"Query feature {_label(name)} must be {expected}; got {col[row]!r} "
          f"(row {row}, {type(col[row]).__name__}).")


def _fmt(x: float) -> str:
  return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _numbers(name: str, col: np.ndarray) -> np.ndarray:
  """A numeric column as float64; only finite real numbers (no bools, strings or None)."""
  expected = "finite numbers"
  if col.dtype.kind in "iuf":
    values = col.astype(np.float64)
  elif col.dtype.kind == "O":
    bad = [i for i, v in enumerate(col)
           if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_))]
    if bad:
      raise ServingError(_bad_value(name, col, bad[0], expected))
    values = np.array([_to_float(v) for v in col], np.float64)
  else:
    raise ServingError(_bad_value(name, col, 0, expected))
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise ServingError(f"Query feature {_label(name)} must be a finite number; got "
                       f"{values[bad[0]]} (row {int(bad[0])}).")
  return values


def _to_float(v: numbers.Real) -> float:
  try:
    return float(v)
  except OverflowError:  # an int beyond float range
    return float("inf") if v > 0 else float("-inf")


def _check_range(name: str, values: np.ndarray, lo: float, hi: float) -> None:
  bad = np.flatnonzero((values < lo) | (values > hi))
  if bad.size:
    raise ServingError(
        f"Query feature {_label(name)} is {_fmt(values[bad[0]])} (row {int(bad[0])}), outside "
        f"the range seen in training: {_fmt(lo)} to {_fmt(hi)}. Pass a value in that range.")


def _genders(col: np.ndarray) -> np.ndarray:
  """user_gender as booleans (True = M) from "M"/"F", booleans or 0/1."""
  expected = "'M' or 'F' or a boolean (True = M)"
  if col.dtype.kind == "b":
    return col.astype(bool)
  if col.dtype.kind in "iu" and np.isin(col, (0, 1)).all():
    return col.astype(bool)
  if col.dtype.kind == "U" and np.isin(np.char.upper(np.char.strip(col)), ("M", "F")).all():
    return np.char.upper(np.char.strip(col)) == "M"
  out = np.zeros(len(col), bool)
  for i, v in enumerate(col):
    if isinstance(v, (bool, np.bool_)):
      out[i] = bool(v)
    elif isinstance(v, str) and v.strip().upper() in ("M", "F"):
      out[i] = v.strip().upper() == "M"
    elif _is_int(v) and int(v) in (0, 1):
      out[i] = bool(v)
    else:
      raise ServingError(_bad_value("user_gender", col, i, expected))
  return out


def _strings(name: str, col: np.ndarray) -> np.ndarray:
  if col.dtype.kind == "U":
    return col
  bad = [i for i, v in enumerate(col) if not isinstance(v, str)]
  if bad:
    raise ServingError(_bad_value(name, col, bad[0], "strings, e.g. 'engineer'"))
  return col.astype(str)


@functools.lru_cache(maxsize=8)
def _query_fn(tower: model_lib.QueryTower):
  """One jitted query tower per tower configuration (compiled once per input shape)."""
  return jax.jit(lambda p, x: tower.apply({"params": p}, x))


def _apply_query(tower: model_lib.QueryTower, params, xq):
  return _query_fn(tower)(params, xq)


def load(path: str | pathlib.Path) -> Recommender:
  """Loads a serving directory written by training (``<workdir>/serving``)."""
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
  if missing:
    raise ServingError(f"Serving directory {path} is incomplete: missing {missing}. It was not "
                       "written by a finished training run; retrain into a fresh workdir.")
  reading = "serving.json"
  try:
    meta = json.loads((path / "serving.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
      raise ServingError(f"{path}/serving.json has format_version "
                         f"{meta.get('format_version')!r}; this version reads {FORMAT_VERSION}. "
                         "Retrain with this version.")
    reading = "encoders.json / encoders.npz"
    encoders = feat.load_encoders(path)
    arrays = {}
    for reading in ("query_params.npz", "candidates.npz", "users.npz"):
      with np.load(path / reading, allow_pickle=False) as f:
        arrays[reading] = {k: f[k] for k in f.files}
    params = flax.traverse_util.unflatten_dict(arrays["query_params.npz"], sep="/")
    cands, users = arrays["candidates.npz"], arrays["users.npz"]
  except ServingError:
    raise
  except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ServingError(f"Serving directory {path} is corrupt: {reading} is unreadable "
                       f"({type(e).__name__}: {e}); retrain into a fresh workdir.") from e
  index = index_lib.BruteForceIndex(embeddings_NxD=cands["embeddings"], ids_N=cands["movie_id"],
                                    titles_N=cands["movie_title"])
  return Recommender(meta=meta, encoders=encoders, query_params=params, index=index,
                     genres_N=cands["movie_genres"], users=users)
