"""Tests of the MovieLens 100K data layer (twotower_jax.data)."""

from __future__ import annotations

import hashlib
import io
import pathlib
import re
import shutil
import tempfile
import urllib.error
import zipfile

import hypothesis
import hypothesis.strategies as st
import ml_collections
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax.data import dataset, download, movielens, sources, splits

# ----------------------------------------------------------------------------
# A tiny hand-written folder: 3 genres, 3 users, 3 movies, 3 ratings.

TINY = {
    "u.genre": "unknown|0\nAction|1\nDrama|2\n\n",
    "u.user": "1|24|M|technician|85711\n2|17|F|student|T8H1N\n3|56|M|none|00000\n",
    "u.item": ("1|Alpha (1995)|01-Jan-1995||http://x/1|0|1|1\n"
               "2|Bété (1996)|4-Feb-1996||http://x/2|0|0|1\n"
               "3|unknown||||1|0|0\n"),
    "u.data": "2\t1\t5\t100\n1\t3\t1\t50\n3\t2\t3\t75\n",
}


def write_tiny(path: pathlib.Path, **replace: str) -> pathlib.Path:
  path.mkdir(parents=True, exist_ok=True)
  for name, text in {**TINY, **replace}.items():
    (path / name).write_bytes(text.encode("latin-1"))
  return path


def test_tiny_folder_parses_to_hand_computed_columns(tmp_path):
  ds = movielens.load_movielens_100k(write_tiny(tmp_path))
  r = ds.ratings
  assert ds.source == "grouplens-100k"
  assert ds.genre_names == ("unknown", "Action", "Drama")
  np.testing.assert_array_equal(r["user_id"], [2, 1, 3])
  np.testing.assert_array_equal(r["movie_id"], [1, 3, 2])
  np.testing.assert_array_equal(r["user_rating"], [5.0, 1.0, 3.0])
  np.testing.assert_array_equal(r["timestamp"], [100, 50, 75])
  np.testing.assert_array_equal(r["raw_user_age"], [17.0, 24.0, 56.0])
  np.testing.assert_array_equal(r["bucketized_user_age"], [1.0, 18.0, 56.0])
  np.testing.assert_array_equal(r["user_gender"], [False, True, True])
  np.testing.assert_array_equal(r["user_occupation_text"], ["student", "technician", "none"])
  # student -> 'student' (17), technician -> 'technician/engineer' (18),
  # none -> 'other/not specified' (11) in the TFDS label list.
  np.testing.assert_array_equal(r["user_occupation_label"], [17, 18, 11])
  np.testing.assert_array_equal(r["user_zip_code"], ["T8H1N", "85711", "00000"])
  np.testing.assert_array_equal(r["movie_title"], ["Alpha (1995)", "unknown", "Bété (1996)"])
  np.testing.assert_array_equal(r["movie_genres"], [[1, 2], [0, -1], [2, -1]])
  m = ds.movies
  np.testing.assert_array_equal(m["movie_id"], [1, 2, 3])
  np.testing.assert_array_equal(m["movie_title"], ["Alpha (1995)", "Bété (1996)", "unknown"])
  np.testing.assert_array_equal(m["movie_genres"], [[1, 2], [2, -1], [0, -1]])
  np.testing.assert_array_equal(m["movie_release_year"], [1995, 1996, -1])


def test_tiny_folder_dtypes_follow_the_contract(tmp_path):
  ds = movielens.load_movielens_100k(write_tiny(tmp_path))
  expected = {
      "user_id": np.int64, "movie_id": np.int64, "user_rating": np.float32,
      "timestamp": np.int64, "raw_user_age": np.float32, "bucketized_user_age": np.float32,
      "user_gender": np.bool_, "user_occupation_label": np.int64, "movie_genres": np.int32,
  }
  assert set(ds.ratings) == set(expected) | {"user_occupation_text", "user_zip_code",
                                             "movie_title"}
  for name, dtype in expected.items():
    assert ds.ratings[name].dtype == dtype, name
  for name in ("user_occupation_text", "user_zip_code", "movie_title"):
    assert ds.ratings[name].dtype.kind == "U", name
  assert ds.movies["movie_release_year"].dtype == np.int32
  assert ds.movies["movie_genres"].dtype == np.int32


def test_crlf_and_missing_final_newline_are_accepted(tmp_path):
  crlf = {k: v.replace("\n", "\r\n") for k, v in TINY.items()}
  crlf["u.data"] = crlf["u.data"].rstrip("\r\n")
  ds = movielens.load_movielens_100k(write_tiny(tmp_path, **crlf))
  np.testing.assert_array_equal(ds.ratings["timestamp"], [100, 50, 75])
  np.testing.assert_array_equal(ds.movies["movie_title"][1], "Bété (1996)")


