"""What each user did before: interactions sorted by (user, time) once, windows gathered by
position. Linear memory: no [N, L] matrix is ever built for all interactions.

* ``Sequences``: every interaction of a set (training, or training plus test) sorted by
  user, then time, then row, as one CSR over users.
* ``ends(seqs, user_B, time_B)``: for each query, the position in ``seqs`` just past the
  user's last interaction strictly before ``time_B`` (a binary search on one combined
  (user, time) key), so its history is ``seqs.items[start_B:ends_B]``.
* ``windows``: the last L items of those histories as a [B, L] array, most recent last,
  padded with -1 on the left (``positions``: the same as positions in ``seqs``, to gather
  the side columns and times of those interactions); ``online_history``: the whole history
  of each test interaction that a live system would know, as CSR.
* ``time_since``: the per-position time-since input (log1p of the days between each history
  item and the query, normalized), the same formula on the host (numpy) and on the device.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

PAD = -1
SIDE_SUFFIX = "_side"  # model input: a history's per-position side columns [B, L, S]
TIME_SINCE_SUFFIX = "_time_since"  # model input: a history's per-position time since [B, L]


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
  side: np.ndarray | None = None  # float32 [N, S] side columns of each interaction, or None

  @property
  def num_users(self) -> int:
    return len(self.indptr_U1) - 1


def _key(user, time, base: int, span: int) -> np.ndarray:
  return np.asarray(user, np.int64) * span + (np.asarray(time, np.int64) - base)


def sequences(user_N, item_N, time_N, num_users: int, side_NxS=None) -> Sequences:
  """The interactions (``user_N`` in 0..num_users-1) sorted by (user, time, row);
  ``side_NxS``: values of each interaction carried along (``Sequences.side``)."""
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
  side = None if side_NxS is None else np.asarray(side_NxS, np.float32)[order]
  return Sequences(indptr_U1=indptr, items=np.asarray(item_N, np.int32)[order],
                   times=time_N[order], keys=keys[order], time_base=base, time_span=span,
                   side=side)


def ends(seqs: Sequences, user_B, time_B) -> np.ndarray:
  """Position just past each user's last interaction strictly before ``time_B``."""
  t = np.clip(np.asarray(np.round(np.asarray(time_B, np.float64)), np.int64), seqs.time_base,
              seqs.time_base + seqs.time_span - 1)
  return np.searchsorted(seqs.keys, _key(user_B, t, seqs.time_base, seqs.time_span),
                         side="left").astype(np.int64)


def positions(seqs: Sequences, user_B, end_B, length: int) -> np.ndarray:
  """[B, L] positions in ``seqs`` of the last ``length`` interactions before ``end_B`` of
  each user, most recent last, -1 on the left where the history is shorter."""
  user_B = np.asarray(user_B, np.int64)
  start_B = seqs.indptr_U1[user_B]
  pos_BxL = np.asarray(end_B, np.int64)[:, None] - length + np.arange(length)[None, :]
  return np.where(pos_BxL >= start_B[:, None], pos_BxL, PAD)


def take(values_N: np.ndarray, pos_BxL: np.ndarray, fill) -> np.ndarray:
  """``values_N`` at ``pos_BxL`` (from ``positions``), ``fill`` where it is -1."""
  if len(values_N) == 0:
    return np.full(pos_BxL.shape + values_N.shape[1:], fill, values_N.dtype)
  got = values_N[np.maximum(pos_BxL, 0)]
  ok = (pos_BxL >= 0).reshape(pos_BxL.shape + (1,) * (values_N.ndim - 1))
  return np.where(ok, got, fill).astype(values_N.dtype)


def windows(seqs: Sequences, user_B, end_B, length: int) -> np.ndarray:
  """[B, L] the last ``length`` items before ``end_B`` of each user, most recent last,
  -1 on the left where the history is shorter."""
  return take(seqs.items, positions(seqs, user_B, end_B, length), PAD).astype(np.int32)


SECONDS_PER_DAY = 86400.0


def time_since(query_time_B, item_time_BxL, valid_BxL, mean: float, std: float, xp=np):
  """[B, L] float32: log1p of the days from each history item to its query, normalized by
  ``mean`` and ``std`` (fitted on training windows); 0 at padding. ``xp``: numpy on the
  host, jax.numpy on the device (times as offsets from one base there)."""
  seconds = xp.maximum(query_time_B[:, None] - item_time_BxL, 0).astype(xp.float32)
  value = (xp.log1p(seconds / xp.float32(SECONDS_PER_DAY)) - xp.float32(mean)) / xp.float32(std)
  return xp.where(valid_BxL, value, xp.float32(0)).astype(xp.float32)


def time_since_stats(seqs: Sequences, user_N, time_N, end_N, length: int,
                     sample: int = 20_000, seed: int = 0) -> tuple[float, float]:
  """Mean and standard deviation of log1p(days since) over the windows of (a seeded sample
  of at most ``sample``) training examples: the normalization of ``time_since``."""
  n = len(user_N)
  rows = np.arange(n) if n <= sample else np.sort(
      np.random.default_rng(seed).choice(n, sample, replace=False))
  pos = positions(seqs, np.asarray(user_N)[rows], np.asarray(end_N)[rows], length)
  q = np.round(np.asarray(time_N, np.float64)[rows]).astype(np.int64)
  v = time_since(q, take(seqs.times, pos, 0), pos >= 0, 0.0, 1.0)[pos >= 0]
  if v.size == 0:
    return 0.0, 1.0
  return float(v.mean()), float(max(v.std(), 1e-3))


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


def gather_extras(name: str, h, start_B, end_B, time_B):
  """The per-position side columns (``name`` + SIDE_SUFFIX, [B, L, S]) and time since
  (``name`` + TIME_SINCE_SUFFIX, [B, L]) of the same windows on the device, from the
  history's entry ``h`` of the device data ("side", "times", "time_stats"); ``time_B``: the
  queries' times as offsets like "times". Empty when ``h`` holds neither."""
  out = {}
  pos_L = h["pos_L"]
  pos_BxL = end_B[:, None] - pos_L.shape[0] + pos_L[None, :]
  ok_BxL = pos_BxL >= start_B[:, None]
  safe_BxL = jnp.maximum(pos_BxL, 0)
  if "side" in h:
    out[name + SIDE_SUFFIX] = jnp.where(ok_BxL[..., None], jnp.take(h["side"], safe_BxL, axis=0), 0.0)
  if "times" in h:
    out[name + TIME_SINCE_SUFFIX] = time_since(time_B, jnp.take(h["times"], safe_BxL), ok_BxL,
                                        h["time_stats"][0], h["time_stats"][1], xp=jnp)
  return out
