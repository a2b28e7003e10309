"""EASE's lambda and recency tuned on validation, then scored once on test (exclude_history).

    TWOTOWER_DATA_DIR=../shared/data/ml-100k python benchmarks/tune_ease.py \
        --config configs/default.py:temporal
    TWOTOWER_DATA_DIR=../shared/data/ml-100k python benchmarks/tune_ease.py \
        --config configs/default.py --config.data.split=user_temporal \
        --config.data.test_fraction=0.2
    TWOTOWER_DATA_DIR=../shared/data/ml-100k python benchmarks/tune_ease.py \
        --config configs/default.py

Validation is carved out of the TRAINING interactions (test is never looked at while
choosing): the latest 10% by time for temporal splits (`temporal`; each user's latest 10%
for `user_temporal`; each user's latest training interaction for `leave_last_out`), a
seeded random 10% otherwise. Every (ease_lambda, ease_recency) cell of the grid is scored on
validation under `exclude_history` (each validation interaction ranked against every item
but its online history: the remaining training items and the earlier validation items) and
printed; the pair with the best HR@10 is chosen. Only then is test scored, once: popularity
with the history excluded, item-CF over the online history, EASE (the best lambda without
recency weighting) and EASE + recency (the chosen pair), HR@10 and HR@100 under
`exclude_history`. Only the config's `data` section and seed are read.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from twotower_jax import baselines
from twotower_jax import config as config_lib
from twotower_jax import history
from twotower_jax import input_pipeline
from twotower_jax import metrics
from twotower_jax.data import sources
from twotower_jax.data import splits

LAMBDAS = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
RECENCIES = (1.0, 0.99, 0.97, 0.95, 0.9)
SELECT = "exclude_history/hr_10"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_VALID_FRACTION = flags.DEFINE_float("valid_fraction", 0.1,
                                     "Share of the training interactions held out.")
_JSON = flags.DEFINE_string("json", "", "Also write the grid and test figures here.")
# The split the validation carve follows for each train/test split (any other: random).
_VALID_KIND = {"temporal": "temporal", "user_temporal": "user_temporal",
               "leave_last_out": "leave_last_out"}


class Split:
  """One train/evaluation split as catalogue rows, user indices and times."""

  def __init__(self, train_user, train_item, train_time, eval_user, eval_item, eval_time,
               num_users: int, num_items: int):
    self.train_user, self.train_item, self.train_time = train_user, train_item, train_time
    self.eval_user, self.eval_item, self.eval_time = eval_user, eval_item, eval_time
    self.num_users, self.num_items = num_users, num_items
    self.counts_N = np.bincount(train_item, minlength=num_items)
    self.seen_indptr, self.seen_items = metrics.seen_csr(train_user, train_item, num_users)
    self.h_indptr, self.h_items = history.online_history(
        train_user, train_item, eval_user, eval_item,
        np.zeros(len(eval_user)) if eval_time is None else eval_time, num_users)

  def score(self, score_fn, history_score_fn=None, ks=(10, 100)) -> dict[str, float]:
    """exclude_history metrics of a score function on this split."""
    return metrics.evaluate_protocols(
        self.eval_item, self.eval_user, self.seen_indptr, self.seen_items, self.counts_N,
        ks=ks, score_fn=score_fn, history_indptr=self.h_indptr, history_items=self.h_items,
        history_score_fn=history_score_fn, protocols=("exclude_history",))

  def ease(self, b_NxN: np.ndarray, recency: float) -> dict[str, float]:
    seen = baselines.training_histories(self.train_user, self.train_item, self.num_users,
                                        train_time=self.train_time, recency=recency)
    online = baselines.online_histories(
        self.train_user, self.train_item, self.eval_user, self.eval_item, self.num_users,
        train_time=self.train_time, test_time=self.eval_time, recency=recency)
    return self.score(*baselines.ease_score_fns(b_NxN, self.counts_N, seen, online))


def load(cfg) -> tuple[Split, Split, dict]:
  """(validation split, test split, sizes) of the config's data."""
  ds = sources.load_dataset(cfg.data)
  train, test = sources.train_test(cfg.data, ds, cfg.seed)
  kind = _VALID_KIND.get(cfg.data.split, "random")
  inner_idx, valid_idx = splits.split_indices(
      train, kind, seed=cfg.seed + 1, test_fraction=_VALID_FRACTION.value,
      user_key=ds.user_key, time_key=ds.time_key)
  item_ids = ds.movies[ds.item_key]
  train_item = input_pipeline.item_index(item_ids, train[ds.item_key], "training")
  test_item = input_pipeline.item_index(item_ids, test[ds.item_key], "test")
  train_user, test_user, num_users = input_pipeline.user_index(train[ds.user_key],
                                                               test[ds.user_key])
  if ds.time_key:
    train_time = np.asarray(train[ds.time_key], np.float64)
    test_time = np.asarray(test[ds.time_key], np.float64)
  else:
    train_time = test_time = None
  n = len(item_ids)

  def part(t, idx):
    return None if t is None else t[idx]

  valid = Split(train_user[inner_idx], train_item[inner_idx], part(train_time, inner_idx),
                train_user[valid_idx], train_item[valid_idx], part(train_time, valid_idx),
                num_users, n)
  test_split = Split(train_user, train_item, train_time, test_user, test_item, test_time,
                     num_users, n)
  sizes = {"train": len(train_item), "inner_train": len(inner_idx), "valid": len(valid_idx),
           "test": len(test_item), "items": n, "users": num_users, "valid_kind": kind}
  return valid, test_split, sizes


