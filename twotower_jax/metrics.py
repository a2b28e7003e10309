"""Full-corpus ranking metrics: every test interaction is ranked against ALL N candidates.

A test interaction is (query, index of the true candidate in 0..N-1). Its rank is
the number of candidates scoring STRICTLY higher than the true one (ties count in
its favour, as in TFRS `FactorizedTopK`): it is a hit at k iff `rank < k`.
Excluded candidates (e.g. the user's training items) are not counted; the true
candidate never counts against itself, even if it is listed as excluded.

Key layout of a run's metrics (see `evaluate_protocols`):
`<protocol>/<metric>` with protocol `include_seen` (no masking), `exclude_seen`
(the user's training items masked out before ranking) or, when the caller passes each
test interaction's online history (`history.online_history`), `exclude_history` (the
user's training items and their test items before this one masked out: what a live
system would not recommend again), e.g. `include_seen/hr_100`, `exclude_seen/ndcg_10`,
`exclude_history/mrr`, plus the TFRS aliases `top_{k}_accuracy` = `include_seen/hr_{k}`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax import arrays
from twotower_jax import index

DEFAULT_KS = (1, 5, 10, 50, 100)
DEFAULT_CHUNK_SIZE = 4096
PROTOCOLS = ("include_seen", "exclude_seen", "exclude_history")
_HIGHEST = jax.lax.Precision.HIGHEST

ScoreFn = Callable[[np.ndarray], np.ndarray]  # user_ids_B -> scores_BxN
# rows_B (positions among the test interactions) -> scores_BxN from each one's online history
HistoryScoreFn = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- checks


def _check_ks(ks: Sequence[int], n: int | None = None) -> tuple[int, ...]:
  ks = tuple(int(k) for k in ks)
  if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
    raise ValueError(f"ks={ks} must be distinct positive integers, e.g. ks=(1, 5, 10, 50, 100).")
  if n is not None and max(ks) > n:
    raise ValueError(
        f"ks={ks} asks for a top-{max(ks)} list but there are only N={n} candidates; "
        f"drop the ks above {n}.")
  return tuple(sorted(ks))


def check_indices(name: str, x: np.ndarray, n: int, n_name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"{name} must be a 1-D integer array, got shape {x.shape} dtype {x.dtype}; "
                     "map ids to indices 0..n-1 first.")
  if x.size and (x.min() < 0 or x.max() >= n):
    raise ValueError(f"{name} holds values in [{x.min()}, {x.max()}] but must lie in "
                     f"[0, {n_name}={n}); map ids to indices 0..{n_name}-1 first.")
  return x


def _check_exclude(exclude_BxE, b: int, n: int) -> np.ndarray | None:
  if exclude_BxE is None:
    return None
  e = np.asarray(exclude_BxE)
  if e.ndim != 2 or e.shape[0] != b or not np.issubdtype(e.dtype, np.integer):
    raise ValueError(f"exclude_BxE must be an integer array of shape [B={b}, E], got shape "
                     f"{e.shape} dtype {e.dtype}; pad rows with -1.")
  if e.size and (e.min() < -1 or e.max() >= n):
    raise ValueError(f"exclude_BxE holds values in [{e.min()}, {e.max()}]; use candidate "
                     f"indices in [0, N={n}) and -1 for padding.")
  return e


# ----------------------------------------------------------------------------- ranks


def _pad_rows(c_RxD: jax.Array, num: int) -> jax.Array:
  return jnp.pad(c_RxD, ((0, num - c_RxD.shape[0]), (0, 0)))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _true_ranks_jit(q_BxD, c_NxD, true_B, exclude_BxE, chunk_size):
  """Returns (ranks_B int32, any NaN score). See `true_ranks`."""
  n, d = c_NxD.shape
  b = q_BxD.shape[0]
  c_sz = chunk_size
  # The true scores come out of the SAME matmul op as the corpus scores (the first
  # `kt` chunks of the scan hold c[true_B]), so a candidate whose embedding equals
  # the true one's gets a bitwise-equal score and is not counted as higher. A
  # separate row-wise dot product rounds differently (observed ~1e-6 apart).
  kt, kc = -(-b // c_sz), -(-n // c_sz)
  c_true_KtxCxD = _pad_rows(c_NxD[true_B], kt * c_sz).reshape(kt, c_sz, d)
  c_KcxCxD = _pad_rows(c_NxD, kc * c_sz).reshape(kc, c_sz, d)
  chunks_KxCxD = jnp.concatenate([c_true_KtxCxD, c_KcxCxD])
  starts_K = jnp.concatenate([jnp.arange(kt), jnp.arange(kc)]) * c_sz
  is_true_K = jnp.arange(kt + kc) < kt
  rows_B = jnp.arange(b)
  cols_C = jnp.arange(c_sz)

  def body(carry, xs):
    t_B, count_B, nan = carry
    c_CxD, start, is_true = xs
    s_BxC = jnp.einsum("bd,cd->bc", q_BxD, c_CxD, precision=_HIGHEST)
    col_C = start + cols_C
    # True-chunk step: column j holds c[true_B[start + j]], i.e. row b's true score
    # sits at column b - start. Adding exact zeros leaves it bitwise unchanged.
    t_part_B = jnp.where(col_C[None, :] == rows_B[:, None], s_BxC, 0.0).sum(1)
    t_B = jnp.where(is_true, t_B + t_part_B, t_B)
    higher_BxC = ((s_BxC > t_B[:, None]) & (col_C[None, :] < n)
                  & (col_C[None, :] != true_B[:, None]))
    if exclude_BxE is not None:
      local_BxE = exclude_BxE - start
      ok_BxE = (exclude_BxE >= 0) & (local_BxE >= 0) & (local_BxE < c_sz)
      local_BxE = jnp.where(ok_BxE, local_BxE, c_sz)  # c_sz is out of bounds: dropped
      excl_BxC = jnp.zeros((b, c_sz), bool).at[rows_B[:, None], local_BxE].set(
          True, mode="drop")
      higher_BxC &= ~excl_BxC
    count_B = jnp.where(is_true, count_B, count_B + higher_BxC.sum(1, dtype=jnp.int32))
    valid_C = jnp.where(is_true, col_C < b, col_C < n)
    nan = nan | jnp.any(jnp.isnan(s_BxC) & valid_C[None, :])
    return (t_B, count_B, nan), None

  init = (jnp.zeros((b,), q_BxD.dtype), jnp.zeros((b,), jnp.int32), jnp.array(False))
  (_, ranks_B, nan), _ = jax.lax.scan(body, init, (chunks_KxCxD, starts_K, is_true_K))
  return ranks_B, nan


def true_ranks(q_BxD, c_NxD, true_B, *, exclude_BxE=None,
               chunk_size: int | None = None) -> np.ndarray:
  """Number of candidates scoring strictly higher (dot product) than the true one.

  Args:
    q_BxD: query embeddings.
    c_NxD: embeddings of ALL N candidates.
    true_B: index in [0, N) of each query's true candidate.
    exclude_BxE: optional candidate indices not to count (e.g. the user's training
      items), padded with -1. The true candidate is never counted either way.
    chunk_size: candidates scored at once; memory is O(B * chunk_size). Default
      4096; capped at N.

  Returns:
    ranks_B (np.int32). Jit-compiled per (B, N, D, E, chunk_size); matmuls run at
    full float32 precision (no TF32/bf16 passes on accelerators).

  Raises:
    ValueError on bad shapes/indices, or if any score is NaN.
  """
  q_BxD, c_NxD = jnp.asarray(q_BxD), jnp.asarray(c_NxD)
  if q_BxD.ndim != 2 or c_NxD.ndim != 2 or q_BxD.shape[1] != c_NxD.shape[1]:
    raise ValueError(f"q_BxD {q_BxD.shape} and c_NxD {c_NxD.shape} must be 2-D with the same "
                     "embedding size D; pass the query and candidate tower outputs.")
  b, n = q_BxD.shape[0], c_NxD.shape[0]
  true_B = check_indices("true_B", true_B, n, "N")
  if true_B.shape[0] != b:
    raise ValueError(f"true_B has {true_B.shape[0]} entries for B={b} queries; pass one true "
                     "candidate index per query.")
  exclude_BxE = _check_exclude(exclude_BxE, b, n)
  chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1 (or None for the default).")
  chunk_size = max(1, min(chunk_size, n))  # no padding beyond the corpus
  ranks_B, nan = _true_ranks_jit(
      q_BxD, c_NxD, jnp.asarray(true_B, jnp.int32),
      None if exclude_BxE is None else jnp.asarray(exclude_BxE, jnp.int32), chunk_size)
  if bool(nan):
    raise ValueError("Some query-candidate scores are NaN, so ranks would be meaningless; "
                     "check the embeddings for NaN (e.g. a diverged model or bad features).")
  return np.asarray(ranks_B)


def true_ranks_batched(q_BxD, c_NxD, true_B, *, exclude_BxE=None, batch_size: int = 1024,
                       chunk_size: int | None = None) -> np.ndarray:
  """`true_ranks` over query batches of `batch_size` (last one padded: one compile)."""
  q_BxD, true_B = np.asarray(q_BxD), np.asarray(true_B)
  b = q_BxD.shape[0]
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  if true_B.shape != (b,):
    raise ValueError(f"true_B has shape {true_B.shape}, expected ({b},): one index per query.")
  exclude_BxE = None if exclude_BxE is None else np.asarray(exclude_BxE)
  out = []
  for s in range(0, b, batch_size):
    m = min(batch_size, b - s)
    size = min(batch_size, b)
    ex = None if exclude_BxE is None else arrays.pad_rows(exclude_BxE[s:s + m], size, -1)
    r = true_ranks(arrays.pad_rows(q_BxD[s:s + m], size, 0), c_NxD,
                   arrays.pad_rows(true_B[s:s + m], size, 0), exclude_BxE=ex, chunk_size=chunk_size)
    out.append(r[:m])
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def _exclusion_mask(exclude_BxE: np.ndarray | None, b: int, n: int) -> np.ndarray:
  mask_BxN = np.zeros((b, n), bool)
  if exclude_BxE is not None:
    rows_BxE = np.broadcast_to(np.arange(b)[:, None], exclude_BxE.shape)
    ok_BxE = exclude_BxE >= 0
    mask_BxN[rows_BxE[ok_BxE], exclude_BxE[ok_BxE]] = True
  return mask_BxN


def true_ranks_from_scores(scores_BxN, true_B, exclude_BxE=None) -> np.ndarray:
  """`true_ranks` for a precomputed score matrix (numpy; baselines).

  NaN scores raise; -inf is allowed (e.g. a score function masking items itself).
  """
  scores_BxN = np.asarray(scores_BxN)
  if scores_BxN.ndim != 2:
    raise ValueError(f"scores_BxN must be 2-D [B, N], got shape {scores_BxN.shape}.")
  b, n = scores_BxN.shape
  true_B = check_indices("true_B", true_B, n, "N")
  if true_B.shape[0] != b:
    raise ValueError(f"true_B has {true_B.shape[0]} entries for B={b} score rows; pass one "
                     "true index per score row.")
  exclude_BxE = _check_exclude(exclude_BxE, b, n)
  if np.isnan(scores_BxN).any():
    raise ValueError("scores_BxN contains NaN, so ranks would be meaningless; fix the score "
                     "function (use -inf, not NaN, for candidates it rules out).")
  t_B = scores_BxN[np.arange(b), true_B]
  higher_BxN = scores_BxN > t_B[:, None]
  higher_BxN &= ~_exclusion_mask(exclude_BxE, b, n)  # the true one is never higher than itself
  return higher_BxN.sum(1).astype(np.int32)


# ----------------------------------------------------------------------------- metrics


def ranking_metrics(ranks_B, user_ids_B, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """Ranking metrics from full-corpus ranks (hit at k iff rank < k).

  Per interaction (mean over test interactions):
    hr_k: hit rate, = TFRS top-k categorical accuracy.
    ndcg_k: 1 / log2(rank + 2) if rank < k else 0 (one relevant item per query).
    mrr: 1 / (rank + 1).
  Per user (each user's interactions averaged first, then the mean over users, so
  every user weighs the same):
    user/hr_k: fraction of users with AT LEAST ONE test item ranked < k (the usual
      per-user HitRate@k; the plain average of a user's hits is recall_k).
    recall_k: fraction of a user's test items ranked < k, averaged over users.
    user/ndcg_k: mean over a user's test items of the per-interaction ndcg_k,
      averaged over users. Chosen over the single-list multi-relevant NDCG
      (DCG / ideal DCG) because a user's items may be ranked by different queries
      (e.g. when time is a query feature), so their ranks need not come from one
      list; this stays in [0, 1] in every case. Other test items of the same user
      count as competitors in each rank, so a user with several test items cannot
      reach 1.
    user/mrr: mean over a user's test items of 1 / (rank + 1), averaged over users.
  """
  ranks_B = np.asarray(ranks_B)
  user_ids_B = np.asarray(user_ids_B)
  ks = _check_ks(ks)
  if ranks_B.ndim != 1 or ranks_B.shape != user_ids_B.shape:
    raise ValueError(f"ranks_B {ranks_B.shape} and user_ids_B {user_ids_B.shape} must be 1-D "
                     "of the same length: one rank and one user per test interaction.")
  if ranks_B.size == 0:
    raise ValueError("No test interactions to evaluate; check the split (empty test set).")
  if not np.issubdtype(ranks_B.dtype, np.integer) or ranks_B.min() < 0:
    raise ValueError("ranks_B must be non-negative integers (candidates scoring higher).")
  r_B = ranks_B.astype(np.float64)
  _, inv_B = np.unique(user_ids_B, return_inverse=True)
  inv_B = inv_B.reshape(-1)
  n_U = np.bincount(inv_B)

  def user_mean(x_B):
    return float(np.mean(np.bincount(inv_B, weights=x_B, minlength=n_U.size) / n_U))

  rr_B = 1.0 / (r_B + 1.0)
  out = {"mrr": float(rr_B.mean()), "user/mrr": user_mean(rr_B)}
  gain_B = 1.0 / np.log2(r_B + 2.0)
  for k in ks:
    hit_B = (ranks_B < k).astype(np.float64)
    ndcg_B = hit_B * gain_B
    out[f"hr_{k}"] = float(hit_B.mean())
    out[f"ndcg_{k}"] = float(ndcg_B.mean())
    out[f"user/hr_{k}"] = float(np.mean(np.bincount(inv_B, weights=hit_B) > 0))
    out[f"recall_{k}"] = user_mean(hit_B)
    out[f"user/ndcg_{k}"] = user_mean(ndcg_B)
  return out


def _topk_stats(topk_idx_Bxk, item_counts_N, weight_B=None):
  """Mergeable summary of top-k lists: (first list position of each item, k if never;
  weighted sum of training counts at each list position; weighted number of valid
  entries there). weight_B: how many interactions each list stands for (default 1)."""
  idx_Bxk = np.asarray(topk_idx_Bxk)
  counts_N = np.asarray(item_counts_N)
  n, kmax = counts_N.shape[0], idx_Bxk.shape[1]
  w_Bx1 = np.ones((idx_Bxk.shape[0], 1)) if weight_B is None else np.asarray(weight_B)[:, None]
  first_N = np.full((n,), kmax, np.int64)
  valid_Bxk = idx_Bxk >= 0
  pos_Bxk = np.broadcast_to(np.arange(kmax), idx_Bxk.shape)
  np.minimum.at(first_N, idx_Bxk[valid_Bxk], pos_Bxk[valid_Bxk])
  pop_Bxk = np.where(valid_Bxk, counts_N[np.where(valid_Bxk, idx_Bxk, 0)], 0)
  return first_N, (pop_Bxk * w_Bx1).sum(0), (valid_Bxk * w_Bx1).sum(0)


def _topk_finish(first_N, pop_k, n_k, ks) -> dict[str, float]:
  out = {}
  pop_cum, n_cum = np.cumsum(pop_k), np.cumsum(n_k)
  for k in ks:
    out[f"coverage_{k}"] = float(np.mean(first_N < k))
    out[f"avg_pop_{k}"] = float(pop_cum[k - 1] / n_cum[k - 1]) if n_cum[k - 1] else float("nan")
  return out


def coverage_and_popularity(topk_idx_Bxk, item_counts_N,
                            ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """Catalogue coverage and popularity of the recommended (top-k) lists.

  Args:
    topk_idx_Bxk: candidate indices of each top-k list, best first; -1 = no item.
    item_counts_N: training interaction count of each candidate.
    ks: cut-offs, each <= k.

  Returns:
    coverage_k: fraction of the N candidates in at least one top-k list.
    avg_pop_k: mean training count over all recommended (list, item) entries.
  """
  idx_Bxk = np.asarray(topk_idx_Bxk)
  counts_N = np.asarray(item_counts_N)
  if idx_Bxk.ndim != 2 or counts_N.ndim != 1:
    raise ValueError(f"topk_idx_Bxk must be 2-D and item_counts_N 1-D, got {idx_Bxk.shape} and "
                     f"{counts_N.shape}.")
  ks = _check_ks(ks)
  if max(ks) > idx_Bxk.shape[1]:
    raise ValueError(f"ks={ks} needs top-{max(ks)} lists but topk_idx_Bxk has only "
                     f"{idx_Bxk.shape[1]} columns; compute top-{max(ks)} lists.")
  if idx_Bxk.size and (idx_Bxk.min() < -1 or idx_Bxk.max() >= counts_N.shape[0]):
    raise ValueError(f"topk_idx_Bxk values must lie in [-1, N={counts_N.shape[0]}).")
  return _topk_finish(*_topk_stats(idx_Bxk, counts_N), ks)


def aggregate_seeds(metric_dicts: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Mean and standard deviation over runs (seeds) of each metric.

  Returns `<key>/mean` and `<key>/std`; std is the sample standard deviation
  (ddof=1), NaN for a single run. Every dict must have the same numeric keys.
  """
  if not metric_dicts:
    raise ValueError("aggregate_seeds got no runs; pass at least one metrics dict.")
  keys = set(metric_dicts[0])
  for i, m in enumerate(metric_dicts):
    if set(m) != keys:
      diff = sorted(keys.symmetric_difference(m))
      raise ValueError(f"Run {i} has different metric keys from run 0 (e.g. {diff[:5]}); "
                       "aggregate only runs evaluated with the same ks and protocols.")
  out = {}
  for key in sorted(keys):
    vals = [m[key] for m in metric_dicts]
    if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
               for v in vals):
      raise ValueError(f"Metric {key!r} has non-numeric values {vals[:3]}; drop metadata keys "
                       "(config, split, ...) before aggregating.")
    x = np.asarray(vals, np.float64)
    out[f"{key}/mean"] = float(x.mean())
    out[f"{key}/std"] = float(x.std(ddof=1)) if x.size > 1 else float("nan")
  return out


