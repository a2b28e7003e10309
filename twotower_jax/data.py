"""MovieLens data layer: locate, parse, join and split the ratings.

Every loader returns a :class:`Dataset` whose columns keep the TFDS feature
names of ``movielens/100k-ratings`` and ``movielens/100k-movies``:

* ``ratings``: one row per rating, user and movie features joined in.
* ``movies``: one row per catalogue movie (all retrieval candidates).

Every data problem raises :class:`DataError` whose message names the file, the
1-based line number, what was wrong and how to fix it. Parsing is vectorised
(numpy over the raw bytes); only when the fast pass rejects a file does a slow
line-by-line pass run to describe the first bad line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import importlib
import io
import logging
import os
import pathlib
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Columns = dict[str, np.ndarray]
_log = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# From tensorflow_datasets/url_checksums/movielens.txt (size 4924029 bytes).
ML100K_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
ML100K_REQUIRED = ("u.data", "u.item", "u.user")
DATA_DIR_ENV = "TWOTOWER_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 30.0

# Genre names exactly as in u.genre (ids 0..18), used when u.genre is absent
# and as the id space of the TFDS source.
ML100K_GENRE_NAMES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
    "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)

# TFDS ``user_occupation_label`` classes; ``user_occupation_label`` holds an
# index into this tuple, for every source.
OCCUPATION_LABELS = (
    "academic/educator", "artist", "clerical/admin", "customer service",
    "doctor/health care", "entertainment", "executive/managerial", "farmer",
    "homemaker", "lawyer", "librarian", "other/not specified", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "student",
    "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)
# u.user occupation text -> TFDS label (the TFDS 100k parser's conversion).
OCCUPATION_TEXT_TO_LABEL = {
    "administrator": "clerical/admin", "artist": "artist",
    "doctor": "doctor/health care", "educator": "academic/educator",
    "engineer": "technician/engineer", "entertainment": "entertainment",
    "executive": "executive/managerial", "healthcare": "doctor/health care",
    "homemaker": "homemaker", "lawyer": "lawyer", "librarian": "librarian",
    "marketing": "sales/marketing", "none": "other/not specified",
    "other": "other/not specified", "programmer": "programmer",
    "retired": "retired", "salesman": "sales/marketing",
    "scientist": "scientist", "student": "student",
    "technician": "technician/engineer", "writer": "writer",
}

AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)  # TFDS bucketized_user_age values
MAX_AGE = 120
SPLIT_KINDS = ("seed", "random", "temporal", "leave_last_out")
USER_COLUMNS = (
    "raw_user_age", "bucketized_user_age", "user_gender",
    "user_occupation_text", "user_occupation_label", "user_zip_code",
)
MOVIE_COLUMNS = ("movie_title", "movie_genres")

_REFETCH = f"or restore the original file from {ML100K_URL}"


class DataError(ValueError):
  """Any problem with the input data; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Ratings joined with user and movie features, plus the movie catalogue.

  ``users`` (one row per user: ``user_id`` and the user feature columns) is
  present for sources with demographics; it lets :func:`load_ratings_file`
  join further rating files.
  """

  ratings: Columns
  movies: Columns
  genre_names: tuple[str, ...]
  source: str
  users: Columns | None = None


# ----------------------------------------------------------------------------
# Locating the files.


def _default_cache_dir() -> pathlib.Path:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(root) / "twotower_jax" / "ml-100k"


def _holds_ml100k(path: pathlib.Path) -> pathlib.Path | None:
  """Returns the folder (``path`` or ``path/ml-100k``) holding the files, else None."""
  for candidate in (path, path / "ml-100k"):
    if all((candidate / name).is_file() for name in ML100K_REQUIRED):
      return candidate
  return None


def _missing_files_error(path: pathlib.Path, origin: str) -> DataError:
  missing = [n for n in ML100K_REQUIRED if not (path / n).is_file()]
  what = "does not exist" if not path.exists() else f"lacks {', '.join(missing)}"
  return DataError(
      f"MovieLens 100K directory {path} (from {origin}) {what}. Fix: point "
      f"{origin} at the folder that holds the extracted u.data, u.item and "
      f"u.user (or its parent containing ml-100k/), or unset it to use the "
      f"cache {_default_cache_dir()} and the automatic download.")


def fetch_url(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
  """Downloads ``url`` into memory (the MovieLens 100K zip is ~5 MB)."""
  with urllib.request.urlopen(url, timeout=timeout) as response:
    return response.read()


def download_ml100k(cache_dir: pathlib.Path,
                    fetch: Callable[[str], bytes] | None = None) -> pathlib.Path:
  """Downloads, checks (SHA-256) and extracts ml-100k.zip into ``cache_dir``.

  Raises DataError on network failure, checksum mismatch or a bad archive;
  nothing is left in ``cache_dir`` in that case.
  """
  fetch = fetch or fetch_url
  _log.info("Downloading %s into %s", ML100K_URL, cache_dir)
  try:
    blob = fetch(ML100K_URL)
  except (OSError, http.client.HTTPException) as e:  # URLError, timeouts are OSErrors
    raise DataError(f"downloading {ML100K_URL} failed: {e}") from e
  digest = hashlib.sha256(blob).hexdigest()
  if digest != ML100K_SHA256:
    raise DataError(
        f"the download of {ML100K_URL} has SHA-256 {digest} ({len(blob)} bytes), "
        f"expected {ML100K_SHA256} (4924029 bytes); a proxy or captive portal "
        "may have altered it")
  cache_dir = pathlib.Path(cache_dir)
  cache_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".ml-100k-", dir=cache_dir.parent))
  try:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
      for info in archive.infolist():
        name = pathlib.PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts:
          raise DataError(f"unsafe path {info.filename!r} inside {ML100K_URL}")
      archive.extractall(tmp)
    extracted = _holds_ml100k(tmp)
    if extracted is None:
      raise DataError(f"{ML100K_URL} does not contain ml-100k/u.data, u.item, u.user")
    if _holds_ml100k(cache_dir) is None:  # else a concurrent run got there first
      shutil.rmtree(cache_dir, ignore_errors=True)
      extracted.rename(cache_dir)
  except zipfile.BadZipFile as e:
    raise DataError(f"{ML100K_URL} is not a valid zip archive: {e}") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return cache_dir


def resolve_data_dir(configured: str | os.PathLike | None = None, *, download: bool = True,
                     fetch: Callable[[str], bytes] | None = None) -> pathlib.Path:
  """Finds the MovieLens 100K folder; downloads it into the cache if allowed.

  Order: ``configured`` (``--config.data.dir``), env ``TWOTOWER_DATA_DIR``, the
  cache ``$XDG_CACHE_HOME/twotower_jax/ml-100k`` (default ``~/.cache``), then a
  checksum-verified download into that cache. An explicitly given folder that
  lacks the files is an error (no fall-through). ``fetch(url) -> bytes``
  replaces the network call (tests).
  """
  if configured is not None and str(configured) != "":
    path = pathlib.Path(configured).expanduser()
    found = _holds_ml100k(path)
    if found is None:
      raise _missing_files_error(path, "--config.data.dir")
    return found
  env = os.environ.get(DATA_DIR_ENV, "")
  if env:
    path = pathlib.Path(env).expanduser()
    found = _holds_ml100k(path)
    if found is None:
      raise _missing_files_error(path, f"${DATA_DIR_ENV}")
    return found
  cache = _default_cache_dir()
  found = _holds_ml100k(cache)
  if found is not None:
    return found
  looked = ["--config.data.dir (not set)", f"${DATA_DIR_ENV} (not set)", f"cache {cache}"]
  if not download:
    reason = "download is disabled (--config.data.download=False)"
  else:
    try:
      return download_ml100k(cache, fetch)
    except DataError as e:
      reason = str(e)
  raise DataError(
      "MovieLens 100K not found. Looked in: " + "; ".join(looked) + f". {reason}. "
      f"Fix: download {ML100K_URL}, unzip it, and pass --config.data.dir=PATH "
      f"or run `export {DATA_DIR_ENV}=PATH` (PATH = the folder holding u.data).")


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


def _line_error(path, lineno: int, line: str, problem: str, fields, sep) -> DataError:
  shown = line if len(line) <= 200 else line[:200] + "..."
  return DataError(
      f"{path}:{lineno}: {problem}. Line {lineno}: {shown!r}. Expected "
      f"{len(fields)} fields: {_layout(fields, sep)}. Fix: correct or delete "
      f"line {lineno} of {path}, {_REFETCH}.")


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
      return _line_error(path, i + 1, line, problem, fields, sep)
  raise AssertionError(f"{path}: fast parse rejected a file the slow pass accepts")


def _read_bytes(path) -> bytes:
  """File bytes with CRLF -> LF, trailing empty lines removed, one final LF."""
  path = pathlib.Path(path)
  if not path.is_file():
    where = "does not exist" if not path.exists() else "is not a regular file"
    raise DataError(
        f"{path} {where}. Fix: point --config.data.dir (or ${DATA_DIR_ENV}) at "
        f"the folder holding the MovieLens files, {_REFETCH}.")
  data = path.read_bytes().replace(b"\r\n", b"\n").rstrip(b"\n")
  if not data:
    raise DataError(f"{path} is empty. Fix: {_REFETCH[3:]}.")
  return data + b"\n"


def _compact(strings: np.ndarray) -> np.ndarray:
  """A str array at the width of its longest element (numpy keeps the table's width)."""
  strings = np.asarray(strings, dtype=str)
  width = max(int(np.char.str_len(strings).max(initial=0)), 1)
  return strings.astype(f"<U{width}")


def _lines(data: bytes) -> list[str]:
  return data.decode("latin-1")[:-1].split("\n")


def _parse_text_table(path, fields: Sequence[_Field], sep: str) -> tuple[np.ndarray, bytes]:
  """[N, F] str array of a ``sep``-separated latin-1 file matching ``fields``."""
  data = _read_bytes(path)
  text = data.decode("latin-1")
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
    raise _line_error(path, i + 1, _lines(data)[i], problem(i), fields, sep)


def _check_unique(path, ids_N: np.ndarray, what: str, data: bytes, fields, sep) -> None:
  order = np.argsort(ids_N, kind="stable")
  dup = np.flatnonzero(ids_N[order][1:] == ids_N[order][:-1])
  if dup.size:
    i = int(order[dup + 1].min())  # the earliest line repeating an earlier one
    first = int(order[np.searchsorted(ids_N[order], ids_N[i])])
    raise _line_error(path, i + 1, _lines(data)[i],
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
      "user_occupation_text": _compact(occupation),
      "user_occupation_label": label,
      "user_zip_code": _compact(table[:, 4]),
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
  """u.item (latin-1, ``|``-separated, one flag per genre) -> movies table."""
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
      "movie_title": _compact(table[:, 1]),
      "movie_genres": genre_ids_from_flags(table[:, 5:] == "1"),
      "movie_release_year": year,
  }


# ----------------------------------------------------------------------------
# Joining.


def take_rows(columns: Mapping[str, np.ndarray], idx: np.ndarray) -> Columns:
  """Rows ``idx`` of every column."""
  return {k: v[idx] for k, v in columns.items()}


def _lookup(path, ids_N: np.ndarray, table_ids: np.ndarray, what: str, where: str) -> np.ndarray:
  """Row of each id in ``table_ids``; DataError naming the first unknown one's line."""
  order = np.argsort(table_ids, kind="stable")
  sorted_ids = table_ids[order]
  pos = np.clip(np.searchsorted(sorted_ids, ids_N), 0, max(sorted_ids.size - 1, 0))
  found = sorted_ids[pos] == ids_N if sorted_ids.size else np.zeros(ids_N.shape, bool)
  if not found.all():
    i = int(np.flatnonzero(~found)[0])
    raise DataError(
        f"{path}:{i + 1}: {what} {ids_N[i]} is not in {where}. Fix: delete line {i + 1} "
        f"of {path} or add {what} {ids_N[i]} to {where}, {_REFETCH}.")
  return order[pos]


def join_ratings(path, raw: Columns, movies: Columns, users: Columns | None,
                 *, users_where: str = "u.user", movies_where: str = "u.item") -> Columns:
  """Joins u.data columns with the users and movies tables (TFDS column order)."""
  movie_row = _lookup(path, raw["movie_id"], movies["movie_id"], "movie id", movies_where)
  out = {"user_id": raw["user_id"], "movie_id": raw["movie_id"],
         "user_rating": raw["user_rating"], "timestamp": raw["timestamp"]}
  if users is not None:
    user_row = _lookup(path, raw["user_id"], users["user_id"], "user id", users_where)
    out.update({k: users[k][user_row] for k in USER_COLUMNS if k in users})
  out.update({k: movies[k][movie_row] for k in MOVIE_COLUMNS if k in movies})
  return out


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
  """A u.data-format file (e.g. GroupLens's u1.base) joined with ``dataset``'s users/movies."""
  raw = read_u_data(path)
  users = dataset.users
  if users is None:  # no demographics: the known users are those of the ratings
    users = {"user_id": np.unique(dataset.ratings["user_id"])}
  return join_ratings(path, raw, dataset.movies, users,
                      users_where=f"the {dataset.source} users",
                      movies_where=f"the {dataset.source} movies")


# ----------------------------------------------------------------------------
# Splits.


def _num_rows(ratings: Mapping[str, np.ndarray]) -> int:
  if "user_id" not in ratings:
    raise DataError(f"ratings have no 'user_id' column (columns: {sorted(ratings)}). "
                    "Fix: pass Dataset.ratings as returned by twotower_jax.data.load.")
  return int(np.shape(ratings["user_id"])[0])


def _fraction_count(n: int, test_fraction: float) -> int:
  if not 0.0 < test_fraction < 1.0:
    raise DataError(f"test_fraction={test_fraction} must be strictly between 0 and 1. "
                    "Fix: set --config.data.test_fraction=0.2 (for example).")
  n_test = round(test_fraction * n)
  if n_test < 1 or n_test >= n:
    raise DataError(f"test_fraction={test_fraction} of {n} ratings leaves {n_test} test and "
                    f"{n - n_test} train ratings; both need at least one. Fix: change "
                    "--config.data.test_fraction or use more data.")
  return n_test


def split_indices(ratings: Mapping[str, np.ndarray], kind: str, *, seed: int,
                  test_fraction: float = 0.2, train_size: int = 80_000,
                  test_size: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
  """(train_idx, test_idx) into ``ratings``, each sorted ascending, disjoint.

  kinds: ``seed`` (seeded permutation: first ``train_size`` train, next
  ``test_size`` test, like the TFRS retrieval tutorial, whose test set is the
  remaining 20,000 of 100K: pass ``test_size=20_000`` to match its sizes; the
  permutation itself differs from TensorFlow's), ``random`` (seeded,
  ``test_fraction`` test), ``temporal`` (latest ``test_fraction`` by timestamp
  is test; ties by position), ``leave_last_out`` (each user's latest rating is
  test; ties by position; single-rating users stay in train).
  """
  n = _num_rows(ratings)
  if kind == "seed":
    if train_size < 1 or test_size < 1 or train_size + test_size > n:
      raise DataError(
          f"split 'seed' with train_size={train_size}, test_size={test_size} needs "
          f"1..{n} ratings in total, the data has {n}. Fix: lower "
          "--config.data.train_size/test_size or use split='random'.")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:train_size]), np.sort(perm[train_size:train_size + test_size])
  if kind == "random":
    n_test = _fraction_count(n, test_fraction)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
  if kind in ("temporal", "leave_last_out") and "timestamp" not in ratings:
    raise DataError(f"split {kind!r} needs a 'timestamp' column; ratings have "
                    f"{sorted(ratings)}. Fix: use split='random'.")
  if kind == "temporal":
    n_test = _fraction_count(n, test_fraction)
    order = np.argsort(np.asarray(ratings["timestamp"]), kind="stable")
    return np.sort(order[:n - n_test]), np.sort(order[n - n_test:])
  if kind == "leave_last_out":
    users_N = np.asarray(ratings["user_id"])
    order = np.lexsort((np.arange(n), np.asarray(ratings["timestamp"]), users_N))
    users_sorted = users_N[order]
    is_last = np.ones(n, bool)
    is_last[:-1] = users_sorted[1:] != users_sorted[:-1]
    is_first = np.ones(n, bool)
    is_first[1:] = users_sorted[1:] != users_sorted[:-1]
    test_sorted = is_last & ~is_first  # latest rating of users with >= 2 ratings
    test = np.sort(order[test_sorted])
    if test.size == 0:
      raise DataError("split 'leave_last_out': no user has two or more ratings, so the test "
                      "set is empty. Fix: use split='random'.")
    return np.sort(order[~test_sorted]), test
  raise DataError(f"unknown split {kind!r}. Fix: set --config.data.split to one of "
                  f"{', '.join(SPLIT_KINDS)} or 'files'.")


