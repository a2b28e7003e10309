"""MovieLens 100K: the u.data, u.user, u.item and u.genre files, and their join.

Every data problem raises :class:`~twotower_jax.data.dataset.DataError` whose
message names the file, the 1-based line number, what was wrong and how to fix
it. Parsing is vectorised (numpy over the raw bytes); only when the fast pass
rejects a file does a slow line-by-line pass run to describe the first bad line.

Text is read as UTF-8 when the file is valid UTF-8 (an edited copy), else as
latin-1 (the GroupLens original): see :func:`~twotower_jax.data.dataset.decode_text`.
Ratings repeating an earlier line's user, movie and timestamp are dropped with
a warning (:func:`~twotower_jax.data.dataset.drop_repeated_ratings`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Sequence

import numpy as np

from twotower_jax.arrays import find_rows
from twotower_jax.data.dataset import (
    AGE_BUCKETS,
    MAX_AGE,
    ML100K_GENRE_NAMES,
    MOVIE_COLUMNS,
    OCCUPATION_LABELS,
    OCCUPATION_TEXT_TO_LABEL,
    USER_COLUMNS,
    UTF8_BOM,
    Columns,
    DataError,
    Dataset,
    compact_strings,
    decode_text,
    drop_repeated_ratings,
    first_duplicate,
    line_error,
)
from twotower_jax.data.download import DATA_DIR_ENV, ML100K_REQUIRED, ML100K_URL

_REFETCH = f"or restore the original file from {ML100K_URL}"


# ----------------------------------------------------------------------------
# Line grammar shared by the fast and the slow pass.


@dataclasses.dataclass(frozen=True)
class _Field:
  name: str
  pattern: str  # regex without capture groups
  expected: str


_INT = _Field("", r"[0-9]{1,18}", "a non-negative integer of at most 18 digits")
_TEXT = _Field("", r"[^|\n]*", "text")
_NONEMPTY = _Field("", r"[^|\n]+", "non-empty text")
_MONTHS = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
_DATE = _Field("", rf"(?:[0-9]{{1,2}}-(?:{_MONTHS})-[0-9]{{4}})?",
               "empty or a date like 01-Jan-1995")


def _f(base: _Field, name: str, pattern: str | None = None, expected: str | None = None):
  return _Field(name, pattern or base.pattern, expected or base.expected)


U_DATA_FIELDS = (_f(_INT, "user id"), _f(_INT, "movie id"), _f(_INT, "rating"),
                 _f(_INT, "timestamp"))
U_USER_FIELDS = (_f(_INT, "user id"), _f(_INT, "age", r"[0-9]{1,3}", f"an integer from 1 to {MAX_AGE}"),
                 _Field("gender", "[MF]", "M or F"), _f(_NONEMPTY, "occupation"),
                 _f(_NONEMPTY, "zip code"))
U_GENRE_FIELDS = (_f(_NONEMPTY, "genre name"), _f(_INT, "genre id"))


def u_item_fields(genre_names: Sequence[str]) -> tuple[_Field, ...]:
  """u.item grammar: id|title|release date|video release date|URL|one 0/1 flag per genre."""
  flags = tuple(_Field(f"genre flag {i} ({g})", "[01]", "0 or 1")
                for i, g in enumerate(genre_names))
  return (_f(_INT, "movie id"), _f(_TEXT, "title"), _f(_DATE, "release date"),
          _f(_TEXT, "video release date"), _f(_TEXT, "IMDb URL")) + flags


def _layout(fields: Sequence[_Field], sep: str) -> str:
  sep_name = "<TAB>" if sep == "\t" else sep
  names = [f.name for f in fields if not f.name.startswith("genre flag")]
  num_flags = len(fields) - len(names)
  if num_flags:
    names.append(f"{num_flags} genre flags (0 or 1, one per line of u.genre)")
  return sep_name.join(names)


def _grammar_error(path, lineno: int, line: str, problem: str, fields, sep) -> DataError:
  """:func:`line_error` expecting the line layout of ``fields``."""
  return line_error(path, lineno, line, problem,
                    f"{len(fields)} fields: {_layout(fields, sep)}", ML100K_URL)


def _describe_line(line: str, fields: Sequence[_Field], sep: str) -> str | None:
  """Why ``line`` breaks the grammar, or None if it is fine."""
  if line == "":
    return "the line is empty"
  parts = line.split(sep)
  if len(parts) != len(fields):
    sep_name = "tab" if sep == "\t" else repr(sep)
    return f"found {len(parts)} {sep_name}-separated fields, expected {len(fields)}"
  for k, (field, value) in enumerate(zip(fields, parts), 1):
    if not re.fullmatch(field.pattern, value):
      return f"field {k} ({field.name}) is {value!r}, expected {field.expected}"
  return None


def _first_bad_line(path, lines: Sequence[str], fields, sep) -> DataError:
  for i, line in enumerate(lines):
    problem = _describe_line(line, fields, sep)
    if problem is not None:
      return _grammar_error(path, i + 1, line, problem, fields, sep)
  raise AssertionError(f"{path}: fast parse rejected a file the slow pass accepts")


def _read_bytes(path) -> bytes:
  """File bytes without a UTF-8 BOM, CRLF -> LF, trailing empty lines removed, one final LF."""
  path = pathlib.Path(path)
  if not path.is_file():
    where = "does not exist" if not path.exists() else "is not a regular file"
    raise DataError(
        f"{path} {where}. Fix: point --config.data.dir (or ${DATA_DIR_ENV}) at "
        f"the folder holding the MovieLens files, {_REFETCH}.")
  data = path.read_bytes().removeprefix(UTF8_BOM).replace(b"\r\n", b"\n").rstrip(b"\n")
  if not data:
    raise DataError(f"{path} is empty. Fix: {_REFETCH[3:]}.")
  return data + b"\n"


def _lines(data: bytes) -> list[str]:
  return decode_text(data)[:-1].split("\n")


def _parse_text_table(path, fields: Sequence[_Field], sep: str) -> tuple[np.ndarray, bytes]:
  """[N, F] str array of a ``sep``-separated file (UTF-8 or latin-1) matching ``fields``."""
  data = _read_bytes(path)
  text = decode_text(data)
  line_re = re.compile(
      "^" + re.escape(sep).join(f"({f.pattern})" for f in fields) + "$", re.MULTILINE)
  rows = line_re.findall(text)
  if len(rows) != text.count("\n"):
    raise _first_bad_line(path, _lines(data), fields, sep)
  table = np.array(rows, dtype=str).reshape(len(rows), len(fields))
  return table, data


_POW10 = 10 ** np.arange(19, dtype=np.int64)


def _parse_int_table_fast(data: bytes, num_fields: int, sep: int) -> np.ndarray | None:
  """[N, F] int64 from lines of F ``sep``-separated digit strings; None if any line isn't."""
  buf = np.frombuffer(data, np.uint8)
  is_nl = buf == 10
  is_end = is_nl | (buf == sep)
  is_digit = (buf >= 48) & (buf <= 57)
  if not np.all(is_end | is_digit):
    return None
  ends = np.flatnonzero(is_end)
  num_lines = int(is_nl.sum())
  if ends.size != num_lines * num_fields:
    return None
  end_is_nl_NxF = is_nl[ends].reshape(num_lines, num_fields)
  if not (end_is_nl_NxF[:, -1].all() and not end_is_nl_NxF[:, :-1].any()):
    return None
  starts = np.concatenate([[0], ends[:-1] + 1])
  lengths = ends - starts
  if lengths.min() < 1 or lengths.max() > 18:
    return None
  field_of_char = np.cumsum(is_end) - is_end
  exponent = np.maximum(ends[field_of_char] - np.arange(buf.size) - 1, 0)
  contrib = np.where(is_digit, buf.astype(np.int64) - 48, 0) * _POW10[exponent]
  values = np.add.reduceat(contrib, starts)
  return values.reshape(num_lines, num_fields)


