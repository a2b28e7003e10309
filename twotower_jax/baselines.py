"""Non-learned baselines, scored by the same full-corpus metric code as the model.

Each baseline is a score function `user_ids_B -> scores_BxN` (numpy) over all N
candidates, passed to `metrics.evaluate_protocols(score_fn=...)`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from twotower_jax import arrays
from twotower_jax import metrics

BASELINES = ("popularity", "random", "itemcf")


def _check_interactions(user_idx, item_idx, num_users: int, num_items: int, what: str):
  user_idx = metrics.check_indices(f"{what}_user_idx", user_idx, num_users, "num_users")
  item_idx = metrics.check_indices(f"{what}_item_idx", item_idx, num_items, "num_items")
  if user_idx.shape != item_idx.shape:
    raise ValueError(f"{what}_user_idx {user_idx.shape} and {what}_item_idx {item_idx.shape} "
                     "must have the same length: one (user, item) pair per interaction.")
  return user_idx, item_idx


def popularity_scores(item_counts_N) -> metrics.ScoreFn:
  """Score = training count; ties broken by lower index, so the order is strict.

  The scores are the positions of a total order (N - position, exact in float32
  for N < 2**24), so no two candidates tie and the top-k lists are deterministic.
  """
  counts_N = np.asarray(item_counts_N)
  n = counts_N.shape[0]
  order_N = np.argsort(-counts_N, kind="stable")  # most popular first, lower index first
  score_N = np.empty((n,), np.float32)
  score_N[order_N] = np.arange(n, 0, -1, dtype=np.float32)

  def score_fn(user_ids_B):
    return np.broadcast_to(score_N, (len(user_ids_B), n))  # read-only view, no copy

  return score_fn


@functools.partial(jax.jit, static_argnames=("num_items",))
def _random_scores(key, user_ids_B, num_items):
  keys_B = jax.vmap(lambda u: jax.random.fold_in(key, u))(user_ids_B)
  return jax.vmap(lambda k: jax.random.uniform(k, (num_items,)))(keys_B)


def random_scores(num_items: int, seed: int) -> metrics.ScoreFn:
  """Seeded uniform scores; one fixed random ranking per user, whatever the batching."""
  key = jax.random.PRNGKey(seed)

  def score_fn(user_ids_B):
    u_B = np.asarray(user_ids_B, np.int32)
    b = u_B.shape[0]
    u_P = arrays.pad_rows(u_B, arrays.size_bucket(b), 0)  # few shapes, few compiles
    return np.asarray(_random_scores(key, u_P, num_items))[:b]

  return score_fn


def binary_matrix(user_idx, item_idx, num_users: int, num_items: int) -> np.ndarray:
  """Dense binary user x item matrix X_UxN (float32; repeated pairs count once)."""
  x_UxN = np.zeros((num_users, num_items), np.float32)
  x_UxN[user_idx, item_idx] = 1.0
  return x_UxN


def itemcf_similarity(x_UxN: np.ndarray) -> np.ndarray:
  """Cosine similarity of the item columns of a binary matrix, self-similarity zeroed.

  sim(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|) with U_i the users of item i;
  0 for an item without training users.
  """
  co_NxN = x_UxN.T @ x_UxN  # co-occurrence counts, exact in float32 below 2**24 users
  norm_N = np.sqrt(np.diag(co_NxN).copy())
  inv_N = np.divide(1.0, norm_N, out=np.zeros_like(norm_N), where=norm_N > 0)
  sim_NxN = co_NxN * inv_N[:, None] * inv_N[None, :]
  np.fill_diagonal(sim_NxN, 0.0)
  return sim_NxN


def itemcf_scores(train_user_idx, train_item_idx, num_users: int,
                  num_items: int) -> metrics.ScoreFn:
  """Item-based CF: score(u, j) = sum over u's training items i of cosine sim(i, j).

  Dense: memory is 4 * (U*N + N*N) bytes for X and the similarity (about 17 MB for
  MovieLens 100K, U=943, N=1682; about 145 MB for 1M; for 20M, X alone would take
  ~15 GB, so this dense form is meant for the small sets), plus 4 * B*N per
  batch of scores. Time is O(U N^2) once, then O(B N^2) per batch.

  Equal CF scores (above all the zeros of items never co-rated with the user's,
  and every item for a user without training items) are ordered by popularity:
  otherwise, under the strictly-higher rank rule, a cold user's all-zero scores
  would rank every true item first.
  """
  u, i = _check_interactions(train_user_idx, train_item_idx, num_users, num_items, "train")
  x_UxN = binary_matrix(u, i, num_users, num_items)
  sim_NxN = itemcf_similarity(x_UxN)
  # Popularity positions scaled into [0, 1e-6): below any real CF difference, which is a
  # cosine sum of at least ~1e-4 here, yet resolved exactly in float64.
  pop_N = popularity_scores(np.bincount(i, minlength=num_items))([0])[0].astype(np.float64)
  tiebreak_N = pop_N / (num_items + 1) * 1e-6
  return lambda user_ids_B: (x_UxN[np.asarray(user_ids_B)] @ sim_NxN).astype(
      np.float64) + tiebreak_N


def evaluate_baselines(train_user_idx, train_item_idx, test_user_idx, test_item_idx,
                       num_users: int, num_items: int,
                       ks: Sequence[int] = metrics.DEFAULT_KS, seed: int = 0,
                       batch_size: int = 1024) -> dict[str, float]:
  """Metrics of the popularity, random and itemcf baselines on one split.

  Returns `<baseline>/<protocol>/<metric>` (e.g. `itemcf/exclude_seen/hr_10`) and
  `<baseline>/top_{k}_accuracy`, computed by `metrics.evaluate_protocols`.
  """
  tr_u, tr_i = _check_interactions(train_user_idx, train_item_idx, num_users, num_items, "train")
  te_u, te_i = _check_interactions(test_user_idx, test_item_idx, num_users, num_items, "test")
  indptr, items = metrics.seen_csr(tr_u, tr_i, num_users)
  counts_N = np.bincount(tr_i, minlength=num_items)
  score_fns = {
      "popularity": popularity_scores(counts_N),
      "random": random_scores(num_items, seed),
      "itemcf": itemcf_scores(tr_u, tr_i, num_users, num_items),
  }
  out = {}
  for name, fn in score_fns.items():
    res = metrics.evaluate_protocols(te_i, te_u, indptr, items, counts_N, ks=ks, score_fn=fn,
                                     batch_size=batch_size)
    out.update({f"{name}/{key}": val for key, val in res.items()})
  return out