def test_u_genre_is_optional(tmp_path):
  write_tiny(tmp_path)
  (tmp_path / "u.genre").unlink()
  item = "".join(f"{i}|M{i}|||u|" + "|".join(["1"] + ["0"] * 18) + "\n" for i in (1, 2, 3))
  (tmp_path / "u.item").write_text(item)
  ds = movielens.load_movielens_100k(tmp_path)
  assert ds.genre_names == dataset.ML100K_GENRE_NAMES
  np.testing.assert_array_equal(ds.movies["movie_genres"], [[0], [0], [0]])


def test_genre_ids_from_flags():
  flags = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(movielens.genre_ids_from_flags(flags),
                                [[1, 3, -1], [-1, -1, -1], [0, 1, 2]])


# ----------------------------------------------------------------------------
# Malformed input: every problem names file, line and fix.

BAD_LINES = [
    # (file, 1-based line, replacement text, message fragment)
    ("u.data", 2, "1\t3\t1", "found 3 tab-separated fields, expected 4"),
    ("u.data", 2, "1\t3\t1\t50\t7", "found 5 tab-separated fields, expected 4"),
    ("u.data", 1, "x2\t1\t5\t100", "field 1 (user id) is 'x2'"),
    ("u.data", 3, "3\t2.0\t3\t75", "field 2 (movie id) is '2.0'"),
    ("u.data", 2, "1\t3\t6\t50", "field 3 (rating) is 6, expected an integer from 1 to 5"),
    ("u.data", 3, "3\t2\t0\t75", "field 3 (rating) is 0"),
    ("u.data", 2, "1\t3\t3.5\t50", "field 3 (rating) is '3.5'"),
    ("u.data", 2, "1\t3\t1\t-50", "field 4 (timestamp) is '-50'"),
    ("u.data", 2, "1 3 1 50", "found 1 tab-separated fields"),
    ("u.data", 2, "", "the line is empty"),
    ("u.data", 3, "9\t2\t3\t75", "user id 9 is not in"),
    ("u.data", 1, "2\t77\t5\t100", "movie id 77 is not in"),
    ("u.data", 2, "1\t3\t1\t1234567890123456789", "field 4 (timestamp)"),
    ("u.item", 2, "2|Two|4-Feb-1996||u|0|0", "found 7 '|'-separated fields, expected 8"),
    ("u.item", 3, "x|unknown||||1|0|0", "field 1 (movie id) is 'x'"),
    ("u.item", 1, "1|Alpha|01-Jan-1995||u|0|2|1", "field 7 (genre flag 1 (Action)) is '2'"),
    ("u.item", 2, "2|Two|1996||u|0|0|1", "field 3 (release date) is '1996'"),
    ("u.item", 2, "2|Two|04-Foo-1996||u|0|0|1", "field 3 (release date) is '04-Foo-1996'"),
    ("u.item", 3, "1|Dup||||1|0|0", "duplicate movie id 1 (first defined on line 1)"),
    ("u.user", 2, "2|17|X|student|T8H1N", "field 3 (gender) is 'X', expected M or F"),
    ("u.user", 1, "1|abc|M|technician|85711", "field 2 (age) is 'abc'"),
    ("u.user", 3, "3|0|M|none|00000", "field 2 (age) is 0"),
    ("u.user", 3, "3|56|M|astronaut|00000", "field 4 (occupation) 'astronaut'"),
    ("u.user", 3, "2|56|M|none|00000", "duplicate user id 2 (first defined on line 2)"),
    ("u.user", 1, "1|24|M|technician", "found 4 '|'-separated fields, expected 5"),
    ("u.user", 2, "2|17|F|student|", "field 5 (zip code) is ''"),
    ("u.genre", 2, "Action|7", "genre id is 7, expected 1"),
    ("u.genre", 3, "Drama", "found 1 '|'-separated fields, expected 2"),
    ("u.genre", 3, "Action|2", "duplicate genre name Action"),
]


@pytest.mark.parametrize("name,lineno,text,fragment", BAD_LINES)
def test_malformed_line_names_file_line_and_fix(tmp_path, name, lineno, text, fragment):
  lines = TINY[name].rstrip("\n").split("\n")
  lines[lineno - 1] = text
  write_tiny(tmp_path, **{name: "\n".join(lines) + "\n"})
  with pytest.raises(dataset.DataError) as e:
    movielens.load_movielens_100k(tmp_path)
  msg = str(e.value)
  assert f"{tmp_path / name}:{lineno}: " in msg
  assert fragment in msg
  assert "Fix:" in msg


def test_non_latin1_bytes_in_u_data_are_reported_not_crashing(tmp_path):
  write_tiny(tmp_path)
  (tmp_path / "u.data").write_bytes(b"2\t1\t5\t100\n1\t\xff3\t1\t50\n")
  with pytest.raises(dataset.DataError, match=r"u\.data:2: field 2 \(movie id\) is 'ÿ3'"):
    movielens.load_movielens_100k(tmp_path)