def _parse_int_table(path, fields: Sequence[_Field], sep: str) -> tuple[np.ndarray, bytes]:
  """[N, F] int64 of a file of ``sep``-separated non-negative integers."""
  data = _read_bytes(path)
  table = _parse_int_table_fast(data, len(fields), ord(sep))
  if table is None:
    raise _first_bad_line(path, _lines(data), fields, sep)
  return table, data


def _check_rows(path, bad_N: np.ndarray, problem: Callable[[int], str], data: bytes,
                fields, sep) -> None:
  """Raises for the first row flagged in ``bad_N`` (row i is line i + 1)."""
  bad = np.flatnonzero(bad_N)
  if bad.size:
    i = int(bad[0])
    raise _grammar_error(path, i + 1, _lines(data)[i], problem(i), fields, sep)


def _check_unique(path, ids_N: np.ndarray, what: str, data: bytes, fields, sep) -> None:
  dup = first_duplicate(ids_N)
  if dup is not None:
    i, first = dup  # the earliest line repeating an earlier one, and that earlier line
    raise _grammar_error(path, i + 1, _lines(data)[i],
                         f"duplicate {what} {ids_N[i]} (first defined on line {first + 1})",
                         fields, sep)


# ----------------------------------------------------------------------------
# The four ML-100K files.