# ----------------------------------------------------------------------------
# TFDS source.

_TFDS_INSTALL = 'pip install "twotower_jax[tfds]"'


def _norm_genre(name: str) -> str:
  """'Children's' and 'Children', 'unknown' and 'Unknown' name the same genre."""
  name = name.lower()
  return name.removesuffix("'s")


def _tfds_error(problem: str) -> DataError:
  return DataError(f"TFDS movielens/100k: {problem}. Fix: rebuild the TFDS data "
                   "(`tfds build movielens`) or use --config.data.source=grouplens.")


def _tfds_int(values: np.ndarray, feature: str) -> np.ndarray:
  """Byte-string ids -> int64; DataError naming the first non-integer."""
  values = np.asarray(values, dtype=bytes)
  ok = np.char.isdigit(values) & (np.char.str_len(values) <= 18)  # ASCII digits only
  if not ok.all():
    raise _tfds_error(f"feature {feature!r} holds {values[~ok][0]!r}, expected an integer id")
  return values.astype(np.int64)


def _tfds_columns(tfds, name: str, data_dir, download: bool):
  """Whole TFDS split as numpy columns; ``movie_genres`` [N, G] padded with -1."""
  import tensorflow as tf  # a dependency of tensorflow_datasets
  try:
    ds, info = tfds.load(name, split="train", data_dir=data_dir, download=download,
                         with_info=True, shuffle_files=False)
  except Exception as e:  # TFDS raises assorted types (AssertionError, DatasetNotFoundError, ...)
    raise DataError(
        f"TFDS could not load {name} ({type(e).__name__}: {e}). Fix: allow the download "
        f"(--config.data.download=True), run `tfds build movielens --config "
        f"{name.split('/')[1]}`, or use --config.data.source=grouplens.") from e
  ds = ds.map(lambda ex: {**ex, "genre_count": tf.size(ex["movie_genres"])})
  batches = list(tfds.as_numpy(ds.padded_batch(1 << 17)))
  if not batches:
    raise DataError(f"TFDS {name} is empty. Fix: rebuild it (`tfds build movielens`).")
  cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0] if k != "movie_genres"}
  width = max(int(cols["genre_count"].max(initial=0)), 1)
  genres = np.concatenate([
      np.pad(b["movie_genres"], ((0, 0), (0, width - b["movie_genres"].shape[1])))[:, :width]
      for b in batches])
  cols["movie_genres"] = np.where(np.arange(width)[None, :] < cols.pop("genre_count")[:, None],
                                  genres, -1)
  return cols, info


