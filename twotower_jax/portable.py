"""A portable retrieval model: an ``export_model`` directory loaded with jax and numpy only.

This file imports nothing but the standard library, numpy and jax (no flax, optax,
ml_collections, pyarrow, nor the rest of twotower_jax). ``--mode=export_model`` copies it
into every export as ``portable.py``, so the directory works without the package::

  import sys; sys.path.insert(0, "runs/seed/export_model")
  import portable
  m = portable.load("runs/seed/export_model")
  ids, scores = m.recommend({"raw_user_age": [30], "user_gender": [False],
                             "user_occupation_text": ["engineer"], "timestamp": [890000000]},
                            k=10)

Layout of an export directory::

  manifest.json        format version, the query features (kind, column, options), the
                       encoded inputs (name, dtype, trailing shape), D, N, the index
  query_tower.jaxexport
                       the query tower, jax.export-serialized (StableHLO) for CPU and
                       CUDA: (params, inputs) -> [B, D] float32, B symbolic
  query_params.npz     its parameters (flat, keys joined with '/'), passed as an argument
                       rather than baked in, so the serialized function stays small
  encoders.json/.npz   the fitted encoders as plain data (vocabularies, statistics, buckets)
  candidates.npz       embeddings [N, D] float32 and the item key of each row
  items.npz            the catalogue's display columns (title, genres, ...), one per row
  index.faiss          only when the serving directory held an approximate index
  portable.py          this module

Raw query columns are encoded here with numpy exactly as ``features.encode`` does (same
vocabulary indices, hashes, normalization, buckets, words, history rows with their side
columns and time since), and checked as ``serving.Recommender`` checks them. Scores are
float32 dot products; the exact search breaks ties by lower catalogue row, as
``index.exact_top_k`` does, so ``recommend`` returns ``Recommender.recommend``'s items.
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
import pathlib
import re
import zipfile
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "twotower_jax.export_model"
FORMAT_VERSION = 1
KINDS = ("id", "categorical", "numeric", "timestamp", "multi_hot", "text", "history")
OOV = 0
PAD = -1
VALUE_SUFFIX = "_value"
SIDE_SUFFIX = "_side"  # a history's per-position side columns [B, L, S]
TIME_SINCE_SUFFIX = "_time_since"  # a history's per-position time since each item [B, L]
SECONDS_PER_DAY = 86400.0
_EPS = 1e-7
_REEXPORT = ("Re-export it with this version: python -m twotower_jax.main "
             "--mode=export_model --workdir WORKDIR [--export_dir OUT].")
# Text: lower-cased (one code point at a time, as pyarrow's utf8_lower), a trailing release
# year dropped, then runs of letters, digits and apostrophes ("Amélie" is one word).
_TRAILING_YEAR = re.compile("\\([0-9]{4}(?:[\t\n\f\r ]*[-\u2013][\t\n\f\r ]*[0-9]{0,4})?\\)"
                            "[\t\n\f\r ]*\\Z")
_WORD = re.compile(r"(?:[^\W_]|')+")
_SCORE_BYTES = 1 << 28  # scores held at once while searching: query tiles x N floats
_log = logging.getLogger(__name__)


class PortableError(ValueError):
  """An export directory or a query is unusable; the message says why and what to do."""


# ----------------------------------------------------------------------------
# Encoding raw columns (numpy re-implementation of features.encode).


class _SimpleLower(dict):
  """str.translate table: each code point to its one-code-point lower case."""

  def __missing__(self, cp: int) -> str:
    low = chr(cp).lower()
    self[cp] = low[0] if low else ""
    return self[cp]


_LOWER = _SimpleLower()


def words(text: str) -> list[str]:
  """A string's lower-cased words, a trailing "(1995)" or "(1975-1979)" dropped."""
  low = text.lower() if text.isascii() else text.translate(_LOWER)
  return _WORD.findall(_TRAILING_YEAR.sub("", low, count=1))


