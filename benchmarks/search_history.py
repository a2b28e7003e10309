"""A hyper-parameter search for the history model, chosen on validation only.

Each variant is `configs/history.py` (or ``--config``) plus a few overrides, trained once
(one seed) with a validation carve-out of training (``data.validation_fraction=0.1``: the
latest 10% for temporal splits, each user's latest 10% for ``user_temporal``) and early
stopping on validation ``exclude_history/hr_100``. Nothing here reads a test figure: the
table and the JSON hold the validation values only (``best_validation/...`` of each run's
metrics.json, and, when ``eval.blend_ease_weights`` is set, the validation figures of the
model alone and of its blends with EASE: ``validation_blend/<w>/...``).

    TWOTOWER_DATA_DIR=../shared/data/ml-100k python benchmarks/search_history.py \
        --split=temporal --grid=one_at_a_time --out=benchmarks/results/search_temporal.json
    python benchmarks/search_history.py --split=user_temporal --grid=one_at_a_time ...
    python benchmarks/search_history.py --split=temporal --variants='a=k1=v1,k2=v2;b=k3=v3'

Every run is a subprocess (``python -m twotower_jax.main``) in ``--workdir_root/<split>/<name>``;
a finished run is reused (its workdir is only rerun when missing), so the script can be
stopped and started again.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# split -> the flags that select it.
SPLITS = {
    "temporal": ["--config.data.split=temporal", "--config.data.test_fraction=0.1"],
    "user_temporal": ["--config.data.split=user_temporal", "--config.data.test_fraction=0.2"],
    "random": ["--config.data.split=random", "--config.data.test_fraction=0.2"],
}
# The blend's EASE per split: lambda and recency as benchmarks/tune_ease.py chose them on
# a validation carve-out of training (benchmarks/results/tune_ease_<split>.json).
SPLIT_EASE = {
    "temporal": ["--config.eval.ease_lambda=1000", "--config.eval.ease_recency=0.9"],
    "user_temporal": ["--config.eval.ease_lambda=500", "--config.eval.ease_recency=0.9"],
    "random": ["--config.eval.ease_lambda=200", "--config.eval.ease_recency=1.0"],
}
# Validation carve-out and early stopping, the same for every variant.
COMMON = [
    "--config.data.validation_fraction=0.1", "--config.train.patience=2",
    "--config.train.early_stopping_metric=exclude_history/hr_100",
    "--config.train.num_epochs=20", "--config.eval.baselines=False",
    "--config.train.progress=False", "--config.train.checkpoint_every_steps=100000",
    "--config.eval.blend_ease_weights=(0.0,0.25,0.5,0.75)",
]
H = "features.query.history"
# Named variants: one change at a time against configs/history.py (mean pooling, L 50,
# 64 dimensions, MLP (128, 64), logQ counts, in-batch negatives, temperature 1, Adam 2e-3,
# batch 1,024).
GRIDS = {
    "one_at_a_time": {
        "base": {},
        "attention": {f"{H}.encoder": "attention"},
        "L20": {f"{H}.max_len": 20},
        "L100": {f"{H}.max_len": 100},
        "dim32": {f"{H}.dim": 32, "features.candidate.movie.dim": 32},
        "dim128": {f"{H}.dim": 128, "features.candidate.movie.dim": 128},
        "mlp256x128": {"model.mlp": "(256,128)"},
        "mlp128": {"model.mlp": "(128,)"},
        "no_logq": {"loss.logq": "none"},
        "temp0.5": {"model.temperature": 0.5},
        "l2norm_temp0.1": {"model.l2_normalize": True, "model.temperature": 0.1},
        "hard_neg64": {"loss.num_hard_negatives": 64},
        "mixed_neg1024": {"loss.num_uniform_negatives": 1024},
        "lr0.005": {"optimizer.learning_rate": 0.005},
        "batch512": {"train.batch_size": 512},
    },
}


def parse_variants(text: str) -> dict[str, dict[str, str]]:
  """'name=k1=v1,k2=v2;name2=...' -> {name: {key: value}} (values as the CLI takes them)."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    name, _, rest = part.partition("=")
    pairs = {}
    for kv in filter(None, rest.split("|")):
      k, _, v = kv.partition("=")
      if not k or not _:
        raise SystemExit(f"--variants: {kv!r} in {part!r} is not key=value (separate pairs "
                         "with '|', variants with ';').")
      pairs[k] = v
    out[name] = pairs
  return out


def run_variant(config: str, split: str, name: str, overrides: dict, workdir_root: pathlib.Path,
                seed: int, log_dir: pathlib.Path, test: bool = False) -> dict:
  """Trains one variant (or reuses its finished workdir); returns its metrics.json. ``test``:
  the baselines are scored too (the test phase)."""
  workdir = workdir_root / split / name / f"{'test-' if test else ''}seed{seed}"
  common = [f for f in COMMON if not (test and f.startswith("--config.eval.baselines"))]
  metrics_file = workdir / "metrics.json"
  if not metrics_file.exists():
    overrides = dict(overrides)
    config = overrides.pop("config", config)  # a variant may name its own config file
    cmd = [sys.executable, "-m", "twotower_jax.main", f"--config={config}",
           f"--workdir={workdir}", f"--config.seed={seed}", *SPLITS[split], *SPLIT_EASE[split], *common,
           *[f"--config.{k}={v}" for k, v in overrides.items()]]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{split}_{name}_{'test-' if test else ''}seed{seed}.log"
    t0 = time.time()
    with open(log, "w") as f:
      rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0 or not metrics_file.exists():
      print(f"{name}: failed (exit {rc}); see {log}", flush=True)
      return {"failed": True, "log": str(log)}
    print(f"{name}: {time.time() - t0:.0f} s", flush=True)
  return json.loads(metrics_file.read_text())


