"""Export retrieval results as training/serving input for a ranking model.

For each query (an interaction of the chosen split) the top-N retrieved candidates are
written, one CSV row each: the query's user key and every column of the query spec, the
interaction's own item (``true_<item key>``) and weight or rating, the retrieval rank, the
candidate's key and the items table's columns, the retrieval score and a ``label`` (1 when
the candidate is the interaction's own item). This is the input a ranking stage trains
on: the retrieval stage's own candidates, not random pairs. Rows are built as columns and
written by pyarrow's CSV writer, a batch of queries at a time.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import pathlib
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from twotower_jax import arrays
from twotower_jax import features as feat
from twotower_jax import history
from twotower_jax import serving
from twotower_jax.data import dataset as dataset_lib
from twotower_jax.data import download, sources
from twotower_jax.data.dataset import DataError

SPLITS = ("train", "test")
_log = logging.getLogger(__name__)


class ExportError(ValueError):
  """Export arguments that cannot work together; the message says which and what to do."""


def check_args(*, split: str, top_n: int, max_queries: int, exclude_rated: bool,
               batch_size: int = 1024) -> None:
  """Raises :class:`ExportError` for arguments export_ranker cannot honour."""
  if split not in SPLITS:
    raise ExportError(f"--export_split must be one of {', '.join(SPLITS)}; got {split!r}.")
  for name, value, low in (("top_n", top_n, 1), ("max_queries", max_queries, 0),
                           ("batch_size", batch_size, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ExportError(f"--{name} must be an integer >= {low}; got {value!r}.")
  if split == "train" and exclude_rated:
    raise ExportError(
        "--exclude_rated cannot be used with --export_split=train: each training query's own "
        "item is one the user interacted with in training, so it would be excluded and every row would "
        "get label 0. Drop --exclude_rated, or export --export_split=test.")


def locate_data(config, data_dir: str | None = None):
  """The run's config with ``data.dir`` pointing at the data to read now (a copy if changed).

  ``data_dir`` (``--data_dir``) wins. Otherwise the folder the run was trained on
  (config.json's ``data.dir``) is kept while it still holds the data; when it has moved,
  ``$TWOTOWER_DATA_DIR`` is used instead (ML-100K), and without it the error names both fixes.
  A run trained without ``data.dir`` uses the usual lookup (``$TWOTOWER_DATA_DIR``, cache).
  """
  data = config.data
  source = str(data.get("source", "grouplens") or "grouplens")
  if data_dir:
    path = pathlib.Path(data_dir).expanduser()
    problem = _data_problem(path, source)
    if problem:
      raise DataError(f"--data_dir={data_dir} {problem}. Fix: pass --data_dir=PATH with PATH "
                      "the folder that holds the extracted data files.")
    config = copy.deepcopy(config)
    config.data.dir = str(path)
    return config
  pinned = str(data.get("dir", "") or "")
  if source in ("synthetic", "tfds") or not pinned:
    return config
  problem = _data_problem(pathlib.Path(pinned).expanduser(), source)
  if not problem:
    return config
  env = os.environ.get(download.DATA_DIR_ENV, "")
  if env and source == "grouplens":
    env_problem = _data_problem(pathlib.Path(env).expanduser(), source)
    if env_problem:
      raise DataError(
          f"This run was trained on the data in {pinned} (config.json's data.dir), which "
          f"{problem}, and ${download.DATA_DIR_ENV}={env} {env_problem}. Fix: pass "
          "--data_dir=PATH, or point $TWOTOWER_DATA_DIR at the folder that holds u.data, "
          "u.item and u.user.")
    _log.info("The run's data folder %s %s: reading $%s=%s instead.", pinned, problem,
              download.DATA_DIR_ENV, env)
    config = copy.deepcopy(config)
    config.data.dir = env
    return config
  fix = ("--data_dir=PATH or `export TWOTOWER_DATA_DIR=PATH` (PATH = the folder that holds "
         "u.data, u.item and u.user)" if source == "grouplens"
         else "--data_dir=PATH (the folder that holds the data files)")
  raise DataError(f"This run was trained on the data in {pinned} (config.json's data.dir), "
                  f"which {problem}. If the data moved, pass {fix}.")


def _data_problem(path: pathlib.Path, source: str) -> str:
  """Why ``path`` cannot be the data folder of ``source`` ('' when it can)."""
  if not path.exists():
    return "does not exist"
  if source == "grouplens":
    try:
      download.resolve_data_dir(path, download=False)
    except DataError:
      missing = [n for n in download.ML100K_REQUIRED if not (path / n).is_file()]
      return f"lacks {', '.join(missing)}"
  return ""


def export_ranker(config, serving_dir: pathlib.Path, out: pathlib.Path, *, split: str = "test",
                  top_n: int = 100, max_queries: int = 0, exclude_rated: bool = False,
                  batch_size: int = 1024, data_dir: str | None = None) -> int:
  """Writes ``out`` (CSV with a header); returns the number of candidate rows written.

  Arguments are checked first (:class:`ExportError`); the file is written under a temporary
  name in the same folder and renamed on success, so a failed export leaves nothing behind.
  ``data_dir`` replaces the run's data folder (see :func:`locate_data`).
  """
  check_args(split=split, top_n=top_n, max_queries=max_queries, exclude_rated=exclude_rated,
             batch_size=batch_size)
  out = pathlib.Path(out)
  if out.is_dir():
    raise ExportError(f"--export_path={out} is a directory; give a file name, e.g. "
                      f"{out / ('ranker_' + split + '.csv')}.")
  rec = serving.load(serving_dir)
  config = locate_data(config, data_dir)
  dataset = sources.load_dataset(config.data)
  train, test = sources.train_test(config.data, dataset, int(config.seed))
  cols = dict(test if split == "test" else train)
  # History features: each query's window over what was known before it (training
  # interactions for a training query; training and earlier test ones for a test query).
  cols.update(history_windows(rec, dataset, train, test if split == "test" else None))
  n = len(cols[dataset.user_key])
  if max_queries:
    n = min(n, max_queries)
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
  tmp = pathlib.Path(tmp_name)
  try:
    with os.fdopen(fd, "wb") as f:
      rows = _write_rows(f, rec, dataset, cols, n, top_n=top_n, exclude_rated=exclude_rated,
                         batch_size=batch_size)
    os.replace(tmp, out)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return rows


def history_windows(rec: serving.Recommender, dataset, train, test=None) -> dict:
  """Per history feature ``h`` of the model, the [Q, L] item keys (padded with -1 or '') of
  each query's last L items strictly before it: queries are ``test`` if given, else
  ``train``. With side columns, their raw values as "h.<column>" ([Q, L], NaN at padding);
  with the time since, each item's time as "h.time" ([Q, L]) (``history_value_columns``)."""
  out = {}
  for name in rec.history_columns():
    if not dataset.time_key:
      raise DataError(f"the model's history feature {name!r} needs timestamps "
                      "(data.time_key).")
    s = rec.specs[name]
    parts = [train] + ([test] if test is not None else [])
    users = dataset_lib.key_codes(pa.chunked_array(
        [pa.array(p[dataset.user_key]) for p in parts]))
    rows = np.concatenate([arrays.find_rows(rec.item_ids_N, p[dataset.item_key]) for p in parts])
    times = np.concatenate([np.asarray(p[dataset.time_key]) for p in parts])
    # The sequences hold each interaction's row, so any column can be read at the windows.
    seqs = history.sequences(users, np.arange(len(rows)), times,
                             int(users.max()) + 1 if len(users) else 0)
    q = slice(len(train[dataset.item_key]), None) if test is not None else slice(None)
    src = history.take(seqs.items, history.positions(
        seqs, users[q], history.ends(seqs, users[q], times[q]), rec.encoders[name]["width"]),
        history.PAD)
    ok, src = src >= 0, np.maximum(src, 0)
    win = np.where(ok, rows[src], history.PAD)
    keys = rec.item_ids_N[np.maximum(win, 0)]
    out[name] = np.where(win >= 0, keys, "" if keys.dtype.kind == "U" else -1)
    for c in feat.side_columns(s):
      raw = np.concatenate([np.asarray(p[c], np.float64) for p in parts])
      out[f"{name}.{c}"] = np.where(ok, raw[src], np.nan)
    if s.get("time_since"):
      out[f"{name}.time"] = np.where(ok, times[src], 0)
  return out


def _write_rows(f, rec: serving.Recommender, dataset, cols, n: int, *, top_n: int,
                exclude_rated: bool, batch_size: int) -> int:
  """Writes the header and the candidate rows of the first ``n`` queries; returns the rows."""
  user_key, item_key = dataset.user_key, dataset.item_key
  hcols = rec.history_columns()
  qcols = list(dict.fromkeys([user_key] + [c for c in rec.query_columns()
                                           if c in cols and c not in hcols]))
  weight = [dataset.weight_key] if dataset.weight_key in cols else []
  writer, rows = None, 0
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    feats = {c: _plain(cols[c], start, stop) for c in qcols}
    feats.update({c: cols[c][start:stop] for c in rec.history_columns()
                  + rec.history_value_columns() if c in cols})
    if rec.history_value_columns() and dataset.time_key in cols:  # the time since needs it
      feats.setdefault(dataset.time_key, _plain(cols[dataset.time_key], start, stop))
    exclude = rec.rated(feats[user_key]) if exclude_rated else None
    # The split's own interactions, as they are (a later test period lies past the training
    # range by construction): no range check.
    r = rec.recommend({c: feats[c] for c in [*rec.query_columns(), *rec.history_value_columns(),
                                             dataset.time_key] if c in feats}, top_n,
                      exclude_ids=exclude, check_range=False)
    q_R, j_R = np.nonzero(r.valid)  # every returned slot, query by query, best first
    true_Q = _plain(cols[item_key], start, stop)
    table = {"query_index": start + q_R}
    table.update({c: feats[c][q_R] for c in qcols})
    for c in hcols:  # a history as its item keys, oldest first, joined by '|'
      joined = np.array(["|".join(str(k) for k in row if k != -1 and k != "")
                         for row in feats[c]] + [""])[:-1]
      table[c] = joined[q_R]
    table[f"true_{item_key}"] = true_Q[q_R]
    table.update({c: _plain(cols[c], start, stop)[q_R] for c in weight})
    table["rank"] = j_R + 1
    table[item_key] = r.item_id[q_R, j_R]
    table.update({c: v[q_R, j_R] for c, v in r.columns.items() if c not in table})
    table["retrieval_score"] = r.score[q_R, j_R]
    table["label"] = (r.item_id[q_R, j_R] == true_Q[q_R]).astype(np.int8)
    batch = pa.table({k: pa.array(v) for k, v in table.items()})
    if writer is None:
      writer = pacsv.CSVWriter(f, batch.schema)
    writer.write_table(batch)
    rows += len(q_R)
  if writer is None:  # no query: the header alone
    f.write(b"query_index\n")
  else:
    writer.close()
  return rows


def _plain(values, start: int, stop: int) -> np.ndarray:
  v = values[start:stop]
  if isinstance(v, (pa.Array, pa.ChunkedArray)):
    if pa.types.is_integer(v.type) or pa.types.is_floating(v.type):  # numbers with gaps
      return pc.cast(v, pa.float64()).to_numpy(zero_copy_only=False)
    return v.to_numpy(zero_copy_only=False).astype(str)
  return np.asarray(v)


def read_ranker_csv(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads an exported file back into numpy columns (strings; cast as needed)."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = next(reader)
    body = list(reader)
  return {h: np.asarray([row[j] for row in body]) for j, h in enumerate(header)}
