"""Every data source, in one table, and the config-driven entry points.

``load_dataset(config.data)`` loads ``data.source``; ``train_test(config.data,
dataset, seed)`` splits it per ``data.split``, and ``train_validation_test`` also holds
``data.validation_fraction`` of the training part out for validation. A data config
lacking a key reads the default of :func:`twotower_jax.config.base_config` (``.data``).
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax.data import (download, movielens, movielens_large, splits, synthetic, tables,
                               tfds_source)
from twotower_jax.data.dataset import (
    Columns,
    DataError,
    Dataset,
    drop_ratings_repeating,
    take_rows,
)

_DEFAULTS = config_lib.base_config().data


def _cfg(data_cfg, key: str):
  """``data_cfg[key]``; the ``base_config().data`` default when missing or None."""
  default = _DEFAULTS[key]
  value = data_cfg.get(key, default) if hasattr(data_cfg, "get") else getattr(data_cfg, key, default)
  return default if value is None else value


def _cfg_dir(data_cfg, source: str, needed: str) -> pathlib.Path:
  """``data_cfg.dir``, or its ``<source>/`` subfolder when that holds ``needed``."""
  configured = str(_cfg(data_cfg, "dir"))
  if not configured:
    raise DataError(
        f"--config.data.source={source} needs --config.data.dir: the folder holding {needed}. "
        f"Fix: download and unzip {movielens_large.URLS[source]} and pass --config.data.dir=PATH.")
  path = pathlib.Path(configured).expanduser()
  if not (path / needed).is_file() and (path / source / needed).is_file():
    return path / source
  return path


# ----------------------------------------------------------------------------
# One loader per source: data config -> Dataset.


def _load_grouplens(data_cfg) -> Dataset:
  return movielens.load_movielens_100k(download.resolve_data_dir(
      _cfg(data_cfg, "dir") or None, download=bool(_cfg(data_cfg, "download"))))


def _load_tfds(data_cfg) -> Dataset:
  return tfds_source.load_tfds(_cfg(data_cfg, "tfds_data_dir") or None,
                               download=bool(_cfg(data_cfg, "download")))


def _load_ml1m(data_cfg) -> Dataset:
  return movielens_large.load_movielens_1m(_cfg_dir(data_cfg, "ml-1m", "ratings.dat"))


def _load_csv(data_cfg, source: str) -> Dataset:
  return movielens_large.load_movielens_csv(_cfg_dir(data_cfg, source, "ratings.csv"), source)


def _load_synthetic(data_cfg) -> Dataset:
  return synthetic.synthetic(
      int(_cfg(data_cfg, "synthetic_users")),
      int(_cfg(data_cfg, "synthetic_items")),
      int(_cfg(data_cfg, "synthetic_interactions")),
      seed=int(_cfg(data_cfg, "synthetic_seed")),
      zipf_a=float(_cfg(data_cfg, "synthetic_zipf_a")),
      num_clusters=int(_cfg(data_cfg, "synthetic_clusters")),
      affinity=float(_cfg(data_cfg, "synthetic_affinity")))


def _load_tables(data_cfg) -> Dataset:
  base = pathlib.Path(str(_cfg(data_cfg, "dir")) or ".").expanduser()

  def resolve(name: str) -> pathlib.Path:
    path = pathlib.Path(name).expanduser()
    return path if path.is_absolute() else base / path

  keys = ("interactions_file", "items_file", "users_file", "user_key", "item_key", "time_key",
          "weight_key", "unknown_items")
  return tables.load_tables(ml_collections.ConfigDict({k: _cfg(data_cfg, k) for k in keys}),
                            resolve)


# Every source: --config.data.source -> loader(data_cfg). The order is the one
# the "unknown data source" error lists them in.
LOADERS: dict[str, Callable[[Any], Dataset]] = {
    "tables": _load_tables,
    "grouplens": _load_grouplens,
    "tfds": _load_tfds,
    "ml-1m": _load_ml1m,
    "ml-20m": functools.partial(_load_csv, source="ml-20m"),
    "ml-25m": functools.partial(_load_csv, source="ml-25m"),
    "ml-latest": functools.partial(_load_csv, source="ml-latest"),
    "synthetic": _load_synthetic,
}


def load_dataset(data_cfg) -> Dataset:
  """Loads ``data_cfg.source``: one of ``LOADERS`` (default grouplens)."""
  source = _cfg(data_cfg, "source")
  if source not in LOADERS:
    raise DataError(f"unknown data source {source!r}. Fix: set --config.data.source to one "
                    f"of {', '.join(LOADERS)}.")
  return LOADERS[source](data_cfg)


# ----------------------------------------------------------------------------
# Train/test split.


def _resolve_ratings_file(data_cfg, key: str) -> pathlib.Path:
  name = _cfg(data_cfg, key)
  if not name:
    raise DataError(f"split='files' needs --config.data.{key} (a u.data-format file such as "
                    f"u1.base / u1.test). Fix: set --config.data.{key}=PATH.")
  path = pathlib.Path(name).expanduser()
  tried = [path]
  if not path.is_absolute() and not path.exists() and _cfg(data_cfg, "source") == "grouplens":
    try:
      base = download.resolve_data_dir(_cfg(data_cfg, "dir") or None, download=False)
      tried.append(base / path)
    except DataError:
      pass
  for p in tried:
    if p.is_file():
      return p
  raise DataError(f"--config.data.{key}={name!r} not found (tried {', '.join(map(str, tried))}). "
                  f"Fix: give an existing path, absolute or relative to the data folder.")


def train_test(data_cfg, dataset: Dataset, seed: int) -> tuple[Columns, Columns]:
  """(train, test) ``ratings`` columns per ``data_cfg.split``.

  split='files' reads ``data_cfg.train_file`` and ``test_file``; a test rating
  repeating a training rating (same user, movie and timestamp) is dropped, and
  test ratings of users or movies absent from training are counted; each
  is one warning line.
  """
  split = _cfg(data_cfg, "split")
  if split == "files":
    if float(_cfg(data_cfg, "cold_user_fraction")):
      raise DataError("data.cold_user_fraction holds users out of a split this package makes; "
                      "split='files' reads a fixed one. Fix: set it to 0, or use another split.")
    train_path = _resolve_ratings_file(data_cfg, "train_file")
    test_path = _resolve_ratings_file(data_cfg, "test_file")
    train = movielens.load_ratings_file(train_path, dataset)
    test = drop_ratings_repeating(movielens.load_ratings_file(test_path, dataset), train,
                                  test_path, train_path)
    splits.warn_unseen_in_train(train, test, train_path, test_path)
    return train, test
  ratings = dataset.ratings
  if float(_cfg(data_cfg, "cold_user_fraction")):  # the split is made of the warm users only
    ratings = take_rows(ratings, cold_user_rows(data_cfg, dataset, seed)[0])
  train_idx, test_idx = splits.split_indices(
      ratings, split, seed=seed,
      test_fraction=float(_cfg(data_cfg, "test_fraction")),
      train_size=int(_cfg(data_cfg, "train_size")),
      test_size=int(_cfg(data_cfg, "test_size")),
      user_key=dataset.user_key, time_key=dataset.time_key)
  return take_rows(ratings, train_idx), take_rows(ratings, test_idx)


def cold_user_rows(data_cfg, dataset: Dataset, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(warm, cold history, cold test) row indices into ``dataset.ratings`` per
  ``data_cfg.cold_user_fraction`` and ``cold_user_history`` (``splits.cold_user_split``)."""
  return splits.cold_user_split(
      dataset.ratings, fraction=float(_cfg(data_cfg, "cold_user_fraction")),
      history=int(_cfg(data_cfg, "cold_user_history")), seed=seed,
      user_key=dataset.user_key, time_key=dataset.time_key)


def train_validation_test(data_cfg, dataset: Dataset, seed: int
                          ) -> tuple[Columns, Columns | None, Columns]:
  """(train, validation, test) ``ratings`` columns: ``train_test``'s split, then
  ``data_cfg.validation_fraction`` of its training part held out for validation
  (``splits.validation_indices``: the latest part by time for temporal splits, a seeded
  random part otherwise). Validation is None when the fraction is 0; test is the same
  either way.
  """
  train, test = train_test(data_cfg, dataset, seed)
  fraction = float(_cfg(data_cfg, "validation_fraction"))
  if not fraction:
    return train, None, test
  train_idx, valid_idx = splits.validation_indices(
      train, _cfg(data_cfg, "split"), seed=seed, fraction=fraction,
      user_key=dataset.user_key, time_key=dataset.time_key)
  return take_rows(train, train_idx), take_rows(train, valid_idx), test
