"""Your own data: an interactions table, optionally an items and a users table (CSV or Parquet).

* **interactions** (required): one row per event; a user key, an item key, optionally a
  timestamp, a weight or rating, and any context columns.
* **items** (optional): keyed by item. This is the catalogue: every item gets a candidate
  embedding and can be recommended, also items nobody interacted with. Without it, the
  catalogue is the items that occur in the interactions.
* **users** (optional): keyed by user; its columns are joined into the interactions.

Files are read by pyarrow (``.csv``, ``.tsv``, ``.parquet``/``.pq``), which parses and
converts columns in C++: no Python loop runs over rows. Numbers become numpy arrays,
strings stay pyarrow arrays. Every problem is a ``DataError`` naming the file, the column,
the row and the fix.
"""

from __future__ import annotations

import difflib
import logging
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twotower_jax.data.dataset import Columns, DataError, Dataset

FORMATS = {".csv": ",", ".tsv": "\t", ".parquet": None, ".pq": None}
_NUMBER_RE = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


def read_table(path: str | pathlib.Path, what: str) -> pa.Table:
  """The table at ``path`` (CSV/TSV with a header row, or Parquet)."""
  path = pathlib.Path(path).expanduser()
  suffix = path.suffix.lower()
  if suffix not in FORMATS:
    raise DataError(f"{path}: the {what} table must be .csv, .tsv, .parquet or .pq (got "
                    f"{suffix or 'no suffix'!r}). Fix: convert it, or rename it after its format.")
  if not path.is_file():
    raise DataError(f"{path}: the {what} table does not exist. Fix: set --config.data.{what}_file "
                    "to an existing file (relative paths are read from --config.data.dir).")
  if FORMATS[suffix] is None:
    try:
      return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
      raise DataError(f"{path}: not a readable Parquet file ({e}). Fix: rewrite it with "
                      "pyarrow or pandas' to_parquet.") from e
  bad_rows = []

  def on_invalid(row):
    bad_rows.append(row)
    return "error"

  try:
    return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(
        delimiter=FORMATS[suffix], invalid_row_handler=on_invalid))
  except pa.ArrowInvalid as e:
    if bad_rows:
      row = bad_rows[0]
      number = row.number if row.number is not None else _line_of(path, row.text)
      where = f"line {number}" if number is not None else "a row"
      raise DataError(f"{path}: {where} has {row.actual_columns} fields where the header has "
                      f"{row.expected_columns}: {row.text[:200]!r}. Fix: quote fields that hold "
                      "the delimiter, or remove the row.") from e
    raise DataError(f"{path}: not a readable CSV file ({e}). Fix: one header row, then one "
                    "row per record with the same number of fields.") from e


def _line_of(path: pathlib.Path, text: str) -> int | None:
  """The 1-based number of the first line of ``path`` that reads ``text`` (error path only)."""
  with open(path, encoding="utf-8", errors="replace", newline="") as f:
    for number, line in enumerate(f, start=1):
      if line.rstrip("\r\n") == text:
        return number
  return None


def _suggest(name: str, names) -> str:
  match = difflib.get_close_matches(name, list(names), n=1)
  return f" Did you mean {match[0]!r}?" if match else ""


def require_column(table: pa.Table, path, column: str, role: str) -> pa.ChunkedArray:
  if column not in table.column_names:
    raise DataError(f"{path}: no column {column!r} ({role}).{_suggest(column, table.column_names)}"
                    f" Columns: {', '.join(table.column_names)}. Fix: set the config key to one "
                    "of them.")
  return table.column(column)


def _row_of(mask: pa.Array | np.ndarray) -> int:
  return int(np.flatnonzero(np.asarray(mask))[0])


def _line(path, row: int) -> str:
  """How a data row is named: its line in a CSV (the header is line 1), its row in Parquet."""
  return f"line {row + 2}" if pathlib.Path(path).suffix.lower() in (".csv", ".tsv") \
      else f"row {row + 1}"


