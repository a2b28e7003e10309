"""Every model/training switch trains end to end on tiny data with a finite, falling loss."""

import json
import pathlib

import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax import serving
from twotower_jax import train
from conftest import write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]

OPTIONS = {
    "logq_counts": {"loss.logq": "counts"},
    "logq_streaming": {"loss.logq": "streaming", "loss.streaming_buckets": 256},
    "mixed_negatives": {"loss.logq": "counts", "loss.num_uniform_negatives": 16},
    "hard_negatives_and_accidental_hits": {"loss.num_hard_negatives": 10,
                                           "loss.remove_accidental_hits": True},
    "l2_learned_temperature": {"model.l2_normalize": True, "model.learn_temperature": True,
                               "model.temperature": 0.1},
    "adamw_warmup_cosine": {"optimizer.name": "adamw", "optimizer.learning_rate": 0.01,
                            "optimizer.weight_decay": 1e-4, "optimizer.schedule": "cosine",
                            "optimizer.warmup_steps": 5, "optimizer.grad_clip_norm": 1.0},
    "all_features": {"features.user_id": True, "features.genres": "all",
                     "features.title_words": True, "features.release_year": True},
    "temporal_split": {"data.split": "temporal"},
    "sparse_embeddings": {"features.user_id": True, "optimizer.sparse_embeddings": True},
    "padded_split_tables": {"features.user_id": True, "train.shard_embeddings": True,
                            "model.table_rows_multiple": 64},
    "recency_weights": {"data.split": "temporal", "train.recency_half_life_days": 30.0},
    "leave_last_out_split": {"data.split": "leave_last_out"},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80, num_movies=150,
                                num_ratings=3000, seed=6)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_trains(name, data_dir, tmp_path):
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py")
  cfg.data.dir = str(data_dir)
  cfg.data.download = False
  cfg.eval.baselines = False
  cfg.train.num_epochs = 3
  cfg.optimizer.name = "adam"  # learns visibly in 3 tiny epochs (Adagrad 0.1 barely moves)
  cfg.optimizer.learning_rate = 0.01
  for key, value in OPTIONS[name].items():
    config_lib.set_path(cfg, key, value)
  m = train.train_and_evaluate(cfg, str(tmp_path))
  losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert 0.0 <= m["include_seen/hr_100"] <= 1.0 and m["exclude_seen/hr_100"] >= 0.0
  if name == "padded_split_tables":  # padded tables serve like any other
    params = train.load_params(tmp_path)
    assert params["candidate"]["title"]["embedding"].shape[0] % 64 == 0
    rec = serving.load(tmp_path / "serving")
    assert rec.recommend(rec.user_features([1]), 5).movie_id.shape == (1, 5)
  if name == "l2_learned_temperature":
    params = train.load_params(tmp_path)
    assert float(np.exp(params["log_temperature"])) != pytest.approx(0.1)
