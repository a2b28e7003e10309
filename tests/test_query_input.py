"""Query input: new users of a user-id model, validated feature columns, the training range.

One tiny model with the user id as a query feature (as configs/default.py), trained once.
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax import export
from twotower_jax import features as feat
from twotower_jax import serving
from twotower_jax import train
from conftest import write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]
NEW_USER = 99_999  # no training ratings
EXPLICIT = {"raw_user_age": [30.0, 55.0], "user_gender": ["F", "M"],
            "user_occupation_text": ["engineer", "student"], "timestamp": [880_000_000] * 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  data_dir = write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80,
                                    num_movies=150, num_ratings=3000, seed=7)
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py")
  cfg.data.dir = str(data_dir)
  cfg.data.download = False
  cfg.eval.baselines = False
  cfg.train.num_epochs = 1
  cfg.features.user_id = True
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(cfg, str(workdir))
  return workdir, cfg


@pytest.fixture(scope="module")
def rec(trained):
  return serving.load(trained[0])


def run_cli(*args, env=None):
  full_env = dict(os.environ, **(env or {}))
  full_env.setdefault("JAX_PLATFORMS", "cpu")
  return subprocess.run([sys.executable, "-m", "twotower_jax.main", *args], cwd=REPO,
                        env=full_env, capture_output=True, text=True, timeout=600)


def served_as(rec, user_id):
  """The embedding of EXPLICIT's queries with ``user_id`` encoded as the given table row."""
  return rec.embed(dict(EXPLICIT, user_id=[user_id] * 2))


# ----------------------------------------------------------------------------
# 5. New users of a model with the user id as a feature.


def test_python_api_serves_queries_without_a_user_id(rec, caplog):
  caplog.set_level(logging.INFO, logger="twotower_jax.serving")
  r = rec.recommend(EXPLICIT, 5)  # used to raise "Query features missing: ['user_id']"
  assert r.movie_id.shape == (2, 5) and (r.movie_id >= 0).all()
  notes = [m for m in caplog.messages if "new users" in m]
  assert notes == ["No user_id given: all 2 queries are served as new users through the "
                   "out-of-vocabulary id plus the features given."]
  # The same as an unknown id, or None: all are the out-of-vocabulary row.
  no_id = rec.embed(EXPLICIT)
  np.testing.assert_array_equal(no_id, served_as(rec, NEW_USER))
  np.testing.assert_array_equal(no_id, served_as(rec, None))
  np.testing.assert_array_equal(no_id, served_as(rec, -1))
  assert not np.array_equal(no_id, served_as(rec, 3))  # a known user's own row differs


def test_unknown_ids_are_new_users_in_one_info_line(rec, caplog):
  caplog.set_level(logging.INFO, logger="twotower_jax.serving")
  rec.embed(dict(EXPLICIT, user_id=[NEW_USER, NEW_USER + 1]))
  assert [m for m in caplog.messages if "id vocabulary" in m] == [
      f"User id {NEW_USER} and 1 more are not in the id vocabulary (no training ratings): "
      "served as new users through the out-of-vocabulary id plus the features given."]


def test_query_for_a_new_user_uses_the_oov_id_and_the_features_given(rec, caplog):
  caplog.set_level(logging.INFO, logger="twotower_jax.serving")
  given = dict(age=30.0, gender="F", occupation="engineer", time=880_000_000)
  for user_id in (None, NEW_USER):
    caplog.clear()
    q = rec.query(user_id=user_id, **given)  # used to refuse ("pass --user_id" / "features")
    assert q["user_id"] == [None] and q["raw_user_age"] == [30.0]
    r = rec.recommend(q, 3)
    assert len([m for m in caplog.messages if "new user" in m]) == 1, caplog.messages
    np.testing.assert_array_equal(r.movie_id,
                                  rec.recommend({k: v[:1] for k, v in EXPLICIT.items()}, 3).movie_id)
  # A known user's id still starts from that user's own features.
  known = int(rec.users["user_id"][0])
  assert rec.query(user_id=known)["user_id"] == [known]


