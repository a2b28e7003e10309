"""The EASE baseline: closed form against a direct solve, recency weighting, the item limit."""

import logging

import numpy as np
import pytest

from twotower_jax import baselines
from twotower_jax import history


def tiny_log(seed=0, users=12, items=7, n=50):
  rng = np.random.default_rng(seed)
  return rng.integers(0, users, n), rng.integers(0, items, n), rng.integers(0, 20, n)


def test_ease_closed_form_matches_a_direct_solve_per_column():
  u, i, _ = tiny_log()
  lam = 3.0
  b = baselines.ease_matrix(u, i, 12, 7, lam)
  np.testing.assert_array_equal(np.diag(b), 0.0)
  # EASE column j: ridge regression of item j's column on the other items' columns.
  x = baselines.binary_matrix(u, i, 12, 7).astype(np.float64)
  for j in range(7):
    others = [k for k in range(7) if k != j]
    xo = x[:, others]
    want = np.linalg.solve(xo.T @ xo + lam * np.eye(6), xo.T @ x[:, j])
    np.testing.assert_allclose(b[others, j], want, rtol=1e-9, atol=1e-12)
  # The same minimiser of ||X - XB||^2 + lam ||B||^2 with diag(B) = 0: the gradient
  # vanishes off the diagonal.
  grad = x.T @ (x @ b - x) + lam * b
  np.testing.assert_allclose(grad - np.diag(np.diag(grad)), 0.0, atol=1e-9)
  with pytest.raises(ValueError, match="must be > 0"):
    baselines.ease_matrix(u, i, 12, 7, 0.0)


def test_ease_scores_are_history_times_b_with_a_popularity_tiebreak():
  u, i, t = tiny_log(1)
  b = baselines.ease_matrix(u, i, 12, 7, 5.0)
  counts = np.bincount(i, minlength=7)
  seen = baselines.training_histories(u, i, 12)
  fn, _ = baselines.ease_score_fns(b, counts, seen)
  x = baselines.binary_matrix(u, i, 12, 7).astype(np.float64)
  users = np.arange(12)
  np.testing.assert_allclose(fn(users), x @ b, atol=1e-8)
  # A user without history: the popularity order, not one big tie.
  cold = baselines.training_histories(np.array([0]), np.array([3]), 2)
  s = baselines.ease_score_fns(b, counts, cold)[0](np.array([1]))[0]
  assert np.argsort(-s, kind="stable").tolist() == np.argsort(-counts, kind="stable").tolist()


def test_recency_weights_the_item_k_steps_back_by_factor_k():
  # User 0: items 4 (t=10), 1 (t=30), 2 (t=20, listed last): time order 4, 2, 1.
  u, i, t = np.array([0, 0, 0, 1]), np.array([4, 1, 2, 3]), np.array([10, 30, 20, 5])
  b = baselines.ease_matrix(u, i, 2, 5, 1.0)
  counts = np.bincount(i, minlength=5)
  r = 0.5
  seen = baselines.training_histories(u, i, 2, train_time=t, recency=r)
  got = baselines.ease_score_fns(b, counts, seen)[0](np.array([0]))[0]
  want = r ** 2 * b[4] + r * b[2] + b[1]
  np.testing.assert_allclose(got, want, atol=1e-8)
  plain = baselines.ease_score_fns(b, counts, baselines.training_histories(u, i, 2))[0]
  np.testing.assert_allclose(plain(np.array([0]))[0], b[4] + b[2] + b[1], atol=1e-8)
  assert not np.allclose(got, plain(np.array([0]))[0])


def reference_online(tr_u, tr_i, tr_t, te_u, te_i, te_t, j, r):
  """(item, weight) of test row j's history: training rows then earlier test rows, by
  (time, training first, row); the most recent weighs 1, the one before r, ..."""
  rows = [(tr_t[k], 0, k, tr_i[k]) for k in range(len(tr_u)) if tr_u[k] == te_u[j]]
  rows += [(te_t[k], 1, k, te_i[k]) for k in range(len(te_u))
           if te_u[k] == te_u[j] and (te_t[k], k) < (te_t[j], j)]  # ties by row order
  rows.sort()
  return [(int(item), r ** (len(rows) - 1 - n)) for n, (_, _, _, item) in enumerate(rows)]


