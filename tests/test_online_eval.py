"""The exclude_history protocol, online item-CF and the user_temporal split, against slow
references; the third protocol in a tiny training run's metrics.json."""

import json
import pathlib

import numpy as np
import pytest

from twotower_jax import baselines
from twotower_jax import config as config_lib
from twotower_jax import history
from twotower_jax import metrics
from twotower_jax import train
from twotower_jax.data import splits
from twotower_jax.data.dataset import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
U, N, D = 9, 30, 3


def random_case(seed=0, n_train=120, n_test=50):
  """Integer embeddings (exact scores, few ties), a training log and a timed test log."""
  rng = np.random.default_rng(seed)
  q_U = rng.integers(-50, 50, (U, D)).astype(np.float32)
  c = rng.integers(-50, 50, (N, D)).astype(np.float32)
  tr_u, tr_i = rng.integers(0, U, n_train), rng.integers(0, N, n_train)
  te_u, te_i = rng.integers(0, U, n_test), rng.integers(0, N, n_test)
  te_t = rng.integers(0, 10, n_test)  # many equal times: earlier rows of a time count
  return q_U, c, tr_u, tr_i, te_u, te_i, te_t


def earlier(te_t, j):
  """Test rows before row j in the log: an earlier time, or the same time and an earlier row."""
  rows = np.arange(len(te_t))
  return (te_t < te_t[j]) | ((te_t == te_t[j]) & (rows < j))


def reference_history(tr_u, tr_i, te_u, te_i, te_t, j):
  return set(tr_i[tr_u == te_u[j]].tolist()) | set(
      te_i[(te_u == te_u[j]) & earlier(te_t, j)].tolist())


def reference_metrics(scores_TxN, te_i, te_u, hist, counts, ks):
  """Ranks, hr, mrr and coverage/avg_pop of one list per interaction, one at a time."""
  ranks, lists = [], []
  for j, s in enumerate(scores_TxN):
    allowed = [c for c in range(N) if c not in hist[j] or c == te_i[j]]
    ranks.append(sum(s[c] > s[te_i[j]] for c in allowed if c != te_i[j]))
    others = sorted((c for c in range(N) if c not in hist[j]), key=lambda c: (-s[c], c))
    lists.append(others[:max(ks)])
  ranks = np.array(ranks)
  out = {"mrr": np.mean(1 / (ranks + 1))}
  for k in ks:
    out[f"hr_{k}"] = np.mean(ranks < k)
    out[f"coverage_{k}"] = len({c for lst in lists for c in lst[:k]}) / N
    entries = [counts[c] for lst in lists for c in lst[:k]]
    out[f"avg_pop_{k}"] = np.mean(entries)
  user_hits = {}
  for r, u in zip(ranks, te_u):
    user_hits.setdefault(u, []).append(r < ks[0])
  out[f"recall_{ks[0]}"] = np.mean([np.mean(h) for h in user_hits.values()])
  return out


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_exclude_history_matches_a_slow_reference(batch_size):
  q_U, c, tr_u, tr_i, te_u, te_i, te_t = random_case()
  h_indptr, h_items = history.online_history(tr_u, tr_i, te_u, te_i, te_t, U)
  hist = [reference_history(tr_u, tr_i, te_u, te_i, te_t, j) for j in range(len(te_u))]
  indptr, seen = metrics.seen_csr(tr_u, tr_i, U)
  counts = np.bincount(tr_i, minlength=N)
  ks = (1, 5, 10)
  want = reference_metrics(q_U[te_u] @ c.T, te_i, te_u, hist, counts, ks)
  kw = {"ks": ks, "history_indptr": h_indptr, "history_items": h_items,
        "batch_size": batch_size}
  by_embedding = metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts, q_BxD=q_U[te_u],
                                            c_NxD=c, chunk_size=8, **kw)
  by_user_scores = metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts,
                                              score_fn=lambda us: q_U[us] @ c.T, **kw)
  # A history score function receives the interactions' rows (here: their user's scores).
  by_rows = metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts,
                                       score_fn=lambda us: q_U[us] @ c.T,
                                       history_score_fn=lambda rows: q_U[te_u[rows]] @ c.T, **kw)
  for out in (by_embedding, by_user_scores, by_rows):
    for key, val in want.items():
      assert out[f"exclude_history/{key}"] == pytest.approx(val), key
  # The two other protocols are unchanged by passing the history.
  plain = metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts, ks=ks,
                                     score_fn=lambda us: q_U[us] @ c.T, batch_size=batch_size)
  assert {k for k in by_user_scores if not k.startswith("exclude_history/")} == set(plain)
  for key, val in plain.items():
    assert by_user_scores[key] == pytest.approx(val), key
  assert not any(k.startswith("exclude_history/") for k in plain)


