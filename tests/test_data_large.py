"""MovieLens 1M / CSV (20M, 25M, latest) loaders and the synthetic generator.

Every file here is synthetic, written in the GroupLens formats into tmp dirs.
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pytest

from twotower_jax.data import dataset, movielens_large, sources, synthetic
from twotower_jax.data.dataset import DataError

G = {name: i for i, name in enumerate(dataset.ML100K_GENRE_NAMES)}
LATIN1_TITLE = "Café Crème à Noël (1994)"

ML1M_MOVIES = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    f"2::{LATIN1_TITLE}::Drama",
    "3::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Sci-Fi|Fantasy",
    "4::Catalogue Only (2000)::Film-Noir",
]
ML1M_USERS = [
    "1::F::1::10::48067",
    "2::M::56::16::70072",
    "3::M::25::0::55117-1234",
    "4::F::35::4::02460",
]
ML1M_RATINGS = [
    "1::1::5::978300760",
    "1::2::3::978302109",
    "2::3::4::978301968",
    "3::1::1::978300275",
    "4::3::2::978824291",
]

CSV_MOVIES = [
    "movieId,title,genres",
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy",
    '11,"American President, The (1995)",Comedy|Drama|Romance',
    "20,Niñas Mal (2007),Comedy",
    "30,Untitled Project,(no genres listed)",
    "40,Planet Earth (2006–2007),Documentary|IMAX",
]
CSV_RATINGS = [
    "userId,movieId,rating,timestamp",
    "1,1,4.0,964982703",
    "1,11,3.5,964981247",
    "2,20,0.5,1445714835",
    "2,30,5.0,1445714996",
    "3,11,2.5,1260759144",
]


def write_lines(path: pathlib.Path, lines, encoding: str = "utf-8", end: str = "\n") -> None:
  path.write_bytes("".join(line + end for line in lines).encode(encoding))


@pytest.fixture
def ml1m_dir(tmp_path) -> pathlib.Path:
  d = tmp_path / "ml-1m"
  d.mkdir()
  write_lines(d / "movies.dat", ML1M_MOVIES, "latin-1")
  write_lines(d / "users.dat", ML1M_USERS, "latin-1")
  write_lines(d / "ratings.dat", ML1M_RATINGS, "latin-1")
  return d


@pytest.fixture
def csv_dir(tmp_path) -> pathlib.Path:
  return write_csv_source(tmp_path, "ml-25m")


def write_csv_source(root: pathlib.Path, source: str) -> pathlib.Path:
  """The small movies.csv and ratings.csv in ``root/source``."""
  d = root / source
  d.mkdir()
  write_lines(d / "movies.csv", CSV_MOVIES)
  write_lines(d / "ratings.csv", CSV_RATINGS)
  return d


def genre_row(ids, width):
  return list(ids) + [-1] * (width - len(ids))


# ----------------------------------------------------------------------------
# MovieLens 1M.


def test_ml1m_columns_and_values(ml1m_dir):
  ds = movielens_large.load_movielens_1m(ml1m_dir)
  r, m = ds.ratings, ds.movies
  assert ds.source == "ml-1m" and ds.genre_names == dataset.ML100K_GENRE_NAMES
  assert list(r) == ["user_id", "movie_id", "user_rating", "timestamp", "raw_user_age",
                     "bucketized_user_age", "user_gender", "user_occupation_text",
                     "user_occupation_label", "user_zip_code", "movie_title", "movie_genres"]
  dtypes = {"user_id": np.int64, "movie_id": np.int64, "user_rating": np.float32,
            "timestamp": np.int64, "raw_user_age": np.float32,
            "bucketized_user_age": np.float32, "user_gender": np.bool_,
            "user_occupation_label": np.int64, "movie_genres": np.int32}
  for name, dtype in dtypes.items():
    assert r[name].dtype == dtype, name
  for name in ("user_occupation_text", "user_zip_code", "movie_title"):
    assert r[name].dtype.kind == "U", name
  assert all(v.shape[0] == 5 for v in r.values())
  np.testing.assert_array_equal(r["user_id"], [1, 1, 2, 3, 4])
  np.testing.assert_array_equal(r["user_rating"], [5, 3, 4, 1, 2])
  np.testing.assert_array_equal(r["timestamp"][:2], [978300760, 978302109])
  np.testing.assert_array_equal(r["user_gender"], [False, False, True, True, False])
  np.testing.assert_array_equal(r["raw_user_age"], [1, 1, 56, 25, 35])
  np.testing.assert_array_equal(r["bucketized_user_age"], r["raw_user_age"])
  assert list(r["user_occupation_text"]) == [
      "K-12 student", "K-12 student", "self-employed", "other/not specified",
      "college/grad student"]
  labels = [dataset.OCCUPATION_LABELS[i] for i in r["user_occupation_label"]]
  assert labels == ["student", "student", "self-employed", "other/not specified", "student"]
  assert r["user_zip_code"][3] == "55117-1234" and r["user_zip_code"][4] == "02460"
  assert r["movie_title"][1] == LATIN1_TITLE
  width = r["movie_genres"].shape[1]
  assert width == 4
  assert r["movie_genres"][0].tolist() == genre_row(
      sorted([G["Animation"], G["Children's"], G["Comedy"]]), width)
  assert r["movie_genres"][2].tolist() == genre_row(
      sorted([G["Action"], G["Adventure"], G["Sci-Fi"], G["Fantasy"]]), width)
  # The catalogue holds every movie, including one nobody rated.
  np.testing.assert_array_equal(m["movie_id"], [1, 2, 3, 4])
  np.testing.assert_array_equal(m["movie_release_year"], [1995, 1994, 1977, 2000])
  assert m["movie_genres"][3].tolist() == genre_row([G["Film-Noir"]], width)
  assert ds.users is not None and ds.users["user_id"].tolist() == [1, 2, 3, 4]


def test_ml1m_via_data_load_and_parent_dir(ml1m_dir):
  for d in (ml1m_dir, ml1m_dir.parent):  # the folder itself or its parent holding ml-1m/
    ds = sources.load_dataset(ml_collections.ConfigDict({"source": "ml-1m", "dir": str(d)}))
    assert ds.source == "ml-1m" and ds.ratings["user_id"].shape == (5,)


def test_ml1m_crlf_and_no_final_newline(tmp_path):
  d = tmp_path / "crlf"
  d.mkdir()
  write_lines(d / "movies.dat", ML1M_MOVIES, "latin-1", end="\r\n")
  write_lines(d / "users.dat", ML1M_USERS, "latin-1", end="\r\n")
  (d / "ratings.dat").write_bytes("\n".join(ML1M_RATINGS).encode())
  ds = movielens_large.load_movielens_1m(d)
  assert ds.ratings["timestamp"][-1] == 978824291
  assert ds.ratings["user_zip_code"][0] == "48067"
  assert ds.ratings["movie_genres"][3].tolist()[:3] == sorted(
      [G["Animation"], G["Children's"], G["Comedy"]])


@pytest.mark.parametrize("bad, lineno, words", [
    ("2::3::x::978301968", 3, "field 3 (rating) is 'x'"),
    ("2::3::4", 3, "found 3 fields"),
    ("2::3::4::9::1", 3, "found 5 fields"),
    ("2:3::4::978301968", 3, "found 3 fields"),
    ("2::3,1::4::978301968", 3, "field 2 (movie id) is '3,1'"),
    ("", 3, "the line is empty"),
    ("2::3::7::978301968", 3, "rating is outside 0.5..5"),
    ("2::-3::4::978301968", 3, "movie id is negative (-3)"),
])
def test_ml1m_malformed_rating_line(ml1m_dir, bad, lineno, words):
  lines = list(ML1M_RATINGS)
  lines[lineno - 1] = bad
  write_lines(ml1m_dir / "ratings.dat", lines)
  with pytest.raises(DataError) as e:
    movielens_large.load_movielens_1m(ml1m_dir)
  msg = str(e.value)
  assert f"ratings.dat:{lineno}:" in msg and words in msg and "Fix:" in msg, msg


@pytest.mark.parametrize("file, lines, lineno, words", [
    ("movies.dat", ML1M_MOVIES[:2] + ["3::No Genres (1977)"] + ML1M_MOVIES[3:], 3,
     "found 2 '::'-separated fields"),
    ("movies.dat", ML1M_MOVIES[:3] + ["4::Bad (2000)::Comdy"], 4, "unknown genre 'Comdy'"),
    ("movies.dat", ML1M_MOVIES + ["2::Again (2001)::Drama"], 5,
     "duplicate movie id 2 (first on line 2)"),
    ("users.dat", ML1M_USERS[:1] + ["2::X::56::16::70072"] + ML1M_USERS[2:], 2,
     "field 2 (gender) is 'X'"),
    ("users.dat", ML1M_USERS[:3] + ["4::F::30::4::02460"], 4, "field 3 (age code) is '30'"),
    ("users.dat", ML1M_USERS[:3] + ["4::F::35::21::02460"], 4, "field 4 (occupation) is '21'"),
])
def test_ml1m_malformed_movies_and_users(ml1m_dir, file, lines, lineno, words):
  write_lines(ml1m_dir / file, lines, "latin-1")
  with pytest.raises(DataError) as e:
    movielens_large.load_movielens_1m(ml1m_dir)
  msg = str(e.value)
  assert f"{file}:{lineno}:" in msg and words in msg and "Fix:" in msg, msg


def test_ml1m_unknown_movie_and_user(ml1m_dir):
  write_lines(ml1m_dir / "ratings.dat", ML1M_RATINGS[:3] + ["4::99::2::978824291"])
  with pytest.raises(DataError, match=r"ratings\.dat:4: movie id 99 is not in .*movies\.dat"):
    movielens_large.load_movielens_1m(ml1m_dir)
  write_lines(ml1m_dir / "ratings.dat", ML1M_RATINGS[:1] + ["7::1::2::978824291"])
  with pytest.raises(DataError, match=r"ratings\.dat:2: user id 7 is not in .*users\.dat"):
    movielens_large.load_movielens_1m(ml1m_dir)


def test_missing_files_name_path_and_url(ml1m_dir, csv_dir, tmp_path):
  (ml1m_dir / "users.dat").unlink()
  with pytest.raises(DataError) as e:
    movielens_large.load_movielens_1m(ml1m_dir)
  assert str(ml1m_dir / "users.dat") in str(e.value)
  assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in str(e.value)
  (csv_dir / "ratings.csv").unlink()
  with pytest.raises(DataError) as e:
    movielens_large.load_movielens_csv(csv_dir, "ml-25m")
  assert str(csv_dir / "ratings.csv") in str(e.value) and "ml-25m.zip" in str(e.value)
  with pytest.raises(DataError, match="needs --config.data.dir"):
    sources.load_dataset(ml_collections.ConfigDict({"source": "ml-20m", "dir": ""}))


# ----------------------------------------------------------------------------
# MovieLens 20M / 25M / latest CSV.


CSV_SOURCES = ("ml-20m", "ml-25m", "ml-latest")


@pytest.mark.parametrize("source", CSV_SOURCES)
def test_csv_columns_and_values(tmp_path, source):
  csv_dir = write_csv_source(tmp_path, source)
  # The parent folder works too: each source looks in its own <dir>/<source>/ subfolder.
  ds = sources.load_dataset(ml_collections.ConfigDict({"source": source, "dir": str(tmp_path)}))
  r, m = ds.ratings, ds.movies
  assert ds.source == source and ds.users is None
  assert ds.genre_names == dataset.ML100K_GENRE_NAMES + ("IMAX",)
  assert list(r) == ["user_id", "movie_id", "user_rating", "timestamp", "movie_title",
                     "movie_genres"]
  assert (r["user_id"].dtype, r["movie_id"].dtype, r["user_rating"].dtype,
          r["timestamp"].dtype, r["movie_genres"].dtype) == (
              np.int64, np.int64, np.float32, np.int64, np.int32)
  np.testing.assert_array_equal(r["movie_id"], [1, 11, 20, 30, 11])
  np.testing.assert_array_equal(r["user_rating"], [4.0, 3.5, 0.5, 5.0, 2.5])
  np.testing.assert_array_equal(r["timestamp"][[0, 4]], [964982703, 1260759144])
  assert r["movie_title"][1] == "American President, The (1995)"
  assert r["movie_title"][2] == "Niñas Mal (2007)"
  assert m["movie_title"].dtype.kind == "U"
  assert list(r["movie_title"]) == [m["movie_title"][list(m["movie_id"]).index(i)]
                                    for i in r["movie_id"]]
  width = m["movie_genres"].shape[1]
  assert width == 5
  assert m["movie_genres"][0].tolist() == sorted(
      [G["Adventure"], G["Animation"], G["Children's"], G["Comedy"], G["Fantasy"]])
  assert m["movie_genres"][3].tolist() == genre_row([G["unknown"]], width)  # no genres listed
  assert m["movie_genres"][4].tolist() == genre_row([G["Documentary"], 19], width)  # IMAX
  np.testing.assert_array_equal(r["movie_genres"][3], m["movie_genres"][3])
  np.testing.assert_array_equal(m["movie_release_year"], [1995, 1995, 2007, -1, 2006])
  (csv_dir / "ratings.csv").unlink()  # a missing file names this source's download
  with pytest.raises(DataError) as e:
    sources.load_dataset(ml_collections.ConfigDict({"source": source, "dir": str(csv_dir)}))
  assert f"https://files.grouplens.org/datasets/movielens/{source}.zip" in str(e.value)


@pytest.mark.parametrize("bad, lineno, words", [
    ("2,20,x,1445714835", 4, "field 3 (rating) is 'x'"),
    ("2,20,4.5", 4, "found 3 fields"),
    ("2,20,4.5,1445714835,7", 4, "found 5 fields"),
    ("", 4, "the line is empty"),
    ("2,20,0.0,1445714835", 4, "rating is outside 0.5..5"),
    ("2,20,nan,1445714835", 4, "rating is outside 0.5..5 (nan)"),
    ("2,2 0,4.5,1445714835", 4, "field 2 (movie id) is '2 0'"),
    ("2,20,4.5,99999999999999999999", 4, "field 4 (timestamp)"),
])
def test_csv_malformed_rating_line(csv_dir, bad, lineno, words):
  lines = list(CSV_RATINGS)
  lines[lineno - 1] = bad
  write_lines(csv_dir / "ratings.csv", lines)
  with pytest.raises(DataError) as e:
    movielens_large.load_movielens_csv(csv_dir)
  msg = str(e.value)
  assert f"ratings.csv:{lineno}:" in msg and words in msg and "Fix:" in msg, msg


def test_csv_header_and_unknown_movie(csv_dir):
  write_lines(csv_dir / "ratings.csv", ["user,movie,rating,time"] + CSV_RATINGS[1:])
  with pytest.raises(DataError, match=r"ratings\.csv:1: the header"):
    movielens_large.load_movielens_csv(csv_dir)
  write_lines(csv_dir / "ratings.csv", CSV_RATINGS + ["3,12345,4.0,1260759144"])
  with pytest.raises(DataError, match=r"ratings\.csv:7: movie id 12345 is not in .*movies\.csv"):
    movielens_large.load_movielens_csv(csv_dir)


@pytest.mark.parametrize("bad, words", [
    ("11,American President, The (1995),Comedy", "found 4 fields"),
    ("11,Real Title (1995),Comedy|Wizardry", "unknown genre 'Wizardry'"),
    ("11,Real Title (1995),", "field 3 (genres) is empty"),
    ("1,Same Id (1995),Comedy", "duplicate movie id 1 (first on line 2)"),
    ('11,"Broken "quote" (1995)",Comedy', "bad CSV quoting"),
])
def test_csv_malformed_movies(csv_dir, bad, words):
  write_lines(csv_dir / "movies.csv", CSV_MOVIES[:2] + [bad] + CSV_MOVIES[3:])
  with pytest.raises(DataError) as e:
    movielens_large.load_movielens_csv(csv_dir)
  msg = str(e.value)
  assert "movies.csv:3:" in msg and words in msg and "Fix:" in msg, msg


def test_csv_movies_not_utf8(csv_dir):
  lines = CSV_MOVIES[:4]  # line 4 holds "Niñas Mal (2007)"
  (csv_dir / "movies.csv").write_bytes("\n".join(lines).encode("latin-1"))
  with pytest.raises(DataError, match=r"movies\.csv:4: .* not valid utf-8"):
    movielens_large.load_movielens_csv(csv_dir)


def test_chunked_parse_matches_and_numbers_lines_across_chunks():
  rng = np.random.default_rng(1)
  n = 500
  u, m = rng.integers(1, 1000, n), rng.integers(1, 5000, n)
  r, t = rng.integers(1, 11, n) / 2, rng.integers(0, 2**31, n)
  lines = [f"{a},{b},{c},{d}" for a, b, c, d in zip(u, m, r, t)]
  blob = ("\n".join(["userId,movieId,rating,timestamp"] + lines) + "\n").encode()
  kw = {"sep": ",", "header": movielens_large.RATINGS_CSV_HEADER, "url": "u"}
  whole, first = movielens_large.parse_ratings("f.csv", blob, **kw)
  chunked, _ = movielens_large.parse_ratings("f.csv", blob, chunk_bytes=64, **kw)
  assert first == 2
  for name, expect in (("user_id", u), ("movie_id", m), ("user_rating", r), ("timestamp", t)):
    np.testing.assert_array_equal(whole[name], expect)
    np.testing.assert_array_equal(chunked[name], expect)
  lines[400] = "1,2,3.5,4,5"  # data line 401 = file line 402, deep in a later chunk
  blob = ("\n".join(["userId,movieId,rating,timestamp"] + lines) + "\n").encode()
  for chunk_bytes in (64, 1 << 20):
    with pytest.raises(DataError, match=r"^f\.csv:402: found 5 fields"):
      movielens_large.parse_ratings("f.csv", blob, chunk_bytes=chunk_bytes, **kw)


# ----------------------------------------------------------------------------
# Synthetic generator.


def test_synthetic_shapes_dtypes_and_documented_structure():
  ds = synthetic.synthetic(300, 500, 20_000, seed=3, num_clusters=7)
  r, m = ds.ratings, ds.movies
  assert ds.source == "synthetic" and ds.genre_names == tuple(f"cluster {c}" for c in range(7))
  assert list(r) == ["user_id", "movie_id", "user_rating", "timestamp", "movie_title",
                     "movie_genres"]
  assert all(v.shape[0] == 20_000 for v in r.values())
  assert (r["user_id"].dtype, r["movie_id"].dtype, r["user_rating"].dtype,
          r["timestamp"].dtype, r["movie_genres"].dtype) == (
              np.int64, np.int64, np.float32, np.int64, np.int32)
  assert r["movie_title"].dtype.kind == "U" and r["movie_genres"].shape == (20_000, 1)
  assert r["user_id"].min() >= 1 and r["user_id"].max() <= 300
  assert r["movie_id"].min() >= 1 and r["movie_id"].max() <= 500
  assert set(np.unique(r["user_rating"])) <= {1.0, 2.0, 3.0, 4.0, 5.0}
  assert np.all(np.diff(r["timestamp"]) >= 0)
  assert r["timestamp"][0] >= synthetic.SYNTHETIC_START
  assert r["timestamp"][-1] < synthetic.SYNTHETIC_END
  assert r["timestamp"][-1] - r["timestamp"][0] > 10 * 365 * 86_400  # spread over years
  np.testing.assert_array_equal(m["movie_id"], np.arange(1, 501))
  assert m["movie_title"][41] == "item 42"
  np.testing.assert_array_equal(r["movie_title"], m["movie_title"][r["movie_id"] - 1])
  np.testing.assert_array_equal(r["movie_genres"], m["movie_genres"][r["movie_id"] - 1])
  np.testing.assert_array_equal(m["movie_release_year"], -1)
  sizes = np.bincount(m["movie_genres"][:, 0], minlength=7)
  assert sizes.min() >= 500 // 7 and sizes.max() <= 500 // 7 + 1  # even split


def test_synthetic_deterministic_per_seed():
  a = synthetic.synthetic(50, 80, 2_000, seed=5)
  b = synthetic.synthetic(50, 80, 2_000, seed=5)
  c = synthetic.synthetic(50, 80, 2_000, seed=6)
  for name in a.ratings:
    np.testing.assert_array_equal(a.ratings[name], b.ratings[name])
  for name in a.movies:
    np.testing.assert_array_equal(a.movies[name], b.movies[name])
  assert not np.array_equal(a.ratings["movie_id"], c.ratings["movie_id"])


def test_synthetic_zipf_skew():
  ds = synthetic.synthetic(2_000, 5_000, 100_000, seed=0)
  counts = np.sort(np.bincount(ds.ratings["movie_id"], minlength=5_001)[1:])[::-1]
  top_share = counts[:50].sum() / counts.sum()  # top 1% of items
  assert top_share > 0.3, top_share
  flat = synthetic.synthetic(2_000, 5_000, 100_000, seed=0, zipf_a=0.0)
  counts = np.sort(np.bincount(flat.ratings["movie_id"], minlength=5_001)[1:])[::-1]
  assert counts[:50].sum() / counts.sum() < 0.02


@pytest.mark.parametrize("affinity", [0.0, 0.5, 0.8, 1.0])
def test_synthetic_in_cluster_fraction_matches_affinity(affinity):
  c = 10
  ds = synthetic.synthetic(400, 2_000, 50_000, seed=1, num_clusters=c, affinity=affinity)
  r = ds.ratings
  in_cluster = r["movie_genres"][:, 0] == r["user_id"] % c
  # A global draw lands in the user's cluster with that cluster's popularity mass;
  # users are spread evenly over the clusters, so that is 1/c on average.
  expected = affinity + (1 - affinity) / c
  if affinity == 1.0:
    assert in_cluster.all()
  else:
    assert abs(in_cluster.mean() - expected) < 0.06, (in_cluster.mean(), expected)
    assert in_cluster.mean() > affinity - 0.01


def test_synthetic_user_history_beats_popularity():
  """Planted clusters make the user's own history informative beyond popularity."""
  c, k = 20, 20
  ds = synthetic.synthetic(500, 3_000, 60_000, seed=2, num_clusters=c)
  r = ds.ratings
  split = int(0.8 * r["user_id"].size)  # rows are in time order
  train_u, train_i = r["user_id"][:split], r["movie_id"][:split]
  test_u, test_i = r["user_id"][split:], r["movie_id"][split:]
  item_counts = np.bincount(train_i, minlength=3_001)
  popular_top = np.argsort(-item_counts)[:k]
  pop_hits = np.isin(test_i, popular_top).mean()
  # Each user's most frequent training genre, then that genre's most popular items.
  genre_I = ds.movies["movie_genres"][:, 0]
  user_genre = np.bincount(train_u * c + genre_I[train_i - 1], minlength=501 * c)
  user_genre = user_genre.reshape(501, c).argmax(1)
  per_genre_top = np.stack([np.argsort(-np.where(np.r_[-1, genre_I] == g, item_counts, -1))[:k]
                            for g in range(c)])
  personal_hits = (per_genre_top[user_genre[test_u]] == test_i[:, None]).any(1).mean()
  assert personal_hits > 1.5 * pop_hits, (personal_hits, pop_hits)