INT_FIELDS = {"u.data": (0, 1, 2, 3), "u.user": (0, 1), "u.item": (0,), "u.genre": (1,)}
NEAR_MISS_INTS = ("+2", "-2", " 2", "2 ", "2.0", "1_2", "\u00b2", "0x2", "2e0", "", "1" * 19)


def test_every_integer_field_rejects_near_miss_integers(tmp_path):
  """Texts Python's int() or float() would accept are still malformed integers."""
  for name, columns in INT_FIELDS.items():
    sep = "\t" if name == "u.data" else "|"
    for k in columns:
      for value in NEAR_MISS_INTS:
        lines = TINY[name].rstrip("\n").split("\n")
        fields = lines[1].split(sep)
        fields[k] = value
        lines[1] = sep.join(fields)
        folder = write_tiny(tmp_path / f"{name}-{k}-{NEAR_MISS_INTS.index(value)}",
                            **{name: "\n".join(lines) + "\n"})
        with pytest.raises(dataset.DataError, match=re.escape(f"{folder / name}:2: field {k + 1} ")):
          movielens.load_movielens_100k(folder)


@pytest.mark.parametrize("name", ["u.data", "u.item", "u.user"])
def test_missing_file_is_named(tmp_path, name):
  write_tiny(tmp_path)
  (tmp_path / name).unlink()
  with pytest.raises(dataset.DataError, match=re.escape(str(tmp_path / name)) + " does not exist"):
    movielens.load_movielens_100k(tmp_path)


def test_empty_file_is_named(tmp_path):
  write_tiny(tmp_path, **{"u.data": "\n\n"})
  with pytest.raises(dataset.DataError, match=r"u\.data is empty"):
    movielens.load_movielens_100k(tmp_path)


# ----------------------------------------------------------------------------
# The synthetic fixture folder.


@pytest.fixture(scope="module")
def synthetic(ml100k_dir):
  return movielens.load_movielens_100k(ml100k_dir)


def test_synthetic_fixture_loads(synthetic):
  r = synthetic.ratings
  assert r["user_id"].shape == (1500,)
  assert synthetic.movies["movie_id"].shape == (40,)
  assert synthetic.movies["movie_title"][1] == "Café Crème à Noël (1994)"
  assert synthetic.movies["movie_release_year"][2] == -1
  np.testing.assert_array_equal(synthetic.movies["movie_genres"][0], [1, 2, 5, 15, 16])
  assert synthetic.movies["movie_genres"].shape == (40, 5)
  pairs = r["user_id"] * 1000 + r["movie_id"]
  assert np.unique(pairs).size == pairs.size
  assert np.bincount(r["user_id"])[1:].min() >= 5
  assert 40 not in r["movie_id"]  # catalogue-only movie
  # Joined title of each rating equals the catalogue's title of its movie.
  np.testing.assert_array_equal(r["movie_title"], synthetic.movies["movie_title"][r["movie_id"] - 1])


def test_load_ratings_file_joins_and_rejects_unknown_ids(tmp_path, synthetic):
  (tmp_path / "u1.test").write_text("7\t4\t2\t999\n1\t40\t5\t1000\n")
  got = movielens.load_ratings_file(tmp_path / "u1.test", synthetic)
  np.testing.assert_array_equal(got["user_id"], [7, 1])
  np.testing.assert_array_equal(got["movie_id"], [4, 40])
  np.testing.assert_array_equal(got["user_rating"], [2.0, 5.0])
  np.testing.assert_array_equal(got["movie_title"], synthetic.movies["movie_title"][[3, 39]])
  np.testing.assert_array_equal(got["raw_user_age"], synthetic.users["raw_user_age"][[6, 0]])
  assert set(got) == set(synthetic.ratings)
  (tmp_path / "u2.test").write_text("7\t4\t2\t999\n61\t4\t5\t1000\n")
  with pytest.raises(dataset.DataError, match=r"u2\.test:2: user id 61 is not in"):
    movielens.load_ratings_file(tmp_path / "u2.test", synthetic)
  (tmp_path / "u3.test").write_text("7\t41\t2\t999\n")
  with pytest.raises(dataset.DataError, match=r"u3\.test:1: movie id 41 is not in"):
    movielens.load_ratings_file(tmp_path / "u3.test", synthetic)


# ----------------------------------------------------------------------------
# Splits.


