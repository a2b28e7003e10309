"""The ``Dataset`` every loader returns, ``DataError``, and what all sources share.

Columns keep the TFDS feature names of ``movielens/100k-ratings`` and
``movielens/100k-movies``:

* ``ratings``: one row per rating, user and movie features joined in.
* ``movies``: one row per catalogue movie (all retrieval candidates).

The codings here are the same for every source: ``movie_genres`` ids index
``ML100K_GENRE_NAMES`` (the u.genre order) and ``user_occupation_label``
indexes ``OCCUPATION_LABELS`` (the TFDS classes).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Columns = dict[str, np.ndarray]

_log = logging.getLogger(__name__)

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
USER_COLUMNS = (
    "raw_user_age", "bucketized_user_age", "user_gender",
    "user_occupation_text", "user_occupation_label", "user_zip_code",
)
MOVIE_COLUMNS = ("movie_title", "movie_genres")

# The release year at the end of a title: "Toy Story (1995)", and the range
# form of series in ml-latest, "Fawlty Towers (1975-1979)" or "(2004–)", whose
# first year is the release year. Group 1 is the year.
TITLE_YEAR_RE = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")


class DataError(ValueError):
  """Any problem with the input data; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """The interactions, with the users' columns joined in, and the item catalogue.

  ``ratings`` is the interactions table (one row per event) and ``movies`` the items table
  (one row per catalogue item, keyed by ``item_key``), whatever the source; the names
  come from the MovieLens sources this project started with. ``users`` (one row per user:
  ``user_key`` and the user columns) is present for sources with a users table; it lets
  :func:`twotower_jax.data.movielens.load_ratings_file` join further rating files.
  ``genre_names`` names the ids of an [N, L] genre column (MovieLens; empty elsewhere).
  """

  ratings: Columns
  movies: Columns
  genre_names: tuple[str, ...]
  source: str
  users: Columns | None = None
  # The columns that play each role (MovieLens names by default).
  user_key: str = "user_id"
  item_key: str = "movie_id"
  time_key: str = "timestamp"  # "" when the interactions have no time
  weight_key: str = "user_rating"  # "" when they have no rating or weight


def take_rows(columns: Mapping[str, np.ndarray], idx: np.ndarray) -> Columns:
  """Rows ``idx`` of every column (numpy arrays, or pyarrow arrays of strings)."""
  return {k: (v.take(pa.array(idx)) if isinstance(v, (pa.Array, pa.ChunkedArray)) else v[idx])
          for k, v in columns.items()}


def key_codes(keys) -> np.ndarray:
  """Integer codes of a key column: integer keys as they are, strings by first occurrence."""
  if isinstance(keys, (pa.Array, pa.ChunkedArray)):
    enc = pc.dictionary_encode(keys)
    if isinstance(enc, pa.ChunkedArray):
      enc = enc.combine_chunks()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
  keys = np.asarray(keys)
  if keys.dtype.kind in "iub":
    return keys
  return np.unique(keys, return_inverse=True)[1].reshape(-1)


def compact_strings(strings: np.ndarray) -> np.ndarray:
  """A str array at the width of its longest element (numpy keeps the table's width)."""
  strings = np.asarray(strings, dtype=str)
  width = max(int(np.char.str_len(strings).max(initial=0)), 1)
  return strings.astype(f"<U{width}")


def release_years(titles: Sequence[str] | np.ndarray) -> np.ndarray:
  """[M] int32 year of each title's trailing "(1995)" (or "(2006-2007)"), -1 without one."""
  matches = [TITLE_YEAR_RE.search(str(t)) for t in np.asarray(titles).tolist()]
  return np.array([int(m.group(1)) if m else -1 for m in matches], np.int32)


def strip_title_year(title: str) -> str:
  """``title`` without the trailing year that :func:`release_years` reads."""
  return TITLE_YEAR_RE.sub("", str(title))


def first_duplicate(ids_N: np.ndarray) -> tuple[int, int] | None:
  """(row, first_row): the earliest row repeating an earlier row's id, and that earlier row.

  None when every id is unique.
  """
  ids_N = np.asarray(ids_N)
  order = np.argsort(ids_N, kind="stable")
  sorted_N = ids_N[order]
  dup = np.flatnonzero(sorted_N[1:] == sorted_N[:-1])
  if not dup.size:
    return None
  row = int(order[dup + 1].min())
  return row, int(order[np.searchsorted(sorted_N, ids_N[row])])


def line_error(path, lineno: int, line: str, problem: str, expected: str, url: str) -> DataError:
  """DataError naming ``path``, the 1-based ``lineno``, the line, the problem and the fix."""
  shown = line if len(line) <= 200 else line[:200] + "..."
  return DataError(
      f"{path}:{lineno}: {problem}. Line {lineno}: {shown!r}. Expected {expected}. Fix: "
      f"correct or delete line {lineno} of {path}, or restore the original file from {url}.")


# ----------------------------------------------------------------------------
# Text encoding: the GroupLens files are latin-1, an edited copy may be UTF-8.

UTF8_BOM = b"\xef\xbb\xbf"


_C1_CONTROLS = re.compile("[\x80-\x9f]")


def decode_text(data: bytes) -> str:
  """``data`` as UTF-8 when it is valid UTF-8 (a leading BOM dropped), else as latin-1.

  The GroupLens ML-100K and ML-1M files are latin-1; a copy re-saved by an
  editor is often UTF-8, whose "é" read as latin-1 would silently become "Ã©".
  Latin-1 text with a byte >= 0x80 is almost never valid UTF-8: that needs
  every such byte paired, like "Ã" then a byte 0x80..0xBF. Where the pair's
  second byte is 0x80..0x9F the UTF-8 reading holds a C1 control character,
  which no text has, so that reading is refused too. ASCII reads the same
  either way.
  """
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    return data.decode("latin-1")
  if _C1_CONTROLS.search(text):
    return data.decode("latin-1")
  return text.removeprefix("\ufeff")


