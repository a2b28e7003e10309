"""MovieLens 1M (``.dat`` files) and 20M / 25M / latest (CSV files).

Every loader returns a :class:`~twotower_jax.data.dataset.Dataset` with the
TFDS column names, and shares the cross-source codings of
:mod:`twotower_jax.data.dataset`:

* ``movie_genres`` ids index ``ML100K_GENRE_NAMES`` (the u.genre order), so a
  genre has the same id in 100K, 1M, 20M and 25M. The CSV data sets add
  ``IMAX`` (id 19); their ``(no genres listed)`` is the 100K ``unknown`` (id 0)
  and their ``Children`` the 100K ``Children's``. Each movie's ids are
  ascending, padded with -1.
* ``user_occupation_label`` indexes ``OCCUPATION_LABELS`` (the TFDS classes);
  ``user_occupation_text`` keeps the ML-1M README name of the code.

Ratings files are parsed with ``np.loadtxt`` in ~32 MB chunks (no Python
object per row); only when a chunk fails does a line-by-line pass run to name
the first bad line. Ratings repeating an earlier line's user, movie and
timestamp are dropped with a warning
(:func:`~twotower_jax.data.dataset.drop_repeated_ratings`).

The ML-1M ``.dat`` files are read as UTF-8 when valid UTF-8 (an edited copy),
else as latin-1 (the GroupLens original); ``movies.csv`` must be UTF-8.
"""

from __future__ import annotations

import csv
import io
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from twotower_jax.arrays import find_rows
from twotower_jax.data.dataset import (
    ML100K_GENRE_NAMES,
    OCCUPATION_LABELS,
    UTF8_BOM,
    DataError,
    Dataset,
    decode_text,
    drop_repeated_ratings,
    first_duplicate,
    line_error,
    release_years,
)

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
URLS = {
    "ml-1m": f"{GROUPLENS}/ml-1m.zip",
    "ml-20m": f"{GROUPLENS}/ml-20m.zip",
    "ml-25m": f"{GROUPLENS}/ml-25m.zip",
    "ml-latest": f"{GROUPLENS}/ml-latest.zip",
    "ml-latest-small": f"{GROUPLENS}/ml-latest-small.zip",
}
_CSV_URLS = ", ".join(URLS[k] for k in ("ml-25m", "ml-20m", "ml-latest", "ml-latest-small"))

ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)  # users.dat Age codes (= TFDS age buckets)
# users.dat Occupation code -> (README name, TFDS label in OCCUPATION_LABELS).
ML1M_OCCUPATIONS = (
    ("other/not specified", "other/not specified"),
    ("academic/educator", "academic/educator"),
    ("artist", "artist"),
    ("clerical/admin", "clerical/admin"),
    ("college/grad student", "student"),
    ("customer service", "customer service"),
    ("doctor/health care", "doctor/health care"),
    ("executive/managerial", "executive/managerial"),
    ("farmer", "farmer"),
    ("homemaker", "homemaker"),
    ("K-12 student", "student"),
    ("lawyer", "lawyer"),
    ("programmer", "programmer"),
    ("retired", "retired"),
    ("sales/marketing", "sales/marketing"),
    ("scientist", "scientist"),
    ("self-employed", "self-employed"),
    ("technician/engineer", "technician/engineer"),
    ("tradesman/craftsman", "tradesman/craftsman"),
    ("unemployed", "unemployed"),
    ("writer", "writer"),
)
ML1M_GENRE_NAMES = ML100K_GENRE_NAMES
CSV_GENRE_NAMES = ML100K_GENRE_NAMES + ("IMAX",)
_CSV_GENRE_ALIASES = {"Children": "Children's", "(no genres listed)": "unknown"}

RATINGS_CSV_HEADER = "userId,movieId,rating,timestamp"
MOVIES_CSV_HEADER = ("movieId", "title", "genres")
_CHUNK_BYTES = 1 << 25
_RATINGS_DTYPE = np.dtype([("user_id", "<i8"), ("movie_id", "<i8"), ("user_rating", "<f4"),
                           ("timestamp", "<i8")])
