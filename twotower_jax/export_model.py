"""A portable export of a trained model (``--mode=export_model``): jax and numpy to load it.

``export_model(workdir)`` reads the run's serving directory and writes ``WORKDIR/
export_model`` (or another folder), whose layout ``portable.py`` describes: the query tower
as a ``jax.export`` function (StableHLO, a symbolic batch dimension, lowered for CPU and
CUDA) with its parameters beside it in an npz, the encoders as plain data, the candidate
embeddings and item keys, the catalogue's display columns, a copy of an approximate index
when the serving directory holds one, ``manifest.json`` and the loader ``portable.py``
itself. Every query feature kind is supported (histories with their side columns and time
since too); a kind the loader cannot encode stops the export, never a later load.

The directory is written beside the target under a temporary name, checked (the loader
reads it back and must embed the known users' queries as the serving directory does), and
only then put in place (``catalog.replace_dir``: an atomic exchange with an earlier export),
so a failed export leaves the previous one untouched.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import flax
import jax
import numpy as np

from twotower_jax import ann
from twotower_jax import catalog
from twotower_jax import features as feat
from twotower_jax import portable
from twotower_jax import serving

TOWER_FILE = "query_tower.jaxexport"
PLATFORMS = ("cpu", "cuda")
FILES = {"tower": TOWER_FILE, "params": "query_params.npz", "encoders": "encoders.npz",
         "encoder_meta": "encoders.json", "candidates": "candidates.npz",
         "items": "items.npz", "loader": "portable.py"}
_CHECK_QUERIES = 64  # known users' queries embedded both ways before the export is kept


class ExportModelError(ValueError):
  """The model cannot be exported as asked; the message says why and what to do."""


def serving_dir_of(path: pathlib.Path) -> pathlib.Path:
  """The serving directory of a workdir (or the directory itself when it is one)."""
  path = pathlib.Path(path)
  if (path / "serving").is_dir() and not (path / "serving.json").exists():
    return path / "serving"
  return path


def input_signature(rec: serving.Recommender) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Per encoded query-tower input: its dtype and shape after the batch dimension."""
  out = {}
  for name, s in rec.specs.items():
    kind, enc = s.kind, rec.encoders[name]
    if kind not in portable.KINDS:
      raise ExportModelError(
          f"features.query.{name} is a {kind!r} feature, which the portable loader cannot "
          f"encode (it knows {', '.join(portable.KINDS)}); serve this model with "
          "twotower_jax.serving instead.")
    if kind in ("id", "categorical"):
      out[name] = ("int32", ())
    elif kind == "numeric":
      out[name] = ("int32", ()) if "boundaries" in enc else ("float32", ())
    elif kind == "timestamp":
      out[name] = ("int32", ())
      out[name + feat.VALUE_SUFFIX] = ("float32", ())
    else:  # multi_hot, text, history: [B, width] rows, -1 padded
      out[name] = ("int32", (int(enc["width"]),))
    if kind == "history" and portable.side_columns(s):
      out[name + feat.SIDE_SUFFIX] = ("float32", (int(enc["width"]),
                                                  len(portable.side_columns(s))))
    if kind == "history" and s.get("time_since"):
      out[name + feat.TIME_SINCE_SUFFIX] = ("float32", (int(enc["width"]),))
  return out


def _tower_function(rec: serving.Recommender, params_flat: dict[str, np.ndarray],
                    signature, platforms) -> bytes:
  """The query tower, (flat params, encoded inputs) -> [B, D], serialized by jax.export with
  a symbolic batch size B."""
  tower = rec.tower

  def query_tower(flat, x):
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    return tower.apply({"params": params}, x)

  (batch,) = jax.export.symbolic_shape("B")
  p_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params_flat.items()}
  x_spec = {k: jax.ShapeDtypeStruct((batch,) + shape, np.dtype(dtype))
            for k, (dtype, shape) in signature.items()}
  exported = jax.export.export(jax.jit(query_tower), platforms=tuple(platforms))(p_spec,
                                                                                 x_spec)
  return bytes(exported.serialize())


def _check(rec: serving.Recommender, directory: pathlib.Path) -> None:
  """Reads the export back with the loader and embeds known users' queries both ways."""
  model = portable.load(directory)
  users = rec.users["user_key"][:_CHECK_QUERIES]
  if not len(users):
    return
  cols = rec.user_features(users)
  want = rec.embed(cols)
  got = model.embed(cols)
  if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
    gap = float(np.abs(got - want).max()) if got.shape == want.shape else got.shape
    raise ExportModelError(f"The exported query tower disagrees with the serving directory "
                           f"(largest difference {gap}); the export was not written.")


def export_model(source: str | pathlib.Path, out: str | pathlib.Path | None = None, *,
                 platforms=PLATFORMS) -> pathlib.Path:
  """Writes the portable export of the run in ``source`` (a workdir or its serving
  directory) to ``out`` (default: WORKDIR/export_model); returns ``out``."""
  serving_dir = serving_dir_of(pathlib.Path(source))
  rec = serving.load(serving_dir)  # everything read once, before anything is written
  signature = input_signature(rec)
  out = pathlib.Path(out) if out else serving_dir.parent / "export_model"
  if out.resolve() == serving_dir.resolve() or serving_dir.resolve() in out.resolve().parents:
    raise ExportModelError(f"--export_dir={out} lies in the serving directory; choose a "
                           "folder outside it (default: WORKDIR/export_model).")
  if out.exists() and not (out / "manifest.json").is_file() and (
      not out.is_dir() or any(out.iterdir())):
    raise ExportModelError(f"--export_dir={out} exists and is not a model export; choose "
                           "another folder, or remove it first.")
  params_flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(
      rec.query_params, sep="/").items()}
  c_NxD = np.asarray(rec.index.embeddings_NxD, np.float32)
  manifest = {
      "format": portable.FORMAT,
      "format_version": portable.FORMAT_VERSION,
      "config_name": rec.meta.get("config_name", ""),
      "serving_format_version": rec.meta.get("format_version"),
      "features": rec.meta["features"]["query"],
      "query_columns": rec.query_columns(),
      "optional_columns": (rec.id_columns() + rec.history_columns()
                           + rec.history_value_columns()),
      "inputs": {k: {"dtype": d, "shape": ["B", *shape]} for k, (d, shape) in
                 signature.items()},
      "dim": int(c_NxD.shape[1]),
      "num_items": int(c_NxD.shape[0]),
      "item_id_dtype": str(rec.item_ids_N.dtype),
      "keys": rec.meta.get("keys", {}),
      "title_column": rec.meta.get("title_column", ""),
      "item_columns": sorted(rec.items),
      "platforms": list(platforms),
      "jax_version": jax.__version__,
      "files": dict(FILES),
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    (tmp / TOWER_FILE).write_bytes(_tower_function(rec, params_flat, signature, platforms))
    np.savez(tmp / FILES["params"], **params_flat)
    feat.save_encoders(rec.encoders, tmp)
    np.savez(tmp / FILES["candidates"], embeddings=c_NxD, item_id=rec.item_ids_N)
    np.savez(tmp / FILES["items"], **rec.items)
    # The index as loaded (exact: the embeddings alone; FAISS kinds: index.faiss).
    manifest["index"] = ann.save(rec.index, tmp)
    shutil.copyfile(portable.__file__, tmp / FILES["loader"])
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _check(rec, tmp)
    if out.exists():
      catalog.replace_dir(out, tmp)  # one atomic exchange where the system has one
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out

