"""The command line: training, recommend, export_ranker, and every bad input's message."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import GENRES, write_synthetic_ml100k

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


# One printed recommendation: "  <rank>. <score>  <title>  [<genre>, ...]".
RANKED = re.compile(r"^ +(\d+)\. +(-?\d+\.\d{3})  (.+)  \[(.*)\]$")


def ranked_lists(stdout):
  """{"Top 4": [(rank, score, title), ...], "Bottom 2": [...]} from recommend's output."""
  lists, current = {}, None
  for line in stdout.splitlines():
    if re.fullmatch(r"(Top|Bottom) \d+:", line):
      current = lists.setdefault(line[:-1], [])
    elif line.strip():
      match = RANKED.match(line)
      assert match and current is not None, f"unexpected line {line!r} in:\n{stdout}"
      current.append((int(match[1]), float(match[2]), match[3]))
  return lists


def titles_by_id(data_dir):
  """movie id -> title, read from u.item."""
  rows = (pathlib.Path(data_dir) / "u.item").read_bytes().decode("latin-1").splitlines()
  return {int(r.split("|")[0]): r.split("|")[1] for r in rows}


def rated_in_training(workdir, user_id):
  """Movie ids ``user_id`` rated in the training split, from the serving directory's users.npz
  (catalogue rows) and candidates.npz (the movie id of each row)."""
  with np.load(workdir / "serving" / "users.npz") as f, \
       np.load(workdir / "serving" / "candidates.npz") as c:
    row = int(np.flatnonzero(f["user_key"] == user_id)[0])
    ptr = f["rated_indptr"]
    return set(c["item_id"][f["rated_rows"][ptr[row]:ptr[row + 1]]].tolist())


def rated_in_u_data(data_dir, user_id):
  ratings = np.loadtxt(pathlib.Path(data_dir) / "u.data", dtype=np.int64)
  return set(ratings[ratings[:, 0] == user_id, 1].tolist())


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


def test_recommend_for_a_known_user(trained, data_dir):
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--user_id=3", "--top_n=4",
                 "--bottom_n=2", "--exclude_rated", check=True)
  assert proc.stdout.splitlines()[0] == "Top 4:"
  lists = ranked_lists(proc.stdout)
  assert list(lists) == ["Top 4", "Bottom 2"]
  top, bottom = lists["Top 4"], lists["Bottom 2"]
  assert [r for r, _, _ in top] == [1, 2, 3, 4] and [r for r, _, _ in bottom] == [1, 2]
  assert [s for _, s, _ in top] == sorted((s for _, s, _ in top), reverse=True)
  assert [s for _, s, _ in bottom] == sorted(s for _, s, _ in bottom)  # lowest first
  assert min(s for _, s, _ in top) >= max(s for _, s, _ in bottom)
  titles = [t for _, _, t in top + bottom]
  assert len(set(titles)) == 6
  # --exclude_rated: none of the printed movies is one user 3 rated in training.
  rated = rated_in_training(workdir, 3)
  assert rated and rated <= rated_in_u_data(data_dir, 3)
  title_of = titles_by_id(data_dir)
  assert not set(titles) & {title_of[m] for m in rated}


def test_exclude_rated_leaves_exactly_the_unrated_movies(trained, data_dir):
  """Asking for the whole catalogue (150 movies) prints every movie but the rated ones."""
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--user_id=3", "--top_n=150",
                 "--exclude_rated", check=True)
  top = ranked_lists(proc.stdout)["Top 150"]
  title_of = titles_by_id(data_dir)
  unrated = {t for m, t in title_of.items() if m not in rated_in_training(workdir, 3)}
  assert len(unrated) < 150
  assert [r for r, _, _ in top] == list(range(1, len(unrated) + 1))
  assert {t for _, _, t in top} == unrated


