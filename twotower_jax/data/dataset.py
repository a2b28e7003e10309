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
import re
from collections.abc import Mapping, Sequence

import numpy as np

Columns = dict[str, np.ndarray]

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
  """Ratings joined with user and movie features, plus the movie catalogue.

  ``users`` (one row per user: ``user_id`` and the user feature columns) is
  present for sources with demographics; it lets
  :func:`twotower_jax.data.movielens.load_ratings_file` join further rating files.
  """

  ratings: Columns
  movies: Columns
  genre_names: tuple[str, ...]
  source: str
  users: Columns | None = None


def take_rows(columns: Mapping[str, np.ndarray], idx: np.ndarray) -> Columns:
  """Rows ``idx`` of every column."""
  return {k: v[idx] for k, v in columns.items()}


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