def test_exclude_history_compiles_once_across_batches():
  q_U, c, tr_u, tr_i, te_u, te_i, te_t = random_case(seed=1, n_test=45)
  h_indptr, h_items = history.online_history(tr_u, tr_i, te_u, te_i, te_t, U)
  indptr, seen = metrics.seen_csr(tr_u, tr_i, U)
  counts = np.bincount(tr_i, minlength=N)
  kw = {"ks": (1, 3), "history_indptr": h_indptr, "history_items": h_items, "batch_size": 11}
  # Sizes nothing else in this session uses, so every compiled shape here is new.
  ranks_before = metrics._true_ranks_jit._cache_size()  # pylint: disable=protected-access
  metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts, q_BxD=q_U[te_u], c_NxD=c,
                             chunk_size=29, protocols=("exclude_seen", "exclude_history"), **kw)
  # One shape for both excluding protocols and all 5 batches (the last one padded).
  assert metrics._true_ranks_jit._cache_size() == ranks_before + 1  # pylint: disable=protected-access
  topk_before = metrics._top_k_masked._cache_size()  # pylint: disable=protected-access
  metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts, protocols=("exclude_history",),
                             score_fn=lambda us: q_U[us] @ c.T, **kw)
  assert metrics._top_k_masked._cache_size() == topk_before + 1  # pylint: disable=protected-access


def test_exclude_history_rejects_bad_input():
  q_U, c, tr_u, tr_i, te_u, te_i, te_t = random_case()
  indptr, seen = metrics.seen_csr(tr_u, tr_i, U)
  counts = np.bincount(tr_i, minlength=N)
  h_indptr, h_items = history.online_history(tr_u, tr_i, te_u, te_i, te_t, U)
  fn = lambda us: q_U[us] @ c.T  # noqa: E731
  with pytest.raises(ValueError, match="needs each test interaction's online history"):
    metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts, score_fn=fn, ks=(1,),
                               protocols=("exclude_history",))
  with pytest.raises(ValueError, match="length 51"):
    metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts, score_fn=fn, ks=(1,),
                               history_indptr=h_indptr[:-1], history_items=h_items)
  with pytest.raises(ValueError, match="history_items holds values"):
    metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts, score_fn=fn, ks=(1,),
                               history_indptr=h_indptr, history_items=h_items + N)
  with pytest.raises(ValueError, match="history_score_fn returned shape"):
    metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts, score_fn=fn, ks=(1,),
                               history_indptr=h_indptr, history_items=h_items,
                               history_score_fn=lambda rows: np.zeros((1, N)))
  with pytest.raises(ValueError, match="history_score_fn goes with score_fn"):
    metrics.evaluate_protocols(te_i, te_u, indptr, seen, counts, q_BxD=q_U[te_u], c_NxD=c,
                               ks=(1,), history_indptr=h_indptr, history_items=h_items,
                               history_score_fn=fn)


def test_online_itemcf_scores_each_interaction_from_its_history():
  _, _, tr_u, tr_i, te_u, te_i, te_t = random_case(seed=2)
  h_indptr, h_items = history.online_history(tr_u, tr_i, te_u, te_i, te_t, U)
  user_fn, online_fn = baselines.itemcf_score_fns(
      tr_u, tr_i, U, N, online=baselines.Histories(h_indptr, h_items))
  sim = baselines.itemcf_similarity(baselines.binary_matrix(tr_u, tr_i, U, N))
  rows = np.array([3, 0, 17, 49])
  got = online_fn(rows)
  for r, row in enumerate(rows):
    x = np.zeros(N, np.float32)
    x[list(reference_history(tr_u, tr_i, te_u, te_i, te_t, row))] = 1
    np.testing.assert_allclose(got[r], x @ sim, atol=1e-6)  # + a popularity tie-break < 1e-6
  # Without earlier test items the online scores are the user's training scores.
  first = np.array([j for j in range(len(te_u)) if not (
      (te_u == te_u[j]) & earlier(te_t, j)).any()])
  np.testing.assert_array_equal(online_fn(first), user_fn(te_u[first]))


