"""Full-corpus ranks and metrics against hand-computed values."""

import math

import numpy as np
import pytest

from twotower_jax import metrics

# One-dimensional embeddings: scores are exact integers, so ties are exact.
Q = np.array([[1.0], [-1.0]], np.float32)
C = np.array([[3.0], [1.0], [2.0], [2.0], [5.0]], np.float32)
# Scores: row 0 = [3, 1, 2, 2, 5]; row 1 = [-3, -1, -2, -2, -5].


def brute_ranks(q, c, true, exclude=None):
  s = q.astype(np.float64) @ c.astype(np.float64).T
  t = s[np.arange(len(true)), true]
  higher = s > t[:, None]
  higher[np.arange(len(true)), true] = False
  if exclude is not None:
    for b, row in enumerate(exclude):
      higher[b, row[row >= 0]] = False
  return higher.sum(1)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 4, 5, 7])
def test_true_ranks_strictly_higher_ties_and_chunks(chunk_size):
  # Row 0, true 2 (score 2): 3 and 5 are higher, the other 2 ties -> rank 2.
  # Row 1, true 3 (score -2): only -1 is higher; -2 ties -> rank 1.
  r = metrics.true_ranks(Q, C, np.array([2, 3]), chunk_size=chunk_size)
  np.testing.assert_array_equal(r, [2, 1])
  assert r.dtype == np.int32
  # True = the top (5) and the bottom (1) candidate of row 0.
  r = metrics.true_ranks(Q[[0, 0]], C, np.array([4, 1]), chunk_size=chunk_size)
  np.testing.assert_array_equal(r, [0, 4])


@pytest.mark.parametrize("chunk_size", [None, 2, 3])
def test_true_ranks_exclusions(chunk_size):
  q = Q[[0, 0, 0, 0, 0, 1]]
  true = np.array([2, 2, 2, 2, 2, 3])
  exclude = np.array([
      [4, -1, -1],   # drops the 5: rank 2 -> 1
      [0, 4, -1],    # drops both higher ones: 0
      [2, -1, -1],   # the true one itself: no effect, 2
      [4, 4, 4],     # a repeated exclusion counts once: 1
      [1, 3, -1],    # lower / tied candidates: no effect, 2
      [1, -1, -1],   # row 1: drops the only higher one (-1): 0
  ])
  r = metrics.true_ranks(q, C, true, exclude_BxE=exclude, chunk_size=chunk_size)
  np.testing.assert_array_equal(r, [1, 0, 2, 1, 2, 0])
  np.testing.assert_array_equal(metrics.true_ranks_from_scores(q @ C.T, true, exclude),
                                [1, 0, 2, 1, 2, 0])


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 100])
def test_true_ranks_match_brute_force_with_ties(chunk_size):
  # Small integer embeddings give many exact ties; B=11 > chunk 4 uses several
  # true-score chunks; N=37 is prime, so 4 and 16 leave a partial last chunk;
  # 100 > N is capped at N.
  rng = np.random.default_rng(0)
  q = rng.integers(-2, 3, (11, 3)).astype(np.float32)
  c = rng.integers(-2, 3, (37, 3)).astype(np.float32)
  true = rng.integers(0, 37, 11)
  exclude = np.where(rng.random((11, 6)) < 0.3, -1, rng.integers(0, 37, (11, 6)))
  np.testing.assert_array_equal(
      metrics.true_ranks(q, c, true, chunk_size=chunk_size), brute_ranks(q, c, true))
  np.testing.assert_array_equal(
      metrics.true_ranks(q, c, true, exclude_BxE=exclude, chunk_size=chunk_size),
      brute_ranks(q, c, true, exclude))