def main(argv):
  del argv
  cfg = _CONFIG.value
  if cfg is None:
    sys.exit("Pass --config, e.g. --config configs/default.py:temporal")
  config_lib.validate(cfg)
  t0 = time.perf_counter()
  valid, test, sizes = load(cfg)
  print(f"config {cfg.name}, split {cfg.data.split} (test_fraction {cfg.data.test_fraction}), "
        f"seed {cfg.seed}: {sizes['train']} train / {sizes['test']} test interactions, "
        f"{sizes['items']} items; validation: {sizes['valid']} of the training interactions "
        f"({sizes['valid_kind']} carve), {sizes['inner_train']} left to fit on")

  print(f"\nvalidation {SELECT} (HR@100 in brackets)")
  print(f"{'lambda':>8} | " + " | ".join(f"rec {r:<13}" for r in RECENCIES))
  grid = {}
  for lam in LAMBDAS:
    b_NxN = baselines.ease_matrix(valid.train_user, valid.train_item, valid.num_users,
                                  valid.num_items, lam)
    cells = []
    for r in RECENCIES:
      m = valid.ease(b_NxN, r)
      grid[(lam, r)] = (m[SELECT], m["exclude_history/hr_100"])
      cells.append(f"{m[SELECT]:.4f} ({m['exclude_history/hr_100']:.4f})")
    print(f"{lam:8g} | " + " | ".join(f"{c:<17}" for c in cells), flush=True)
  # Best HR@10; equal values: the smaller lambda, then the weaker recency (grid order).
  lam_best, rec_best = max(grid, key=lambda c: grid[c][0])
  lam_plain = max(LAMBDAS, key=lambda lam: grid[(lam, 1.0)][0])
  print(f"chosen: ease_lambda={lam_best:g}, ease_recency={rec_best:g} "
        f"(validation HR@10 {grid[(lam_best, rec_best)][0]:.4f}); without recency "
        f"ease_lambda={lam_plain:g} (validation HR@10 {grid[(lam_plain, 1.0)][0]:.4f})")

  # Test, scored once with the chosen settings.
  itemcf_fn, itemcf_online = baselines.itemcf_score_fns(
      test.train_user, test.train_item, test.num_users, test.num_items,
      online=baselines.Histories(test.h_indptr, test.h_items))
  results = {
      "popularity (history excluded)": test.score(baselines.popularity_scores(test.counts_N)),
      "item-CF (online history)": test.score(itemcf_fn, itemcf_online),
  }
  b_plain = baselines.ease_matrix(test.train_user, test.train_item, test.num_users,
                                  test.num_items, lam_plain)
  results[f"EASE (lambda {lam_plain:g})"] = test.ease(b_plain, 1.0)
  b_best = b_plain if lam_best == lam_plain else baselines.ease_matrix(
      test.train_user, test.train_item, test.num_users, test.num_items, lam_best)
  results[f"EASE + recency (lambda {lam_best:g}, recency {rec_best:g})"] = test.ease(
      b_best, rec_best)
  print("\ntest, exclude_history\n| baseline | HR@10 | HR@100 |\n|---|---|---|")
  for name, m in results.items():
    print(f"| {name} | {m['exclude_history/hr_10']:.4f} | {m['exclude_history/hr_100']:.4f} |")
  print(f"\n{time.perf_counter() - t0:.0f} s")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"config": cfg.name, "split": cfg.data.split,
                 "test_fraction": cfg.data.test_fraction, "sizes": sizes,
                 "grid": [{"ease_lambda": lam, "ease_recency": r, "hr_10": v[0], "hr_100": v[1]}
                          for (lam, r), v in grid.items()],
                 "chosen": {"ease_lambda": lam_best, "ease_recency": rec_best},
                 "chosen_without_recency": {"ease_lambda": lam_plain},
                 "test": {name: {"hr_10": m["exclude_history/hr_10"],
                                 "hr_100": m["exclude_history/hr_100"]}
                          for name, m in results.items()}}, f, indent=1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