def test_recommend_from_explicit_features(trained):
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--age=30", "--gender=F",
                 "--occupation=engineer", "--time=880000000", "--top_n=3", check=True)
  assert proc.stdout.startswith("Top 3:")
  top = ranked_lists(proc.stdout)["Top 3"]
  assert [r for r, _, _ in top] == [1, 2, 3] and len({t for _, _, t in top}) == 3
  assert [s for _, s, _ in top] == sorted((s for _, s, _ in top), reverse=True)
  assert "out-of-vocabulary" not in proc.stderr  # every value known
  # The shortcuts set the columns of the query features: --query with them is the same query.
  query = json.dumps({"raw_user_age": 30, "user_gender": False,
                      "user_occupation_text": "engineer", "timestamp": 880000000})
  same = run_cli("--mode=recommend", f"--workdir={workdir}", f"--query={query}", "--top_n=3",
                 check=True)
  assert same.stdout == proc.stdout
  male = run_cli("--mode=recommend", f"--workdir={workdir}", "--age=30", "--gender=M",
                 "--occupation=engineer", "--time=880000000", "--top_n=3", check=True)
  assert ranked_lists(male.stdout)["Top 3"] != top  # --gender=F is False, M is True


def test_recommend_unknown_occupation_is_served_through_oov_with_one_info_line(trained):
  workdir, _ = trained
  features = ("--mode=recommend", f"--workdir={workdir}", "--age=30", "--gender=F",
              "--time=880000000")
  for occupation, hint in (("enginer", " Did you mean 'engineer'?"), ("astronaut", "")):
    proc = run_cli(*features, f"--occupation={occupation}", check=True)
    assert proc.stdout.startswith("Top 10:") and len(ranked_lists(proc.stdout)["Top 10"]) == 10
    info = [line for line in proc.stderr.splitlines() if "out-of-vocabulary" in line]
    assert len(info) == 1 and info[0].endswith(
        f"Unknown value {occupation!r} for occupation (column 'user_occupation_text') in 1 of "
        f"1 queries: served through the out-of-vocabulary index.{hint}"), proc.stderr
  # --allow_unknown is gone: unknown values are always served.
  proc = run_cli(*features, "--occupation=astronaut", "--allow_unknown")
  assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
  assert "Unknown command line flag 'allow_unknown'" in proc.stderr


def test_recommend_missing_features_names_them(trained):
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--age=30")
  assert proc.returncode == 2 and proc.stdout == ""
  assert ("error: No user given: a query needs ['raw_user_age', 'user_gender', "
          "'user_occupation_text', 'timestamp']") in proc.stderr
  # The part after "missing" lists exactly the columns not given, in order.
  assert proc.stderr.strip().endswith(
      "; missing ['user_gender', 'user_occupation_text', 'timestamp']."), proc.stderr
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--age=30", "--gender=F",
                 "--time=880000000")
  assert proc.returncode == 2
  assert proc.stderr.strip().endswith("; missing ['user_occupation_text']."), proc.stderr


def test_export_ranker_writes_top_n_per_query(trained, data_dir):
  workdir, _ = trained
  out = workdir / "ranker.csv"
  run_cli("--mode=export_ranker", f"--workdir={workdir}", "--top_n=7", "--max_queries=5",
          f"--export_path={out}", check=True)
  from twotower_jax import export  # pylint: disable=g-import-not-at-top
  cols = export.read_ranker_csv(out)
  assert list(cols) == [
      "query_index", "user_id", "raw_user_age", "user_gender", "user_occupation_text",
      "timestamp", "true_movie_id", "user_rating", "rank", "movie_id", "movie_title",
      "movie_genres", "movie_release_year", "retrieval_score", "label"]
  assert len(cols["movie_id"]) == 35
  assert sorted(set(cols["query_index"].tolist())) == ["0", "1", "2", "3", "4"]
  assert cols["rank"].tolist() == [str(r) for r in range(1, 8)] * 5
  assert set(cols["label"].tolist()) <= {"0", "1"}
  assert (cols["label"] == "1").tolist() == (cols["movie_id"] == cols["true_movie_id"]).tolist()
  assert set(cols["user_gender"].tolist()) <= {"true", "false"}
  assert all(g and set(g.split("|")) <= set(GENRES) for g in cols["movie_genres"])
  title_of = titles_by_id(data_dir)
  assert cols["movie_title"].tolist() == [title_of[int(m)] for m in cols["movie_id"]]


