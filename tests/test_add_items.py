"""Index kinds saved in the serving directory, and new items added without retraining:
end to end, atomic replacement under a concurrent reader, and errors for bad item files."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_jax import ann
from twotower_jax import catalog
from twotower_jax import features as feat
from twotower_jax import input_pipeline
from twotower_jax import serving
from twotower_jax import train
from conftest import tiny_config, write_synthetic_ml100k

pytest.importorskip("faiss")
REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_ITEMS = 150
FEATS = {"raw_user_age": [30.0, 55.0, 23.0], "user_gender": [True, False, True],
         "user_occupation_text": ["engineer", "writer", "student"],
         "timestamp": [880000000] * 3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run whose serving directory holds a FAISS IVF index."""
  data_dir = write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80,
                                    num_movies=NUM_ITEMS, num_ratings=3000, seed=5)
  cfg = tiny_config(data_dir, **{"eval.baselines": False, "train.num_epochs": 1,
                                 "serve.index": "faiss_ivf"})
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(cfg, str(workdir))
  return workdir, cfg


@pytest.fixture
def run_copy(trained, tmp_path):
  """A private copy of the trained workdir (tests change its serving directory)."""
  workdir, cfg = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  return copy, cfg


def brute_force_ids(rec, feats, k, exclude_rows=None):
  q = rec.embed(feats)
  s = q @ np.asarray(rec.index.embeddings_NxD, np.float32).T
  if exclude_rows is not None:
    s[:, exclude_rows] = -np.inf
  return rec.item_ids_N[np.argsort(-s, axis=1, kind="stable")[:, :k]]


def assert_exact_up_to_ties(rec, feats, r, exclude_rows=None):
  """``r`` holds the best items by brute force; items with equal scores (new items with
  the same features embed alike) may come in any order."""
  q = rec.embed(feats)
  s = q @ np.asarray(rec.index.embeddings_NxD, np.float32).T
  if exclude_rows is not None:
    s[:, exclude_rows] = -np.inf
  k = r.item_id.shape[1]
  want = -np.sort(-s, axis=1)[:, :k]
  np.testing.assert_allclose(r.score, want, rtol=1e-5, atol=1e-5)
  rows = rec.item_rows(r.item_id)
  np.testing.assert_allclose(np.take_along_axis(s, rows, axis=1), r.score, rtol=1e-5,
                             atol=1e-5)


def new_items_table(keys, genres=("1|5", "7", "2|15", "16")):
  n = len(keys)
  return pa.table({"movie_id": pa.array(keys, pa.int64()),
                   "movie_title": [f"Brand New Film {k} (2026)" for k in keys],
                   "movie_genres": [genres[i % len(genres)] for i in range(n)],
                   "movie_release_year": [2026] * n})


def write_csv(table, path):
  import pyarrow.csv as pacsv  # pylint: disable=g-import-not-at-top
  pacsv.write_csv(table, path)
  return path


# ----------------------------------------------------------------------------
# The index in the serving directory.


def test_serving_dir_holds_the_faiss_index_and_the_candidate_tower(trained):
  workdir, _ = trained
  meta = json.loads((workdir / "serving" / "serving.json").read_text())
  assert meta["format_version"] == 3
  assert meta["index"]["kind"] == "faiss_ivf" and meta["index"]["size"] == NUM_ITEMS
  assert meta["index"]["options"]["ivf_nlist"] == ann.auto_nlist(NUM_ITEMS)
  assert (workdir / "serving" / "index.faiss").is_file()
  assert (workdir / "serving" / "candidate_params.npz").is_file()
  rec = serving.load(workdir)
  assert ann.kind_of(rec.index) == "faiss_ivf"
  # nprobe (32) >= nlist (3): every cell is searched, so the answers are exact.
  r = rec.recommend(FEATS, 10)
  np.testing.assert_array_equal(r.item_id, brute_force_ids(rec, FEATS, 10))


@pytest.mark.parametrize("kind", ["exact", "faiss_hnsw"])
def test_each_index_kind_round_trips_through_the_serving_dir(run_copy, kind):
  workdir, cfg = run_copy
  cfg = tiny_config(cfg.data.dir, **{"eval.baselines": False, "train.num_epochs": 1,
                                     "serve.index": kind})
  train.train_and_evaluate(cfg, str(workdir))  # a finished run: evaluated and saved again
  assert (workdir / "serving" / "index.faiss").is_file() == (kind != "exact")
  rec = serving.load(workdir)
  assert ann.kind_of(rec.index) == kind
  r = rec.recommend(FEATS, 10)
  want = brute_force_ids(rec, FEATS, 10)
  if kind == "exact":
    np.testing.assert_array_equal(r.item_id, want)
  else:  # approximate: most of the exact top 10
    assert np.mean([len(set(a) & set(b)) for a, b in zip(r.item_id.tolist(),
                                                         want.tolist())]) >= 8
  excluded = r.item_id[:, :3].tolist()
  r2 = rec.recommend(FEATS, 5, exclude_ids=excluded)
  assert not any(set(a) & set(b) for a, b in zip(r2.item_id.tolist(), excluded))