_RATING_FIELDS = (  # (name, regex, expected); stricter than np.loadtxt on purpose
    ("user id", r"[ \t]*[0-9]{1,18}[ \t]*", "a non-negative integer"),
    ("movie id", r"[ \t]*[0-9]{1,18}[ \t]*", "a non-negative integer"),
    ("rating", r"[ \t]*[0-9]{1,6}(?:\.[0-9]{1,6})?[ \t]*", "a number such as 4 or 3.5"),
    ("timestamp", r"[ \t]*[0-9]{1,18}[ \t]*", "a non-negative integer (Unix seconds)"),
)
_ID_RE = re.compile(r"[0-9]{1,18}")


# ----------------------------------------------------------------------------
# Files and lines.


def _read(path: pathlib.Path, source: str) -> bytes:
  """The bytes of ``path``; DataError naming the path and the download when missing."""
  if not path.is_file():
    url = URLS.get(source) or _CSV_URLS
    raise DataError(
        f"{path} does not exist. Fix: download and unzip {url} (GroupLens) and point "
        f"--config.data.dir (or the data_dir argument) at the folder holding {path.name}.")
  return path.read_bytes()


def _text_lines(data: bytes, encoding: str | None, path) -> list[str]:
  """Decoded lines without line ends; trailing empty lines dropped.

  ``encoding`` None: UTF-8 when valid, else latin-1 (:func:`decode_text`).
  """
  try:
    text = decode_text(data) if encoding is None else data.decode(encoding)
  except UnicodeDecodeError as e:
    lineno = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}:{lineno}: byte {e.start} is not valid {encoding} ({e.reason}). "
                    f"Fix: re-save {path} as {encoding} or restore the original file.") from e
  lines = text.replace("\r\n", "\n").split("\n")
  while lines and not lines[-1].strip():
    lines.pop()
  return lines


def _duplicate_error(path, ids: np.ndarray, linenos: np.ndarray, what: str) -> DataError | None:
  dup = first_duplicate(ids)
  if dup is None:
    return None
  second, first = dup
  return DataError(
      f"{path}:{linenos[second]}: duplicate {what} {ids[second]} (first on line "
      f"{linenos[first]}). Fix: delete one of the two lines or restore the original file.")


def _join_error(path, first_line: int, rows_N: np.ndarray, ids_N: np.ndarray, what: str,
                table_path, url: str) -> None:
  bad = np.flatnonzero(rows_N < 0)
  if bad.size:
    i = int(bad[0])
    line = first_line + i
    raise DataError(
        f"{path}:{line}: {what} {ids_N[i]} is not in {table_path} ({bad.size} such lines). "
        f"Fix: use the {pathlib.Path(table_path).name} that came with this "
        f"{pathlib.Path(path).name} (restore both from {url}) or delete line {line}.")


# ----------------------------------------------------------------------------
# Ratings: vectorised fast pass, line-by-line slow pass only on failure.


def _describe_rating_line(line: str, sep: str) -> str | None:
  if line.strip() == "":
    return "the line is empty"
  parts = line.split(sep)
  if len(parts) != len(_RATING_FIELDS):
    return f"found {len(parts)} fields separated by {sep!r}, expected {len(_RATING_FIELDS)}"
  for k, ((name, pattern, expected), part) in enumerate(zip(_RATING_FIELDS, parts), 1):
    if not re.fullmatch(pattern, part):
      return f"field {k} ({name}) is {part!r}, expected {expected}"
  return None


def _first_bad_rating_line(path, chunk: bytes, first_line: int, sep: str, expected: str,
                           url: str, reason: str) -> DataError:
  for k, raw in enumerate(chunk.split(b"\n")):
    line = decode_text(raw).removesuffix("\r")
    problem = _describe_rating_line(line, sep)
    if problem is not None:
      return line_error(path, first_line + k, line, problem, expected, url)
  last = first_line + chunk.count(b"\n")
  return DataError(f"{path}: lines {first_line}..{last} could not be parsed ({reason}). Fix: "
                   f"check those lines against {expected}, or restore the file from {url}.")