@pytest.mark.parametrize("kind", splits.SPLIT_KINDS)
def test_split_is_disjoint_deterministic_and_seeded(synthetic, kind):
  kw = {"train_size": 1000, "test_size": 300, "test_fraction": 0.2}
  train, test = splits.split_indices(synthetic.ratings, kind, seed=3, **kw)
  assert np.intersect1d(train, test).size == 0
  assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
  again = splits.split_indices(synthetic.ratings, kind, seed=3, **kw)
  np.testing.assert_array_equal(train, again[0])
  np.testing.assert_array_equal(test, again[1])
  if kind == "seed":
    assert (train.size, test.size) == (1000, 300)
  else:
    assert train.size + test.size == 1500
  if kind in ("seed", "random"):
    other = splits.split_indices(synthetic.ratings, kind, seed=4, **kw)
    assert not np.array_equal(test, other[1])
  if kind == "random" or kind == "temporal":
    assert test.size == 300


def test_seed_split_is_a_seeded_permutation_prefix():
  ratings = {"user_id": np.arange(10)}
  perm = np.random.default_rng(5).permutation(10)
  train, test = splits.split_indices(ratings, "seed", seed=5, train_size=6, test_size=3)
  np.testing.assert_array_equal(train, np.sort(perm[:6]))
  np.testing.assert_array_equal(test, np.sort(perm[6:9]))


def test_temporal_split_takes_latest_and_breaks_ties_by_position():
  ratings = {"user_id": np.zeros(6, np.int64), "timestamp": np.array([5, 9, 9, 1, 9, 3])}
  train, test = splits.split_indices(ratings, "temporal", seed=0, test_fraction=0.5)
  # Sorted stably: 3(1) 5(3) 0(5) 1(9) 2(9) 4(9) -> latest three are 1, 2, 4.
  np.testing.assert_array_equal(test, [1, 2, 4])
  np.testing.assert_array_equal(train, [0, 3, 5])
  train, test = splits.split_indices(ratings, "temporal", seed=0, test_fraction=1 / 3)
  np.testing.assert_array_equal(test, [2, 4])  # of the ties at 9, the later positions


def test_temporal_split_on_synthetic_orders_by_time(synthetic):
  train, test = splits.split_indices(synthetic.ratings, "temporal", seed=0, test_fraction=0.25)
  ts = synthetic.ratings["timestamp"]
  assert ts[train].max() <= ts[test].min()


def test_leave_last_out_hand_computed():
  ratings = {
      "user_id": np.array([1, 2, 1, 1, 3, 2, 1]),
      "timestamp": np.array([10, 5, 30, 30, 7, 1, 20]),
  }
  train, test = splits.split_indices(ratings, "leave_last_out", seed=0)
  # User 1: latest ts 30 at rows 2 and 3 -> the later row 3. User 2: row 1 (ts 5).
  # User 3 has one rating and stays in train.
  np.testing.assert_array_equal(test, [1, 3])
  np.testing.assert_array_equal(train, [0, 2, 4, 5, 6])


def test_leave_last_out_on_synthetic(synthetic):
  r = synthetic.ratings
  train, test = splits.split_indices(r, "leave_last_out", seed=0)
  assert test.size == 60 and np.unique(r["user_id"][test]).size == 60
  for i in test[:10]:
    same_user = train[r["user_id"][train] == r["user_id"][i]]
    assert r["timestamp"][same_user].max() <= r["timestamp"][i]


def test_split_errors():
  ratings = {"user_id": np.arange(10), "timestamp": np.arange(10)}
  with pytest.raises(dataset.DataError, match="seed, random, temporal, user_temporal, leave_last_out"):
    splits.split_indices(ratings, "by_genre", seed=0)
  with pytest.raises(dataset.DataError, match="train_size=8, test_size=3 .* the data has 10"):
    splits.split_indices(ratings, "seed", seed=0, train_size=8, test_size=3)
  with pytest.raises(dataset.DataError, match="test_fraction=1.5"):
    splits.split_indices(ratings, "random", seed=0, test_fraction=1.5)
  with pytest.raises(dataset.DataError, match="leaves 0 test"):
    splits.split_indices(ratings, "temporal", seed=0, test_fraction=0.01)
  with pytest.raises(dataset.DataError, match=r"split 'temporal' needs a timestamp column "
                                              r"\(timestamp\); the interactions have "
                                              r"\['user_id'\]"):
    splits.split_indices({"user_id": np.arange(10)}, "temporal", seed=0)
  with pytest.raises(dataset.DataError, match=r"split 'leave_last_out' needs a timestamp "
                                              r"column \(none is set\)"):
    splits.split_indices(ratings, "leave_last_out", seed=0, time_key="")
  with pytest.raises(dataset.DataError, match="no user has two or more ratings"):
    splits.split_indices(ratings, "leave_last_out", seed=0)


