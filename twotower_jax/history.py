"""What each user did before: interactions sorted by (user, time) once, windows gathered by
position. Linear memory: no [N, L] matrix is ever built for all interactions.

* ``Sequences``: every interaction of a set (training, or training plus test) sorted by
  user, then time, then row, as one CSR over users.
* ``ends(seqs, user_B, time_B)``: for each query, the position in ``seqs`` just past the
  user's last interaction strictly before ``time_B`` (a binary search on one combined
  (user, time) key), so its history is ``seqs.items[start_B:ends_B]``.
* ``windows``: the last L items of those histories as a [B, L] array, most recent last,
  padded with -1 on the left; ``online_history``: the whole history of each test
  interaction that a live system would know, as CSR.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

PAD = -1


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Interactions sorted by (user, time, row): ``items[indptr[u]:indptr[u + 1]]`` is user
  ``u``'s sequence, oldest first; ``times`` aligned with it."""

  indptr_U1: np.ndarray  # int64 [U + 1]
  items: np.ndarray  # int32 [N] item (catalogue row) of each sorted interaction
  times: np.ndarray  # int64 [N]
  keys: np.ndarray  # int64 [N] the combined (user, time) sort key
  time_base: int
  time_span: int

  @property
  def num_users(self) -> int:
    return len(self.indptr_U1) - 1


def _key(user, time, base: int, span: int) -> np.ndarray:
  return np.asarray(user, np.int64) * span + (np.asarray(time, np.int64) - base)


def sequences(user_N, item_N, time_N, num_users: int) -> Sequences:
  """The interactions (``user_N`` in 0..num_users-1) sorted by (user, time, row)."""
  user_N = np.asarray(user_N, np.int64)
  time_N = np.asarray(np.round(np.asarray(time_N, np.float64)), np.int64)
  base = int(time_N.min()) if len(time_N) else 0
  span = int(time_N.max()) - base + 2 if len(time_N) else 2
  if num_users * span >= 2**62:
    raise ValueError(f"{num_users} users x a time span of {span} s do not fit one 64-bit "
                     "sort key; use coarser timestamps (e.g. minutes).")
  keys = _key(user_N, time_N, base, span)
  order = np.argsort(keys, kind="stable")  # ties (same user and time) keep row order
  indptr = np.zeros(num_users + 1, np.int64)
  np.cumsum(np.bincount(user_N, minlength=num_users), out=indptr[1:])
  return Sequences(indptr_U1=indptr, items=np.asarray(item_N, np.int32)[order],
                   times=time_N[order], keys=keys[order], time_base=base, time_span=span)


def ends(seqs: Sequences, user_B, time_B) -> np.ndarray:
  """Position just past each user's last interaction strictly before ``time_B``."""
  t = np.clip(np.asarray(np.round(np.asarray(time_B, np.float64)), np.int64), seqs.time_base,
              seqs.time_base + seqs.time_span - 1)
  return np.searchsorted(seqs.keys, _key(user_B, t, seqs.time_base, seqs.time_span),
                         side="left").astype(np.int64)


def windows(seqs: Sequences, user_B, end_B, length: int) -> np.ndarray:
  """[B, L] the last ``length`` items before ``end_B`` of each user, most recent last,
  -1 on the left where the history is shorter."""
  user_B = np.asarray(user_B, np.int64)
  start_B = seqs.indptr_U1[user_B]
  pos_BxL = np.asarray(end_B, np.int64)[:, None] - length + np.arange(length)[None, :]
  ok = pos_BxL >= start_B[:, None]
  if seqs.items.size == 0:
    return np.full(pos_BxL.shape, PAD, np.int32)
  return np.where(ok, seqs.items[np.maximum(pos_BxL, 0)], PAD).astype(np.int32)


def online_history(train_user, train_item, test_user, test_item, test_time,
                   num_users: int) -> tuple[np.ndarray, np.ndarray]:
  """What a live system knows at each test interaction: the user's training items and their
  test items before it in the log (by time, ties by row order), as CSR (indptr [T + 1],
  items). This is what the exclude_history protocol excludes; the history *feature* is
  stricter (``ends``: only interactions at an earlier time)."""
  train_user = np.asarray(train_user, np.int64)
  test_user = np.asarray(test_user, np.int64)
  test_time = np.asarray(test_time)
  n_test = len(test_user)
  tr = sequences(train_user, train_item, np.zeros(len(train_user)), num_users)
  te = sequences(test_user, test_item, test_time, num_users)
  # Each test row's position in the test sequence order gives its earlier test items.
  order = np.argsort(_key(test_user, np.round(test_time).astype(np.int64), te.time_base,
                          te.time_span), kind="stable")
  rank = np.empty(n_test, np.int64)
  rank[order] = np.arange(n_test)
  earlier_end = rank  # earlier in (time, row) order: what happened before, in the log
  te_start = te.indptr_U1[test_user]
  tr_start, tr_end = tr.indptr_U1[test_user], tr.indptr_U1[test_user + 1]
  n_tr, n_te = tr_end - tr_start, np.maximum(earlier_end - te_start, 0)
  indptr = np.zeros(n_test + 1, np.int64)
  np.cumsum(n_tr + n_te, out=indptr[1:])
  # Gather both parts without a Python loop: for every output slot, its row and offset.
  row = np.repeat(np.arange(n_test), n_tr + n_te)
  offset = np.arange(indptr[-1]) - indptr[row]
  from_train = offset < n_tr[row]
  src = np.where(from_train, tr_start[row] + offset, te_start[row] + offset - n_tr[row])
  items = np.where(from_train, tr.items[np.minimum(src, max(len(tr.items) - 1, 0))]
                   if len(tr.items) else PAD,
                   te.items[np.minimum(src, max(len(te.items) - 1, 0))])
  return indptr, items.astype(np.int32)


def gather_windows(items_N, start_B, end_B, pos_L):
  """``windows`` on the device, inside a jitted step: ``pos_L`` is ``arange(L)`` (its
  length, a static shape, is the window length)."""
  pos_BxL = end_B[:, None] - pos_L.shape[0] + pos_L[None, :]
  ok = pos_BxL >= start_B[:, None]
  return jnp.where(ok, jnp.take(items_N, jnp.maximum(pos_BxL, 0)), PAD)