def parse_ratings(path, data: bytes, *, sep: str, header: str | None, url: str,
                  chunk_bytes: int = _CHUNK_BYTES) -> tuple[dict[str, np.ndarray], int]:
  """Parses ``user<sep>movie<sep>rating<sep>timestamp`` lines -> (columns, first data line).

  ``header`` (if given) must be the first line. Ratings must lie in [0.5, 5].
  Blank lines, extra or missing fields, non-numbers: DataError with the line.
  """
  sep_b = sep.encode()
  expected = f"user id{sep}movie id{sep}rating{sep}timestamp, e.g. '1{sep}31{sep}2.5{sep}1260759144'"
  bom = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
  start, first_line = bom, 1
  if header is not None:
    nl = data.find(b"\n")
    got = data[bom:nl if nl >= 0 else len(data)].decode("latin-1").removesuffix("\r")
    if got != header:
      raise line_error(path, 1, got, "the header is not the MovieLens ratings header",
                       f"the header {header!r}", url)
    start, first_line = (nl + 1 if nl >= 0 else len(data)), 2
  end = len(data)
  while end > start and data[end - 1] in b"\r\n \t":
    end -= 1
  if end <= start:
    raise DataError(f"{path} has no ratings. Fix: restore the original file from {url}.")

  parts, lineno, pos = [], first_line, start
  while pos < end:
    cut = end if pos + chunk_bytes >= end else data.rfind(b"\n", pos, pos + chunk_bytes)
    if cut <= pos:  # one line longer than a chunk
      cut = data.find(b"\n", pos + chunk_bytes, end)
      cut = end if cut < 0 else cut
    chunk = data[pos:cut]
    num_lines = chunk.count(b"\n") + 1
    table, reason = None, "a line has a stray separator"
    if sep == "," or b"," not in chunk:
      try:
        table = np.loadtxt(io.BytesIO(chunk if sep == "," else chunk.replace(sep_b, b",")),
                           delimiter=",", dtype=_RATINGS_DTYPE, comments=None, ndmin=1)
      except ValueError as e:
        reason = str(e)
    if table is None or table.shape[0] != num_lines:
      if table is not None:
        reason = f"{table.shape[0]} rows parsed from {num_lines} lines"
      raise _first_bad_rating_line(path, chunk, lineno, sep, expected, url, reason)
    parts.append(table)
    lineno += num_lines
    pos = cut + 1

  cols = {name: np.concatenate([p[name] for p in parts]) for name in _RATINGS_DTYPE.names}
  del parts
  rating = cols["user_rating"]
  checks = (("user_id", cols["user_id"] < 0, "user id is negative"),
            ("movie_id", cols["movie_id"] < 0, "movie id is negative"),
            ("user_rating", ~((rating >= 0.5) & (rating <= 5.0)), "rating is outside 0.5..5"),
            ("timestamp", cols["timestamp"] < 0, "timestamp is negative"))
  for name, bad_N, problem in checks:
    bad = np.flatnonzero(bad_N)
    if bad.size:
      i = int(bad[0])
      line = _nth_line(data, start, i)
      raise line_error(path, first_line + i, line, f"{problem} ({cols[name][i]})", expected, url)
  return cols, first_line


def _nth_line(data: bytes, start: int, i: int) -> str:
  """The i-th (0-based) line after offset ``start``; only used to quote an error."""
  pos = start
  while i > 0:  # skip 1 MB blocks by counting, then lines one by one
    end = min(pos + (1 << 20), len(data))
    count = data.count(b"\n", pos, end)
    if count < i and end < len(data):
      i, pos = i - count, end
      continue
    for _ in range(i):
      pos = data.index(b"\n", pos) + 1
    break
  nl = data.find(b"\n", pos)
  return decode_text(data[pos:nl if nl >= 0 else len(data)]).removesuffix("\r")


