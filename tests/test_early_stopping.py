"""Validation split and early stopping: the carve-out, the best parameters, resume."""

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import conftest
from conftest import write_synthetic_ml100k
from twotower_jax import checkpoints
from twotower_jax import config as config_lib
from twotower_jax import evaluate
from twotower_jax import features as feat
from twotower_jax import input_pipeline
from twotower_jax import train
from twotower_jax import workdir as workdir_lib
from twotower_jax.data import sources, splits

REPO = pathlib.Path(__file__).resolve().parents[1]
METRIC = "validation/exclude_seen/hr_100"
# What metrics.json holds besides the model's metrics, without a validation split.
RUN_KEYS = {"config", "split", "seed", "source", "num_train", "num_test", "num_candidates",
            "prepare_seconds", "train_seconds", "eval_seconds", "examples_per_second",
            "resumed_from_step", "steps", "devices", "backend"}
VALIDATION_KEYS = {"best_step", "best_validation/exclude_seen/hr_100", "stopped_early",
                   "num_validation", "validation_seconds"}


def tiny_config(data_dir, **overrides):
  return conftest.tiny_config(data_dir, **{"eval.baselines": False, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Enough movies (150) for top-100 metrics."""
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80,
                                num_movies=150, num_ratings=3000, seed=1)


def _pairs(cols) -> set[tuple[int, int]]:
  """(user, movie) of each rating; the synthetic data rates each pair at most once."""
  return set(zip(np.asarray(cols["user_id"]).tolist(), np.asarray(cols["movie_id"]).tolist()))


# ----------------------------------------------------------------------------
# The carve-out.


@pytest.mark.parametrize("split", ["random", "seed", "temporal", "leave_last_out"])
def test_validation_is_carved_out_of_training_only(data_dir, split):
  cfg = tiny_config(data_dir, **{"data.split": split, "data.validation_fraction": 0.25,
                                 "data.train_size": 2400, "data.test_size": 600})
  ds = sources.load_dataset(cfg.data)
  train0, test0 = sources.train_test(cfg.data, ds, cfg.seed)
  train, valid, test = sources.train_validation_test(cfg.data, ds, cfg.seed)
  n0 = len(train0["user_id"])
  assert len(valid["user_id"]) == round(0.25 * n0)
  assert len(train["user_id"]) + len(valid["user_id"]) == n0
  np.testing.assert_array_equal(test["user_id"], test0["user_id"])  # test is untouched
  np.testing.assert_array_equal(test["movie_id"], test0["movie_id"])
  tr, va, te = _pairs(train), _pairs(valid), _pairs(test)
  assert not tr & va and not va & te and not tr & te
  assert tr | va == _pairs(train0)
  if split in ("temporal", "leave_last_out"):  # the latest part of training, by time
    assert np.max(train["timestamp"]) <= np.min(valid["timestamp"])
  if split == "temporal":
    assert np.max(valid["timestamp"]) <= np.min(test["timestamp"])
  # Without a fraction, nothing is held out and train_test's split is returned.
  cfg.data.validation_fraction = 0.0
  train1, none, _ = sources.train_validation_test(cfg.data, ds, cfg.seed)
  assert none is None and _pairs(train1) == _pairs(train0)


def test_random_validation_is_seeded_and_differs_from_the_test_draw(data_dir):
  cfg = tiny_config(data_dir, **{"data.validation_fraction": 0.2})
  ds = sources.load_dataset(cfg.data)
  _, v1, _ = sources.train_validation_test(cfg.data, ds, 42)
  _, v2, _ = sources.train_validation_test(cfg.data, ds, 42)
  _, v3, _ = sources.train_validation_test(cfg.data, ds, 7)
  assert _pairs(v1) == _pairs(v2) and _pairs(v1) != _pairs(v3)


def test_user_temporal_validation_takes_each_users_latest_share():
  rng = np.random.default_rng(0)
  users = np.repeat(np.arange(1, 11), np.arange(1, 11))  # user u has u ratings
  ratings = {"user_id": rng.permutation(users), "timestamp": rng.integers(0, 1000, users.size)}
  train_idx, valid_idx = splits.validation_indices(ratings, "user_temporal", seed=0,
                                                   fraction=0.3)
  assert not np.intersect1d(train_idx, valid_idx).size
  assert train_idx.size + valid_idx.size == users.size
  for u in range(1, 11):
    tr = train_idx[ratings["user_id"][train_idx] == u]
    va = valid_idx[ratings["user_id"][valid_idx] == u]
    assert tr.size >= 1  # every user keeps a training rating
    assert va.size == min(int(np.floor(0.3 * u + 0.5)), u - 1)
    if va.size:
      assert ratings["timestamp"][tr].max() <= ratings["timestamp"][va].min()


def test_validation_fraction_leaving_nothing_is_an_error():
  ratings = {"user_id": np.arange(3), "timestamp": np.arange(3)}
  with pytest.raises(Exception, match="validation_fraction"):
    splits.validation_indices(ratings, "random", seed=0, fraction=0.1)


def _movie_only_in_validation(path: pathlib.Path, movie: int) -> None:
  """Moves every rating of ``movie`` to one time inside the validation window of a temporal
  split with 20% test and 20% validation (ranks 64%..80% by time)."""
  rows = [line.split("\t") for line in (path / "u.data").read_text("latin-1").splitlines()]
  t = sorted(int(r[3]) for r in rows)[int(0.72 * len(rows))]
  for r in rows:
    if int(r[1]) == movie:
      r[3] = str(t)
  (path / "u.data").write_text("".join("\t".join(r) + "\n" for r in rows), "latin-1")


def test_encoders_are_fitted_without_the_validation_part(tmp_path):
  data = write_synthetic_ml100k(tmp_path / "ml100k", num_users=80, num_movies=150,
                                num_ratings=3000, seed=1)
  movie = 7
  _movie_only_in_validation(data, movie)
  cfg = tiny_config(data, **{"data.split": "temporal", "data.validation_fraction": 0.25})
  prep = input_pipeline.prepare(cfg)
  row = int(np.flatnonzero(np.asarray(prep.item_ids_N) == movie)[0])
  assert row in prep.valid_item and row not in prep.train_item
  title = np.asarray(prep.dataset.movies["movie_title"])[row]
  assert feat.lookup(prep.encoders["title"], np.array([title]))[0] == 0  # out of vocabulary
  other = int(prep.train_item[0])
  other_title = np.asarray(prep.dataset.movies["movie_title"])[other]
  assert feat.lookup(prep.encoders["title"], np.array([other_title]))[0] > 0
  # Validation is encoded like test; users are indexed over all three splits.
  assert set(prep.valid_q) == set(prep.test_q)
  assert len(prep.valid_item) == len(prep.valid_user) == len(prep.validation["user_id"])
  assert max(prep.valid_user.max(), prep.train_user.max(), prep.test_user.max()) < prep.num_users
  # Without the carve-out the movie is in training, and so in the vocabulary.
  cfg.data.validation_fraction = 0.0
  prep0 = input_pipeline.prepare(cfg)
  assert prep0.valid_item is None and prep0.valid_q is None and prep0.validation is None
  assert feat.lookup(prep0.encoders["title"], np.array([title]))[0] > 0


# ----------------------------------------------------------------------------
# Config and fingerprint.


@pytest.mark.parametrize("overrides, says", [
    ({"train.patience": 3}, "train.patience=3: needs a validation split"),
    ({"train.eval_every_steps": 10}, "train.eval_every_steps=10: needs a validation split"),
    ({"data.validation_fraction": 1.0}, "data.validation_fraction=1.0: must be a number in "
                                        "[0, 1)"),
    ({"train.patience": -1, "data.validation_fraction": 0.1}, "train.patience=-1"),
    ({"train.early_stopping_metric": "hr_100"}, "must be a model metric"),
    ({"train.early_stopping_metric": "exclude_seen/coverage_10"}, "must be a model metric"),
    ({"train.early_stopping_metric": "exclude_seen/ndcg_20", "data.validation_fraction": 0.1},
     "its cutoff 20 is not one of"),
])
def test_bad_early_stopping_settings_are_config_errors(overrides, says):
  cfg = config_lib.base_config()
  for key, value in overrides.items():
    config_lib.set_path(cfg, key, value)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg)
  assert says in str(e.value)
  assert len(e.value.problems) == 1, e.value.problems


@pytest.mark.parametrize("metric", ["exclude_seen/hr_100", "include_seen/mrr", "top_10_accuracy",
                                    "exclude_seen/user/ndcg_10", "include_seen/recall_50"])
def test_good_early_stopping_settings_validate(metric):
  cfg = config_lib.base_config()
  for key, value in {"data.validation_fraction": 0.1, "train.patience": 2,
                     "train.eval_every_steps": 100, "train.early_stopping_metric": metric}.items():
    config_lib.set_path(cfg, key, value)
  config_lib.validate(cfg)


def test_patience_without_validation_stops_before_training(data_dir, tmp_path):
  cfg = tiny_config(data_dir, **{"train.patience": 2})
  with pytest.raises(config_lib.ConfigError, match="validation_fraction"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # nothing written


def test_new_keys_are_in_the_fingerprint_and_old_fingerprints_read_their_defaults(tmp_path):
  cfg = config_lib.base_config()
  fp = workdir_lib.fingerprint(cfg, "sha256:x")
  for key in ("data.validation_fraction", "train.patience", "train.eval_every_steps",
              "train.early_stopping_metric"):
    assert key in fp["config"], key
  old = {"config": {k: v for k, v in fp["config"].items()
                    if k not in ("data.validation_fraction", "train.patience")},
         "data": fp["data"]}
  (tmp_path / workdir_lib.FINGERPRINT_FILE).write_text(json.dumps(old))
  workdir_lib.check_same_run(tmp_path, fp)  # written before the keys existed: same run
  cfg.data.validation_fraction = 0.2
  with pytest.raises(workdir_lib.WorkdirError, match="data.validation_fraction 0.0 -> 0.2"):
    workdir_lib.check_same_run(tmp_path, workdir_lib.fingerprint(cfg, "sha256:x"))


# ----------------------------------------------------------------------------
# Training.


def _checkpoint_tree(workdir: pathlib.Path, step: int) -> dict:
  """The checkpoint at ``step`` as nested dicts of host arrays."""
  mngr = ocp.CheckpointManager((workdir / "checkpoints").absolute(),
                               item_handlers=ocp.StandardCheckpointHandler())
  try:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: (np.zeros(m.shape, m.dtype) if m.sharding is None
                   else jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)),
        mngr.item_metadata(step))
    return jax.device_get(mngr.restore(step, args=ocp.args.StandardRestore(target)))
  finally:
    mngr.close()


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _rows(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_tree(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# A learning rate high enough that the validation metric is best early, then wanders.
EARLY = {"data.validation_fraction": 0.2, "train.patience": 2, "train.num_epochs": 12,
         "optimizer.learning_rate": 1.0, "train.checkpoint_every_steps": 5,
         "train.max_checkpoints": 100}


@pytest.fixture(scope="module")
def early_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("early") / "w"
  cfg = tiny_config(data_dir, **EARLY)
  metrics = train.train_and_evaluate(cfg, str(workdir))
  return cfg, workdir, metrics


def test_early_stopping_stops_after_patience_and_restores_the_best(early_run):
  cfg, workdir, metrics = early_run
  on_disk = json.loads((workdir / "metrics.json").read_text())
  assert on_disk == pytest.approx(metrics)
  steps_per_epoch = -(-metrics["num_train"] // cfg.train.batch_size)
  assert metrics["stopped_early"] is True
  assert metrics["best_step"] < metrics["steps"] < steps_per_epoch * cfg.train.num_epochs
  assert metrics["num_validation"] > 0 and VALIDATION_KEYS <= set(metrics)
  # One evaluation per epoch, logged with its row; the stop came `patience` evaluations
  # after the best, none of which gained.
  rows = _rows(workdir)
  evals = [(r["step"], r[METRIC]) for r in rows]
  assert [s for s, _ in evals] == list(range(steps_per_epoch, metrics["steps"] + 1,
                                             steps_per_epoch))
  best = max(v for _, v in evals)
  assert (metrics["best_step"], best) == next((s, v) for s, v in evals if v == best)
  assert metrics["best_validation/exclude_seen/hr_100"] == best
  after = [v for s, v in evals if s > metrics["best_step"]]
  assert len(after) == cfg.train.patience and all(v <= best for v in after)
  assert all(r["best_step"] <= r["step"] for r in rows)
  # The final parameters (served, and what load_params gives) are the best step's.
  assert metrics["best_step"] in _steps(workdir) and metrics["steps"] in _steps(workdir)
  best_params = _checkpoint_tree(workdir, metrics["best_step"])["params"]
  _assert_same_tree(checkpoints.load_params(workdir), best_params)
  last = _checkpoint_tree(workdir, metrics["steps"])
  _assert_same_tree(last["best"]["params"], best_params)
  assert int(last["best"]["step"]) == metrics["best_step"]
  assert int(last["best"]["bad_evals"]) == cfg.train.patience
  # The test split was scored with them.
  run = train.create_setup(cfg)
  again = evaluate.evaluate(cfg, run.prep, run.model, best_params)
  for key in ("top_10_accuracy", "top_100_accuracy", "exclude_seen/mrr"):
    assert metrics[key] == pytest.approx(again[key], abs=1e-9), key


def test_rerun_of_a_stopped_run_trains_no_further(early_run, tmp_path):
  cfg, workdir, want = early_run
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  got = train.train_and_evaluate(cfg, str(copy))
  assert got["resumed_from_step"] == want["steps"] == got["steps"]
  for key in ("best_step", "stopped_early", "best_validation/exclude_seen/hr_100",
              "top_10_accuracy", "exclude_seen/mrr"):
    assert got[key] == want[key], key
  assert len(_rows(copy)) == len(_rows(workdir))  # no epoch ran


def test_resume_after_an_interruption_with_early_stopping_is_exact(early_run, tmp_path):
  """Killed mid-epoch after the best evaluation (checkpoints beyond it lost): the resumed
  run restores the best parameters and the count of evaluations without gain from its
  checkpoint, and ends as the uninterrupted run did."""
  cfg, workdir, want = early_run
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  steps_per_epoch = -(-want["num_train"] // cfg.train.batch_size)
  mid = max(s for s in _steps(copy) if s < want["best_step"] + steps_per_epoch + 10)
  assert want["best_step"] + steps_per_epoch < mid < want["steps"] and mid % steps_per_epoch
  for step in _steps(copy):
    if step > mid:
      shutil.rmtree(copy / "checkpoints" / str(step))
  (copy / "metrics.json").unlink()
  rows = (copy / "metrics.jsonl").read_text().splitlines()
  (copy / "metrics.jsonl").write_text("".join(x + "\n" for x in rows
                                              if json.loads(x)["step"] <= mid))
  got = train.train_and_evaluate(cfg, str(copy))
  assert got["resumed_from_step"] == mid
  for key in ("steps", "best_step", "stopped_early", "best_validation/exclude_seen/hr_100",
              "top_1_accuracy", "top_10_accuracy", "top_100_accuracy", "exclude_seen/mrr",
              "include_seen/ndcg_10"):
    assert got[key] == want[key], key
  got_rows, want_rows = _rows(copy), _rows(workdir)
  assert [(r["epoch"], r["step"], r["best_step"], r[METRIC]) for r in got_rows] == [
      (r["epoch"], r["step"], r["best_step"], r[METRIC]) for r in want_rows]
  assert [r["loss"] for r in got_rows] == pytest.approx([r["loss"] for r in want_rows],
                                                        rel=1e-6)
  _assert_same_tree(checkpoints.load_params(copy), checkpoints.load_params(workdir))


def test_evaluations_every_n_steps_are_logged_between_epochs(data_dir, tmp_path):
  cfg = tiny_config(data_dir, **{"data.validation_fraction": 0.2, "train.num_epochs": 1,
                                 "train.eval_every_steps": 4,
                                 "train.early_stopping_metric": "exclude_seen/ndcg_10"})
  metrics = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  rows = _rows(tmp_path / "w")
  key = "validation/exclude_seen/ndcg_10"
  evals = [r["step"] for r in rows if key in r]
  assert evals == [4, 8, 12, metrics["steps"]]  # and the last step
  assert [r["epoch"] for r in rows] == [1] * len(rows) and "epoch_seconds" in rows[-1]
  assert metrics["stopped_early"] is False  # patience 0: never stops early
  assert metrics["best_step"] in evals


def test_without_validation_nothing_changes(data_dir, tmp_path):
  cfg = tiny_config(data_dir, **{"train.num_epochs": 1})
  metrics = train.train_and_evaluate(cfg, str(tmp_path / "w"))
  on_disk = json.loads((tmp_path / "w" / "metrics.json").read_text())
  run = train.create_setup(cfg)
  model_keys = set(evaluate.evaluate(cfg, run.prep, run.model,
                                     checkpoints.load_params(tmp_path / "w")))
  assert set(on_disk) == RUN_KEYS | model_keys  # the model's metrics and the run's, no more
  assert not [k for k in on_disk if "valid" in k or "best" in k or "stopped" in k]
  rows = _rows(tmp_path / "w")
  assert [set(r) for r in rows] == [{"epoch", "step", "loss", "examples_per_second",
                                     "epoch_seconds"}]
  tree = _checkpoint_tree(tmp_path / "w", metrics["steps"])
  assert "best" not in tree
  _assert_same_tree(checkpoints.load_params(tmp_path / "w"), tree["params"])


def test_the_stopping_metric_cutoff_matters_only_with_a_validation_split():
  cfg = config_lib.base_config()
  cfg.eval.ks = (1, 5, 10, 20)  # no 100, the default metric's cutoff: fine without validation
  config_lib.validate(cfg)
