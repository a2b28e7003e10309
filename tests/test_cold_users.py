"""Cold users: held out of training entirely, served from their first interactions without
retraining; the split, the queries the model gets, the baselines and the metrics.json keys."""

import numpy as np
import pytest

import conftest
from conftest import write_synthetic_ml100k
from twotower_jax import baselines
from twotower_jax import config as config_lib
from twotower_jax import evaluate
from twotower_jax import features as feat
from twotower_jax import history
from twotower_jax import input_pipeline
from twotower_jax import metrics
from twotower_jax import train
from twotower_jax.data import dataset as dataset_lib
from twotower_jax.data import sources
from twotower_jax.data import splits
from twotower_jax.data.dataset import DataError

COLD = {"data.cold_user_fraction": 0.2, "data.cold_user_history": 5}


def ratings_case(seed=0, num_users=40, n=900):
  rng = np.random.default_rng(seed)
  user = np.concatenate([np.repeat(np.arange(1, num_users + 1), 3),  # every user >= 3
                         rng.integers(1, num_users + 1, n - 3 * num_users)])
  return {"user_id": user, "movie_id": rng.integers(1, 50, n),
          "timestamp": rng.integers(0, 30, n)}  # many equal times: ties by position


def test_cold_user_split_holds_out_whole_users_and_gives_their_first_ratings():
  r = ratings_case()
  warm, given, test = splits.cold_user_split(r, fraction=0.25, history=5, seed=3)
  n = len(r["user_id"])
  assert np.array_equal(np.sort(np.concatenate([warm, given, test])), np.arange(n))
  cold = set(r["user_id"][given].tolist())
  assert cold == set(r["user_id"][test].tolist())
  assert not cold & set(r["user_id"][warm].tolist())  # whole users, nothing in training
  counts = np.bincount(r["user_id"])
  eligible = np.flatnonzero(counts > 5)
  assert len(cold) == round(0.25 * len(eligible)) and cold <= set(eligible.tolist())
  for u in cold:
    rows = np.flatnonzero(r["user_id"] == u)
    by_time = rows[np.lexsort((rows, r["timestamp"][rows]))]  # time, then position
    assert np.array_equal(np.sort(by_time[:5]), given[r["user_id"][given] == u])
    assert np.array_equal(np.sort(by_time[5:]), test[r["user_id"][test] == u])
  again = splits.cold_user_split(r, fraction=0.25, history=5, seed=3)
  other = splits.cold_user_split(r, fraction=0.25, history=5, seed=4)
  assert all(np.array_equal(a, b) for a, b in zip(again, (warm, given, test)))  # seeded
  assert not np.array_equal(other[1], given)


@pytest.mark.parametrize("kwargs, says", [
    ({"fraction": 0.0}, "strictly between 0 and 1"),
    ({"history": 0}, "cold_user_history=0"),
    ({"history": 10_000}, "gives 0 cold users"),
])
def test_cold_user_split_errors_name_the_fix(kwargs, says):
  with pytest.raises(DataError, match=says):
    splits.cold_user_split(ratings_case(), **{"fraction": 0.1, "history": 5, "seed": 0,
                                              **kwargs})


def test_cold_user_split_needs_times():
  r = ratings_case()
  del r["timestamp"]
  with pytest.raises(DataError, match="timestamp"):
    splits.cold_user_split(r, fraction=0.1, history=5, seed=0)


@pytest.mark.parametrize("overrides, says", [
    ({"data.cold_user_fraction": 1.0}, "data.cold_user_fraction"),
    ({"data.cold_user_history": 0}, "data.cold_user_history"),
])
def test_bad_cold_user_settings_are_config_errors(overrides, says):
  cfg = config_lib.base_config()
  for k, v in overrides.items():
    config_lib.set_path(cfg, k, v)
  with pytest.raises(config_lib.ConfigError, match=says):
    config_lib.validate(cfg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80,
                                num_movies=60, num_ratings=2400, seed=5)


@pytest.mark.parametrize("split", ["random", "temporal", "user_temporal"])
def test_training_never_sees_a_cold_user(data_dir, split):
  cfg = conftest.tiny_config(data_dir, "history", **COLD, **{"data.split": split,
                                                             "data.validation_fraction": 0.1})
  prep = input_pipeline.prepare(cfg)
  _, given, test = sources.cold_user_rows(cfg.data, prep.dataset, cfg.seed)
  cold = set(np.asarray(prep.dataset.ratings["user_id"])[given].tolist())
  assert cold and len(cold) == round(0.2 * 80)
  for part in (prep.train, prep.validation, prep.test):
    assert not cold & set(np.asarray(part["user_id"]).tolist())
  n_split = len(prep.train["user_id"]) + len(prep.validation["user_id"]) + len(
      prep.test["user_id"])
  assert n_split + len(given) + len(test) == len(prep.dataset.ratings["user_id"])


def cold_queries(cfg):
  """The cold users' rows and their model inputs, from the given history alone (fixed)
  and with their earlier test items too (online)."""
  prep = input_pipeline.prepare(cfg)
  ds = prep.dataset
  _, given_idx, test_idx = sources.cold_user_rows(cfg.data, ds, cfg.seed)
  given = dataset_lib.take_rows(ds.ratings, given_idx)
  test = dataset_lib.take_rows(ds.ratings, test_idx)
  g_u, t_u, n = input_pipeline.user_index(given["user_id"], test["user_id"])
  g_i = input_pipeline.item_index(prep.item_ids_N, given["movie_id"], "g")
  t_i = input_pipeline.item_index(prep.item_ids_N, test["movie_id"], "t")
  fixed, online = (evaluate.cold_user_queries(prep, given, test, (g_u, g_i), (t_u, t_i), n,
                                              o) for o in (False, True))
  return prep, given_idx, test_idx, test, g_u, t_u, fixed, online