def test_new_user_without_features_names_the_missing_flags(rec):
  with pytest.raises(serving.ServingError) as e:
    rec.query(user_id=NEW_USER, age=30.0)
  assert f"User id {NEW_USER} has no training ratings" in str(e.value)
  assert str(e.value).endswith("missing --gender --occupation --time.")


def test_cli_recommends_for_a_new_user_of_an_id_model(trained):
  workdir, _ = trained
  features = ["--age=30", "--gender=F", "--occupation=engineer", "--time=880000000"]
  outputs = []
  for extra in ([], [f"--user_id={NEW_USER}"]):
    proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--top_n=3", *features, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Top 3:") and len(proc.stdout.splitlines()) == 4
    info = [line for line in proc.stderr.splitlines() if "new user" in line]
    assert len(info) == 1 and "out-of-vocabulary id plus the features given" in info[0]
    outputs.append(proc.stdout)
  assert outputs[0] == outputs[1]  # no id and an unknown id: the same new-user query


# ----------------------------------------------------------------------------
# 6. Validated columns: length, type, range; the column named, the expectation said.


@pytest.mark.parametrize("change, expected", [
    ({"raw_user_age": [30.0]}, r"'raw_user_age' has 1 value but the other columns have 2"),
    ({"user_gender": ["F", "X"]}, r"'user_gender' \(--gender\) must be 'M' or 'F' or a "
                                  r"boolean \(True = M\); got 'X' \(row 1"),
    ({"user_gender": [None, "M"]}, r"'user_gender' .* got None \(row 0"),
    ({"raw_user_age": [30.0, None]}, r"'raw_user_age' \(--age\) must be finite numbers; got "
                                     r"None \(row 1"),
    ({"raw_user_age": ["30", "40"]}, r"'raw_user_age' \(--age\) must be finite numbers"),
    ({"raw_user_age": np.array([30.0, np.nan])}, r"'raw_user_age' \(--age\) must be a finite "
                                                 r"number; got nan \(row 1\)"),
    ({"timestamp": [880_000_000, np.inf]}, r"'timestamp' \(--time\) must be a finite number"),
    ({"user_occupation_text": ["engineer", 3]}, r"'user_occupation_text' \(--occupation\) "
                                                r"must be strings"),
    ({"user_id": [1.5, 2]}, r"'user_id' \(--user_id\) must be integer ids"),
    ({"raw_user_age": [[30.0], [55.0]]}, r"'raw_user_age' must hold one value per query"),
    ({"timestamp": None}, r"'timestamp' has 1 value but the other columns have 2"),
])
def test_bad_columns_name_the_column_and_the_expectation(rec, change, expected):
  with pytest.raises(serving.ServingError, match=expected):
    rec.recommend(dict(EXPLICIT, **change), 3)


def test_missing_and_empty_columns(rec):
  with pytest.raises(serving.ServingError, match=r"Query features missing: \['timestamp'\]"):
    rec.recommend({k: v for k, v in EXPLICIT.items() if k != "timestamp"}, 3)
  with pytest.raises(serving.ServingError, match="hold no queries"):
    rec.recommend({k: [] for k in EXPLICIT}, 3)


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_k_must_be_a_positive_integer(rec, k):
  with pytest.raises(serving.ServingError, match=r"k \(the number of recommendations\) must be "
                                                 r"an integer >= 1"):
    rec.recommend(EXPLICIT, k)


def test_gender_as_strings_booleans_or_ints(rec):
  want = rec.embed(dict(EXPLICIT, user_gender=[False, True]))
  for genders in (["F", "M"], np.array(["F", "M"]), [0, 1], np.array([False, True]), ["f", "m"]):
    np.testing.assert_array_equal(rec.embed(dict(EXPLICIT, user_gender=genders)), want)
  assert not np.array_equal(rec.embed(dict(EXPLICIT, user_gender=["M", "M"])), want)


