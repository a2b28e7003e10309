"""The command line: training, recommend, export_ranker, and every bad input's message."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, check=False):
  full_env = dict(os.environ, **(env or {}))
  full_env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run([sys.executable, "-m", "twotower_jax.main", *args], cwd=REPO,
                        env=full_env, capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80, num_movies=150,
                                num_ratings=3000, seed=2)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cli_run")
  proc = run_cli("--config", "configs/tiny.py", "--workdir", str(workdir),
                 f"--config.data.dir={data_dir}", "--config.data.download=False", check=True)
  return workdir, proc


def test_train_prints_metrics_table_and_sample_recommendations(trained):
  workdir, proc = trained
  assert "top-100" in proc.stdout and "popularity" in proc.stdout
  assert "training items excluded" in proc.stdout
  assert "Sample recommendations for user" in proc.stdout
  assert (workdir / "metrics.json").is_file()


def test_recommend_for_a_known_user(trained):
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--user_id=3", "--top_n=4",
                 "--bottom_n=2", "--exclude_rated", check=True)
  lines = proc.stdout.splitlines()
  assert lines[0] == "Top 4:" and "Bottom 2:" in lines
  ranked = [l for l in lines if l.strip()[:2].rstrip(".").isdigit()]
  assert len(ranked) == 6
  titles = [l.split("  ")[2] for l in ranked[:4]]
  assert len(set(titles)) == 4


def test_recommend_from_explicit_features(trained):
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--age=30", "--gender=F",
                 "--occupation=engineer", "--time=880000000", "--top_n=3", check=True)
  assert proc.stdout.startswith("Top 3:")


def test_recommend_unknown_occupation_is_an_error_with_the_known_values(trained):
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--age=30", "--gender=F",
                 "--occupation=enginer", "--time=880000000")
  assert proc.returncode == 2
  assert "Unknown occupation 'enginer'" in proc.stderr and "Did you mean 'engineer'" in proc.stderr
  ok = run_cli("--mode=recommend", f"--workdir={workdir}", "--age=30", "--gender=F",
               "--occupation=astronaut", "--time=880000000", "--allow_unknown", check=True)
  assert ok.stdout.startswith("Top 10:")


def test_recommend_missing_features_names_them(trained):
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--age=30")
  assert proc.returncode == 2 and "--gender" in proc.stderr and "--time" in proc.stderr


def test_export_ranker_writes_top_n_per_query(trained):
  workdir, _ = trained
  out = workdir / "ranker.csv"
  run_cli("--mode=export_ranker", f"--workdir={workdir}", "--top_n=7", "--max_queries=5",
          f"--export_path={out}", check=True)
  from twotower_jax import export  # pylint: disable=g-import-not-at-top
  cols = export.read_ranker_csv(out)
  assert len(cols["movie_id"]) == 35
  for name in ("user_id", "raw_user_age", "user_occupation_text", "timestamp", "movie_title",
               "movie_genres", "retrieval_score", "rank", "label"):
    assert name in cols
  assert sorted(set(cols["query_index"].tolist())) == ["0", "1", "2", "3", "4"]
  assert set(cols["label"].tolist()) <= {"0", "1"}


def test_unknown_config_key_suggests_the_right_one(data_dir, tmp_path):
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path}",
                 "--config.train.batch_sze=3")
  assert proc.returncode == 2
  assert "batch_size" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_key_in_a_config_file(data_dir, tmp_path):
  cfg = tmp_path / "mine.py"
  cfg.write_text("from twotower_jax.config import base_config\n"
                 "def get_config():\n  c = base_config()\n  c.optimizer.lerning_rate = 1.0\n"
                 "  return c\n")
  proc = run_cli("--config", str(cfg), f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2
  assert "optimizer.lerning_rate" in proc.stderr and "learning_rate" in proc.stderr


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                 "--config.data.download=False",
                 env={"TWOTOWER_DATA_DIR": str(empty), "XDG_CACHE_HOME": str(tmp_path / "c")})
  assert proc.returncode == 2
  assert str(empty) in proc.stderr and "Traceback" not in proc.stderr


def test_malformed_line_names_file_and_line(data_dir, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(data_dir, bad)
  lines = (bad / "u.data").read_text().splitlines()
  lines[6] = "1\tnot-a-number\t3\t881250949"
  (bad / "u.data").write_text("\n".join(lines) + "\n")
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                 f"--config.data.dir={bad}", "--config.data.download=False")
  assert proc.returncode == 2
  assert "u.data" in proc.stderr and "line 7" in proc.stderr


def test_recommend_without_a_trained_run(tmp_path):
  proc = run_cli("--mode=recommend", f"--workdir={tmp_path}", "--user_id=1")
  assert proc.returncode == 2 and "Train first" in proc.stderr
