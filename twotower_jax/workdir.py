"""The run directory's lifecycle: its lock, the run fingerprint, ``--overwrite``.

A workdir holds one run. When a run starts (``open_run``) it

1. compares its fingerprint (the config keys that change the result, and a digest of the
   data) with the one stored in the workdir, and stops, before writing anything, if they
   differ;
2. takes an exclusive lock on ``<workdir>/.lock`` (``fcntl.flock``: the kernel drops it when
   the process dies, so a lock left by a killed run is taken over), holding the pid and
   the start time that a second run's error names;
3. with ``overwrite``, deletes every file of the old run; then stores ``config.json`` and
   the fingerprint.

With several processes only process 0 checks, locks and writes; the others follow its
verdict.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from twotower_jax import config as config_lib
from twotower_jax import spec
from twotower_jax.data import dataset as dataset_lib

FINGERPRINT_FILE = "fingerprint.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# Everything a run writes, identity first: an overwrite interrupted half-way leaves an
# unidentified run, which is refused, never one that looks resumable.
RUN_FILES = (FINGERPRINT_FILE, CONFIG_FILE, "checkpoints", "metrics.json", "metrics.jsonl",
             "serving", "tb")
# Config keys (a section name covers the section) that do not change a run's result. The
# data location is among them: the data digest stands for it.
IGNORED_KEYS = (
    "train.progress", "train.checkpoint_every_steps", "train.max_checkpoints",
    "eval.batch_size", "serve", "cpu_devices", "distributed", "coordinator_address",
    "num_processes", "process_id", "data.dir", "data.download", "data.tfds_data_dir",
)
DATA_KEY = "data files"


class WorkdirError(RuntimeError):
  """The workdir cannot take this run: another process uses it, or it holds another run."""


# ----------------------------------------------------------------------------
# The fingerprint.


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _ignored(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def config_fingerprint(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """Dotted key -> value of the keys that change a result; keys a config lacks (one
  written before they existed) read their defaults, and so do feature spec options."""
  full = _flatten(json.loads(config_lib.base_config().to_json()))
  full.update(_flatten(config_json))
  for key, kind in list(full.items()):  # "features.<tower>.<name>.kind"
    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "features" and parts[3] == "kind":
      for option, default in spec.json_defaults(kind).items():
        full.setdefault(".".join(parts[:3] + [option]), default)
  return {k: v for k, v in full.items() if not _ignored(k)}


def _hash_column(h, name: str, values) -> None:
  if isinstance(values, (pa.Array, pa.ChunkedArray)):  # strings of one's own tables
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    h.update(f"{name}|{arr.type}|{len(arr)}|{arr.offset}|".encode())
    for buf in arr.buffers():
      if buf is not None:
        h.update(memoryview(buf))
    return
  values = np.asarray(values)
  h.update(f"{name}|{values.dtype.str if values.dtype != object else 'O'}|{values.shape}|"
           .encode())
  if values.dtype == object:  # strings of a large source: joined, not byte-copied
    h.update("\x1f".join(map(str, values.ravel().tolist())).encode("utf-8", "surrogatepass"))
  else:
    h.update(np.ascontiguousarray(values).data.cast("B"))


def data_digest(dataset: dataset_lib.Dataset,
                split_files: Iterable[Mapping[str, np.ndarray]] = ()) -> str:
  """SHA-256 of the loaded data: the catalogue, the users and the ratings.

  Rating columns that copy a user's or a movie's attributes (joined from ``users`` and
  ``movies``, hashed whole) are left out, so a large source costs one pass over its ids,
  ratings and timestamps. ``split_files``: the rows of train/test files read on top
  (``data.split=files``).
  """
  h = hashlib.sha256()
  tables = {"movies": dataset.movies, "users": dataset.users or {}}
  joined = {k for t in tables.values() for k in t} - {dataset.user_key, dataset.item_key}
  for table_name, table in [*tables.items(), ("ratings", dataset.ratings),
                            *((f"split{i}", t) for i, t in enumerate(split_files))]:
    for name in sorted(table):
      if table_name in tables or name not in joined:
        _hash_column(h, f"{table_name}.{name}", table[name])
  return "sha256:" + h.hexdigest()


def fingerprint(config, digest: str) -> dict[str, Any]:
  """What identifies a run's result: ``config`` less ``IGNORED_KEYS``, and the data."""
  return {"config": config_fingerprint(json.loads(config.to_json())), "data": digest}


_ABSENT = object()  # a key one of two fingerprints lacks


def _show(value: Any) -> str:
  if value is _ABSENT:
    return "(absent)"
  if isinstance(value, list):
    return "(" + ", ".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return repr(value) if isinstance(value, str) else str(value)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """``"key old -> new"`` for each differing config key, then ``"data files"`` if the data
  changed (not known for a workdir written before fingerprints: ``old["data"]`` None)."""
  old_cfg, new_cfg = old["config"], new["config"]
  out = [f"{k} {_show(old_cfg.get(k, _ABSENT))} -> {_show(new_cfg.get(k, _ABSENT))}"
         for k in [*new_cfg, *(k for k in old_cfg if k not in new_cfg)]
         if old_cfg.get(k, _ABSENT) != new_cfg.get(k, _ABSENT)]
  if old.get("data") is not None and old["data"] != new["data"]:
    out.append(DATA_KEY)
  return out