# ----------------------------------------------------------------------------
# Finding the folder.


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
  """No TWOTOWER_DATA_DIR, an empty cache under tmp_path, and no network."""
  monkeypatch.delenv(download.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

  def no_network(url, timeout=None):
    raise AssertionError(f"test tried the network: {url}")
  monkeypatch.setattr(download, "fetch_url", no_network)
  return tmp_path / "cache" / "twotower_jax" / "ml-100k"


def test_resolve_order_flag_then_env_then_cache(tmp_path, monkeypatch, clean_env):
  flag = write_tiny(tmp_path / "flag")
  env = write_tiny(tmp_path / "env")
  write_tiny(clean_env)
  assert download.resolve_data_dir(None) == clean_env
  monkeypatch.setenv(download.DATA_DIR_ENV, str(env))
  assert download.resolve_data_dir(None) == env
  assert download.resolve_data_dir("") == env
  assert download.resolve_data_dir(str(flag)) == flag


def test_resolve_accepts_parent_with_ml100k_subfolder(tmp_path, clean_env):
  write_tiny(tmp_path / "parent" / "ml-100k")
  assert download.resolve_data_dir(tmp_path / "parent") == tmp_path / "parent" / "ml-100k"


def test_configured_dir_without_files_is_an_error_not_a_fallthrough(tmp_path, monkeypatch,
                                                                   clean_env):
  monkeypatch.setenv(download.DATA_DIR_ENV, str(write_tiny(tmp_path / "env")))
  (tmp_path / "empty").mkdir()
  with pytest.raises(dataset.DataError, match=re.escape(str(tmp_path / "empty")) +
                     r" \(from --config.data.dir\) lacks u.data, u.item, u.user"):
    download.resolve_data_dir(tmp_path / "empty")
  monkeypatch.setenv(download.DATA_DIR_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(dataset.DataError, match=r"nowhere \(from \$TWOTOWER_DATA_DIR\) does not exist"):
    download.resolve_data_dir(None)


def _expect_not_found(excinfo, cache: pathlib.Path, reason: str) -> None:
  msg = str(excinfo.value)
  assert str(cache) in msg
  assert "--config.data.dir (not set)" in msg and "$TWOTOWER_DATA_DIR (not set)" in msg
  assert "--config.data.dir=PATH" in msg and "export TWOTOWER_DATA_DIR=PATH" in msg
  assert reason in msg
  assert not cache.exists() or not any(cache.iterdir())


def test_no_data_and_download_disabled(clean_env):
  with pytest.raises(dataset.DataError) as e:
    download.resolve_data_dir(None, download=False)
  _expect_not_found(e, clean_env, "download is disabled")


def test_offline_download_gives_one_clear_error(clean_env):
  def offline(url):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
  with pytest.raises(dataset.DataError) as e:
    download.resolve_data_dir(None, fetch=offline)
  _expect_not_found(e, clean_env, "Temporary failure in name resolution")


def test_checksum_mismatch_is_rejected_and_nothing_is_kept(clean_env):
  with pytest.raises(dataset.DataError) as e:
    download.resolve_data_dir(None, fetch=lambda url: b"<html>captive portal</html>")
  _expect_not_found(e, clean_env, "SHA-256")
  assert download.ML100K_SHA256 in str(e.value)


def _fake_zip(tmp_path) -> bytes:
  src = write_tiny(tmp_path / "zipsrc")
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    for name in TINY:
      z.write(src / name, f"ml-100k/{name}")
  return buf.getvalue()


def test_download_extracts_into_cache(tmp_path, monkeypatch, clean_env):
  blob = _fake_zip(tmp_path)
  monkeypatch.setattr(download, "ML100K_SHA256", hashlib.sha256(blob).hexdigest())
  urls = []
  got = download.resolve_data_dir(None, fetch=lambda url: urls.append(url) or blob)
  assert urls == [download.ML100K_URL]
  assert got == clean_env
  assert (got / "u.data").read_text() == TINY["u.data"]
  # Second call finds the cache and does not download again.
  assert download.resolve_data_dir(None, fetch=lambda url: pytest.fail("downloaded twice")) == got


def test_unsafe_zip_member_is_rejected(tmp_path, monkeypatch, clean_env):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("../evil", "x")
  blob = buf.getvalue()
  monkeypatch.setattr(download, "ML100K_SHA256", hashlib.sha256(blob).hexdigest())
  with pytest.raises(dataset.DataError, match="unsafe path '../evil'"):
    download.resolve_data_dir(None, fetch=lambda url: blob)
  assert not (tmp_path / "cache" / "evil").exists()


# ----------------------------------------------------------------------------
# Config entry points.


def _cfg(**kw):
  cfg = config_lib.base_config().data
  cfg.update(kw)
  return cfg


def test_load_and_train_test_from_config(ml100k_dir, synthetic):
  ds = sources.load_dataset(_cfg(dir=str(ml100k_dir)))
  np.testing.assert_array_equal(ds.ratings["timestamp"], synthetic.ratings["timestamp"])
  train, test = sources.train_test(_cfg(split="random", test_fraction=0.1), ds, seed=0)
  assert train["user_id"].size == 1350 and test["user_id"].size == 150
  assert set(train) == set(ds.ratings)
  train, test = sources.train_test(_cfg(train_size=1000, test_size=200), ds, seed=0)
  assert (train["movie_title"].size, test["movie_genres"].shape) == (1000, (200, 5))


def test_train_test_files_split(tmp_path, monkeypatch, ml100k_dir, synthetic):
  folder = tmp_path / "ml-100k"
  shutil.copytree(ml100k_dir, folder)
  lines = (folder / "u.data").read_text().splitlines(keepends=True)
  (folder / "u1.base").write_text("".join(lines[:1200]))
  (folder / "u1.test").write_text("".join(lines[1200:]))
  cfg = _cfg(dir=str(folder), split="files", train_file="u1.base",
             test_file=str(folder / "u1.test"))
  monkeypatch.chdir(tmp_path)
  train, test = sources.train_test(cfg, synthetic, seed=0)
  np.testing.assert_array_equal(train["timestamp"], synthetic.ratings["timestamp"][:1200])
  np.testing.assert_array_equal(test["movie_title"], synthetic.ratings["movie_title"][1200:])
  with pytest.raises(dataset.DataError, match="--config.data.train_file='u9.base' not found"):
    sources.train_test(_cfg(dir=str(folder), split="files", train_file="u9.base",
                         test_file="u1.test"), synthetic, seed=0)
  with pytest.raises(dataset.DataError, match="needs --config.data.test_file"):
    sources.train_test(_cfg(dir=str(folder), split="files", train_file="u1.base"), synthetic, 0)


def test_unknown_source_lists_valid_ones_and_registry_works(monkeypatch, synthetic):
  with pytest.raises(dataset.DataError, match="unknown data source 'ml-7m'.*grouplens, tfds"):
    sources.load_dataset(_cfg(source="ml-7m"))
  monkeypatch.setitem(sources.LOADERS, "fake", lambda cfg: synthetic)
  assert sources.load_dataset(_cfg(source="fake")) is synthetic


def test_config_dict_without_optional_keys_uses_defaults(ml100k_dir):
  cfg = ml_collections.ConfigDict({"dir": str(ml100k_dir)})
  assert sources.load_dataset(cfg).source == "grouplens-100k"


# ----------------------------------------------------------------------------
# The real MovieLens 100K files.


@pytest.mark.integration
def test_real_movielens_100k(real_data_dir):
  ds = sources.load_dataset(_cfg(dir=str(real_data_dir), download=False))
  r, m = ds.ratings, ds.movies
  assert r["user_id"].size == 100_000
  assert np.unique(r["user_id"]).size == 943 and ds.users["user_id"].size == 943
  assert m["movie_id"].size == 1682
  assert (r["user_id"][0], r["movie_id"][0], r["user_rating"][0], r["timestamp"][0]) == (
      196, 242, 3.0, 881250949)
  assert r["movie_title"][0] == "Kolya (1996)"
  assert len(ds.genre_names) == 19 and ds.genre_names[4] == "Children's"
  assert m["movie_genres"].shape == (1682, 6)
  assert m["movie_release_year"][266] == -1  # movie 267 has no release date
  assert 1922 <= m["movie_release_year"][m["movie_release_year"] > 0].min()
  assert sorted(np.unique(r["bucketized_user_age"])) == [1, 18, 25, 35, 45, 50, 56]
  assert set(np.unique(r["user_rating"])) == {1, 2, 3, 4, 5}
  train, test = sources.train_test(_cfg(dir=str(real_data_dir)), ds, seed=42)
  assert (train["user_id"].size, test["user_id"].size) == (80_000, 10_000)


# ----------------------------------------------------------------------------
# Property test: random lines are parsed exactly like a simple reference, or
# rejected with a DataError naming a bad line -- never another exception.

DIGITS = "0123456789"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _is_int(s: str, max_digits: int = 18) -> bool:
  return 1 <= len(s) <= max_digits and all(c in DIGITS for c in s)


def _is_date(s: str) -> bool:
  if s == "":
    return True
  parts = s.split("-")
  return (len(parts) == 3 and _is_int(parts[0], 2) and parts[1] in MONTHS
          and len(parts[2]) == 4 and _is_int(parts[2]))


def _ref_lines(text: str) -> list[str] | None:
  text = text.replace("\r\n", "\n").rstrip("\n")
  return text.split("\n") if text else None


def ref_u_data(text):
  """-> (columns, set()) or (None, bad 1-based line numbers)."""
  bad, rows = set(), []
  for n, line in enumerate(_ref_lines(text), 1):
    f = line.split("\t")
    if len(f) != 4 or not all(_is_int(x) for x in f) or not 1 <= int(f[2]) <= 5:
      bad.add(n)
    else:
      rows.append([int(x) for x in f])
  return (None, bad) if bad else (np.array(rows, np.int64), bad)


def _ref_id_rows(text, num_fields, row_ok):
  """Rows of a '|' file keyed by a unique integer id in field 0 (a repeated id is bad even
  where its first line is)."""
  bad, rows, seen = set(), [], set()
  for n, line in enumerate(_ref_lines(text), 1):
    f = line.split("|")
    ok = len(f) == num_fields and _is_int(f[0]) and row_ok(f)
    if len(f) == num_fields and _is_int(f[0]):
      ok = ok and int(f[0]) not in seen
      seen.add(int(f[0]))
    if ok:
      rows.append(f)
    else:
      bad.add(n)
  return (None, bad) if bad else (rows, bad)


def ref_u_user(text):
  return _ref_id_rows(text, 5, lambda f: (
      _is_int(f[1], 3) and 1 <= int(f[1]) <= 120 and f[2] in ("M", "F")
      and f[3] in dataset.OCCUPATION_TEXT_TO_LABEL and f[4] != ""))


def ref_u_item(text, num_genres):
  return _ref_id_rows(text, 5 + num_genres, lambda f: (
      _is_date(f[2]) and all(x in ("0", "1") for x in f[5:])))


def ref_u_genre(text):
  bad, names = set(), []
  for n, line in enumerate(_ref_lines(text), 1):
    f = line.split("|")
    ok = len(f) == 2 and f[0] != "" and _is_int(f[1]) and int(f[1]) == n - 1
    if len(f) == 2:
      ok = ok and f[0] not in names
      names.append(f[0])
    if not ok:
      bad.add(n)
  return (None, bad) if bad else (tuple(names), bad)


NOISE = "09|\t -+.xMFé\u00b2\r"
_noise = st.text(alphabet=NOISE, max_size=4)
_title = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255,
                                        exclude_characters="|"), max_size=12)


