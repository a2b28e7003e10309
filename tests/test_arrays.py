"""Key-to-row lookup and padding, against direct Python references."""

import numpy as np
import pytest

from twotower_jax import arrays


def reference_rows(keys, values):
  return np.array([next((i for i, k in enumerate(keys) if k == v), -1) for v in values])


@pytest.mark.parametrize("keys", [
    np.array([5, 3, 3, 9, 0]),  # small ints with a duplicate: the dense path
    np.random.default_rng(0).integers(0, 10**9, 100),  # sparse ints: binary search
    np.array([-4, 2, 7]),  # negative keys: binary search
    np.array(["b", "a", "c", "a"]),
])
def test_rows_match_a_linear_scan(keys):
  values = np.concatenate([keys[:50], keys[:3][::-1]])
  extra = np.array(["zz", ""]) if keys.dtype.kind == "U" else np.array([-1, 8, 10**12])
  values = np.concatenate([values, extra])
  np.testing.assert_array_equal(arrays.find_rows(keys, values), reference_rows(keys, values))


def test_empty_keys_find_nothing():
  assert arrays.find_rows(np.array([], np.int64), np.array([1, 2])).tolist() == [-1, -1]


def test_pad_rows_and_size_bucket():
  x = np.arange(6).reshape(3, 2)
  padded = arrays.pad_rows(x, 5, -1)
  assert padded.shape == (5, 2) and (padded[3:] == -1).all() and (padded[:3] == x).all()
  assert arrays.pad_rows(x, 3) is x
  with pytest.raises(ValueError, match="do not fit"):
    arrays.pad_rows(x, 2)
  assert [arrays.size_bucket(n) for n in (1, 8, 9, 100)] == [8, 8, 16, 128]