def _tfds_genres(genres_NxG: np.ndarray, tfds_names: Sequence[str]) -> np.ndarray:
  """TFDS genre labels (-1 padded) -> ids into ML100K_GENRE_NAMES, ascending, -1 padded."""
  ours = {_norm_genre(g): i for i, g in enumerate(ML100K_GENRE_NAMES)}
  to_ours = np.array([ours.get(_norm_genre(n), -2) for n in tfds_names], np.int64)
  mapped_NxG = np.where(genres_NxG < 0, -1, to_ours[np.maximum(genres_NxG, 0)])
  if (mapped_NxG == -2).any():
    bad = tfds_names[int(genres_NxG[mapped_NxG == -2][0])]
    raise _tfds_error(f"genre {bad!r} is not a MovieLens 100K genre {ML100K_GENRE_NAMES}")
  big = len(ML100K_GENRE_NAMES)  # sorts the padding last
  sorted_NxG = np.sort(np.where(mapped_NxG < 0, big, mapped_NxG), axis=1)
  return np.where(sorted_NxG == big, -1, sorted_NxG).astype(np.int32)


_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _year_from_title(titles: np.ndarray) -> np.ndarray:
  """Release year from a trailing ``(YYYY)`` of the title, -1 without one."""
  matches = [_TITLE_YEAR.search(t) for t in titles.tolist()]  # catalogue-sized, once
  return np.array([int(m.group(1)) if m else -1 for m in matches], np.int32)


