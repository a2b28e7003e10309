"""Your own data at scale: read, validate, fit encoders, encode and split a large table.

  python benchmarks/bench_data.py [--rows 10000000 --users 200000 --items 1000000]
      [--dir /tmp/bench_data] [--out results.json]

Writes (once, into --dir) a synthetic Parquet interactions table (user, item, ts; Zipf item
popularity) and an items table with a 5-word text column and a 1-3 value multi-hot column,
then measures, each in a fresh process (so peak RSS is its own):

* ``pyarrow_core``: pyarrow alone doing the core of the work — read both tables,
  dictionary-encode the user and item keys, ``index_in`` to join events to item rows,
  ``split_pattern`` + ``dictionary_encode`` of titles and tags: the limit to compare with;
* ``prepare_tables``: ``input_pipeline.prepare`` on those tables (source=tables: read,
  validate, split, fit every encoder on the training split, encode both towers);
* ``prepare_synthetic``: the in-memory synthetic source at the same size (generate, split,
  encode), the path large catalogues took before the tables source.

Prints one JSON line per measurement (seconds, peak RSS) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

WORDS = 5_000
TAGS = 50


def write_tables(folder: pathlib.Path, rows: int, users: int, items: int, seed: int = 0) -> None:
  """The interactions and items tables, as Parquet (vectorized; minutes only at 100M+)."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  item_R = (rng.zipf(1.1, rows) - 1) % items
  events = pa.table({
      "user": rng.integers(0, users, rows),
      "item": rng.permutation(items)[item_R],
      "ts": np.sort(1_600_000_000 + rng.integers(0, 3 * 365 * 86400, rows)),
  })
  pq.write_table(events, folder / "events.parquet")
  words = pa.array([f"w{i}" for i in range(WORDS)])
  title = pc.binary_join_element_wise(
      *[words.take(pa.array(rng.integers(0, WORDS, items))) for _ in range(5)], " ")
  tags = pa.array([f"t{i}" for i in range(TAGS)])
  n_tags = rng.integers(1, 4, items)
  parts = [pc.if_else(pa.array(n_tags > k), tags.take(pa.array(rng.integers(0, TAGS, items))),
                      pa.scalar(None, pa.string())) for k in range(3)]
  tag_col = pc.binary_join_element_wise(*parts, "|", null_handling="skip")
  pq.write_table(pa.table({"item": np.arange(items), "title": title, "tags": tag_col}),
                 folder / "items.parquet")


def pyarrow_core(folder: pathlib.Path) -> None:
  events = pq.read_table(folder / "events.parquet")
  items = pq.read_table(folder / "items.parquet")
  pc.dictionary_encode(events.column("user"))
  pc.dictionary_encode(events.column("item"))
  pc.index_in(events.column("item"), value_set=items.column("item"))
  pc.dictionary_encode(pc.list_flatten(pc.split_pattern(items.column("title"), " ")))
  pc.dictionary_encode(pc.list_flatten(pc.split_pattern(items.column("tags"), "|")))


def config_for(kind: str, folder: pathlib.Path, rows: int, users: int, items: int):
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax import spec  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.data.split = "random"
  c.data.test_fraction = 0.1
  if kind == "tables":
    c.data.source = "tables"
    c.data.dir = str(folder)
    c.data.interactions_file, c.data.items_file = "events.parquet", "items.parquet"
    c.data.user_key, c.data.item_key, c.data.time_key = "user", "item", "ts"
    c.features.query = {"user": spec.id("user"), "ts": spec.timestamp("ts")}
    c.features.candidate = {"item": spec.id("item"), "title": spec.text("title", max_words=5),
                            "tags": spec.multi_hot("tags")}
  else:
    c.data.source = "synthetic"
    c.data.synthetic_interactions, c.data.synthetic_users = rows, users
    c.data.synthetic_items = items
    c.features.query = {"user": spec.id("user_id"), "ts": spec.timestamp("timestamp")}
    c.features.candidate = {"item": spec.id("movie_id"), "title": spec.text("movie_title")}
  return c


def measure(kind: str, folder: pathlib.Path, rows: int, users: int, items: int) -> dict:
  t0 = time.perf_counter()
  if kind == "pyarrow_core":
    pyarrow_core(folder)
    extra = {}
  else:
    from twotower_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    prep = input_pipeline.prepare(config_for(kind.removeprefix("prepare_"), folder, rows,
                                             users, items))
    extra = {"num_train": len(prep.train_item), "num_test": len(prep.test_item),
             "num_items": prep.num_items}
  seconds = time.perf_counter() - t0
  return {"measure": kind, "seconds": round(seconds, 2),
          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
          **extra}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=10_000_000)
  p.add_argument("--users", type=int, default=200_000)
  p.add_argument("--items", type=int, default=1_000_000)
  p.add_argument("--dir", default="/tmp/bench_data")
  p.add_argument("--out", default=None)
  p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one measurement, in-process
  a = p.parse_args()
  folder = pathlib.Path(a.dir) / f"{a.rows}-{a.users}-{a.items}"
  if a.only:
    print(json.dumps(measure(a.only, folder, a.rows, a.users, a.items)))
    return
  if not (folder / "items.parquet").is_file():
    t0 = time.perf_counter()
    write_tables(folder, a.rows, a.users, a.items)
    print(json.dumps({"wrote": str(folder), "seconds": round(time.perf_counter() - t0, 1)}))
  results = {}
  for kind in ("pyarrow_core", "prepare_tables", "prepare_synthetic"):
    proc = subprocess.run([sys.executable, __file__, f"--rows={a.rows}", f"--users={a.users}",
                           f"--items={a.items}", f"--dir={a.dir}", f"--only={kind}"],
                          capture_output=True, text=True, check=True)
    results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(results[kind]), flush=True)
  ratios = {
      "tables_over_pyarrow_core": round(results["prepare_tables"]["seconds"]
                                        / results["pyarrow_core"]["seconds"], 2),
      "synthetic_over_tables": round(results["prepare_synthetic"]["seconds"]
                                     / results["prepare_tables"]["seconds"], 2),
  }
  print(json.dumps(ratios))
  if a.out:
    pathlib.Path(a.out).write_text(json.dumps({"results": results, "ratios": ratios,
                                               "args": vars(a)}, indent=1))


if __name__ == "__main__":
  main()