def test_synthetic_loader_reads_config_and_validates():
  cfg = ml_collections.ConfigDict({
      "source": "synthetic", "synthetic_users": 30, "synthetic_items": 40,
      "synthetic_interactions": 700, "synthetic_clusters": 4, "synthetic_affinity": 1.0})
  ds = sources.load_dataset(cfg)
  assert ds.ratings["user_id"].shape == (700,) and ds.movies["movie_id"].shape == (40,)
  assert (ds.ratings["movie_genres"][:, 0] == ds.ratings["user_id"] % 4).all()
  assert len(ds.genre_names) == 4
  defaults = sources.LOADERS["synthetic"](ml_collections.ConfigDict(
      {"synthetic_interactions": 1_000}))
  assert defaults.movies["movie_id"].shape == (10_000,)
  for kwargs, words in (({"num_clusters": 50}, "num_clusters=50 exceeds num_items=40"),
                        ({"affinity": 1.5}, "affinity=1.5 must lie in [0, 1]"),
                        ({"zipf_a": -1.0}, "zipf_a=-1.0 must be >= 0")):
    with pytest.raises(DataError, match=r"Fix: .*synthetic_") as e:
      synthetic.synthetic(30, 40, 700, **kwargs)
    assert words in str(e.value)
  with pytest.raises(DataError, match="num_users=0 must be a positive integer"):
    synthetic.synthetic(0, 40, 700)


def test_loaders_registered():
  for name in ("ml-1m", "ml-20m", "ml-25m", "ml-latest", "synthetic"):
    assert name in sources.LOADERS
