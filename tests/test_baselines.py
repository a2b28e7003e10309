"""Baselines on tiny hand-computed data, and (integration) on MovieLens 100K."""

import math

import numpy as np
import pytest

from twotower_jax import baselines, metrics

# Binary 3 users x 4 items training matrix (item 3 has no training users):
#   u0: 1 1 0 0
#   u1: 1 0 1 0
#   u2: 1 1 1 0
TRAIN_U = np.array([0, 0, 1, 1, 2, 2, 2])
TRAIN_I = np.array([0, 1, 0, 2, 0, 1, 2])
S = 2 / math.sqrt(6)  # cosine(0, 1) = cosine(0, 2) = 2 / sqrt(3 * 2); cosine(1, 2) = 1/2


def test_popularity_scores_strict_order_ties_by_index():
  fn = baselines.popularity_scores(np.array([2, 5, 2, 0, 5]))
  s = fn(np.array([4, 0, 4]))
  assert s.shape == (3, 5)
  # counts 5 (items 1, 4), 2 (items 0, 2), 0 (item 3): order 1, 4, 0, 2, 3.
  np.testing.assert_array_equal(s, np.tile([3, 5, 2, 1, 4], (3, 1)))


def test_random_scores_seeded_per_user_and_batch_independent():
  fn = baselines.random_scores(7, seed=3)
  a = fn(np.array([3, 1]))
  assert a.shape == (2, 7) and np.all((a >= 0) & (a < 1))
  np.testing.assert_array_equal(a[0], fn(np.array([1, 0, 3]))[2])
  np.testing.assert_array_equal(a, baselines.random_scores(7, seed=3)(np.array([3, 1])))
  assert not np.array_equal(a, baselines.random_scores(7, seed=4)(np.array([3, 1])))
  assert not np.array_equal(a[0], a[1])


