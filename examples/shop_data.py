"""A small synthetic shop, in the table form twotower_jax reads: not MovieLens.

  python examples/shop_data.py --out /tmp/shop [--users 2000 --items 500 --events 60000]

writes ``users``, ``items`` and ``events`` tables as both CSV and Parquet:

* users: ``customer`` (a string key), ``country``, ``age``;
* items: ``sku`` (an integer key), ``category``, ``brand``, ``tags`` ("red|sale"), ``price``,
  ``name``;
* events: ``customer``, ``sku``, ``ts`` (Unix seconds), ``quantity``.

Customers prefer two categories that depend on their country and age band, and within a
category the popular items (Zipf), so a model can learn something a popularity ranking
cannot. Everything is drawn with numpy from ``--seed``: the same seed, the same files.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

COUNTRIES = ("DE", "FR", "IT", "ES", "NL", "PL", "SE", "UK")
CATEGORIES = ("shoes", "shirts", "books", "toys", "garden", "kitchen", "audio", "sports")
BRANDS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell",
          "cyberdyne", "soylent")
TAGS = ("red", "blue", "green", "sale", "new", "eco", "premium", "kids", "gift")
WORDS = ("classic", "super", "mini", "pro", "light", "smart", "soft", "max", "urban", "retro")
START = 1_672_531_200  # 2023-01-01


def make_shop(num_users: int = 2000, num_items: int = 500, num_events: int = 60_000,
              seed: int = 0) -> dict[str, pa.Table]:
  """The three tables, as pyarrow tables."""
  rng = np.random.default_rng(seed)
  country_U = rng.integers(0, len(COUNTRIES), num_users)
  age_U = rng.integers(18, 75, num_users)
  band_U = np.digitize(age_U, (30, 45, 60))
  users = pa.table({
      "customer": pa.array([f"c{u:05d}" for u in range(num_users)]),
      "country": pa.array(np.asarray(COUNTRIES)[country_U]),
      "age": pa.array(age_U),
  })
  cat_I = rng.integers(0, len(CATEGORIES), num_items)
  brand_I = rng.integers(0, len(BRANDS), num_items)
  n_tags = rng.integers(1, 4, num_items)
  tag_choice = np.argsort(rng.random((num_items, len(TAGS))), axis=1)[:, :3]
  tags = ["|".join(np.asarray(TAGS)[tag_choice[i, :n_tags[i]]]) for i in range(num_items)]
  words = np.asarray(WORDS)[rng.integers(0, len(WORDS), (num_items, 2))]
  names = [f"{BRANDS[b].title()} {w[0]} {w[1]} {CATEGORIES[c]}"
           for b, w, c in zip(brand_I, words, cat_I)]
  items = pa.table({
      "sku": pa.array(np.arange(100_000, 100_000 + num_items)),
      "category": pa.array(np.asarray(CATEGORIES)[cat_I]),
      "brand": pa.array(np.asarray(BRANDS)[brand_I]),
      "tags": pa.array(tags),
      "price": pa.array(np.round(rng.lognormal(3.0, 0.7, num_items), 2)),
      "name": pa.array(names),
  })
  # Each (country, age band) group prefers two categories; items within one by Zipf.
  groups = len(COUNTRIES) * 4
  pref_Gx2 = rng.integers(0, len(CATEGORIES), (groups, 2))
  user_E = (rng.zipf(1.3, num_events) - 1) % num_users
  group_E = country_U[user_E] * 4 + band_U[user_E]
  liked_E = rng.random(num_events) < 0.8
  cat_E = np.where(liked_E, pref_Gx2[group_E, rng.integers(0, 2, num_events)],
                   rng.integers(0, len(CATEGORIES), num_events))
  count_C = np.bincount(cat_I, minlength=len(CATEGORIES))
  cat_E = np.where(count_C[cat_E] > 0, cat_E, cat_I[0])  # a category with no item
  start_C = np.concatenate([[0], np.cumsum(count_C)[:-1]])
  rank_E = rng.zipf(1.5, num_events) - 1
  item_E = np.argsort(cat_I, kind="stable")[start_C[cat_E] + rank_E % count_C[cat_E]]
  ts_E = np.sort(START + rng.integers(0, 365 * 86400, num_events))
  events = pa.table({
      "customer": users.column("customer").take(pa.array(user_E)),
      "sku": items.column("sku").take(pa.array(item_E)),
      "ts": pa.array(ts_E),
      "quantity": pa.array(rng.integers(1, 4, num_events)),
  })
  return {"users": users, "items": items, "events": events}


def write_shop(out: str | pathlib.Path, **kwargs) -> pathlib.Path:
  """Writes ``<name>.csv`` and ``<name>.parquet`` for each table into ``out``."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name, table in make_shop(**kwargs).items():
    pacsv.write_csv(table, out / f"{name}.csv")
    pq.write_table(table, out / f"{name}.parquet")
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--users", type=int, default=2000)
  p.add_argument("--items", type=int, default=500)
  p.add_argument("--events", type=int, default=60_000)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  out = write_shop(a.out, num_users=a.users, num_items=a.items, num_events=a.events,
                   seed=a.seed)
  print(f"Wrote users, items and events (.csv and .parquet) to {out}")


if __name__ == "__main__":
  main()
