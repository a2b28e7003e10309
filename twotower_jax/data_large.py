"""MovieLens 1M, 20M / 25M / latest, and a synthetic generator of clustered interactions.

Importing this module registers ``LOADERS["ml-1m"]``, ``["ml-20m"]``,
``["ml-25m"]``, ``["ml-latest"]`` and ``["synthetic"]`` in
:mod:`twotower_jax.data`. Every loader returns a :class:`~twotower_jax.data.Dataset`
with the TFDS column names, and shares the cross-source codings of
:mod:`twotower_jax.data`:

* ``movie_genres`` ids index ``ML100K_GENRE_NAMES`` (the u.genre order), so a
  genre has the same id in 100K, 1M, 20M and 25M. The CSV data sets add
  ``IMAX`` (id 19); their ``(no genres listed)`` is the 100K ``unknown`` (id 0)
  and their ``Children`` the 100K ``Children's``. Each movie's ids are
  ascending, padded with -1.
* ``user_occupation_label`` indexes ``OCCUPATION_LABELS`` (the TFDS classes);
  ``user_occupation_text`` keeps the ML-1M README name of the code.

Ratings files are parsed with ``np.loadtxt`` in ~32 MB chunks (no Python
object per row); only when a chunk fails does a line-by-line pass run to name
the first bad line.
"""

from __future__ import annotations

import csv
import io
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from twotower_jax.data import LOADERS, ML100K_GENRE_NAMES, OCCUPATION_LABELS, DataError, Dataset

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
_YEAR_RE = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")


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


def _line_error(path, lineno: int, line: str, problem: str, expected: str, url: str) -> DataError:
  shown = line if len(line) <= 200 else line[:200] + "..."
  return DataError(
      f"{path}:{lineno}: {problem}. Line {lineno}: {shown!r}. Expected {expected}. Fix: "
      f"correct or delete line {lineno} of {path}, or restore the original file from {url}.")


def _text_lines(data: bytes, encoding: str, path) -> list[str]:
  """Decoded lines without line ends; trailing empty lines dropped."""
  try:
    text = data.decode(encoding)
  except UnicodeDecodeError as e:
    lineno = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}:{lineno}: byte {e.start} is not valid {encoding} ({e.reason}). "
                    f"Fix: re-save {path} as {encoding} or restore the original file.") from e
  lines = text.replace("\r\n", "\n").split("\n")
  while lines and not lines[-1].strip():
    lines.pop()
  return lines


def _duplicate_error(path, ids: np.ndarray, linenos: np.ndarray, what: str) -> DataError | None:
  order = np.argsort(ids, kind="stable")
  dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
  if not dup.size:
    return None
  second = int(order[dup + 1].min())
  first = int(order[np.searchsorted(ids[order], ids[second])])
  return DataError(
      f"{path}:{linenos[second]}: duplicate {what} {ids[second]} (first on line "
      f"{linenos[first]}). Fix: delete one of the two lines or restore the original file.")