NEAR_INTS = ("+5", "-1", " 5", "5 ", "5.0", "1_0", "\u00b2", "0x1", "1e3", "", "1" * 19, "007")


def _bad_int(lo, hi):
  return st.one_of(st.sampled_from(NEAR_INTS), st.integers(lo, hi).map(str), _noise)


def _ok_int(lo, hi):
  return st.integers(lo, hi).map(str)


_date = st.tuples(st.integers(1, 28), st.sampled_from(MONTHS),
                  st.integers(1000, 2100)).map(lambda t: f"{t[0]:02d}-{t[1]}-{t[2]}")
_bad_date = st.one_of(_date, st.tuples(st.integers(0, 999), st.sampled_from(MONTHS + ("Foo",)),
                                       st.integers(0, 20000)).map(
    lambda t: f"{t[0]}-{t[1]}-{t[2]}"), _noise)

# Per file: (good field strategies, noisy field strategies, separator). Good
# fields are valid apart from rare collisions; noisy ones often are not.
# Field strategies are functions of the 0-based line index.
GRAMMARS = {
    "u.data": ([lambda i: _ok_int(0, 10**6), lambda i: _ok_int(0, 10**6),
                lambda i: _ok_int(1, 5), lambda i: _ok_int(0, 10**12)],
               [lambda i: _bad_int(0, 12), lambda i: _bad_int(0, 12),
                lambda i: _bad_int(-1, 7), lambda i: _bad_int(0, 10**12)], "\t"),
    "u.user": ([lambda i: _ok_int(0, 10**6), lambda i: _ok_int(1, 120),
                lambda i: st.sampled_from(["M", "F"]),
                lambda i: st.sampled_from(sorted(dataset.OCCUPATION_TEXT_TO_LABEL)),
                lambda i: st.text(alphabet="0123456789TNH é", min_size=1, max_size=6)],
               [lambda i: _bad_int(0, 6), lambda i: _bad_int(-1, 130),
                lambda i: st.sampled_from(["M", "F", "m", ""]),
                lambda i: st.sampled_from(["student", "none", "astronaut", ""]),
                lambda i: st.sampled_from(["55105", "T8H1N", ""])], "|"),
    "u.item": ([lambda i: _ok_int(0, 10**6), lambda i: _title,
                lambda i: st.one_of(st.just(""), _date), lambda i: _title,
                lambda i: st.just("http://x/?a=1%20b")]
               + [lambda i: st.sampled_from(["0", "1"])] * 3,
               [lambda i: _bad_int(0, 6), lambda i: _title, lambda i: _bad_date,
                lambda i: _noise, lambda i: _noise]
               + [lambda i: st.sampled_from(["0", "1", "2", "", "x"])] * 3, "|"),
    "u.genre": ([lambda i: _title.map(lambda t: f"{t}#{i}"), lambda i: st.just(str(i))],
                [lambda i: st.sampled_from(["Action", "Drama", ""]),
                 lambda i: _bad_int(0, 3)], "|"),
}


