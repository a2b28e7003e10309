"""Devices and placement: the CPU device split, the ("data",) mesh, shardings, transfers.

Training is data parallel over one ("data",) mesh of every device. Parameters and
optimizer state are replicated, except (``train.shard_embeddings``) the large embedding
tables, whose rows are split over "data". Host arrays reach the devices through
``to_devices`` (replicated data) and ``put_batches`` (the epoch's batch indices, sharded
along the batch axis); ``host_params`` brings parameters back whole.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from twotower_jax import sparse

Array = jax.Array


def configure_cpu_devices(requested: int, batch_size: int) -> int:
  """Splits the host CPU into several XLA devices so data parallelism uses every core.

  XLA runs most element-wise work of one device on one thread; with one device
  per core, the [B, B] in-batch softmax is split by rows across cores. ``requested``
  0 means one device per available core, lowered to a divisor of ``batch_size``.
  Must run before JAX starts its backends; returns the device count asked for
  (1: nothing changed).
  """
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  n = requested or cores or 1
  n = max(1, min(n, batch_size))
  while batch_size % n:
    n -= 1
  if n <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 1
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:  # backends already started (e.g. inside a test session)
    logging.warning("Could not split the CPU into %d devices (%s); using one.", n, e)
    return 1
  return n


def make_mesh() -> jax.sharding.Mesh:
  """One ("data",) mesh over every device."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharding_2d(mesh) -> jax.sharding.NamedSharding:
  """[steps, B] arrays split over "data" along the batch axis."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))


def state_shardings(state: Any, mesh: jax.sharding.Mesh, tables: tuple[sparse.Table, ...],
                    shard_embeddings: bool) -> Any:
  """Replicated everywhere, except (with ``shard_embeddings``) the ``tables`` (of ``id``
  features) and their optimizer-state twins, whose rows are split over "data"."""
  rep = replicated(mesh)
  if not shard_embeddings:
    return jax.tree_util.tree_map(lambda _: rep, state)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  shapes = sparse.shapes_of(state.params, tables)
  for (_, name), shape in shapes.items():
    if shape[0] % mesh.size:
      raise ValueError(
          f"train.shard_embeddings: the {name} table has {shape[0]} rows, which do not split "
          f"over {mesh.size} devices. Set model.table_rows_multiple to a multiple of "
          f"{mesh.size} (e.g. 128) to pad it with unused rows.")
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: rows if sparse.table_of(path, leaf, shapes) else rep, state)


def to_devices(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host arrays (the same on every process) as global arrays with ``sharding``."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                             lambda idx: np.asarray(x)[idx]), tree)


def put_batches(idx_SxB: np.ndarray, mesh) -> Array:
  """Epoch batch indices as a global array sharded over "data" along the batch axis.

  With several processes (``config.distributed``) each process supplies its own
  contiguous share of every batch, so each reads only its share of the examples.
  """
  sharding = batch_sharding_2d(mesh)
  if jax.process_count() == 1:
    return jax.device_put(idx_SxB, sharding)
  per = idx_SxB.shape[1] // jax.process_count()
  lo = jax.process_index() * per
  return jax.make_array_from_process_local_data(sharding, idx_SxB[:, lo:lo + per],
                                                idx_SxB.shape)


def host_params(params: Any) -> Any:
  """Parameters as host arrays, whole (row-sharded tables gathered from every process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)
