"""With a validation split, test interactions are evaluated with the validation interactions
as part of what is known before them: in the model's history windows, in the exclusions,
and in the baselines' histories; the model's parameters never saw them."""

import numpy as np
import pytest

import conftest
from conftest import write_synthetic_ml100k
from twotower_jax import evaluate
from twotower_jax import features as feat
from twotower_jax import input_pipeline


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
  data = write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=50,
                                num_movies=40, num_ratings=1500, seed=4)
  cfg = conftest.tiny_config(data, "history", **{"data.split": "temporal",
                                                 "data.validation_fraction": 0.2})
  return input_pipeline.prepare(cfg)


def test_known_before_test_is_training_plus_validation(prep):
  user, item, time, cols = evaluate.known_before_test(prep)
  assert np.array_equal(user, np.concatenate([prep.train_user, prep.valid_user]))
  assert np.array_equal(item, np.concatenate([prep.train_item, prep.valid_item]))
  assert np.array_equal(time, np.concatenate([prep.train["timestamp"],
                                              prep.validation["timestamp"]]))
  assert len(cols["movie_id"]) == len(user)


def test_test_windows_hold_the_validation_interactions_before_them(prep):
  q = evaluate.test_queries(prep)
  enc = prep.encoders["history"]
  users = np.concatenate([prep.train["user_id"], prep.validation["user_id"],
                          prep.test["user_id"]])
  movies = np.concatenate([prep.train["movie_id"], prep.validation["movie_id"],
                           prep.test["movie_id"]])
  times = np.concatenate([prep.train["timestamp"], prep.validation["timestamp"],
                          prep.test["timestamp"]])
  n_known = len(prep.train["user_id"]) + len(prep.validation["user_id"])
  changed = 0
  for j in range(len(prep.test_item)):
    r = n_known + j
    before = np.flatnonzero((users == users[r]) & (times < times[r]))
    before = before[np.lexsort((before, times[before]))]  # by time, ties by log order
    want = feat.encode_histories(enc, [movies[before]])[0]
    assert np.array_equal(q["history"][j], want), j
    changed += not np.array_equal(q["history"][j], prep.test_q["history"][j])
  assert changed > 0  # the temporal validation part lies right before the test period