# ----------------------------------------------------------------------------- protocols


def seen_csr(user_idx, item_idx, num_users: int) -> tuple[np.ndarray, np.ndarray]:
  """CSR of each user's distinct (training) items: user u's are items[indptr[u]:indptr[u+1]]."""
  user_idx = check_indices("user_idx", user_idx, num_users, "num_users")
  item_idx = np.asarray(item_idx)
  if item_idx.shape != user_idx.shape or not np.issubdtype(item_idx.dtype, np.integer):
    raise ValueError(f"item_idx {item_idx.shape} must be integer and match user_idx "
                     f"{user_idx.shape}.")
  if item_idx.size and item_idx.min() < 0:
    raise ValueError("item_idx must be non-negative candidate indices.")
  pairs = np.unique(np.stack([user_idx.astype(np.int64), item_idx.astype(np.int64)], 1), axis=0)
  indptr = np.zeros((num_users + 1,), np.int64)
  np.cumsum(np.bincount(pairs[:, 0], minlength=num_users), out=indptr[1:])
  return indptr, pairs[:, 1].astype(np.int32)


def gather_csr(indptr, items, rows_B, width: int) -> np.ndarray:
  """Rows of a CSR as a [B, width] int32 array padded with -1 (vectorised)."""
  start_B = indptr[rows_B]
  len_B = indptr[rows_B + 1] - start_B
  if len_B.size and len_B.max() > width:
    raise ValueError(f"A row has {len_B.max()} entries but width={width}; pass "
                     f"width >= {len_B.max()}.")
  j_W = np.arange(width)
  ok_BxW = j_W[None, :] < len_B[:, None]
  pos_BxW = np.where(ok_BxW, start_B[:, None] + j_W[None, :], 0)
  if items.size == 0:
    return np.full((len(rows_B), width), -1, np.int32)
  return np.where(ok_BxW, items[pos_BxW], -1).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_masked(scores_BxN, mask_BxN, k):
  s_BxN = jnp.where(mask_BxN, -jnp.inf, scores_BxN)
  _, idx_Bxk = jax.lax.top_k(s_BxN, k)  # equal scores: lower index first
  taken_Bxk = jnp.take_along_axis(mask_BxN, idx_Bxk, 1)
  return jnp.where(taken_Bxk, -1, idx_Bxk)