def test_a_format_2_directory_still_serves(run_copy):
  workdir, _ = run_copy
  path = workdir / "serving"
  meta = json.loads((path / "serving.json").read_text())
  for key in ("index", "candidate_tower"):
    meta.pop(key)
  meta["format_version"] = 2
  (path / "serving.json").write_text(json.dumps(meta))
  for name in ("index.faiss", "candidate_params.npz"):
    (path / name).unlink()
  rec = serving.load(workdir)
  assert ann.kind_of(rec.index) == "exact"
  assert rec.recommend(FEATS, 3).valid.all()
  items = write_csv(new_items_table([9001]), workdir / "new.csv")
  with pytest.raises(catalog.CatalogError, match="re-export/retrain to add items"):
    catalog.add_items(workdir, items)


# ----------------------------------------------------------------------------
# add_items.


def test_add_items_end_to_end(run_copy, caplog):
  workdir, cfg = run_copy
  before = serving.load(workdir)
  keys = list(range(9001, 9013))
  items = write_csv(new_items_table(keys), workdir / "new_items.csv")
  with caplog.at_level(logging.INFO, logger=catalog.__name__):
    out = catalog.add_items(workdir, items)
  assert out == {"added": 12, "num_items": NUM_ITEMS + 12, "index": "faiss_ivf",
                 "directory": str((workdir / "serving").absolute())}
  unknown = [r.message for r in caplog.records if "unknown to the model" in r.message]
  assert len(unknown) == 1 and "movie_title" in unknown[0] and "12 of 12" in unknown[0]
  rec = serving.load(workdir)  # what a reload sees
  assert len(rec.item_ids_N) == len(rec.index) == NUM_ITEMS + 12
  assert rec.item_ids_N[-12:].tolist() == keys and ann.kind_of(rec.index) == "faiss_ivf"
  np.testing.assert_array_equal(np.asarray(rec.index.embeddings_NxD)[:NUM_ITEMS],
                                np.asarray(before.index.embeddings_NxD))
  assert rec.items["movie_title"][-1] == "Brand New Film 9012 (2026)"
  assert json.loads((workdir / "serving" / "serving.json").read_text())["added_items"] == 12
  # The new items compete with the old: results equal brute force over all 162 items.
  r = rec.recommend(FEATS, 20)
  assert_exact_up_to_ties(rec, FEATS, r)
  assert np.isin(r.item_id[:, :5], keys).any()  # some query's best items include new ones
  # With the old catalogue excluded, the new items are what gets recommended, best first.
  old = [before.item_ids_N.tolist()] * 3
  r = rec.recommend(FEATS, 5, exclude_ids=old)
  assert set(r.item_id.ravel().tolist()) <= set(keys) and r.valid.all()
  assert_exact_up_to_ties(rec, FEATS, r, exclude_rows=np.arange(NUM_ITEMS))
  # A second batch, from Parquet with a list-valued genres column.
  table = new_items_table([9100, 9101]).set_column(
      2, "movie_genres", pa.array([[1, 5], [7]], pa.list_(pa.int64())))
  pq.write_table(table, workdir / "more.parquet")
  assert catalog.add_items(workdir / "serving", workdir / "more.parquet")["num_items"] == (
      NUM_ITEMS + 14)
  assert serving.load(workdir).item_ids_N[-2:].tolist() == [9100, 9101]
  leftovers = [p.name for p in workdir.iterdir() if p.name.startswith((".serving.new",
                                                                      "serving.old"))]
  assert leftovers == []


def test_new_items_are_embedded_like_training_embeds_the_catalogue(run_copy):
  """The stored candidate tower on the catalogue's own columns gives its stored embeddings."""
  workdir, cfg = run_copy
  rec = serving.load(workdir)
  movies = input_pipeline.prepare(cfg).dataset.movies
  emb = catalog.embed_items(workdir / "serving", rec.meta, rec.encoders, movies)
  np.testing.assert_allclose(emb, np.asarray(rec.index.embeddings_NxD), rtol=1e-5, atol=1e-6)


