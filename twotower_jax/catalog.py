"""New items without retraining: embed an items table and add it to a serving directory.

``add_items(workdir_or_serving_dir, items_file)`` reads a CSV or Parquet table with the
items table's columns (the item key and every column the candidate tower reads), encodes it
with the stored encoders (values unknown to a vocabulary go through the out-of-vocabulary
index, with one info line per feature), embeds it with the stored candidate tower and adds
the rows to the candidate embeddings, the display columns and the index (FAISS kinds insert
into the saved structure; nothing is retrained). It needs a format-3 serving directory
(which holds the candidate tower); a version-2 one must be re-exported by retraining.

**Atomic replacement.** The new directory is written beside the old one (a sibling
``.serving.new-*``) and swapped in with one ``renameat2(RENAME_EXCHANGE)`` call (Linux),
so the path ``serving`` always names a whole directory, the old or the new; the old one is
then deleted. Where the exchange is unavailable, two renames are used (old aside, new in),
which leaves the path missing for a moment. ``serving.load`` notices a directory replaced
(or briefly missing) while it reads and reads it again, so a concurrent reader always gets
the old or the new catalogue, never a mix. Concurrent ``add_items`` calls on one directory
are serialised by a lock file beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import pyarrow as pa

from twotower_jax import ann
from twotower_jax import arrays
from twotower_jax import features as feat
from twotower_jax import model as model_lib
from twotower_jax import serving
from twotower_jax.data import tables

_log = logging.getLogger(__name__)
EMBED_BATCH = 4096  # rows per candidate tower call (the last batch padded: one shape)


class CatalogError(serving.ServingError):
  """New items cannot be added; the message says why and how to fix it."""


def serving_dir(path: str | pathlib.Path) -> pathlib.Path:
  """``path`` itself when it holds serving.json, else ``path/serving`` (a workdir)."""
  path = pathlib.Path(path)
  if not (path / "serving.json").exists() and (path / "serving").is_dir():
    path = path / "serving"
  if not (path / "serving.json").is_file():
    raise CatalogError(f"{path} holds no serving directory. Train first (python -m "
                       "twotower_jax.main --config ... --workdir DIR) and pass DIR.")
  return path


# ----------------------------------------------------------------------------
# Reading and checking the new items.


def _specs(meta: dict[str, Any]) -> dict[str, ml_collections.ConfigDict]:
  return {n: ml_collections.ConfigDict(s) for n, s in meta["features"]["candidate"].items()}


def read_items(path: str | pathlib.Path, rec: serving.Recommender
               ) -> tuple[np.ndarray, dict[str, Any], pa.Table]:
  """(new item keys, the candidate tower's raw columns, the table) of an items file, checked
  against the serving directory's spec and catalogue."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise CatalogError(f"{path}: the new items file does not exist. Pass --items=FILE (CSV or "
                       "Parquet with the items table's columns).")
  table = tables.read_table(path, "items")
  item_key = rec.meta["keys"]["item"]
  specs = _specs(rec.meta)
  needed = list(dict.fromkeys([item_key] + [s.column for s in specs.values()]))
  missing = [c for c in needed if c not in table.column_names]
  if missing:
    raise CatalogError(f"{path}: missing column{'s' * (len(missing) > 1)} {missing}; new items "
                       f"need {needed} (the item key and the candidate tower's columns). "
                       f"Columns there: {table.column_names}.")
  if table.num_rows == 0:
    raise CatalogError(f"{path}: holds no rows; nothing to add.")
  keys = tables.key_column(table, path, item_key, "item key")
  if rec.item_ids_N.dtype.kind == "U":
    keys = np.asarray(keys.to_pylist() if isinstance(keys, pa.Array) else keys).astype(str)
  elif isinstance(keys, pa.Array):
    raise CatalogError(f"{path}: column {item_key!r} holds text ({keys[0].as_py()!r} at "
                       f"{_line(path, 0)}) but this catalogue's item keys are integers. Fix: "
                       "use integer keys.")
  keys = np.asarray(keys)
  uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
  if (counts > 1).any():
    dup = uniq[counts > 1]
    raise CatalogError(f"{path}: item key {dup[0].item()!r} occurs {counts[counts > 1][0]} "
                       f"times ({len(dup)} duplicated keys); each new item needs one row.")
  known = arrays.find_rows(rec.item_ids_N, keys) >= 0
  if known.any():
    rows = np.flatnonzero(known)
    raise CatalogError(f"{path}: {len(rows)} item key{'s' * (len(rows) > 1)} already in the "
                       f"catalogue, e.g. {keys[rows[:5]].tolist()} ({_line(path, rows[0])}). "
                       "add_items adds new items only; drop those rows.")
  cols = dict(tables.columns_of(table))
  for s in specs.values():
    if s.kind in ("numeric", "timestamp"):  # a bad or empty number names its row
      cols[s.column] = tables.numeric_column(table, path, s.column, f"{s.kind} feature")
  return keys, cols, table


def _line(path: pathlib.Path, row: int) -> str:
  return f"line {row + 2}" if path.suffix.lower() in (".csv", ".tsv") else f"row {row + 1}"


def _note_unknown(specs, encoders, x: dict[str, np.ndarray], cols) -> None:
  """One info line per vocabulary feature whose new values are unknown to the model."""
  for name, s in specs.items():
    if s.kind not in ("id", "categorical") or encoders[name]["kind"] == "hash":
      continue
    oov = np.asarray(x[name]) == feat.OOV
    if oov.any():
      value = feat.take(cols[s.column], np.flatnonzero(oov)[:1])
      value = value.to_pylist()[0] if hasattr(value, "to_pylist") else value[0].item()
      _log.info("%d of %d new items have a value of %s (column %r) unknown to the model, e.g. "
                "%r: served through the out-of-vocabulary index.", int(oov.sum()), len(oov),
                name, s.column, value)