def _tfds_text(values: np.ndarray) -> np.ndarray:
  return _compact(np.char.decode(np.asarray(values, dtype=bytes), "utf-8"))


def load_tfds(data_dir: str | None = None, *, download: bool = True) -> Dataset:
  """Loads TFDS ``movielens/100k-ratings`` and ``-movies`` into the same columns.

  Genre ids index ``ML100K_GENRE_NAMES`` (the u.genre order; TFDS labels are
  mapped by name), so both sources give identical ``movie_genres``. TFDS has no
  release date: ``movie_release_year`` comes from the title's ``(YYYY)``.
  """
  try:
    tfds = importlib.import_module("tensorflow_datasets")
    importlib.import_module("tensorflow")
  except ImportError as e:
    raise DataError(
        f"--config.data.source=tfds needs tensorflow-datasets and tensorflow, which are not "
        f"installed ({e}). Fix: {_TFDS_INSTALL}, or use --config.data.source=grouplens.") from e
  r, r_info = _tfds_columns(tfds, "movielens/100k-ratings", data_dir, download)
  m, m_info = _tfds_columns(tfds, "movielens/100k-movies", data_dir, download)
  occupation_names = r_info.features["user_occupation_label"].names
  unknown = [n for n in occupation_names if n not in OCCUPATION_LABELS]
  if unknown:
    raise _tfds_error(f"occupation labels {unknown} are not in {OCCUPATION_LABELS}")
  occ_map = np.array([OCCUPATION_LABELS.index(n) for n in occupation_names], np.int64)
  ratings = {
      "user_id": _tfds_int(r["user_id"], "user_id"),
      "movie_id": _tfds_int(r["movie_id"], "movie_id"),
      "user_rating": r["user_rating"].astype(np.float32),
      "timestamp": r["timestamp"].astype(np.int64),
      "raw_user_age": r["raw_user_age"].astype(np.float32),
      "bucketized_user_age": r["bucketized_user_age"].astype(np.float32),
      "user_gender": r["user_gender"].astype(bool),
      "user_occupation_text": _tfds_text(r["user_occupation_text"]),
      "user_occupation_label": occ_map[r["user_occupation_label"]],
      "user_zip_code": _tfds_text(r["user_zip_code"]),
      "movie_title": _tfds_text(r["movie_title"]),
      "movie_genres": _tfds_genres(r["movie_genres"],
                                   r_info.features["movie_genres"].feature.names),
  }
  movie_ids = _tfds_int(m["movie_id"], "movie_id")
  order = np.argsort(movie_ids, kind="stable")
  if np.any(movie_ids[order][1:] == movie_ids[order][:-1]):
    raise _tfds_error("100k-movies lists a movie id twice")
  titles = _tfds_text(m["movie_title"])[order]
  movies = {
      "movie_id": movie_ids[order],
      "movie_title": titles,
      "movie_genres": _tfds_genres(m["movie_genres"],
                                   m_info.features["movie_genres"].feature.names)[order],
      "movie_release_year": _year_from_title(titles),
  }
  missing = ~np.isin(ratings["movie_id"], movies["movie_id"])
  if missing.any():
    raise _tfds_error(f"100k-ratings rates movie {ratings['movie_id'][missing][0]}, "
                      "which 100k-movies lacks")
  _, first = np.unique(ratings["user_id"], return_index=True)
  users = take_rows({k: ratings[k] for k in ("user_id",) + USER_COLUMNS}, first)
  return Dataset(ratings=ratings, movies=movies, genre_names=ML100K_GENRE_NAMES,
                 source="tfds", users=users)


