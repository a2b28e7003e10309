"""Exact top-k retrieval by dot product, without sorting every score.

`exact_top_k` scores candidates in tiles and selects in two passes:

1. Pass 1 (one scan over the candidates). Each tile of candidates is scored
   against all queries and reduced at once to *block maxima* (the max score of
   each run of `block_size` consecutive candidates); on CPU, XLA fuses the dot
   and the max into one kernel, so the scores never reach memory. After every
   `chunk_size` candidates, their block maxima are merged into a running top-k1
   of blocks per query (one `lax.top_k` over k1 + chunk/block values per query).
2. Pass 2. The candidates of each query's k1 blocks are gathered, rescored,
   masked (exclusions, allow-list, padding), and the top-k is taken among them.

Why it is exact: order candidates by (score desc, index asc) and blocks by
their best candidate. The k best candidates lie in at most k blocks, and every
block holding one of them ranks among the k best blocks. Blocks are contiguous,
so among equal maxima the block with the smaller index holds the smaller
candidate index, which is what `lax.top_k` (smaller position first on ties)
picks. Exclusions are applied in pass 2 only, so pass 1 keeps k1 = k + E blocks
(E = exclusions per query): at most E blocks are touched by exclusions, and the
other k of those k1 blocks already outrank every block left out.

Ties are broken like a stable sort of -scores: equal scores put the smaller
candidate index first (-0.0 and +0.0 count as equal). Embeddings must be
finite (NaN scores have no place in the order); `BruteForceIndex` checks this.

Scores are float32 dot products (bfloat16 candidates are upcast exactly).
Pass 1 and pass 2 compute the same dot products with different kernels, which
may round differently in the last bit; results can then differ from a float64
reference only among candidates whose scores lie within that rounding of the
k-th score.

Memory beyond the inputs: B x tile scores (never materialised on CPU), a
B x chunk/block buffer of block maxima, the B x k1 running blocks, and pass 2's
gathered rows (split over query tiles to stay under ~32 MiB on CPU). N is never
padded: the last partial tile is the only candidate copy (f32). On CPU,
bfloat16 candidates are copied once as uint16 bits (see `_f32`).

Measured figures: BENCHMARKS.md ("Exact top-k index").
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from twotower_jax.arrays import KeyIndex

Array = jax.Array
ExcludeArg = Any  # [B, E] int array with -1 padding, or (indptr_B1, indices) CSR.

# Sizes per backend: block (candidates per block max), tile (candidates scored
# at once: at most B x tile scores exist at any time) and chunk (candidates per
# merge into the running top-k1 blocks; a B x chunk/block buffer of block
# maxima). Measured on 2 CPU cores, see BENCHMARKS.md ("Exact top-k index").
_SIZES = {
  # XLA:CPU fuses each tile's dot and block max into one YNNPACK kernel, so the
  # B x tile scores never reach memory; tiles of 2,048 and 4,096 ran alike,
  # 1,024 slower. Blocks of 32 balance the merges (lax.top_k on CPU is a
  # single-threaded partial sort, ~4 ns per block maximum) against pass 2
  # (gathering k1 x block rows per query): 16 ran slower at 1M candidates,
  # 64 slower at 100K, both alike otherwise. Chunks of 2^17..2^20 ran alike.
  "cpu": {"block": 32, "tile": 2048, "chunk": 1 << 18},
  # Not measured yet. On GPU XLA writes each tile's scores to memory before the
  # max, so tiles are large to amortise launches; lax.top_k with k > 16 runs as
  # a sort there, so blocks are larger to shrink what gets sorted.
  "gpu": {"block": 128, "tile": 1 << 15, "chunk": 1 << 21},
}
# Bytes of gathered candidate rows per pass-2 step: queries are rescored in
# tiles under it. On CPU, tiles of 8-64 queries (k1=100, block=32, D=32) ran
# ~1.5x faster than 128 or more (the gathered rows stay in cache).
_GATHER_BYTES = {"cpu": 8 << 20, "gpu": 1 << 30}
_NEG_INF = float("-inf")


def _backend() -> str:
  return "cpu" if jax.default_backend() == "cpu" else "gpu"


def default_sizes(backend: str | None = None) -> dict[str, int]:
  """Default {'block', 'tile', 'chunk'} sizes for a backend ('cpu' or 'gpu')."""
  return dict(_SIZES[backend or _backend()])


# ----------------------------------------------------------------------------
# Input helpers.


def csr_to_padded(indptr_B1: Any, indices: Any) -> np.ndarray:
  """CSR rows (`indptr` of length B+1, `indices`) -> [B, E] int64, -1 padded.

  E is the longest row (at least 1). Needs concrete (non-traced) arrays.
  """
  try:
    indptr = np.asarray(indptr_B1)
    indices = np.asarray(indices)
  except jax.errors.TracerArrayConversionError as e:
    raise TypeError(
      "CSR exclusions need concrete arrays, but got traced values (inside jit). "
      "Convert them outside jit with csr_to_padded(indptr, indices) and pass the "
      "padded [B, E] array instead."
    ) from e
  if indptr.ndim != 1 or indptr.size < 1 or indices.ndim != 1:
    raise ValueError(
      f"CSR exclusions need a 1-D indptr of length B+1 and 1-D indices; got shapes "
      f"{indptr.shape} and {indices.shape}. Pass (indptr_B1, indices)."
    )
  if not np.issubdtype(indptr.dtype, np.integer) or (
    indices.size and not np.issubdtype(indices.dtype, np.integer)
  ):
    raise TypeError(
      f"CSR exclusions must be integer arrays; got {indptr.dtype} and {indices.dtype}. "
      "Cast them with .astype(np.int64)."
    )
  lengths = np.diff(indptr)
  if indptr[0] != 0 or np.any(lengths < 0) or indptr[-1] != indices.size:
    raise ValueError(
      "CSR indptr must start at 0, be non-decreasing and end at len(indices) "
      f"({indices.size}); got indptr[0]={indptr[0]}, indptr[-1]={indptr[-1]}. "
      "Build it as np.concatenate([[0], np.cumsum(row_lengths)])."
    )
  num_rows = indptr.size - 1
  width = max(1, int(lengths.max(initial=0)))
  out = np.full((num_rows, width), -1, np.int64)
  rows = np.repeat(np.arange(num_rows), lengths)
  cols = np.arange(indices.size) - np.repeat(indptr[:-1], lengths)
  out[rows, cols] = indices
  return out


def dedupe_ids(ids_N: Any, *arrays: Any, keep: str = "first") -> tuple[np.ndarray, ...]:
  """Collapses duplicate ids, keeping the `keep` ('first' or 'last') occurrence.

  Returns (ids_U, *arrays_U): rows of every array in `arrays` (same leading
  length as ids) that belong to the kept occurrences, in their original order.
  `BruteForceIndex` rejects duplicate ids; run this first if your catalogue has
  them, e.g. `ids, emb, titles = dedupe_ids(ids, emb, titles)`.
  """
  ids = np.asarray(ids_N)
  if ids.ndim != 1:
    raise ValueError(f"ids must be 1-D (one id per candidate), got shape {ids.shape}; "
                     "flatten them, e.g. ids.reshape(-1).")
  if keep not in ("first", "last"):
    raise ValueError(f"keep must be 'first' or 'last', got {keep!r}.")
  for i, a in enumerate(arrays):
    if len(a) != len(ids):
      raise ValueError(
        f"array {i} has {len(a)} rows but there are {len(ids)} ids; pass arrays aligned with ids."
      )
  if keep == "first":
    _, first = np.unique(ids, return_index=True)
  else:
    _, rev = np.unique(ids[::-1], return_index=True)
    first = len(ids) - 1 - rev
  rows = np.sort(first)
  return (ids[rows],) + tuple(np.asarray(a)[rows] for a in arrays)


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_exclude(exclude: Any, num_queries: int, num_candidates: int) -> Array | None:
  """Normalises `exclude` to a [B, E] int32 array (or None)."""
  if exclude is None:
    return None
  if isinstance(exclude, tuple):
    if len(exclude) != 2:
      raise ValueError(
        f"CSR exclusions must be a pair (indptr_B1, indices); got a tuple of {len(exclude)} items."
      )
    exclude = csr_to_padded(*exclude)
  ex = exclude if _is_traced(exclude) else np.asarray(exclude)
  if ex.ndim != 2 or ex.shape[0] != num_queries:
    raise ValueError(
      f"exclude must have shape [B={num_queries}, E] (indices padded with -1) or be "
      f"a CSR pair (indptr, indices); got shape {ex.shape}."
    )
  if not jnp.issubdtype(ex.dtype, jnp.integer):
    raise TypeError(
      f"exclude must hold integer candidate indices, got dtype {ex.dtype}. Cast with "
      ".astype(np.int32); use -1 for padding."
    )
  if not _is_traced(ex) and ex.size:
    lo, hi = int(ex.min()), int(ex.max())
    if lo < -1 or hi >= num_candidates:
      raise ValueError(
        f"exclude indices must lie in [0, N={num_candidates}) with -1 as padding; "
        f"got values in [{lo}, {hi}]. Map ids to row indices first "
        "(BruteForceIndex.search does this for ids)."
      )
  if ex.shape[1] == 0:
    return None
  return jnp.asarray(ex, jnp.int32)


# ----------------------------------------------------------------------------
# Core.


def _canon(s: Array) -> Array:
  """Maps -0.0 to +0.0 so that equal scores tie exactly (top_k orders -0 < +0)."""
  return jnp.where(s == 0, jnp.zeros_like(s), s)


def _f32(x: Array) -> Array:
  """Float32 values of a slice of the candidates.

  On CPU, bfloat16 candidates travel as their uint16 bits (bf16 -> f32 is
  exactly a 16-bit shift): XLA:CPU turns any bfloat16 slicing in a loop into
  one float32 copy of all candidates, hoisted out of the loop.
  """
  if x.dtype == jnp.uint16:
    return lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)
  return x.astype(jnp.float32)


def _chunk_block_max(q_BxD, c, start, chunk, bias, block, tile, precision) -> Array:
  """Block maxima [B, chunk/block] of c[start:start+chunk], `tile` candidates at a time.

  Scores are laid out [tile, B] so that the max runs over `block` whole rows
  (elementwise maxima of contiguous B-vectors); on CPU, XLA fuses this dot and
  max into one kernel. `bias` (0 or -inf per candidate, or None) is indexed
  like `c`.
  """
  num_q = q_BxD.shape[0]
  per_tile = tile // block

  def tile_max(t):
    c_TxD = _f32(lax.dynamic_slice_in_dim(c, start + t * tile, tile))
    s_TxB = lax.dot_general(
      c_TxD,
      q_BxD,
      (((1,), (1,)), ((), ())),
      precision=precision,
      preferred_element_type=jnp.float32,
    )
    if bias is not None:
      s_TxB = s_TxB + lax.dynamic_slice_in_dim(bias, start + t * tile, tile)[:, None]
    return s_TxB.reshape(per_tile, block, num_q).max(axis=1)

  if chunk == tile:
    return tile_max(0).T

  def body(t, buf_WxB):
    return lax.dynamic_update_slice_in_dim(buf_WxB, tile_max(t), t * per_tile, axis=0)

  buf = jnp.full((chunk // block, num_q), _NEG_INF, jnp.float32)
  return lax.fori_loop(0, chunk // tile, body, buf).T


def _merge(run_v_BxK, run_b_BxK, bmax_BxW, first_block):
  """Top-k1 of running blocks + a chunk's blocks (running ones win ties: lower ids)."""
  k1 = run_v_BxK.shape[1]
  v, pos = lax.top_k(jnp.concatenate([run_v_BxK, _canon(bmax_BxW)], axis=1), k1)
  from_run = jnp.take_along_axis(run_b_BxK, jnp.minimum(pos, k1 - 1), axis=1)
  b = jnp.where(pos < k1, from_run, first_block + pos - k1)
  return v, b.astype(jnp.int32)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _select_blocks(q, c, bias_N, k1, block, tile, chunk, precision):
  """Pass 1: the k1 best blocks per query, [B, k1] int32 (-1 when fewer exist)."""
  num_q, n = q.shape[0], c.shape[0]
  run_v = jnp.full((num_q, k1), _NEG_INF, jnp.float32)
  run_b = jnp.full((num_q, k1), -1, jnp.int32)
  n_full = n // chunk
  if n_full:

    def step(carry, i):
      bmax = _chunk_block_max(q, c, i * chunk, chunk, bias_N, block, tile, precision)
      return _merge(*carry, bmax, i * (chunk // block)), None

    (run_v, run_b), _ = lax.scan(step, (run_v, run_b), jnp.arange(n_full, dtype=jnp.int32))
  start, rem = n_full * chunk, n - n_full * chunk
  if rem:
    # The tail: whole tiles read in place, then the last partial tile padded
    # (a copy of at most `tile` rows) with -inf scores.
    parts = []
    n_tiles = rem // tile
    if n_tiles:
      parts.append(_chunk_block_max(q, c, start, n_tiles * tile, bias_N, block, tile, precision))
    last = rem - n_tiles * tile
    if last:
      t_len = _round_up(last, block)
      c_last = jnp.pad(c[start + n_tiles * tile :], ((0, t_len - last), (0, 0)))
      valid = jnp.arange(t_len) < last
      if bias_N is not None:
        valid = valid & (jnp.pad(bias_N[start + n_tiles * tile :], (0, t_len - last)) == 0)
      bias = jnp.where(valid, 0.0, _NEG_INF).astype(jnp.float32)
      parts.append(_chunk_block_max(q, c_last, 0, t_len, bias, block, t_len, precision))
    bmax = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    run_v, run_b = _merge(run_v, run_b, bmax, start // block)
  return run_b


def _rescore(q, c, blocks_BxK, allow_N, exclude_BxE, k, block, precision):
  """Pass 2: exact top-k among the candidates of the selected blocks."""
  n = c.shape[0]
  blocks = jnp.sort(blocks_BxK, axis=1)  # candidate order == index order (tie-break)
  idx = (blocks[:, :, None] * block + jnp.arange(block, dtype=jnp.int32)).reshape(
    blocks.shape[0], -1
  )
  valid = (jnp.repeat(blocks, block, axis=1) >= 0) & (idx < n)
  idx_c = jnp.where(valid, idx, 0)
  rows = _f32(jnp.take(c, idx_c, axis=0, mode="clip"))  # [b, M, D]
  s = jnp.einsum("bd,bmd->bm", q, rows, precision=precision, preferred_element_type=jnp.float32)
  if allow_N is not None:
    valid = valid & jnp.take(allow_N, idx_c, mode="clip")
  if exclude_BxE is not None:
    ex = jnp.sort(jnp.where(exclude_BxE < 0, jnp.iinfo(jnp.int32).max, exclude_BxE), axis=1)
    pos = jax.vmap(lambda e, i: jnp.searchsorted(e, i))(ex, idx)
    hit = jnp.take_along_axis(ex, jnp.minimum(pos, ex.shape[1] - 1), axis=1) == idx
    valid = valid & ~hit
  s = jnp.where(valid, _canon(s), _NEG_INF)
  v, p = lax.top_k(s, k)
  i = jnp.take_along_axis(idx, p, axis=1)
  return v, jnp.where(v == _NEG_INF, -1, i)


@functools.partial(
  jax.jit, static_argnames=("k", "k1", "block", "tile", "chunk", "q_tile", "precision")
)
def _exact_top_k(q, c, exclude, allow_N, *, k, k1, block, tile, chunk, q_tile, precision):
  bias_N = None if allow_N is None else jnp.where(allow_N, 0.0, _NEG_INF).astype(jnp.float32)
  blocks = _select_blocks(q, c, bias_N, k1, block, tile, chunk, precision)
  num_q = q.shape[0]
  if q_tile >= num_q:
    return _rescore(q, c, blocks, allow_N, exclude, k, block, precision)
  # Pass 2 in query tiles to bound the gathered rows.
  pad = _round_up(num_q, q_tile) - num_q

  def tiles(x):
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape((-1, q_tile) + x.shape[1:])

  xs = (tiles(q), tiles(blocks), None if exclude is None else tiles(exclude))

  def one(x):
    return _rescore(x[0], c, x[1], allow_N, x[2], k, block, precision)

  v, i = lax.map(one, xs)
  return v.reshape(-1, k)[:num_q], i.reshape(-1, k)[:num_q]


def _check_inputs(q_BxD: Array, c_NxD: Array, k: Any) -> int:
  """``k`` as an int, once the queries and candidates are known to fit together."""
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}.")
  if getattr(q_BxD, "ndim", None) != 2 or getattr(c_NxD, "ndim", None) != 2:
    raise ValueError(
      f"exact_top_k needs q_BxD and c_NxD as 2-D arrays; got shapes "
      f"{getattr(q_BxD, 'shape', None)} and {getattr(c_NxD, 'shape', None)}."
    )
  dim, cdim = q_BxD.shape[1], c_NxD.shape[1]
  if dim != cdim:
    raise ValueError(
      f"query dim {dim} != candidate dim {cdim}; queries and candidates must come "
      "from towers with the same output size."
    )
  if not jnp.issubdtype(c_NxD.dtype, jnp.floating):
    raise TypeError(f"candidates must be float32 or bfloat16, got {c_NxD.dtype}; cast them, "
                    "e.g. c_NxD.astype(jnp.float32).")
  if not jnp.issubdtype(q_BxD.dtype, jnp.floating):
    raise TypeError(f"queries must be floating point, got {q_BxD.dtype}; cast them, e.g. "
                    "q_BxD.astype(jnp.float32).")
  return int(k)


def _resolve_sizes(chunk_size: int | None, block_size: int | None, tile_size: int | None
                   ) -> tuple[int, int, int]:
  """(block, tile, chunk): the given sizes, the rest from ``default_sizes()``."""
  sizes = default_sizes()
  block = int(block_size or sizes["block"])
  if block < 1:
    raise ValueError(f"block_size must be >= 1, got {block}.")
  if tile_size:
    tile = int(tile_size)
  elif chunk_size and chunk_size <= sizes["tile"]:
    tile = int(chunk_size)
  else:  # the largest multiple of block <= the default tile (dividing chunk_size if given)
    steps = range(max(block, sizes["tile"] - sizes["tile"] % block), 0, -block)
    tile = next((t for t in steps if not chunk_size or chunk_size % t == 0), block)
  chunk = int(chunk_size or max(tile, sizes["chunk"] - sizes["chunk"] % tile))
  if tile < 1 or tile % block or chunk % tile:
    raise ValueError(
      f"need tile_size a multiple of block_size and chunk_size a "
      f"multiple of tile_size; got block={block}, tile={tile}, chunk={chunk}. "
      f"Defaults here: {sizes}."
    )
  return block, tile, chunk


def exact_top_k(
  q_BxD: Array,
  c_NxD: Array,
  k: int,
  *,
  exclude: ExcludeArg | None = None,
  allow_N: Array | None = None,
  chunk_size: int | None = None,
  block_size: int | None = None,
  tile_size: int | None = None,
  precision: Any = lax.Precision.HIGHEST,
) -> tuple[Array, Array]:
  """Exact top-k candidates by dot product, for each query.

  Args:
    q_BxD: queries (cast to float32).
    c_NxD: candidates, float32 or bfloat16 (scores accumulate in float32).
    k: results per query. Rows with fewer than k allowed candidates are
      padded with index -1 and score -inf.
    exclude: per-query candidate indices to drop: [B, E] ints padded with -1
      (duplicates are fine), or CSR `(indptr_B1, indices)` (converted on the
      host, so not inside jit). Pass 2 rescores k + E blocks: cost grows with E.
    allow_N: optional bool mask over candidates; False drops a candidate for
      every query.
    chunk_size: candidates per merge into the running top blocks (a multiple
      of the tile size); holds a B x chunk/block buffer of block maxima.
    block_size: candidates per block maximum.
    tile_size: candidates scored at once (a multiple of block_size); at most
      B x tile scores exist at a time. Defaults: `default_sizes()`.
    precision: matmul precision; the default HIGHEST is true float32 on every
      backend (GPUs would otherwise use TF32 and round the scores).

  Returns:
    (scores_Bxk float32, idx_Bxk int32), best first; equal scores put the
    smaller index first (as a stable argsort of -scores).

  Works under `jax.jit` with k, the sizes and precision static.
  """
  k = _check_inputs(q_BxD, c_NxD, k)
  (num_q, dim), n = q_BxD.shape, c_NxD.shape[0]
  block, tile, chunk = _resolve_sizes(chunk_size, block_size, tile_size)
  if allow_N is not None:
    if getattr(allow_N, "shape", None) != (n,) or allow_N.dtype != jnp.bool_:
      raise ValueError(
        f"allow_N must be a bool array of shape ({n},); got "
        f"{getattr(allow_N, 'dtype', type(allow_N))}{getattr(allow_N, 'shape', '')}. "
        "Build it with np.zeros(N, bool) and set allowed rows to True."
      )
    allow_N = jnp.asarray(allow_N)
  exclude = _check_exclude(exclude, num_q, n)
  if n == 0 or num_q == 0:
    return (jnp.full((num_q, k), _NEG_INF, jnp.float32), jnp.full((num_q, k), -1, jnp.int32))
  q = jnp.asarray(q_BxD, jnp.float32)
  if n <= DENSE_MAX_N and not (chunk_size or block_size or tile_size):
    # A small catalogue: one [B, N] score matrix is cheap and lax.top_k over a short
    # row beats block selection (which would rescore most candidates anyway).
    v, i = _dense_top_k(q, c_NxD, exclude, allow_N, k=min(k, n), precision=precision)
    if k > n:
      v = jnp.pad(v, ((0, 0), (0, k - n)), constant_values=_NEG_INF)
      i = jnp.pad(i, ((0, 0), (0, k - n)), constant_values=-1)
    return v, i
  c = c_NxD
  if c.dtype == jnp.bfloat16 and _backend() == "cpu":
    c = lax.bitcast_convert_type(c, jnp.uint16)  # a copy of the bits; see _f32
  elif c.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"candidates must be float32 or bfloat16, got {c.dtype}; cast them.")
  num_blocks = -(-n // block)
  k_sel = min(k, n)
  k1 = min(k_sel + (0 if exclude is None else exclude.shape[1]), num_blocks)
  row_bytes = k1 * block * dim * 4
  q_tile = max(1, _GATHER_BYTES[_backend()] // row_bytes)
  v, i = _exact_top_k(
    q,
    c,
    exclude,
    allow_N,
    k=k_sel,
    k1=k1,
    block=block,
    tile=tile,
    chunk=chunk,
    q_tile=q_tile,
    precision=precision,
  )
  if k_sel < k:
    v = jnp.pad(v, ((0, 0), (0, k - k_sel)), constant_values=_NEG_INF)
    i = jnp.pad(i, ((0, 0), (0, k - k_sel)), constant_values=-1)
  return v, i


DENSE_MAX_N = 8192  # catalogues up to this size are scored in one [B, N] matrix


@functools.partial(jax.jit, static_argnames=("k", "precision"))
def _dense_top_k(q, c, exclude, allow_N, *, k, precision):
  s = _canon(jnp.dot(q, c.astype(jnp.float32).T, precision=precision,
                     preferred_element_type=jnp.float32))
  if allow_N is not None:
    s = jnp.where(allow_N[None, :], s, _NEG_INF)
  if exclude is not None:
    rows = jnp.arange(s.shape[0])[:, None]
    s = s.at[rows, jnp.where(exclude >= 0, exclude, s.shape[1])].set(_NEG_INF, mode="drop")
  v, i = lax.top_k(s, k)
  return v, jnp.where(v == _NEG_INF, -1, i).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Index over ids.


def _looks_like_csr(exclude: Any, num_queries: int) -> bool:
  if not (isinstance(exclude, tuple) and len(exclude) == 2 and np.ndim(exclude[0]) == 1):
    return False
  indptr = np.asarray(exclude[0])
  return (
    indptr.size == num_queries + 1
    and np.issubdtype(indptr.dtype, np.integer)
    and indptr[0] == 0
    and bool(np.all(np.diff(indptr) >= 0))
    and np.ndim(exclude[1]) == 1
    and indptr[-1] == len(exclude[1])
  )


def _per_query_ids(exclude: Any, num_queries: int) -> np.ndarray:
  """[B, E] -1-padded ids from a padded array, CSR (indptr, ids) or B id lists."""
  if isinstance(exclude, tuple) and len(exclude) == 2 and num_queries != 2:
    return csr_to_padded(*exclude)
  if _looks_like_csr(exclude, num_queries):  # 2 queries: also reads as 2 id lists
    raise ValueError(
      "exclude is ambiguous: a pair that is both CSR (indptr, ids) and two id lists. "
      "Pass a list of per-query id arrays, or a padded [B, E] array."
    )
  if isinstance(exclude, (list, tuple)):
    if len(exclude) != num_queries:
      raise ValueError(
        f"exclude has {len(exclude)} entries for {num_queries} queries; pass one id "
        "list per query, a padded [B, E] array, or CSR (indptr, ids)."
      )
    rows = [np.asarray(r, np.int64).reshape(-1) for r in exclude]
    lengths = [len(r) for r in rows]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return csr_to_padded(indptr, np.concatenate(rows) if rows else np.zeros(0, np.int64))
  ex = np.asarray(exclude)
  if ex.ndim != 2 or ex.shape[0] != num_queries or not np.issubdtype(ex.dtype, np.integer):
    raise ValueError(
      f"exclude must give integer ids per query: [B={num_queries}, E] padded with -1, a "
      f"list of {num_queries} id lists, or CSR (indptr, ids); got {ex.dtype}{ex.shape}."
    )
  return ex


@dataclasses.dataclass(frozen=True, eq=False)
class BruteForceIndex:
  """Candidate embeddings with their ids; exact search by dot product.

  `ids_N` must be unique (see `dedupe_ids`) and non-negative (-1 marks
  "no result"). Results are NumPy arrays: scores float32, ids int64.
  """

  embeddings_NxD: Array
  ids_N: np.ndarray
  titles_N: np.ndarray | None = None
  _keys: KeyIndex = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    emb = self.embeddings_NxD
    if getattr(emb, "ndim", None) != 2:
      raise ValueError(
        f"embeddings_NxD must be 2-D [N, D], got shape {getattr(emb, 'shape', None)}."
      )
    if emb.dtype not in (jnp.float32, jnp.bfloat16):
      raise TypeError(
        f"embeddings must be float32 or bfloat16, got {emb.dtype}; cast with .astype(np.float32)."
      )
    emb = jnp.asarray(emb)
    if not bool(jnp.isfinite(emb).all()):
      raise ValueError("embeddings contain NaN or inf; fix the tower output before indexing.")
    ids = np.asarray(self.ids_N)
    if ids.shape != (emb.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
        f"ids_N must be 1-D integers, one per embedding row ({emb.shape[0]}); got "
        f"{ids.dtype}{ids.shape}."
      )
    ids = ids.astype(np.int64)
    if ids.size and ids.min() < 0:
      raise ValueError("ids must be >= 0 (-1 marks a missing result); remap negative ids.")
    keys = KeyIndex.build(ids)
    sorted_ids = keys.sorted_N
    dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if dup.size:
      raise ValueError(
        f"ids must be unique; {np.unique(dup).size} duplicated (e.g. {dup[:5].tolist()}). "
        "Collapse them with `ids, emb, titles = dedupe_ids(ids, emb, titles)`."
      )
    titles = self.titles_N
    if titles is not None:
      titles = np.asarray(titles)
      if titles.shape != ids.shape:
        raise ValueError(
          f"titles_N must have one entry per id ({ids.size}); got shape {titles.shape}."
        )
    object.__setattr__(self, "embeddings_NxD", emb)
    object.__setattr__(self, "ids_N", ids)
    object.__setattr__(self, "titles_N", titles)
    object.__setattr__(self, "_keys", keys)

  def __len__(self) -> int:
    return int(self.ids_N.shape[0])

  def rows(self, ids: Any) -> np.ndarray:
    """Row index of each id (any shape), -1 for unknown ids."""
    ids = np.asarray(ids, np.int64)
    return self._keys.rows(ids)

  def search(
    self,
    q_BxD: Any,
    k: int,
    exclude: Any = None,
    allow: Any = None,
    **kwargs,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids per query.

    Args:
      q_BxD: query embeddings.
      k: results per query; missing results have id -1 and score -inf.
      exclude: ids to drop per query: a [B, E] int array padded with -1, a
        list of B id lists, or CSR as a tuple `(indptr_B1, ids)`. Unknown ids
        are ignored.
      allow: ids that may be returned (for every query); unknown ids ignored.
      **kwargs: passed to `exact_top_k` (chunk_size, block_size, ...).

    Returns:
      (scores_Bxk float32, ids_Bxk int64) as NumPy arrays.
    """
    q = jnp.asarray(q_BxD)
    if q.ndim != 2 or q.shape[1] != self.embeddings_NxD.shape[1]:
      raise ValueError(f"queries must be [B, {self.embeddings_NxD.shape[1]}], got shape {q.shape}.")
    if not bool(jnp.isfinite(q).all()):
      raise ValueError("queries contain NaN or inf; check the query tower inputs.")
    ex_rows = None
    if exclude is not None:
      ex = _per_query_ids(exclude, q.shape[0])
      ex_rows = np.where(ex < 0, -1, self.rows(ex)).astype(np.int32)
    allow_N = None
    if allow is not None:
      rows = self.rows(np.asarray(allow).reshape(-1))
      allow_N = np.zeros(len(self), bool)
      allow_N[rows[rows >= 0]] = True
    scores, rows = exact_top_k(
      q, self.embeddings_NxD, k, exclude=ex_rows, allow_N=allow_N, **kwargs
    )
    rows = np.asarray(rows)
    ids = np.where(rows >= 0, self.ids_N[np.maximum(rows, 0)], -1)
    return np.asarray(scores), ids.astype(np.int64)

  def titles(self, ids: Any) -> np.ndarray:
    """Titles of `ids` ('' for -1 / unknown ids); needs `titles_N`."""
    if self.titles_N is None:
      raise ValueError("this index has no titles; build it with titles_N=...")
    rows = self.rows(ids)
    t = self.titles_N[np.maximum(rows, 0)] if len(self) else np.zeros(rows.shape, str)
    return np.where(rows >= 0, t, "")


__all__: Sequence[str] = (
  "BruteForceIndex",
  "csr_to_padded",
  "dedupe_ids",
  "default_sizes",
  "exact_top_k",
)

