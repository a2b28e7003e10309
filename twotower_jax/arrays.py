"""Small array helpers used across the package: key-to-row lookup, padding to a fixed shape.

Each is written once here, so that every module maps ids to rows and pads batches the
same way.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclasses.dataclass(frozen=True)
class KeyIndex:
  """Rows of keys in a table of keys (any order), by binary search over a sorted copy.

  ``KeyIndex.build(keys_N).rows(values)`` is the row of each value, -1 where absent. With
  duplicated keys the first row holding the key is returned.
  """

  keys_N: np.ndarray
  order_N: np.ndarray  # keys_N[order_N] is sorted (stable)
  sorted_N: np.ndarray
  # Small non-negative integer keys: row of every key value 0..max (-1: absent), so a
  # lookup is one gather instead of a binary search.
  dense_K: np.ndarray | None = None

  @classmethod
  def build(cls, keys_N) -> KeyIndex:
    keys_N = np.asarray(keys_N).reshape(-1)
    order = np.argsort(keys_N, kind="stable")
    sorted_N = keys_N[order]
    dense = None
    if keys_N.dtype.kind in "iu" and keys_N.size and sorted_N[0] >= 0 and (
        sorted_N[-1] < 4 * keys_N.size + 1024):
      dense = np.full(int(sorted_N[-1]) + 1, -1, np.int64)
      dense[keys_N[order[::-1]]] = order[::-1]  # the first row of a duplicated key wins
    return cls(keys_N=keys_N, order_N=order, sorted_N=sorted_N, dense_K=dense)

  def __len__(self) -> int:
    return int(self.keys_N.shape[0])

  def rows(self, values) -> np.ndarray:
    """Row of each value (any shape), -1 for values not among the keys."""
    values = np.asarray(values)
    if len(self) == 0:
      return np.full(values.shape, -1, np.int64)
    if self.dense_K is not None and values.dtype.kind in "iu":
      inside = (values >= 0) & (values < len(self.dense_K))
      return np.where(inside, self.dense_K[np.where(inside, values, 0)], -1)
    if self.sorted_N.dtype.kind in "US" and values.dtype.kind not in "US":
      values = values.astype(self.sorted_N.dtype.kind)
    pos = np.minimum(np.searchsorted(self.sorted_N, values), len(self) - 1)
    found = self.sorted_N[pos] == values
    return np.where(found, self.order_N[pos], -1).astype(np.int64)


def find_rows(keys_N, values) -> np.ndarray:
  """Row of each of ``values`` in ``keys_N`` (any order), -1 where absent.

  Pyarrow arrays (string keys of one's own data) are matched by pyarrow's hash join.
  """
  if isinstance(keys_N, (pa.Array, pa.ChunkedArray)) or isinstance(
      values, (pa.Array, pa.ChunkedArray)):
    keys, vals = pa.array(keys_N) if isinstance(keys_N, np.ndarray) else keys_N, values
    vals = pa.array(np.asarray(vals).reshape(-1)) if not isinstance(
        vals, (pa.Array, pa.ChunkedArray)) else vals
    if not vals.type.equals(keys.type):
      vals = vals.cast(keys.type)
    return pc.fill_null(pc.index_in(vals, value_set=keys), -1).to_numpy(
        zero_copy_only=False).astype(np.int64)
  return KeyIndex.build(keys_N).rows(values)


def size_bucket(n: int, minimum: int = 8) -> int:
  """Smallest power of two >= n (and >= ``minimum``): few distinct shapes, few compiles."""
  return max(minimum, 1 << (int(n) - 1).bit_length())


def pad_rows(x: np.ndarray, size: int, fill=0) -> np.ndarray:
  """``x`` with rows of ``fill`` appended up to ``size`` rows (``x`` itself if already there)."""
  x = np.asarray(x)
  if x.shape[0] == size:
    return x
  if x.shape[0] > size:
    raise ValueError(f"pad_rows: {x.shape[0]} rows do not fit in {size}.")
  pad = np.full((size - x.shape[0],) + x.shape[1:], fill, x.dtype)
  return np.concatenate([x, pad])
