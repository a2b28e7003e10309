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
  """Top-N per query: ids, titles, genre names and scores, each [Q, N]."""

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

  def embed(self, features: Mapping[str, Any]) -> np.ndarray:
    """Query embeddings [Q, D] of raw feature columns (TFDS names); unknown values -> OOV."""
    cols = {k: np.atleast_1d(np.asarray(v)) for k, v in features.items()}
    for name, col in (("user_occupation_text", "occupation"), ("user_gender", "gender")):
      if col in self.encoders and name in cols:
        values = cols[name].astype(np.int64) if col == "gender" else cols[name]
        oov = feat.lookup(self.encoders[col], values) == feat.OOV
        if oov.any():
          logging.warning("Unknown %s %r: encoded as out-of-vocabulary.", col,
                          values[oov][0].item())
    needed = feat.query_columns(self.encoders)
    missing = [c for c in needed if c not in cols]
    if missing:
      raise ServingError(f"Query features missing: {missing}. This model needs {needed}.")
    xq = feat.encode_queries(self.encoders, cols)
    return np.asarray(_apply_query(self.tower, self.query_params, xq))

  def query(self, *, user_id: int | None = None, age: float | None = None,
            gender: str | None = None, occupation: str | None = None,
            time: int | None = None, allow_unknown: bool = False) -> dict[str, list]:
    """One query's raw features from a known user's id and/or explicit values.

    A known ``user_id`` starts from that user's own features (latest training rating);
    explicit values override them. Without a user id every feature the model needs must
    be given. ``gender`` is "M" or "F"; an unknown ``occupation`` is an error naming the
    known ones unless ``allow_unknown`` (then it is encoded as out-of-vocabulary).
    """
    explicit = {"raw_user_age": age, "user_gender": gender,
                "user_occupation_text": occupation, "timestamp": time}
    if user_id is not None:
      feats = self.user_features([user_id])
      feats["user_id"] = [user_id]
      for k, v in explicit.items():  # explicit values override the user's own
        if v is not None:
          feats[k] = [v]
    else:
      needed = set(feat.query_columns(self.encoders))
      missing = [f"--{flag}" for flag, (col, v) in zip(("age", "gender", "occupation", "time"),
                                                       explicit.items())
                 if v is None and col in needed]
      if missing:
        raise ServingError(f"recommend needs --user_id or all of --age --gender --occupation "
                           f"--time; missing {' '.join(missing)}.")
      if "user_id" in self.encoders:
        raise ServingError("This model uses the user id as a feature: pass --user_id.")
      feats = {k: [v] for k, v in explicit.items() if v is not None}
    if "user_gender" in feats:
      feats["user_gender"] = [g in ("M", True, 1) for g in feats["user_gender"]]
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
                lowest: bool = False) -> Recommendations:
    """The k best (or, with ``lowest``, the k worst) candidates for each query."""
    q_QxD = self.embed(features)
    if lowest:
      q_QxD = -q_QxD
    scores, ids = self.index.search(q_QxD, k, exclude=exclude_ids)
    scores, ids = np.asarray(scores), np.asarray(ids)
    if lowest:
      scores = -scores
    pos = np.maximum(self.index.rows(ids), 0)
    names = np.asarray(self.meta["genre_names"] + [""])
    genres = [[[str(names[g]) for g in self.genres_N[p] if g >= 0] for p in row] for row in pos]
    return Recommendations(movie_id=ids, movie_title=np.asarray(self.index.titles_N)[pos],
                           genres=genres, score=scores)


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
  except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
    raise ServingError(f"Serving directory {path} is corrupt: {reading} is unreadable "
                       f"({type(e).__name__}: {e}); retrain into a fresh workdir.") from e
  index = index_lib.BruteForceIndex(embeddings_NxD=cands["embeddings"], ids_N=cands["movie_id"],
                                    titles_N=cands["movie_title"])
  return Recommender(meta=meta, encoders=encoders, query_params=params, index=index,
                     genres_N=cands["movie_genres"], users=users)
