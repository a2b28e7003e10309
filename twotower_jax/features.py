"""Feature encoders: one per spec kind, fitted on the training split only, stored as plain data.

Each encoder is a dict of numpy arrays and Python scalars (no objects, no closures), so an
encoder set can be saved as JSON + npz and loaded by serving code that knows nothing about
training. Semantics follow Keras preprocessing:

* vocabulary lookup (``StringLookup``/``IntegerLookup``): index 0 is the out-of-vocabulary
  (OOV) index, known values get 1..V in order of decreasing training frequency (ties by
  value). An unseen value maps to 0, never an error. ``hash_buckets`` N instead hashes
  every value into rows 1..N (no vocabulary).
* discretization (``Discretization(bin_boundaries=...)``): bucket ``i`` holds values
  ``boundaries[i-1] <= x < boundaries[i]``.
* normalization (``Normalization``): ``(x - mean) / sqrt(var)``.

Columns may be numpy arrays or pyarrow arrays; strings are handled by pyarrow's C++
kernels (``value_counts``, ``index_in``, ``split_pattern``), so no Python loop runs over
rows. A feature encodes to one model input named after it (``[N]`` ints or floats, or
``[N, L]`` ints padded with -1 for multi-valued kinds); a timestamp adds ``<name>_value``,
a history with side columns ``<name>_side`` ([N, L, S] floats) and with ``time_since``
``<name>_time_since`` ([N, L] floats).
"""

from __future__ import annotations

import json
import pathlib
import zlib
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower_jax import history as history_lib
from twotower_jax.data.dataset import DataError

Encoders = dict[str, dict[str, Any]]
Columns = Mapping[str, Any]

OOV = 0
PAD = -1  # padding inside multi-valued features (tags, title words)
VALUE_SUFFIX = "_value"  # a timestamp's normalized value input
SIDE_SUFFIX = history_lib.SIDE_SUFFIX  # a history's per-position side columns [N, L, S]
TIME_SINCE_SUFFIX = history_lib.TIME_SINCE_SUFFIX  # a history's time since each item [N, L]
_EPS = 1e-7
# Words: runs of letters, digits and apostrophes of any script ("Amélie" is one word), as
# Keras's TextVectorization keeps accented letters when it strips punctuation. A trailing
# release year, "(1995)" or "(1975-1979)", is dropped first.
_WORD_SPLIT = r"[^\pL\pN']+"
_TRAILING_YEAR = "\\(\\d{4}(?:\\s*[-\u2013]\\s*\\d{0,4})?\\)\\s*$"


# ----------------------------------------------------------------------------
# Column helpers.


def _arrow(values) -> pa.Array:
  """``values`` as one pyarrow array (numpy numbers zero-copy where possible)."""
  if isinstance(values, pa.ChunkedArray):
    return values.combine_chunks()
  if isinstance(values, pa.Array):
    return values
  values = np.asarray(values).reshape(-1)  # a multi-valued [N, L] array: all its values
  if values.dtype.kind == "b":
    values = values.astype(np.int64)
  return pa.array(values)


def _numpy(values, dtype=np.float64) -> np.ndarray:
  if isinstance(values, (pa.Array, pa.ChunkedArray)):
    values = values.to_numpy(zero_copy_only=False)
  return np.asarray(values, dtype)


def _is_string(values) -> bool:
  if isinstance(values, (pa.Array, pa.ChunkedArray)):
    return pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
  return np.asarray(values).dtype.kind in "USO"


# ----------------------------------------------------------------------------
# Vocabularies.


