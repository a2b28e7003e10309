"""MovieLens 1M through the feature spec: small files in its format train, evaluate and serve
with the notebook's features (the adapter yields the same columns as the 100K source)."""

import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import serving
from twotower_jax import train

GENRES = ("Action", "Comedy", "Drama", "Sci-Fi", "Film-Noir")
AGES = (1, 18, 25, 35, 45, 50, 56)


def write_ml1m(folder, num_users=60, num_movies=40, num_ratings=1500, seed=0):
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True)
  movies = [f"{m}::Movie {m} ({1980 + m % 20})::"
            + "|".join(sorted(set(rng.choice(GENRES, rng.integers(1, 3)))))
            for m in range(1, num_movies + 1)]
  users = [f"{u}::{'MF'[u % 2]}::{AGES[u % len(AGES)]}::{u % 21}::{10000 + u}"
           for u in range(1, num_users + 1)]
  # Users prefer the movies of their own parity, so the features carry signal.
  user_R = rng.integers(1, num_users + 1, num_ratings)
  movie_R = (rng.integers(0, num_movies // 2, num_ratings) * 2 + user_R % 2) % num_movies + 1
  pairs = np.unique(np.stack([user_R, movie_R], 1), axis=0)
  ratings = [f"{u}::{m}::{1 + (u + m) % 5}::{978300000 + 97 * i}"
             for i, (u, m) in enumerate(pairs)]
  for name, lines in (("movies.dat", movies), ("users.dat", users), ("ratings.dat", ratings)):
    (folder / name).write_bytes("".join(line + "\n" for line in lines).encode("latin-1"))
  return folder, len(pairs)


def test_ml1m_trains_and_serves_through_the_spec(tmp_path):
  folder, n = write_ml1m(tmp_path / "ml-1m")
  cfg = config_lib.load_config_file("configs/tiny.py", "all")
  cfg.data.source, cfg.data.dir = "ml-1m", str(folder)
  cfg.train.num_epochs, cfg.eval.ks = 3, (1, 5, 10, 20)
  config_lib.validate(cfg)
  m = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert m["source"] == "ml-1m" and m["num_train"] + m["num_test"] == n
  assert m["num_candidates"] == 40
  rec = serving.load(tmp_path / "run")
  assert set(rec.query_columns()) == {"user_id", "raw_user_age", "user_gender",
                                      "user_occupation_text", "timestamp"}
  r = rec.recommend(rec.query(3), k=5)
  assert r.valid.all() and all(t.startswith("Movie ") for t in r.title[0])
  genres = {g for row in r.columns["movie_genres"][0] for g in row.split("|")}
  assert genres <= set(GENRES) and genres
