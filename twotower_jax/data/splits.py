"""Train/test splits of the ratings: seeded, random, temporal, per-user temporal,
leave-last-out; the validation carve-out; cold users held out of training entirely."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from twotower_jax.data.dataset import DataError, key_codes

_log = logging.getLogger(__name__)

SPLIT_KINDS = ("seed", "random", "temporal", "user_temporal", "leave_last_out")
# split 'user_temporal': users with fewer interactions stay entirely in training.
USER_TEMPORAL_MIN_INTERACTIONS = 5


def _num_rows(ratings: Mapping[str, np.ndarray], user_key: str) -> int:
  if user_key not in ratings:
    raise DataError(f"ratings have no {user_key!r} column (columns: {sorted(ratings)}). "
                    "Fix: pass Dataset.ratings as returned by twotower_jax.data.sources.load_dataset.")
  return len(ratings[user_key])


def _fraction_count(n: int, test_fraction: float) -> int:
  if not 0.0 < test_fraction < 1.0:
    raise DataError(f"test_fraction={test_fraction} must be strictly between 0 and 1. "
                    "Fix: set --config.data.test_fraction=0.2 (for example).")
  n_test = round(test_fraction * n)
  if n_test < 1 or n_test >= n:
    raise DataError(f"test_fraction={test_fraction} of {n} ratings leaves {n_test} test and "
                    f"{n - n_test} train ratings; both need at least one. Fix: change "
                    "--config.data.test_fraction or use more data.")
  return n_test


def split_indices(ratings: Mapping[str, np.ndarray], kind: str, *, seed: int,
                  test_fraction: float = 0.2, train_size: int = 80_000,
                  test_size: int = 10_000, user_key: str = "user_id",
                  time_key: str = "timestamp") -> tuple[np.ndarray, np.ndarray]:
  """(train_idx, test_idx) into ``ratings``, each sorted ascending, disjoint.

  kinds: ``seed`` (seeded permutation: first ``train_size`` train, next
  ``test_size`` test, like the TFRS retrieval tutorial, whose test set is the
  remaining 20,000 of 100K: pass ``test_size=20_000`` to match its sizes; the
  permutation itself differs from TensorFlow's), ``random`` (seeded,
  ``test_fraction`` test), ``temporal`` (latest ``test_fraction`` by timestamp
  is test; ties by position), ``user_temporal`` (each user's latest ``test_fraction``
  of their ratings, rounded half up, at least one and never all, is test; ties by
  position; users with fewer than ``USER_TEMPORAL_MIN_INTERACTIONS`` ratings stay in
  train), ``leave_last_out`` (each user's latest rating is test; ties by position;
  single-rating users stay in train).
  """
  n = _num_rows(ratings, user_key)
  if kind == "seed":
    if train_size < 1 or test_size < 1 or train_size + test_size > n:
      raise DataError(
          f"split 'seed' with train_size={train_size}, test_size={test_size} needs "
          f"1..{n} ratings in total, the data has {n}. Fix: lower "
          "--config.data.train_size/test_size or use split='random'.")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:train_size]), np.sort(perm[train_size:train_size + test_size])
  if kind == "random":
    n_test = _fraction_count(n, test_fraction)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
  if kind in ("temporal", "user_temporal", "leave_last_out") and (
      not time_key or time_key not in ratings):
    raise DataError(f"split {kind!r} needs a timestamp column ({time_key or 'none is set'}); "
                    f"the interactions have {sorted(ratings)}. Fix: set data.time_key, or use "
                    "split='random'.")
  if kind == "temporal":
    n_test = _fraction_count(n, test_fraction)
    order = np.argsort(np.asarray(ratings[time_key]), kind="stable")
    return np.sort(order[:n - n_test]), np.sort(order[n - n_test:])
  if kind == "user_temporal":
    return _user_temporal(ratings, n, test_fraction, user_key, time_key)
  if kind == "leave_last_out":
    users_N = key_codes(ratings[user_key])
    order = np.lexsort((np.arange(n), np.asarray(ratings[time_key]), users_N))
    users_sorted = users_N[order]
    is_last = np.ones(n, bool)
    is_last[:-1] = users_sorted[1:] != users_sorted[:-1]
    is_first = np.ones(n, bool)
    is_first[1:] = users_sorted[1:] != users_sorted[:-1]
    test_sorted = is_last & ~is_first  # latest rating of users with >= 2 ratings
    test = np.sort(order[test_sorted])
    if test.size == 0:
      raise DataError("split 'leave_last_out': no user has two or more ratings, so the test "
                      "set is empty. Fix: use split='random'.")
    return np.sort(order[~test_sorted]), test
  raise DataError(f"unknown split {kind!r}. Fix: set --config.data.split to one of "
                  f"{', '.join(SPLIT_KINDS)} or 'files'.")


def _user_temporal(ratings, n: int, test_fraction: float, user_key: str, time_key: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """split 'user_temporal' (see `split_indices`), vectorised over users."""
  if not 0.0 < test_fraction < 1.0:
    raise DataError(f"test_fraction={test_fraction} must be strictly between 0 and 1. "
                    "Fix: set --config.data.test_fraction=0.2 (for example).")
  users_N = np.unique(key_codes(ratings[user_key]), return_inverse=True)[1].reshape(-1)
  order = np.lexsort((np.arange(n), np.asarray(ratings[time_key]), users_N))
  users_sorted = users_N[order]
  counts_U = np.bincount(users_N)
  rank_N = np.arange(n) - (np.cumsum(counts_U) - counts_U)[users_sorted]  # in user's order
  n_test_U = np.clip(np.floor(test_fraction * counts_U + 0.5), 1, counts_U - 1)
  n_test_U = np.where(counts_U >= USER_TEMPORAL_MIN_INTERACTIONS, n_test_U, 0)
  test_sorted = rank_N >= (counts_U - n_test_U)[users_sorted]
  if not test_sorted.any():
    raise DataError(f"split 'user_temporal': no user has {USER_TEMPORAL_MIN_INTERACTIONS} or "
                    "more ratings, so the test set is empty. Fix: use split='random'.")
  return np.sort(order[~test_sorted]), np.sort(order[test_sorted])


def cold_user_split(ratings: Mapping[str, np.ndarray], *, fraction: float, history: int,
                    seed: int, user_key: str = "user_id", time_key: str = "timestamp"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(warm_idx, history_idx, test_idx) into ``ratings``, each sorted ascending, disjoint,
  together every row: ``fraction`` of the users with more than ``history`` ratings (seeded
  draw) are cold; each cold user's first ``history`` ratings by time (ties by position) are
  their given history, the rest their test ratings; every other user's ratings are warm
  (the train/test split is made from those alone)."""
  n = _num_rows(ratings, user_key)
  if not 0.0 < fraction < 1.0:
    raise DataError(f"cold_user_fraction={fraction} must be strictly between 0 and 1. Fix: "
                    "set --config.data.cold_user_fraction=0.1 (for example), or 0 for none.")
  if history < 1:
    raise DataError(f"cold_user_history={history} must be >= 1: a cold user is served from "
                    "that many given interactions. Fix: set --config.data.cold_user_history=5.")
  if not time_key or time_key not in ratings:
    raise DataError(f"cold users need a timestamp column ({time_key or 'none is set'}) to "
                    f"give each their first ratings; the interactions have {sorted(ratings)}. "
                    "Fix: set data.time_key, or data.cold_user_fraction=0.")
  users_N = np.unique(key_codes(ratings[user_key]), return_inverse=True)[1].reshape(-1)
  counts_U = np.bincount(users_N)
  eligible_U = np.flatnonzero(counts_U > history)
  n_cold = round(fraction * len(eligible_U))
  if n_cold < 1 or n_cold >= len(counts_U):
    raise DataError(f"cold_user_fraction={fraction} of the {len(eligible_U)} users with more "
                    f"than {history} ratings gives {n_cold} cold users of {len(counts_U)}; "
                    "it needs at least one, and one warm user. Fix: change "
                    "--config.data.cold_user_fraction or data.cold_user_history.")
  cold_U = np.zeros(len(counts_U), bool)
  cold_U[np.random.default_rng([seed, 2]).choice(eligible_U, n_cold, replace=False)] = True
  order = np.lexsort((np.arange(n), np.asarray(ratings[time_key]), users_N))
  users_sorted = users_N[order]
  rank_N = np.arange(n) - (np.cumsum(counts_U) - counts_U)[users_sorted]  # in user's order
  cold_sorted = cold_U[users_sorted]
  return (np.sort(order[~cold_sorted]), np.sort(order[cold_sorted & (rank_N < history)]),
          np.sort(order[cold_sorted & (rank_N >= history)]))