def read_u_data(path) -> Columns:
  """u.data format (``user<TAB>movie<TAB>rating<TAB>timestamp``), ratings 1..5."""
  table, data = _parse_int_table(path, U_DATA_FIELDS, "\t")
  rating_N = table[:, 2]
  _check_rows(path, (rating_N < 1) | (rating_N > 5),
              lambda i: f"field 3 (rating) is {rating_N[i]}, expected an integer from 1 to 5",
              data, U_DATA_FIELDS, "\t")
  return {"user_id": table[:, 0].copy(), "movie_id": table[:, 1].copy(),
          "user_rating": rating_N.astype(np.float32), "timestamp": table[:, 3].copy()}


def read_u_genre(path) -> tuple[str, ...]:
  """u.genre (``name|id``, ids 0, 1, 2, ... in order) -> genre names."""
  table, data = _parse_text_table(path, U_GENRE_FIELDS, "|")
  ids = table[:, 1].astype(np.int64)
  _check_rows(path, ids != np.arange(ids.size),
              lambda i: f"genre id is {ids[i]}, expected {i} (ids must be 0, 1, 2, ... in "
              "line order)", data, U_GENRE_FIELDS, "|")
  names = table[:, 0]
  _check_unique(path, names, "genre name", data, U_GENRE_FIELDS, "|")
  return tuple(str(n) for n in names)


def read_u_user(path) -> Columns:
  """u.user (``id|age|gender|occupation|zip``) -> users table in TFDS columns."""
  table, data = _parse_text_table(path, U_USER_FIELDS, "|")
  fields = U_USER_FIELDS
  ids = table[:, 0].astype(np.int64)
  _check_unique(path, ids, "user id", data, fields, "|")
  age = table[:, 1].astype(np.int64)
  _check_rows(path, (age < 1) | (age > MAX_AGE),
              lambda i: f"field 2 (age) is {age[i]}, expected 1..{MAX_AGE}", data, fields, "|")
  occupation = table[:, 3]
  known = np.array(sorted(OCCUPATION_TEXT_TO_LABEL))
  _check_rows(path, ~np.isin(occupation, known),
              lambda i: f"field 4 (occupation) {str(occupation[i])!r} is not a MovieLens 100K "
              f"occupation ({', '.join(known)})", data, fields, "|")
  label_of_text = {t: OCCUPATION_LABELS.index(l) for t, l in OCCUPATION_TEXT_TO_LABEL.items()}
  label = np.array([label_of_text[t] for t in known], np.int64)[np.searchsorted(known, occupation)]
  bucket = np.array(AGE_BUCKETS, np.float32)[np.searchsorted(AGE_BUCKETS[1:], age, side="right")]
  return {
      "user_id": ids,
      "raw_user_age": age.astype(np.float32),
      "bucketized_user_age": bucket,
      "user_gender": table[:, 2] == "M",
      "user_occupation_text": compact_strings(occupation),
      "user_occupation_label": label,
      "user_zip_code": compact_strings(table[:, 4]),
  }


def genre_ids_from_flags(flags_MxG: np.ndarray) -> np.ndarray:
  """0/1 genre flags -> genre ids in ascending order, padded with -1 to the max count."""
  flags_MxG = np.asarray(flags_MxG, bool)
  counts_M = flags_MxG.sum(1)
  width = max(int(counts_M.max(initial=0)), 1)
  order_MxG = np.argsort(~flags_MxG, axis=1, kind="stable")[:, :width]
  if order_MxG.shape[1] < width:  # fewer genres than width (only when G == 0)
    order_MxG = np.zeros((flags_MxG.shape[0], width), np.int64)
  valid = np.arange(width)[None, :] < counts_M[:, None]
  return np.where(valid, order_MxG, -1).astype(np.int32)