def test_unknown_config_key_suggests_the_right_one(data_dir, tmp_path):
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path}",
                 "--config.train.batch_sze=3")
  assert proc.returncode == 2
  assert "Unknown config key" in proc.stderr and "batch_sze" in proc.stderr
  assert "Did you mean 'batch_size'?" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_key_in_a_config_file(data_dir, tmp_path):
  cfg = tmp_path / "mine.py"
  cfg.write_text("from twotower_jax.config import base_config\n"
                 "def get_config():\n  c = base_config()\n  c.optimizer.lerning_rate = 1.0\n"
                 "  return c\n")
  proc = run_cli("--config", str(cfg), f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2
  assert "Unknown config key 'optimizer.lerning_rate'." in proc.stderr
  assert "Did you mean 'learning_rate'?" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                 "--config.data.download=False",
                 env={"TWOTOWER_DATA_DIR": str(empty), "XDG_CACHE_HOME": str(tmp_path / "c")})
  assert proc.returncode == 2
  assert str(empty) in proc.stderr and "Traceback" not in proc.stderr
  assert f"{empty} (from $TWOTOWER_DATA_DIR) lacks u.data, u.item, u.user" in proc.stderr
  # The fix: point the variable at the extracted files, or unset it to use the download cache.
  assert "Fix: point $TWOTOWER_DATA_DIR at the folder that holds the extracted" in proc.stderr
  assert f"unset it to use the cache {tmp_path / 'c'}" in proc.stderr


def test_malformed_line_names_file_and_line(data_dir, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(data_dir, bad)
  lines = (bad / "u.data").read_text().splitlines()
  lines[6] = "1\tnot-a-number\t3\t881250949"
  (bad / "u.data").write_text("\n".join(lines) + "\n")
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                 f"--config.data.dir={bad}", "--config.data.download=False")
  assert proc.returncode == 2
  assert f"{bad / 'u.data'}:7: field 2 (movie id) is 'not-a-number'" in proc.stderr
  assert f"Fix: correct or delete line 7 of {bad / 'u.data'}" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_recommend_without_a_trained_run(tmp_path):
  proc = run_cli("--mode=recommend", f"--workdir={tmp_path}", "--user_id=1")
  assert proc.returncode == 2 and "Train first" in proc.stderr


@pytest.mark.parametrize("flag, expected", [
    ("--age=-30", "error: Query column 'raw_user_age' is -30 (row 0), outside the range seen in "
                  "training: 7 to 73. Pass a value in that range."),
    ("--age=1e30", "error: Query column 'raw_user_age' is 1e+30 (row 0), outside the range seen "
                   "in training: 7 to 73. Pass a value in that range."),
    ("--age=nan", "error: Query column 'raw_user_age' must be a finite number; got nan (row 0)."),
])
def test_recommend_rejects_values_outside_the_training_range(trained, flag, expected):
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--gender=F",
                 "--occupation=engineer", "--time=880000000", flag)
  assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
  assert proc.stderr.strip().endswith(expected), proc.stderr


@pytest.mark.parametrize("flag", ["--time=100000000000000000000", "--time=-1"])
def test_recommend_serves_timestamps_outside_the_training_range(trained, flag):
  """Timestamps are not range-checked (a query comes after training); numbers still are."""
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--age=30", "--gender=F",
                 "--occupation=engineer", flag, "--top_n=3", check=True)
  top = ranked_lists(proc.stdout)["Top 3"]
  assert [r for r, _, _ in top] == [1, 2, 3] and len({t for _, _, t in top}) == 3
  assert "outside the range" not in proc.stderr and "error:" not in proc.stderr
  # Far beyond one training span either way: served with the value clipped, and said so.
  assert "more than one training span from the training times" in proc.stderr
  assert "its value is clipped to" in proc.stderr