def test_the_command_line_adds_items(run_copy):
  workdir, _ = run_copy
  items = write_csv(new_items_table([9500, 9501, 9502]), workdir / "cli.csv")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "twotower_jax.main", "--mode=add_items",
         f"--workdir={workdir}"]
  done = subprocess.run(cmd + [f"--items={items}"], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=300)
  assert done.returncode == 0, done.stderr
  assert f"Added 3 items to {(workdir / 'serving').absolute()}: {NUM_ITEMS + 3} items" in (
      done.stdout)
  again = subprocess.run(cmd + [f"--items={items}"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
  assert again.returncode == 2 and "already in the catalogue" in again.stderr
  assert "Traceback" not in again.stderr


# ----------------------------------------------------------------------------
# Atomic replacement.


def _consistent(rec) -> int:
  n = len(rec.item_ids_N)
  assert len(rec.index) == n and rec.index.faiss_index.ntotal == n
  assert all(len(v) == n for v in rec.items.values())
  return n


def test_a_reader_loading_concurrently_never_fails(run_copy):
  workdir, _ = run_copy
  stop, seen, errors = threading.Event(), [], []

  def reader():
    while not stop.is_set():
      try:
        seen.append(_consistent(serving.load(workdir)))
      except Exception as e:  # noqa: BLE001 - any failure fails the test
        errors.append(e)
        return

  t = threading.Thread(target=reader)
  t.start()
  try:
    for i in range(4):
      items = write_csv(new_items_table([9000 + 10 * i + j for j in range(10)]),
                        workdir / f"batch{i}.csv")
      catalog.add_items(workdir, items)
  finally:
    stop.set()
    t.join(timeout=120)
  assert errors == []
  assert seen and set(seen) <= {NUM_ITEMS + 10 * i for i in range(5)}
  assert _consistent(serving.load(workdir)) == NUM_ITEMS + 40


def test_a_swap_in_the_middle_of_a_load_is_read_again(run_copy, monkeypatch):
  """The directory is replaced after serving.json was read: load starts over and returns
  the new directory whole, never the old serving.json with the new arrays."""
  workdir, _ = run_copy
  other = workdir.parent / "other"
  shutil.copytree(workdir, other)
  catalog.add_items(other, write_csv(new_items_table([9001, 9002]), other / "n.csv"))
  staged = workdir / ".serving.staged"
  shutil.copytree(other / "serving", staged)
  real_load_encoders, calls = feat.load_encoders, []

  def load_encoders_then_swap(path):
    calls.append(path)
    if len(calls) == 1:
      catalog.replace_dir(workdir / "serving", staged)
    return real_load_encoders(path)

  monkeypatch.setattr(feat, "load_encoders", load_encoders_then_swap)
  rec = serving.load(workdir)
  assert len(calls) == 2  # read again after the swap
  assert _consistent(rec) == NUM_ITEMS + 2
  assert rec.meta["added_items"] == 2 and not staged.exists()


# ----------------------------------------------------------------------------
# Bad item files.


@pytest.mark.parametrize("make, message", [
    (lambda t: t.drop_columns(["movie_genres", "movie_title"]),
     r"missing columns \['movie_genres', 'movie_title'\]; new items need \['movie_id', "
     r"'movie_genres', 'movie_title'\]"),
    (lambda t: t.drop_columns(["movie_id"]), r"missing column \['movie_id'\]"),
    (lambda t: t.set_column(0, "movie_id", pa.array([1, 9001], pa.int64())),
     r"1 item key already in the catalogue, e.g. \[1\] \(line 2\)"),
    (lambda t: t.set_column(0, "movie_id", pa.array([9001, 9001], pa.int64())),
     r"item key 9001 occurs 2 times"),
    (lambda t: t.set_column(0, "movie_id", pa.array([9001, None], pa.int64())),
     r"column 'movie_id' \(item key\) is empty at line 3"),
    (lambda t: t.set_column(0, "movie_id", pa.array(["x1", "x2"])),
     r"holds text \('x1' at line 2\) but this catalogue's item keys are integers"),
    (lambda t: t.slice(0, 0), r"holds no rows"),
])
def test_bad_item_files_are_clear_errors(run_copy, make, message):
  workdir, _ = run_copy
  items = write_csv(make(new_items_table([9001, 9002])), workdir / "bad.csv")
  before = (workdir / "serving" / "candidates.npz").read_bytes()
  with pytest.raises((catalog.CatalogError, serving.ServingError, ValueError), match=message):
    catalog.add_items(workdir, items)
  assert (workdir / "serving" / "candidates.npz").read_bytes() == before  # left as it was


def test_missing_or_unreadable_files(run_copy, tmp_path):
  workdir, _ = run_copy
  with pytest.raises(catalog.CatalogError, match="new items file does not exist"):
    catalog.add_items(workdir, tmp_path / "nope.csv")
  (tmp_path / "items.json").write_text("{}")
  with pytest.raises(ValueError, match="must be .csv, .tsv, .parquet or .pq"):
    catalog.add_items(workdir, tmp_path / "items.json")
  with pytest.raises(catalog.CatalogError, match="holds no serving directory"):
    catalog.add_items(tmp_path, tmp_path / "nope.csv")
