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
from twotower_jax import spec
from twotower_jax import train
from conftest import write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]
NEW_USER = 99_999  # no training ratings
EXPLICIT = {"raw_user_age": [30.0, 55.0], "user_gender": [False, True],  # F, M
            "user_occupation_text": ["engineer", "student"], "timestamp": [880_000_000] * 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  data_dir = write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80,
                                    num_movies=150, num_ratings=3000, seed=7)
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py", "user_id")
  assert cfg.features.query.user_id.kind == "id"
  cfg.data.dir = str(data_dir)
  cfg.data.download = False
  cfg.eval.baselines = False
  cfg.train.num_epochs = 1
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
  assert rec.id_columns() == ["user_id"]
  r = rec.recommend(EXPLICIT, 5)  # used to raise "Query features missing: ['user_id']"
  assert r.item_id.shape == (2, 5) and r.valid.all() and (r.item_id >= 0).all()
  notes = [m for m in caplog.messages if "out-of-vocabulary" in m]
  assert notes == ["No value for user_id (column 'user_id') in 2 of 2 queries: served through "
                   "the out-of-vocabulary index."]
  # The same as an unknown id, or None: all are the out-of-vocabulary row.
  no_id = rec.embed(EXPLICIT)
  np.testing.assert_array_equal(no_id, served_as(rec, NEW_USER))
  np.testing.assert_array_equal(no_id, served_as(rec, None))
  np.testing.assert_array_equal(no_id, served_as(rec, -1))
  assert not np.array_equal(no_id, served_as(rec, 3))  # a known user's own row differs


def test_unknown_ids_are_new_users_in_one_info_line(rec, caplog):
  caplog.set_level(logging.INFO, logger="twotower_jax.serving")
  rec.embed(dict(EXPLICIT, user_id=[NEW_USER, NEW_USER + 1]))
  assert [m for m in caplog.messages if "out-of-vocabulary" in m] == [
      f"Unknown value {NEW_USER} for user_id (column 'user_id') in 2 of 2 queries: served "
      "through the out-of-vocabulary index."]
  caplog.clear()
  rec.embed(dict(EXPLICIT, user_id=[3, NEW_USER]))  # a known id and an unknown one
  assert [m for m in caplog.messages if "out-of-vocabulary" in m] == [
      f"Unknown value {NEW_USER} for user_id (column 'user_id') in 1 of 2 queries: served "
      "through the out-of-vocabulary index."]


def test_query_for_a_new_user_uses_the_oov_id_and_the_features_given(rec, caplog):
  caplog.set_level(logging.INFO, logger="twotower_jax.serving")
  given = {"raw_user_age": 30.0, "user_gender": False, "user_occupation_text": "engineer",
           "timestamp": 880_000_000}
  want = rec.recommend({k: v[:1] for k, v in EXPLICIT.items()}, 3).item_id
  for user_id in (None, NEW_USER):
    caplog.clear()
    q = rec.query(user_id=user_id, values=given)  # used to refuse ("pass --user_id")
    assert q == {**{k: [v] for k, v in given.items()},
                 **({} if user_id is None else {"user_id": [NEW_USER]})}
    r = rec.recommend(q, 3)
    what = "No value" if user_id is None else f"Unknown value {NEW_USER}"
    assert [m for m in caplog.messages if "out-of-vocabulary" in m] == [
        f"{what} for user_id (column 'user_id') in 1 of 1 queries: served through the "
        "out-of-vocabulary index."]
    np.testing.assert_array_equal(r.item_id, want)
  # A known user's id still starts from that user's own features, overridden by the values.
  known = int(rec.users["user_key"][0])
  own = rec.query(user_id=known)
  assert own["user_id"] == [known]
  assert set(own) == set(rec.query_columns())
  for column, values in rec.user_features([known]).items():
    assert own[column] == values.tolist()
  older = rec.query(user_id=known, values={"raw_user_age": 70.0})
  assert older == {**own, "raw_user_age": [70.0]}
  assert rec.recommend(own, 3).valid.all()
  assert not np.array_equal(rec.embed(own), rec.embed(older))


def test_new_user_without_features_names_the_missing_columns(rec):
  with pytest.raises(serving.ServingError) as e:
    rec.query(user_id=NEW_USER, values={"raw_user_age": 30.0})
  assert str(e.value).startswith(f"User {NEW_USER} has no training interactions: a query needs "
                                 "['raw_user_age', 'user_gender', 'user_occupation_text', "
                                 "'timestamp']")
  assert str(e.value).endswith("; missing ['user_gender', 'user_occupation_text', "
                               "'timestamp'].")
  with pytest.raises(serving.ServingError, match=r"^No user given: .*; missing \['timestamp'\]\.$"):
    rec.query(values={k: v for k, v in EXPLICIT.items() if k != "timestamp"})


