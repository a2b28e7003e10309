"""Every model/training switch trains end to end on tiny data and observably takes effect."""

import json
import pathlib

import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax import serving
from twotower_jax import train
from twotower_jax import checkpoints
from conftest import write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_USERS, NUM_RATINGS = 80, 3000
NUM_EPOCHS = 3

# name -> (overrides, baseline): the option's per-epoch losses must differ from those of a run
# with the same seed and the baseline's overrides alone (the option switched off). None: the
# option changes no arithmetic (padding, sharding); its own checks below show it took effect.
# "variant" picks a variant of configs/tiny.py (its feature specs): "user_id" adds the user id
# to the query tower, "all" also the candidate's genre bag, title words and release year.
OPTIONS = {
    "logq_counts": ({"loss.logq": "counts"}, {}),
    "logq_streaming": ({"loss.logq": "streaming", "loss.streaming_buckets": 256}, {}),
    "mixed_negatives": ({"loss.logq": "counts", "loss.num_uniform_negatives": 16},
                        {"loss.logq": "counts"}),
    "hard_negatives_and_accidental_hits": ({"loss.num_hard_negatives": 10,
                                            "loss.remove_accidental_hits": True}, {}),
    "l2_learned_temperature": ({"model.l2_normalize": True, "model.learn_temperature": True,
                                "model.temperature": 0.1}, {}),
    "adamw_warmup_cosine": ({"optimizer.name": "adamw", "optimizer.learning_rate": 0.01,
                             "optimizer.weight_decay": 1e-4, "optimizer.schedule": "cosine",
                             "optimizer.warmup_steps": 5, "optimizer.grad_clip_norm": 1.0}, {}),
    "all_features": ({"variant": "all"}, {}),
    "temporal_split": ({"data.split": "temporal"}, {}),
    "sparse_embeddings": ({"variant": "user_id", "optimizer.sparse_embeddings": True},
                          {"variant": "user_id"}),
    "padded_split_tables": ({"variant": "user_id", "train.shard_embeddings": True,
                             "model.table_rows_multiple": 64}, None),
    "recency_weights": ({"data.split": "temporal", "train.recency_half_life_days": 30.0},
                        {"data.split": "temporal"}),
    "leave_last_out_split": ({"data.split": "leave_last_out"}, {}),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=NUM_USERS,
                                num_movies=150, num_ratings=NUM_RATINGS, seed=6)


def run(data_dir, workdir, overrides, num_epochs):
  """Trains tiny.py (its ``overrides["variant"]``) with ``overrides``; returns (metrics,
  per-epoch losses)."""
  overrides = dict(overrides)
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py", overrides.pop("variant", ""))
  cfg.data.dir = str(data_dir)
  cfg.data.download = False
  cfg.eval.baselines = False
  cfg.train.num_epochs = num_epochs
  cfg.optimizer.name = "adam"  # learns visibly in 3 tiny epochs (Adagrad 0.1 barely moves)
  cfg.optimizer.learning_rate = 0.01
  for key, value in overrides.items():
    config_lib.set_path(cfg, key, value)
  m = train.train_and_evaluate(cfg, str(workdir))
  losses = [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return m, losses


@pytest.fixture(scope="module")
def baseline_losses(data_dir, tmp_path_factory):
  """Per-epoch losses of a run with the given overrides (each baseline trained once)."""
  cache = {}

  def get(overrides):
    key = tuple(sorted(overrides.items()))
    if key not in cache:
      cache[key] = run(data_dir, tmp_path_factory.mktemp("baseline"), overrides, NUM_EPOCHS)[1]
    return cache[key]

  return get


def ratings_file(data_dir):
  """u.data as an int64 array [user, movie, rating, timestamp]."""
  return np.loadtxt(data_dir / "u.data", dtype=np.int64)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_trains(name, data_dir, baseline_losses, tmp_path):
  overrides, baseline = OPTIONS[name]
  m, losses = run(data_dir, tmp_path, overrides, NUM_EPOCHS)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert 0.0 <= m["include_seen/hr_100"] <= 1.0 and m["exclude_seen/hr_100"] >= 0.0
  if baseline is not None:  # the option changes training (identical runs match exactly)
    base = baseline_losses(baseline)
    assert np.max(np.abs(np.subtract(losses, base))) > 1e-4, (losses, base)

  split = overrides.get("data.split", "random")
  assert m["split"] == split
  assert json.loads((tmp_path / "config.json").read_text())["data"]["split"] == split
  with np.load(tmp_path / "serving" / "users.npz") as f:
    users = {k: f[k] for k in f.files}  # per user: the latest training rating's columns
  r = ratings_file(data_dir)
  if split == "temporal":  # training holds exactly the earliest num_train ratings
    assert m["num_train"] + m["num_test"] == NUM_RATINGS
    assert users["col:timestamp"].max() == np.sort(r[:, 3])[m["num_train"] - 1]
  if split == "leave_last_out":  # each user's latest rating is the test one
    assert m["num_test"] == NUM_USERS and m["num_train"] == NUM_RATINGS - NUM_USERS
    for u, latest_train in zip(users["user_key"], users["col:timestamp"]):
      assert latest_train == np.sort(r[r[:, 0] == u, 3])[-2]

  if name == "all_features":  # the extra features have their own tables
    params = checkpoints.load_params(tmp_path)
    assert "user_id" in params["query"]
    assert {"title_words", "release_year"} <= set(params["candidate"])
  if name == "padded_split_tables":  # padded tables serve like any other
    params = checkpoints.load_params(tmp_path)
    assert params["candidate"]["title"]["embedding"].shape[0] % 64 == 0
    assert params["query"]["user_id"]["embedding"].shape[0] % 64 == 0
    rec = serving.load(tmp_path / "serving")
    assert rec.recommend(rec.user_features([1]), 5).item_id.shape == (1, 5)
  if name == "l2_learned_temperature":
    params = checkpoints.load_params(tmp_path)
    assert float(np.exp(params["log_temperature"])) != pytest.approx(0.1)