# ----------------------------------------------------------------------------
# Movies.


def _genre_ids(names_per_movie: Sequence[Sequence[str]], genre_names: Sequence[str],
               aliases: dict[str, str], path, linenos: Sequence[int], url: str) -> np.ndarray:
  """Genre name lists -> [M, G] int32 ids into ``genre_names``, ascending, -1 padded."""
  index = {g: i for i, g in enumerate(genre_names)}
  index.update({a: index[g] for a, g in aliases.items()})
  width = max((len(n) for n in names_per_movie), default=1) or 1
  out = np.full((len(names_per_movie), width), -1, np.int32)
  for m, names in enumerate(names_per_movie):  # once per catalogue movie
    ids = []
    for name in names:
      if name not in index:
        known = ", ".join(sorted(index))
        raise DataError(
            f"{path}:{linenos[m]}: unknown genre {name!r}. Expected '|'-separated names "
            f"from: {known}. Fix: correct line {linenos[m]} of {path} or restore it from {url}.")
      ids.append(index[name])
    ids = sorted(set(ids))
    out[m, :len(ids)] = ids
  return out


def _movies_table(path, ids: list[int], titles: list[str], genres: list[list[str]],
                  linenos: list[int], genre_names, aliases, url: str) -> dict[str, np.ndarray]:
  ids_M = np.array(ids, np.int64)
  linenos_M = np.array(linenos, np.int64)
  err = _duplicate_error(path, ids_M, linenos_M, "movie id")
  if err is not None:
    raise err
  if not ids:
    raise DataError(f"{path} lists no movies. Fix: restore the original file from {url}.")
  return {
      "movie_id": ids_M,
      "movie_title": np.array(titles, dtype=str),
      "movie_genres": _genre_ids(genres, genre_names, aliases, path, linenos, url),
      "movie_release_year": release_years(titles),
  }


def _movie_row_problem(parts: list[str], fields: str, id_name: str,
                       genres_hint: str = "") -> str | None:
  """What is wrong with a split movies row (id, title, genres), or None."""
  if len(parts) != 3:
    return f"found {len(parts)} {fields}, expected 3"
  if not _ID_RE.fullmatch(parts[0]):
    return f"field 1 ({id_name}) is {parts[0]!r}, expected a non-negative integer"
  if not parts[1].strip():
    return "field 2 (title) is empty"
  if not parts[2]:
    return f"field 3 (genres) is empty{genres_hint}"
  return None


def read_movies_dat(path) -> dict[str, np.ndarray]:
  """ML-1M ``movies.dat`` (latin-1 or UTF-8, ``MovieID::Title::Genres``) -> movies table."""
  path = pathlib.Path(path)
  url = URLS["ml-1m"]
  expected = "MovieID::Title::Genres, e.g. \"1::Toy Story (1995)::Animation|Children's|Comedy\""
  ids, titles, genres, linenos = [], [], [], []
  for lineno, line in enumerate(_text_lines(_read(path, "ml-1m"), None, path), 1):
    parts = line.split("::")
    problem = _movie_row_problem(parts, "'::'-separated fields", "movie id")
    if problem:
      raise line_error(path, lineno, line, problem, expected, url)
    ids.append(int(parts[0]))
    titles.append(parts[1])
    genres.append(parts[2].split("|"))
    linenos.append(lineno)
  return _movies_table(path, ids, titles, genres, linenos, ML1M_GENRE_NAMES, {}, url)