def key_column(table: pa.Table, path, column: str, role: str) -> np.ndarray | pa.Array:
  """A key column without missing values: int64 numpy for integers, else strings."""
  col = require_column(table, path, column, role).combine_chunks()
  if col.null_count:
    row = _row_of(col.is_null().to_numpy(zero_copy_only=False))
    raise DataError(f"{path}: column {column!r} ({role}) is empty at {_line(path, row)}. "
                    "Fix: every row needs a key; drop or fill that row.")
  if pa.types.is_integer(col.type):
    return col.to_numpy().astype(np.int64)
  if pa.types.is_floating(col.type):
    values = col.to_numpy()
    if not np.all(values == np.round(values)):
      row = _row_of(values != np.round(values))
      raise DataError(f"{path}: column {column!r} ({role}) holds {values[row].item()!r} at "
                      f"{_line(path, row)}; keys must be integers or strings.")
    return values.astype(np.int64)
  return col.cast(pa.string())


def numeric_column(table: pa.Table, path, column: str, role: str) -> np.ndarray:
  """A column of numbers as float64 (timestamps of a timestamp type as Unix seconds)."""
  col = require_column(table, path, column, role).combine_chunks()
  if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
    col = pc.cast(col.cast(pa.timestamp("s")), pa.int64())
  if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
    ok = pc.fill_null(pc.match_substring_regex(col, _NUMBER_RE), True)
    row = _row_of(~ok.to_numpy(zero_copy_only=False)) if not pc.all(ok).as_py() else None
    if row is not None:
      raise DataError(f"{path}: column {column!r} ({role}) holds {col[row].as_py()!r} at "
                      f"{_line(path, row)}, which is not a number. Fix: correct the value, or "
                      "declare the feature as categorical.")
    col = pc.cast(col, pa.float64())
  if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
          or pa.types.is_boolean(col.type)):
    raise DataError(f"{path}: column {column!r} ({role}) has type {col.type}, not numbers.")
  values = col.to_numpy(zero_copy_only=False).astype(np.float64)
  if np.isnan(values).any():
    row = _row_of(np.isnan(values))
    raise DataError(f"{path}: column {column!r} ({role}) is empty at {_line(path, row)}. "
                    "Fix: fill the missing values.")
  return values


def columns_of(table: pa.Table) -> Columns:
  """Every column: numbers (and booleans) as numpy arrays, everything else as pyarrow arrays."""
  out = {}
  for name in table.column_names:
    col = table.column(name).combine_chunks()
    if (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)) and not col.null_count:
      out[name] = col.to_numpy()
    elif pa.types.is_boolean(col.type) and not col.null_count:
      out[name] = col.to_numpy(zero_copy_only=False)
    else:
      out[name] = col
  return out


def _join_rows(keys, table_keys, what: str) -> np.ndarray:
  """Row of each key in ``table_keys`` (-1 if absent), by pyarrow's hash join."""
  keys = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(keys)
  table_keys = table_keys if isinstance(table_keys, (pa.Array, pa.ChunkedArray)) \
      else pa.array(table_keys)
  if not keys.type.equals(table_keys.type):
    raise DataError(f"the {what} keys are {table_keys.type} but the interactions' are "
                    f"{keys.type}. Fix: use the same key type in both tables.")
  return pc.fill_null(pc.index_in(keys, value_set=table_keys), -1).to_numpy(
      zero_copy_only=False).astype(np.int64)


def _unique_keys(keys, path, column: str) -> None:
  keys = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(keys)
  counts = pc.value_counts(keys)
  dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
  if len(dup):
    value = dup.field("values")[0].as_py()
    row = _row_of(pc.equal(keys, value).to_numpy(zero_copy_only=False))
    raise DataError(f"{path}: key {value!r} of column {column!r} repeats (first at "
                    f"{_line(path, row)}; {len(dup)} keys repeat). Fix: one row per key.")