def test_cli_recommends_for_a_new_user_of_an_id_model(trained):
  workdir, _ = trained
  features = ["--age=30", "--gender=F", "--occupation=engineer", "--time=880000000"]
  outputs = []
  for extra in ([], [f"--user_id={NEW_USER}"]):
    proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--top_n=3", *features, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Top 3:") and len(proc.stdout.splitlines()) == 4
    info = [line for line in proc.stderr.splitlines() if "out-of-vocabulary" in line]
    what = "No value" if not extra else f"Unknown value {NEW_USER}"
    assert len(info) == 1 and info[0].endswith(
        f"{what} for user_id (column 'user_id') in 1 of 1 queries: served through the "
        "out-of-vocabulary index."), proc.stderr[-2000:]
    outputs.append(proc.stdout)
  assert outputs[0] == outputs[1]  # no id and an unknown id: the same new-user query


# ----------------------------------------------------------------------------
# 6. Validated columns: length, type, range; the column named, the expectation said.


GENDER_EXPECTED = (r"'user_gender' must be an integer \(or a boolean\), or None when unknown; "
                   r"got ")


@pytest.mark.parametrize("change, expected", [
    ({"raw_user_age": [30.0]}, r"'raw_user_age' has 1 value but the others have 2"),
    ({"user_gender": ["true", "X"]}, GENDER_EXPECTED + r"'X' \(row 1, str\)"),
    ({"user_gender": ["F", "M"]}, GENDER_EXPECTED + r"'F' \(row 0, str\)"),  # no M/F in Python
    ({"user_gender": np.array(["false", "M"])}, GENDER_EXPECTED + r"'M' \(row 1, str\)"),
    ({"user_gender": [False, 0.5]}, GENDER_EXPECTED + r"0.5 \(row 1, float\)"),
    ({"raw_user_age": [30.0, None]}, r"'raw_user_age' must be finite numbers; got None \(row 1"),
    ({"raw_user_age": ["30", "40"]}, r"'raw_user_age' must be finite numbers; got '30' \(row 0"),
    ({"raw_user_age": [30.0, True]}, r"'raw_user_age' must be finite numbers; got True \(row 1"),
    ({"raw_user_age": np.array([30.0, np.nan])}, r"'raw_user_age' must be a finite number; got "
                                                 r"nan \(row 1\)"),
    ({"timestamp": [880_000_000, np.inf]}, r"'timestamp' must be a finite number; got inf "
                                           r"\(row 1\)"),
    ({"user_occupation_text": ["engineer", 3.5]}, r"'user_occupation_text' must be text; got "
                                                  r"3.5 \(row 1, float\)"),
    ({"user_id": [1.5, 2]}, r"'user_id' must be an integer \(or a boolean\), or None when "
                            r"unknown; got 1.5 \(row 0, float\)"),
    ({"raw_user_age": [[30.0], [55.0]]}, r"'raw_user_age' must hold one value per query"),
    ({"timestamp": None}, r"'timestamp' has 1 value but the others have 2"),
])
def test_bad_columns_name_the_column_and_the_expectation(rec, change, expected):
  with pytest.raises(serving.ServingError, match=expected):
    rec.recommend(dict(EXPLICIT, **change), 3)


@pytest.mark.parametrize("change, unknown_row, note", [
    ({"user_gender": [None, True]}, 0, "No value for gender (column 'user_gender') in 1 of 2"),
    ({"user_gender": [False, 7]}, 1, "Unknown value 7 for gender (column 'user_gender') in 1 of "
                                     "2"),
    ({"user_occupation_text": ["engineer", 3]}, 1, "Unknown value '3' for occupation (column "
                                                   "'user_occupation_text') in 1 of 2"),
    ({"user_occupation_text": ["enginer", "student"]}, 0,
     "Unknown value 'enginer' for occupation (column 'user_occupation_text') in 1 of 2 "
     "queries: served through the out-of-vocabulary index. Did you mean 'engineer'?"),
])
def test_unknown_or_missing_categories_are_served_through_oov(rec, caplog, change, unknown_row,
                                                              note):
  """Unknown categories are not refused any more: one info line, recommendations as usual."""
  caplog.set_level(logging.INFO, logger="twotower_jax.serving")
  feats = dict(EXPLICIT, user_id=[3, 5], **change)  # known users: no note about the id
  r = rec.recommend(feats, 3)
  assert r.item_id.shape == (2, 3) and r.valid.all()
  notes = [m for m in caplog.messages if "out-of-vocabulary" in m]
  assert len(notes) == 1 and notes[0].startswith(note), caplog.messages
  assert notes[0].endswith("?" if "Did you mean" in note else
                           "served through the out-of-vocabulary index.")
  # The unknown row is served as the OOV row (like any other unknown value of the column);
  # the other row as given.
  column = next(iter(change))
  other_unknown = 12_345 if column == "user_gender" else "no-such-occupation"
  oov = rec.embed(dict(feats, **{column: [other_unknown] * 2}))
  given = rec.embed(dict(EXPLICIT, user_id=[3, 5]))
  got = rec.embed(feats)
  np.testing.assert_array_equal(got[unknown_row], oov[unknown_row])
  np.testing.assert_array_equal(got[1 - unknown_row], given[1 - unknown_row])
  assert not np.array_equal(got[unknown_row], given[unknown_row])