def _rows_of(ids_N: np.ndarray, table_ids_K: np.ndarray) -> np.ndarray:
  """Row of each id in ``table_ids_K`` (unique, >= 0), -1 when absent."""
  top = int(table_ids_K.max(initial=-1))
  if top < (1 << 27):  # dense table: one gather
    table = np.full(top + 2, -1, np.int64)
    table[table_ids_K] = np.arange(table_ids_K.size)
    return table[np.where((ids_N >= 0) & (ids_N <= top), ids_N, top + 1)]
  order = np.argsort(table_ids_K)
  pos = np.clip(np.searchsorted(table_ids_K[order], ids_N), 0, table_ids_K.size - 1)
  return np.where(table_ids_K[order][pos] == ids_N, order[pos], -1)


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
    line = raw.decode("latin-1").removesuffix("\r")
    problem = _describe_rating_line(line, sep)
    if problem is not None:
      return _line_error(path, first_line + k, line, problem, expected, url)
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
  start, first_line = 0, 1
  if header is not None:
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    nl = data.find(b"\n")
    got = data[bom:nl if nl >= 0 else len(data)].decode("latin-1").removesuffix("\r")
    if got != header:
      raise _line_error(path, 1, got, "the header is not the MovieLens ratings header",
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
      raise _line_error(path, first_line + i, line, f"{problem} ({cols[name][i]})", expected, url)
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
  return data[pos:nl if nl >= 0 else len(data)].decode("latin-1").removesuffix("\r")


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


def _release_years(titles: Sequence[str]) -> np.ndarray:
  """Year of a trailing "(1995)" (or "(2006-2007)") in each title, -1 without one."""
  years = [_YEAR_RE.search(t) for t in titles]
  return np.array([int(y.group(1)) if y else -1 for y in years], np.int32)


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
      "movie_release_year": _release_years(titles),
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
  """ML-1M ``movies.dat`` (latin-1, ``MovieID::Title::Genres``) -> movies table."""
  path = pathlib.Path(path)
  url = URLS["ml-1m"]
  expected = "MovieID::Title::Genres, e.g. \"1::Toy Story (1995)::Animation|Children's|Comedy\""
  ids, titles, genres, linenos = [], [], [], []
  for lineno, line in enumerate(_text_lines(_read(path, "ml-1m"), "latin-1", path), 1):
    parts = line.split("::")
    problem = _movie_row_problem(parts, "'::'-separated fields", "movie id")
    if problem:
      raise _line_error(path, lineno, line, problem, expected, url)
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
          raise _line_error(path, 1, lines[0].lstrip("\ufeff"), "the header is not the MovieLens movies "
                            "header", f"the header {','.join(MOVIES_CSV_HEADER)!r}", _CSV_URLS)
        continue
      problem = _movie_row_problem(row, "fields", "movieId",
                                   " (a movie without genres has '(no genres listed)')")
      if problem:
        raise _line_error(path, lineno, lines[lineno - 1], problem, expected, _CSV_URLS)
      ids.append(int(row[0]))
      titles.append(row[1])
      genres.append(row[2].split("|"))
      linenos.append(lineno)
  except csv.Error as e:
    lineno = max(reader.line_num, 1)
    raise _line_error(path, lineno, lines[lineno - 1], f"bad CSV quoting ({e})", expected,
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
  for lineno, line in enumerate(_text_lines(_read(path, "ml-1m"), "latin-1", path), 1):
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
      raise _line_error(path, lineno, line, problem, expected, url)
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


def _joined(raw: dict[str, np.ndarray], movie_row: np.ndarray, movies: dict[str, np.ndarray],
            titles: np.ndarray, users: dict[str, np.ndarray] | None = None,
            user_row: np.ndarray | None = None) -> dict[str, np.ndarray]:
  out = {k: raw[k] for k in ("user_id", "movie_id", "user_rating", "timestamp")}
  if users is not None:
    out.update({k: v[user_row] for k, v in users.items() if k != "user_id"})
  out["movie_title"] = titles[movie_row]
  out["movie_genres"] = movies["movie_genres"][movie_row]
  return out


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
  movie_row = _rows_of(raw["movie_id"], movies["movie_id"])
  _join_error(d / "ratings.dat", first, movie_row, raw["movie_id"], "movie id",
              d / "movies.dat", url)
  user_row = _rows_of(raw["user_id"], users["user_id"])
  _join_error(d / "ratings.dat", first, user_row, raw["user_id"], "user id", d / "users.dat", url)
  ratings = _joined(raw, movie_row, movies, movies["movie_title"], users, user_row)
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
  movie_row = _rows_of(raw["movie_id"], movies["movie_id"])
  _join_error(d / "ratings.csv", first, movie_row, raw["movie_id"], "movie id",
              d / "movies.csv", url)
  titles = np.empty(movies["movie_title"].size, object)
  titles[:] = movies["movie_title"].tolist()
  ratings = _joined(raw, movie_row, movies, titles)
  return Dataset(ratings=ratings, movies=movies, genre_names=CSV_GENRE_NAMES, source=source)


def _cfg(data_cfg, key: str, default):
  value = data_cfg.get(key, default) if hasattr(data_cfg, "get") else getattr(data_cfg, key, default)
  return default if value is None else value


def _cfg_dir(data_cfg, source: str, needed: str) -> pathlib.Path:
  """``data_cfg.dir``, or its ``<source>/`` subfolder when that holds ``needed``."""
  configured = str(_cfg(data_cfg, "dir", ""))
  if not configured:
    raise DataError(
        f"--config.data.source={source} needs --config.data.dir: the folder holding {needed}. "
        f"Fix: download and unzip {URLS[source]} and pass --config.data.dir=PATH.")
  path = pathlib.Path(configured).expanduser()
  if not (path / needed).is_file() and (path / source / needed).is_file():
    return path / source
  return path


def _csv_loader(source: str):
  return lambda data_cfg: load_movielens_csv(_cfg_dir(data_cfg, source, "ratings.csv"), source)


# ----------------------------------------------------------------------------
# Synthetic data.

SYNTHETIC_START = 946_684_800  # 2000-01-01
SYNTHETIC_END = 1_577_836_800  # 2020-01-01


def synthetic(num_users: int, num_items: int, num_interactions: int, *, seed: int = 0,
              zipf_a: float = 1.1, num_clusters: int = 20, affinity: float = 0.8) -> Dataset:
  """Interactions with Zipf item popularity and planted user/item clusters.

  Ids are 1-based. User ``u`` is in cluster ``u % num_clusters``; items are
  split evenly over the clusters at random and item ``i``'s cluster is its
  single genre (``movie_genres[:, 0]``, named ``"cluster c"``). Item
  popularity is ``rank ** -zipf_a`` over a random ranking. Each interaction
  draws a uniform user; with probability ``affinity`` its item comes from the
  user's cluster (popularity-weighted), else from the global popularity.
  Ratings: round(N(4, 1)) for in-cluster draws, round(N(3, 1)) otherwise,
  clipped to 1..5. Timestamps are uniform over 2000-2019, rows in time order.
  Titles are ``"item <id>"`` (``<U12`` for 1M items: 48 bytes a row, built
  with ``np.char.add`` once per item and gathered per row). Pure numpy: 10M
  interactions over 1M items and 200k users take ~10 s and ~1.1 GB on 2 cores.
  """
  for name, value in (("num_users", num_users), ("num_items", num_items),
                      ("num_interactions", num_interactions), ("num_clusters", num_clusters)):
    if int(value) != value or value < 1:
      raise DataError(f"synthetic: {name}={value!r} must be a positive integer. Fix: set "
                      f"--config.data.synthetic_{name.removeprefix('num_')} >= 1.")
  if num_clusters > num_items:
    raise DataError(f"synthetic: num_clusters={num_clusters} exceeds num_items={num_items}, "
                    "leaving clusters without items. Fix: lower "
                    "--config.data.synthetic_clusters or raise synthetic_items.")
  if not 0.0 <= affinity <= 1.0:
    raise DataError(f"synthetic: affinity={affinity} must lie in [0, 1]. Fix: set "
                    "--config.data.synthetic_affinity=0.8 (for example).")
  if not zipf_a >= 0.0:
    raise DataError(f"synthetic: zipf_a={zipf_a} must be >= 0 (0 = uniform). Fix: set "
                    "--config.data.synthetic_zipf_a=1.1 (for example).")
  rng = np.random.default_rng(seed)
  n, c = int(num_interactions), int(num_clusters)

  popularity_I = rng.permutation(np.arange(1, num_items + 1, dtype=np.float64) ** -zipf_a)
  cluster_I = (rng.permutation(num_items) % c).astype(np.int32)
  by_cluster_I = np.argsort(cluster_I, kind="stable")  # item rows grouped by cluster
  cum_I = np.cumsum(popularity_I[by_cluster_I])
  bounds_C1 = np.searchsorted(cluster_I[by_cluster_I], np.arange(c + 1))
  mass_lo_C = np.concatenate([[0.0], cum_I])[bounds_C1[:-1]]
  mass_hi_C = cum_I[bounds_C1[1:] - 1]

  user_N = rng.integers(1, num_users + 1, n, dtype=np.int64)
  ucluster_N = user_N % c
  in_cluster_N = rng.random(n) < affinity
  target_N = rng.random(n)
  lo_N = np.where(in_cluster_N, mass_lo_C[ucluster_N], 0.0)
  hi_N = np.where(in_cluster_N, mass_hi_C[ucluster_N], cum_I[-1])
  target_N = lo_N + target_N * (hi_N - lo_N)
  del lo_N, hi_N
  pos_N = np.searchsorted(cum_I, target_N, side="right")
  del target_N
  first_N = np.where(in_cluster_N, bounds_C1[ucluster_N], 0)
  last_N = np.where(in_cluster_N, bounds_C1[ucluster_N + 1] - 1, num_items - 1)
  pos_N = np.clip(pos_N, first_N, last_N)  # float round-off at cluster edges
  del first_N, last_N
  item_row_N = by_cluster_I[pos_N]
  del pos_N

  rating_N = rng.normal(np.where(in_cluster_N, 4.0, 3.0), 1.0)
  rating_N = np.clip(np.rint(rating_N), 1, 5).astype(np.float32)
  timestamp_N = np.sort(rng.integers(SYNTHETIC_START, SYNTHETIC_END, n, dtype=np.int64))

  item_ids_I = np.arange(1, num_items + 1, dtype=np.int64)
  digits = len(str(num_items))
  titles_I = np.char.add("item ", item_ids_I.astype(f"<U{digits}"))
  genres_I1 = cluster_I[:, None]
  movies = {"movie_id": item_ids_I, "movie_title": titles_I, "movie_genres": genres_I1,
            "movie_release_year": np.full(num_items, -1, np.int32)}
  ratings = {"user_id": user_N, "movie_id": item_row_N + 1, "user_rating": rating_N,
             "timestamp": timestamp_N, "movie_title": titles_I[item_row_N],
             "movie_genres": genres_I1[item_row_N]}
  return Dataset(ratings=ratings, movies=movies,
                 genre_names=tuple(f"cluster {k}" for k in range(c)), source="synthetic")


def _synthetic_loader(data_cfg) -> Dataset:
  return synthetic(
      int(_cfg(data_cfg, "synthetic_users", 10_000)),
      int(_cfg(data_cfg, "synthetic_items", 10_000)),
      int(_cfg(data_cfg, "synthetic_interactions", 1_000_000)),
      seed=int(_cfg(data_cfg, "synthetic_seed", 0)),
      zipf_a=float(_cfg(data_cfg, "synthetic_zipf_a", 1.1)),
      num_clusters=int(_cfg(data_cfg, "synthetic_clusters", 20)),
      affinity=float(_cfg(data_cfg, "synthetic_affinity", 0.8)))


LOADERS["ml-1m"] = lambda data_cfg: load_movielens_1m(_cfg_dir(data_cfg, "ml-1m", "ratings.dat"))
LOADERS["ml-20m"] = _csv_loader("ml-20m")
LOADERS["ml-25m"] = _csv_loader("ml-25m")
LOADERS["ml-latest"] = _csv_loader("ml-latest")
LOADERS["synthetic"] = _synthetic_loader
