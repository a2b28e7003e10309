"""The TFDS source: same columns as the GroupLens parser, tested without network.

TFDS's own MovieLens 100K parser turns the synthetic fixture files into
examples, which ``tfds.testing.mock_data`` then serves to ``load_tfds``.
Needs the ``tfds`` extra (``pip install "twotower_jax[tfds]"``); the
"extra missing" message is tested without it.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.data import dataset, movielens, sources, tfds_source


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def tfds_examples(tfds, ml100k_dir):
  """TFDS's own parse of the synthetic files, per builder config (read outside the mock)."""
  parsing = pytest.importorskip("tensorflow_datasets.structured.movielens_parsing")
  return {
      "100k-ratings": [ex for _, ex in parsing.parse_100k_ratings_data(str(ml100k_dir))],
      "100k-movies": [ex for _, ex in parsing.parse_100k_movies_data(str(ml100k_dir))],
  }


def _serve(examples):
  """An ``as_dataset_fn`` for mock_data serving ``examples[config name]``."""
  import tensorflow as tf

  def as_dataset(self, *args, **kwargs):
    del args, kwargs
    encoded = [self.info.features.encode_example(ex) for ex in examples[self.builder_config.name]]
    return tf.data.Dataset.from_generator(
        lambda: iter(encoded), output_signature=self.info.features.get_tensor_spec())
  return as_dataset


@pytest.fixture(scope="module")
def from_tfds(tfds, tfds_examples):
  with tfds.testing.mock_data(as_dataset_fn=_serve(tfds_examples)):
    return tfds_source.load_tfds()


def test_tfds_columns_equal_the_grouplens_parse(from_tfds, ml100k_dir):
  ref = movielens.load_movielens_100k(ml100k_dir)
  assert from_tfds.source == "tfds"
  assert from_tfds.genre_names == ref.genre_names
  assert set(from_tfds.ratings) == set(ref.ratings)
  for name, col in ref.ratings.items():
    assert from_tfds.ratings[name].dtype == col.dtype, name
    np.testing.assert_array_equal(from_tfds.ratings[name], col, err_msg=name)
  for name in ("movie_id", "movie_title", "movie_genres"):
    np.testing.assert_array_equal(from_tfds.movies[name], ref.movies[name], err_msg=name)
  for name, col in ref.users.items():
    np.testing.assert_array_equal(from_tfds.users[name], col, err_msg=name)


def test_tfds_hand_checked_values(from_tfds):
  m = from_tfds.movies
  assert m["movie_title"][1] == "Café Crème à Noël (1994)"  # latin-1 -> UTF-8 -> str
  np.testing.assert_array_equal(m["movie_genres"][0], [1, 2, 5, 15, 16])
  # No release date in TFDS: the year comes from the title, so movie 3 has one.
  assert m["movie_release_year"][1] == 1994
  assert m["movie_release_year"][2] == int(m["movie_title"][2][-5:-1])


def test_tfds_genre_labels_are_mapped_by_name(tfds, tfds_examples):
  examples = {"100k-movies": [{"movie_id": "1", "movie_title": "A (1990)",
                               "movie_genres": ["Western", "Children", "Unknown"]},
                              {"movie_id": "2", "movie_title": "B", "movie_genres": []}],
              "100k-ratings": tfds_examples["100k-ratings"][:0]}
  one = dict(tfds_examples["100k-ratings"][0], movie_id="1",
             movie_genres=["Western", "Children", "Unknown"])
  examples["100k-ratings"] = [one]
  with tfds.testing.mock_data(as_dataset_fn=_serve(examples)):
    ds = tfds_source.load_tfds()
  # u.genre ids: unknown 0, Children's 4, Western 18.
  np.testing.assert_array_equal(ds.movies["movie_genres"], [[0, 4, 18], [-1, -1, -1]])
  np.testing.assert_array_equal(ds.ratings["movie_genres"], [[0, 4, 18]])
  np.testing.assert_array_equal(ds.movies["movie_release_year"], [1990, -1])


def test_tfds_random_mock_data_gives_data_error(tfds):
  # Random bytes as ids must be reported, not crash with a numpy error.
  with (tfds.testing.mock_data(num_examples=4),
        pytest.raises(dataset.DataError, match="feature 'user_id' holds .* expected an integer")):
    tfds_source.load_tfds()


def test_load_dispatches_to_tfds(tfds, tfds_examples, from_tfds):
  cfg = config_lib.base_config().data
  cfg.source = "tfds"
  with tfds.testing.mock_data(as_dataset_fn=_serve(tfds_examples)):
    ds = sources.load_dataset(cfg)
  np.testing.assert_array_equal(ds.ratings["timestamp"], from_tfds.ratings["timestamp"])


def test_tfds_not_prepared_and_no_download(tfds, tmp_path):
  with pytest.raises(dataset.DataError, match=r"TFDS could not load movielens/100k-ratings.*Fix:"):
    tfds_source.load_tfds(str(tmp_path), download=False)


def test_missing_tfds_extra_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
  with pytest.raises(dataset.DataError, match=r'pip install "twotower_jax\[tfds\]"'):
    tfds_source.load_tfds()
  cfg = config_lib.base_config().data
  cfg.source = "tfds"
  with pytest.raises(dataset.DataError, match="source=tfds needs tensorflow-datasets"):
    sources.load_dataset(cfg)
