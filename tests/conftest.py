"""Shared fixtures: a small synthetic MovieLens 100K folder and the real one."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_REAL_DIR = REPO.parent / "shared" / "data" / "ml-100k"

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment",
    "executive", "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none",
    "other", "programmer", "retired", "salesman", "scientist", "student", "technician",
    "writer",
)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Ages hitting every TFDS age bucket edge (1, 18, 25, 35, 45, 50, 56).
EDGE_AGES = (7, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73)
NON_ASCII_TITLE = "Café Crème à Noël (1994)"  # exercises the latin-1 decoding
FIRST_TIMESTAMP = 874_724_710  # 1997-09-20, like the start of MovieLens 100K


def tiny_config(data_dir, variant: str | None = None, **overrides):
  """configs/tiny.py (``variant``: one of its variants) reading ``data_dir``, offline, with
  ``overrides`` ({"train.num_epochs": 1, ...}) applied as --config.KEY=VALUE would."""
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py", variant)
  cfg.data.dir = str(data_dir)
  cfg.data.download = False
  for key, value in overrides.items():
    config_lib.set_path(cfg, key, value)
  return cfg


def train_tiny_history_run(tmp_path_factory, seed: int) -> pathlib.Path:
  """A workdir of configs/tiny.py:history trained for one epoch on a synthetic ML-100K
  folder (80 users, 150 movies, 3,000 ratings, ``seed``): something to serve."""
  from twotower_jax import train  # pylint: disable=g-import-not-at-top
  data_dir = write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80,
                                    num_movies=150, num_ratings=3000, seed=seed)
  cfg = tiny_config(data_dir, "history", **{"train.num_epochs": 1, "eval.baselines": False})
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(cfg, str(workdir))
  return workdir


def load_benchmark(name: str = "bench"):
  """A benchmark driver from benchmarks/ (they live outside the package) as a module."""
  import importlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  bench_dir = str(REPO / "benchmarks")
  if bench_dir not in sys.path:
    sys.path.insert(0, bench_dir)
  return importlib.import_module(name)


def write_synthetic_ml100k(path, num_users: int = 60, num_movies: int = 40,
                           num_ratings: int = 1500, seed: int = 0) -> pathlib.Path:
  """Writes a deterministic synthetic ML-100K folder (u.data, u.item, u.user, u.genre, u.occupation).

  Users 1..num_users each rate at least 5 movies; each (user, movie) pair
  occurs at most once; the last movie is never rated (a catalogue-only
  candidate); movie 2's title is non-ASCII (``NON_ASCII_TITLE``, written
  latin-1), movie 3 has no release date, movie 1 has 5 genres and every movie
  at least one; timestamps spread over ~7 months. Returns ``path``.
  """
  rng = np.random.default_rng(seed)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  rated_movies = num_movies - 1
  per_user_min = 5
  if num_users * rated_movies < num_ratings or num_ratings < num_users * per_user_min:
    raise ValueError(f"cannot place {num_ratings} distinct ratings for {num_users} users "
                     f"x {rated_movies} rated movies with >= {per_user_min} per user")

  # u.genre (with the trailing empty line of the original) and u.occupation.
  (path / "u.genre").write_bytes(
      "".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)).encode("latin-1") + b"\n")
  (path / "u.occupation").write_bytes("".join(f"{o}\n" for o in OCCUPATIONS).encode("latin-1"))

  # u.user: id|age|gender|occupation|zip.
  ages = np.concatenate([EDGE_AGES, rng.integers(7, 74, size=max(num_users - len(EDGE_AGES), 0))])
  lines = []
  for u in range(1, num_users + 1):
    zip_code = f"{rng.integers(0, 100_000):05d}" if u % 7 else f"T{u % 10}H{u % 9}N"
    lines.append(f"{u}|{ages[u - 1]}|{'MF'[u % 2]}|{OCCUPATIONS[(u - 1) % len(OCCUPATIONS)]}"
                 f"|{zip_code}\n")
  (path / "u.user").write_bytes("".join(lines).encode("latin-1"))

  # u.item: id|title|release date|video release date|url|19 flags.
  lines = []
  for m in range(1, num_movies + 1):
    year = 1994 if m == 2 else 1930 + int(rng.integers(0, 68))
    title = NON_ASCII_TITLE if m == 2 else f"Synthetic Movie {m} ({year})"
    date = "" if m == 3 else f"{rng.integers(1, 29):02d}-{MONTHS[rng.integers(0, 12)]}-{year}"
    flags = np.zeros(len(GENRES), int)
    if m == 1:
      flags[[1, 2, 5, 15, 16]] = 1
    else:
      flags[rng.choice(len(GENRES), size=int(rng.integers(1, 4)), replace=False)] = 1
    url = f"http://example.invalid/title?movie{m}"
    lines.append(f"{m}|{title}|{date}||{url}|" + "|".join(map(str, flags)) + "\n")
  (path / "u.item").write_bytes("".join(lines).encode("latin-1"))

  # u.data: per_user_min ratings per user, then distinct random pairs.
  first = np.stack([rng.permutation(rated_movies)[:per_user_min] for _ in range(num_users)])
  pair = (np.arange(num_users)[:, None] * rated_movies + first).ravel()
  rest = np.setdiff1d(np.arange(num_users * rated_movies), pair)
  pair = np.concatenate([pair, rng.choice(rest, num_ratings - pair.size, replace=False)])
  pair = rng.permutation(pair)
  users, movies = pair // rated_movies + 1, pair % rated_movies + 1
  ratings = rng.integers(1, 6, size=num_ratings)
  timestamps = FIRST_TIMESTAMP + rng.integers(0, 215 * 86_400, size=num_ratings)
  (path / "u.data").write_bytes("".join(
      f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in zip(users, movies, ratings, timestamps)
  ).encode("latin-1"))
  return path


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory) -> pathlib.Path:
  """A synthetic ML-100K folder (60 users, 40 movies, 1,500 ratings); do not modify it."""
  return write_synthetic_ml100k(tmp_path_factory.mktemp("synthetic") / "ml-100k")


@pytest.fixture(scope="session")
def real_data_dir() -> pathlib.Path:
  """The real MovieLens 100K folder: $TWOTOWER_DATA_DIR or <repo>/../shared/data/ml-100k."""
  path = pathlib.Path(os.environ.get("TWOTOWER_DATA_DIR") or DEFAULT_REAL_DIR)
  missing = [n for n in ("u.data", "u.item", "u.user") if not (path / n).is_file()]
  if missing:
    pytest.fail(f"real MovieLens 100K files not found: {path} lacks {', '.join(missing)}. "
                "Fix: `export TWOTOWER_DATA_DIR=/path/to/ml-100k` (the unzipped "
                "https://files.grouplens.org/datasets/movielens/ml-100k.zip), or deselect "
                "these tests with `-m 'not integration'`.", pytrace=False)
  return path