def read_movies_csv(path) -> dict[str, np.ndarray]:
  """MovieLens 20M/25M/latest ``movies.csv`` (UTF-8, quoted titles) -> movies table."""
  path = pathlib.Path(path)
  expected = "movieId,title,genres, e.g. '1,Toy Story (1995),Adventure|Animation' (a title " \
             "with a comma must be quoted: '11,\"American President, The (1995)\",Comedy')"
  data = _read(path, "ml-csv")
  lines = _text_lines(data, "utf-8", path)
  reader = csv.reader(io.StringIO("\n".join(lines).lstrip("\ufeff")), strict=True)
  ids, titles, genres, linenos = [], [], [], []
  try:
    for row in reader:
      lineno = reader.line_num
      if lineno == 1:
        if tuple(row) != MOVIES_CSV_HEADER:
          raise line_error(path, 1, lines[0].lstrip("\ufeff"), "the header is not the MovieLens movies "
                           "header", f"the header {','.join(MOVIES_CSV_HEADER)!r}", _CSV_URLS)
        continue
      problem = _movie_row_problem(row, "fields", "movieId",
                                   " (a movie without genres has '(no genres listed)')")
      if problem:
        raise line_error(path, lineno, lines[lineno - 1], problem, expected, _CSV_URLS)
      ids.append(int(row[0]))
      titles.append(row[1])
      genres.append(row[2].split("|"))
      linenos.append(lineno)
  except csv.Error as e:
    lineno = max(reader.line_num, 1)
    raise line_error(path, lineno, lines[lineno - 1], f"bad CSV quoting ({e})", expected,
                     _CSV_URLS) from e
  return _movies_table(path, ids, titles, genres, linenos, CSV_GENRE_NAMES,
                       _CSV_GENRE_ALIASES, _CSV_URLS)


# ----------------------------------------------------------------------------
# Users (ML-1M).


def read_users_dat(path) -> dict[str, np.ndarray]:
  """ML-1M ``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``) -> users table.

  ML-1M gives only the age bucket code (1, 18, 25, 35, 45, 50, 56), so
  ``raw_user_age`` and ``bucketized_user_age`` both hold that code.
  """
  path = pathlib.Path(path)
  url = URLS["ml-1m"]
  expected = "UserID::Gender::Age::Occupation::Zip-code, e.g. '1::F::1::10::48067' " \
             f"(Gender M or F, Age one of {ML1M_AGES}, Occupation 0..20)"
  rows, linenos = [], []
  for lineno, line in enumerate(_text_lines(_read(path, "ml-1m"), None, path), 1):
    parts = line.split("::")
    problem = None
    if len(parts) != 5:
      problem = f"found {len(parts)} '::'-separated fields, expected 5"
    elif not _ID_RE.fullmatch(parts[0]):
      problem = f"field 1 (user id) is {parts[0]!r}, expected a non-negative integer"
    elif parts[1] not in ("M", "F"):
      problem = f"field 2 (gender) is {parts[1]!r}, expected M or F"
    elif parts[2] not in {str(a) for a in ML1M_AGES}:
      problem = f"field 3 (age code) is {parts[2]!r}, expected one of {ML1M_AGES}"
    elif not (parts[3].isdigit() and int(parts[3]) < len(ML1M_OCCUPATIONS)):
      problem = f"field 4 (occupation) is {parts[3]!r}, expected an integer 0..20"
    elif not parts[4].strip():
      problem = "field 5 (zip code) is empty"
    if problem:
      raise line_error(path, lineno, line, problem, expected, url)
    rows.append(parts)
    linenos.append(lineno)
  if not rows:
    raise DataError(f"{path} lists no users. Fix: restore the original file from {url}.")
  table = np.array(rows, dtype=str)
  ids = table[:, 0].astype(np.int64)
  err = _duplicate_error(path, ids, np.array(linenos), "user id")
  if err is not None:
    raise err
  age = table[:, 2].astype(np.float32)
  code = table[:, 3].astype(np.int64)
  text = np.array([t for t, _ in ML1M_OCCUPATIONS])
  label = np.array([OCCUPATION_LABELS.index(lab) for _, lab in ML1M_OCCUPATIONS], np.int64)
  return {
      "user_id": ids,
      "raw_user_age": age,
      "bucketized_user_age": age.copy(),
      "user_gender": table[:, 1] == "M",
      "user_occupation_text": text[code],
      "user_occupation_label": label[code],
      "user_zip_code": np.array(table[:, 4], dtype=str),
  }


