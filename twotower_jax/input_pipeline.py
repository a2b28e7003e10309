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

from twotower_jax import arrays
from twotower_jax import features as feat
from twotower_jax import sharding
from twotower_jax.data import dataset as dataset_lib
from twotower_jax.data import sources


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A data set encoded for the model. Rows of ``*_q`` align with ``*_item``."""

  encoders: feat.Encoders
  cand: dict[str, np.ndarray]  # encoded features of all N catalogue items
  movie_ids_N: np.ndarray
  train_q: dict[str, np.ndarray]
  train_item: np.ndarray  # catalogue index of each training example's movie
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
    return len(self.movie_ids_N)

  def item_counts(self) -> np.ndarray:
    return np.bincount(self.train_item, minlength=self.num_items)


def item_index(movie_ids_N: np.ndarray, movie_id: np.ndarray, what: str) -> np.ndarray:
  """Catalogue positions of ``movie_id``; an id outside the catalogue is an error."""
  rows = arrays.find_rows(movie_ids_N, movie_id)
  bad = rows < 0
  if bad.any():
    raise dataset_lib.DataError(
        f"{what}: movie id {movie_id[bad][0]} is not in the movie catalogue "
        f"({int(bad.sum())} such rows). Use ratings and movies from the same data set.")
  return rows.astype(np.int32)


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """Loads and splits the data, fits the encoders on the training split, encodes."""
  dataset = sources.load_dataset(config.data)
  train, test = sources.train_test(config.data, dataset, config.seed)
  if config.features.time and config.data.split in ("seed", "random"):
    logging.warning(
        "Time features with a random split (%s) let the model see the future of the test "
        "interactions; use data.split=temporal for a leak-free estimate.", config.data.split)
  encoders = feat.fit_encoders(train, dataset.movies, config.features)
  movie_ids = np.asarray(dataset.movies["movie_id"])
  users = np.unique(np.concatenate([train["user_id"], test["user_id"]]))
  return Prepared(
      encoders=encoders,
      cand=feat.encode_candidates(encoders, dataset.movies, config.features),
      movie_ids_N=movie_ids,
      train_q=feat.encode_queries(encoders, train),
      train_item=item_index(movie_ids, train["movie_id"], "training ratings"),
      train_user=np.searchsorted(users, train["user_id"]).astype(np.int32),
      test_q=feat.encode_queries(encoders, test),
      test_item=item_index(movie_ids, test["movie_id"], "test ratings"),
      test_user=np.searchsorted(users, test["user_id"]).astype(np.int32),
      num_users=len(users),
      dataset=dataset, train=train, test=test)


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
    data["train_weight"] = recency_weights(prep.train["timestamp"], recency_half_life_days)
  return sharding.to_devices(data, sharding.replicated(mesh))
