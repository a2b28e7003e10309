"""Approximate index kinds (FAISS IVF, HNSW) against the exact index: recall, exclusions,
allow-lists, the exact fallback, adding rows, and the save/load round trip."""

import numpy as np
import pytest

from twotower_jax import ann
from twotower_jax import index as index_lib

faiss = pytest.importorskip("faiss")

KINDS = ("exact", "faiss_ivf", "faiss_hnsw")
OPTIONS = {"ivf_nlist": 64, "ivf_nprobe": 16, "hnsw_m": 32, "hnsw_ef_construction": 64,
           "hnsw_ef_search": 128}


def clustered(n=8000, d=16, clusters=40, seed=0, num_q=64):
  """Points around `clusters` random centres; queries near random centres."""
  rng = np.random.default_rng(seed)
  centres_CxD = rng.standard_normal((clusters, d)).astype(np.float32)
  emb_NxD = centres_CxD[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d))
  q_QxD = centres_CxD[rng.integers(0, clusters, num_q)] + 0.3 * rng.standard_normal((num_q, d))
  return emb_NxD.astype(np.float32), q_QxD.astype(np.float32)


@pytest.fixture(scope="module")
def data():
  emb, q = clustered()
  ids = np.arange(len(emb), dtype=np.int64) * 3 + 7  # ids are not row numbers
  built = {k: ann.build(k, emb, OPTIONS, ids_N=ids) for k in KINDS}
  return emb, q, ids, built


def recall(a_ids, b_ids):
  return np.mean([np.intersect1d(x[x >= 0], y).size / max(1, (y >= 0).sum())
                  for x, y in zip(a_ids, b_ids)])


@pytest.mark.parametrize("kind", ["faiss_ivf", "faiss_hnsw"])
def test_recall_against_exact_on_clustered_embeddings(data, kind):
  _, q, _, built = data
  _, want = built["exact"].search(q, 50)
  scores, got = built[kind].search(q, 50)
  assert got.shape == (len(q), 50) and got.dtype == np.int64
  assert recall(got, want) >= 0.9
  assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
  assert set(np.unique(got)) <= set(data[2].tolist())


def test_exact_kind_is_the_brute_force_index(data):
  assert isinstance(data[3]["exact"], index_lib.BruteForceIndex)
  assert ann.kind_of(data[3]["exact"]) == "exact"
  assert ann.kind_of(data[3]["faiss_hnsw"]) == "faiss_hnsw"


@pytest.mark.parametrize("kind", KINDS)
def test_excluded_ids_are_never_returned(data, kind):
  _, q, _, built = data
  idx = built[kind]
  _, top = built["exact"].search(q, 20)
  exclude = top[:, ::2]  # every other of each query's 20 best
  scores, got = idx.search(q, 10, exclude=exclude)
  for row, ex in zip(got, exclude):
    assert not set(row.tolist()) & set(ex.tolist())
  assert (got >= 0).all() and np.isfinite(scores).all()  # over-fetching kept k results
  # The same as lists and as CSR.
  as_lists = [list(r) for r in exclude]
  np.testing.assert_array_equal(idx.search(q, 10, exclude=as_lists)[1], got)
  indptr = np.arange(0, exclude.size + 1, exclude.shape[1])
  np.testing.assert_array_equal(idx.search(q, 10, exclude=(indptr, exclude.reshape(-1)))[1],
                                got)


@pytest.mark.parametrize("kind", KINDS)
def test_allow_list_returns_only_allowed_ids(data, kind):
  _, q, ids, built = data
  allow = ids[::5]
  scores, got = built[kind].search(q, 10, allow=allow)
  assert (got >= 0).all() and np.isin(got, allow).all()
  _, want = built["exact"].search(q, 10, allow=allow)
  assert recall(got, want) >= 0.8


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_allowed_than_k_pads_like_exact(data, kind):
  _, q, ids, built = data
  allow = ids[[3, 1000, 5000]]
  exclude = np.tile(ids[[1000]], (len(q), 1))
  scores, got = built[kind].search(q, 5, exclude=exclude, allow=allow)
  assert got.shape == (len(q), 5)
  for row, s in zip(got, scores):
    assert sorted(row[:2].tolist()) == sorted(ids[[3, 5000]].tolist())
    assert row[2:].tolist() == [-1, -1, -1] and np.isneginf(s[2:]).all()


def _count_exact_searches(monkeypatch):
  calls = []
  original = index_lib.BruteForceIndex.search

  def counting(self, q, k, exclude=None, allow=None, **kw):
    calls.append(len(q))
    return original(self, q, k, exclude=exclude, allow=allow, **kw)

  monkeypatch.setattr(index_lib.BruteForceIndex, "search", counting)
  return calls


