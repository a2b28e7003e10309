"""Compact quality table (mean ± std over seeds) from quality.sh's workdirs.

  python benchmarks/summarize.py runs/quality
"""

import collections
import json
import pathlib
import sys

import numpy as np

KEYS = ("hr_10", "hr_100", "ndcg_10", "mrr")


def main(root: str) -> None:
  groups = collections.defaultdict(list)
  for f in sorted(pathlib.Path(root).glob("*/metrics.json")):
    m = json.loads(f.read_text())
    groups[(m["config"], m["split"])].append(m)
  print("| config | split | seeds | protocol | model | " + " | ".join(
      f"{b}" for b in ("popularity", "itemcf")) + " |")
  print("|---|---|---|---|---|---|---|")
  for (cfg, split), runs in groups.items():
    for proto in ("include_seen", "exclude_seen"):
      cells = []
      for prefix in ("", "popularity/", "itemcf/"):
        parts = []
        for k in KEYS:
          v = np.array([r[f"{prefix}{proto}/{k}"] for r in runs])
          parts.append(f"{k} {v.mean():.4f}±{v.std(ddof=1) if len(v) > 1 else 0:.4f}")
        cells.append("<br>".join(parts))
      print(f"| {cfg} | {split} | {len(runs)} | {proto} | " + " | ".join(cells) + " |")
  print()
  print("| config | split | train s (mean) | eval s (mean) |")
  print("|---|---|---|---|")
  for (cfg, split), runs in groups.items():
    print(f"| {cfg} | {split} | {np.mean([r['train_seconds'] for r in runs]):.1f} | "
          f"{np.mean([r['eval_seconds'] for r in runs]):.1f} |")


if __name__ == "__main__":
  main(sys.argv[1])