def warn_unseen_in_train(train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray],
                         train_path, test_path) -> int:
  """Warns (one line) about test ratings whose user or movie never occurs in ``train``.

  For split='files', whose two files come from outside: such ratings are
  scored, but the model never trained an embedding for that user or movie.
  Returns the number of such test ratings.
  """
  test_users, test_movies = np.asarray(test["user_id"]), np.asarray(test["movie_id"])
  new_user_N = ~np.isin(test_users, np.asarray(train["user_id"]))
  new_movie_N = ~np.isin(test_movies, np.asarray(train["movie_id"]))
  n = int(np.count_nonzero(new_user_N | new_movie_N))
  if n:
    _log.warning(
        "%s: %d test ratings by %d users and %d movies that never occur in %s; they are scored "
        "but the model has no trained embedding for them. Fix: move some ratings of those "
        "users and movies into %s, or delete those test ratings, unless you mean to evaluate "
        "cold start.", test_path, n, np.unique(test_users[new_user_N]).size,
        np.unique(test_movies[new_movie_N]).size, train_path, train_path)
  return n


def validation_indices(ratings: Mapping[str, np.ndarray], kind: str, *, seed: int,
                       fraction: float, user_key: str = "user_id",
                       time_key: str = "timestamp") -> tuple[np.ndarray, np.ndarray]:
  """(train_idx, valid_idx) into the training ``ratings``: ``fraction`` of them held out for
  validation, each sorted ascending, disjoint.

  Like the train/test split ``kind`` it follows: for ``temporal`` and ``leave_last_out`` the
  latest ``fraction`` by timestamp (ties by position), for ``user_temporal`` each user's
  latest share (at least one rating of each user stays in training), for any other kind
  (``seed``, ``random``, ``files``) a seeded random share, drawn apart from the test split's.
  """
  n = _num_rows(ratings, user_key)
  if not 0.0 < fraction < 1.0:
    raise DataError(f"validation_fraction={fraction} must be strictly between 0 and 1 to hold "
                    "out a validation split. Fix: set --config.data.validation_fraction=0.1 "
                    "(for example), or 0 for none.")
  by_time = kind in ("temporal", "leave_last_out", "user_temporal")
  if by_time and (not time_key or time_key not in ratings):
    raise DataError(f"a validation split of split {kind!r} needs a timestamp column "
                    f"({time_key or 'none is set'}). Fix: set data.time_key, or use "
                    "split='random'.")
  if kind == "user_temporal":
    users_N = np.unique(key_codes(ratings[user_key]), return_inverse=True)[1].reshape(-1)
    order = np.lexsort((np.arange(n), np.asarray(ratings[time_key]), users_N))
    users_sorted = users_N[order]
    counts_U = np.bincount(users_N)
    starts_U = np.concatenate([[0], np.cumsum(counts_U)[:-1]])
    rank_N = np.arange(n) - starts_U[users_sorted]  # position in the user's own time order
    n_valid_U = np.minimum(np.floor(fraction * counts_U + 0.5), counts_U - 1)
    valid_sorted = rank_N >= (counts_U - n_valid_U)[users_sorted]
    if not valid_sorted.any():
      raise DataError(f"validation_fraction={fraction} of each user's ratings leaves no "
                      "validation rating. Fix: raise --config.data.validation_fraction.")
    return np.sort(order[~valid_sorted]), np.sort(order[valid_sorted])
  n_valid = round(fraction * n)
  if n_valid < 1 or n_valid >= n:
    raise DataError(f"validation_fraction={fraction} of {n} training ratings leaves {n_valid} "
                    f"validation and {n - n_valid} training ratings; both need at least one. "
                    "Fix: change --config.data.validation_fraction or use more data.")
  if by_time:
    order = np.argsort(np.asarray(ratings[time_key]), kind="stable")
  else:
    order = np.random.default_rng([seed, 1]).permutation(n)
  return np.sort(order[:n - n_valid]), np.sort(order[n - n_valid:])
