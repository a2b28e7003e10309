"""exact_top_k and BruteForceIndex against a NumPy stable-argsort reference."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import load_benchmark
from twotower_jax import faiss_index
from twotower_jax import index
from twotower_jax.index import BruteForceIndex, csr_to_padded, dedupe_ids, exact_top_k


def reference(q, c, k, exclude=None, allow=None):
  """Top-k by float64 scores; ties -> smaller index (stable argsort of -scores)."""
  s = np.asarray(q, np.float64) @ np.asarray(c, np.float64).T
  if allow is not None:
    s[:, ~np.asarray(allow)] = -np.inf
  if exclude is not None:
    for b, row in enumerate(np.asarray(exclude)):
      s[b, row[row >= 0]] = -np.inf
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  v = np.take_along_axis(s, order, axis=1)
  order = np.where(np.isneginf(v), -1, order)
  pad = k - v.shape[1]
  if pad > 0:
    v = np.pad(v, ((0, 0), (0, pad)), constant_values=-np.inf)
    order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
  return v, order


def int_data(b, n, d, seed=0, lo=-2, hi=3):
  """Small-integer embeddings: float32 dot products are exact and full of ties."""
  rng = np.random.default_rng(seed)
  q = rng.integers(lo, hi, (b, d)).astype(np.float32)
  c = rng.integers(lo, hi, (n, d)).astype(np.float32)
  return q, c


def assert_same(got, want):
  v, i = got
  rv, ri = want
  np.testing.assert_array_equal(np.asarray(i), ri)
  np.testing.assert_array_equal(np.asarray(v), rv.astype(np.float32))
  assert np.asarray(i).dtype == np.int32 and np.asarray(v).dtype == np.float32


# (n, chunk, block, tile, k): N not divisible by the chunk, k > block, chunk == tile,
# several tiles per chunk, a single partial chunk.
SIZES = [
    (1000, 256, 8, 64, 10),
    (1000, 96, 4, 32, 50),
    (777, 128, 16, 128, 40),
    (300, 1024, 32, 256, 7),
    (513, 64, 2, 16, 100),
]


@pytest.mark.parametrize("n,chunk,block,tile,k", SIZES)
def test_matches_reference_with_ties(n, chunk, block, tile, k):
  q, c = int_data(6, n, 5, seed=n)
  got = exact_top_k(q, c, k, chunk_size=chunk, block_size=block, tile_size=tile)
  assert_same(got, reference(q, c, k))


@pytest.mark.parametrize("n,chunk,block,tile,k", SIZES[:3])
def test_exclusions_padded_csr_and_allow(n, chunk, block, tile, k):
  q, c = int_data(5, n, 5, seed=n + 1)
  rng = np.random.default_rng(n)
  # Padded [B, E] with -1 padding and a duplicate in row 0.
  ex = rng.integers(-1, n, (5, 9)).astype(np.int32)
  ex[0, 1] = ex[0, 0] = 3
  allow = rng.random(n) < 0.6
  kw = {"chunk_size": chunk, "block_size": block, "tile_size": tile}
  want = reference(q, c, k, exclude=ex, allow=allow)
  assert_same(exact_top_k(q, c, k, exclude=ex, allow_N=allow, **kw), want)
  # The same exclusions as CSR.
  rows = [r[r >= 0] for r in ex]
  indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
  csr = (indptr, np.concatenate(rows))
  assert_same(exact_top_k(q, c, k, exclude=csr, allow_N=allow, **kw), want)
  assert_same(exact_top_k(q, c, k, exclude=ex, **kw), reference(q, c, k, exclude=ex))


def test_exclusions_that_fill_the_best_blocks():
  # Every candidate of the best blocks is excluded: results come from later blocks.
  c = np.zeros((64, 1), np.float32)
  c[:16, 0] = 10.0  # blocks 0..3 (block 4) hold the 16 best candidates
  c[40:, 0] = np.arange(24, dtype=np.float32) / 4  # 0 .. 5.75, all below 10
  q = np.ones((2, 1), np.float32)
  ex = np.stack([np.arange(16), np.r_[np.arange(8), -np.ones(8, int)]]).astype(np.int32)
  got = exact_top_k(q, c, 5, exclude=ex, chunk_size=16, block_size=4)
  v, i = np.asarray(got[0]), np.asarray(got[1])
  np.testing.assert_array_equal(i[0], [63, 62, 61, 60, 59])
  np.testing.assert_array_equal(v[0], [5.75, 5.5, 5.25, 5.0, 4.75])
  np.testing.assert_array_equal(i[1], [8, 9, 10, 11, 12])  # ties -> smaller index first
  assert_same(got, reference(q, c, 5, exclude=ex))


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
  q=hnp.arrays(np.int8, (4, 3), elements=st.integers(-2, 2)),
  c=hnp.arrays(np.int8, (150, 3), elements=st.integers(-2, 2)),
  ex=hnp.arrays(np.int16, (4, 5), elements=st.integers(-1, 149)),
  allow=hnp.arrays(np.bool_, (150,)),
)
def test_property_matches_reference(q, c, ex, allow):
  # Fixed shapes (one compilation); few distinct scores, so ties everywhere.
  q, c = q.astype(np.float32), c.astype(np.float32)
  kw = {"chunk_size": 64, "block_size": 4, "tile_size": 32}
  assert_same(exact_top_k(q, c, 12, exclude=ex, allow_N=allow, **kw),
              reference(q, c, 12, exclude=ex, allow=allow))


def test_all_equal_scores_come_in_index_order():
  c = np.ones((50, 3), np.float32)
  q = np.ones((2, 3), np.float32)
  v, i = exact_top_k(q, c, 12, chunk_size=16, block_size=4)
  np.testing.assert_array_equal(np.asarray(i), np.tile(np.arange(12), (2, 1)))
  np.testing.assert_array_equal(np.asarray(v), np.full((2, 12), 3.0, np.float32))


def test_negative_zero_ties_with_zero():
  # Scores -0.0 (rows 0, 2) and +0.0 (rows 1, 3) are equal: index order decides.
  c = np.array([[-0.0], [0.0], [-0.0], [0.0], [-1.0]], np.float32)
  q = np.ones((1, 1), np.float32)
  _, i = exact_top_k(q, c, 5, chunk_size=4, block_size=2)
  np.testing.assert_array_equal(np.asarray(i), [[0, 1, 2, 3, 4]])


def test_fewer_allowed_than_k_pads_with_minus_one():
  q, c = int_data(3, 40, 4, seed=3)
  allow = np.zeros(40, bool)
  allow[[5, 17, 33]] = True
  ex = np.array([[17, -1], [-1, -1], [5, 33]], np.int32)
  v, i = exact_top_k(q, c, 6, exclude=ex, allow_N=allow, chunk_size=16, block_size=4)
  v, i = np.asarray(v), np.asarray(i)
  assert_same((v, i), reference(q, c, 6, exclude=ex, allow=allow))
  assert (i[0] >= 0).sum() == 2 and (i[1] >= 0).sum() == 3 and (i[2] >= 0).sum() == 1
  assert np.all(np.isneginf(v[i < 0]))
  assert set(i[2][i[2] >= 0]) == {17}


def test_k_larger_than_n():
  q, c = int_data(2, 7, 3, seed=4)
  got = exact_top_k(q, c, 10, chunk_size=4, block_size=2)
  assert got[0].shape == (2, 10)
  assert_same(got, reference(q, c, 10))


def _no_dense(*args, **kwargs):
  raise AssertionError("the dense shortcut ran where block selection was expected")


def test_random_floats_default_sizes(monkeypatch):
  """Block selection with the default block/tile/chunk sizes (N above the dense cut-off)."""
  n = index.DENSE_MAX_N + 1808
  monkeypatch.setattr(index, "_dense_top_k", _no_dense)
  rng = np.random.default_rng(7)
  q = rng.standard_normal((9, 16)).astype(np.float32)
  c = rng.standard_normal((n, 16)).astype(np.float32)
  v, i = exact_top_k(q, c, 25)
  rv, ri = reference(q, c, 25)
  np.testing.assert_array_equal(np.asarray(i), ri)
  np.testing.assert_allclose(np.asarray(v), rv, rtol=1e-5, atol=1e-5)


def test_dense_shortcut_and_block_path_agree_on_ties(monkeypatch):
  """N <= DENSE_MAX_N takes the dense shortcut; forcing the block path changes nothing."""
  q, c = int_data(6, 3000, 4, seed=11)  # small integers: exact scores, many ties
  rng = np.random.default_rng(12)
  ex = np.where(rng.random((6, 40)) < 0.8, rng.integers(0, 3000, (6, 40)), -1)
  allow = rng.random(3000) < 0.9
  calls = []
  dense = index._dense_top_k  # pylint: disable=protected-access
  monkeypatch.setattr(index, "_dense_top_k", lambda *a, **kw: calls.append(1) or dense(*a, **kw))
  for kwargs in ({}, {"exclude": ex, "allow_N": allow}):
    want = reference(q, c, 60, exclude=kwargs.get("exclude"), allow=kwargs.get("allow_N"))
    got_dense = exact_top_k(q, c, 60, **kwargs)
    assert calls, "N <= DENSE_MAX_N should take the dense shortcut"
    with monkeypatch.context() as m:
      m.setattr(index, "DENSE_MAX_N", 0)
      m.setattr(index, "_dense_top_k", _no_dense)
      got_block = exact_top_k(q, c, 60, **kwargs)
    calls.clear()
    for got in (got_dense, got_block):
      assert_same(got, want)
    np.testing.assert_array_equal(np.asarray(got_dense[1]), np.asarray(got_block[1]))
    np.testing.assert_array_equal(np.asarray(got_dense[0]), np.asarray(got_block[0]))
  # Ties really occur at the cut (so both paths must break them by index alike).
  s = q @ c.T
  assert all(np.sum(row == np.sort(row)[-60]) > 1 for row in s)


def test_bfloat16_candidates_reference_on_rounded_values():
  rng = np.random.default_rng(8)
  q = rng.integers(-3, 4, (4, 8)).astype(np.float32)
  c32 = rng.uniform(-4, 4, (600, 8)).astype(np.float32)
  c32[np.abs(c32) < 0.25] = 0  # keeps every product sum exact in float32
  c16 = jnp.asarray(c32, jnp.bfloat16)
  rounded = np.asarray(c16.astype(jnp.float32))
  assert not np.array_equal(rounded, c32)  # the rounding matters
  got = exact_top_k(q, c16, 30, chunk_size=128, block_size=8)
  assert_same(got, reference(q, rounded, 30))
  # Rounding creates ties (equal bfloat16 rows) that must resolve by index.
  dup = np.repeat(rounded[:50], 2, axis=0).astype(ml_dtypes.bfloat16)
  assert_same(exact_top_k(q, dup, 20, chunk_size=32, block_size=4),
              reference(q, dup.astype(np.float32), 20))


def test_under_jit_and_exclusions_as_traced_array():
  q, c = int_data(4, 300, 4, seed=9)
  ex = np.array([[1, 2, -1], [-1, -1, -1], [0, 299, 150], [7, 7, 7]], np.int32)
  f = jax.jit(exact_top_k, static_argnames=("k", "chunk_size", "block_size"))
  got = f(q, c, k=15, exclude=ex, chunk_size=64, block_size=8)
  assert_same(got, reference(q, c, 15, exclude=ex))
  with pytest.raises(TypeError, match="csr_to_padded"):
    jax.jit(lambda ip, ix: exact_top_k(q, c, 3, exclude=(ip, ix)))(
        np.array([0, 1, 1, 1, 2]), np.array([1, 2]))


def test_rescoring_in_query_tiles(monkeypatch):
  # A tiny gather budget forces pass 2 through lax.map over 2-query tiles (5 -> padded 6).
  monkeypatch.setattr(index, "_GATHER_BYTES", {"cpu": 2 * 7 * 4 * 4 * 4, "gpu": 1})
  q, c = int_data(5, 200, 4, seed=10)
  ex = np.array([[1, -1], [3, 4], [-1, -1], [0, 199], [50, 51]], np.int32)
  got = exact_top_k(q, c, 5, exclude=ex, chunk_size=64, block_size=4)
  assert_same(got, reference(q, c, 5, exclude=ex))


def test_csr_to_padded():
  got = csr_to_padded(np.array([0, 2, 2, 5]), np.array([4, 1, 7, 8, 9]))
  np.testing.assert_array_equal(got, [[4, 1, -1], [-1, -1, -1], [7, 8, 9]])
  np.testing.assert_array_equal(csr_to_padded(np.array([0, 0]), np.array([])), [[-1]])
  with pytest.raises(ValueError, match="indptr must start at 0"):
    csr_to_padded(np.array([0, 3]), np.array([1, 2]))


def test_bad_inputs_raise_with_fix():
  q, c = int_data(2, 20, 4)
  with pytest.raises(ValueError, match="query dim 4 != candidate dim 3"):
    exact_top_k(q, c[:, :3], 3)
  with pytest.raises(ValueError, match="k must be a positive int"):
    exact_top_k(q, c, 0)
  with pytest.raises(ValueError, match="allow_N must be a bool array"):
    exact_top_k(q, c, 3, allow_N=np.ones(20, np.int32))
  with pytest.raises(ValueError, match=r"exclude indices must lie in \[0, N=20\)"):
    exact_top_k(q, c, 3, exclude=np.array([[20], [0]]))
  with pytest.raises(ValueError, match=r"exclude must have shape \[B=2, E\]"):
    exact_top_k(q, c, 3, exclude=np.array([1, 2]))
  with pytest.raises(ValueError, match="multiple of block_size"):
    exact_top_k(q, c, 3, chunk_size=64, tile_size=12, block_size=8)
  with pytest.raises(TypeError, match="float32 or bfloat16"):
    exact_top_k(q, c.astype(np.int32), 3)


def test_empty_candidates_and_queries():
  q, c = int_data(2, 5, 3)
  v, i = exact_top_k(q, c[:0], 4)
  np.testing.assert_array_equal(np.asarray(i), -np.ones((2, 4)))
  assert np.all(np.isneginf(np.asarray(v)))
  assert exact_top_k(q[:0], c, 4)[1].shape == (0, 4)


def test_default_sizes_are_consistent():
  for backend in ("cpu", "gpu"):
    s = index.default_sizes(backend)
    assert s["tile"] % s["block"] == 0 and s["chunk"] % s["tile"] == 0


# ----------------------------------------------------------------------------
# BruteForceIndex.


def make_index(n=60, d=4, seed=11, titles=True):
  q, c = int_data(3, n, d, seed=seed)
  ids = np.arange(n, dtype=np.int64) * 10 + 1000  # non-contiguous, unsorted below
  perm = np.random.default_rng(seed).permutation(n)
  c, ids = c[perm], ids[perm]
  t = np.array([f"movie {i}" for i in ids]) if titles else None
  return q, c, ids, BruteForceIndex(embeddings_NxD=c, ids_N=ids, titles_N=t)


def test_index_maps_rows_to_ids():
  q, c, ids, idx = make_index()
  scores, got = idx.search(q, 8)
  rv, ri = reference(q, c, 8)
  np.testing.assert_array_equal(got, ids[ri])
  np.testing.assert_array_equal(scores, rv.astype(np.float32))
  assert got.dtype == np.int64 and isinstance(got, np.ndarray)
  np.testing.assert_array_equal(idx.titles(got[0, :2]), [f"movie {i}" for i in got[0, :2]])
  np.testing.assert_array_equal(idx.rows([ids[5], 7, ids[0]]), [5, -1, 0])


def test_index_exclude_and_allow_by_id():
  q, c, ids, idx = make_index()
  excl_ids = [[ids[3], ids[9], 123456], [], [ids[0]]]  # 123456 is unknown: ignored
  ex_rows = np.array([[3, 9], [-1, -1], [0, -1]], np.int32)
  want = reference(q, c, 10, exclude=ex_rows)
  for form in (
      excl_ids,  # list of per-query lists
      np.array([[ids[3], ids[9], 123456], [-1, -1, -1], [ids[0], -1, -1]]),  # padded
      (np.array([0, 3, 3, 4]), np.array([ids[3], ids[9], 123456, ids[0]])),  # CSR
  ):
    _, got = idx.search(q, 10, exclude=form)
    np.testing.assert_array_equal(got, ids[want[1]])
  allow_ids = np.r_[ids[10:30], 999_999]
  allow = np.zeros(len(ids), bool)
  allow[10:30] = True
  _, got = idx.search(q, 25, allow=allow_ids, exclude=excl_ids)
  _, ri = reference(q, c, 25, exclude=ex_rows, allow=allow)
  np.testing.assert_array_equal(got, np.where(ri >= 0, ids[np.maximum(ri, 0)], -1))
  assert (got == -1).sum() == 3 * 25 - 20 * 3  # only 20 allowed per query


def test_index_exclude_pair_for_two_queries():
  _, _, ids, idx = make_index()
  q = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
  # A pair of id arrays that is not CSR reads as two id lists.
  _, a = idx.search(q, 5, exclude=(np.array([ids[0], ids[1]]), np.array([ids[2]])))
  _, b = idx.search(q, 5, exclude=[[ids[0], ids[1]], [ids[2]]])
  np.testing.assert_array_equal(a, b)
  assert ids[2] not in b[1] and ids[0] not in b[0]
  with pytest.raises(ValueError, match="ambiguous"):
    idx.search(q, 5, exclude=(np.array([0, 1, 2]), np.array([ids[0], ids[1]])))


def test_index_ids_beyond_int32():
  c = np.array([[1.0], [3.0], [2.0]], np.float32)
  ids = np.array([2**40 + 5, 2**33, 7], np.int64)
  idx = BruteForceIndex(embeddings_NxD=c, ids_N=ids)
  scores, got = idx.search(np.ones((1, 1), np.float32), 3, exclude=[[2**33]])
  np.testing.assert_array_equal(got, [[7, 2**40 + 5, -1]])
  np.testing.assert_array_equal(scores[0, :2], [2.0, 1.0])


def test_index_rejects_duplicates_and_dedupe_ids():
  c = np.arange(8, dtype=np.float32).reshape(4, 2)
  ids = np.array([7, 3, 7, 5])
  with pytest.raises(ValueError, match="dedupe_ids"):
    BruteForceIndex(embeddings_NxD=c, ids_N=ids)
  u_ids, u_c, u_t = dedupe_ids(ids, c, np.array(["a", "b", "c", "d"]))
  np.testing.assert_array_equal(u_ids, [7, 3, 5])
  np.testing.assert_array_equal(u_c, c[[0, 1, 3]])
  np.testing.assert_array_equal(u_t, ["a", "b", "d"])
  l_ids, l_c = dedupe_ids(ids, c, keep="last")
  np.testing.assert_array_equal(l_ids, [3, 7, 5])
  np.testing.assert_array_equal(l_c, c[[1, 2, 3]])
  BruteForceIndex(embeddings_NxD=u_c, ids_N=u_ids)  # accepted once deduplicated


def test_index_rejects_bad_input():
  c = np.ones((3, 2), np.float32)
  with pytest.raises(ValueError, match="NaN or inf"):
    BruteForceIndex(embeddings_NxD=np.array([[1, np.nan]] * 3, np.float32), ids_N=[1, 2, 3])
  with pytest.raises(ValueError, match="one per embedding row"):
    BruteForceIndex(embeddings_NxD=c, ids_N=[1, 2])
  with pytest.raises(ValueError, match=">= 0"):
    BruteForceIndex(embeddings_NxD=c, ids_N=[1, -2, 3])
  idx = BruteForceIndex(embeddings_NxD=c, ids_N=[1, 2, 3])
  with pytest.raises(ValueError, match=r"queries must be \[B, 2\]"):
    idx.search(np.ones((2, 3), np.float32), 1)
  with pytest.raises(ValueError, match="no titles"):
    idx.titles([1])


# ----------------------------------------------------------------------------
# FAISS (optional extra).


def test_faiss_flat_matches_and_ivf_recall():
  pytest.importorskip("faiss")
  rng = np.random.default_rng(12)
  c = rng.standard_normal((2000, 16)).astype(np.float32)
  q = rng.standard_normal((20, 16)).astype(np.float32)
  idx = BruteForceIndex(embeddings_NxD=c, ids_N=np.arange(2000) + 5)
  flat = faiss_index.to_faiss(idx, "flat")
  _, f_rows = flat.search(q, 10)
  np.testing.assert_array_equal(f_rows, reference(q, c, 10)[1])
  assert faiss_index.faiss_recall_at_k(idx, flat, q, 10) == 1.0
  ivf = faiss_index.to_faiss(idx, "ivf", nlist=32, nprobe=1)
  low = faiss_index.faiss_recall_at_k(idx, ivf, q, 10)
  assert 0.0 < low < 1.0
  ivf.nprobe = 32  # every list searched: exact again
  assert faiss_index.faiss_recall_at_k(idx, ivf, q, 10) == 1.0
  with pytest.raises(ValueError, match="'flat' or 'ivf'"):
    faiss_index.to_faiss(idx, "hnsw")


# ----------------------------------------------------------------------------
# Benchmark CLI (tiny sizes: checks it runs and agrees with itself, not speed).


def test_bench_index_cli_writes_json(tmp_path, capsys):
  import json

  bench = load_benchmark()

  out = tmp_path / "index.json"
  rc = bench.main(["index", "--n=3000", "--d=8", "--batch=16", "--k=10", "--num_batches=2",
                   "--repeats=1", "--chunk_size=1024", "--block_size=16",
                   "--methods=exact,lax_top_k,matmul_max", f"--out={out}"])
  assert rc == 0
  r = json.loads(out.read_text())
  assert set(r["figures"]) == {"exact", "lax_top_k", "matmul_max"}
  assert all(f["queries_per_s"] > 0 for f in r["figures"].values())
  assert r["checks"]["exact_vs_lax_top_k"]["set_overlap"] == 1.0
  assert r["checks"]["exact_top1_vs_matmul_max"]["max_abs_diff"] < 1e-4
  assert r["environment"]["jax"] == jax.__version__
  assert "queries/s" in capsys.readouterr().out
  assert bench.main(["nope"]) == 2


def test_lax_top_k_baseline_chunked_equals_full():
  bench = load_benchmark()

  q, c = int_data(3, 1000, 4, seed=13)
  full = bench.lax_top_k_baseline(q, c, k=20)
  chunked = bench.lax_top_k_baseline(q, c, k=20, chunk=96)  # 1000 = 10 x 96 + 40
  want = reference(q, c, 20)
  assert_same(full, want)
  assert_same(chunked, want)


@pytest.mark.parametrize("dtype,copies", [(jnp.float32, 0), (jnp.bfloat16, 1)])
def test_candidates_are_not_copied(dtype, copies):
  # XLA's buffer plan: float32 candidates are never copied; bfloat16 ones once,
  # as uint16 bits (never as a float32 copy, which would be 2x their size).
  q = jnp.zeros((8, 32), jnp.float32)
  c = jnp.zeros((200_000, 32), dtype)
  f = jax.jit(lambda q, c: exact_top_k(q, c, 10))
  temp = f.lower(q, c).compile().memory_analysis().temp_size_in_bytes
  size = c.size * c.dtype.itemsize
  assert copies * size <= temp < (copies + 0.25) * size


def test_faiss_missing_names_the_extra(monkeypatch):
  import sys

  monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
  idx = BruteForceIndex(embeddings_NxD=np.ones((3, 2), np.float32), ids_N=[1, 2, 3])
  with pytest.raises(ImportError, match=r"twotower_jax\[faiss\]"):
    faiss_index.to_faiss(idx)