def validation_row(m: dict) -> dict:
  """The validation figures of one run (never a test figure)."""
  if m.get("failed"):
    return {"failed": True}
  row = {"valid_hr_100": m.get("best_validation/exclude_history/hr_100"),
         "best_step": m.get("best_step"), "steps": m.get("steps"),
         "train_seconds": m.get("train_seconds")}
  blends = {k.split("/")[1]: None for k in m if k.startswith("validation_blend/")}
  for w in sorted(blends, key=float):
    row[f"blend_{w}_hr_10"] = m.get(f"validation_blend/{w}/exclude_history/hr_10")
    row[f"blend_{w}_hr_100"] = m.get(f"validation_blend/{w}/exclude_history/hr_100")
  return row


TEST_KEYS = {  # the test phase's columns: the model, its blend, the baselines of the run
    "model": "exclude_history/{}", "blend": "blend/exclude_history/{}",
    "popularity": "popularity/exclude_history/{}", "itemcf": "itemcf/exclude_history/{}",
    "ease": "ease/exclude_history/{}",
}


def test_rows(runs: list[dict]) -> dict:
  """Mean and std over seeds of each test column's HR@10 and HR@100."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {"seeds": len(runs), "blend_weights": [m.get("blend/weight") for m in runs],
         "best_steps": [m.get("best_step") for m in runs],
         "steps": [m.get("steps") for m in runs]}
  for col, key in TEST_KEYS.items():
    for k in ("hr_10", "hr_100"):
      vals = [m[key.format(k)] for m in runs if key.format(k) in m]
      if vals:
        out[f"{col}_{k}"] = [float(np.mean(vals)), float(np.std(vals))]
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/history.py")
  p.add_argument("--split", default="temporal", choices=sorted(SPLITS))
  p.add_argument("--grid", default="", choices=["", *GRIDS])
  p.add_argument("--variants", default="",
                 help="'name=key=value|key=value;name2=...' (keys under --config.)")
  p.add_argument("--only", default="", help="comma-separated variant names of the grid "
                 "(--variants are added to them)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--test_seeds", default="",
                 help="the test phase: e.g. 0,1,2 trains each variant once per seed (same "
                      "validation carve-out and early stopping, baselines on) and prints "
                      "its test figures; only for variants already chosen on validation")
  p.add_argument("--workdir_root", default="/tmp/search_history")
  p.add_argument("--out", default="")
  args = p.parse_args()
  if "TWOTOWER_DATA_DIR" not in os.environ:
    print("set TWOTOWER_DATA_DIR (e.g. ../shared/data/ml-100k)", file=sys.stderr)
  variants = dict(GRIDS.get(args.grid, {}))
  if args.only:
    variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
  variants.update(parse_variants(args.variants))
  if not variants:
    raise SystemExit("No variants: pass --grid and/or --variants.")
  root = pathlib.Path(args.workdir_root)
  if args.test_seeds:
    seeds = [int(x) for x in args.test_seeds.split(",")]
    results = {}
    for name, overrides in variants.items():
      runs = [run_variant(args.config, args.split, name, overrides, root, s, root / "logs",
                          test=True) for s in seeds]
      results[name] = {"overrides": overrides, **test_rows([m for m in runs
                                                            if not m.get("failed")])}
      if args.out:
        pathlib.Path(args.out).write_text(json.dumps(
            {"split": args.split, "config": args.config, "seeds": seeds, "common": COMMON,
             "phase": "test (variants chosen on validation)", "variants": results}, indent=1))
    print(f"\nsplit {args.split}, test (exclude_history HR@10 / HR@100), seeds {seeds}")
    for name, r in results.items():
      cols = [f"{c} {r[c + '_hr_10'][0]:.3f}±{r[c + '_hr_10'][1]:.3f} / "
              f"{r[c + '_hr_100'][0]:.3f}±{r[c + '_hr_100'][1]:.3f}"
              for c in TEST_KEYS if c + "_hr_10" in r]
      print(f"{name}: " + "; ".join(cols) + f"; blend weights {r['blend_weights']}")
    return
  rows = {}
  for name, overrides in variants.items():
    m = run_variant(args.config, args.split, name, overrides, root, args.seed, root / "logs")
    rows[name] = {"overrides": overrides, **validation_row(m)}
    if args.out:  # after every run, so a stopped search keeps what it has
      pathlib.Path(args.out).write_text(json.dumps(
          {"split": args.split, "config": args.config, "seed": args.seed, "common": COMMON,
           "selection": "validation exclude_history/hr_100 (early stopping and variant)",
           "variants": rows}, indent=1))
  keys = sorted({k for r in rows.values() for k in r if k.startswith("blend_")},
                key=lambda k: (float(k.split("_")[1]), k))
  print(f"\nsplit {args.split}, validation (exclude_history), seed {args.seed}")
  print(f"{'variant':18s} {'hr_100':>7s} {'step':>9s} " + " ".join(f"{k[6:]:>14s}" for k in keys))
  for name, r in sorted(rows.items(), key=lambda kv: -(kv[1].get("valid_hr_100") or 0)):
    if r.get("failed"):
      print(f"{name:18s} failed")
      continue
    print(f"{name:18s} {r['valid_hr_100']:7.4f} {r['best_step']:>4}/{r['steps']:<4} "
          + " ".join(f"{(r.get(k) or float('nan')):14.4f}" for k in keys))


if __name__ == "__main__":
  main()