# ----------------------------------------------------------------------------
# Loaders.


def _joined(path, first_line: int, raw: dict[str, np.ndarray], movie_row: np.ndarray,
            movies: dict[str, np.ndarray], titles: np.ndarray,
            users: dict[str, np.ndarray] | None = None,
            user_row: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Ratings joined with their movies (and users); repeated ratings dropped with a warning.

  Row ``i`` of ``raw`` is line ``first_line + i`` of ``path``.
  """
  out = {k: raw[k] for k in ("user_id", "movie_id", "user_rating", "timestamp")}
  if users is not None:
    out.update({k: v[user_row] for k, v in users.items() if k != "user_id"})
  out["movie_title"] = titles[movie_row]
  out["movie_genres"] = movies["movie_genres"][movie_row]
  return drop_repeated_ratings(out, path, first_line=first_line)


def load_movielens_1m(data_dir) -> Dataset:
  """MovieLens 1M: ``ratings.dat``, ``users.dat``, ``movies.dat`` of ``data_dir``.

  Columns and codings as for MovieLens 100K (see the module docstring);
  ``raw_user_age`` is the age bucket code, the only age ML-1M gives.
  """
  d = pathlib.Path(data_dir).expanduser()
  url = URLS["ml-1m"]
  movies = read_movies_dat(d / "movies.dat")
  users = read_users_dat(d / "users.dat")
  raw, first = parse_ratings(d / "ratings.dat", _read(d / "ratings.dat", "ml-1m"), sep="::",
                             header=None, url=url)
  movie_row = find_rows(movies["movie_id"], raw["movie_id"])
  _join_error(d / "ratings.dat", first, movie_row, raw["movie_id"], "movie id",
              d / "movies.dat", url)
  user_row = find_rows(users["user_id"], raw["user_id"])
  _join_error(d / "ratings.dat", first, user_row, raw["user_id"], "user id", d / "users.dat", url)
  ratings = _joined(d / "ratings.dat", first, raw, movie_row, movies, movies["movie_title"],
                    users, user_row)
  return Dataset(ratings=ratings, movies=movies, genre_names=ML1M_GENRE_NAMES,
                 source="ml-1m", users=users)


def load_movielens_csv(data_dir, source: str = "ml-csv") -> Dataset:
  """MovieLens 20M / 25M / latest: ``ratings.csv`` and ``movies.csv`` of ``data_dir``.

  No demographics: ratings have ``user_id``, ``movie_id``, ``user_rating``,
  ``timestamp``, ``movie_title``, ``movie_genres``. ``movies["movie_title"]``
  is a ``<U`` array; ``ratings["movie_title"]`` is an object array of the
  same Python strings (a ``<U`` column would take rows x longest title x 4
  bytes: ~15 GB for 25M ratings). ``source`` names ``Dataset.source``.
  """
  d = pathlib.Path(data_dir).expanduser()
  url = URLS.get(source) or _CSV_URLS
  movies = read_movies_csv(d / "movies.csv")
  raw, first = parse_ratings(d / "ratings.csv", _read(d / "ratings.csv", source), sep=",",
                             header=RATINGS_CSV_HEADER, url=url)
  movie_row = find_rows(movies["movie_id"], raw["movie_id"])
  _join_error(d / "ratings.csv", first, movie_row, raw["movie_id"], "movie id",
              d / "movies.csv", url)
  titles = np.empty(movies["movie_title"].size, object)
  titles[:] = movies["movie_title"].tolist()
  ratings = _joined(d / "ratings.csv", first, raw, movie_row, movies, titles)
  return Dataset(ratings=ratings, movies=movies, genre_names=CSV_GENRE_NAMES, source=source)
