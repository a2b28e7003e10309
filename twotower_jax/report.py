"""Summary of several runs: mean ± std over seeds per (config, split), baselines beside.

Reads `<workdir>/metrics.json` as written by training: `config`, `split`, `seed`,
model metrics `<protocol>/<metric>` and baseline metrics
`<baseline>/<protocol>/<metric>` (see `metrics.evaluate_protocols`). The tables and the
plot show the protocols the runs hold (`exclude_history` only where it was evaluated).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

from twotower_jax import baselines
from twotower_jax import metrics as metrics_lib

SOURCES = ("model",) + baselines.BASELINES
_KEY_RE = re.compile(rf"^(?:({'|'.join(baselines.BASELINES)})/)?"
                     rf"({'|'.join(metrics_lib.PROTOCOLS)})/(.+)$")


def _load(workdir: str) -> dict:
  path = pathlib.Path(workdir) / "metrics.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist; train that run first or leave {workdir} "
                            "out of the report.")
  try:
    run = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); rerun that training run.") from e
  missing = [k for k in ("config", "split", "seed") if k not in run]
  if missing:
    raise ValueError(f"{path} lacks {missing}; it must hold config, split and seed besides the "
                     "metrics (written by training).")
  return run


def _split_metrics(run: dict) -> dict[str, dict[str, float]]:
  """{source: {"<protocol>/<metric>": value}} from one run's flat metrics."""
  out: dict[str, dict[str, float]] = {}
  for key, val in run.items():
    m = _KEY_RE.match(key)
    if m is None or isinstance(val, bool) or not isinstance(val, (int, float)):
      continue
    out.setdefault(m.group(1) or "model", {})[f"{m.group(2)}/{m.group(3)}"] = float(val)
  return out


def _fmt(mean: float, std: float, n: int, n_group: int) -> str:
  f = ".1f" if abs(mean) >= 10 else ".4f"
  s = f"{mean:{f}}" if math.isnan(std) else f"{mean:{f}} ± {std:{f}}"
  return s if n == n_group else f"{s} (n={n})"


def _default_metrics(keys: set[str]) -> list[str]:
  ks = sorted({int(m.group(1)) for k in keys if (m := re.search(r"/hr_(\d+)$", k))})
  if not ks:
    return ["mrr"]
  kmax = ks[-1]
  return ([f"hr_{k}" for k in ks] + [f"ndcg_{k}" for k in ks]
          + ["mrr", f"recall_{kmax}", f"coverage_{kmax}", f"avg_pop_{kmax}"])


def write_report(workdirs: Sequence[str], out_dir: str, *,
                 metrics: Sequence[str] | None = None) -> tuple[str, str]:
  """Groups runs by (config, split), aggregates seeds, writes report.png and report.md.

  Args:
    workdirs: run directories, each holding a metrics.json.
    out_dir: where report.png and report.md go (created if needed).
    metrics: metric names for the table (e.g. "hr_10", "mrr"); default: hr_k and
      ndcg_k for every k found, mrr, and recall/coverage/avg_pop at the largest k.

  Returns:
    (png_path, markdown_table). Cells are mean ± sample std (ddof=1) over the
    seeds of a group; a single seed shows the mean alone; "(n=...)" marks a source
    present in fewer runs than the group has; "–" marks a source not evaluated.
  """
  if not workdirs:
    raise ValueError("write_report got no workdirs; pass the run directories to summarise.")
  groups: dict[tuple[str, str], list[tuple[str, dict]]] = {}
  for wd in workdirs:
    run = _load(wd)
    key = (str(run["config"]), str(run["split"]))
    for other_wd, other in groups.get(key, []):
      if other["seed"] == run["seed"]:
        raise ValueError(f"{other_wd} and {wd} are both config={key[0]} split={key[1]} "
                         f"seed={run['seed']}; pass each run once.")
    groups.setdefault(key, []).append((wd, run))

  # agg[(config, split)][source] = (aggregated dict, number of runs)
  agg: dict[tuple[str, str], dict[str, tuple[dict, int]]] = {}
  all_keys: set[str] = set()
  for key, runs in sorted(groups.items()):
    per_source: dict[str, list[dict]] = {}
    for _, run in runs:
      for source, vals in _split_metrics(run).items():
        per_source.setdefault(source, []).append(vals)
    if "model" not in per_source:
      raise ValueError(f"The runs of config={key[0]} split={key[1]} hold no model metrics "
                       "(<protocol>/<metric> keys). Pass the workdirs of finished training "
                       "runs (each with a metrics.json written by evaluation).")
    agg[key] = {s: (metrics_lib.aggregate_seeds(v), len(v)) for s, v in per_source.items()}
    for vals in per_source.values():
      all_keys.update(vals[0])

  present = {k.split("/", 1)[1] for k in all_keys}
  protocols = _protocols_in(all_keys)
  if metrics is None:
    names = [m for m in _default_metrics(all_keys) if m in present]
  else:
    names = list(metrics)
    unknown = [m for m in names if m not in present]
    if unknown:
      raise ValueError(f"metrics {unknown} are in none of the runs; choose from "
                       f"{sorted(present)}.")

  header = ["config", "split", "seeds", "protocol", "metric", *SOURCES]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for (config, split), by_source in agg.items():
    n_group = len(groups[(config, split)])
    for protocol in protocols:
      for name in names:
        cells = []
        for source in SOURCES:
          a, n = by_source.get(source, ({}, 0))
          mk = f"{protocol}/{name}"
          cells.append(_fmt(a[f"{mk}/mean"], a[f"{mk}/std"], n, n_group)
                       if f"{mk}/mean" in a else "–")
        lines.append("| " + " | ".join([config, split, str(n_group), protocol, name, *cells])
                     + " |")
  table = "\n".join(lines) + "\n"

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.md").write_text(table)
  png = out / "report.png"
  _plot(agg, png, protocols)
  return str(png), table