def test_missing_and_empty_columns(rec):
  with pytest.raises(serving.ServingError,
                     match=r"Query columns missing: \['timestamp'\]. This model needs "
                           r"\['raw_user_age', 'user_gender', 'user_occupation_text', 'timestamp', "
                           r"'user_id'\] \(\['user_id'\] may be left out: served as new\)."):
    rec.recommend({k: v for k, v in EXPLICIT.items() if k != "timestamp"}, 3)
  with pytest.raises(serving.ServingError, match="The query holds no values"):
    rec.recommend({k: [] for k in EXPLICIT}, 3)


def test_an_unknown_column_is_an_error_with_a_suggestion(rec):
  # A misspelt optional column would otherwise be left out silently (a new user).
  with pytest.raises(serving.ServingError,
                     match=r"Unknown query column 'user_idd'. Did you mean 'user_id'\? This "
                           r"model reads \['raw_user_age', "):
    rec.recommend(dict(EXPLICIT, user_idd=[1, 2]), 3)
  assert rec.recommend(dict(EXPLICIT, user_id=[1, 2]), 3).valid.all()


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_k_must_be_a_positive_integer(rec, k):
  with pytest.raises(serving.ServingError, match=r"k \(the number of recommendations\) must be "
                                                 r"an integer >= 1"):
    rec.recommend(EXPLICIT, k)


def test_gender_as_strings_booleans_or_ints(rec):
  want = rec.embed(dict(EXPLICIT, user_gender=[False, True]))
  for genders in ([0, 1], np.array([0, 1]), np.array([False, True]), ["false", "true"],
                  np.array(["false", "true"]), [" False", "TRUE "], [np.False_, np.True_]):
    np.testing.assert_array_equal(rec.embed(dict(EXPLICIT, user_gender=genders)), want)
  assert not np.array_equal(rec.embed(dict(EXPLICIT, user_gender=[True, True])), want)
  # "M"/"F" are no longer accepted in Python (the CLI's --gender=M/F shortcut still is).
  with pytest.raises(serving.ServingError, match=GENDER_EXPECTED + "'M'"):
    rec.embed(dict(EXPLICIT, user_gender=["M", "F"]))


def test_training_range_is_stored_and_checked(rec):
  assert feat.fit(spec.numeric("x"), np.array([3.0, 1.0, 2.0]))["min"] == 1.0
  lo, hi = feat.value_range(rec.encoders["age"])
  assert (lo, hi) == (7.0, 73.0)  # the synthetic users' ages
  for age, shown in ((-30.0, "-30"), (1e30, "1e+30"), (74.0, "74"), (6.5, "6.5")):
    with pytest.raises(serving.ServingError) as e:
      rec.recommend(dict(EXPLICIT, raw_user_age=[30.0, age]), 3)
    assert str(e.value) == (f"Query column 'raw_user_age' is {shown} (row 1), outside the "
                            "range seen in training: 7 to 73. Pass a value in that range.")
  # Timestamps are stored with their range but never rejected: a query comes after training.
  t_lo, t_hi = feat.value_range(rec.encoders["time"])
  assert t_lo < 880_000_000 < t_hi
  for times in ([t_lo, t_hi + 1], [t_lo - 86_400, t_hi + 365 * 86_400]):
    r = rec.recommend(dict(EXPLICIT, timestamp=times), 3)
    assert r.item_id.shape == (2, 3) and r.valid.all() and np.isfinite(r.score).all()
  # The bounds themselves are in range; data as-is (a later test period) skips the check.
  rec.recommend(dict(EXPLICIT, raw_user_age=[lo, hi], timestamp=[t_lo, t_hi]), 3)
  assert rec.recommend(dict(EXPLICIT, raw_user_age=[30.0, 300.0]), 3,
                       check_range=False).item_id.shape == (2, 3)


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
  assert rec.recommend(dict(EXPLICIT, raw_user_age=[30.0, 300.0]), 3).item_id.shape == (2, 3)
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