# ----------------------------------------------------------------------------
# Config-driven entry points.

# Extra sources: name -> loader(data_cfg) -> Dataset. Other modules register here.
LOADERS: dict[str, Callable[[Any], Dataset]] = {}
_OPTIONAL_LOADER_MODULES = ("twotower_jax.data_large",)


def default_data_config():
  """The ``data`` section of a config with every key :func:`load` reads."""
  import ml_collections
  return ml_collections.ConfigDict({
      "source": "grouplens", "dir": "", "download": True, "split": "seed",
      "train_size": 80_000, "test_size": 10_000, "test_fraction": 0.2,
      "train_file": "", "test_file": ""})


def _cfg(data_cfg, key: str, default):
  value = data_cfg.get(key, default) if hasattr(data_cfg, "get") else getattr(data_cfg, key, default)
  return default if value is None else value


def _register_optional_loaders() -> None:
  for module in _OPTIONAL_LOADER_MODULES:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:
        raise


def load(data_cfg) -> Dataset:
  """Loads ``data_cfg.source``: grouplens (default), tfds, or one of ``LOADERS``."""
  source = _cfg(data_cfg, "source", "grouplens")
  if source == "grouplens":
    return load_movielens_100k(resolve_data_dir(_cfg(data_cfg, "dir", "") or None,
                                                download=bool(_cfg(data_cfg, "download", True))))
  if source == "tfds":
    return load_tfds(_cfg(data_cfg, "tfds_data_dir", "") or None,
                     download=bool(_cfg(data_cfg, "download", True)))
  if source not in LOADERS:
    _register_optional_loaders()
  if source not in LOADERS:
    valid = ", ".join(["grouplens", "tfds", *sorted(LOADERS)])
    raise DataError(f"unknown data source {source!r}. Fix: set --config.data.source to one "
                    f"of {valid}.")
  return LOADERS[source](data_cfg)


