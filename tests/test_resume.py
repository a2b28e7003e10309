"""Exact resume: a killed run restarted on its workdir ends where an uninterrupted one does."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cmd(data_dir, workdir, num_epochs=6):
  return [sys.executable, "-m", "twotower_jax.main", "--config", "configs/tiny.py",
          f"--workdir={workdir}", f"--config.data.dir={data_dir}", "--config.data.download=False",
          f"--config.train.num_epochs={num_epochs}", "--config.train.checkpoint_every_steps=4",
          "--config.eval.baselines=False"]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


def _steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80, num_movies=150,
                                num_ratings=3000, seed=4)


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_matches_uninterrupted(data_dir, tmp_path):
  full = tmp_path / "full"
  subprocess.run(_cmd(data_dir, full), cwd=REPO, env=_env(), check=True, capture_output=True,
                 timeout=600)
  want = json.loads((full / "metrics.json").read_text())

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(data_dir, killed), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  # Wait for a checkpoint that is not at an epoch boundary (19 steps per epoch), then kill.
  while time.time() < deadline and not [s for s in _steps(killed) if s >= 8 and s % 19]:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _steps(killed), "the run was killed before its first checkpoint"
  assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"

  subprocess.run(_cmd(data_dir, killed), cwd=REPO, env=_env(), check=True, capture_output=True,
                 timeout=600)
  got = json.loads((killed / "metrics.json").read_text())
  assert 0 < got["resumed_from_step"] < want["steps"]
  assert got["steps"] == want["steps"]
  for key in ("top_1_accuracy", "top_10_accuracy", "top_100_accuracy", "include_seen/mrr"):
    assert got[key] == pytest.approx(want[key], abs=1e-7), key
  # Each epoch's loss, the interrupted one included, is that of the whole epoch.
  want_rows = _epoch_losses(full)
  got_rows = _epoch_losses(killed)
  assert sorted(got_rows) == sorted(want_rows)
  for epoch, loss in want_rows.items():
    assert got_rows[epoch] == pytest.approx(loss, rel=1e-6), epoch


def _epoch_losses(workdir: pathlib.Path) -> dict[int, float]:
  """{epoch: loss} of metrics.jsonl (a repeated epoch: its last row)."""
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["epoch"]: r["loss"] for r in rows}


def _train_one_epoch(data_dir, workdir, **overrides):
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax import train  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py")
  cfg.data.dir = str(data_dir)
  cfg.data.download = False
  cfg.train.num_epochs = 1
  cfg.train.checkpoint_every_steps = 4
  cfg.eval.baselines = False
  return cfg, train.train_and_evaluate(cfg, str(workdir), **overrides)


def _damage(checkpoint: pathlib.Path) -> None:
  """Truncates the array data files of ``checkpoint`` to half their size."""
  data_files = [f for f in checkpoint.rglob("*") if f.is_file() and f.parent.name == "d"]
  assert data_files, sorted(checkpoint.rglob("*"))
  for f in data_files:
    with open(f, "r+b") as fh:
      fh.truncate(f.stat().st_size // 2)


def test_corrupt_latest_checkpoint_falls_back_quietly(data_dir, tmp_path):
  """One warning line, no traceback, also when several devices read the damaged
  checkpoint at once (TensorStore's reads then outlive orbax's event loop)."""
  workdir = tmp_path / "w"
  _train_one_epoch(data_dir, workdir)
  steps = _steps(workdir)
  assert len(steps) == 2
  _damage(workdir / "checkpoints" / str(steps[-1]))
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(_cmd(data_dir, workdir, num_epochs=1), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads((workdir / "metrics.json").read_text())
  assert got["resumed_from_step"] == steps[0] and got["devices"] == 2
  warnings = [x for x in proc.stderr.splitlines() if "could not be restored" in x]
  assert len(warnings) == 1, proc.stderr[-3000:]
  assert f"step {steps[-1]}" in warnings[0] and f"trying step {steps[0]}" in warnings[0]
  assert len(warnings[0]) < 400
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  assert "'driver'" not in proc.stderr  # no TensorStore spec dumped over many lines
  # The damaged checkpoint was replaced by the state the rerun reached at that step.
  from twotower_jax import checkpoints  # pylint: disable=g-import-not-at-top
  assert _steps(workdir)[-1] == steps[-1]
  assert checkpoints.load_params(workdir)


def test_no_readable_checkpoint_is_an_error_naming_the_way_out(data_dir, tmp_path, caplog):
  from twotower_jax import checkpoints  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "w"
  _train_one_epoch(data_dir, workdir)
  steps = _steps(workdir)
  for step in steps:
    _damage(workdir / "checkpoints" / str(step))
  with caplog.at_level("WARNING"):
    with pytest.raises(checkpoints.CheckpointError) as e:
      _train_one_epoch(data_dir, workdir)
  assert str(workdir) in str(e.value) and "--overwrite" in str(e.value)
  warnings = [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]
  assert len(warnings) == len(steps) and "none is left" in warnings[-1]
  assert all("\n" not in w for w in warnings)
  _, m = _train_one_epoch(data_dir, workdir, overwrite=True)
  assert m["resumed_from_step"] == 0