def test_a_scattered_allow_list_falls_back_to_exact(data, monkeypatch):
  """IVF probing 1 cell finds few of 30 scattered allowed items: exact answers those rows."""
  emb, q, ids, _ = data
  idx = ann.build("faiss_ivf", emb, dict(OPTIONS, ivf_nprobe=1), ids_N=ids)
  allow = ids[np.random.default_rng(1).choice(len(ids), 30, replace=False)]
  calls = _count_exact_searches(monkeypatch)
  scores, got = idx.search(q, 20, allow=allow)
  assert sum(calls) > 0  # some queries needed the exact fallback
  want_s, want = index_lib.BruteForceIndex.search(data[3]["exact"], q, 20, allow=allow)
  assert (got >= 0).all()
  assert recall(got, want) == 1.0  # every row complete: 20 of the 30 allowed, the best ones


def test_exclusions_within_reach_need_no_fallback(data, monkeypatch):
  _, q, _, built = data
  _, top = built["exact"].search(q, 5)
  calls = _count_exact_searches(monkeypatch)
  _, got = built["faiss_hnsw"].search(q, 10, exclude=top)
  assert calls == []  # over-fetching 10 + 5 was enough
  assert (got >= 0).all()
  assert not any(set(r.tolist()) & set(t.tolist()) for r, t in zip(got, top))


def test_add_appends_rows_to_every_kind(data):
  emb, q, ids, built = data
  new = 10.0 * q[:3]  # each new row scores highest for its own query
  for kind in KINDS:
    bigger = ann.add(built[kind], new, np.array([1, 2, 4]))
    assert len(bigger) == len(emb) + 3 and len(built[kind]) == len(emb)
    _, got = bigger.search(q[:3], 1)
    assert got[:, 0].tolist() == [1, 2, 4], kind


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip(data, kind, tmp_path):
  emb, q, ids, built = data
  meta = ann.save(built[kind], tmp_path)
  assert meta["kind"] == kind and meta["size"] == len(emb)
  assert (tmp_path / ann.INDEX_FILE).is_file() == (kind != "exact")
  loaded = ann.load(tmp_path, meta, emb, ids)
  assert ann.kind_of(loaded) == kind
  for a, b in zip(built[kind].search(q, 10), loaded.search(q, 10)):
    np.testing.assert_array_equal(a, b)


def test_load_errors_name_the_problem(data, tmp_path):
  emb, _, ids, built = data
  meta = ann.save(built["faiss_ivf"], tmp_path)
  with pytest.raises(ann.AnnError, match="holds 8000 items but the catalogue has 7999"):
    ann.load(tmp_path, meta, emb[:-1], ids[:-1])
  (tmp_path / ann.INDEX_FILE).write_bytes(b"garbage")
  with pytest.raises(ann.AnnError, match="not a readable FAISS index"):
    ann.load(tmp_path, meta, emb, ids)
  (tmp_path / ann.INDEX_FILE).unlink()
  with pytest.raises(ann.AnnError, match="missing"):
    ann.load(tmp_path, meta, emb, ids)
  with pytest.raises(ann.AnnError, match="must be one of exact, faiss_ivf, faiss_hnsw"):
    ann.build("annoy", emb)
  with pytest.raises(ann.AnnError, match="serve.ivf_nlist=100 exceeds the catalogue's 50"):
    ann.build("faiss_ivf", emb[:50], {"ivf_nlist": 100})


def test_auto_nlist_keeps_39_points_per_cell():
  assert ann.auto_nlist(150) == 3
  assert ann.auto_nlist(1_000_000) == 4000
  assert ann.auto_nlist(10) == 1


def test_missing_faiss_names_the_extra(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_faiss(name, *a, **kw):
    if name == "faiss":
      raise ImportError("No module named 'faiss'")
    return real_import(name, *a, **kw)

  monkeypatch.setattr(builtins, "__import__", no_faiss)
  with pytest.raises(ImportError, match=r"pip install 'twotower_jax\[faiss\]'"):
    ann.build("faiss_hnsw", np.zeros((4, 2), np.float32))


def test_config_checks_the_index_keys(monkeypatch):
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.base_config()
  assert cfg.serve.index == "exact"
  cfg.serve.index, cfg.serve.ivf_nlist, cfg.serve.ivf_nprobe = "ivf", 4, 8
  cfg.serve.hnsw_m = 1
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg)
  text = str(e.value)
  assert "serve.index='ivf': must be one of 'exact', 'faiss_ivf', 'faiss_hnsw'" in text
  assert "serve.hnsw_m=1: must be an integer >= 2" in text
  assert "serve.ivf_nprobe=8: more cells than the 4 of serve.ivf_nlist" in text
  cfg = config_lib.base_config()
  cfg.serve.index, cfg.serve.ivf_nlist = "faiss_ivf", 500
  config_lib.validate(cfg)
  with pytest.raises(config_lib.ConfigError, match="serve.ivf_nlist=500: more IVF cells than "
                     "the 150 items"):
    config_lib.check_against_data(cfg, 150)
  real = config_lib.importlib.util.find_spec
  monkeypatch.setattr(config_lib.importlib.util, "find_spec",
                      lambda name, *a: None if name == "faiss" else real(name, *a))
  with pytest.raises(config_lib.ConfigError, match=r"pip install 'twotower_jax\[faiss\]'"):
    config_lib.validate(cfg)
