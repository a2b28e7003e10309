"""The workdir's lifecycle: the run fingerprint, --overwrite, the lock."""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

import conftest
from conftest import write_synthetic_ml100k
from twotower_jax import config as config_lib
from twotower_jax import train
from twotower_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **overrides):
  return conftest.tiny_config(data_dir, **{"train.num_epochs": 1, "eval.baselines": False,
                                           **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80, num_movies=150,
                                num_ratings=3000, seed=7)


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
  """A finished 1-epoch run; tests work on copies (``copy_run``)."""
  workdir = tmp_path_factory.mktemp("finished") / "w"
  metrics = train.train_and_evaluate(tiny_config(data_dir), str(workdir))
  return workdir, metrics


def copy_run(finished, tmp_path) -> pathlib.Path:
  dst = tmp_path / "w"
  shutil.copytree(finished[0], dst)
  return dst


def snapshot(path: pathlib.Path) -> dict[str, tuple]:
  """Every file and folder under ``path`` with its size, mtime and content hash."""
  out = {}
  for p in sorted(path.rglob("*")):
    st = p.lstat()
    digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    out[str(p.relative_to(path))] = (st.st_size if p.is_file() else None, st.st_mtime_ns,
                                     digest)
  return out


def test_fingerprint_leaves_out_keys_that_do_not_change_the_result():
  cfg = config_lib.base_config()
  fp = workdir_lib.config_fingerprint(json.loads(cfg.to_json()))
  for key in ("train.progress", "train.checkpoint_every_steps", "train.max_checkpoints",
              "eval.batch_size", "serve.top_n", "serve.exclude_rated", "cpu_devices",
              "distributed", "coordinator_address", "num_processes", "process_id", "data.dir",
              "data.download"):
    assert key not in fp, key
  for key in ("seed", "optimizer.learning_rate", "model.mlp", "data.split", "train.num_epochs",
              "eval.ks", "data.source"):
    assert key in fp, key
  # A config written before a key existed reads that key's default.
  old = json.loads(cfg.to_json())
  del old["train"]["recency_half_life_days"]
  assert workdir_lib.config_fingerprint(old) == fp


def test_differences_list_every_key_and_the_data():
  old = {"config": {"seed": 1, "model.mlp": [64, 32], "optimizer.name": "adagrad"},
         "data": "sha256:a"}
  new = {"config": {"seed": 2, "model.mlp": [16], "optimizer.name": "adagrad"},
         "data": "sha256:b"}
  assert workdir_lib.differences(old, new) == [
      "seed 1 -> 2", "model.mlp (64, 32) -> (16,)", "data files"]
  assert workdir_lib.differences(old, old) == []
  assert workdir_lib.differences({**old, "data": None}, {**old, "data": "sha256:c"}) == []


def test_rerun_with_another_config_is_refused_before_touching_anything(finished, data_dir,
                                                                       tmp_path):
  workdir = copy_run(finished, tmp_path)
  before = snapshot(workdir)
  cfg = tiny_config(data_dir, **{"seed": 2, "model.mlp": (32, 16),
                                 "optimizer.learning_rate": 0.5})
  with pytest.raises(workdir_lib.WorkdirError) as e:
    train.train_and_evaluate(cfg, str(workdir))
  assert str(e.value) == (
      f"{workdir} holds a different run (differs in: seed 42 -> 2, model.mlp (16, 8) -> "
      "(32, 16), optimizer.learning_rate 0.1 -> 0.5). Use a new --workdir, or pass "
      "--overwrite to discard it.")
  assert snapshot(workdir) == before  # no write, no delete


def test_changed_data_files_are_named_and_moved_ones_are_not(finished, data_dir, tmp_path):
  workdir = copy_run(finished, tmp_path)
  moved = tmp_path / "moved"
  shutil.copytree(data_dir, moved)
  m = train.train_and_evaluate(tiny_config(moved), str(workdir))  # same files elsewhere
  assert m["resumed_from_step"] == m["steps"] == finished[1]["steps"]
  lines = (moved / "u.data").read_text().splitlines()
  user, movie, rating, t = lines[10].split("\t")
  lines[10] = "\t".join([user, movie, str(6 - int(rating)), t])
  (moved / "u.data").write_text("\n".join(lines) + "\n")
  before = snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirError, match=r"\(differs in: data files\)\. Use a new"):
    train.train_and_evaluate(tiny_config(moved), str(workdir))
  assert snapshot(workdir) == before