def test_evaluate_baselines_adds_exclude_history_for_every_baseline():
  _, _, tr_u, tr_i, te_u, te_i, te_t = random_case(seed=3)
  h_indptr, h_items = history.online_history(tr_u, tr_i, te_u, te_i, te_t, U)
  out = baselines.evaluate_baselines(tr_u, tr_i, te_u, te_i, U, N, ks=(1, 10),
                                     history_indptr=h_indptr, history_items=h_items,
                                     test_time=te_t, ease_lambda=10.0)
  for name in baselines.BASELINES:
    for protocol in metrics.PROTOCOLS:
      assert 0.0 <= out[f"{name}/{protocol}/hr_10"] <= 1.0, (name, protocol)
  # Popularity keeps its ranking; only the exclusions change.
  counts = np.bincount(tr_i, minlength=N)
  pop = baselines.popularity_scores(counts)(np.zeros(len(te_u), int))
  hist = [reference_history(tr_u, tr_i, te_u, te_i, te_t, j) for j in range(len(te_u))]
  want = reference_metrics(pop, te_i, te_u, hist, counts, (1, 10))
  assert out["popularity/exclude_history/hr_10"] == pytest.approx(want["hr_10"])
  assert out["popularity/exclude_history/mrr"] == pytest.approx(want["mrr"])
  no_history = baselines.evaluate_baselines(tr_u, tr_i, te_u, te_i, U, N, ks=(1, 10))
  assert not any("exclude_history" in k for k in no_history)


# ----------------------------------------------------------------------------- user_temporal


def reference_user_temporal(users, times, fraction):
  test = []
  for u in np.unique(users):
    rows = sorted(np.flatnonzero(users == u), key=lambda r: (times[r], r))
    if len(rows) < 5:
      continue
    n_test = min(max(int(np.floor(fraction * len(rows) + 0.5)), 1), len(rows) - 1)
    test += rows[len(rows) - n_test:]
  return sorted(test)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.01, 0.95])
def test_user_temporal_split_matches_a_slow_reference(fraction):
  rng = np.random.default_rng(4)
  n = 500
  users = rng.choice(np.array(["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"]), n,
                     p=[0.3, 0.25, 0.2, 0.1, 0.1, 0.025, 0.02, 0.005])
  ratings = {"uid": users, "when": rng.integers(0, 40, n)}  # ties: by row order
  train_idx, test_idx = splits.split_indices(ratings, "user_temporal", seed=0,
                                             test_fraction=fraction, user_key="uid",
                                             time_key="when")
  assert test_idx.tolist() == reference_user_temporal(users, ratings["when"], fraction)
  assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(n))
  small = [u for u in np.unique(users) if (users == u).sum() < 5]
  assert small and not np.isin(users[test_idx], small).any()  # all in training
  for u in np.unique(users):  # every test row of a user is at or after all its train rows
    tr_t, te_t = ratings["when"][train_idx][users[train_idx] == u], ratings["when"][
        test_idx][users[test_idx] == u]
    assert not te_t.size or te_t.min() >= tr_t.max()


def test_user_temporal_split_errors():
  ratings = {"user_id": np.array([1, 1, 2]), "timestamp": np.array([1, 2, 3])}
  with pytest.raises(DataError, match="no user has 5 or more"):
    splits.split_indices(ratings, "user_temporal", seed=0)
  with pytest.raises(DataError, match="needs a timestamp column"):
    splits.split_indices({"user_id": np.arange(9)}, "user_temporal", seed=0)
  assert "user_temporal" in config_lib.DATA_SPLITS


# ----------------------------------------------------------------------------- a run


def test_tiny_run_reports_exclude_history_for_model_and_baselines(ml100k_dir, tmp_path):
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py")
  cfg.data.dir = str(ml100k_dir)
  cfg.data.download = False
  cfg.data.split = "user_temporal"
  cfg.train.num_epochs = 1
  cfg.eval.ks = (1, 5, 10)
  cfg.eval.ease_recency = 0.9
  train.train_and_evaluate(cfg, str(tmp_path))
  m = json.loads((tmp_path / "metrics.json").read_text())
  for source in ("", *(f"{b}/" for b in baselines.BASELINES)):
    for protocol in metrics.PROTOCOLS:
      for key in ("hr_10", "ndcg_10", "mrr", "coverage_10"):
        assert 0.0 <= m[f"{source}{protocol}/{key}"] <= 1.0, (source, protocol, key)
  # Excluding more items can only lift a true item's rank.
  assert m["popularity/exclude_history/hr_10"] >= m["popularity/exclude_seen/hr_10"]
