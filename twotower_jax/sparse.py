"""Sparse embedding updates: a step reads, differentiates and writes only the rows it uses.

With a catalogue of millions of items the dense update of the tables of id features (user and item ids)
(every row, every step) costs more than the whole forward and backward pass. With
``optimizer.sparse_embeddings`` the step instead

1. collects the unique ids each large table is looked up with in the batch (a fixed
   number of slots, padded with an out-of-range id, so shapes stay static);
2. gathers those rows of the table and of every optimizer-state leaf shaped like it;
3. runs the model on the rows (ids remapped into them), takes the gradient with respect
   to the rows, runs the unchanged optax update on the gathered slice;
4. scatters the new rows back (padding slots are dropped).

For Adagrad and SGD without weight decay this equals the dense update: a row with a zero
gradient is left unchanged by both. Adam's moments and weight decay become lazy (rows a
batch does not use keep their moments and are not decayed), as in TF's ``LazyAdam``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# (tower, feature, batch entries looked up in it): one table that grows with users or
# items (an ``id`` feature; ``TwoTower.sparse_tables``). The feature names both the
# embedding module and the model input; a candidate table also serves the extra negatives.
Table = tuple[str, str, tuple[str, ...]]


def unique_rows(ids: Array, num_rows: int) -> tuple[Array, Array]:
  """Unique ids padded with ``num_rows`` to ``ids.size`` slots, and ``ids`` remapped into them."""
  flat = ids.reshape(-1)
  rows_S, inverse = jnp.unique(flat, size=flat.shape[0], fill_value=num_rows,
                               return_inverse=True)
  return rows_S, inverse.reshape(ids.shape)


def remap(tables: tuple[Table, ...], params: Any, batch: dict[str, Any]
          ) -> tuple[dict[tuple[str, str], Array], dict[str, Any]]:
  """Rows of each sparse table used by ``batch``, and the batch with its ids remapped."""
  rows = {}
  batch = dict(batch)
  for tower, name, entries in tables:
    feature = name
    present = [e for e in entries if e in batch]
    sizes = [batch[e][feature].shape[0] for e in present]
    rows[(tower, name)], inverse = unique_rows(
        jnp.concatenate([batch[e][feature] for e in present]),
        params[tower][name]["embedding"].shape[0])
    for e, part in zip(present, jnp.split(inverse, np.cumsum(sizes)[:-1].tolist())):
      batch[e] = {**batch[e], feature: part}
  return rows, batch


def table_of(path, leaf, shapes: dict[tuple[str, str], tuple[int, ...]]):
  """(tower, name) if ``leaf`` (at ``path`` in params or optimizer state) is such a table."""
  keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
  if len(keys) >= 3 and keys[-1] == "embedding" and keys[-3:-1] in shapes:
    if getattr(leaf, "shape", None) == shapes[keys[-3:-1]]:
      return keys[-3:-1]
  return None


def gather(tree: Any, rows: dict[tuple[str, str], Array], shapes) -> Any:
  """``tree`` (params or optimizer state) with each sparse-table leaf cut to ``rows``."""
  def cut(path, leaf):
    t = table_of(path, leaf, shapes)
    return leaf if t is None else leaf.at[rows[t]].get(mode="fill", fill_value=0)
  return jax.tree_util.tree_map_with_path(cut, tree)


def scatter(full: Any, sub: Any, rows: dict[tuple[str, str], Array], shapes) -> Any:
  """``full`` with the sliced leaves of ``sub`` written back at ``rows`` (padding dropped)."""
  def put(path, leaf, new):
    t = table_of(path, leaf, shapes)
    return new if t is None else leaf.at[rows[t]].set(new, mode="drop")
  return jax.tree_util.tree_map_with_path(put, full, sub)


def shapes_of(params: Any, tables: tuple[Table, ...]) -> dict[tuple[str, str], tuple[int, ...]]:
  """The shape of each table of ``tables`` in ``params``."""
  return {(tower, name): params[tower][name]["embedding"].shape for tower, name, _ in tables}


def variables(sub_params: Any, full_params: Any, shapes) -> dict[str, Any]:
  """Model variables: full tables under "params" (shapes only), the rows under "sparse_rows"."""
  params = dict(sub_params)  # copied down to each changed tower below
  rows: dict[str, Any] = {}
  for tower, name in shapes:
    params[tower] = dict(params[tower])
    params[tower][name] = {"embedding": jax.lax.stop_gradient(full_params[tower][name]["embedding"])}
    rows.setdefault(tower, {})[name] = {"embedding": sub_params[tower][name]["embedding"]}
  return {"params": params, "sparse_rows": rows}
