"""Data that used to pass silently but wrong: text encodings, repeated ratings, cold start.

* A MovieLens text file re-saved as UTF-8 is read as UTF-8 (not as latin-1,
  which garbles "é" into "Ã©"); the GroupLens originals stay latin-1.
* Ratings repeating an earlier one's user, movie and timestamp are dropped,
  the first kept, with one warning naming the file, the count and the fix.
* split='files' warns about test ratings of users or movies absent from training.
* The real MovieLens 100K files still give exactly the same Dataset.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import re
import shutil

import numpy as np
import pytest

from conftest import NON_ASCII_TITLE, write_synthetic_ml100k
from twotower_jax.data import dataset, movielens, movielens_large, sources

BOM = b"\xef\xbb\xbf"


def reencode(path: pathlib.Path, encoding: str, bom: bytes = b"") -> None:
  """Rewrites a latin-1 file of the synthetic folder in ``encoding``."""
  path.write_bytes(bom + path.read_bytes().decode("latin-1").encode(encoding))


def edit_line(path: pathlib.Path, lineno: int, field: int, value: str, sep: str = "|") -> None:
  """Sets field ``field`` (0-based) of line ``lineno`` (1-based) of a latin-1 file."""
  lines = path.read_bytes().decode("latin-1").split("\n")
  parts = lines[lineno - 1].split(sep)
  parts[field] = value
  lines[lineno - 1] = sep.join(parts)
  path.write_bytes("\n".join(lines).encode("latin-1"))


def warnings_of(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and r.name.startswith("twotower_jax.data")]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> pathlib.Path:
  """A small synthetic ML-100K folder, all latin-1 (do not modify; copy it)."""
  return write_synthetic_ml100k(tmp_path_factory.mktemp("quality") / "ml-100k", num_users=20,
                                num_movies=12, num_ratings=150, seed=3)


@pytest.fixture
def folder(tmp_path, small_dir) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(small_dir, tmp_path / "ml-100k"))


# ----------------------------------------------------------------------------
# Encodings: UTF-8 when valid UTF-8, else latin-1.


def test_decode_text():
  assert dataset.decode_text("Café".encode("utf-8")) == "Café"
  assert dataset.decode_text("Café".encode("latin-1")) == "Café"
  assert dataset.decode_text(BOM + "Noël".encode("utf-8")) == "Noël"
  assert dataset.decode_text(b"plain ascii") == "plain ascii"
  # Latin-1 that is not valid UTF-8 on its own ("é" then ASCII) stays latin-1.
  assert dataset.decode_text("Mis\xe9rables, Les (1995)".encode("latin-1")) == "Misérables, Les (1995)"
  # Latin-1 "Â" + "\x80" is valid UTF-8 (U+0080), but a C1 control is no text: latin-1.
  assert dataset.decode_text("Â\x80".encode("latin-1")) == "Â\x80"


# (file, line, field, non-ASCII value, where it lands in the Dataset)
NON_ASCII_FIELDS = {
    "u.item": (2, 1, NON_ASCII_TITLE, lambda ds: ds.movies["movie_title"][1]),
    "u.user": (3, 4, "Zürich-8001", lambda ds: ds.users["user_zip_code"][2]),
    "u.genre": (8, 0, "Documentaire-é", lambda ds: ds.genre_names[7]),
}


@pytest.mark.parametrize("name", sorted(NON_ASCII_FIELDS))
@pytest.mark.parametrize("encoding,bom", [("latin-1", b""), ("utf-8", b""), ("utf-8", BOM)],
                         ids=["latin-1", "utf-8", "utf-8-bom"])
def test_ml100k_text_files_read_in_either_encoding(folder, caplog, name, encoding, bom):
  lineno, field, value, where = NON_ASCII_FIELDS[name]
  if name != "u.item":  # u.item already holds NON_ASCII_TITLE on line 2
    edit_line(folder / name, lineno, field, value)
  reencode(folder / name, encoding, bom)
  ds = movielens.load_movielens_100k(folder)
  assert where(ds) == value
  assert warnings_of(caplog) == []


def test_utf8_u_item_gives_the_same_dataset_as_latin1(small_dir, folder):
  reencode(folder / "u.item", "utf-8")
  reencode(folder / "u.user", "utf-8")
  ref, got = movielens.load_movielens_100k(small_dir), movielens.load_movielens_100k(folder)
  for part in ("ratings", "movies", "users"):
    for k, v in getattr(ref, part).items():
      np.testing.assert_array_equal(getattr(got, part)[k], v, err_msg=f"{part}.{k}")
  assert "Ã" not in "".join(got.movies["movie_title"].tolist())


def test_u_data_with_a_utf8_bom_parses(folder, small_dir):
  reencode(folder / "u.data", "utf-8", BOM)
  got = movielens.load_movielens_100k(folder).ratings["user_id"]
  np.testing.assert_array_equal(got, movielens.load_movielens_100k(small_dir).ratings["user_id"])


def test_bad_line_of_a_utf8_file_is_quoted_in_utf8(folder):
  lines = (folder / "u.item").read_bytes().decode("latin-1").split("\n")
  lines[4] = lines[4].replace("|", "|Crème|", 1)  # one field too many, non-ASCII text
  (folder / "u.item").write_bytes("\n".join(lines).encode("utf-8"))
  with pytest.raises(dataset.DataError, match=r"u\.item:5: found 25 '\|'-separated") as e:
    movielens.load_movielens_100k(folder)
  assert "|Crème|" in str(e.value)


ML1M_MOVIES = ["1::Toy Story (1995)::Animation|Children's|Comedy",
               f"2::{NON_ASCII_TITLE}::Drama",
               "3::Misérables, Les (1995)::Drama|Musical"]
ML1M_USERS = ["1::F::1::10::48067", "2::M::56::16::Zürich", "3::M::25::0::55117"]
ML1M_RATINGS = ["1::1::5::978300760", "1::2::3::978302109", "2::3::4::978301968",
                "3::1::1::978300275"]


def write_ml1m(d: pathlib.Path, encoding: str = "latin-1", ratings=ML1M_RATINGS) -> pathlib.Path:
  d.mkdir(parents=True, exist_ok=True)
  for name, lines in (("movies.dat", ML1M_MOVIES), ("users.dat", ML1M_USERS),
                      ("ratings.dat", ratings)):
    (d / name).write_bytes("".join(f"{line}\n" for line in lines).encode(encoding))
  return d


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
def test_ml1m_dat_files_read_in_either_encoding(tmp_path, encoding):
  ds = movielens_large.load_movielens_1m(write_ml1m(tmp_path, encoding))
  assert ds.movies["movie_title"].tolist() == ["Toy Story (1995)", NON_ASCII_TITLE,
                                               "Misérables, Les (1995)"]
  assert ds.users["user_zip_code"].tolist() == ["48067", "Zürich", "55117"]
  assert ds.ratings["movie_title"][1] == NON_ASCII_TITLE


# ----------------------------------------------------------------------------
# Repeated ratings (same user, movie and timestamp).


def reference_repeats(user, movie, time):
  """Plain-Python reference of dataset.repeated_ratings."""
  first_of, rows, firsts = {}, [], []
  for i, key in enumerate(zip(user.tolist(), movie.tolist(), time.tolist())):
    if key in first_of:
      rows.append(i)
      firsts.append(first_of[key])
    else:
      first_of[key] = i
  return rows, firsts


@pytest.mark.parametrize("offset", [0, 2**62], ids=["pair-key", "ids-too-wide-for-one-key"])
def test_repeated_ratings_matches_reference(offset):
  rng = np.random.default_rng(0)
  for n in (0, 1, 2, 50, 2000):
    user = rng.integers(0, 6, n) + offset * rng.integers(0, 2, n)
    movie = rng.integers(0, 5, n) - offset * rng.integers(0, 2, n)
    time = rng.integers(0, 4, n)
    rows, firsts = dataset.repeated_ratings({"user_id": user, "movie_id": movie, "timestamp": time})
    want_rows, want_firsts = reference_repeats(user, movie, time)
    assert rows.tolist() == want_rows and firsts.tolist() == want_firsts


def test_repeated_ratings_hand_computed_and_pairs_with_other_timestamps_are_kept():
  cols = {"user_id": np.array([1, 1, 2, 1, 1, 1]), "movie_id": np.array([7, 7, 7, 7, 8, 7]),
          "timestamp": np.array([10, 11, 10, 10, 10, 11])}
  rows, firsts = dataset.repeated_ratings(cols)
  assert (rows.tolist(), firsts.tolist()) == ([3, 5], [0, 1])


def test_u_data_repeats_are_dropped_with_one_warning(folder, small_dir, caplog):
  lines = (folder / "u.data").read_text().splitlines(keepends=True)
  user, movie, rating, stamp = lines[4].split("\t")
  changed = f"{user}\t{movie}\t{'2' if rating == '1' else '1'}\t{stamp}"
  # Line 151 copies line 3, 152 copies line 10, 153 is line 5 with another rating.
  (folder / "u.data").write_text("".join(lines + [lines[2], lines[9], changed]))
  caplog.set_level(logging.WARNING)
  got = movielens.load_movielens_100k(folder).ratings
  want = movielens.load_movielens_100k(small_dir).ratings
  for k, v in want.items():  # exactly the original rows, in order: the first occurrences kept
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  (msg,) = warnings_of(caplog)
  assert msg.startswith(f"{folder / 'u.data'}: dropped 3 duplicate ratings"), msg
  assert "line 151 repeats line 3" in msg and "1 of them with a different rating" in msg
  assert f"Fix: delete the repeated lines from {folder / 'u.data'}" in msg
  assert "\n" not in msg


def test_repeats_straddling_a_random_split_cannot_reach_the_test_set(folder, caplog):
  lines = (folder / "u.data").read_text().splitlines(keepends=True)
  (folder / "u.data").write_text("".join(lines * 2))  # every rating twice
  ds = sources.load_dataset({"source": "grouplens", "dir": str(folder), "download": False})
  assert ds.ratings["user_id"].size == len(lines)
  train, test = sources.train_test({"split": "random", "test_fraction": 0.3}, ds, seed=0)

  def key(r):
    return set(zip(r["user_id"].tolist(), r["movie_id"].tolist(), r["timestamp"].tolist()))

  assert not key(train) & key(test)
  assert f"dropped {len(lines)} duplicate ratings" in warnings_of(caplog)[0]


def files_cfg(folder: pathlib.Path) -> dict:
  return {"source": "grouplens", "dir": str(folder), "download": False, "split": "files",
          "train_file": str(folder / "u1.base"), "test_file": str(folder / "u1.test")}


def test_files_split_drops_repeats_within_and_across_files(folder, caplog):
  ds = movielens.load_movielens_100k(folder)
  lines = (folder / "u.data").read_text().splitlines(keepends=True)
  base, test = lines[:120], lines[120:]
  (folder / "u1.base").write_text("".join(base + [base[0]]))  # line 121 repeats line 1
  # Test lines 31..33 copy training lines; line 34 repeats test line 2.
  (folder / "u1.test").write_text("".join(test + [base[5], base[6], base[7], test[1]]))
  caplog.set_level(logging.WARNING)
  train_cols, test_cols = sources.train_test(files_cfg(folder), ds, seed=0)
  assert train_cols["user_id"].size == 120 and test_cols["user_id"].size == 30
  np.testing.assert_array_equal(test_cols["timestamp"], ds.ratings["timestamp"][120:])
  msgs = warnings_of(caplog)
  assert msgs[0].startswith(f"{folder / 'u1.base'}: dropped 1 duplicate ratings"), msgs
  assert "line 121 repeats line 1" in msgs[0]
  assert msgs[1].startswith(f"{folder / 'u1.test'}: dropped 1 duplicate ratings"), msgs
  assert "line 34 repeats line 2" in msgs[1]
  u, m, _, t = (int(x) for x in base[5].split())
  assert msgs[2].startswith(
      f"{folder / 'u1.test'}: dropped 3 test ratings with the same user, movie and timestamp "
      f"as a rating of {folder / 'u1.base'} (e.g. user {u}, movie {m} at timestamp {t})"), msgs
  assert "Fix: delete those lines" in msgs[2]


def test_files_split_warns_about_test_users_and_movies_absent_from_training(folder, caplog):
  ds = movielens.load_movielens_100k(folder)
  r = ds.ratings
  rows = np.arange(r["user_id"].size)
  # Training lacks every rating of users 1 and 2 and of movies 4, 5 and 6.
  cold = np.isin(r["user_id"], [1, 2]) | np.isin(r["movie_id"], [4, 5, 6])
  warm_test = rows[~cold][:10]
  lines = (folder / "u.data").read_text().splitlines(keepends=True)
  (folder / "u1.base").write_text("".join(lines[i] for i in rows[~cold][10:]))
  (folder / "u1.test").write_text("".join(lines[i] for i in np.concatenate([rows[cold], warm_test])))
  caplog.set_level(logging.WARNING)
  sources.train_test(files_cfg(folder), ds, seed=0)
  (msg,) = warnings_of(caplog)
  new_movies = np.setdiff1d(r["movie_id"][cold], r["movie_id"][~cold][10:]).size
  assert new_movies >= 3
  assert msg.startswith(
      f"{folder / 'u1.test'}: {int(cold.sum())} test ratings by 2 users and {new_movies} movies "
      f"that never occur in {folder / 'u1.base'}; they are scored but the model has no trained "
      "embedding for them. Fix: "), msg
  caplog.clear()
  (folder / "u1.test").write_text("".join(lines[i] for i in warm_test))
  sources.train_test(files_cfg(folder), ds, seed=0)
  assert warnings_of(caplog) == []


def test_ml1m_repeats_are_dropped(tmp_path, caplog):
  d = write_ml1m(tmp_path, ratings=ML1M_RATINGS + [ML1M_RATINGS[1]])
  caplog.set_level(logging.WARNING)
  ds = sources.load_dataset({"source": "ml-1m", "dir": str(d)})
  assert ds.ratings["movie_id"].tolist() == [1, 2, 3, 1]
  (msg,) = warnings_of(caplog)
  assert msg.startswith(f"{d / 'ratings.dat'}: dropped 1 duplicate ratings") and \
      "line 5 repeats line 2" in msg, msg


def test_csv_repeats_are_dropped_and_lines_count_the_header(tmp_path, caplog):
  d = tmp_path / "ml-25m"
  d.mkdir()
  (d / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n"
                                "2,Niñas Mal (2007),Comedy\n", encoding="utf-8")
  (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,3.5,101\n"
                                 "2,1,1.0,100\n1,2,3.5,101\n1,1,5.0,100\n")
  caplog.set_level(logging.WARNING)
  ds = sources.load_dataset({"source": "ml-25m", "dir": str(tmp_path)})
  assert ds.ratings["user_rating"].tolist() == [4.0, 3.5, 1.0]
  (msg,) = warnings_of(caplog)
  assert re.match(re.escape(f"{d / 'ratings.csv'}: dropped 2 duplicate ratings"), msg), msg
  assert "line 5 repeats line 3" in msg and "1 of them with a different rating" in msg


def test_no_repeats_returns_the_same_columns():
  cols = {"user_id": np.array([1, 2]), "movie_id": np.array([1, 1]),
          "timestamp": np.array([5, 5])}
  assert dataset.drop_repeated_ratings(cols, "x") is cols


# ----------------------------------------------------------------------------
# The real MovieLens 100K files: no repeats, latin-1, exactly the Dataset of before.

# Digest of the Dataset the loader gave before encoding detection and repeat
# dropping were added (see dataset_digest).
REAL_ML100K_DIGEST = "d668a2ffaf36b97b1861fa5b98dfe799dde6a91698886ffde7f66fd7fb1955db"


def dataset_digest(ds: dataset.Dataset) -> str:
  """sha256 over every column's name, dtype, shape and values."""
  h = hashlib.sha256()
  for part in ("ratings", "movies", "users"):
    cols = getattr(ds, part)
    for k in sorted(cols):
      v = np.asarray(cols[k])
      h.update(f"{part}.{k}:{v.dtype.str}:{v.shape}".encode())
      if v.dtype.kind in "US":
        h.update("\n".join(v.ravel().tolist()).encode("utf-8"))
      else:
        h.update(np.ascontiguousarray(v.astype(np.float64)).tobytes())
  return h.hexdigest()


@pytest.mark.integration
def test_real_movielens_100k_is_unchanged(real_data_dir, caplog):
  caplog.set_level(logging.WARNING)
  ds = sources.load_dataset({"source": "grouplens", "dir": str(real_data_dir), "download": False})
  assert warnings_of(caplog) == []
  assert ds.ratings["user_id"].size == 100_000
  titles = ds.movies["movie_title"]
  assert titles[542] == "Misérables, Les (1995)"  # movie 543, latin-1 byte 0xE9
  assert titles[1632] == "Á köldum klaka (Cold Fever) (1994)"
  raw = (real_data_dir / "u.item").read_bytes().decode("latin-1")
  assert titles.tolist() == [line.split("|")[1] for line in raw.splitlines() if line]
  assert dataset_digest(ds) == REAL_ML100K_DIGEST