def test_true_ranks_duplicate_of_true_candidate_is_a_tie():
  # Float embeddings: a candidate identical to the true one must tie, not outrank it
  # (a separately computed true score rounds differently from the matmul).
  rng = np.random.default_rng(1)
  q = rng.normal(size=(64, 48)).astype(np.float32)
  c = rng.normal(size=(300, 48)).astype(np.float32)
  c[7] = c[3]
  true = np.full((64,), 3)
  others = np.delete(np.arange(300), [3, 7])
  s = q.astype(np.float64) @ c.astype(np.float64).T
  expected = (s[:, others] > s[:, [3]]).sum(1)
  for chunk_size in (None, 8, 128):
    np.testing.assert_array_equal(metrics.true_ranks(q, c, true, chunk_size=chunk_size), expected)


def test_true_ranks_batched_matches_unbatched():
  rng = np.random.default_rng(2)
  q = rng.integers(-3, 4, (10, 2)).astype(np.float32)
  c = rng.integers(-3, 4, (9, 2)).astype(np.float32)
  true = rng.integers(0, 9, 10)
  exclude = rng.integers(-1, 9, (10, 3))
  want = brute_ranks(q, c, true, exclude)
  for bs in (1, 3, 10, 64):
    got = metrics.true_ranks_batched(q, c, true, exclude_BxE=exclude, batch_size=bs, chunk_size=4)
    np.testing.assert_array_equal(got, want)


def test_true_ranks_from_scores_ties_and_inf():
  s = np.array([[1.0, 2.0, 2.0, -np.inf], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(metrics.true_ranks_from_scores(s, np.array([1, 2])), [0, 0])
  np.testing.assert_array_equal(metrics.true_ranks_from_scores(s, np.array([3, 0])), [3, 0])


def test_bad_inputs_raise_with_fix():
  with pytest.raises(ValueError, match="NaN"):
    metrics.true_ranks(Q, np.array([[1.0], [np.nan], [0.0]], np.float32), np.array([0, 0]))
  with pytest.raises(ValueError, match="NaN"):
    metrics.true_ranks_from_scores(np.array([[np.nan, 1.0]]), np.array([1]))
  with pytest.raises(ValueError, match=r"true_B.*\[0, N=5\)"):
    metrics.true_ranks(Q, C, np.array([0, 5]))
  with pytest.raises(ValueError, match="pad rows with -1"):
    metrics.true_ranks(Q, C, np.array([0, 1]), exclude_BxE=np.array([1, 2]))
  with pytest.raises(ValueError, match="-1 for padding"):
    metrics.true_ranks(Q, C, np.array([0, 1]), exclude_BxE=np.array([[-2], [0]]))
  with pytest.raises(ValueError, match="same embedding size"):
    metrics.true_ranks(Q, np.zeros((5, 2), np.float32), np.array([0, 1]))
  with pytest.raises(ValueError, match="chunk_size"):
    metrics.true_ranks(Q, C, np.array([0, 1]), chunk_size=0)


def test_ranking_metrics_three_users():
  # user 7: ranks 0, 3, 12; user 2: ranks 1, 0; user 9: rank 50.
  ranks = np.array([0, 3, 12, 1, 0, 50])
  users = np.array([7, 7, 7, 2, 2, 9])
  m = metrics.ranking_metrics(ranks, users, ks=(1, 5, 10))
  g3, g5 = 1 / math.log2(3), 1 / math.log2(5)  # gains at ranks 1 and 3
  want = {
      "hr_1": 2 / 6, "hr_5": 4 / 6, "hr_10": 4 / 6,
      "ndcg_1": 2 / 6, "ndcg_5": (1 + g5 + g3 + 1) / 6, "ndcg_10": (1 + g5 + g3 + 1) / 6,
      "mrr": (1 + 1 / 4 + 1 / 13 + 1 / 2 + 1 + 1 / 51) / 6,
      "user/hr_1": 2 / 3, "user/hr_5": 2 / 3, "user/hr_10": 2 / 3,
      "recall_1": (1 / 3 + 1 / 2 + 0) / 3, "recall_5": (2 / 3 + 1 + 0) / 3,
      "recall_10": (2 / 3 + 1 + 0) / 3,
      "user/ndcg_1": (1 / 3 + 1 / 2 + 0) / 3,
      "user/ndcg_5": ((1 + g5) / 3 + (g3 + 1) / 2 + 0) / 3,
      "user/ndcg_10": ((1 + g5) / 3 + (g3 + 1) / 2 + 0) / 3,
      "user/mrr": ((1 + 1 / 4 + 1 / 13) / 3 + (1 / 2 + 1) / 2 + 1 / 51) / 3,
  }
  assert set(m) == set(want)
  for k, v in want.items():
    assert m[k] == pytest.approx(v, abs=1e-12), k


def test_ranking_metrics_rejects_bad_input():
  with pytest.raises(ValueError, match="same length"):
    metrics.ranking_metrics(np.array([0, 1]), np.array([0]))
  with pytest.raises(ValueError, match="empty test set"):
    metrics.ranking_metrics(np.zeros((0,), int), np.zeros((0,), int))
  with pytest.raises(ValueError, match="distinct positive"):
    metrics.ranking_metrics(np.array([0]), np.array([0]), ks=(0, 5))


def test_coverage_and_popularity():
  topk = np.array([[0, 1, 2], [0, 3, -1]])
  counts = np.array([10, 5, 3, 2, 0])
  m = metrics.coverage_and_popularity(topk, counts, ks=(1, 2, 3))
  assert m == pytest.approx({
      "coverage_1": 1 / 5, "coverage_2": 3 / 5, "coverage_3": 4 / 5,
      "avg_pop_1": 10.0, "avg_pop_2": (10 + 5 + 10 + 2) / 4, "avg_pop_3": (10 + 5 + 3 + 10 + 2) / 5,
  })
  with pytest.raises(ValueError, match="top-4 lists"):
    metrics.coverage_and_popularity(topk, counts, ks=(4,))


def test_aggregate_seeds_sample_std():
  runs = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 2.0}, {"a": 5.0, "b": 2.0}]
  agg = metrics.aggregate_seeds(runs)
  assert agg == pytest.approx({"a/mean": 3.0, "a/std": 2.0, "b/mean": 2.0, "b/std": 0.0})
  single = metrics.aggregate_seeds(runs[:1])
  assert single["a/mean"] == 1.0 and math.isnan(single["a/std"])
  with pytest.raises(ValueError, match="different metric keys"):
    metrics.aggregate_seeds([{"a": 1.0}, {"b": 1.0}])
  with pytest.raises(ValueError, match="non-numeric"):
    metrics.aggregate_seeds([{"config": "x"}])