def fit_vocab(values, *, weights=None, max_size: int = 0, min_count: int = 1,
              hash_buckets: int = 0) -> dict[str, Any]:
  """A lookup table of the training ``values`` (-1 and "" entries are padding), each value
  counted once per occurrence, or by its row's ``weights``."""
  if hash_buckets:
    return {"kind": "hash", "buckets": int(hash_buckets)}
  arr = _arrow(values)
  pad = "" if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) else PAD
  keep = pc.fill_null(pc.not_equal(arr, pad), False) if (
      pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
      or pa.types.is_integer(arr.type)) else pc.is_valid(arr)
  arr = pc.filter(arr, keep)
  if weights is None:
    vc = pc.value_counts(arr)
    uniq_arr, counts = vc.field("values"), vc.field("counts").to_numpy()
  else:
    w = np.asarray(weights, np.int64)[keep.to_numpy(zero_copy_only=False)]
    g = pa.table({"v": arr, "w": pa.array(w)}).group_by("v").aggregate([("w", "sum")])
    uniq_arr, counts = g.column("v").combine_chunks(), g.column("w_sum").to_numpy()
  uniq = uniq_arr.to_numpy(zero_copy_only=False)
  if uniq.dtype == object:
    uniq = uniq.astype(str)
  keep_v = counts >= min_count
  uniq, counts = uniq[keep_v], counts[keep_v]
  order = np.lexsort((uniq, -counts))  # frequency desc, then value asc
  vocab = uniq[order]
  if max_size:
    vocab = vocab[:max_size]
  return {"kind": "vocab", "vocab": vocab}


def _stats(x: np.ndarray, weights=None) -> dict[str, float]:
  """Mean, variance and range of ``x`` (each row counted ``weights`` times)."""
  if weights is None:
    return {"mean": float(x.mean()), "var": float(x.var()), "min": float(x.min()),
            "max": float(x.max())}
  w = np.asarray(weights, np.float64)
  mean = float(np.average(x, weights=w))
  return {"mean": mean, "var": float(np.average((x - mean) ** 2, weights=w)),
          "min": float(x[w > 0].min()), "max": float(x[w > 0].max())}


def _quantiles(x: np.ndarray, qs: np.ndarray, weights=None) -> np.ndarray:
  if weights is None:
    return np.quantile(x, qs)
  order = np.argsort(x, kind="stable")
  cum = np.cumsum(np.asarray(weights, np.float64)[order])
  return x[order][np.minimum(np.searchsorted(cum, qs * cum[-1]), len(x) - 1)]


def vocab_rows(enc: dict[str, Any]) -> int:
  """Embedding rows of a vocabulary encoder: the values plus the OOV row 0."""
  if enc["kind"] == "hash":
    return enc["buckets"] + 1
  return len(enc["vocab"]) + 1


