"""Export retrieval results as training/serving input for a ranking model.

For each query (an interaction of the chosen split) the top-N retrieved
candidates are written, one CSV row each, joined with every query feature and
every candidate feature, plus the retrieval rank and score and a ``label``
column (1 when the candidate is the movie the user actually rated in that
interaction, with its ``user_rating``). This is the input a ranking stage
trains on: the retrieval stage's own candidates, not random pairs.
"""

from __future__ import annotations

import csv
import pathlib

import numpy as np

from twotower_jax import serving
from twotower_jax.data import sources

QUERY_COLUMNS = ("user_id", "raw_user_age", "bucketized_user_age", "user_gender",
                 "user_occupation_text", "user_zip_code", "timestamp")


def export_ranker(config, serving_dir: pathlib.Path, out: pathlib.Path, *, split: str = "test",
                  top_n: int = 100, max_queries: int = 0, exclude_rated: bool = False,
                  batch_size: int = 1024) -> int:
  """Writes ``out`` (CSV with a header); returns the number of candidate rows written."""
  rec = serving.load(serving_dir)
  dataset = sources.load_dataset(config.data)
  train, test = sources.train_test(config.data, dataset, int(config.seed))
  cols = test if split == "test" else train
  n = len(cols["user_id"])
  if max_queries:
    n = min(n, max_queries)
  qcols = [c for c in QUERY_COLUMNS if c in cols]
  header = (["query_index"] + qcols + ["rated_movie_id", "user_rating", "rank", "movie_id",
                                       "movie_title", "movie_genres", "retrieval_score", "label"])
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = 0
  with open(out, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      feats = {c: cols[c][start:stop] for c in qcols}
      exclude = rec.rated(feats["user_id"]) if exclude_rated else None
      r = rec.recommend(feats, top_n, exclude_ids=exclude)
      for i in range(stop - start):
        qvals = [cols[c][start + i].item() for c in qcols]
        true_id = int(cols["movie_id"][start + i])
        rating = cols["user_rating"][start + i].item() if "user_rating" in cols else ""
        for rank in range(top_n):
          mid = int(r.movie_id[i, rank])
          if mid < 0:
            break
          w.writerow([start + i] + qvals + [
              true_id, rating, rank + 1, mid, r.movie_title[i, rank],
              "|".join(r.genres[i][rank]), f"{float(r.score[i, rank]):.6g}",
              int(mid == true_id)])
          rows += 1
  return rows


def read_ranker_csv(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads an exported file back into numpy columns (strings; cast as needed)."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = next(reader)
    body = list(reader)
  return {h: np.asarray([row[j] for row in body]) for j, h in enumerate(header)}