def _check_csr(name: str, indptr, items, rows: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """A CSR of ``rows`` rows of candidate indices in [0, n), checked."""
  indptr, items = np.asarray(indptr), np.asarray(items)
  if (indptr.ndim != 1 or indptr.shape[0] != rows + 1
      or not np.issubdtype(indptr.dtype, np.integer)):
    raise ValueError(f"{name}_indptr must be a 1-D integer array of length {rows + 1} (one row "
                     f"per test interaction, plus one), got shape {indptr.shape} dtype "
                     f"{indptr.dtype}; build it with history.online_history.")
  if items.ndim != 1 or (items.size and not np.issubdtype(items.dtype, np.integer)):
    raise ValueError(f"{name}_items must be a 1-D integer array, got shape {items.shape} dtype "
                     f"{items.dtype}.")
  if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != items.shape[0]:
    raise ValueError(f"{name}_indptr must start at 0, never decrease and end at "
                     f"len({name}_items)={items.shape[0]}; build it with "
                     "history.online_history.")
  if items.size and (items.min() < 0 or items.max() >= n):
    raise ValueError(f"{name}_items holds values in [{items.min()}, {items.max()}] but must be "
                     f"candidate indices in [0, N={n}).")
  return indptr, items


def _resolve_protocols(protocols, have_history: bool) -> tuple[str, ...]:
  """The protocols to compute, in ``PROTOCOLS`` order."""
  if protocols is None:
    return PROTOCOLS if have_history else PROTOCOLS[:2]
  wanted = [protocols] if isinstance(protocols, str) else list(protocols)
  unknown = [p for p in wanted if p not in PROTOCOLS]
  if unknown or not wanted:
    raise ValueError(f"protocols={wanted} must be a non-empty subset of {PROTOCOLS}.")
  if "exclude_history" in wanted and not have_history:
    raise ValueError("protocol 'exclude_history' needs each test interaction's online history: "
                     "pass history_indptr and history_items (history.online_history).")
  return tuple(p for p in PROTOCOLS if p in wanted)


def _check_protocol_inputs(true_B, user_ids_B, seen_indptr, seen_items, item_counts_N, ks,
                           q_BxD, c_NxD, score_fn, batch_size):
  """``evaluate_protocols``' arguments, checked and as arrays."""
  use_embeddings = q_BxD is not None or c_NxD is not None
  if (score_fn is not None) == use_embeddings or (
      use_embeddings and (q_BxD is None or c_NxD is None)):
    raise ValueError("Pass either both q_BxD and c_NxD (model embeddings) or score_fn "
                     "(a baseline), not both and not neither.")
  counts_N = np.asarray(item_counts_N)
  n = counts_N.shape[0]
  if counts_N.ndim != 1:
    raise ValueError(f"item_counts_N must be 1-D (one training count per candidate), got "
                     f"{counts_N.shape}.")
  if c_NxD is not None:
    c_NxD = jnp.asarray(c_NxD)
    if c_NxD.shape[0] != n:
      raise ValueError(f"c_NxD has {c_NxD.shape[0]} candidates but item_counts_N has {n}; "
                       "both must cover the same full corpus.")
  ks = _check_ks(ks, n)
  true_B = check_indices("true_B", true_B, n, "N")
  seen_indptr = np.asarray(seen_indptr)
  seen_items = np.asarray(seen_items)
  user_ids_B = check_indices("user_ids_B", user_ids_B, seen_indptr.shape[0] - 1,
                             "num_users (len(seen_indptr) - 1)")
  if user_ids_B.shape != true_B.shape:
    raise ValueError(f"user_ids_B {user_ids_B.shape} and true_B {true_B.shape} must match: "
                     "one user and one true candidate per test interaction.")
  if q_BxD is not None and np.shape(q_BxD)[0] != true_B.shape[0]:
    raise ValueError(f"q_BxD has {np.shape(q_BxD)[0]} rows for {true_B.shape[0]} test "
                     "interactions; pass one query embedding per test interaction.")
  if seen_items.size and (seen_items.min() < 0 or seen_items.max() >= n):
    raise ValueError(f"seen_items must be candidate indices in [0, N={n}).")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  return true_B, user_ids_B, seen_indptr, seen_items, counts_N, c_NxD, ks


def _checked_scores(scores, rows: int, n: int, name: str, per: str) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.shape != (rows, n):
    raise ValueError(f"{name} returned shape {scores.shape}, expected ({rows}, {n}): "
                     f"one row of N candidate scores per {per} passed.")
  if np.isnan(scores).any():
    raise ValueError(f"{name} returned NaN scores; fix it (use -inf, not NaN, for "
                     "candidates it rules out).")
  return scores


def _score_fn_batch(score_fn, history_score_fn, rows_b, users_b, true_b, seen_indptr,
                    seen_items, hist_bxE, protocols, size, counts_N, kmax):
  """Ranks and top-k statistics of a batch under each protocol, from score functions.

  For include_seen and exclude_seen each distinct user of the batch is scored once
  (``score_fn``) and its top-k list is weighted by its number of interactions in the
  batch. exclude_history ranks each interaction on its own (its exclusions are its own):
  scored by ``history_score_fn(rows_b)`` if given, else by its user's scores; its top-k
  lists are padded to ``size`` rows (one compiled shape).
  """
  n = counts_N.shape[0]
  m = users_b.shape[0]
  user_protocols = [p for p in protocols if p != "exclude_history"]
  out = {}
  if user_protocols or history_score_fn is None:
    uniq_u, inv_b = np.unique(users_b, return_inverse=True)
    inv_b = inv_b.reshape(-1)
    u = uniq_u.shape[0]
    scores_uxN = _checked_scores(score_fn(uniq_u), u, n, "score_fn", "user")
    seen_len = np.diff(seen_indptr)[uniq_u]
    excl_uxE = gather_csr(seen_indptr, seen_items, uniq_u, max(1, int(seen_len.max())))
    weight_u = np.bincount(inv_b, minlength=u)
    t_b = scores_uxN[inv_b, true_b]
    bucket = arrays.size_bucket(u)
    for p in user_protocols:
      mask_uxN = _exclusion_mask(excl_uxE if p == "exclude_seen" else None, u, n)
      higher_bxN = (scores_uxN[inv_b] > t_b[:, None]) & ~mask_uxN[inv_b]
      topk_uxk = np.asarray(_top_k_masked(arrays.pad_rows(scores_uxN, bucket, 0),
                                          arrays.pad_rows(mask_uxN, bucket, False), kmax))[:u]
      # The true one is never higher than itself.
      out[p] = (higher_bxN.sum(1), _topk_stats(topk_uxk, counts_N, weight_u))
  if "exclude_history" in protocols:
    if history_score_fn is not None:
      s_bxN = _checked_scores(history_score_fn(rows_b), m, n, "history_score_fn",
                              "test interaction")
    else:
      s_bxN = scores_uxN[inv_b]
    mask_bxN = _exclusion_mask(hist_bxE, m, n)
    t_b = s_bxN[np.arange(m), true_b]
    higher_bxN = (s_bxN > t_b[:, None]) & ~mask_bxN
    topk_bxk = np.asarray(_top_k_masked(arrays.pad_rows(s_bxN, size, 0),
                                        arrays.pad_rows(mask_bxN, size, False), kmax))[:m]
    out["exclude_history"] = (higher_bxN.sum(1), _topk_stats(topk_bxk, counts_N))
  return out


def _embedding_batch(q_bxD, c_NxD, true_b, excl, size, counts_N, kmax, chunk_size):
  """Ranks and top-k statistics of a batch under each protocol (``excl``: protocol ->
  [b, E] exclusions or None), from embeddings (the batch padded to ``size`` rows: one
  compiled shape)."""
  m = q_bxD.shape[0]
  q_bxD = arrays.pad_rows(q_bxD, size, 0)
  true_p = arrays.pad_rows(true_b, size, 0)
  out = {}
  for p, ex in excl.items():
    ex_p = None if ex is None else arrays.pad_rows(ex, size, -1)
    ranks_b = true_ranks(q_bxD, c_NxD, true_p, exclude_BxE=ex_p, chunk_size=chunk_size)[:m]
    _, topk = index.exact_top_k(q_bxD, c_NxD, kmax, exclude=ex_p)
    out[p] = (ranks_b, _topk_stats(np.asarray(topk)[:m], counts_N))
  return out


def evaluate_protocols(true_B, user_ids_B, seen_indptr, seen_items, item_counts_N, *,
                       ks: Sequence[int] = DEFAULT_KS, q_BxD=None, c_NxD=None,
                       score_fn: ScoreFn | None = None, history_indptr=None,
                       history_items=None, history_score_fn: HistoryScoreFn | None = None,
                       protocols: Sequence[str] | None = None, batch_size: int = 1024,
                       chunk_size: int | None = None) -> dict[str, float]:
  """Every protocol's metrics for a model (q_BxD, c_NxD) or a score function.

  Args:
    true_B: true candidate index of each test interaction.
    user_ids_B: user index of each test interaction (row of the seen CSR).
    seen_indptr, seen_items: each user's training items as CSR (see `seen_csr`).
    item_counts_N: training count of each candidate (length N).
    ks: cut-offs.
    q_BxD, c_NxD: query embedding of each test interaction and embeddings of all
      N candidates (score = dot product); or
    score_fn: user_ids_b -> scores_bxN (numpy) for a batch of test users.
    history_indptr, history_items: each test interaction's online history as CSR
      with B rows (`history.online_history`: the user's training items and their test
      items strictly before it). Given, the `exclude_history` protocol is computed too:
      each interaction ranked against all candidates but its own history.
    history_score_fn: optional, with score_fn: rows_b (positions in 0..B-1 of test
      interactions) -> scores_bxN, the scores the baseline gives each of those
      interactions from its online history; used for `exclude_history` only (default:
      score_fn of their users).
    protocols: which protocols to compute (default: include_seen, exclude_seen, and
      exclude_history when the history is given).
    batch_size: test interactions scored at once.
    chunk_size: candidates scored at once by `true_ranks` in the embedding path
      (top-k lists come from `index.exact_top_k` with its own tuned sizes).

  Returns:
    `<protocol>/<metric>` for each protocol with the `ranking_metrics` and
    `coverage_and_popularity` metrics, plus `top_{k}_accuracy` (= `include_seen/hr_{k}`)
    when include_seen is computed. Top-k lists are one per test interaction (a user
    with several test interactions contributes several lists to avg_pop_k). Every
    batch has the same shapes (exclusion lists padded to one width, the longest seen
    list or history), so each jitted function compiles once.
  """
  true_B, user_ids_B, seen_indptr, seen_items, counts_N, c_NxD, ks = _check_protocol_inputs(
      true_B, user_ids_B, seen_indptr, seen_items, item_counts_N, ks, q_BxD, c_NxD, score_fn,
      batch_size)
  have_history = history_indptr is not None or history_items is not None
  if have_history and (history_indptr is None or history_items is None):
    raise ValueError("Pass both history_indptr and history_items (history.online_history), "
                     "or neither.")
  if history_score_fn is not None and (score_fn is None or not have_history):
    raise ValueError("history_score_fn goes with score_fn (a baseline) and the online "
                     "history (history_indptr, history_items).")
  protocols = _resolve_protocols(protocols, have_history)
  b_total, n = true_B.shape[0], counts_N.shape[0]
  if have_history:
    history_indptr, history_items = _check_csr("history", history_indptr, history_items,
                                               b_total, n)
  kmax = max(ks)
  # One exclusion width for every batch and both excluding protocols keeps a single
  # compiled shape.
  lens = []
  if "exclude_seen" in protocols:
    lens.append(np.diff(seen_indptr)[user_ids_B])
  if "exclude_history" in protocols:
    lens.append(np.diff(history_indptr))
  width = max([1] + [int(x.max()) for x in lens if x.size])

  ranks = {p: np.zeros((b_total,), np.int32) for p in protocols}
  stats = {p: None for p in protocols}
  size = min(batch_size, b_total)
  # Score functions score users, not interactions: visit the interactions grouped by
  # user and score each distinct user of a batch once (its top-k list is weighted by
  # its number of interactions in the batch).
  order_B = np.argsort(user_ids_B, kind="stable") if score_fn is not None else None
  for s in range(0, b_total, batch_size):
    m = min(batch_size, b_total - s)
    rows_b = np.arange(s, s + m) if order_B is None else order_B[s:s + m]
    users_b, true_b = user_ids_B[rows_b], true_B[rows_b]
    hist_bxE = (gather_csr(history_indptr, history_items, rows_b, width)
                if "exclude_history" in protocols else None)
    if score_fn is not None:
      batch = _score_fn_batch(score_fn, history_score_fn, rows_b, users_b, true_b,
                              seen_indptr, seen_items, hist_bxE, protocols, size, counts_N,
                              kmax)
    else:
      excl = {"include_seen": None, "exclude_history": hist_bxE,
              "exclude_seen": (gather_csr(seen_indptr, seen_items, users_b, width)
                               if "exclude_seen" in protocols else None)}
      batch = _embedding_batch(np.asarray(q_BxD[s:s + m]), c_NxD, true_b,
                               {p: excl[p] for p in protocols}, size, counts_N, kmax,
                               chunk_size)
    for p, (ranks_b, stats_b) in batch.items():
      ranks[p][rows_b] = ranks_b
      stats[p] = _merge(stats[p], stats_b)

  out = {}
  for p in protocols:
    for key, val in ranking_metrics(ranks[p], user_ids_B, ks).items():
      out[f"{p}/{key}"] = val
    for key, val in _topk_finish(*stats[p], ks).items():
      out[f"{p}/{key}"] = val
  if "include_seen" in protocols:
    for k in ks:
      out[f"top_{k}_accuracy"] = out[f"include_seen/hr_{k}"]
  return out


def _merge(acc, new):
  if acc is None:
    return new
  return np.minimum(acc[0], new[0]), acc[1] + new[1], acc[2] + new[2]