@st.composite
def _file(draw, name, max_lines=8):
  """File text; some lines get one fault (a noisy field, or a field too few/many)."""
  good, noisy, sep = GRAMMARS[name]
  fault_rate = draw(st.sampled_from([0, 3, 10]))  # out of 20 lines
  lines = []
  for i in range(draw(st.integers(1, max_lines))):
    fields = [draw(g(i)) for g in good]
    if draw(st.integers(0, 19)) < fault_rate:
      k = draw(st.integers(0, len(fields) + 1))
      if k < len(fields):
        fields[k] = draw(noisy[k](i))
      elif k == len(fields):
        fields.pop(draw(st.integers(0, len(fields) - 1)))
      else:
        fields.insert(draw(st.integers(0, len(fields))), draw(_noise))
    lines.append(sep.join(fields))
  newline = draw(st.sampled_from(["\n", "\r\n"]))
  return newline.join(lines) + draw(st.sampled_from(["", newline, newline * 2]))


def _check(path, parse, expect, text):
  """Runs ``parse`` on ``text``: equal to the reference, or DataError naming a bad line."""
  path.write_bytes(text.encode("latin-1"))
  text = dataset.decode_text(text.encode("latin-1"))  # UTF-8 when valid, as the parsers read
  got_ok, bad = expect(text) if _ref_lines(text) is not None else (None, None)
  try:
    got = parse(path)
  except dataset.DataError as e:
    assert got_ok is None, f"rejected a valid file: {e}"
    if bad is None:
      assert "is empty" in str(e)
      return None
    m = re.search(re.escape(str(path)) + r":(\d+): ", str(e))
    assert m, f"message does not name file and line: {e}"
    assert int(m.group(1)) in bad, f"line {m.group(1)} is fine, bad ones: {bad}: {e}"
    return None
  assert got_ok is not None, f"accepted an invalid file (bad lines {bad})"
  return got, got_ok


