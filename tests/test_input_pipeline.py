"""The input pipeline's index maps: users and catalogue rows, for integer and string keys."""

import numpy as np
import pyarrow as pa
import pytest

from twotower_jax import input_pipeline
from twotower_jax.data.dataset import DataError


@pytest.mark.parametrize("high", [1_000, 10**12])  # counting path, and sorting path
def test_user_index_ranks_users_like_sorting(high):
  rng = np.random.default_rng(0)
  train, test = rng.integers(0, high, 5_000), rng.integers(0, high, 700)
  users = np.unique(np.concatenate([train, test]))
  got_train, got_test, n = input_pipeline.user_index(train, test)
  np.testing.assert_array_equal(got_train, np.searchsorted(users, train))
  np.testing.assert_array_equal(got_test, np.searchsorted(users, test))
  assert n == len(users)


def test_user_index_of_string_keys_is_consistent():
  train, test = pa.array(["b", "a", "b", "c"]), pa.array(["c", "d"])
  got_train, got_test, n = input_pipeline.user_index(train, test)
  assert n == 4 and got_train[0] == got_train[2] and got_test[0] == got_train[3]
  assert len(set(got_train.tolist() + got_test.tolist())) == 4


def test_item_index_names_an_item_outside_the_catalogue():
  assert input_pipeline.item_index(np.array([7, 3, 9]), np.array([9, 7]), "x").tolist() == [
      2, 0]
  assert input_pipeline.item_index(pa.array(["a", "b"]), pa.array(["b"]), "x").tolist() == [1]
  with pytest.raises(DataError, match=r"test interactions: item 'z' is not in the catalogue "
                     r"\(1 such rows\)"):
    input_pipeline.item_index(pa.array(["a", "b"]), pa.array(["a", "z"]), "test interactions")
