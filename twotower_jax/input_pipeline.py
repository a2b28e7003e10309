"""The input pipeline: load, split, fit encoders, encode (``Prepared``); epoch batches.

All training examples live on the device as encoded arrays (``device_data``); an epoch is
a seeded permutation of their indices, cut into fixed-size batches (the last one padded
and masked, so one compiled step serves every batch).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections
import numpy as np
import pyarrow as pa

from twotower_jax import arrays
from twotower_jax import features as feat
from twotower_jax import history
from twotower_jax import model as model_lib
from twotower_jax import sharding
from twotower_jax import spec as spec_lib
from twotower_jax.data import dataset as dataset_lib
from twotower_jax.data import sources


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A data set encoded for the model. Rows of ``*_q`` align with ``*_item``."""

  specs: dict[str, dict[str, Any]]  # "query"/"candidate" -> feature name -> resolved spec
  encoders: feat.Encoders
  query_features: tuple[model_lib.FeatureDef, ...]
  candidate_features: tuple[model_lib.FeatureDef, ...]
  cand: dict[str, np.ndarray]  # encoded features of all N catalogue items
  item_ids_N: np.ndarray  # the item key of each catalogue row
  train_q: dict[str, np.ndarray]
  train_item: np.ndarray  # catalogue index of each training example's item
  train_user: np.ndarray  # user index (0..U-1) of each training example
  test_q: dict[str, np.ndarray]
  test_item: np.ndarray
  test_user: np.ndarray
  num_users: int
  dataset: dataset_lib.Dataset
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  # History features: the training interactions' sequences, by feature name. A training
  # example's window is gathered per batch from its user's sequence (train_q holds
  # "<name>/start" and "<name>/end"); test windows are in test_q[<name>].
  histories: dict[str, history.Sequences] = dataclasses.field(default_factory=dict)
  # The validation interactions (data.validation_fraction, carved out of training before the
  # encoders were fitted), encoded like the test ones; None without a validation split.
  validation: dict[str, np.ndarray] | None = None
  valid_q: dict[str, np.ndarray] | None = None
  valid_item: np.ndarray | None = None
  valid_user: np.ndarray | None = None

  @property
  def num_items(self) -> int:
    return len(self.item_ids_N)

  def item_counts(self) -> np.ndarray:
    return np.bincount(self.train_item, minlength=self.num_items)


def item_index(item_ids_N, item_id, what: str) -> np.ndarray:
  """Catalogue positions of ``item_id``; an id outside the catalogue is an error."""
  rows = arrays.find_rows(item_ids_N, item_id)
  bad = rows < 0
  if bad.any():
    first = item_id[int(np.flatnonzero(bad)[0])]
    first = first.as_py() if hasattr(first, "as_py") else first
    raise dataset_lib.DataError(
        f"{what}: item {first!r} is not in the catalogue ({int(bad.sum())} such rows). Use "
        "interactions and items from the same data set.")
  return rows.astype(np.int32)


def user_index(train_users, test_users) -> tuple[np.ndarray, np.ndarray, int]:
  """User index (0..U-1) of each training and test interaction, and U."""
  if isinstance(train_users, np.ndarray) and isinstance(test_users, np.ndarray):
    both = np.concatenate([train_users, test_users])
    if both.dtype.kind in "iu" and both.size and 0 <= both.min() and (
        both.max() < 4 * both.size + 1024):
      # Small non-negative ids: the rank of each id among the distinct ones by counting,
      # equal to searchsorted(unique(ids)) without the sort.
      present = np.bincount(both) > 0
      rank = np.cumsum(present) - 1
      return (rank[train_users].astype(np.int32), rank[test_users].astype(np.int32),
              int(present.sum()))
    users = np.unique(both)
    return (np.searchsorted(users, train_users).astype(np.int32),
            np.searchsorted(users, test_users).astype(np.int32), len(users))
  codes = dataset_lib.key_codes(pa.chunked_array([pa.array(train_users), pa.array(test_users)]))
  n = len(train_users)
  return (codes[:n].astype(np.int32), codes[n:].astype(np.int32),
          int(codes.max()) + 1 if len(codes) else 0)