def test_keys_that_do_not_change_the_result_resume(finished, data_dir, tmp_path):
  workdir = copy_run(finished, tmp_path)
  cfg = tiny_config(data_dir, **{"train.progress": True, "train.checkpoint_every_steps": 3,
                                 "train.max_checkpoints": 5, "eval.batch_size": 64,
                                 "serve.top_n": 3, "cpu_devices": 1})
  m = train.train_and_evaluate(cfg, str(workdir))
  assert m["resumed_from_step"] == m["steps"] == finished[1]["steps"]
  assert m["top_10_accuracy"] == pytest.approx(finished[1]["top_10_accuracy"], abs=1e-9)


def test_workdir_of_an_older_version_is_compared_by_its_config_json(finished, data_dir,
                                                                     tmp_path):
  workdir = copy_run(finished, tmp_path)
  (workdir / workdir_lib.FINGERPRINT_FILE).unlink()
  before = snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"\(differs in: optimizer.learning_rate 0.1 -> 0.003\)"):
    train.train_and_evaluate(tiny_config(data_dir, **{"optimizer.learning_rate": 0.003}),
                             str(workdir))
  assert snapshot(workdir) == before
  m = train.train_and_evaluate(tiny_config(data_dir), str(workdir))
  assert m["resumed_from_step"] == m["steps"]
  assert (workdir / workdir_lib.FINGERPRINT_FILE).is_file()


def test_run_files_without_identity_are_refused(finished, data_dir, tmp_path):
  workdir = copy_run(finished, tmp_path)
  for name in (workdir_lib.FINGERPRINT_FILE, workdir_lib.CONFIG_FILE):
    (workdir / name).unlink()
  with pytest.raises(workdir_lib.WorkdirError, match="holds files of an unidentified run"):
    train.train_and_evaluate(tiny_config(data_dir), str(workdir))


def test_overwrite_discards_the_old_run(finished, data_dir, tmp_path):
  workdir = copy_run(finished, tmp_path)
  old_events = {p.name for p in (workdir / "tb").iterdir()}
  (workdir / "ranker_test.csv").write_text("an export of the old run\n")
  cfg = tiny_config(data_dir, **{"seed": 2, "train.checkpoint_every_steps": 1000})
  m = train.train_and_evaluate(cfg, str(workdir), overwrite=True)
  assert m["seed"] == 2 and m["resumed_from_step"] == 0
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1]
  # Only the new run's final checkpoint: the old run saved every 5 steps.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(m["steps"])]
  assert not old_events & {p.name for p in (workdir / "tb").iterdir()}
  assert json.loads((workdir / "config.json").read_text())["seed"] == 2
  stored = json.loads((workdir / workdir_lib.FINGERPRINT_FILE).read_text())
  assert stored["config"]["seed"] == 2
  assert json.loads((workdir / "metrics.json").read_text())["seed"] == 2
  assert not (workdir / "ranker_test.csv").exists()


HOLD_LOCK = r"""
import pathlib, sys, time
from twotower_jax import workdir
workdir.Lock(pathlib.Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_workdir_in_use_is_refused_and_a_dead_holder_is_taken_over(data_dir, tmp_path):
  workdir = tmp_path / "w"
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirError) as e:
      train.train_and_evaluate(tiny_config(data_dir), str(workdir))
    assert str(e.value).startswith(f"{workdir} is in use by process {holder.pid} (started ")
    assert str(e.value).endswith(").")
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # nothing written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lib.Lock(workdir):  # the kernel dropped the dead holder's lock
    info = json.loads((workdir / ".lock").read_text())
    assert info["pid"] == os.getpid()
  assert (workdir / ".lock").read_text() == ""  # released


def test_cli_refuses_another_run_then_overwrites_it(finished, data_dir, tmp_path):
  workdir = copy_run(finished, tmp_path)
  args = [sys.executable, "-m", "twotower_jax.main", "--config", "configs/tiny.py",
          f"--workdir={workdir}", f"--config.data.dir={data_dir}",
          "--config.data.download=False", "--config.train.num_epochs=1",
          "--config.eval.baselines=False", "--config.seed=3"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {workdir} holds a different run (differs in: seed 42 -> 3). Use a new "
      "--workdir, or pass --overwrite to discard it.")
  assert "Traceback" not in proc.stderr
  proc = subprocess.run([*args, "--overwrite"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["seed"] == 3 and metrics["resumed_from_step"] == 0