def read_u_item(path, genre_names: Sequence[str] = ML100K_GENRE_NAMES) -> Columns:
  """u.item (latin-1 or UTF-8, ``|``-separated, one flag per genre) -> movies table."""
  fields = u_item_fields(genre_names)
  table, data = _parse_text_table(path, fields, "|")
  ids = table[:, 0].astype(np.int64)
  _check_unique(path, ids, "movie id", data, fields, "|")
  dates = table[:, 2]
  year = np.full(ids.shape, -1, np.int32)
  has_date = dates != ""
  if has_date.any():
    year[has_date] = np.char.rpartition(dates[has_date], "-")[:, 2].astype(np.int32)
  return {
      "movie_id": ids,
      "movie_title": compact_strings(table[:, 1]),
      "movie_genres": genre_ids_from_flags(table[:, 5:] == "1"),
      "movie_release_year": year,
  }


# ----------------------------------------------------------------------------
# Joining.


def _lookup(path, ids_N: np.ndarray, table_ids: np.ndarray, what: str, where: str) -> np.ndarray:
  """Row of each id in ``table_ids``; DataError naming the first unknown one's line."""
  rows_N = find_rows(table_ids, ids_N)
  missing = np.flatnonzero(rows_N < 0)
  if missing.size:
    i = int(missing[0])
    raise DataError(
        f"{path}:{i + 1}: {what} {ids_N[i]} is not in {where}. Fix: delete line {i + 1} "
        f"of {path} or add {what} {ids_N[i]} to {where}, {_REFETCH}.")
  return rows_N


def join_ratings(path, raw: Columns, movies: Columns, users: Columns | None,
                 *, users_where: str = "u.user", movies_where: str = "u.item") -> Columns:
  """Joins u.data columns with the users and movies tables (TFDS column order).

  Rows repeating an earlier row's user, movie and timestamp are then dropped
  (the first kept) with one warning naming ``path``.
  """
  movie_row = _lookup(path, raw["movie_id"], movies["movie_id"], "movie id", movies_where)
  out = {"user_id": raw["user_id"], "movie_id": raw["movie_id"],
         "user_rating": raw["user_rating"], "timestamp": raw["timestamp"]}
  if users is not None:
    user_row = _lookup(path, raw["user_id"], users["user_id"], "user id", users_where)
    out.update({k: users[k][user_row] for k in USER_COLUMNS if k in users})
  out.update({k: movies[k][movie_row] for k in MOVIE_COLUMNS if k in movies})
  return drop_repeated_ratings(out, path)


def load_movielens_100k(data_dir) -> Dataset:
  """Parses and joins u.data, u.item, u.user and u.genre of ``data_dir``.

  u.genre is optional (the standard 19 genres are assumed without it).
  """
  d = pathlib.Path(data_dir)
  for name in ML100K_REQUIRED:
    if not (d / name).is_file():
      raise DataError(
          f"{d / name} does not exist. Fix: point --config.data.dir (or "
          f"${DATA_DIR_ENV}) at the folder holding u.data, u.item and u.user, {_REFETCH}.")
  genre_names = read_u_genre(d / "u.genre") if (d / "u.genre").exists() else ML100K_GENRE_NAMES
  movies = read_u_item(d / "u.item", genre_names)
  users = read_u_user(d / "u.user")
  raw = read_u_data(d / "u.data")
  ratings = join_ratings(d / "u.data", raw, movies, users,
                         users_where=str(d / "u.user"), movies_where=str(d / "u.item"))
  return Dataset(ratings=ratings, movies=movies, genre_names=tuple(genre_names),
                 source="grouplens-100k", users=users)


def load_ratings_file(path, dataset: Dataset) -> Columns:
  """A u.data-format file (e.g. GroupLens's u1.base) joined with ``dataset``'s users/movies.

  Lines repeating an earlier line's user, movie and timestamp are dropped with a warning.
  """
  raw = read_u_data(path)
  users = dataset.users
  if users is None:  # no demographics: the known users are those of the ratings
    users = {"user_id": np.unique(dataset.ratings["user_id"])}
  return join_ratings(path, raw, dataset.movies, users,
                      users_where=f"the {dataset.source} users",
                      movies_where=f"the {dataset.source} movies")