def test_training_range_is_stored_and_checked(rec):
  assert feat.fit_normalizer(np.array([3.0, 1.0, 2.0]))["min"] == 1.0
  lo, hi = feat.value_range(rec.encoders["age"])
  assert (lo, hi) == (7.0, 73.0)  # the synthetic users' ages
  for age in (-30.0, 1e30, 74.0):
    with pytest.raises(serving.ServingError) as e:
      rec.recommend(dict(EXPLICIT, raw_user_age=[30.0, age]), 3)
    assert "'raw_user_age' (--age)" in str(e.value) and "(row 1)" in str(e.value)
    assert "outside the range seen in training: 7 to 73" in str(e.value)
  t_lo, t_hi = feat.value_range(rec.encoders["time"])
  with pytest.raises(serving.ServingError,
                     match=f"'timestamp' \\(--time\\) is {int(t_hi) + 1} .* {int(t_lo)} to "
                           f"{int(t_hi)}"):
    rec.recommend(dict(EXPLICIT, timestamp=[t_lo, t_hi + 1]), 3)
  # The bounds themselves are in range; data as-is (a later test period) skips the check.
  rec.recommend(dict(EXPLICIT, raw_user_age=[lo, hi], timestamp=[t_lo, t_hi]), 3)
  assert rec.recommend(dict(EXPLICIT, raw_user_age=[30.0, 300.0]), 3,
                       check_range=False).movie_id.shape == (2, 3)


def test_directory_without_stored_ranges_still_loads(trained, tmp_path):
  """Serving directories written before the min/max were stored: no range check."""
  workdir, _ = trained
  old = tmp_path / "old"
  shutil.copytree(workdir / "serving", old)
  meta = json.loads((old / "encoders.json").read_text())
  for name in ("age", "time"):
    del meta[name]["min"], meta[name]["max"]
  (old / "encoders.json").write_text(json.dumps(meta))
  rec = serving.load(old)
  assert feat.value_range(rec.encoders["age"]) is None
  assert rec.recommend(dict(EXPLICIT, raw_user_age=[30.0, 300.0]), 3).movie_id.shape == (2, 3)
  with pytest.raises(serving.ServingError, match="must be a finite number"):
    rec.recommend(dict(EXPLICIT, raw_user_age=[30.0, np.nan]), 3)


# ----------------------------------------------------------------------------
# 8. Export: nothing left behind on failure.


def test_failed_export_leaves_nothing_behind(trained, tmp_path, monkeypatch):
  workdir, cfg = trained
  out = tmp_path / "out" / "ranker.csv"
  n = export.export_ranker(cfg, workdir / "serving", out, top_n=4, max_queries=6, batch_size=2)
  assert n == 24
  before = out.read_bytes()
  calls = []
  real = serving.Recommender.recommend

  def failing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("disk full")
    return real(self, *args, **kwargs)

  monkeypatch.setattr(serving.Recommender, "recommend", failing)
  with pytest.raises(RuntimeError, match="disk full"):
    export.export_ranker(cfg, workdir / "serving", out, top_n=5, max_queries=6, batch_size=2)
  assert out.read_bytes() == before  # the old file untouched
  assert sorted(p.name for p in out.parent.iterdir()) == ["ranker.csv"]  # no temporary left


@pytest.mark.parametrize("kwargs, expected", [
    ({"top_n": 0}, "--top_n must be an integer >= 1; got 0"),
    ({"max_queries": -1}, "--max_queries must be an integer >= 0; got -1"),
    ({"split": "valid"}, "--export_split must be one of train, test"),
    ({"split": "train", "exclude_rated": True},
     "--exclude_rated cannot be used with --export_split=train"),
])
def test_export_arguments_are_checked_before_anything_is_written(trained, tmp_path, kwargs,
                                                                 expected):
  workdir, cfg = trained
  out = tmp_path / "ranker.csv"
  with pytest.raises(export.ExportError, match=expected):
    export.export_ranker(cfg, workdir / "serving", out, **kwargs)
  assert list(tmp_path.iterdir()) == []
