"""Feature encoders: Keras lookup/discretization/normalization semantics, plain-data I/O."""

import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax import features as feat


def test_vocab_orders_by_frequency_then_value_and_oov_is_zero():
  enc = feat.fit_vocab(np.array(["b", "a", "c", "a", "b", "a"]))
  assert enc["vocab"].tolist() == ["a", "b", "c"]
  assert feat.lookup(enc, np.array(["a", "c", "zzz", "b"])).tolist() == [1, 3, 0, 2]
  assert feat.vocab_size(enc) == 4


def test_integer_vocab_keeps_padding():
  enc = feat.fit_vocab(np.array([[5, -1], [7, 5], [9, -1]]))
  assert enc["vocab"].tolist() == [5, 7, 9]
  assert feat.lookup(enc, np.array([[9, -1], [4, 5]])).tolist() == [[3, -1], [0, 1]]


def test_vocab_max_size_truncates_rare_values():
  enc = feat.fit_vocab(np.array([1, 1, 2, 3, 3, 3]), max_size=2)
  assert enc["vocab"].tolist() == [3, 1]
  assert feat.lookup(enc, np.array([2])).tolist() == [0]


def test_discretize_matches_keras_bucket_boundaries():
  enc = {"kind": "discretize", "boundaries": np.array([0.0, 10.0, 100.0])}
  # Keras Discretization docs: [-5, 10000, 150, 10, 5, 100] -> [0, 3, 3, 2, 1, 3].
  got = feat.discretize(enc, np.array([-5, 10000, 150, 10, 5, 100]))
  assert got.tolist() == [0, 3, 3, 2, 1, 3]


def test_discretizer_spans_training_range():
  enc = feat.fit_discretizer(np.array([10, 20, 30]), num_buckets=5)
  assert enc["boundaries"].tolist() == [10.0, 15.0, 20.0, 25.0, 30.0]
  assert feat.discretize(enc, np.array([9, 10, 29, 30, 31])).tolist() == [0, 1, 4, 5, 5]


def test_normalizer():
  enc = feat.fit_normalizer(np.array([1.0, 2.0, 3.0, 4.0]))
  assert enc["mean"] == 2.5 and enc["var"] == pytest.approx(1.25)
  np.testing.assert_allclose(feat.normalize(enc, np.array([2.5, 3.618034])), [0.0, 1.0],
                             atol=1e-5)


def test_tokenize_titles_drops_year_and_lowercases():
  words = feat.tokenize_titles(
      np.array(["Toy Story (1995)", "Amélie: Le Fabuleux (2001)", "Ça_va, Schindler's List"]), 3)
  assert words.tolist() == [["toy", "story", ""], ["amélie", "le", "fabuleux"],
                            ["ça", "va", "schindler's"]]


def _toy_columns():
  train = {
      "user_id": np.array([1, 2, 2, 3]),
      "raw_user_age": np.array([20.0, 30.0, 30.0, 40.0], np.float32),
      "user_gender": np.array([True, False, False, True]),
      "user_occupation_text": np.array(["writer", "artist", "artist", "doctor"]),
      "timestamp": np.array([100, 200, 300, 400]),
      "movie_id": np.array([10, 11, 10, 12]),
      "movie_title": np.array(["A (1990)", "B (1991)", "A (1990)", "C (1992)"]),
      "movie_genres": np.array([[0, 1], [2, -1], [0, 1], [1, -1]], np.int32),
  }
  movies = {
      "movie_id": np.array([10, 11, 12, 13]),
      "movie_title": np.array(["A (1990)", "B (1991)", "C (1992)", "D (1993)"]),
      "movie_genres": np.array([[0, 1], [2, -1], [1, -1], [3, -1]], np.int32),
      "movie_release_year": np.array([1990, 1991, 1992, -1], np.int32),
  }
  return train, movies