def _hash_rows(values: np.ndarray, buckets: int) -> np.ndarray:
  """Rows 1..buckets by the fixed hashes of features.py: CRC-32 of a string's UTF-8 bytes,
  the murmur3 finalizer of an integer."""
  values = np.asarray(values)
  if values.dtype.kind in "USO":
    uniq, inv = np.unique(values.astype(str).reshape(-1), return_inverse=True)
    h = np.array([zlib.crc32(s.encode("utf-8")) for s in uniq], np.uint64)
    return (h[inv.reshape(-1)] % np.uint64(buckets) + np.uint64(1)).astype(np.int32)
  x = np.asarray(values, np.int64).reshape(-1).astype(np.uint64)
  x = (x ^ (x >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
  x = (x ^ (x >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
  x ^= x >> np.uint64(33)
  return (x % np.uint64(buckets) + np.uint64(1)).astype(np.int32)


def sorted_vocab(enc: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(the vocabulary sorted, the vocabulary position of each): what ``lookup`` searches.
  A loaded model keeps it under the encoder's "sorted" key; otherwise it is sorted here."""
  if "sorted" in enc:
    return enc["sorted"]
  order = np.argsort(enc["vocab"], kind="stable")
  return enc["vocab"][order], order


def lookup(enc: dict[str, Any], values) -> np.ndarray:
  """Indices in 1..V of ``values`` (any shape); unknown values give OOV (0), padding (-1 or
  "") gives -1. Hash encoders hash every value, padding included."""
  values = np.asarray(values)
  if values.dtype.kind == "b":
    values = values.astype(np.int64)
  if enc["kind"] == "hash":
    return _hash_rows(values, int(enc["buckets"])).reshape(values.shape)
  vocab, order = sorted_vocab(enc)
  if values.dtype.kind == "O":
    values = values.astype(str if vocab.dtype.kind in "US" else np.int64)
  if vocab.dtype.kind in "US" and values.dtype.kind not in "US":
    values = values.astype(str)
  pad = (values == "") if values.dtype.kind in "US" else (values == PAD)
  if values.dtype.kind in "US" and vocab.dtype.kind not in "US":  # compared as text
    as_text = vocab.astype(str)
    resort = np.argsort(as_text, kind="stable")
    vocab, order = as_text[resort], order[resort]
  elif vocab.dtype.kind == "f" or values.dtype.kind == "f":
    vocab, values = vocab.astype(np.float64), values.astype(np.float64)
  out = np.full(values.shape, OOV, np.int32)
  if len(vocab):
    pos = np.minimum(np.searchsorted(vocab, values), len(vocab) - 1)
    found = vocab[pos] == values
    out = np.where(found, order[pos] + 1, OOV).astype(np.int32)
  return np.where(pad, PAD, out).astype(np.int32)


def _normalize(enc: dict[str, Any], x: np.ndarray) -> np.ndarray:
  std = max(np.sqrt(enc["var"]), _EPS)
  return ((np.asarray(x, np.float64) - enc["mean"]) / std).astype(np.float32)


def _even_buckets(boundaries: np.ndarray, x: np.ndarray) -> np.ndarray:
  """``searchsorted(boundaries, x, side="right")`` for evenly spaced boundaries."""
  n = len(boundaries)
  if n < 2 or not boundaries[-1] > boundaries[0]:
    return np.searchsorted(boundaries, x, side="right").astype(np.int32)
  step = (boundaries[-1] - boundaries[0]) / (n - 1)
  idx = np.clip(np.floor((x - boundaries[0]) / step).astype(np.int64) + 1, 0, n)
  idx -= (idx > 0) & (x < boundaries[np.maximum(idx - 1, 0)])
  idx += (idx < n) & (x >= boundaries[np.minimum(idx, n - 1)])
  return idx.astype(np.int32)


def value_range(enc: Mapping[str, Any]) -> tuple[float, float] | None:
  """The (min, max) a numeric feature saw in training; None when not stored."""
  if enc.get("min") is None or enc.get("max") is None:
    return None
  return float(enc["min"]), float(enc["max"])


def _lists(values, kind: str, sep: str) -> list[list]:
  """Per row, the values of a multi-valued column: words of text, ``sep``-split strings, or
  the non-padding entries of a [N, L] array."""
  arr = np.asarray(values)
  if arr.ndim == 2:
    keep = (arr != "") if arr.dtype.kind in "US" else (arr != PAD)
    return [list(row[k]) for row, k in zip(arr, keep)]
  if kind == "text":
    return [words("" if v is None else str(v)) for v in arr.tolist()]
  return [("" if v is None else v).split(sep) for v in arr.tolist()]


def _padded(lists: list[list], enc: dict[str, Any], width: int) -> np.ndarray:
  """[N, width] vocabulary indices of each list's first ``width`` values ("" skipped)."""
  lists = [[v for v in row if not (isinstance(v, str) and v == "")] for row in lists]
  lens = np.array([min(len(r), width) for r in lists], np.int64)
  out = np.full((len(lists), width), PAD, np.int32)
  flat = [v for r in lists for v in r[:width]]
  if flat:
    rows = np.repeat(np.arange(len(lists)), lens)
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    out[rows, pos] = lookup(enc, np.asarray(flat))
  return out


def encode_histories(enc: dict[str, Any], histories) -> np.ndarray:
  """[Q, L] embedding rows of each query's history (item keys, most recent last): its
  last L items, -1 on the left."""
  width = int(enc["width"])
  out = np.full((len(histories), width), PAD, np.int32)
  for q, h in enumerate(histories):  # one query at a time: serving, not training
    if isinstance(h, str):
      h = [v for v in h.split("|") if v]
    h = np.asarray(h if h is not None else [])
    if h.size == 0:
      continue
    if h.dtype.kind in "iu":
      h = h[h != PAD]
    elif h.dtype.kind in "fc":
      raise PortableError("history items must be item keys (integers or strings), not "
                          f"numbers like {h[:1].tolist()}.")
    if len(h):
      h = h[-width:]
      if "vocab" in enc and enc["vocab"].dtype.kind in "iu" and h.dtype.kind not in "iu":
        try:
          h = h.astype(np.int64)
        except ValueError as e:
          raise PortableError(f"history item keys of this model are integers; got "
                              f"{h.tolist()} (query {q}).") from e
      out[q, width - len(h):] = lookup(enc, h)
  return out


def side_columns(spec: Mapping[str, Any]) -> tuple[str, ...]:
  """A history spec's per-item side columns (none for a spec without them)."""
  return tuple(spec.get("side", ()) or ())


def time_since(query_time_Q, item_time_QxL, valid_QxL, mean: float, std: float) -> np.ndarray:
  """[Q, L] float32: log1p of the days from each history item to its query, normalized; 0
  at padding."""
  seconds = np.maximum(query_time_Q[:, None] - item_time_QxL, 0).astype(np.float32)
  value = (np.log1p(seconds / np.float32(SECONDS_PER_DAY)) - np.float32(mean)) / np.float32(std)
  return np.where(valid_QxL, value, np.float32(0)).astype(np.float32)


def encode_history(name: str, spec: Mapping[str, Any], enc: dict[str, Any], histories
                   ) -> dict[str, np.ndarray]:
  """A history's inputs: the item rows, plus with side columns ``<name>_side`` and with
  ``time_since`` ``<name>_time_since``. A query is its item keys, or a dict {"items",
  "side": {column: values}, "times", "query_time"} with lists aligned with the items; a
  missing side value or time reads the training mean."""
  items = [h.get("items") if isinstance(h, dict) else h for h in histories]
  out = {name: encode_histories(enc, items)}
  side, timed = side_columns(spec), bool(spec.get("time_since", False))
  if not side and not timed:
    return out
  width, num_q = int(enc["width"]), len(histories)
  valid_QxL = out[name] != PAD
  side_QxLxS = np.full((num_q, width, len(side)), np.nan)
  item_time_QxL = np.zeros((num_q, width), np.float64)
  known_QxL = np.zeros((num_q, width), bool)
  query_time_Q = np.zeros(num_q, np.float64)
  for q, h in enumerate(histories):  # one query at a time: serving, not training
    if not isinstance(h, dict):
      continue
    n = int(valid_QxL[q].sum())
    for j, c in enumerate(side):
      v = (h.get("side") or {}).get(c)
      if v is not None and n:
        side_QxLxS[q, width - n:, j] = np.asarray([np.nan if x is None else x for x in v],
                                                  np.float64)[-n:]
    times, t = h.get("times"), h.get("query_time")
    if times is not None and t is not None and n:
      times_n = np.asarray([np.nan if x is None else x for x in times], np.float64)[-n:]
      known_QxL[q, width - n:] = np.isfinite(times_n)  # a missing time reads the mean
      item_time_QxL[q, width - n:] = np.where(np.isfinite(times_n), times_n, 0.0)
      query_time_Q[q] = float(t)
  if side:
    z = (side_QxLxS - np.asarray(enc["side_mean"])) / np.asarray(enc["side_std"])
    z = np.where(np.isfinite(z), z, 0.0).astype(np.float32)
    out[name + SIDE_SUFFIX] = np.where(valid_QxL[..., None], z, 0.0).astype(np.float32)
  if timed:
    out[name + TIME_SINCE_SUFFIX] = time_since(
        np.round(query_time_Q).astype(np.int64), np.round(item_time_QxL).astype(np.int64),
        valid_QxL & known_QxL, enc["time_mean"], enc["time_std"])
  return out


def encode_feature(name: str, spec: Mapping[str, Any], enc: dict[str, Any], values
                   ) -> dict[str, np.ndarray]:
  """The model inputs of one feature from its raw column (``features.encode``'s result):
  ``{name: ...}``, plus ``name_value`` for a timestamp."""
  kind = spec["kind"]
  if kind in ("id", "categorical"):
    idx = lookup(enc, values)
    return {name: np.where(idx == PAD, OOV, idx).astype(np.int32)}
  if kind == "numeric":
    x = np.asarray(values, np.float64)
    if enc["log"]:
      x = np.log1p(x)
    if "boundaries" in enc:
      return {name: np.searchsorted(enc["boundaries"], x, side="right").astype(np.int32)}
    return {name: _normalize(enc, x) if spec["normalize"] else x.astype(np.float32)}
  if kind == "timestamp":
    x = np.asarray(values, np.float64)
    bucket = np.clip(_even_buckets(enc["buckets"], x), 1, len(enc["buckets"]) - 1)
    if value_range(enc) is not None:
      lo, hi = value_range(enc)
      x = np.clip(x, lo - (hi - lo), hi + (hi - lo))
    return {name: bucket, name + VALUE_SUFFIX: _normalize(enc, x)}
  if kind in ("multi_hot", "text"):
    return {name: _padded(_lists(values, kind, spec.get("sep", "|")), enc, int(enc["width"]))}
  if kind == "history":
    return encode_history(name, spec, enc, values)
  raise PortableError(f"Feature {name!r} has kind {kind!r}, which this loader cannot encode "
                      f"(it knows {', '.join(KINDS)}). {_REEXPORT}")


# ----------------------------------------------------------------------------
# Checking raw query columns (as serving.Recommender does).


def _scalar(v: Any) -> Any:
  return v.item() if isinstance(v, np.generic) else v


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _bad(column: str, col: np.ndarray, row: int, expected: str) -> PortableError:
  v = _scalar(col[row])
  return PortableError(f"Query column {column!r} must be {expected}; got {v!r} "
                       f"(row {row}, {type(v).__name__}).")


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
      raise PortableError(f"Query column {name!r} must hold one value per query; got nested "
                          "values.")
    arr = np.empty(len(items), object)
    arr[:] = items
  if arr.ndim == 0:
    arr = arr.reshape(1)
  if arr.ndim != 1:
    raise PortableError(f"Query column {name!r} must hold one value per query (1-D); got "
                        f"shape {arr.shape}.")
  return arr


def _histories(name: str, value: Any) -> np.ndarray:
  """Per query, a list of item keys (most recent last), a '|'-joined string, or None; a
  single flat list stands for one query."""
  if isinstance(value, np.ndarray) and value.ndim == 2:
    value = list(value)
  elif value is None or isinstance(value, str) or (
      isinstance(value, (list, tuple, np.ndarray)) and len(value) and all(
          np.ndim(v) == 0 and v is not None and not isinstance(v, str) for v in value)):
    value = [value]
  out = np.empty(len(value), object)
  for q, h in enumerate(value):
    if h is None or isinstance(h, str):
      out[q] = [v for v in (h or "").split("|") if v]
      continue
    items = list(np.asarray(h).reshape(-1).tolist()) if np.ndim(h) else None
    if items is None or any(isinstance(v, (float, bool)) for v in items):
      raise PortableError(f"Query column {name!r} (a history) must hold, per query, a list "
                          f"of item keys (most recent last); got {h!r} (row {q}).")
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
      raise PortableError(f"Query column {name!r} must hold, per query, a list of numbers "
                          f"(one per history item, None for unknown); got {h!r} (row {q}).")
    out[q] = [None if v is None else float(v) for v in items]
  return out


def _numbers(column: str, col: np.ndarray) -> np.ndarray:
  """Finite real numbers as float64 (no bools, strings or None)."""
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
    raise PortableError(f"Query column {column!r} must be a finite number; got "
                        f"{values[bad[0]]} (row {int(bad[0])}).")
  return values


def _to_float(v: numbers.Real) -> float:
  try:
    return float(v)
  except OverflowError:  # an int beyond float range
    return float("inf") if v > 0 else float("-inf")


def _keys(column: str, enc: Mapping[str, Any], col: np.ndarray) -> np.ndarray:
  """A vocabulary column in the vocabulary's type; None becomes the missing value."""
  kind = enc["vocab"].dtype.kind if enc["kind"] == "vocab" else (
      "U" if col.dtype.kind in "UO" and any(isinstance(v, str) for v in col) else "i")
  if kind == "U":
    bad = [i for i, v in enumerate(col)
           if v is not None and not isinstance(v, (str, int, np.integer))]
    if bad:
      raise _bad(column, col, bad[0], "text")
    return np.array(["" if v is None else str(v) for v in col])
  if col.dtype.kind in "iub":
    return col.astype(np.int64)
  out = np.full(len(col), PAD, np.int64)
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


def _fmt(x: float) -> str:
  return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _checked(spec: Mapping[str, Any], enc: Mapping[str, Any], col: np.ndarray,
             check_range: bool):
  """The column as the encoder takes it, or a PortableError naming what is expected."""
  kind, column = spec["kind"], spec["column"]
  if kind in ("numeric", "timestamp"):
    values = _numbers(column, col)
    lo_hi = value_range(enc)
    if kind == "numeric" and check_range and lo_hi is not None:
      bad = np.flatnonzero((values < lo_hi[0]) | (values > lo_hi[1]))
      if bad.size:
        raise PortableError(
            f"Query column {column!r} is {_fmt(values[bad[0]])} (row {int(bad[0])}), outside "
            f"the range seen in training: {_fmt(lo_hi[0])} to {_fmt(lo_hi[1])}. Pass a value "
            "in that range.")
    if kind == "timestamp" and lo_hi is not None:
      span = lo_hi[1] - lo_hi[0]
      far = np.flatnonzero((values < lo_hi[0] - span) | (values > lo_hi[1] + span))
      if far.size:
        _log.warning("Query column %r is %s (row %d), more than one training span from the "
                     "training times (%s to %s): its value is clipped.", column,
                     _fmt(values[far[0]]), int(far[0]), _fmt(lo_hi[0]), _fmt(lo_hi[1]))
    return values
  if kind in ("multi_hot", "text"):
    if col.dtype.kind == "U":
      return col
    bad = [i for i, v in enumerate(col) if v is not None and not isinstance(v, str)]
    if bad:
      raise _bad(column, col, bad[0], "text (several values joined by "
                 f"{spec.get('sep', '|')!r})" if kind == "multi_hot" else "text")
    return np.array(["" if v is None else v for v in col])
  return _keys(column, enc, col)


# ----------------------------------------------------------------------------
# Search.


def _canon(s):
  """-0.0 as +0.0, so that equal scores tie exactly."""
  return jnp.where(s == 0, jnp.zeros_like(s), s)


@functools.partial(jax.jit, static_argnames=("k",))
def _dense_top_k(q_QxD, c_NxD, exclude_QxE, *, k: int):
  """Top-k rows by float32 dot product; equal scores put the lower row first."""
  s_QxN = _canon(jnp.dot(q_QxD, c_NxD.T, precision=jax.lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32))
  rows = jnp.arange(s_QxN.shape[0])[:, None]
  ex = jnp.where(exclude_QxE >= 0, exclude_QxE, s_QxN.shape[1])
  s_QxN = s_QxN.at[rows, ex].set(-jnp.inf, mode="drop")
  v_Qxk, i_Qxk = jax.lax.top_k(s_QxN, k)
  return v_Qxk, jnp.where(v_Qxk == -jnp.inf, -1, i_Qxk)


def _bucket(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << (int(n) - 1).bit_length())


def exact_search(q_QxD: np.ndarray, c_NxD, k: int, exclude_QxE: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(scores [Q, k] float32, rows [Q, k] int64): the exact top-k catalogue rows of each
  query, -inf / -1 where fewer than k remain; ties go to the lower row."""
  num_q, n = q_QxD.shape[0], int(c_NxD.shape[0])
  if exclude_QxE is None:
    exclude_QxE = np.full((num_q, 0), -1, np.int32)
  kk = min(int(k), n)
  scores = np.full((num_q, k), -np.inf, np.float32)
  rows = np.full((num_q, k), -1, np.int64)
  if kk == 0 or num_q == 0:
    return scores, rows
  tile = max(1, min(num_q, _SCORE_BYTES // (4 * n)))
  width = _bucket(exclude_QxE.shape[1]) if exclude_QxE.shape[1] else 0
  ex = np.full((num_q, width), -1, np.int32)
  ex[:, :exclude_QxE.shape[1]] = exclude_QxE
  q = np.asarray(q_QxD, np.float32)
  for start in range(0, num_q, tile):
    v, i = _dense_top_k(q[start:start + tile], c_NxD, ex[start:start + tile], k=kk)
    scores[start:start + tile, :kk], rows[start:start + tile, :kk] = np.asarray(v), np.asarray(i)
  return scores, rows


# ----------------------------------------------------------------------------
# The loaded model.


class Model:
  """A loaded export: checks and encodes raw query columns, runs the serialized query tower,
  searches the candidates."""

  def __init__(self, path: pathlib.Path, manifest: dict[str, Any], exported, params,
               encoders: dict[str, dict[str, Any]], embeddings_NxD: np.ndarray,
               item_ids_N: np.ndarray, items: dict[str, np.ndarray]):
    self.path = path
    self.manifest = manifest
    self.specs: dict[str, dict[str, Any]] = manifest["features"]
    self.encoders = encoders
    for enc in encoders.values():
      if enc.get("kind") == "vocab":
        enc["sorted"] = sorted_vocab(enc)
    self.item_ids_N = item_ids_N
    self.items = items
    self.embeddings_NxD = embeddings_NxD
    self._c_NxD = jax.device_put(embeddings_NxD)
    self._params = jax.device_put(params)
    self._tower = jax.jit(exported.call)
    self._faiss = None
    order = np.argsort(item_ids_N, kind="stable")
    self._sorted_ids = (item_ids_N[order], order)

  @property
  def dim(self) -> int:
    return int(self.manifest["dim"])

  def __len__(self) -> int:
    return len(self.item_ids_N)

  def query_columns(self) -> list[str]:
    """The raw columns a query needs (each once); a history feature's is its name."""
    return list(self.manifest["query_columns"])

  def optional_columns(self) -> list[str]:
    """Columns a query may leave out: ids (a new user) and histories."""
    return list(self.manifest["optional_columns"])

  def history_value_columns(self) -> list[str]:
    """Optional per-item lists beside a history ``h``, aligned with its items: each side
    column as "h.<column>" and, for the time since, each item's time as "h.time" (with the
    query time in the data's time column)."""
    out = []
    for n, s in self.specs.items():
      if s["kind"] == "history":
        out += [f"{n}.{c}" for c in side_columns(s)]
        out += [f"{n}.time"] if s.get("time_since") else []
    return out

  def encode(self, columns: Mapping[str, Any], *, check_range: bool = False
             ) -> dict[str, np.ndarray]:
    """The query tower's inputs for raw query columns (one value per query in each)."""
    cols = self._validated(columns, check_range)
    x = {}
    for name, s in self.specs.items():
      x.update(encode_feature(name, s, self.encoders[name], cols[_key(name, s)]))
    return x

  def embed(self, columns: Mapping[str, Any], *, check_range: bool = False) -> np.ndarray:
    """Query embeddings [Q, D] of raw query columns, as ``Recommender.embed``. Unknown ids
    and categories, and left-out id columns, are served through the out-of-vocabulary row."""
    x = self.encode(columns, check_range=check_range)
    return np.asarray(self._tower(self._params, x))

  def recommend(self, columns: Mapping[str, Any], k: int = 10, *,
                exclude_ids: Sequence[Any] | None = None, check_range: bool = True,
                index: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """(item_ids [Q, k], scores [Q, k]): the k best items of each query, best first.

    ``exclude_ids``: per query, item keys not to return. Slots beyond the available items
    hold item id -1 (or '' for string keys) and score -inf. ``check_range`` rejects numbers
    outside the training range. ``index``: "exact" (the reference; ties to the lower
    catalogue row) or "saved" (the approximate faiss index saved with the export; needs
    faiss).
    """
    if not _is_int(k) or int(k) < 1:
      raise PortableError(f"k (the number of recommendations) must be an integer >= 1; got "
                          f"{k!r}.")
    k = int(k)
    q_QxD = self.embed(columns, check_range=check_range)
    ex = None
    if exclude_ids is not None:
      if len(exclude_ids) != len(q_QxD):
        raise PortableError(f"exclude_ids has {len(exclude_ids)} lists for {len(q_QxD)} "
                            "queries; pass one list of item keys per query.")
      ex = self._rows_of(exclude_ids)
    if index == "exact":
      scores, rows = exact_search(q_QxD, self._c_NxD, k, ex)
    elif index == "saved":
      scores, rows = self._faiss_search(q_QxD, k, ex)
    else:
      raise PortableError(f"index={index!r}: use 'exact' or 'saved'.")
    ids = self.item_ids_N[np.maximum(rows, 0)]
    ids = np.where(rows >= 0, ids, "" if ids.dtype.kind == "U" else -1)
    return ids, scores

  def columns_of(self, item_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The display columns (title, ...) of item keys (any shape; '' / NaN for unknown)."""
    rows = self._rows(np.asarray(item_ids))
    out = {}
    for name, col in self.items.items():
      v = col[np.maximum(rows, 0)]
      out[name] = np.where(rows >= 0, v, "" if v.dtype.kind == "U" else np.nan)
    return out

  # -- helpers

  def _rows(self, keys: np.ndarray) -> np.ndarray:
    """Catalogue row of each item key (any shape), -1 where unknown."""
    sorted_ids, order = self._sorted_ids
    keys = np.asarray(keys)
    if sorted_ids.dtype.kind in "US":
      keys = keys.astype(str)
    elif keys.dtype.kind not in "iu":
      return np.full(keys.shape, -1, np.int64)
    if not len(sorted_ids):
      return np.full(keys.shape, -1, np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, keys), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == keys, order[pos], -1).astype(np.int64)

  def _rows_of(self, exclude_ids: Sequence[Any]) -> np.ndarray:
    """[Q, E] catalogue rows of each query's excluded item keys, -1 padded."""
    lists = [self._rows(np.asarray(e).reshape(-1)) if len(e) else np.zeros(0, np.int64)
             for e in exclude_ids]
    out = np.full((len(lists), max([len(r) for r in lists] + [0])), -1, np.int32)
    for q, r in enumerate(lists):
      out[q, :len(r)] = r
    return out

  def _faiss_search(self, q_QxD: np.ndarray, k: int, ex: np.ndarray | None):
    """The saved FAISS index's top-k rows: over-fetched by the exclusions, which are then
    dropped; a query left with fewer than min(k, available) results is answered exactly."""
    saved = self.manifest["index"]
    if not saved.get("file"):
      raise PortableError(f"index='saved': this export has no saved approximate index (its "
                          f"index is {saved['kind']!r}); use index='exact'.")
    try:
      import faiss  # pylint: disable=g-import-not-at-top  # an approximate index only
    except ImportError as e:
      raise PortableError(f"index='saved' reads a {saved['kind']} FAISS index: install faiss "
                          "(pip install faiss-cpu), or use index='exact'.") from e
    if self._faiss is None:
      self._faiss = faiss.read_index(str(self.path / saved["file"]))
    options, n = saved.get("options", {}), len(self)
    width = 0 if ex is None else ex.shape[1]
    fetch = max(1, min(n, k + width))
    if saved["kind"] == "faiss_ivf":
      params = faiss.SearchParametersIVF()
      params.nprobe = int(options.get("ivf_nprobe", 32))
    else:
      params = faiss.SearchParametersHNSW()
      params.efSearch = max(int(options.get("hnsw_ef_search", 128)), fetch)
    q = np.ascontiguousarray(q_QxD, np.float32)
    d_Qxf, i_Qxf = self._faiss.search(q, fetch, params=params)
    valid = i_Qxf >= 0
    if ex is not None and width:
      valid &= ~((i_Qxf[:, :, None] == ex[:, None, :]) & (ex[:, None, :] >= 0)).any(-1)
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # kept results first, in order
    rows = np.full((len(q), k), -1, np.int64)
    scores = np.full((len(q), k), -np.inf, np.float32)
    rows[:, :order.shape[1]] = np.take_along_axis(np.where(valid, i_Qxf, -1), order, 1)
    scores[:, :order.shape[1]] = np.take_along_axis(np.where(valid, d_Qxf, -np.inf), order, 1)
    available = np.full(len(q), n, np.int64)
    if ex is not None:  # minus the distinct excluded rows of each query
      ex_sorted = np.sort(ex, axis=1)
      distinct = ex_sorted >= 0
      distinct[:, 1:] &= ex_sorted[:, 1:] != ex_sorted[:, :-1]
      available -= distinct.sum(1)
    short = np.flatnonzero((rows >= 0).sum(1) < np.minimum(k, available))
    if short.size:  # too few found approximately: the exact search answers these queries
      scores[short], rows[short] = exact_search(q[short], self._c_NxD, k,
                                                None if ex is None else ex[short])
    return scores, rows

  def _validated(self, features: Mapping[str, Any], check_range: bool) -> dict[str, Any]:
    if not hasattr(features, "items"):
      raise PortableError(f"Query features must be a mapping of column name to values; got "
                          f"{type(features).__name__}.")
    histories = {n for n, s in self.specs.items() if s["kind"] == "history"}
    per_item = set(self.history_value_columns())
    cols = {str(k): _histories(str(k), v) if k in histories else
            _history_numbers(str(k), v) if k in per_item else _column(str(k), v)
            for k, v in features.items()}
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
      common = max(lengths.values(), key=list(lengths.values()).count)
      odd = next(k for k, n in lengths.items() if n != common)
      raise PortableError(f"Query column {odd!r} has {lengths[odd]} values but the others "
                          f"have {common}; every column needs one value per query. Lengths: "
                          f"{lengths}.")
    needed, optional = self.query_columns(), self.optional_columns()
    missing = [c for c in needed if c not in cols and c not in optional]
    if missing:
      raise PortableError(f"Query columns missing: {missing}. This model needs {needed}"
                          + (f" ({optional} may be left out)." if optional else "."))
    num_q = next(iter(lengths.values()), 0)
    if num_q == 0:
      raise PortableError(f"The query holds no values; give each of {needed} one value per "
                          "query.")
    out = {}
    for name, s in self.specs.items():
      key = _key(name, s)
      if key in out:
        continue
      col = cols.get(key)
      if col is None:
        col = np.full(num_q, None, object)
      out[key] = (self._history_queries(name, s, col, cols) if s["kind"] == "history"
                  else _checked(s, self.encoders[name], col, check_range))
    return out

  def _history_queries(self, name: str, s, items, cols: Mapping[str, Any]) -> np.ndarray:
    """A history's per-query item lists; with side columns or the time since, per query a
    dict of the items and their aligned values (``encode_history``)."""
    side, timed = side_columns(s), bool(s.get("time_since"))
    if not side and not timed:
      return items
    time_key = self.manifest["keys"].get("time") or ""
    if timed and f"{name}.time" in cols and time_key not in cols:
      raise PortableError(f"Query column {name + '.time'!r} gives each history item's time; "
                          f"the time since needs the query's time too: add {time_key!r}.")
    out = np.empty(len(items), object)
    for q, h in enumerate(items):
      given = {c: cols[f"{name}.{c}"][q] for c in side if f"{name}.{c}" in cols}
      times = cols[f"{name}.time"][q] if timed and f"{name}.time" in cols else None
      for what, values in [*given.items(), ("time", times)]:
        if values is not None and len(values) != len(h):
          raise PortableError(
              f"Query column {name}.{what} has {len(values)} values in query {q} but its "
              f"history {name!r} has {len(h)} items; give one value per item (None for "
              "unknown), most recent last.")
      out[q] = {"items": h, "side": given, "times": times,
                "query_time": _scalar(cols[time_key][q]) if timed and time_key in cols
                else None}
    return out


def _key(name: str, spec: Mapping[str, Any]) -> str:
  """A feature's query column: its column, or for a history its name."""
  return name if spec["kind"] == "history" else spec["column"]


# ----------------------------------------------------------------------------
# Loading.


def _load_encoders(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  enc = json.loads((path / "encoders.json").read_text())
  with np.load(path / "encoders.npz", allow_pickle=False) as arrays:
    for key in arrays.files:
      name, field = key.split("/", 1)
      enc[name][field] = arrays[key]
  return enc


def _npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def read_manifest(path: str | pathlib.Path) -> dict[str, Any]:
  """The export's manifest, once its format and version are known to be readable here."""
  path = pathlib.Path(path)
  file = path / "manifest.json"
  if not file.is_file():
    raise PortableError(f"{path} holds no model export (no manifest.json). Write one with "
                        "python -m twotower_jax.main --mode=export_model --workdir WORKDIR.")
  try:
    manifest = json.loads(file.read_text())
  except (ValueError, OSError) as e:
    raise PortableError(f"{file} is unreadable ({e}). {_REEXPORT}") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise PortableError(f"{file} does not describe a twotower_jax model export. {_REEXPORT}")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise PortableError(f"{path} is an export of format_version {version!r}; this loader "
                        f"reads {FORMAT_VERSION}. {_REEXPORT} (or load it with the "
                        "portable.py saved beside it).")
  return manifest


def load(path: str | pathlib.Path) -> Model:
  """Loads a directory written by ``--mode=export_model``."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise PortableError(f"Export directory not found: {path}. Write one with python -m "
                        "twotower_jax.main --mode=export_model --workdir WORKDIR.")
  manifest = read_manifest(path)
  files = manifest["files"]
  missing = [f for f in files.values() if not (path / f).is_file()]
  if missing:
    raise PortableError(f"Export {path} is incomplete: missing {missing}. {_REEXPORT}")
  unknown = sorted({s["kind"] for s in manifest["features"].values()} - set(KINDS))
  if unknown:
    raise PortableError(f"Export {path} has feature kinds {unknown} this loader cannot "
                        f"encode. {_REEXPORT}")
  reading = files["tower"]
  try:
    blob = (path / files["tower"]).read_bytes()
    try:
      exported = jax.export.deserialize(bytearray(blob))
    except Exception as e:  # noqa: BLE001 - any failure of a foreign blob means the same
      raise ValueError(e) from e
    reading = files["params"]
    params = _npz(path / files["params"])
    reading = files["encoders"]
    encoders = _load_encoders(path)
    reading = files["candidates"]
    cands = _npz(path / files["candidates"])
    reading = files["items"]
    items = _npz(path / files["items"])
  except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise PortableError(f"Export {path} is corrupt or from another jax version: {reading} is "
                        f"unreadable ({type(e).__name__}: {e}). {_REEXPORT}") from e
  return Model(path, manifest, exported, params, encoders,
               cands["embeddings"].astype(np.float32), cands["item_id"], items)