def test_online_histories_hold_the_online_history_in_time_order():
  rng = np.random.default_rng(2)
  tr_u, tr_i, tr_t = rng.integers(0, 6, 60), rng.integers(0, 15, 60), rng.integers(0, 30, 60)
  te_u, te_i, te_t = rng.integers(0, 6, 25), rng.integers(0, 15, 25), rng.integers(0, 30, 25)
  h = baselines.online_histories(tr_u, tr_i, te_u, te_i, 6, train_time=tr_t, test_time=te_t,
                                 recency=0.9)
  indptr, items = history.online_history(tr_u, tr_i, te_u, te_i, te_t, 6)
  np.testing.assert_array_equal(h.indptr, indptr)
  for j in range(25):
    got = list(zip(h.items[h.indptr[j]:h.indptr[j + 1]].tolist(),
                   h.weights[h.indptr[j]:h.indptr[j + 1]].tolist()))
    want = reference_online(tr_u, tr_i, tr_t, te_u, te_i, te_t, j, 0.9)
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want])
    assert sorted(items[indptr[j]:indptr[j + 1]].tolist()) == sorted(g[0] for g in got)


def test_recency_in_exclude_history_changes_ease_and_nothing_else():
  rng = np.random.default_rng(3)
  tr_u, tr_i, tr_t = rng.integers(0, 8, 150), rng.integers(0, 20, 150), rng.integers(0, 50, 150)
  te_u, te_i, te_t = rng.integers(0, 8, 40), rng.integers(0, 20, 40), rng.integers(50, 90, 40)
  hi, hit = history.online_history(tr_u, tr_i, te_u, te_i, te_t, 8)
  kw = {"ks": (1, 5), "history_indptr": hi, "history_items": hit, "train_time": tr_t,
        "test_time": te_t, "ease_lambda": 5.0}
  plain = baselines.evaluate_baselines(tr_u, tr_i, te_u, te_i, 8, 20, **kw)
  recent = baselines.evaluate_baselines(tr_u, tr_i, te_u, te_i, 8, 20, ease_recency=0.5, **kw)
  for key, val in plain.items():
    if not key.startswith("ease/"):
      assert recent[key] == val, key
  assert any(recent[k] != plain[k] for k in plain if k.startswith("ease/exclude_history/"))
  with pytest.raises(ValueError, match="does not match train_time/test_time"):
    baselines.evaluate_baselines(tr_u, tr_i, te_u, te_i, 8, 20, ease_recency=0.5,
                                 **{**kw, "test_time": te_t * 0})
  with pytest.raises(ValueError, match="ease_recency=1.5"):
    baselines.evaluate_baselines(tr_u, tr_i, te_u, te_i, 8, 20, ease_recency=1.5, **kw)


def test_ease_is_skipped_above_the_item_limit_with_one_log_line(caplog):
  u, i, _ = tiny_log()
  with caplog.at_level(logging.INFO, logger=baselines.__name__):
    out = baselines.evaluate_baselines(u, i, u[:5], i[:5], 12, 7, ks=(1,), ease_max_items=6)
  lines = [r.getMessage() for r in caplog.records if r.name == baselines.__name__]
  assert len(lines) == 1 and "EASE baseline skipped" in lines[0]
  assert "7 items" in lines[0] and "eval.ease_max_items=6" in lines[0]
  assert not any(k.startswith("ease/") for k in out) and "itemcf/top_1_accuracy" in out
  caplog.clear()
  with caplog.at_level(logging.INFO, logger=baselines.__name__):
    out = baselines.evaluate_baselines(u, i, u[:5], i[:5], 12, 7, ks=(1,), ease_max_items=7)
  assert "ease/top_1_accuracy" in out and not caplog.records