def concat_keys(a, b):
  """Two key columns as one (numpy arrays stay numpy; otherwise a pyarrow chunked array)."""
  if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
    return np.concatenate([a, b])

  def chunks(x):
    if isinstance(x, pa.ChunkedArray):
      return x.chunks
    return [x if isinstance(x, pa.Array) else pa.array(x)]

  return pa.chunked_array([*chunks(a), *chunks(b)])


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """Loads and splits the data, fits the encoders on the training split, encodes."""
  dataset = sources.load_dataset(config.data)
  train, validation, test = sources.train_validation_test(config.data, dataset, config.seed)
  specs = {t: spec_lib.check_specs(t, config.features[t]) for t in ("query", "candidate")}
  shared = spec_lib.shared_table_problems(specs["query"], specs["candidate"])
  if shared:
    raise spec_lib.SpecError("Invalid feature spec:\n  " + "\n  ".join(shared))
  feat.check_columns(specs, train, dataset.movies)
  if (any(s.kind == "timestamp" for s in specs["query"].values())
      and config.data.split in ("seed", "random")):
    logging.warning(
        "Time features with a random split (%s) let the model see the future of the test "
        "interactions; use data.split=temporal for a leak-free estimate.", config.data.split)
  item_ids = dataset.movies[dataset.item_key]
  train_item = item_index(item_ids, train[dataset.item_key], "training interactions")
  test_item = item_index(item_ids, test[dataset.item_key], "test interactions")
  encoders = feat.fit_encoders(specs["query"], specs["candidate"], train, dataset.movies,
                               train_item)
  train_user, test_user, num_users = user_index(train[dataset.user_key],
                                                test[dataset.user_key])
  valid_q = valid_item = valid_user = None
  if validation is not None:  # one user index over the three splits
    train_user, rest_user, num_users = user_index(
        train[dataset.user_key], concat_keys(test[dataset.user_key],
                                             validation[dataset.user_key]))
    test_user, valid_user = rest_user[:len(test_item)], rest_user[len(test_item):]
    valid_item = item_index(item_ids, validation[dataset.item_key], "validation interactions")
    valid_q = feat.encode_tower(specs["query"], encoders, validation, "interactions")
  train_q = feat.encode_tower(specs["query"], encoders, train, "interactions")
  test_q = feat.encode_tower(specs["query"], encoders, test, "interactions")
  histories = add_histories(specs["query"], encoders, dataset, item_ids, train, test,
                            (train_user, train_item, train_q), (test_user, test_item, test_q),
                            num_users)
  if validation is not None:  # validation windows: training and validation before them
    add_histories(specs["query"], encoders, dataset, item_ids, train, validation,
                  (train_user, train_item, train_q), (valid_user, valid_item, valid_q),
                  num_users)
  return Prepared(
      specs=specs,
      encoders=encoders,
      query_features=model_lib.feature_defs(
          specs["query"], feat.embedding_rows(specs["query"], encoders)),
      candidate_features=model_lib.feature_defs(
          specs["candidate"], feat.embedding_rows(specs["candidate"], encoders)),
      cand=feat.encode_tower(specs["candidate"], encoders, dataset.movies, "items table"),
      item_ids_N=np.asarray(item_ids) if isinstance(item_ids, np.ndarray) else item_ids,
      train_q=train_q, train_item=train_item, train_user=train_user,
      test_q=test_q, test_item=test_item, test_user=test_user,
      num_users=num_users, dataset=dataset, train=train, test=test, histories=histories,
      validation=validation, valid_q=valid_q, valid_item=valid_item, valid_user=valid_user)


def add_histories(query_specs, encoders, dataset, item_ids, train, test, train_parts,
                  test_parts, num_users: int) -> dict[str, history.Sequences]:
  """Fills in every history feature: training examples get their user's position in the
  training sequences ("<name>/start", "<name>/end", and with ``time_since`` their time as
  "<name>/time", seconds after the sequences' ``time_base``; windows are gathered per
  batch), test interactions their window over training and test interactions strictly
  before them (what a live system knows), with its side columns and time since. The
  time-since normalization is fitted here, on training windows, into the encoder. Returns
  the training sequences by feature name (side columns normalized, in ``side``)."""
  out = {}
  for name, s in query_specs.items():
    if s.kind != "history":
      continue
    if not dataset.time_key:
      raise dataset_lib.DataError(f"features.query.{name} (history) needs the time of each "
                                  "interaction: set data.time_key.")
    enc, width = encoders[name], encoders[name]["width"]
    rows_N = feat.lookup(enc, item_ids)  # each catalogue item's embedding row
    (tr_user, tr_item, tr_q), (te_user, te_item, te_q) = train_parts, test_parts
    tr_time, te_time = train[dataset.time_key], test[dataset.time_key]
    side = feat.side_columns(s)
    tr_side = te_side = None
    if side:
      tr_side = feat.side_values(enc, [feat.column(train, c, "interactions") for c in side])
      te_side = feat.side_values(enc, [feat.column(test, c, "interactions") for c in side])
    seqs = history.sequences(tr_user, rows_N[tr_item], tr_time, num_users, tr_side)
    tr_q[f"{name}/start"] = seqs.indptr_U1[tr_user].astype(np.int32)
    tr_q[f"{name}/end"] = history.ends(seqs, tr_user, tr_time).astype(np.int32)
    if s.time_since:
      if "time_mean" not in enc:
        enc["time_mean"], enc["time_std"] = history.time_since_stats(
            seqs, tr_user, tr_time, tr_q[f"{name}/end"], width)
      tr_q[f"{name}/time"] = _seconds_after(tr_time, seqs.time_base)
    both = history.sequences(np.concatenate([tr_user, te_user]),
                             rows_N[np.concatenate([tr_item, te_item])],
                             np.concatenate([tr_time, te_time]), num_users,
                             None if tr_side is None else np.concatenate([tr_side, te_side]))
    te_q.update(window_inputs(name, s, enc, both, te_user,
                              history.ends(both, te_user, te_time), te_time))
    out[name] = seqs
  return out