def test_cold_user_queries_hold_the_given_history_only(data_dir):
  cfg = conftest.tiny_config(data_dir, "history", **COLD, **{"data.split": "temporal"})
  prep, given_idx, test_idx, test, g_u, t_u, fixed, online = cold_queries(cfg)
  ds, enc = prep.dataset, prep.encoders["history"]
  for j in range(len(t_u)):
    mine = given_idx[g_u == t_u[j]]
    order = mine[np.lexsort((mine, np.asarray(ds.ratings["timestamp"])[mine]))]
    keys = np.asarray(ds.ratings["movie_id"])[order]
    # What serving encodes for a history given as item keys, most recent last.
    assert np.array_equal(fixed["history"][j], feat.encode_histories(enc, [keys])[0])
    # The online window adds the user's test interactions strictly before it (by time,
    # ties by row), so never the interaction itself.
    t = np.asarray(test["timestamp"])
    before = np.flatnonzero((t_u == t_u[j]) & (t < t[j]))
    before = before[np.lexsort((test_idx[before], t[before]))]
    online_keys = np.concatenate([keys, np.asarray(test["movie_id"])[before]])
    assert np.array_equal(online["history"][j], feat.encode_histories(enc, [online_keys])[0])
    # Each (user, movie) pair occurs once: no test interaction is in its own history.
    assert test["movie_id"][j] not in online_keys
  assert (fixed["history"] >= 0).sum(1).max() <= cfg.data.cold_user_history


def test_given_history_baselines_score_from_the_given_items():
  rng = np.random.default_rng(1)
  n_items, n_users = 12, 20
  tr_u, tr_i = rng.integers(0, n_users, 200), rng.integers(0, n_items, 200)
  g_u, g_i = np.repeat(np.arange(3), 2), rng.integers(0, n_items, 6)
  te_u, te_i = rng.integers(0, 3, 15), rng.integers(0, n_items, 15)
  te_t = rng.integers(0, 5, 15).astype(float)
  got = baselines.given_history_baselines(tr_u, tr_i, n_users, n_items, g_u, g_i, te_u, te_i,
                                          3, given_time=np.zeros(6), test_time=te_t, ks=(1, 5))
  # Item-CF by hand: the sum of cosine similarities to the user's given items.
  sim = baselines.itemcf_similarity(baselines.binary_matrix(tr_u, tr_i, n_users, n_items))
  scores = np.stack([sim[np.unique(g_i[g_u == u])].sum(0) for u in te_u])
  pop = baselines.popularity_scores(np.bincount(tr_i, minlength=n_items))([0])[0]
  scores += pop / (n_items + 1) * 1e-6  # equal scores ordered by popularity
  h_indptr, h_items = history.online_history(g_u, g_i, te_u, te_i, te_t, 3)
  excl = metrics.gather_csr(h_indptr, h_items, np.arange(15), max(np.diff(h_indptr)))
  ranks = metrics.true_ranks_from_scores(scores, te_i, excl)
  assert got["itemcf/exclude_history/hr_5"] == pytest.approx(
      metrics.ranking_metrics(ranks, te_u, (1, 5))["hr_5"])
  online = baselines.given_history_baselines(
      tr_u, tr_i, n_users, n_items, g_u, g_i, te_u, te_i, 3, given_time=np.zeros(6),
      test_time=te_t, online=True, ks=(1, 5))
  assert set(online) == set(got)
  assert got["popularity/exclude_history/hr_5"] == online["popularity/exclude_history/hr_5"]


def test_a_run_with_cold_users_reports_them(data_dir, tmp_path):
  cfg = conftest.tiny_config(data_dir, "history", **COLD,
                             **{"data.split": "temporal", "data.validation_fraction": 0.1,
                                "eval.ks": (1, 10, 50),
                                "train.early_stopping_metric": "exclude_history/hr_10"})
  m = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert m["cold_users/num_users"] == 16 and m["cold_users/history"] == 5
  for prefix in ("cold_users/", "cold_users/online/"):
    for who in ("", "itemcf/", "ease/"):
      assert 0.0 <= m[f"{prefix}{who}exclude_history/hr_10"] <= 1.0
  assert "cold_users/popularity/exclude_history/hr_10" in m
  _, given, test = sources.cold_user_rows(cfg.data, input_pipeline.prepare(cfg).dataset,
                                          cfg.seed)
  assert (m["cold_users/num_test"], len(given)) == (len(test), 5 * 16)


def test_cold_user_queries_carry_side_columns_and_time_since(data_dir):
  cfg = conftest.tiny_config(data_dir, "history", **COLD, **{"data.split": "temporal"})
  cfg.features.query.history.side = ("user_rating",)
  cfg.features.query.history.time_since = True
  prep, given_idx, _, _, g_u, t_u, fixed, online = cold_queries(cfg)
  ds = prep.dataset
  assert set(fixed) == set(online) and {"history" + feat.SIDE_SUFFIX,
                                        "history" + feat.TIME_SINCE_SUFFIX} <= set(fixed)
  side = fixed["history" + feat.SIDE_SUFFIX]
  valid = fixed["history"] >= 0
  assert side.shape[:2] == valid.shape and np.all(side[~valid] == 0)
  # The given items' ratings, normalized with the training statistics, in time order.
  enc = prep.encoders["history"]
  j = 0
  mine = given_idx[g_u == t_u[j]]
  order = mine[np.lexsort((mine, np.asarray(ds.ratings["timestamp"])[mine]))]
  want = feat.side_values(enc, [np.asarray(ds.ratings["user_rating"])[order]])
  assert np.allclose(side[j][valid[j]], want)
