"""--mode=export_model: the directory, identical answers to Recommender.recommend, loading
without flax, version checks, atomic replacement, a saved FAISS index."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from twotower_jax import ann
from twotower_jax import export_model
from twotower_jax import input_pipeline
from twotower_jax import portable
from twotower_jax import serving
from twotower_jax import spec as S
from twotower_jax import train
from conftest import tiny_config, write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]
UNKNOWN_ITEM = 99_999


def _config(data_dir, variant: str = "history"):
  """configs/tiny.py with a query tower of every feature kind (a few steps of training)."""
  cfg = tiny_config(data_dir, variant, **{"eval.baselines": False, "train.num_epochs": 1})
  if variant == "attention":  # with each item's rating and the time since it
    h = cfg.features.query.history
    h.side, h.time_since, h.dropout = ("user_rating",), True, 0.2
  if variant == "history":
    q = cfg.features.query
    q["user_id"] = S.id("user_id", dim=4, max_size=60)
    q["zip"] = S.id("user_zip_code", dim=4, hash_buckets=50)
    q["occ_label"] = S.categorical("user_occupation_label", dim=4, hash_buckets=7)
    q["age_b"] = S.numeric("raw_user_age", buckets=4, dim=4)
    q["age_log"] = S.numeric("raw_user_age", log=True)
    q["zip_parts"] = S.multi_hot("user_zip_code", sep="0", dim=4, max_values=2)
    q["title_words"] = S.text("movie_title", dim=4, max_words=3)
  return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80,
                                num_movies=150, num_ratings=3000, seed=5)


def _trained(tmp_path_factory, data_dir, variant):
  cfg = _config(data_dir, variant)
  workdir = tmp_path_factory.mktemp(f"run_{variant}")
  train.train_and_evaluate(cfg, str(workdir))
  return workdir, cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
  """(workdir, config, export directory) of a model with every query feature kind."""
  workdir, cfg = _trained(tmp_path_factory, data_dir, "history")
  return workdir, cfg, export_model.export_model(workdir)


def _queries(rec, cfg, n: int, seed: int = 0):
  """``n`` queries drawn from the interactions (train and test), with unknown ids, unknown
  categories and words, missing ids, and random histories holding unknown items; and per
  query a few item keys to exclude (for every third query)."""
  prep = input_pipeline.prepare(cfg)
  rng = np.random.default_rng(seed)
  cols = {c: np.concatenate([np.asarray(prep.train[c]), np.asarray(prep.test[c])])
          for c in rec.query_columns() if c in prep.train}
  rows = rng.integers(0, len(next(iter(cols.values()))), n)
  q = {c: v[rows] for c, v in cols.items()}
  odd = rng.random(n)
  if "user_id" in q:
    ids = q["user_id"].astype(object)
    ids[odd < 0.1] = 10_000 + rows[odd < 0.1]  # unknown users
    ids[(odd >= 0.1) & (odd < 0.15)] = None  # no user given
    q["user_id"] = ids
  for col, unknown in (("user_occupation_text", "astronaut"), ("user_zip_code", "Z0Z0Z"),
                       ("movie_title", "Brand New Film 0 (2030)")):
    if col in q:
      q[col] = np.where((odd > 0.15) & (odd < 0.22), unknown, q[col])
  items = rec.item_ids_N
  q["history"] = [[int(v) for v in rng.choice(items, rng.integers(0, 13))]
                  + ([UNKNOWN_ITEM] if rng.random() < 0.1 else []) for _ in range(n)]
  exclude = [rng.choice(items, 3).tolist() if i % 3 == 0 else [] for i in range(n)]
  if "history.user_rating" in rec.history_value_columns():  # per item: rating, time
    q["history.user_rating"] = [  # None: unknown, read as the training mean
        [None if rng.random() < 0.2 else float(rng.integers(1, 6)) for _ in h]
        for h in q["history"]]
    q["history.time"] = [(t - np.sort(rng.integers(0, 90 * 86_400, len(h)))[::-1]).tolist()
                         for h, t in zip(q["history"], q["timestamp"].tolist())]
  return q, exclude


def _same_answers(rec, model, q, exclude, k=10):
  want = rec.recommend(q, k, exclude_ids=exclude, check_range=False)
  ids, scores = model.recommend(q, k, exclude_ids=exclude, check_range=False)
  np.testing.assert_array_equal(ids, want.item_id)
  np.testing.assert_allclose(scores, want.score, rtol=1e-5, atol=1e-6)
  return want


def test_the_directory_holds_the_tower_encoders_candidates_and_a_manifest(run):
  workdir, _, out = run
  assert out == workdir / "export_model"
  names = sorted(p.name for p in out.iterdir())
  assert names == sorted([*export_model.FILES.values(), "manifest.json"])
  assert not [p for p in workdir.iterdir() if p.name.startswith(".export_model")]
  manifest = json.loads((out / "manifest.json").read_text())
  rec = serving.load(workdir)
  assert manifest["format_version"] == portable.FORMAT_VERSION
  assert manifest["num_items"] == len(rec.item_ids_N) == 150
  assert manifest["dim"] == rec.candidates_NxD.shape[1] == 8
  assert manifest["index"]["kind"] == "exact"
  assert {n: s["kind"] for n, s in manifest["features"].items()} == {
      n: s.kind for n, s in rec.specs.items()}
  assert manifest["inputs"]["title_words"] == {"dtype": "int32", "shape": ["B", 3]}
  assert manifest["inputs"]["time_value"] == {"dtype": "float32", "shape": ["B"]}
  assert manifest["inputs"]["history"]["shape"] == ["B", 10]
  # One serialized function for any batch size, lowered for CPU and CUDA.
  exported = jax.export.deserialize(bytearray((out / export_model.TOWER_FILE).read_bytes()))
  assert str(exported.out_avals[0].shape) == "(B, 8)"
  assert set(exported.platforms) == {"cpu", "cuda"}
  assert (out / "portable.py").read_text() == (REPO / "twotower_jax" / "portable.py").read_text()


def test_identical_answers_across_10000_queries(run):
  workdir, cfg, out = run
  rec, model = serving.load(workdir), portable.load(out)
  q, exclude = _queries(rec, cfg, 10_000)
  want_x, got_x = rec.encode(q), model.encode(q)
  assert sorted(got_x) == sorted(want_x)
  for name in want_x:
    np.testing.assert_array_equal(got_x[name], want_x[name], err_msg=name)
  assert (want_x["user_id"] == 0).sum() > 1000 and (want_x["history"] == 0).any()  # unknowns
  want = _same_answers(rec, model, q, exclude)
  assert want.valid.all() and len(np.unique(want.item_id[:, 0])) > 5
  np.testing.assert_array_equal(model.columns_of(want.item_id)["movie_title"],
                                want.columns["movie_title"])
  for q_ in range(0, 10_000, 3):  # the exclusions were honoured
    assert not set(exclude[q_]) & set(want.item_id[q_].tolist())
  # k above the catalogue: the padding slots agree too.
  few = {c: v[:4] for c, v in q.items() if c != "history"}
  ids, scores = model.recommend(few, 160, check_range=False)
  assert (ids[:, 150:] == -1).all() and np.isneginf(scores[:, 150:]).all()
  np.testing.assert_array_equal(ids, rec.recommend(few, 160, check_range=False).item_id)


def test_loads_and_answers_where_flax_cannot_be_imported(run, tmp_path):
  workdir, cfg, out = run
  rec = serving.load(workdir)
  q, exclude = _queries(rec, cfg, 300, seed=1)
  want = rec.recommend(q, 10, exclude_ids=exclude, check_range=False)
  moved = tmp_path / "somewhere" / "model"  # the directory stands alone
  shutil.copytree(out, moved)
  plain = {c: (v.tolist() if isinstance(v, np.ndarray) else v) for c, v in q.items()}
  (tmp_path / "case.json").write_text(json.dumps(
      {"queries": plain, "exclude": exclude, "ids": want.item_id.tolist(),
       "scores": want.score.tolist()}))
  script = f"""
