"""Popularity heuristics on the 90/10 temporal split: how far can recency and demographics go?

    TWOTOWER_DATA_DIR=../shared/data/ml-100k python benchmarks/temporal_ceiling.py [WORKDIR ...]

Top-100 hit rate (include_seen) of the most popular movies counted over the last days of
training, recency-weighted popularity, and popularity within demographic segments blended
with the global recency-weighted one. The last line is an upper bound, not a method: the
100 movies most rated in the test period itself. No ranking that is the same for every query
can do better, since its hit rate is the share of test rows whose movie is in its 100.

Given the workdirs of runs of `configs/demographic.py` on this split
(`--config.data.split=temporal --config.data.test_fraction=0.1`), it also scores each
model and the ensemble of all of them (per-query standardized scores, summed).
"""

import pathlib
import sys

import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import serving
from twotower_jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
DAY = 86400.0


def hit_rate(scores_M: np.ndarray, test_movies: np.ndarray, k: int = 100) -> float:
  top = np.argsort(-scores_M, kind="stable")[:k]
  return float(np.isin(test_movies, top).mean())


def model_scores(workdir: str, test: dict, m: int) -> np.ndarray:
  """Scores [Q, m] of a trained run's serving directory, columns indexed by movie id (NaN
  for ids outside the catalogue)."""
  rec = serving.load(pathlib.Path(workdir) / "serving")
  # The columns the model's query features read; the index's ids are catalogue rows, whose
  # item keys (movie ids) are rec.item_ids_N.
  q_QxD = rec.embed({c: test[c] for c in rec.query_columns() if c in test})
  s_QxN = q_QxD @ np.asarray(rec.index.embeddings_NxD, np.float32).T
  out_QxM = np.full((s_QxN.shape[0], m), np.nan, np.float32)
  out_QxM[:, np.asarray(rec.item_ids_N)[np.asarray(rec.index.ids_N)]] = s_QxN
  return out_QxM


def hit_rate_per_query(s_QxM: np.ndarray, test_movies: np.ndarray, k: int = 100) -> float:
  """Share of rows whose test movie is among the row's k best scores (NaN sorts last)."""
  top_QxK = np.argpartition(-s_QxM, k, axis=1)[:, :k]
  return float((top_QxK == test_movies[:, None]).any(1).mean())


def main(workdirs: list[str]):
  cfg = config_lib.load_config_file(REPO / "configs" / "demographic.py")
  cfg.data.split, cfg.data.test_fraction = "temporal", 0.1
  ds = sources.load_dataset(cfg.data)
  train, test = sources.train_test(cfg.data, ds, cfg.seed)
  t, movie = train["timestamp"].astype(np.float64), train["movie_id"]
  t_max, m = t.max(), int(max(movie.max(), test["movie_id"].max())) + 1
  new_rows = ~np.isin(test["user_id"], train["user_id"])
  print(f"train {len(movie)}, test {len(test['movie_id'])} over "
        f"{(test['timestamp'].max() - t_max) / DAY:.0f} days, "
        f"{new_rows.mean():.1%} of test rows from users unseen in training")
  print("| heuristic | top-100 hit rate |\n|---|---|")
  print(f"| popularity, all training | {hit_rate(np.bincount(movie, minlength=m), test['movie_id']):.4f} |")
  for days in (14, 30, 60):
    recent = t >= t_max - days * DAY
    print(f"| popularity, last {days} days | "
          f"{hit_rate(np.bincount(movie[recent], minlength=m), test['movie_id']):.4f} |")
  for half_life in (7, 14, 30, 60):
    w = np.exp2(-(t_max - t) / (half_life * DAY))
    print(f"| popularity, half-life {half_life} days | "
          f"{hit_rate(np.bincount(movie, w, minlength=m), test['movie_id']):.4f} |")
  w = np.exp2(-(t_max - t) / (14 * DAY))
  g = np.bincount(movie, w, minlength=m)
  g /= g.sum()
  def age(d):
    return np.digitize(d["raw_user_age"], [18, 25, 35, 45, 56])
  segments = {"gender": lambda d: d["user_gender"].astype(int), "age group": age,
              "occupation": lambda d: d["user_occupation_label"],
              "gender x age group": lambda d: age(d) * 2 + d["user_gender"].astype(int)}
  for name, key in segments.items():
    k_tr, k_te = key(train), key(test)
    for lam in (0.3, 0.5):
      hits = 0
      for k in np.unique(k_te):
        s = np.bincount(movie[k_tr == k], w[k_tr == k], minlength=m)
        s /= max(s.sum(), 1e-12)
        rows = k_te == k
        hits += hit_rate(lam * s + (1 - lam) * g, test["movie_id"][rows]) * rows.sum()
      print(f"| {name} segments ({lam:.0%}) + global, half-life 14 days | "
            f"{hits / len(k_te):.4f} |")
  oracle = hit_rate(np.bincount(test["movie_id"], minlength=m), test["movie_id"])
  print(f"| bound: the test period's own 100 most-rated movies | {oracle:.4f} |")
  total_QxM = None
  for workdir in workdirs:
    s_QxM = model_scores(workdir, test, m)
    print(f"| model {workdir} | {hit_rate_per_query(s_QxM, test['movie_id']):.4f} |")
    z_QxM = (s_QxM - np.nanmean(s_QxM, 1, keepdims=True)) / np.nanstd(s_QxM, 1, keepdims=True)
    total_QxM = z_QxM if total_QxM is None else total_QxM + z_QxM
  if len(workdirs) > 1:
    print(f"| ensemble of the {len(workdirs)} models | "
          f"{hit_rate_per_query(total_QxM, test['movie_id']):.4f} |")


if __name__ == "__main__":
  main(sys.argv[1:])