# ----------------------------------------------------------------------------
# Embedding.


def embed_items(directory: pathlib.Path, meta: dict[str, Any], encoders, cols) -> np.ndarray:
  """Candidate embeddings [M, D] of raw item columns, with the stored candidate tower."""
  specs = _specs(meta)
  x = feat.encode_tower(specs, encoders, cols, "new items table")
  _note_unknown(specs, encoders, x, cols)
  t = meta["candidate_tower"]
  tower = model_lib.Tower(features=tuple(tuple(f) for f in t["features"]), mlp=tuple(t["mlp"]),
                          l2_normalize=t["l2_normalize"])
  with np.load(directory / "candidate_params.npz", allow_pickle=False) as f:
    params = flax.traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")
  fn = jax.jit(lambda p, xc: tower.apply({"params": p}, xc))
  n = len(next(iter(x.values())))
  batch = min(EMBED_BATCH, arrays.size_bucket(n))
  out = []
  for start in range(0, n, batch):
    chunk = {k: arrays.pad_rows(np.asarray(v[start:start + batch]), batch) for k, v in x.items()}
    out.append(np.asarray(fn(params, chunk))[:min(batch, n - start)])
  emb = np.concatenate(out).astype(np.float32)
  if not np.isfinite(emb).all():
    raise CatalogError("the candidate tower gave NaN or inf for some new items; check their "
                       "numeric columns.")
  return emb


def _display(rec: serving.Recommender, table: pa.Table) -> dict[str, np.ndarray]:
  """The display columns (items.npz) with the new rows appended; a column the new table
  lacks is empty for them ('' for text, NaN for floats, -1 for integers)."""
  out = {}
  m = table.num_rows
  for name, old in rec.items.items():
    if name in table.column_names:
      new = table.column(name).combine_chunks()
      new = np.asarray(new.to_numpy(zero_copy_only=False))
      if old.dtype.kind == "U":
        new = np.array(["" if v is None else str(v) for v in new])
      else:
        try:
          new = new.astype(old.dtype)
        except (TypeError, ValueError) as e:
          raise CatalogError(f"new items: column {name!r} holds {new[:1].tolist()}, not "
                             f"{old.dtype} like the catalogue's.") from e
    else:
      fill = "" if old.dtype.kind == "U" else (np.nan if old.dtype.kind == "f" else -1)
      new = np.full(m, fill, old.dtype if old.dtype.kind != "U" else object).astype(
          old.dtype if old.dtype.kind != "U" else str)
    out[name] = np.concatenate([old, new])
  return out


# ----------------------------------------------------------------------------
# Writing the new directory and swapping it in.


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swaps the paths ``a`` and ``b`` (Linux renameat2); False if unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def replace_dir(target: pathlib.Path, new: pathlib.Path) -> None:
  """Puts the directory ``new`` at ``target`` atomically (see the module docstring) and
  deletes the old one."""
  if _exchange(new, target):
    shutil.rmtree(new)  # now the old directory
    return
  old = target.with_name(f"{target.name}.old-{os.getpid()}-{time.time_ns()}")
  os.rename(target, old)
  os.rename(new, target)
  shutil.rmtree(old)


@contextlib.contextmanager
def _locked(directory: pathlib.Path):
  lock = directory.with_name(f".{directory.name}.lock")
  with open(lock, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def add_items(path: str | pathlib.Path, items_file: str | pathlib.Path) -> dict[str, Any]:
  """Embeds the items of ``items_file`` and adds them to the serving directory at ``path``
  (a workdir or its ``serving``), replacing it atomically.

  Returns:
    {"added": M, "num_items": N + M, "index": the index kind, "directory": the path}.
  """
  directory = serving_dir(path).absolute()
  with _locked(directory):
    rec = serving.load(directory)
    meta = dict(rec.meta)
    if meta.get("format_version", 0) < 3 or "candidate_tower" not in meta or not (
        directory / "candidate_params.npz").is_file():
      raise CatalogError(f"{directory} is a format-{meta.get('format_version')} serving "
                         "directory without the candidate tower, so new items cannot be "
                         "embedded: re-export/retrain to add items (python -m "
                         "twotower_jax.main --config ... --workdir NEW).")
    keys, cols, table = read_items(items_file, rec)
    emb_MxD = embed_items(directory, meta, rec.encoders, cols)
    old_n = len(rec.item_ids_N)
    index = ann.add(rec.index, emb_MxD)
    new_dir = directory.with_name(f".{directory.name}.new-{os.getpid()}-{time.time_ns()}")
    try:
      shutil.copytree(directory, new_dir)
      for name in ("candidates.npz", "items.npz", ann.INDEX_FILE):
        (new_dir / name).unlink(missing_ok=True)
      np.savez(new_dir / "candidates.npz",
               embeddings=np.asarray(index.embeddings_NxD, np.float32),
               item_id=np.concatenate([rec.item_ids_N, keys.astype(rec.item_ids_N.dtype)]))
      np.savez(new_dir / "items.npz", **_display(rec, table))
      meta["index"] = ann.save(index, new_dir)
      meta["added_items"] = int(meta.get("added_items", 0)) + len(keys)
      (new_dir / "serving.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
      replace_dir(directory, new_dir)
    finally:
      if new_dir.exists():
        shutil.rmtree(new_dir, ignore_errors=True)
  _log.info("Added %d items to %s (%d -> %d items, %s index).", len(keys), directory, old_n,
            old_n + len(keys), ann.kind_of(index))
  return {"added": int(len(keys)), "num_items": int(old_n + len(keys)),
          "index": ann.kind_of(index), "directory": str(directory)}