SETTINGS = hypothesis.settings(max_examples=150, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])


@SETTINGS
@hypothesis.given(_file("u.data"))
def test_u_data_parser_property(text):
  with tempfile.TemporaryDirectory() as d:
    out = _check(pathlib.Path(d) / "u.data", movielens.read_u_data, ref_u_data, text)
  if out:
    got, ref = out
    np.testing.assert_array_equal(got["user_id"], ref[:, 0])
    np.testing.assert_array_equal(got["movie_id"], ref[:, 1])
    np.testing.assert_array_equal(got["user_rating"], ref[:, 2].astype(np.float32))
    np.testing.assert_array_equal(got["timestamp"], ref[:, 3])


@SETTINGS
@hypothesis.given(_file("u.user"))
def test_u_user_parser_property(text):
  with tempfile.TemporaryDirectory() as d:
    out = _check(pathlib.Path(d) / "u.user", movielens.read_u_user, ref_u_user, text)
  if out:
    got, rows = out
    np.testing.assert_array_equal(got["user_id"], [int(f[0]) for f in rows])
    np.testing.assert_array_equal(got["raw_user_age"], [float(f[1]) for f in rows])
    np.testing.assert_array_equal(got["user_gender"], [f[2] == "M" for f in rows])
    np.testing.assert_array_equal(got["user_occupation_text"], [f[3] for f in rows])
    np.testing.assert_array_equal(got["user_zip_code"], [f[4] for f in rows])
    labels = [dataset.OCCUPATION_LABELS.index(dataset.OCCUPATION_TEXT_TO_LABEL[f[3]]) for f in rows]
    np.testing.assert_array_equal(got["user_occupation_label"], labels)
    buckets = [max(b for b in dataset.AGE_BUCKETS if b <= max(int(f[1]), 1)) for f in rows]
    np.testing.assert_array_equal(got["bucketized_user_age"], buckets)


@SETTINGS
@hypothesis.given(_file("u.item"))
def test_u_item_parser_property(text):
  genres = ("a", "b", "c")
  with tempfile.TemporaryDirectory() as d:
    out = _check(pathlib.Path(d) / "u.item", lambda p: movielens.read_u_item(p, genres),
                 lambda t: ref_u_item(t, len(genres)), text)
  if out:
    got, rows = out
    np.testing.assert_array_equal(got["movie_id"], [int(f[0]) for f in rows])
    assert got["movie_title"].tolist() == [f[1] for f in rows]
    np.testing.assert_array_equal(got["movie_release_year"],
                                  [int(f[2][-4:]) if f[2] else -1 for f in rows])
    ids = [[g for g in range(3) if f[5 + g] == "1"] for f in rows]
    width = max(1, max(len(i) for i in ids))
    np.testing.assert_array_equal(got["movie_genres"], [i + [-1] * (width - len(i)) for i in ids])


@SETTINGS
@hypothesis.given(_file("u.genre", max_lines=5))
def test_u_genre_parser_property(text):
  with tempfile.TemporaryDirectory() as d:
    out = _check(pathlib.Path(d) / "u.genre", movielens.read_u_genre, ref_u_genre, text)
  if out:
    assert out[0] == out[1]