def load_tables(data_cfg, resolve) -> Dataset:
  """The interactions (users joined in) and the items of ``data_cfg``; ``resolve(name)``
  turns a configured file name into a path."""
  path = resolve(data_cfg.interactions_file)
  events = read_table(path, "interactions")
  user_key, item_key = data_cfg.user_key, data_cfg.item_key
  cols = columns_of(events)
  cols[user_key] = key_column(events, path, user_key, "data.user_key")
  cols[item_key] = key_column(events, path, item_key, "data.item_key")
  if data_cfg.time_key:
    cols[data_cfg.time_key] = numeric_column(events, path, data_cfg.time_key, "data.time_key")
  if data_cfg.weight_key:
    cols[data_cfg.weight_key] = numeric_column(events, path, data_cfg.weight_key,
                                               "data.weight_key")
  items, cols = _catalogue(cols, path, data_cfg, resolve)
  users, cols = _join_users(cols, path, data_cfg, resolve)
  return Dataset(ratings=cols, movies=items, genre_names=(), source="tables", users=users,
                 user_key=user_key, item_key=item_key, time_key=data_cfg.time_key,
                 weight_key=data_cfg.weight_key)


def _keyed_table(path: pathlib.Path, what: str, key: str, role: str) -> Columns:
  """A table with one row per ``key`` (an error names the first repeated key)."""
  table = read_table(path, what)
  cols = columns_of(table)
  cols[key] = key_column(table, path, key, role)
  _unique_keys(cols[key], path, key)
  return cols


def _catalogue(cols: Columns, path, data_cfg, resolve) -> tuple[Columns, Columns]:
  """(items, interactions): the items table, or the interacted items without one; the
  interactions of items outside it stop the run (or are dropped, ``unknown_items=drop``)."""
  item_key = data_cfg.item_key
  if not data_cfg.items_file:
    keys = cols[item_key]
    uniq = pc.unique(pa.array(keys) if isinstance(keys, np.ndarray) else keys)
    uniq = uniq.take(pc.array_sort_indices(uniq))
    return {item_key: uniq.to_numpy() if pa.types.is_integer(uniq.type) else uniq}, cols
  items_path = resolve(data_cfg.items_file)
  items = _keyed_table(items_path, "items", item_key, "data.item_key")
  missing = _join_rows(cols[item_key], items[item_key], "items") < 0
  if missing.any():
    n, first = int(missing.sum()), _row_of(missing)
    value = cols[item_key][first]
    value = value.as_py() if hasattr(value, "as_py") else value.item()
    if data_cfg.unknown_items != "drop":
      raise DataError(
          f"{path}: {n} interactions name items absent from {items_path} (the first, "
          f"{value!r}, at {_line(path, first)}). Fix: add them to the items table, or set "
          "--config.data.unknown_items=drop to drop those interactions.")
    logging.warning("%s: dropped %d interactions whose item is not in %s.", path, n,
                    items_path)
    cols = take(cols, np.flatnonzero(~missing))
  return items, cols


def _join_users(cols: Columns, path, data_cfg, resolve) -> tuple[Columns | None, Columns]:
  """(users, interactions with the users' columns joined in by key)."""
  if not data_cfg.users_file:
    return None, cols
  user_key, users_path = data_cfg.user_key, resolve(data_cfg.users_file)
  users = _keyed_table(users_path, "users", user_key, "data.user_key")
  rows = _join_rows(cols[user_key], users[user_key], "users")
  if (rows < 0).any():
    logging.warning("%s: %d interactions are by users absent from %s; their user columns "
                    "are empty (out-of-vocabulary, or 0 for numbers).", path,
                    int((rows < 0).sum()), users_path)
  cols = dict(cols)
  for name, values in users.items():
    if name != user_key and name not in cols:
      cols[name] = _take_filled(values, rows)
  return users, cols


def take(cols: Columns, idx: np.ndarray) -> Columns:
  """Rows ``idx`` of every column (numpy or pyarrow)."""
  return {k: (v.take(pa.array(idx)) if isinstance(v, (pa.Array, pa.ChunkedArray)) else v[idx])
          for k, v in cols.items()}


def _take_filled(values, rows: np.ndarray):
  """``values[rows]``, with -1 rows empty ("" for strings, 0 for numbers)."""
  safe = np.maximum(rows, 0)
  if isinstance(values, (pa.Array, pa.ChunkedArray)):
    out = values.take(pa.array(safe))
    return pc.if_else(pa.array(rows >= 0), out, pa.scalar("", out.type)) \
        if pa.types.is_string(out.type) else out
  out = np.asarray(values)[safe]
  return np.where(rows >= 0, out, np.zeros((), out.dtype))