@pytest.mark.parametrize("flag, expected", [
    ("--top_n=0", "--top_n=0: 0 is not a positive integer"),
    ("--top_n=-3", "--top_n=-3: -3 is not a positive integer"),
    ("--bottom_n=-1", "--bottom_n=-1: -1 is not a non-negative integer"),
])
def test_recommend_counts_must_be_positive(trained, flag, expected):
  workdir, _ = trained
  proc = run_cli("--mode=recommend", f"--workdir={workdir}", "--user_id=3", flag)
  assert proc.returncode == 2 and proc.stdout == ""  # used to print nothing with exit 0
  assert expected in proc.stderr, proc.stderr


def test_export_refuses_train_split_with_exclude_rated(trained, tmp_path):
  workdir, _ = trained
  out = tmp_path / "train.csv"
  proc = run_cli("--mode=export_ranker", f"--workdir={workdir}", "--export_split=train",
                 "--exclude_rated", "--top_n=5", "--max_queries=3", f"--export_path={out}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "--exclude_rated cannot be used with --export_split=train" in proc.stderr
  assert "every row would get label 0" in proc.stderr
  assert not out.exists()
  # Without --exclude_rated each training query's own movie can be retrieved (label 1).
  run_cli("--mode=export_ranker", f"--workdir={workdir}", "--export_split=train", "--top_n=150",
          "--max_queries=3", f"--export_path={out}", check=True)
  from twotower_jax import export  # pylint: disable=g-import-not-at-top
  assert export.read_ranker_csv(out)["label"].tolist().count("1") == 3


def test_export_top_n_zero_leaves_no_file(trained, tmp_path):
  workdir, _ = trained
  out = tmp_path / "ranker.csv"
  proc = run_cli("--mode=export_ranker", f"--workdir={workdir}", "--top_n=0",
                 f"--export_path={out}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "--top_n=0" in proc.stderr
  assert list(tmp_path.iterdir()) == []  # used to leave a header-only CSV


@pytest.fixture
def moved_run(trained, tmp_path):
  """A copy of the trained run whose data folder (pinned in config.json) has moved."""
  workdir, _ = trained
  run = tmp_path / "run"
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("checkpoints", "tb", "*.csv"))
  cfg = json.loads((run / "config.json").read_text())
  gone = tmp_path / "moved-away"
  cfg["data"]["dir"] = str(gone)
  (run / "config.json").write_text(json.dumps(cfg))
  return run, gone


def test_export_after_the_data_moved_advises_what_works(moved_run, data_dir):
  run, gone = moved_run
  args = ("--mode=export_ranker", f"--workdir={run}", "--top_n=3", "--max_queries=2")
  proc = run_cli(*args, env={"TWOTOWER_DATA_DIR": ""})
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert f"trained on the data in {gone} (config.json's data.dir), which does not exist" in (
      proc.stderr)
  assert "pass --data_dir=PATH or `export TWOTOWER_DATA_DIR=PATH`" in proc.stderr
  assert "--config.data.dir" not in proc.stderr  # export rejects that flag
  # Both fixes work: --data_dir, and $TWOTOWER_DATA_DIR once the pinned folder is gone.
  ok = run_cli(*args, f"--data_dir={data_dir}", env={"TWOTOWER_DATA_DIR": ""}, check=True)
  assert "Wrote 6 rows" in ok.stdout
  ok = run_cli(*args, env={"TWOTOWER_DATA_DIR": str(data_dir)}, check=True)
  assert "Wrote 6 rows" in ok.stdout
  assert f"{gone} does not exist: reading $TWOTOWER_DATA_DIR={data_dir} instead" in ok.stderr
  bad = run_cli(*args, f"--data_dir={gone}", env={"TWOTOWER_DATA_DIR": ""})
  assert bad.returncode == 2 and f"--data_dir={gone} does not exist" in bad.stderr