def _seconds_after(time_N, base: int) -> np.ndarray:
  t = np.round(np.asarray(time_N, np.float64)).astype(np.int64) - base
  if len(t) and (t.min() < -2**31 or t.max() >= 2**31):
    raise dataset_lib.DataError("A history's time_since needs the interaction times within "
                                "68 years of each other (in seconds); check data.time_key.")
  return t.astype(np.int32)


def window_inputs(name: str, s, enc, seqs: history.Sequences, user_B, end_B, time_B
                  ) -> dict[str, np.ndarray]:
  """The model inputs of the windows ending at ``end_B`` (host side): the item rows, and
  the per-position side columns and time since when the spec has them."""
  pos_BxL = history.positions(seqs, user_B, end_B, enc["width"])
  out = {name: history.take(seqs.items, pos_BxL, history.PAD).astype(np.int32)}
  if seqs.side is not None:
    out[name + feat.SIDE_SUFFIX] = history.take(seqs.side, pos_BxL, 0.0)
  if s.get("time_since"):
    out[name + feat.TIME_SINCE_SUFFIX] = history.time_since(
        np.round(np.asarray(time_B, np.float64)).astype(np.int64),
        history.take(seqs.times, pos_BxL, 0), pos_BxL >= 0, enc["time_mean"], enc["time_std"])
  return out


def query_inputs(prep: Prepared, idx: np.ndarray) -> dict[str, np.ndarray]:
  """The model's query inputs of training examples ``idx``, windows included (host side)."""
  xq = {k: v[idx] for k, v in prep.train_q.items() if "/" not in k}
  for name, seqs in prep.histories.items():
    time_B = None
    if f"{name}/time" in prep.train_q:
      time_B = prep.train_q[f"{name}/time"][idx].astype(np.int64) + seqs.time_base
    xq.update(window_inputs(name, prep.specs["query"][name], prep.encoders[name], seqs,
                            prep.train_user[idx], prep.train_q[f"{name}/end"][idx], time_B))
  return xq


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The epoch's seeded permutation as [steps, B] indices and validity (last batch padded)."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = -(-num_examples // batch_size)
  pad = steps * batch_size - num_examples
  idx = np.concatenate([perm, perm[:pad]]).reshape(steps, batch_size).astype(np.int32)
  valid = (np.arange(steps * batch_size) < num_examples).reshape(steps, batch_size)
  return idx, valid


def recency_weights(timestamps: np.ndarray, half_life_days: float) -> np.ndarray:
  """Example weights 0.5 ** (age / half-life), age measured from the newest example."""
  if half_life_days <= 0:
    raise ValueError(f"train.recency_half_life_days={half_life_days}: use a positive number "
                     "of days, or 0 to weight every example equally.")
  t = np.asarray(timestamps, np.float64)
  if not len(t) or not np.isfinite(t).all():
    raise dataset_lib.DataError("train.recency_half_life_days needs a finite timestamp on "
                                "every training example; set it to 0 for this data set.")
  return np.exp2(-(t.max() - t) / (half_life_days * 86400.0)).astype(np.float32)


def device_data(prep: Prepared, mesh, recency_half_life_days: float = 0.0) -> dict[str, Any]:
  """Training arrays on the device(s), replicated."""
  counts = prep.item_counts().astype(np.float64)
  data = {
      "train_q": prep.train_q,
      "train_item": prep.train_item,
      "cand": prep.cand,
      "p_item": (counts / max(counts.sum(), 1.0)).astype(np.float32),
  }
  if prep.histories:
    data["histories"] = {}
    for name, seqs in prep.histories.items():
      enc = prep.encoders[name]
      h = {"items": seqs.items, "pos_L": np.arange(enc["width"], dtype=np.int32)}
      if seqs.side is not None:
        h["side"] = seqs.side
      if f"{name}/time" in prep.train_q:
        h["times"] = _seconds_after(seqs.times, seqs.time_base)
        h["time_stats"] = np.asarray([enc["time_mean"], enc["time_std"]], np.float32)
      data["histories"][name] = h
  if recency_half_life_days:
    data["train_weight"] = recency_weights(prep.train[prep.dataset.time_key],
                                           recency_half_life_days)
  return sharding.to_devices(data, sharding.replicated(mesh))
