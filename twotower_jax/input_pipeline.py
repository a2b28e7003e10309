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


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """Loads and splits the data, fits the encoders on the training split, encodes."""
  dataset = sources.load_dataset(config.data)
  train, test = sources.train_test(config.data, dataset, config.seed)
  specs = {t: spec_lib.check_specs(t, config.features[t]) for t in ("query", "candidate")}
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
  return Prepared(
      specs=specs,
      encoders=encoders,
      query_features=model_lib.feature_defs(
          specs["query"], feat.embedding_rows(specs["query"], encoders)),
      candidate_features=model_lib.feature_defs(
          specs["candidate"], feat.embedding_rows(specs["candidate"], encoders)),
      cand=feat.encode_tower(specs["candidate"], encoders, dataset.movies, "items table"),
      item_ids_N=np.asarray(item_ids) if isinstance(item_ids, np.ndarray) else item_ids,
      train_q=feat.encode_tower(specs["query"], encoders, train, "interactions"),
      train_item=train_item, train_user=train_user,
      test_q=feat.encode_tower(specs["query"], encoders, test, "interactions"),
      test_item=test_item, test_user=test_user,
      num_users=num_users, dataset=dataset, train=train, test=test)


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
  if recency_half_life_days:
    data["train_weight"] = recency_weights(prep.train[prep.dataset.time_key],
                                           recency_half_life_days)
  return sharding.to_devices(data, sharding.replicated(mesh))
