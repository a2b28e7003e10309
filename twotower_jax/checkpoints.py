"""Checkpoints: the orbax manager of a workdir, restore-latest with fallback, load-params."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(workdir: pathlib.Path, max_to_keep: int) -> ocp.CheckpointManager:
  """The manager of ``workdir/checkpoints`` (created if missing)."""
  return ocp.CheckpointManager(
      (pathlib.Path(workdir) / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def restore_latest(mngr: ocp.CheckpointManager, state: Any) -> Any:
  """The newest checkpoint that restores into ``state``'s structure; a corrupt one is
  skipped with a warning. ``state`` itself when there is none."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return mngr.restore(step, args=ocp.args.StandardRestore(state))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
      logging.warning("Checkpoint at step %d could not be restored (%s); trying the previous "
                      "one.", step, e)
  return state


def load_params(workdir: str | pathlib.Path) -> Any:
  """The model parameters of the newest checkpoint in ``workdir`` (as a nested dict)."""
  mngr = ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").absolute(),
                               item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints; train first.")
    # Onto one local device, whatever devices and processes saved it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        mngr.item_metadata(step))
    return mngr.restore(step, args=ocp.args.StandardRestore(target))["params"]
  finally:
    mngr.close()
