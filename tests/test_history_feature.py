"""The history feature end to end: no leaks, the device gather equals the host windows, and
serving a given history equals the evaluation path."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import write_synthetic_ml100k
from twotower_jax import checkpoints
from twotower_jax import config as config_lib
from twotower_jax import input_pipeline
from twotower_jax import model as model_lib
from twotower_jax import serving
from twotower_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def history_config(data_dir, variant="history"):
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py", variant)
  cfg.data.dir, cfg.data.download, cfg.data.split = str(data_dir), False, "temporal"
  cfg.eval.ks = (1, 5, 10, 20)
  return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml"), num_ratings=1200)


@pytest.fixture(scope="module")
def prep(data_dir):
  return input_pipeline.prepare(history_config(data_dir))


def item_keys(prep, rows_BxL):
  """Embedding rows of the history table -> item keys (None for padding)."""
  vocab = prep.encoders["history"]["vocab"]
  return [[int(vocab[r - 1]) for r in row if r >= 0] for row in rows_BxL]


def test_no_window_holds_its_own_item_or_anything_at_or_after_its_time(prep):
  key, time = prep.dataset.item_key, prep.dataset.time_key
  n = len(prep.train_item)
  train_windows = item_keys(prep, input_pipeline.query_inputs(prep, np.arange(n))["history"])
  test_windows = item_keys(prep, prep.test_q["history"])
  by_user = {}
  for part, cols, users in (("train", prep.train, prep.train_user),
                            ("test", prep.test, prep.test_user)):
    for i, u in enumerate(users):
      by_user.setdefault(int(u), []).append((cols[time][i], part, i, int(cols[key][i])))
  for part, cols, users, windows in (("train", prep.train, prep.train_user, train_windows),
                                     ("test", prep.test, prep.test_user, test_windows)):
    for i, u in enumerate(users):
      t = cols[time][i]
      known = sorted((e for e in by_user[int(u)]
                      if e[0] < t and (part == "test" or e[1] == "train")),
                     key=lambda e: (e[0], e[1] == "test", e[2]))
      assert windows[i] == [e[3] for e in known][-10:], (part, i)
  assert any(len(w) for w in test_windows) and any(len(w) for w in train_windows)


def test_device_gather_equals_the_host_windows(prep):
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  data = input_pipeline.device_data(prep, mesh)
  idx = np.arange(0, len(prep.train_item), 7).astype(np.int32)
  batch = train.gather_batch(data, idx, jax.random.key(0), 0)
  np.testing.assert_array_equal(np.asarray(batch["xq"]["history"]),
                                input_pipeline.query_inputs(prep, idx)["history"])
  assert not any("/" in k for k in batch["xq"])


@pytest.mark.parametrize("variant", ["history", "attention"])
def test_serving_a_given_history_equals_the_evaluation_path(data_dir, tmp_path, variant):
  cfg = history_config(data_dir, variant)
  cfg.train.num_epochs = 1
  m = train.train_and_evaluate(cfg, str(tmp_path))
  assert "exclude_seen/hr_10" in m
  prep = input_pipeline.prepare(cfg)
  model = model_lib.create_model(cfg.model, prep.query_features, prep.candidate_features)
  params = checkpoints.load_params(tmp_path)
  want = np.asarray(model_lib.embed_queries(params, prep.test_q, model=model))
  rec = serving.load(tmp_path)
  cols = {c: prep.test[c] for c in rec.query_columns() if c in prep.test}
  cols["history"] = item_keys(prep, prep.test_q["history"])
  got = rec.embed(cols)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # A known user's query carries their last training items as the history.
  user = int(prep.train[prep.dataset.user_key][0])
  q = rec.query(user)
  u = prep.train[prep.dataset.user_key] == user
  order = np.lexsort((np.arange(u.sum()), prep.train["timestamp"][u]))
  assert q["history"][0] == prep.train["movie_id"][u][order][-10:].tolist()


def test_cli_recommends_from_a_history_for_a_new_user(data_dir, tmp_path):
  cfg = history_config(data_dir)
  cfg.train.num_epochs = 1
  train.train_and_evaluate(cfg, str(tmp_path))

  def top(history):
    proc = subprocess.run(
        [sys.executable, "-m", "twotower_jax.main", "--mode=recommend", f"--workdir={tmp_path}",
         f"--history={history}", "--age=30", "--gender=F", "--occupation=engineer",
         "--time=880000000", "--top_n=5"], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if line.strip()[:2] in
            ("1.", "2.", "3.", "4.", "5.")]

  a, b = top("1,2,3"), top("30,31,32")
  assert len(a) == 5 and len(b) == 5 and a != b  # the history changes the answer


def test_export_writes_each_querys_history_as_evaluation_sees_it(data_dir, prep, tmp_path):
  import pyarrow.csv as pacsv  # pylint: disable=g-import-not-at-top
  from twotower_jax import export  # pylint: disable=g-import-not-at-top
  cfg = history_config(data_dir)
  cfg.train.num_epochs = 1
  train.train_and_evaluate(cfg, str(tmp_path))
  out = tmp_path / "ranker.csv"
  export.export_ranker(cfg, tmp_path / "serving", out, top_n=2, max_queries=30)
  rows = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(
      column_types={"history": "string"})).to_pydict()
  want = ["|".join(map(str, w)) for w in item_keys(prep, prep.test_q["history"][:30])]
  got = {}
  for q, h in zip(rows["query_index"], rows["history"]):
    got[q] = h or ""
  assert [got[q] for q in sorted(got)] == [want[q] for q in sorted(got)]
  assert any(got.values())