def test_itemcf_cosine_similarity_and_scores():
  x = baselines.binary_matrix(TRAIN_U, TRAIN_I, 3, 4)
  sim = baselines.itemcf_similarity(x)
  want_sim = np.array([[0, S, S, 0], [S, 0, 0.5, 0], [S, 0.5, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(sim, want_sim, rtol=1e-6)
  # A repeated training pair counts once.
  fn = baselines.itemcf_scores(np.append(TRAIN_U, 0), np.append(TRAIN_I, 0), 3, 4)
  want = np.array([[S, S, S + 0.5, 0], [S, S + 0.5, S, 0], [2 * S, S + 0.5, S + 0.5, 0]])
  np.testing.assert_allclose(fn(np.array([0, 1, 2])), want, rtol=1e-6, atol=1e-6)  # + popularity tie-break < 1e-6
  np.testing.assert_allclose(fn(np.array([2])), want[2:], rtol=1e-6, atol=1e-6)


def test_evaluate_baselines_hand_computed():
  # Test: (u0, 2), (u1, 1), (u2, 3). Popularity order 0, 1, 2, 3 (counts 3, 2, 2, 0).
  out = baselines.evaluate_baselines(TRAIN_U, TRAIN_I, np.array([0, 1, 2]), np.array([2, 1, 3]),
                                     3, 4, ks=(1, 2), seed=0)
  want = {
      # include ranks [2, 1, 3]; exclude (seen items masked) [0, 0, 0].
      "popularity/include_seen/hr_1": 0.0, "popularity/include_seen/hr_2": 1 / 3,
      "popularity/top_2_accuracy": 1 / 3, "popularity/exclude_seen/hr_1": 1.0,
      "popularity/include_seen/mrr": (1 / 3 + 1 / 2 + 1 / 4) / 3,
      # itemcf include ranks [0, 0, 3] (item 3 scores 0 for everyone).
      "itemcf/include_seen/hr_1": 2 / 3, "itemcf/include_seen/hr_2": 2 / 3,
      "itemcf/top_1_accuracy": 2 / 3, "itemcf/exclude_seen/hr_1": 1.0,
      "itemcf/include_seen/mrr": (1 + 1 + 1 / 4) / 3,
  }
  for k, v in want.items():
    assert out[k] == pytest.approx(v), k
  # Every baseline has the same keys as a model's evaluation.
  model_keys = {k.split("/", 1)[1] for k in out if k.startswith("popularity/")}
  for name in baselines.BASELINES:
    assert {k.split("/", 1)[1] for k in out if k.startswith(name + "/")} == model_keys
  assert "include_seen/ndcg_2" in model_keys and "exclude_seen/coverage_2" in model_keys
  # The random baseline's ranks come from its seeded score function.
  s = baselines.random_scores(4, seed=0)(np.array([0, 1, 2]))
  r = metrics.true_ranks_from_scores(s, np.array([2, 1, 3]))
  assert out["random/include_seen/mrr"] == pytest.approx(np.mean(1 / (r + 1)))


def test_evaluate_baselines_rejects_bad_input():
  with pytest.raises(ValueError, match="test_item_idx"):
    baselines.evaluate_baselines(TRAIN_U, TRAIN_I, np.array([0]), np.array([4]), 3, 4, ks=(1,))
  with pytest.raises(ValueError, match="same length"):
    baselines.evaluate_baselines(TRAIN_U, TRAIN_I[:3], np.array([0]), np.array([1]), 3, 4,
                                 ks=(1,))


@pytest.mark.integration
def test_movielens_100k_random_split_baselines(real_data_dir):
  d = np.loadtxt(real_data_dir / "u.data", dtype=np.int64)
  u, i = d[:, 0] - 1, d[:, 1] - 1
  perm = np.random.default_rng(0).permutation(len(u))
  tr, te = perm[:80_000], perm[80_000:]
  out = baselines.evaluate_baselines(u[tr], i[tr], u[te], i[te], 943, 1682, seed=0)
  # Popularity by direct counting: a test row hits when fewer than k (unseen) movies rank
  # above its movie: more ratings, or as many and a lower index.
  counts = np.bincount(i[tr], minlength=1682)
  c_R = counts[i[te]]
  above_RxN = ((counts[None, :] > c_R[:, None])
               | ((counts[None, :] == c_R[:, None]) & (np.arange(1682) < i[te][:, None])))
  seen_UxN = np.zeros((943, 1682), bool)
  seen_UxN[u[tr], i[tr]] = True
  rank_include = above_RxN.sum(1)
  rank_exclude = (above_RxN & ~seen_UxN[u[te]]).sum(1)
  for k in (10, 100):
    assert out[f"popularity/include_seen/hr_{k}"] == pytest.approx((rank_include < k).mean())
    assert out[f"popularity/exclude_seen/hr_{k}"] == pytest.approx((rank_exclude < k).mean())
  # The levels this split is known to give: popularity include hr_100 ~0.295, hr_10 ~0.048;
  # exclude hr_100 ~0.41, hr_10 ~0.09; item-based CF exclude hr_100 ~0.51, hr_10 ~0.14;
  # random hr_k ~ k / N.
  assert out["popularity/include_seen/hr_100"] == pytest.approx(0.295, abs=0.015)
  assert out["popularity/include_seen/hr_10"] == pytest.approx(0.048, abs=0.006)
  assert out["popularity/exclude_seen/hr_100"] == pytest.approx(0.41, abs=0.02)
  assert out["popularity/exclude_seen/hr_10"] == pytest.approx(0.09, abs=0.01)
  assert out["itemcf/exclude_seen/hr_100"] == pytest.approx(0.51, abs=0.02)
  assert out["itemcf/exclude_seen/hr_10"] == pytest.approx(0.14, abs=0.01)
  assert out["random/include_seen/hr_100"] == pytest.approx(100 / 1682, abs=0.01)


def test_itemcf_cold_user_falls_back_to_popularity_order():
  # Items 0..3; item 2 most popular, then 0. User 2 has no training items.
  train_u = np.array([0, 0, 1, 1, 1, 3])
  train_i = np.array([2, 0, 2, 0, 1, 2])
  fn = baselines.itemcf_scores(train_u, train_i, num_users=4, num_items=4)
  scores = fn(np.array([2]))[0]
  assert np.argsort(-scores, kind="stable").tolist() == [2, 0, 1, 3]
  # With the strictly-higher rule, the cold user's true item 3 is ranked last, not first.
  ranks = metrics.true_ranks_from_scores(fn(np.array([2])), np.array([3]))
  assert ranks.tolist() == [3]