def _protocols_in(keys) -> list[str]:
  """The protocols (in `metrics.PROTOCOLS` order) of which ``keys`` hold a metric."""
  return [p for p in metrics_lib.PROTOCOLS if any(k.startswith(p + "/") for k in keys)]


def _plot(agg, png: pathlib.Path, protocols: Sequence[str]) -> None:
  """Bar chart of HR@k per source: one row of panels per (config, split), one column per protocol."""
  rows = list(agg)
  fig = Figure(figsize=(6 * len(protocols), 3.5 * len(rows)), layout="constrained")
  axes = fig.subplots(len(rows), len(protocols), squeeze=False)
  for r, key in enumerate(rows):
    by_source = agg[key]
    for c, protocol in enumerate(protocols):
      ax = axes[r][c]
      hr_keys = {int(m.group(1)) for a, _ in by_source.values() for k in a
                 if (m := re.fullmatch(rf"{protocol}/hr_(\d+)/mean", k))}
      ks = sorted(hr_keys)
      sources = [s for s in SOURCES if s in by_source]
      width = 0.8 / max(1, len(sources))
      x = np.arange(len(ks))
      for i, source in enumerate(sources):
        a, _ = by_source[source]
        mean = [a.get(f"{protocol}/hr_{k}/mean", np.nan) for k in ks]
        std = np.nan_to_num([a.get(f"{protocol}/hr_{k}/std", np.nan) for k in ks])
        ax.bar(x + (i - (len(sources) - 1) / 2) * width, mean, width, yerr=std, capsize=2,
               label=source)
      ax.set_xticks(x, [f"@{k}" for k in ks])
      ax.set_ylabel("HR@k")
      ax.set_title(f"{key[0]} / {key[1]} — {protocol}")
      ax.legend(fontsize="small")
  fig.savefig(png, dpi=100)


_SUMMARY_TITLES = {
    "include_seen": "top-k accuracy (TFRS protocol, seen items kept)",
    "exclude_seen": "top-k accuracy, the user's training items excluded",
    "exclude_history": "top-k accuracy, each interaction's online history excluded "
                       "(training items and earlier test items)",
}


def print_summary(metrics) -> None:
  """Top-k accuracy of the model beside the baselines, under each protocol it holds."""
  ks = (1, 5, 10, 50, 100)
  names = [("model", "")] + [(b, f"{b}/") for b in ("popularity", "itemcf", "ease")
                             if f"{b}/include_seen/hr_1" in metrics]
  for proto in _protocols_in(metrics):
    title = _SUMMARY_TITLES[proto]
    print(f"\n{title}\n" + " " * 12 + "".join(f"{'top-' + str(k):>9}" for k in ks))
    for name, pre in names:
      vals = [metrics.get(f"{pre}{proto}/hr_{k}") for k in ks]
      print(f"{name:<12}" + "".join(f"{v:9.4f}" if v is not None else f"{'-':>9}"
                                    for v in vals))
  if metrics.get("examples_per_second"):
    print(f"\ntrain {metrics['train_seconds']:.1f} s ({metrics['examples_per_second']:,.0f} "
          f"examples/s on {metrics['devices']} {metrics['backend']} device(s)), "
          f"eval {metrics['eval_seconds']:.1f} s")
