"""Run logs: a progress bar (examples/s, ETA), metrics.jsonl and TensorBoard event files.

TensorBoard files are written with tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import tqdm


class RunLog:
  """Writes ``<workdir>/metrics.jsonl`` and ``<workdir>/tb/`` and drives the progress bar."""

  def __init__(self, workdir: pathlib.Path, *, total_examples: int, initial_examples: int = 0,
               progress: bool = True, write: bool = True):
    self.workdir = workdir
    self._write = write
    self._bar = tqdm.tqdm(total=total_examples, initial=initial_examples, unit="ex",
                          unit_scale=True, desc="train", disable=not progress,
                          dynamic_ncols=True)
    self._tb = None
    if not write:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(workdir / "tb"))
    except ImportError:  # pragma: no cover - tensorboardX is a core dependency
      logging.warning("tensorboardX is not installed: no TensorBoard event files.")

  def progress(self, examples: int) -> None:
    self._bar.update(examples)

  def epoch(self, record: dict[str, Any]) -> None:
    self._bar.set_postfix(loss=f"{record['loss']:.4f}", epoch=record["epoch"])
    if not self._write:
      return
    with open(self.workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key not in ("epoch", "step") and isinstance(value, (int, float)):
          self._tb.add_scalar(f"train/{key}", value, record["step"])
      self._tb.flush()

  def final(self, metrics: dict[str, Any]) -> None:
    if self._tb is not None:
      for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(f"eval/{key}", value, metrics.get("steps", 0))
      self._tb.close()
      self._tb = None

  def close_progress(self) -> None:
    self._bar.close()