def test_seen_csr_and_gather():
  indptr, items = metrics.seen_csr(np.array([2, 0, 2, 2]), np.array([5, 1, 5, 3]), 4)
  np.testing.assert_array_equal(indptr, [0, 1, 1, 3, 3])
  np.testing.assert_array_equal(items, [1, 3, 5])
  np.testing.assert_array_equal(metrics.gather_csr(indptr, items, np.array([2, 1, 0]), 3),
                                [[3, 5, -1], [-1, -1, -1], [1, -1, -1]])


# Two users, four candidates. User 0 scores [4, 3, 2, 1] and has seen item 0; user
# 1 scores [1, 2, 3, 4] and has seen nothing. Test: (u0, 1), (u0, 3), (u1, 0).
USERS = np.array([0, 0, 1])
TRUE = np.array([1, 3, 0])
COUNTS = np.array([3, 2, 1, 0])
INDPTR, SEEN = np.array([0, 1, 1]), np.array([0])
C_TOY = np.array([[4 - j, j + 1] for j in range(4)], np.float32)
Q_USER = np.array([[1, 0], [0, 1]], np.float32)
WANT = {
    # include_seen ranks [1, 3, 3]; exclude_seen ranks [0, 2, 3].
    "include_seen/hr_1": 0.0, "include_seen/hr_2": 1 / 3, "exclude_seen/hr_1": 1 / 3,
    "exclude_seen/hr_2": 1 / 3, "include_seen/mrr": (1 / 2 + 1 / 4 + 1 / 4) / 3,
    "exclude_seen/mrr": (1 + 1 / 3 + 1 / 4) / 3,
    "include_seen/recall_2": (1 / 2 + 0) / 2, "exclude_seen/user/hr_1": 1 / 2,
    # Top-2 lists (u0 weighs 2 interactions): include u0 [0, 1], u1 [3, 2];
    # exclude u0 [1, 2], u1 [3, 2].
    "include_seen/coverage_1": 2 / 4, "include_seen/coverage_2": 1.0,
    "include_seen/avg_pop_1": (3 * 2 + 0) / 3, "include_seen/avg_pop_2": (5 * 2 + 1) / 6,
    "exclude_seen/coverage_1": 2 / 4, "exclude_seen/coverage_2": 3 / 4,
    "exclude_seen/avg_pop_1": (2 * 2 + 0) / 3, "exclude_seen/avg_pop_2": (3 * 2 + 1) / 6,
    "top_1_accuracy": 0.0, "top_2_accuracy": 1 / 3,
}