def stored_fingerprint(workdir: pathlib.Path) -> dict[str, Any] | None:
  """The fingerprint of the run in ``workdir``: its fingerprint file, else (a workdir of an
  older version) its config.json without a data digest; None when it holds no run.
  WorkdirError when it holds run files that nothing identifies."""
  path = workdir / FINGERPRINT_FILE
  if path.is_file():
    stored = json.loads(path.read_text())
    # Keys added since it was written (e.g. data.validation_fraction) read their defaults.
    return {**stored, "config": config_fingerprint(stored["config"])}
  if (workdir / CONFIG_FILE).is_file():
    return {"config": config_fingerprint(json.loads((workdir / CONFIG_FILE).read_text())),
            "data": None}
  present = [name for name in RUN_FILES if (workdir / name).exists()]
  if present:
    raise WorkdirError(
        f"{workdir} holds files of an unidentified run ({', '.join(present)}; no "
        f"{FINGERPRINT_FILE} or {CONFIG_FILE}). Use a new --workdir, or pass --overwrite to "
        "discard them.")
  return None


def check_same_run(workdir: pathlib.Path, fp: Mapping[str, Any]) -> None:
  """WorkdirError, naming every difference, unless ``workdir`` is empty or holds ``fp``'s run.

  Reads only.
  """
  old = stored_fingerprint(workdir)
  if old is None:
    return
  diffs = differences(old, fp)
  if diffs:
    raise WorkdirError(f"{workdir} holds a different run (differs in: {', '.join(diffs)}). "
                       "Use a new --workdir, or pass --overwrite to discard it.")


def clear(workdir: pathlib.Path) -> None:
  """Deletes the run in ``workdir`` (every name of ``RUN_FILES``, identity first, then the
  exports for a ranker)."""
  for path in [workdir / name for name in RUN_FILES] + sorted(workdir.glob("ranker_*.csv")):
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
      path.unlink()


# ----------------------------------------------------------------------------
# The lock.


class Lock:
  """An exclusive ``flock`` on ``<workdir>/.lock`` holding the owner's pid and start time.

  The kernel releases it when the process ends, however it ends.
  """

  def __init__(self, workdir: pathlib.Path):
    self.workdir = pathlib.Path(workdir)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock; WorkdirError naming the holder if another process has it."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirError(f"{self.workdir} is in use by {_describe(holder)}.") from None
    except BaseException:
      os.close(fd)
      raise
    started = datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": started}).encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> Lock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> dict[str, Any] | None:
  """The holder's record; it writes it just after locking, so wait a moment for it."""
  for _ in range(20):
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
      return json.loads(raw)
    except ValueError:
      time.sleep(0.05)
  return None


def _describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return "another process"
  where = "" if holder.get("host") == socket.gethostname() else f" on {holder.get('host')}"
  return f"process {holder.get('pid')}{where} (started {holder.get('started')})"


# ----------------------------------------------------------------------------
# Opening a run.


class Run:
  """An opened workdir: locked (by process 0) until ``close``."""

  def __init__(self, workdir: pathlib.Path, lock: Lock | None):
    self.workdir = workdir
    self._lock = lock

  def close(self) -> None:
    if self._lock is not None:
      self._lock.release()

  def __enter__(self) -> Run:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_run(workdir: str | os.PathLike, config, fp: Mapping[str, Any], *, overwrite: bool,
             process_index: int = 0, agree: Callable[[bool], bool] | None = None) -> Run:
  """Checks, locks and prepares ``workdir`` for the run ``config`` with fingerprint ``fp``.

  Without ``overwrite`` a workdir holding a different run is an error raised before
  anything is written; with it the old run is deleted. Only process ``0`` checks, locks
  and writes; with several processes ``agree(failed) -> bool`` tells every process
  whether process 0 failed, so that they all stop or all go on.
  """
  workdir = pathlib.Path(workdir)
  lock, error = None, None
  if process_index == 0:
    try:
      lock = _open_primary(workdir, config, fp, overwrite)
    except Exception as e:  # pylint: disable=broad-except - re-raised below, after agreeing
      error = e
  # Every process learns process 0's verdict, so that all stop or all go on.
  if agree is not None and agree(error is not None) and error is None:
    raise WorkdirError(f"process 0 could not open {workdir}; see its error.")
  if error is not None:
    raise error
  return Run(workdir, lock)


def _open_primary(workdir: pathlib.Path, config, fp: Mapping[str, Any], overwrite: bool
                  ) -> Lock:
  if not overwrite:
    check_same_run(workdir, fp)  # before the lock: a refused run writes nothing
  lock = Lock(workdir)
  lock.acquire()
  try:
    if overwrite:
      clear(workdir)
    else:
      check_same_run(workdir, fp)  # again, now that no other run can write
    (workdir / CONFIG_FILE).write_text(config.to_json(indent=1))
    (workdir / FINGERPRINT_FILE).write_text(json.dumps(fp, indent=1))
  except BaseException:
    lock.release()
    raise
  return lock
