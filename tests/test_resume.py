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


def _cmd(data_dir, workdir):
  return [sys.executable, "-m", "twotower_jax.main", "--config", "configs/tiny.py",
          f"--workdir={workdir}", f"--config.data.dir={data_dir}", "--config.data.download=False",
          "--config.train.num_epochs=6", "--config.train.checkpoint_every_steps=4",
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


def test_corrupt_latest_checkpoint_falls_back_to_previous(data_dir, tmp_path, caplog):
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from twotower_jax import train  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py")
  cfg.data.dir = str(data_dir)
  cfg.data.download = False
  cfg.train.num_epochs = 1
  cfg.train.checkpoint_every_steps = 4
  cfg.eval.baselines = False
  workdir = tmp_path / "w"
  train.train_and_evaluate(cfg, str(workdir))
  steps = _steps(workdir)
  assert len(steps) == 2
  latest = workdir / "checkpoints" / str(steps[-1])
  for f in latest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"garbage")
  cfg.train.num_epochs = 2
  with caplog.at_level("WARNING"):
    m = train.train_and_evaluate(cfg, str(workdir))
  assert m["resumed_from_step"] == steps[0]
  assert any("could not be restored" in r.getMessage() for r in caplog.records)
