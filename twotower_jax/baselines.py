"""Non-learned baselines, scored by the same full-corpus metric code as the model.

Each baseline is a score function `user_ids_B -> scores_BxN` (numpy) over all N
candidates, passed to `metrics.evaluate_protocols(score_fn=...)`. Those that read a
history (item-CF, EASE) also score each test interaction from its online history (the
user's training items and their earlier test items) for the `exclude_history` protocol
(`history_score_fn`); popularity and random score users alike in every protocol.

Histories are CSR (`Histories`): rows are users (training history) or test interactions
(online history), each entry an item with an optional weight (recency).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import jax
import numpy as np

from twotower_jax import arrays
from twotower_jax import history
from twotower_jax import metrics

_log = logging.getLogger(__name__)

BASELINES = ("popularity", "random", "itemcf", "ease")
# Added to a history baseline's scores: the popularity order scaled below any real score
# difference, so equal scores (a user without history, items nobody trained on) are
# ordered by popularity instead of tying (a tie counts in the true item's favour).
_ITEMCF_TIEBREAK = 1e-6  # item-CF scores are cosine sums: real differences >= ~1e-4
_EASE_TIEBREAK = 1e-9  # EASE scores are float64 sums of B entries (~1e-3 and up)
_EASE_FLOAT64_MAX_ITEMS = 8192  # above: P and B in float32 (half the memory)


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


# ----------------------------------------------------------------------------- histories


@dataclasses.dataclass(frozen=True)
class Histories:
  """Rows of items as CSR: row r's are ``items[indptr[r]:indptr[r + 1]]``; ``weights``
  (aligned with items) weighs each entry, None for all 1."""

  indptr: np.ndarray  # int64 [R + 1]
  items: np.ndarray  # int32 [E]
  weights: np.ndarray | None = None  # float64 [E]

  def dense(self, rows_B, num_items: int, dtype=np.float32) -> np.ndarray:
    """[B, N] history vectors of ``rows_B``: an item's weight (1 without weights; an item
    listed twice keeps its largest weight, i.e. its most recent occurrence)."""
    rows_B = np.asarray(rows_B, np.int64)
    start_B = self.indptr[rows_B]
    len_B = self.indptr[rows_B + 1] - start_B
    row_E = np.repeat(np.arange(len(rows_B)), len_B)
    pos_E = np.arange(int(len_B.sum())) - np.repeat(np.cumsum(len_B) - len_B, len_B) + np.repeat(
        start_B, len_B)
    x_BxN = np.zeros((len(rows_B), num_items), dtype)
    if self.weights is None:
      x_BxN[row_E, self.items[pos_E]] = 1.0
    else:
      np.maximum.at(x_BxN, (row_E, self.items[pos_E]), self.weights[pos_E].astype(dtype))
    return x_BxN


def _recency(back_E: np.ndarray, factor: float) -> np.ndarray | None:
  return None if factor == 1.0 else np.power(float(factor), back_E.astype(np.float64))


def training_histories(train_user_idx, train_item_idx, num_users: int, *, train_time=None,
                       recency: float = 1.0) -> Histories:
  """Each user's training items (rows = users), weighted ``recency**k`` for the item k
  steps back in time order (the most recent k = 0; equal times by row order, and row
  order throughout without ``train_time``)."""
  u = np.asarray(train_user_idx, np.int64)
  t = np.zeros(len(u)) if train_time is None else np.asarray(train_time, np.float64)
  seqs = history.sequences(u, np.arange(len(u)), t, num_users)  # items: training rows
  items = np.asarray(train_item_idx, np.int32)[seqs.items]
  pos_E = np.arange(len(items))
  user_E = np.repeat(np.arange(num_users), np.diff(seqs.indptr_U1))
  back_E = seqs.indptr_U1[user_E + 1] - 1 - pos_E
  return Histories(seqs.indptr_U1, items, _recency(back_E, recency))


def online_histories(train_user_idx, train_item_idx, test_user_idx, test_item_idx,
                     num_users: int, *, train_time=None, test_time=None,
                     recency: float = 1.0) -> Histories:
  """Each test interaction's online history (rows = test interactions), in time order,
  weighted ``recency**k`` for the item k steps back (the most recent k = 0).

  The same items as `history.online_history`: the user's training items and their test
  items before it in the log (by time, equal times by row order). They are ordered by time
  (equal times: training rows first, then row order); training items after the test time
  (a random split) count as the most recent. Without times every test time is equal (the history is the training
  items, in row order).
  """
  tr_u = np.asarray(train_user_idx, np.int64)
  te_u = np.asarray(test_user_idx, np.int64)
  n_tr, n_te = len(tr_u), len(te_u)
  tr_t = np.zeros(n_tr) if train_time is None else np.asarray(train_time, np.float64)
  te_t = np.zeros(n_te) if test_time is None else np.asarray(test_time, np.float64)
  item_all = np.concatenate([np.asarray(train_item_idx), np.asarray(test_item_idx)]).astype(
      np.int32)
  # One time-ordered sequence per user over both sets; its "items" are the combined rows.
  seqs = history.sequences(np.concatenate([tr_u, te_u]), np.arange(n_tr + n_te),
                           np.concatenate([tr_t, te_t]), num_users)
  row_S = seqs.items.astype(np.int64)
  is_train_S = row_S < n_tr
  train_before_S1 = np.zeros(len(row_S) + 1, np.int64)  # training entries before position
  np.cumsum(is_train_S, out=train_before_S1[1:])
  train_pos = np.flatnonzero(is_train_S)
  # A test interaction's history: every position of its user strictly before its time
  # (training and test), then the user's training positions from there on.
  start_T, stop_T = seqs.indptr_U1[te_u], seqs.indptr_U1[te_u + 1]
  pos_of_row = np.empty(len(row_S), np.int64)
  pos_of_row[row_S] = np.arange(len(row_S))
  end_T = pos_of_row[n_tr + np.arange(n_te)]  # each test row's own place in the log
  n_before_T = end_T - start_T
  count_T = n_before_T + train_before_S1[stop_T] - train_before_S1[end_T]
  indptr = np.zeros(n_te + 1, np.int64)
  np.cumsum(count_T, out=indptr[1:])
  row_E = np.repeat(np.arange(n_te), count_T)
  off_E = np.arange(indptr[-1]) - indptr[row_E]
  before_E = off_E < n_before_T[row_E]
  later_E = np.clip(train_before_S1[end_T[row_E]] + off_E - n_before_T[row_E], 0,
                    max(len(train_pos) - 1, 0))
  pos_E = np.where(before_E, start_T[row_E] + off_E,
                   train_pos[later_E] if len(train_pos) else 0)
  items = item_all[row_S[pos_E]] if len(pos_E) else np.zeros(0, np.int32)
  back_E = count_T[row_E] - 1 - off_E
  return Histories(indptr, items, _recency(back_E, recency))


def _tiebreak(counts_N, scale: float) -> np.ndarray:
  """The popularity order as scores in [0, scale): more training interactions higher."""
  n = len(counts_N)
  pop_N = popularity_scores(counts_N)([0])[0].astype(np.float64)
  return pop_N / (n + 1) * scale


def _matrix_scores(hist: Histories, w_NxN: np.ndarray, tiebreak_N: np.ndarray):
  """rows_B -> (history vector of each row) @ w_NxN + tiebreak_N, float64."""
  n = w_NxN.shape[0]
  return lambda rows_B: (hist.dense(rows_B, n, w_NxN.dtype) @ w_NxN).astype(
      np.float64) + tiebreak_N


# ----------------------------------------------------------------------------- item-CF


def itemcf_score_fns(train_user_idx, train_item_idx, num_users: int, num_items: int, *,
                     online: Histories | None = None
                     ) -> tuple[metrics.ScoreFn, metrics.HistoryScoreFn | None]:
  """Item-based CF over each user's training items, and (given ``online``, the online
  histories) over each test interaction's online history: score(h, j) = sum over the
  items i of history h of cosine sim(i, j). See `itemcf_scores`."""
  u, i = _check_interactions(train_user_idx, train_item_idx, num_users, num_items, "train")
  sim_NxN = itemcf_similarity(binary_matrix(u, i, num_users, num_items))
  tiebreak_N = _tiebreak(np.bincount(i, minlength=num_items), _ITEMCF_TIEBREAK)
  seen = training_histories(u, i, num_users)
  online_fn = None if online is None else _matrix_scores(
      Histories(online.indptr, online.items), sim_NxN, tiebreak_N)  # binary: no weights
  return _matrix_scores(seen, sim_NxN, tiebreak_N), online_fn


def itemcf_scores(train_user_idx, train_item_idx, num_users: int,
                  num_items: int) -> metrics.ScoreFn:
  """Item-based CF: score(u, j) = sum over u's training items i of cosine sim(i, j).

  Dense: memory is 4 * N*N bytes for the similarity (about 11 MB for MovieLens 100K,
  N=1682; about 55 MB for 1M; for 20M's 27K items 3 GB, so this dense form is meant
  for the small sets), plus 4 * B*N per batch of history vectors and scores. Time is
  O(U N^2) once, then O(B N^2) per batch.

  Equal CF scores (above all the zeros of items never co-rated with the user's,
  and every item for a user without training items) are ordered by popularity:
  otherwise, under the strictly-higher rank rule, a cold user's all-zero scores
  would rank every true item first.
  """
  return itemcf_score_fns(train_user_idx, train_item_idx, num_users, num_items)[0]


# ----------------------------------------------------------------------------- EASE


def ease_matrix(train_user_idx, train_item_idx, num_users: int, num_items: int,
                lam: float) -> np.ndarray:
  """EASE item-item weights (Steck, WWW 2019), closed form.

  With X the binary user x item training matrix: P = (X^T X + lam I)^-1,
  B = I - P diag(1 / diag(P)), i.e. B_ij = -P_ij / P_jj off the diagonal and
  diag(B) = 0. float64 up to 8,192 items, float32 above (an N x N inverse: 4 or 8 N^2
  bytes, three such matrices at the peak).
  """
  if not lam > 0:
    raise ValueError(f"EASE lambda={lam} must be > 0 (X^T X alone may be singular).")
  u, i = _check_interactions(train_user_idx, train_item_idx, num_users, num_items, "train")
  x_UxN = binary_matrix(u, i, num_users, num_items)
  dtype = np.float64 if num_items <= _EASE_FLOAT64_MAX_ITEMS else np.float32
  g_NxN = (x_UxN.T @ x_UxN).astype(dtype)  # counts: exact in float32 below 2**24 users
  g_NxN[np.diag_indices(num_items)] += lam
  p_NxN = np.linalg.inv(g_NxN)
  del g_NxN
  b_NxN = p_NxN / -np.diag(p_NxN)[None, :]
  np.fill_diagonal(b_NxN, 0.0)
  return b_NxN


def ease_score_fns(b_NxN: np.ndarray, counts_N, seen: Histories,
                   online: Histories | None = None
                   ) -> tuple[metrics.ScoreFn, metrics.HistoryScoreFn | None]:
  """EASE scores, history vector @ B: over each user's training history ``seen`` (rows =
  users), and over each test interaction's online history ``online`` (rows = test
  interactions), each optionally recency-weighted (`training_histories`,
  `online_histories`). Equal scores are ordered by popularity (``counts_N``)."""
  tiebreak_N = _tiebreak(np.asarray(counts_N), _EASE_TIEBREAK)
  return (_matrix_scores(seen, b_NxN, tiebreak_N),
          None if online is None else _matrix_scores(online, b_NxN, tiebreak_N))


# ----------------------------------------------------------------------------- evaluation


def evaluate_baselines(train_user_idx, train_item_idx, test_user_idx, test_item_idx,
                       num_users: int, num_items: int,
                       ks: Sequence[int] = metrics.DEFAULT_KS, seed: int = 0,
                       batch_size: int = 1024, *, history_indptr=None, history_items=None,
                       train_time=None, test_time=None, ease_lambda: float = 500.0,
                       ease_recency: float = 1.0, ease_max_items: int = 20_000
                       ) -> dict[str, float]:
  """Metrics of the popularity, random, itemcf and ease baselines on one split.

  Args:
    train_user_idx, train_item_idx, test_user_idx, test_item_idx: the split.
    num_users, num_items: U and N.
    ks, seed, batch_size: cut-offs, the random baseline's seed, interactions per batch.
    history_indptr, history_items: each test interaction's online history
      (`history.online_history`); given, every baseline is also scored under
      `exclude_history`, item-CF and EASE from that history.
    train_time, test_time: timestamps, for EASE's recency order (row order without).
    ease_lambda: EASE's L2 weight.
    ease_recency: the weight factor**k of the history item k steps back (1: none).
    ease_max_items: EASE runs only for catalogues up to this size (its N x N
      inverse); above, it is skipped with one log line.

  Returns `<baseline>/<protocol>/<metric>` (e.g. `itemcf/exclude_seen/hr_10`) and
  `<baseline>/top_{k}_accuracy`, computed by `metrics.evaluate_protocols`.
  """
  tr_u, tr_i = _check_interactions(train_user_idx, train_item_idx, num_users, num_items, "train")
  te_u, te_i = _check_interactions(test_user_idx, test_item_idx, num_users, num_items, "test")
  if not 0.0 < ease_recency <= 1.0:
    raise ValueError(f"ease_recency={ease_recency} must lie in (0, 1] (1: no recency).")
  indptr, items = metrics.seen_csr(tr_u, tr_i, num_users)
  counts_N = np.bincount(tr_i, minlength=num_items)
  have_history = history_indptr is not None
  online = None if not have_history else Histories(np.asarray(history_indptr),
                                                   np.asarray(history_items))
  itemcf_fn, itemcf_online_fn = itemcf_score_fns(tr_u, tr_i, num_users, num_items,
                                                 online=online)
  score_fns = {
      "popularity": (popularity_scores(counts_N), None),
      "random": (random_scores(num_items, seed), None),
      "itemcf": (itemcf_fn, itemcf_online_fn),
  }
  if num_items > ease_max_items:
    _log.warning("EASE baseline skipped: the catalogue has %d items, above "
                 "eval.ease_max_items=%d (EASE inverts an N x N matrix).", num_items,
                 ease_max_items)
  else:
    b_NxN = ease_matrix(tr_u, tr_i, num_users, num_items, ease_lambda)
    seen = training_histories(tr_u, tr_i, num_users, train_time=train_time,
                              recency=ease_recency)
    ease_online = online
    if have_history and ease_recency != 1.0:
      ease_online = online_histories(tr_u, tr_i, te_u, te_i, num_users, train_time=train_time,
                                     test_time=test_time, recency=ease_recency)
      if not np.array_equal(ease_online.indptr, online.indptr):
        raise ValueError("The online history passed does not match train_time/test_time; "
                         "pass the times it was computed from (history.online_history).")
    score_fns["ease"] = ease_score_fns(b_NxN, counts_N, seen, ease_online)
  out = {}
  for name, (fn, history_fn) in score_fns.items():
    res = metrics.evaluate_protocols(te_i, te_u, indptr, items, counts_N, ks=ks, score_fn=fn,
                                     history_indptr=history_indptr, history_items=history_items,
                                     history_score_fn=history_fn, batch_size=batch_size)
    out.update({f"{name}/{key}": val for key, val in res.items()})
  return out


def ease_online_score_fn(train_user_idx, train_item_idx, eval_user_idx, eval_item_idx,
                         num_users: int, num_items: int, *, train_time=None, eval_time=None,
                         lam: float = 500.0, recency: float = 1.0) -> metrics.HistoryScoreFn:
  """EASE fitted on the training interactions, scoring each evaluation interaction from its
  online history (`online_histories`, recency-weighted): rows_b -> scores_bxN (float64)."""
  tr_u, tr_i = _check_interactions(train_user_idx, train_item_idx, num_users, num_items, "train")
  ev_u, ev_i = _check_interactions(eval_user_idx, eval_item_idx, num_users, num_items, "eval")
  b_NxN = ease_matrix(tr_u, tr_i, num_users, num_items, lam)
  online = online_histories(tr_u, tr_i, ev_u, ev_i, num_users, train_time=train_time,
                            test_time=eval_time, recency=recency)
  return _matrix_scores(online, b_NxN, _tiebreak(np.bincount(tr_i, minlength=num_items),
                                                 _EASE_TIEBREAK))


def given_history_baselines(train_user_idx, train_item_idx, num_users: int, num_items: int,
                            given_user_idx, given_item_idx, test_user_idx, test_item_idx,
                            num_given_users: int, *, given_time=None, test_time=None,
                            online: bool = False, ks: Sequence[int] = metrics.DEFAULT_KS,
                            ease_lambda: float = 500.0, ease_recency: float = 1.0,
                            ease_max_items: int = 20_000, batch_size: int = 1024
                            ) -> dict[str, float]:
  """Popularity, item-CF and EASE for users absent from training (cold users), each known
  by a given history: fitted on the training interactions, item-CF and EASE score every
  test interaction of a user from that user's given items (``online``: the given items and
  the user's test items before it, `online_histories`), EASE recency-weighted by time
  order. Each is ranked under ``exclude_history`` (its exclusions: the given items and the
  user's earlier test items, `history.online_history`).

  ``given_*`` and ``test_*`` users are indices 0..num_given_users-1 of their own.
  Returns ``<baseline>/exclude_history/<metric>``.
  """
  tr_u, tr_i = _check_interactions(train_user_idx, train_item_idx, num_users, num_items, "train")
  g_u, g_i = _check_interactions(given_user_idx, given_item_idx, num_given_users, num_items,
                                 "given")
  te_u, te_i = _check_interactions(test_user_idx, test_item_idx, num_given_users, num_items,
                                   "test")
  counts_N = np.bincount(tr_i, minlength=num_items)
  t_te = np.zeros(len(te_u)) if test_time is None else np.asarray(test_time, np.float64)
  h_indptr, h_items = history.online_history(g_u, g_i, te_u, te_i, t_te, num_given_users)
  g_indptr, g_items = metrics.seen_csr(g_u, g_i, num_given_users)
  sim_NxN = itemcf_similarity(binary_matrix(tr_u, tr_i, num_users, num_items))
  hist_fns = {"itemcf": (sim_NxN, _tiebreak(counts_N, _ITEMCF_TIEBREAK), 1.0)}
  if num_items <= ease_max_items:
    hist_fns["ease"] = (ease_matrix(tr_u, tr_i, num_users, num_items, ease_lambda),
                        _tiebreak(counts_N, _EASE_TIEBREAK), ease_recency)
  score_fns = {"popularity": (popularity_scores(counts_N), None)}
  for name, (w_NxN, tiebreak_N, recency) in hist_fns.items():
    if online:  # one history per test interaction
      hist = online_histories(g_u, g_i, te_u, te_i, num_given_users, train_time=given_time,
                              test_time=t_te, recency=recency)
      score_fns[name] = (_no_user_scores, _matrix_scores(hist, w_NxN, tiebreak_N))
    else:  # one per user: the given items
      hist = training_histories(g_u, g_i, num_given_users, train_time=given_time,
                                recency=recency)
      score_fns[name] = (_matrix_scores(hist, w_NxN, tiebreak_N), None)
  out = {}
  for name, (fn, history_fn) in score_fns.items():
    res = metrics.evaluate_protocols(te_i, te_u, g_indptr, g_items, counts_N, ks=ks,
                                     score_fn=fn, history_indptr=h_indptr,
                                     history_items=h_items, history_score_fn=history_fn,
                                     protocols=("exclude_history",), batch_size=batch_size)
    out.update({f"{name}/{key}": val for key, val in res.items()})
  return out


def _no_user_scores(user_ids_B):
  raise AssertionError("scored per interaction (exclude_history) only")