import json, sys
blocked = ("flax", "optax", "ml_collections", "pyarrow", "orbax", "orbax.checkpoint",
           "twotower_jax", "faiss")
for name in blocked:
  sys.modules[name] = None
try:
  import flax
  raise SystemExit("flax is importable")
except ImportError:
  pass
sys.path.insert(0, {str(moved)!r})
import numpy as np
import portable
assert portable.__file__.startswith({str(moved)!r}), portable.__file__
case = json.load(open({str(tmp_path / "case.json")!r}))
m = portable.load({str(moved)!r})
ids, scores = m.recommend(case["queries"], 10, exclude_ids=case["exclude"],
                          check_range=False)
np.testing.assert_array_equal(ids, np.array(case["ids"]))
np.testing.assert_allclose(scores, np.array(case["scores"]), rtol=1e-5, atol=1e-6)
assert all(sys.modules[name] is None for name in blocked)
print("answered", len(ids), "queries")
"""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "answered 300 queries" in proc.stdout


def test_an_attention_history_with_side_columns_exports_with_identical_answers(
    tmp_path_factory, data_dir):
  workdir, cfg = _trained(tmp_path_factory, data_dir, "attention")
  out = export_model.export_model(workdir / "serving", tmp_path_factory.mktemp("x") / "m")
  rec, model = serving.load(workdir), portable.load(out)
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["inputs"]["history_side"] == {"dtype": "float32", "shape": ["B", 10, 1]}
  assert manifest["inputs"]["history_time_since"] == {"dtype": "float32", "shape": ["B", 10]}
  q, exclude = _queries(rec, cfg, 1000, seed=2)
  want_x, got_x = rec.encode(q), model.encode(q)
  for name in want_x:
    np.testing.assert_array_equal(got_x[name], want_x[name], err_msg=name)
  assert (want_x["history_side"] != 0).any() and (want_x["history_time_since"] != 0).any()
  _same_answers(rec, model, q, exclude)
  known = rec.user_features(rec.users["user_key"][:50])  # stored ratings and times
  _same_answers(rec, model, known, None)
  # A new user served from a few items, as in the README.
  one = {c: v[:1] for c, v in q.items() if not c.startswith("history")}
  one["history"] = [[50, 181, 1]]
  _same_answers(rec, model, one, None)


def test_unsupported_versions_say_how_to_reexport(run, tmp_path):
  _, _, out = run
  for version in (0, portable.FORMAT_VERSION + 1):
    copy = tmp_path / f"v{version}"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = version
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(portable.PortableError, match=f"format_version {version}.*"
                       "--mode=export_model"):
      portable.load(copy)
  (copy / "manifest.json").unlink()
  with pytest.raises(portable.PortableError, match="no model export.*--mode=export_model"):
    portable.load(copy)
  broken = tmp_path / "broken"
  shutil.copytree(out, broken)
  (broken / export_model.TOWER_FILE).write_bytes(b"not a function")
  with pytest.raises(portable.PortableError, match="query_tower.jaxexport.*--mode=export_model"):
    portable.load(broken)


def test_bad_queries_get_clear_errors(run):
  _, _, out = run
  model = portable.load(out)
  good = {"raw_user_age": [30.0], "user_gender": [True], "user_occupation_text": ["doctor"],
          "timestamp": [880_000_000], "user_occupation_label": [3], "user_zip_code": ["12345"],
          "movie_title": ["Some Film (1990)"]}
  ids, scores = model.recommend(good, 5)
  assert ids.shape == (1, 5) and np.isfinite(scores).all()
  cases = [({k: v for k, v in good.items() if k != "raw_user_age"}, "missing.*raw_user_age"),
           ({**good, "raw_user_age": ["thirty"]}, "raw_user_age.*finite numbers"),
           ({**good, "raw_user_age": [500.0]}, "outside the range seen in training"),
           ({**good, "user_occupation_text": [[1, 2]]}, "one value per query"),
           ({**good, "timestamp": [1, 2]}, "every column needs one value per query")]
  for query, message in cases:
    with pytest.raises(portable.PortableError, match=message):
      model.recommend(query, 5)
  with pytest.raises(portable.PortableError, match="k .* integer >= 1"):
    model.recommend(good, 0)


def test_a_failed_export_leaves_the_previous_one(run, tmp_path, monkeypatch):
  workdir, _, _ = run
  out = export_model.export_model(workdir, tmp_path / "exp")
  before = {p.name: p.read_bytes() for p in out.iterdir()}

  def broken(*args):
    raise RuntimeError("disk full")

  monkeypatch.setattr(export_model, "_check", broken)
  with pytest.raises(RuntimeError, match="disk full"):
    export_model.export_model(workdir, out)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temporary left behind
  monkeypatch.undo()
  export_model.export_model(workdir, out)  # an existing export is replaced
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "todo.txt").write_text("mine")
  with pytest.raises(export_model.ExportModelError, match="not a model export"):
    export_model.export_model(workdir, tmp_path / "notes")
  assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_unsupported_features_stop_the_export(run, tmp_path):
  workdir, _, _ = run
  copy = tmp_path / "serving"
  shutil.copytree(workdir / "serving", copy)
  meta = json.loads((copy / "serving.json").read_text())
  meta["features"]["query"]["age"]["kind"] = "image"
  (copy / "serving.json").write_text(json.dumps(meta))
  with pytest.raises(export_model.ExportModelError, match="age is a 'image' feature"):
    export_model.export_model(copy, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  meta["format_version"] = 1
  (copy / "serving.json").write_text(json.dumps(meta))
  with pytest.raises(serving.ServingError, match="format_version 1"):
    export_model.export_model(copy, tmp_path / "out")


@pytest.mark.parametrize("kind", ["faiss_hnsw", "faiss_ivf"])
def test_a_saved_faiss_index_travels_with_the_export(run, tmp_path, kind):
  pytest.importorskip("faiss")
  workdir, cfg, _ = run
  copy = tmp_path / "serving"
  shutil.copytree(workdir / "serving", copy)
  rec = serving.load(copy)
  meta = json.loads((copy / "serving.json").read_text())
  meta["index"] = ann.save(ann.build(kind, rec.candidates_NxD), copy)
  (copy / "serving.json").write_text(json.dumps(meta))
  rec = serving.load(copy)
  out = export_model.export_model(copy, tmp_path / "exp")
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["index"]["kind"] == kind and (out / "index.faiss").is_file()
  model = portable.load(out)
  q, exclude = _queries(rec, cfg, 500, seed=3)
  want = rec.recommend(q, 10, exclude_ids=exclude, check_range=False)
  ids, _ = model.recommend(q, 10, exclude_ids=exclude, check_range=False, index="saved")
  np.testing.assert_array_equal(ids, want.item_id)


def test_command_line(run, tmp_path):
  workdir, _, _ = run
  out = tmp_path / "cli_export"
  proc = subprocess.run([sys.executable, "-m", "twotower_jax.main", "--mode=export_model",
                         f"--workdir={workdir}", f"--export_dir={out}"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert f"Wrote {out}" in proc.stdout and "150 candidates" in proc.stdout
  assert portable.load(out).dim == 8
  proc = subprocess.run([sys.executable, "-m", "twotower_jax.main", "--mode=export_model",
                         f"--workdir={tmp_path / 'nothing'}"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
