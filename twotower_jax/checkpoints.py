"""Checkpoints: the orbax manager of a workdir, restore-latest with fallback, load-params."""

from __future__ import annotations

import contextlib
import gc
import logging
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_manager(workdir: pathlib.Path, max_to_keep: int) -> ocp.CheckpointManager:
  """The manager of ``workdir/checkpoints`` (created if missing)."""
  return ocp.CheckpointManager(
      (pathlib.Path(workdir) / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


class CheckpointError(RuntimeError):
  """A workdir's checkpoints exist but none of them can be restored."""


def restore_latest(mngr: ocp.CheckpointManager, state: Any) -> Any:
  """The newest checkpoint that restores into ``state``'s structure; ``state`` itself when
  there is none.

  An unreadable one is skipped with one warning line giving the reason, and deleted once
  an older one restores (training redoes its steps and saves them again); when none is
  readable, CheckpointError names the workdir and the way out.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  workdir = pathlib.Path(mngr.directory).parent
  with _quiet_restore() as failed:
    for n, step in enumerate(steps):
      try:
        restored = mngr.restore(step, args=ocp.args.StandardRestore(state))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
        failed()
        then = f"trying step {steps[n + 1]}" if n + 1 < len(steps) else "none is left"
        logging.warning("Checkpoint at step %d in %s could not be restored (%s); %s.", step,
                        mngr.directory, short_reason(e), then)
        continue
      for unreadable in steps[:n]:
        mngr.delete(unreadable)
      return restored
  if not steps:
    return state
  raise CheckpointError(
      f"None of the checkpoints in {workdir}/checkpoints (steps "
      f"{', '.join(map(str, sorted(steps)))}) could be restored into this run's state. Pass "
      "--overwrite to discard them and train from step 0, or use a new --workdir.")


def short_reason(error: BaseException, limit: int = 160) -> str:
  """``error`` on one line of at most ``limit`` characters: its type and first line."""
  text = " ".join(str(error).split("\n", 1)[0].split()) or "no message"
  text = f"{type(error).__name__}: {text}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


_QUIET_LOGGERS = ("absl", "orbax", "tensorstore", "jax", "asyncio")
_SETTLE_SECONDS = 0.05  # after a failed restore, for TensorStore's reads still in flight


@contextlib.contextmanager
def _quiet_restore() -> Iterator[Callable[[], None]]:
  """Silences the libraries while restore attempts run: their loggers, and the "Event loop
  is closed" errors that TensorStore's reads still in flight report through
  ``sys.unraisablehook`` after orbax gave up on a damaged checkpoint.

  Yields ``failed()``, to call when an attempt failed: then, before the libraries speak
  again, the reads get a moment to finish and the abandoned futures are collected (asyncio
  logs "Future exception was never retrieved" for each).
  """
  failures = []
  loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
  levels = [lg.level for lg in loggers]
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)):
      previous_hook(unraisable)

  for lg in loggers:
    lg.setLevel(logging.CRITICAL + 1)
  sys.unraisablehook = hook
  try:
    yield lambda: failures.append(True)
  finally:
    if failures:
      time.sleep(_SETTLE_SECONDS)
      gc.collect()
    sys.unraisablehook = previous_hook
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def load_params(workdir: str | pathlib.Path) -> Any:
  """The model parameters of the newest checkpoint in ``workdir`` (as a nested dict): of a
  run with a validation split, those of its best evaluation, which the run served."""
  mngr = ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").absolute(),
                               item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints; train first.")
    # Onto one local device, whatever devices and processes saved it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Host numbers (a validation run's bookkeeping) were saved from numpy, with no sharding.
    target = jax.tree_util.tree_map(
        lambda m: (np.zeros(m.shape, m.dtype) if m.sharding is None
                   else jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)),
        mngr.item_metadata(step))
    restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    best = restored.get("best")
    if best and int(best["step"]) >= 0:
      return best["params"]
    return restored["params"]
  finally:
    mngr.close()
