"""Your own data: CSV/Parquet tables read by pyarrow, every problem named, and the shop
example trained end to end (recommend, export, report) from the command line."""

import json
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from twotower_jax import config as config_lib
from twotower_jax.data import sources, tables
from twotower_jax.data.dataset import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import shop_data  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
  return shop_data.write_shop(tmp_path_factory.mktemp("shop"), num_users=300, num_items=120,
                              num_events=6000, seed=1)


def shop_data_cfg(folder, fmt="parquet", **overrides):
  c = config_lib.load_config_file(REPO / "configs" / "shop.py", fmt).data
  c.dir = str(folder)
  for k, v in overrides.items():
    c[k] = v
  return c


def test_csv_and_parquet_give_the_same_tables(shop):
  a = sources.load_dataset(shop_data_cfg(shop, "parquet"))
  b = sources.load_dataset(shop_data_cfg(shop, "csv"))
  assert (a.user_key, a.item_key, a.time_key) == ("customer", "sku", "ts")
  assert len(a.ratings["sku"]) == 6000 and len(a.movies["sku"]) == 120
  for cols_a, cols_b in ((a.ratings, b.ratings), (a.movies, b.movies)):
    assert set(cols_a) == set(cols_b)
    for k in cols_a:
      va, vb = cols_a[k], cols_b[k]
      va = va.to_pylist() if isinstance(va, pa.Array) else np.asarray(va).tolist()
      vb = vb.to_pylist() if isinstance(vb, pa.Array) else np.asarray(vb).tolist()
      assert va == vb, k
  # The users table is joined into the interactions by key.
  users = pacsv.read_csv(shop / "users.csv").to_pydict()
  country = dict(zip(users["customer"], users["country"]))
  joined = a.ratings["country"].to_pylist()
  assert all(country[c] == j for c, j in zip(a.ratings["customer"].to_pylist(), joined))


def test_every_split_works_on_string_user_keys(shop):
  ds = sources.load_dataset(shop_data_cfg(shop))
  for split in ("random", "temporal", "leave_last_out"):
    train, test = sources.train_test(shop_data_cfg(shop, split=split), ds, 0)
    assert len(train["sku"]) + len(test["sku"]) == 6000 and len(test["sku"]) > 0


def write(folder: pathlib.Path, name: str, text: str) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / name).write_text(text)
  return folder


def load(folder, **overrides):
  c = ml_collections.ConfigDict(dict(
      interactions_file="events.csv", items_file="", users_file="", user_key="u",
      item_key="i", time_key="", weight_key="", unknown_items="error"))
  c.update(overrides)
  return tables.load_tables(c, lambda n: pathlib.Path(folder) / n)


@pytest.mark.parametrize("text, overrides, message", [
    ("u,i\n1,2\n", {"interactions_file": "nope.csv"}, r"nope\.csv: the interactions table "
     r"does not exist"),
    ("u,i\n1,2\n", {"interactions_file": "events.xlsx"}, r"must be \.csv, \.tsv, \.parquet"),
    ("user,i\n1,2\n", {"user_key": "usr"},
     r"no column 'usr' \(data.user_key\)\. Did you mean 'user'\? Columns: user, i"),
    ("u,i\n1,2\n,3\n", {}, r"column 'u' \(data.user_key\) is empty at line 3"),
    ("u,i,t\n1,2,5\n1,3,soon\n", {"time_key": "t"},
     r"column 't' \(data.time_key\) holds 'soon' at line 3, which is not a number"),
    ("u,i\n1,2\n1,2,3\n", {}, r"line 3 has 3 fields where the header has 2"),
])
def test_bad_tables_name_file_column_and_row(tmp_path, text, overrides, message):
  write(tmp_path, "events.csv", text)
  with pytest.raises(DataError, match=message):
    load(tmp_path, **overrides)


def test_items_table_is_the_catalogue_and_unknown_items_stop_or_drop(tmp_path):
  write(tmp_path, "events.csv", "u,i\n1,10\n2,11\n2,99\n")
  write(tmp_path, "items.csv", "i,name\n10,a\n11,b\n12,c\n")
  with pytest.raises(DataError, match=r"1 interactions name items absent from .*items\.csv "
                     r"\(the first, 99, at line 4\).*unknown_items=drop"):
    load(tmp_path, items_file="items.csv")
  ds = load(tmp_path, items_file="items.csv", unknown_items="drop")
  assert ds.ratings["i"].tolist() == [10, 11]
  assert ds.movies["i"].tolist() == [10, 11, 12]  # item 12 has no interaction, still served
  write(tmp_path, "dup.csv", "i,name\n10,a\n10,b\n")
  with pytest.raises(DataError, match=r"key 10 of column 'i' repeats \(first at line 2"):
    load(tmp_path, items_file="dup.csv")


def test_without_items_table_the_catalogue_is_the_interacted_items(tmp_path):
  write(tmp_path, "events.csv", "u,i\na,30\nb,10\na,30\n")
  ds = load(tmp_path)
  assert ds.movies["i"].tolist() == [10, 30]


def run_cli(*args, **kwargs):
  return subprocess.run([sys.executable, "-m", "twotower_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.slow
def test_shop_trains_recommends_exports_and_reports(shop, tmp_path):
  workdir = tmp_path / "run"
  proc = run_cli("--config", "configs/shop.py", f"--workdir={workdir}",
                 f"--config.data.dir={shop}", "--config.train.num_epochs=2",
                 "--config.cpu_devices=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["source"] == "tables" and metrics["num_candidates"] == 120
  assert metrics["top_100_accuracy"] > metrics["random/include_seen/hr_100"]
  # A known customer, then a brand-new one from their features alone.
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--user_id=c00001", "--top_n=3")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert len([line for line in proc.stdout.splitlines() if line.strip()[:2] in ("1.", "2.",
                                                                                "3.")]) == 3
  query = json.dumps({"country": "DE", "age": 30, "ts": 1_690_000_000})
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", f"--query={query}", "--top_n=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "out-of-vocabulary" in proc.stderr and "Top 2:" in proc.stdout
  out = tmp_path / "ranker.csv"
  proc = run_cli("--mode=export_ranker", f"--workdir={workdir}", "--top_n=5",
                 "--max_queries=40", f"--export_path={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  export = pacsv.read_csv(out).to_pydict()
  assert len(export["query_index"]) == 200
  for column in ("customer", "country", "age", "ts", "true_sku", "sku", "name", "tags",
                 "price", "rank", "retrieval_score", "label"):
    assert column in export, column
  assert set(export["rank"]) == {1, 2, 3, 4, 5}
  proc = run_cli("--mode=report", f"--report_dirs={workdir}", f"--workdir={tmp_path / 'rep'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "hr_100" in proc.stdout
