"""Feature encoders: fitted on the training split only, stored as plain data.

Each encoder is a dict of numpy arrays and Python scalars (no objects, no
closures), so an encoder set can be saved as JSON + npz and loaded by serving
code that knows nothing about training. Semantics follow Keras preprocessing:

* vocabulary lookup (``StringLookup``/``IntegerLookup``): index 0 is the
  out-of-vocabulary (OOV) index, known values get 1..V in order of decreasing
  training frequency (ties by value). An unseen value maps to 0, never an error.
* discretization (``Discretization(bin_boundaries=...)``): bucket ``i`` holds
  values ``boundaries[i-1] <= x < boundaries[i]``.
* normalization (``Normalization``): ``(x - mean) / sqrt(var)``.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from twotower_jax.data import dataset

Encoders = dict[str, dict[str, Any]]
Columns = Mapping[str, np.ndarray]

OOV = 0
PAD = -1  # padding inside multi-valued features (genre lists, title words)
_EPS = 1e-7


# ----------------------------------------------------------------------------
# Primitive encoders.


def fit_vocab(values: np.ndarray, max_size: int | None = None) -> dict[str, Any]:
  """Fits a lookup table; ``values`` may be strings or integers, padded with -1."""
  values = np.asarray(values).reshape(-1)
  if values.dtype.kind in "iu":
    values = values[values != PAD]
  uniq, counts = np.unique(values, return_counts=True)
  if uniq.dtype == object:  # e.g. titles held as Python strings: store as plain unicode
    uniq = uniq.astype(str)
  order = np.lexsort((uniq, -counts))  # frequency desc, then value asc
  vocab = uniq[order]
  if max_size is not None:
    vocab = vocab[:max_size]
  return {"kind": "vocab", "vocab": vocab}


def vocab_size(enc: dict[str, Any]) -> int:
  """Number of embedding rows needed: vocabulary plus the OOV index."""
  return len(enc["vocab"]) + 1


def lookup(enc: dict[str, Any], values: np.ndarray) -> np.ndarray:
  """Maps values to indices in ``1..V``; unknown values to ``OOV`` and -1 pads to -1."""
  values = np.asarray(values)
  vocab = enc["vocab"]
  if len(vocab) == 0:
    return np.zeros(values.shape, np.int32)
  if vocab.dtype.kind in "US" and values.dtype.kind not in "US":
    values = values.astype(vocab.dtype.kind)
  order = np.argsort(vocab, kind="stable")
  sorted_vocab = vocab[order]
  pos = np.clip(np.searchsorted(sorted_vocab, values), 0, len(vocab) - 1)
  found = sorted_vocab[pos] == values
  out = np.where(found, order[pos] + 1, OOV).astype(np.int32)
  if values.dtype.kind in "iu":
    out = np.where(values == PAD, PAD, out)
  return out


def fit_normalizer(x: np.ndarray) -> dict[str, Any]:
  """Mean and variance of ``x``, and its training range (``min``, ``max``) for range checks."""
  x = np.asarray(x, np.float64)
  return {"kind": "normalize", "mean": float(x.mean()), "var": float(x.var()),
          "min": float(x.min()), "max": float(x.max())}


def normalize(enc: dict[str, Any], x: np.ndarray) -> np.ndarray:
  std = max(np.sqrt(enc["var"]), _EPS)
  return ((np.asarray(x, np.float64) - enc["mean"]) / std).astype(np.float32)


def value_range(enc: dict[str, Any]) -> tuple[float, float] | None:
  """The (min, max) a normalizer saw in training; None for one fitted before it was stored."""
  if enc.get("min") is None or enc.get("max") is None:
    return None
  return float(enc["min"]), float(enc["max"])


def fit_discretizer(x: np.ndarray, num_buckets: int) -> dict[str, Any]:
  """Evenly spaced boundaries between the training min and max (as the TFRS notebook)."""
  x = np.asarray(x, np.float64)
  return {"kind": "discretize", "boundaries": np.linspace(x.min(), x.max(), num=num_buckets)}


def discretize(enc: dict[str, Any], x: np.ndarray) -> np.ndarray:
  return np.searchsorted(enc["boundaries"], np.asarray(x, np.float64), side="right").astype(
      np.int32)


# Runs of letters, digits and apostrophes, any script ("Amélie" is one word), as Keras's
# TextVectorization keeps accented letters when it strips punctuation.
_TOKEN_RE = re.compile(r"(?:[^\W_]|')+")


def tokenize_titles(titles: np.ndarray, max_words: int) -> np.ndarray:
  """Lower-cased word tokens of each title, without the "(1995)" year, padded to max_words."""
  out = np.full((len(titles), max_words), "", dtype=object)
  for i, title in enumerate(titles):  # once per catalogue item, not per example
    words = _TOKEN_RE.findall(dataset.strip_title_year(title).lower())[:max_words]
    out[i, : len(words)] = words
  return out.astype(str)


# ----------------------------------------------------------------------------
# The encoder set of the two towers.

QUERY_FEATURES = ("user_id", "age", "gender", "occupation", "time")
# The raw column each query feature is encoded from.
QUERY_COLUMNS = {"user_id": "user_id", "age": "raw_user_age", "gender": "user_gender",
                 "occupation": "user_occupation_text", "time": "timestamp"}
CANDIDATE_FEATURES = ("title", "genres", "title_words", "release_year")


def fit_encoders(train: Columns, movies: Columns, features_cfg) -> Encoders:
  """Fits every enabled encoder on the training ratings (and the catalogue's text).

  Candidate vocabularies (titles, title words) are fitted on the titles that
  occur in the training ratings, so a movie seen only at test time gets OOV,
  exactly as a Keras layer adapted on the training data would.
  """
  f = features_cfg
  enc: Encoders = {}
  if f.user_id:
    enc["user_id"] = fit_vocab(train["user_id"])
  if f.age:
    _require(train, "raw_user_age", "features.age")
    enc["age"] = fit_normalizer(train["raw_user_age"])
  if f.gender:
    _require(train, "user_gender", "features.gender")
    enc["gender"] = fit_vocab(train["user_gender"].astype(np.int64))
  if f.occupation:
    _require(train, "user_occupation_text", "features.occupation")
    enc["occupation"] = fit_vocab(train["user_occupation_text"])
  if f.time:
    enc["time_bucket"] = fit_discretizer(train["timestamp"], f.num_time_buckets)
    enc["time"] = fit_normalizer(train["timestamp"])
  if f.title:
    enc["title"] = fit_vocab(train["movie_title"])
  if f.genres != "none":
    enc["genres"] = fit_vocab(train["movie_genres"])
  if f.title_words:
    seen = np.isin(movies["movie_id"], np.unique(train["movie_id"]))
    words = tokenize_titles(movies["movie_title"][seen], f.max_title_words)
    enc["title_words"] = fit_vocab(words[words != ""], max_size=f.max_vocab)
  if f.release_year:
    years = movies["movie_release_year"]
    enc["release_year"] = fit_vocab(years[years >= 0])
  return enc


def _require(cols: Columns, name: str, flag: str) -> None:
  if name not in cols:
    raise ValueError(
        f"Feature column {name!r} is not in this data set (it has {sorted(cols)}); "
        f"turn the feature off with --config.{flag}=False.")


def query_columns(enc: Encoders) -> list[str]:
  """The raw columns a query needs for these encoders."""
  return [col for name, col in QUERY_COLUMNS.items() if name in enc]


def encode_queries(enc: Encoders, cols: Columns) -> dict[str, np.ndarray]:
  """Raw query columns -> model inputs (int32 indices, float32 values), one row per query."""
  out: dict[str, np.ndarray] = {}
  if "user_id" in enc:
    out["user_id"] = lookup(enc["user_id"], cols["user_id"])
  if "age" in enc:
    out["age"] = normalize(enc["age"], cols["raw_user_age"])
  if "gender" in enc:
    out["gender"] = lookup(enc["gender"], np.asarray(cols["user_gender"]).astype(np.int64))
  if "occupation" in enc:
    out["occupation"] = lookup(enc["occupation"], np.asarray(cols["user_occupation_text"]))
  if "time" in enc:
    # Times outside the training range go to the first/last populated bucket (Keras would
    # use buckets 0 and num_buckets, which no training example fills: untrained rows).
    out["time_bucket"] = np.clip(discretize(enc["time_bucket"], cols["timestamp"]), 1,
                                 len(enc["time_bucket"]["boundaries"]) - 1)
    out["time"] = normalize(enc["time"], cols["timestamp"])
  return out


def encode_candidates(enc: Encoders, cols: Columns, features_cfg) -> dict[str, np.ndarray]:
  """Raw candidate columns -> model inputs, one row per candidate."""
  out: dict[str, np.ndarray] = {}
  if "title" in enc:
    out["title"] = lookup(enc["title"], cols["movie_title"])
  if "genres" in enc:
    genres = lookup(enc["genres"], cols["movie_genres"])
    if features_cfg.genres == "first":
      genres = genres[:, :1]
    out["genres"] = genres
  if "title_words" in enc:
    words = tokenize_titles(cols["movie_title"], features_cfg.max_title_words)
    idx = lookup(enc["title_words"], words)
    out["title_words"] = np.where(words == "", PAD, idx).astype(np.int32)
  if "release_year" in enc:
    out["release_year"] = lookup(enc["release_year"], cols["movie_release_year"])
  return out


def vocab_sizes(enc: Encoders) -> dict[str, int]:
  """Embedding table sizes of every lookup encoder (``time_bucket``: buckets)."""
  sizes = {k: vocab_size(v) for k, v in enc.items() if v["kind"] == "vocab"}
  if "time_bucket" in enc:
    sizes["time_bucket"] = len(enc["time_bucket"]["boundaries"]) + 1
  return sizes


# ----------------------------------------------------------------------------
# Plain-data persistence: one JSON file for scalars, one npz for arrays.


def save_encoders(enc: Encoders, directory: str | pathlib.Path) -> None:
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  meta, arrays = {}, {}
  for name, e in enc.items():
    meta[name] = {}
    for key, value in e.items():
      if isinstance(value, np.ndarray):
        arrays[f"{name}/{key}"] = value
      else:
        meta[name][key] = value
  (directory / "encoders.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  np.savez(directory / "encoders.npz", **arrays)


def load_encoders(directory: str | pathlib.Path) -> Encoders:
  directory = pathlib.Path(directory)
  meta_path, arrays_path = directory / "encoders.json", directory / "encoders.npz"
  for p in (meta_path, arrays_path):
    if not p.is_file():
      raise FileNotFoundError(
          f"Feature encoders not found: {p} is missing. Point at a directory written by "
          "training (the workdir's 'serving' folder) or retrain.")
  enc: Encoders = json.loads(meta_path.read_text())
  with np.load(arrays_path, allow_pickle=False) as arrays:
    for key in arrays.files:
      name, field = key.split("/", 1)
      enc[name][field] = arrays[key]
  return enc