@pytest.mark.parametrize("batch_size", [1, 2, 1024])
def test_evaluate_protocols_score_fn(batch_size):
  out = metrics.evaluate_protocols(TRUE, USERS, INDPTR, SEEN, COUNTS, ks=(1, 2),
                                   score_fn=lambda u: Q_USER[u] @ C_TOY.T, batch_size=batch_size)
  for k, v in WANT.items():
    assert out[k] == pytest.approx(v), k


@pytest.mark.parametrize("batch_size,chunk_size", [(1, 3), (2, None), (1024, 1)])
def test_evaluate_protocols_embeddings(batch_size, chunk_size):
  out = metrics.evaluate_protocols(TRUE, USERS, INDPTR, SEEN, COUNTS, ks=(1, 2),
                                   q_BxD=Q_USER[USERS], c_NxD=C_TOY, batch_size=batch_size,
                                   chunk_size=chunk_size)
  for k, v in WANT.items():
    assert out[k] == pytest.approx(v), k


def test_evaluate_protocols_paths_agree_on_random_data():
  rng = np.random.default_rng(3)
  n, u = 50, 12
  q_u = rng.integers(-1000, 1000, (u, 4)).astype(np.float32)  # exact, (almost) tie-free
  c = rng.integers(-1000, 1000, (n, 4)).astype(np.float32)
  users = rng.integers(0, u, 40)
  true = rng.integers(0, n, 40)
  indptr, seen = metrics.seen_csr(rng.integers(0, u, 100), rng.integers(0, n, 100), u)
  counts = rng.integers(0, 20, n)
  a = metrics.evaluate_protocols(true, users, indptr, seen, counts, ks=(1, 5, 10),
                                 q_BxD=q_u[users], c_NxD=c, batch_size=16, chunk_size=16)
  b = metrics.evaluate_protocols(true, users, indptr, seen, counts, ks=(1, 5, 10),
                                 score_fn=lambda us: q_u[us] @ c.T, batch_size=7)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k] == pytest.approx(b[k]), k


def test_evaluate_protocols_rejects_bad_input():
  kw = {"ks": (1, 2), "score_fn": lambda u: Q_USER[u] @ C_TOY.T}
  with pytest.raises(ValueError, match="either both q_BxD and c_NxD"):
    metrics.evaluate_protocols(TRUE, USERS, INDPTR, SEEN, COUNTS, ks=(1,))
  with pytest.raises(ValueError, match="only N=4 candidates"):
    metrics.evaluate_protocols(TRUE, USERS, INDPTR, SEEN, COUNTS, **{**kw, "ks": (1, 5)})
  with pytest.raises(ValueError, match="user_ids_B"):
    metrics.evaluate_protocols(TRUE, np.array([0, 0, 2]), INDPTR, SEEN, COUNTS, **kw)
  with pytest.raises(ValueError, match="score_fn returned shape"):
    metrics.evaluate_protocols(TRUE, USERS, INDPTR, SEEN, COUNTS, ks=(1,),
                               score_fn=lambda u: np.zeros((len(u), 3)))