def _resolve_ratings_file(data_cfg, key: str) -> pathlib.Path:
  name = _cfg(data_cfg, key, "")
  if not name:
    raise DataError(f"split='files' needs --config.data.{key} (a u.data-format file such as "
                    f"u1.base / u1.test). Fix: set --config.data.{key}=PATH.")
  path = pathlib.Path(name).expanduser()
  tried = [path]
  if not path.is_absolute() and not path.exists() and _cfg(data_cfg, "source", "grouplens") == "grouplens":
    try:
      base = resolve_data_dir(_cfg(data_cfg, "dir", "") or None, download=False)
      tried.append(base / path)
    except DataError:
      pass
  for p in tried:
    if p.is_file():
      return p
  raise DataError(f"--config.data.{key}={name!r} not found (tried {', '.join(map(str, tried))}). "
                  f"Fix: give an existing path, absolute or relative to the data folder.")


def train_test(data_cfg, dataset: Dataset, seed: int) -> tuple[Columns, Columns]:
  """(train, test) ``ratings`` columns per ``data_cfg.split``."""
  split = _cfg(data_cfg, "split", "seed")
  if split == "files":
    return (load_ratings_file(_resolve_ratings_file(data_cfg, "train_file"), dataset),
            load_ratings_file(_resolve_ratings_file(data_cfg, "test_file"), dataset))
  train_idx, test_idx = split_indices(
      dataset.ratings, split, seed=seed,
      test_fraction=float(_cfg(data_cfg, "test_fraction", 0.2)),
      train_size=int(_cfg(data_cfg, "train_size", 80_000)),
      test_size=int(_cfg(data_cfg, "test_size", 10_000)))
  return take_rows(dataset.ratings, train_idx), take_rows(dataset.ratings, test_idx)
