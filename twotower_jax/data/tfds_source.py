"""The TFDS source: ``movielens/100k-ratings`` and ``-movies`` in the GroupLens columns.

Needs the ``tfds`` extra (tensorflow-datasets and tensorflow), imported only
when :func:`load_tfds` runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np

from twotower_jax.arrays import find_rows
from twotower_jax.data.dataset import (
    ML100K_GENRE_NAMES,
    OCCUPATION_LABELS,
    USER_COLUMNS,
    Columns,
    DataError,
    Dataset,
    compact_strings,
    release_years,
    take_rows,
)

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


def _tfds_text(values: np.ndarray) -> np.ndarray:
  return compact_strings(np.char.decode(np.asarray(values, dtype=bytes), "utf-8"))


def _tfds_ratings(r: Columns, r_info) -> Columns:
  """The ratings columns of TFDS ``100k-ratings`` (``r``, its ``info``) in our codings."""
  occupation_names = r_info.features["user_occupation_label"].names
  unknown = [n for n in occupation_names if n not in OCCUPATION_LABELS]
  if unknown:
    raise _tfds_error(f"occupation labels {unknown} are not in {OCCUPATION_LABELS}")
  occ_map = np.array([OCCUPATION_LABELS.index(n) for n in occupation_names], np.int64)
  return {
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


def _tfds_movies(m: Columns, m_info) -> Columns:
  """The catalogue of TFDS ``100k-movies`` (``m``, its ``info``), sorted by movie id."""
  movie_ids = _tfds_int(m["movie_id"], "movie_id")
  order = np.argsort(movie_ids, kind="stable")
  if np.any(movie_ids[order][1:] == movie_ids[order][:-1]):
    raise _tfds_error("100k-movies lists a movie id twice")
  titles = _tfds_text(m["movie_title"])[order]
  return {
      "movie_id": movie_ids[order],
      "movie_title": titles,
      "movie_genres": _tfds_genres(m["movie_genres"],
                                   m_info.features["movie_genres"].feature.names)[order],
      "movie_release_year": release_years(titles),
  }


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
  ratings = _tfds_ratings(r, r_info)
  movies = _tfds_movies(m, m_info)
  missing = find_rows(movies["movie_id"], ratings["movie_id"]) < 0
  if missing.any():
    raise _tfds_error(f"100k-ratings rates movie {ratings['movie_id'][missing][0]}, "
                      "which 100k-movies lacks")
  _, first = np.unique(ratings["user_id"], return_index=True)
  users = take_rows({k: ratings[k] for k in ("user_id",) + USER_COLUMNS}, first)
  return Dataset(ratings=ratings, movies=movies, genre_names=ML100K_GENRE_NAMES,
                 source="tfds", users=users)