def test_fit_and_encode_on_training_data_only():
  train, movies = _toy_columns()
  cfg = config_lib.base_config().features
  cfg.user_id = True
  cfg.genres = "all"
  cfg.num_time_buckets = 4
  enc = feat.fit_encoders(train, movies, cfg)
  q = feat.encode_queries(enc, train)
  assert q["occupation"].tolist() == [3, 1, 1, 2]  # artist (2x), doctor, writer
  assert q["time_bucket"].tolist() == [1, 2, 3, 3]  # the maximum shares the last bucket
  np.testing.assert_allclose(q["age"].mean(), 0.0, atol=1e-6)
  c = feat.encode_candidates(enc, movies, cfg)
  # Movie 13 (never in training) gets the OOV title; genre 3 (unseen) is OOV too.
  assert c["title"].tolist() == [1, 2, 3, 0]
  assert c["genres"][3].tolist() == [0, -1]
  sizes = feat.vocab_sizes(enc)
  assert sizes["title"] == 4 and sizes["time_bucket"] == 5 and sizes["user_id"] == 4


def test_unknown_values_at_inference_map_to_oov():
  train, movies = _toy_columns()
  enc = feat.fit_encoders(train, movies, config_lib.base_config().features)
  q = feat.encode_queries(enc, {
      "raw_user_age": np.array([25.0]), "user_gender": np.array([True]),
      "user_occupation_text": np.array(["astronaut"]), "timestamp": np.array([10**10])})
  assert q["occupation"].tolist() == [0]
  # Beyond the training range: the last populated bucket, not an untrained one.
  assert q["time_bucket"].tolist() == [len(enc["time_bucket"]["boundaries"]) - 1]


def test_missing_column_names_the_flag():
  train, movies = _toy_columns()
  del train["user_occupation_text"]
  with pytest.raises(ValueError, match="features.occupation=False"):
    feat.fit_encoders(train, movies, config_lib.base_config().features)


def test_save_load_round_trip(tmp_path):
  train, movies = _toy_columns()
  cfg = config_lib.base_config().features
  cfg.title_words = True
  cfg.release_year = True
  enc = feat.fit_encoders(train, movies, cfg)
  feat.save_encoders(enc, tmp_path)
  back = feat.load_encoders(tmp_path)
  assert set(back) == set(enc)
  for name in enc:
    for key, value in enc[name].items():
      np.testing.assert_array_equal(np.asarray(back[name][key]), np.asarray(value))
  c1 = feat.encode_candidates(enc, movies, cfg)
  c2 = feat.encode_candidates(back, movies, cfg)
  for k in c1:
    np.testing.assert_array_equal(c1[k], c2[k])


def test_load_missing_encoders_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="encoders.json is missing"):
    feat.load_encoders(tmp_path)


def test_unknown_config_key_is_rejected_with_suggestion():
  cfg = config_lib.base_config()
  cfg.optimizer.lerning_rate = 0.1
  with pytest.raises(ValueError, match="Did you mean 'learning_rate'"):
    config_lib.check_keys(cfg, config_lib.base_config())


def test_set_path_casts_strings_and_rejects_unknown_keys():
  cfg = config_lib.base_config()
  config_lib.set_path(cfg, "train.batch_size", "512")
  config_lib.set_path(cfg, "features.user_id", "true")
  assert cfg.train.batch_size == 512 and cfg.features.user_id is True
  with pytest.raises(ValueError, match="Did you mean 'batch_size'"):
    config_lib.set_path(cfg, "train.batch_sze", 1)
  with pytest.raises(ValueError, match=r"no 'trian' here\)\. Did you mean 'train'"):
    config_lib.set_path(cfg, "trian.batch_size", 1)
  with pytest.raises(ValueError, match=r"Valid keys here: \[.*'num_epochs'"):
    config_lib.set_path(cfg, "train.qqq", 1)
  with pytest.raises(ValueError, match="'train.batch_size' is a value, not a section"):
    config_lib.set_path(cfg, "train.batch_size.x", 1)