# ----------------------------------------------------------------------------
# Repeated ratings: the same user, movie and timestamp twice.

RATING_KEY = ("user_id", "movie_id", "timestamp")


def _pair_key(a_N: np.ndarray, b_N: np.ndarray) -> np.ndarray | None:
  """One int64 per (a, b) pair, equal iff both are; None if the ranges overflow int64."""
  a_min, b_min = int(a_N.min()), int(b_N.min())
  b_range = int(b_N.max()) - b_min + 1
  if (int(a_N.max()) - a_min + 1) * b_range >= 2**63:
    return None
  return (a_N - a_min) * b_range + (b_N - b_min)


def repeated_ratings(columns: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(rows, firsts): the rows repeating an earlier row's user, movie and timestamp.

  ``rows`` ascending; ``firsts[k]`` is the earliest row with the key of
  ``rows[k]`` (the one to keep). Vectorised: one sort of a (user, movie) int64
  key over all rows; only rows whose pair occurs twice are sorted by timestamp.
  """
  user_N, movie_N, time_N = (np.asarray(columns[k], np.int64) for k in RATING_KEY)
  none = np.zeros(0, np.int64)
  if user_N.size < 2:
    return none, none
  pair_N = _pair_key(user_N, movie_N)
  if pair_N is None:  # ids too far apart for one int64 key: sort every row by all three
    cand = np.arange(user_N.size)
  else:
    sorted_N = np.sort(pair_N)
    repeated = sorted_N[1:][sorted_N[1:] == sorted_N[:-1]]
    if not repeated.size:
      return none, none
    cand = np.flatnonzero(np.isin(pair_N, repeated))
  order = cand[np.lexsort((time_N[cand], movie_N[cand], user_N[cand]))]  # stable: row order in ties
  same = ((user_N[order[1:]] == user_N[order[:-1]]) & (movie_N[order[1:]] == movie_N[order[:-1]])
          & (time_N[order[1:]] == time_N[order[:-1]]))
  if not same.any():
    return none, none
  is_start = np.concatenate([[True], ~same])
  group_start = np.maximum.accumulate(np.where(is_start, np.arange(order.size), 0))
  pos = np.flatnonzero(~is_start)
  rows, firsts = order[pos], order[group_start[pos]]
  by_row = np.argsort(rows)
  return rows[by_row], firsts[by_row]


def _differing(columns: Mapping[str, np.ndarray], rows: np.ndarray, firsts: np.ndarray) -> str:
  if "user_rating" not in columns:
    return ""
  rating = np.asarray(columns["user_rating"])
  n = int(np.count_nonzero(rating[rows] != rating[firsts]))
  return f"; {n} of them with a different rating" if n else ""


def drop_repeated_ratings(columns: Columns, path, *, first_line: int = 1) -> Columns:
  """``columns`` without the rows that repeat an earlier row's user, movie and timestamp.

  Keeps the first occurrence and logs one warning naming ``path``, the count,
  an example and the fix. Row ``i`` is line ``first_line + i`` of ``path``.
  Returns ``columns`` itself when nothing repeats.
  """
  rows, firsts = repeated_ratings(columns)
  if not rows.size:
    return columns
  _log.warning(
      "%s: dropped %d duplicate ratings, lines with the same user, movie and timestamp as an "
      "earlier line (e.g. line %d repeats line %d%s); kept the first of each. Fix: delete the "
      "repeated lines from %s, or restore the original file.", path, rows.size,
      first_line + rows[0], first_line + firsts[0], _differing(columns, rows, firsts), path)
  keep_N = np.ones(np.shape(columns["user_id"])[0], bool)
  keep_N[rows] = False
  return take_rows(columns, keep_N)


def drop_ratings_repeating(test: Columns, train: Mapping[str, np.ndarray], test_path,
                           train_path) -> Columns:
  """``test`` without its rows repeating a ``train`` row's user, movie and timestamp.

  Such a test rating is a copy of a training rating and inflates the metrics
  that count seen items. Logs one warning naming both files, the count, an
  example rating and the fix. Returns ``test`` itself when none repeats.
  Repeats within one file are :func:`drop_repeated_ratings`'s job.
  """
  n_train = int(np.shape(train["user_id"])[0])
  both = {k: np.concatenate([np.asarray(train[k]), np.asarray(test[k])])
          for k in RATING_KEY + ("user_rating",) if k in train and k in test}
  rows, firsts = repeated_ratings(both)
  from_train = (rows >= n_train) & (firsts < n_train)
  rows, firsts = rows[from_train], firsts[from_train]
  if not rows.size:
    return test
  _log.warning(
      "%s: dropped %d test ratings with the same user, movie and timestamp as a rating of %s "
      "(e.g. user %d, movie %d at timestamp %d%s): a test rating copied from training "
      "inflates the metrics. Fix: delete those lines from %s or from %s.", test_path, rows.size,
      train_path, both["user_id"][rows[0]], both["movie_id"][rows[0]],
      both["timestamp"][rows[0]], _differing(both, rows, firsts), test_path, train_path)
  keep_N = np.ones(np.shape(test["user_id"])[0], bool)
  keep_N[rows - n_train] = False
  return take_rows(test, keep_N)