def _hash_rows(values, buckets: int) -> np.ndarray:
  """Rows 1..buckets of each value by a fixed hash (the same on every machine and run)."""
  arr = _arrow(values)
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    enc = pc.dictionary_encode(arr).combine_chunks() if isinstance(arr, pa.ChunkedArray) \
        else pc.dictionary_encode(arr)
    dictionary = enc.dictionary.to_pylist()  # one hash per distinct value, not per row
    h = np.array([zlib.crc32(s.encode("utf-8")) for s in dictionary], np.uint64)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    return (h[codes] % np.uint64(buckets) + np.uint64(1)).astype(np.int32)
  x = _numpy(arr, np.int64).astype(np.uint64)
  x = (x ^ (x >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)  # murmur3 finalizer
  x = (x ^ (x >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
  x ^= x >> np.uint64(33)
  return (x % np.uint64(buckets) + np.uint64(1)).astype(np.int32)


def lookup(enc: dict[str, Any], values) -> np.ndarray:
  """Indices in ``1..V`` of ``values``; unknown values give ``OOV`` (0), padding -1."""
  if enc["kind"] == "hash":
    return _hash_rows(values, enc["buckets"])
  vocab = enc["vocab"]
  if isinstance(values, (pa.Array, pa.ChunkedArray)):
    arr = _arrow(values)
    pad = pc.fill_null(pc.equal(arr, "" if _is_string(arr) else PAD), False)
    pad = pad.to_numpy(zero_copy_only=False)
  else:
    values = np.asarray(values)
    if values.dtype.kind == "b":
      values = values.astype(np.int64)
    if vocab.dtype.kind in "US" and values.dtype.kind not in "USO":
      values = values.astype(str)
    pad = (values == "") if values.dtype.kind in "USO" else (values == PAD)
    arr = pa.array(values.reshape(-1))
    pad = np.asarray(pad).reshape(-1)
    shape = values.shape
  value_set = pa.array(vocab) if len(vocab) else pa.array([], type=arr.type)
  if not value_set.type.equals(arr.type):
    try:
      value_set = value_set.cast(arr.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      arr = arr.cast(value_set.type)
  idx = pc.index_in(arr, value_set=value_set)
  out = pc.fill_null(pc.add(idx, 1), OOV).to_numpy(zero_copy_only=False).astype(np.int32)
  out = np.where(pad, PAD, out).astype(np.int32)
  if not isinstance(values, (pa.Array, pa.ChunkedArray)):
    out = out.reshape(shape)
  return out


# ----------------------------------------------------------------------------
# Numbers.


def normalize(enc: dict[str, Any], x) -> np.ndarray:
  std = max(np.sqrt(enc["var"]), _EPS)
  return ((_numpy(x) - enc["mean"]) / std).astype(np.float32)


def even_buckets(boundaries: np.ndarray, x: np.ndarray) -> np.ndarray:
  """``searchsorted(boundaries, x, side="right")`` for evenly spaced boundaries, by
  arithmetic plus one exact correction step each way (no binary search over 10M rows)."""
  n = len(boundaries)
  if n < 2 or not boundaries[-1] > boundaries[0]:
    return np.searchsorted(boundaries, x, side="right").astype(np.int32)
  step = (boundaries[-1] - boundaries[0]) / (n - 1)
  idx = np.clip(np.floor((x - boundaries[0]) / step).astype(np.int64) + 1, 0, n)
  idx -= (idx > 0) & (x < boundaries[np.maximum(idx - 1, 0)])  # rounding: one step back
  idx += (idx < n) & (x >= boundaries[np.minimum(idx, n - 1)])  # or one step on
  return idx.astype(np.int32)


def split_values(values, sep: str):
  """``values`` as a pyarrow list array: ``sep``-separated strings split, a [N, L] array
  padded with -1 or "" taken row by row."""
  if isinstance(values, (pa.ListArray, pa.LargeListArray)):
    return values
  if not isinstance(values, (pa.Array, pa.ChunkedArray)) and np.asarray(values).ndim == 2:
    m = np.asarray(values)
    valid = (m != "") if m.dtype.kind in "US" else (m != PAD)
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(m[valid]))
  arr = _arrow(values)
  return pc.split_pattern(pc.fill_null(arr, ""), pattern=sep)


def tokenize(values):
  """Lower-cased words of each string (trailing year dropped) as a pyarrow list array."""
  arr = pc.utf8_lower(pc.fill_null(_arrow(values).cast(pa.string()), ""))
  arr = pc.replace_substring_regex(arr, pattern=_TRAILING_YEAR, replacement="")
  return pc.split_pattern_regex(arr, pattern=_WORD_SPLIT)


def _padded(lists, enc: dict[str, Any], width: int) -> np.ndarray:
  """[N, width] vocabulary indices of each list's first ``width`` values, -1 padded."""
  if isinstance(lists, pa.ChunkedArray):
    lists = lists.combine_chunks()
  flat = pc.list_flatten(lists)
  keep = np.ones(len(flat), bool)
  if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
  rows = pc.list_parent_indices(lists).to_numpy()[keep]
  idx = lookup(enc, pc.filter(flat, pa.array(keep)))
  starts = np.searchsorted(rows, np.arange(len(lists)))  # first kept value of each row
  pos = np.arange(len(rows)) - starts[rows]
  out = np.full((len(lists), width), PAD, np.int32)
  ok = pos < width
  out[rows[ok], pos[ok]] = idx[ok]
  return out


# ----------------------------------------------------------------------------
# One encoder per spec.


def fit(spec, values, weights=None) -> dict[str, Any]:
  """The encoder of one feature, fitted on its training ``values`` (each row counted
  ``weights`` times: the catalogue's items by their training interactions)."""
  kind = spec.kind
  vocab = dict(max_size=spec.get("max_size", 0), min_count=spec.get("min_count", 1),
               hash_buckets=spec.get("hash_buckets", 0))
  if kind in ("id", "categorical"):
    return fit_vocab(values, weights=weights, **vocab)
  if kind == "history":  # the items, as the interactions name them
    return {**fit_vocab(values, weights=weights, min_count=spec.min_count),
            "width": int(spec.max_len)}
  if kind == "numeric":
    x = _numpy(values)
    if spec.log:
      x = np.log1p(x)
    enc = {"kind": "numeric", "log": bool(spec.log), **_stats(x, weights)}
    if spec.boundaries:
      enc["boundaries"] = np.asarray(spec.boundaries, np.float64)
    elif spec.buckets:
      qs = _quantiles(x, np.linspace(0, 1, spec.buckets + 1)[1:-1], weights)
      enc["boundaries"] = np.unique(qs)
    return enc
  if kind == "timestamp":
    stats = _stats(_numpy(values), weights)
    return {"kind": "timestamp", "buckets": np.linspace(stats["min"], stats["max"],
                                                         num=spec.buckets), **stats}
  if kind in ("multi_hot", "text"):
    lists = tokenize(values) if kind == "text" else split_values(values, spec.sep)
    if isinstance(lists, pa.ChunkedArray):
      lists = lists.combine_chunks()
    flat_w = None
    if weights is not None:
      flat_w = np.asarray(weights)[pc.list_parent_indices(lists).to_numpy()]
    enc = fit_vocab(pc.list_flatten(lists), weights=flat_w, **vocab)
    if kind == "text":
      width = spec.max_words
    else:
      lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
      if weights is not None:
        lengths = lengths[np.asarray(weights) > 0]
      width = int(lengths.max()) if len(lengths) else 1
      width = max(1, min(width, spec.max_values) if spec.max_values else width)
    enc["width"] = width
    return enc
  raise ValueError(f"Unknown feature kind {kind!r}.")


def encode(name: str, spec, enc: dict[str, Any], values) -> dict[str, np.ndarray]:
  """The model inputs of one feature: ``{name: ...}`` (plus ``name_value`` for a timestamp)."""
  kind = spec.kind
  if kind in ("id", "categorical"):
    idx = lookup(enc, values)
    return {name: np.where(idx == PAD, OOV, idx).astype(np.int32)}  # missing: OOV
  if kind == "numeric":
    x = _numpy(values)
    if enc["log"]:
      x = np.log1p(x)
    if "boundaries" in enc:
      return {name: np.searchsorted(enc["boundaries"], x, side="right").astype(np.int32)}
    return {name: normalize(enc, x) if spec.normalize else x.astype(np.float32)}
  if kind == "timestamp":
    x = _numpy(values)
    # Times outside the training range go to the first/last populated bucket (Keras would
    # use buckets 0 and num_buckets, which no training example fills: untrained rows).
    bucket = np.clip(even_buckets(enc["buckets"], x), 1, len(enc["buckets"]) - 1)
    # The value may run past training (later queries) but not without bound: at most one
    # training span beyond either end.
    if value_range(enc) is not None:
      lo, hi = value_range(enc)
      x = np.clip(x, lo - (hi - lo), hi + (hi - lo))
    value = normalize(enc, x)
    return {name: bucket, name + VALUE_SUFFIX: value}
  if kind in ("multi_hot", "text"):
    lists = tokenize(values) if kind == "text" else split_values(values, spec.sep)
    return {name: _padded(lists, enc, enc["width"])}
  if kind == "history":
    return encode_history(name, spec, enc, values)
  raise ValueError(f"Unknown feature kind {kind!r}.")


def side_columns(spec) -> tuple[str, ...]:
  """A history spec's side columns (none for a spec written before they existed)."""
  return tuple(spec.get("side", ()) or ())


def fit_side(values: list) -> dict[str, np.ndarray]:
  """Normalization of a history's side columns, from the training interactions' values."""
  mean, std = [], []
  for v in values:
    x = _numpy(v)
    x = x[np.isfinite(x)]
    mean.append(float(x.mean()) if x.size else 0.0)
    std.append(float(max(x.std(), _EPS)) if x.size else 1.0)
  return {"side_mean": np.asarray(mean, np.float64), "side_std": np.asarray(std, np.float64)}


def side_values(enc: dict[str, Any], values: list) -> np.ndarray:
  """[N, S] float32: each side column normalized with the training statistics; a missing
  value (NaN, None) reads 0, the training mean."""
  x = np.stack([_numpy(v) for v in values], -1) if values else np.zeros((0, 0))
  z = (x - enc["side_mean"]) / enc["side_std"]
  return np.where(np.isfinite(z), z, 0.0).astype(np.float32)


def encode_history(name: str, spec, enc: dict[str, Any], histories) -> dict[str, np.ndarray]:
  """The model inputs of given histories (serving): ``encode_histories``'s item rows, plus
  with side columns ``<name>_side`` and with ``time_since`` ``<name>_time_since``. A query
  is its item keys (a list), or a dict {"items": keys, "side": {column: values}, "times":
  each item's time, "query_time": t}, every list aligned with the items (most recent last);
  a missing side value or time reads the training mean."""
  items = [h.get("items") if isinstance(h, dict) else h for h in histories]
  out = {name: encode_histories(enc, items)}
  side, timed = side_columns(spec), bool(spec.get("time_since", False))
  if not side and not timed:
    return out
  width, num_q = enc["width"], len(histories)
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
        side_QxLxS[q, width - n:, j] = _numpy([np.nan if x is None else x for x in v])[-n:]
    times, t = h.get("times"), h.get("query_time")
    if times is not None and t is not None and n:
      times_n = np.asarray([np.nan if x is None else x for x in times], np.float64)[-n:]
      known_QxL[q, width - n:] = np.isfinite(times_n)  # a missing time reads the mean
      item_time_QxL[q, width - n:] = np.where(np.isfinite(times_n), times_n, 0.0)
      query_time_Q[q] = float(t)
  if side:
    z = side_values(enc, [side_QxLxS[..., j].reshape(-1) for j in range(len(side))])
    out[name + SIDE_SUFFIX] = np.where(valid_QxL[..., None], z.reshape(side_QxLxS.shape), 0.0
                                       ).astype(np.float32)
  if timed:
    out[name + TIME_SINCE_SUFFIX] = history_lib.time_since(
        np.round(query_time_Q).astype(np.int64), np.round(item_time_QxL).astype(np.int64),
        valid_QxL & known_QxL, enc["time_mean"], enc["time_std"])
  return out


def encode_histories(enc: dict[str, Any], histories) -> np.ndarray:
  """[Q, L] embedding rows of each query's history (item keys, most recent last; a list, a
  '|'-joined string, or a -1-padded row): its last L items, -1 on the left."""
  width = enc["width"]
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
      raise ValueError("history items must be item keys (integers or strings), not "
                       f"numbers like {h[:1].tolist()}.")
    if len(h):
      h = h[-width:]
      if "vocab" in enc and enc["vocab"].dtype.kind in "iu" and h.dtype.kind not in "iu":
        h = h.astype(np.int64)
      out[q, width - len(h):] = lookup(enc, h)
  return out


def rows(spec, enc: dict[str, Any]) -> int:
  """Embedding rows the feature needs (0: none, the value enters the tower as is)."""
  if spec.kind in ("id", "categorical", "multi_hot", "text", "history"):
    return vocab_rows(enc)
  if spec.kind == "timestamp":
    return len(enc["buckets"]) + 1
  if spec.kind == "numeric" and "boundaries" in enc:
    return len(enc["boundaries"]) + 1
  return 0


# ----------------------------------------------------------------------------
# The encoders of both towers.


def column(cols: Columns, name: str, where: str):
  """``cols[name]``; a missing column is an error listing the columns there are."""
  if name not in cols:
    raise KeyError(f"no column {name!r} in the {where} (columns: {', '.join(sorted(cols))}).")
  return cols[name]


def take(values, rows: np.ndarray):
  """``values[rows]`` for numpy and pyarrow columns."""
  if isinstance(values, (pa.Array, pa.ChunkedArray)):
    return values.take(pa.array(rows))
  return np.asarray(values)[rows]


# A categorical feature with more distinct training values than this is likely an id.
MAX_CATEGORIES = 100_000


def _distinct(values) -> int:
  arr = _arrow(values) if not (isinstance(values, np.ndarray) and values.ndim == 2) \
      else pa.array(values.reshape(-1))
  return len(pc.unique(arr))


def check_columns(specs: Mapping[str, Mapping[str, Any]], interactions: Columns,
                  items: Columns) -> None:
  """Every problem of the specs against the data, in one ``DataError``: a missing column, a
  numeric or timestamp column that holds text, a categorical with very many values."""
  problems = []
  for tower, cols, where in (("query", interactions, "interactions (users joined in)"),
                             ("candidate", items, "items table")):
    for name, s in specs[tower].items():
      label = f"features.{tower}.{name} ({s.kind} of column {s.column!r})"
      if s.column not in cols:
        problems.append(f"{label}: no such column in the {where}; columns there: "
                        f"{', '.join(sorted(cols))}.")
        continue
      values = cols[s.column]
      if s.kind in ("numeric", "timestamp") and _is_string(values):
        problems.append(f"{label}: the column holds text, not numbers. Fix: declare it "
                        "categorical, or clean the column.")
      for c in side_columns(s) if s.kind == "history" else ():
        if c not in cols:
          problems.append(f"{label}: side column {c!r} is not in the {where}; columns "
                          f"there: {', '.join(sorted(cols))}.")
        elif _is_string(cols[c]):
          problems.append(f"{label}: side column {c!r} holds text; side columns must be "
                          "numbers (e.g. a rating).")
      if s.kind == "categorical" and not s.hash_buckets and _distinct(values) > MAX_CATEGORIES:
        problems.append(f"{label}: {_distinct(values):,} distinct values. Fix: declare it "
                        "spec.id(...) (a large table), with hash_buckets=N for very large "
                        "id spaces.")
  if problems:
    raise DataError("The feature spec does not fit the data:\n  " + "\n  ".join(problems))


def fit_encoders(query_specs: Mapping[str, Any], candidate_specs: Mapping[str, Any],
                 train: Columns, items: Columns, train_item_rows: np.ndarray) -> Encoders:
  """Every feature's encoder, fitted on the training split only.

  Query features are fitted on the training interactions; candidate features on the items
  of the training interactions (each as often as it occurs), so an item seen only at test
  time contributes nothing, as a Keras layer adapted on the training data would. A history
  sharing a candidate feature's table (``share``) takes that feature's vocabulary, so both
  towers look an item up at the same row; its side columns are normalized with training
  statistics (the time-since statistics need the sequences: ``input_pipeline``).
  """
  enc: Encoders = {}
  for name, s in query_specs.items():
    enc[name] = fit(s, column(train, s.column, "interactions"))
    if s.kind == "history" and side_columns(s):
      enc[name].update(fit_side([column(train, c, "interactions") for c in side_columns(s)]))
  counts = np.bincount(train_item_rows, minlength=len(next(iter(items.values()))))
  rows = np.flatnonzero(counts)  # each training item once, weighted by its interactions
  for name, s in candidate_specs.items():
    enc[name] = fit(s, take(column(items, s.column, "items table"), rows), counts[rows])
  for name, s in query_specs.items():
    if s.kind == "history" and s.get("share"):
      own = {k: v for k, v in enc[name].items() if k not in ("kind", "vocab", "buckets")}
      shared = {k: v for k, v in enc[s.share].items() if k in ("kind", "vocab", "buckets")}
      enc[name] = {**shared, **own}
  return enc


def encode_tower(specs: Mapping[str, Any], enc: Encoders, cols: Columns, where: str
                 ) -> dict[str, np.ndarray]:
  """Raw columns -> the model inputs of one tower, one row per query or item. History
  features are left out: each interaction's history comes from the others
  (``input_pipeline``), not from its own columns."""
  out: dict[str, np.ndarray] = {}
  for name, s in specs.items():
    if s.kind == "history":
      continue
    out.update(encode(name, s, enc[name], column(cols, s.column, where)))
  return out


def embedding_rows(specs: Mapping[str, Any], enc: Encoders) -> dict[str, int]:
  """Embedding rows of every feature of a tower (0: its value enters the tower as is)."""
  return {name: rows(s, enc[name]) for name, s in specs.items()}


def value_range(enc: dict[str, Any]) -> tuple[float, float] | None:
  """The (min, max) a numeric feature saw in training; None when not stored."""
  if enc.get("min") is None or enc.get("max") is None:
    return None
  return float(enc["min"]), float(enc["max"])


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
