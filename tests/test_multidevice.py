"""Data parallelism: 8 forced CPU devices train exactly like 1 (global in-batch negatives)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import jax, numpy as np
from twotower_jax import config as config_lib, train
from twotower_jax import input_pipeline
from twotower_jax import sharding
from twotower_jax import checkpoints
from twotower_jax import model as model_lib
variant = sys.argv[3]
# Beyond "dense": tiny.py with the user id, so both towers have an id table.
cfg = config_lib.load_config_file("configs/tiny.py", "" if variant == "dense" else "user_id")
cfg.data.dir = sys.argv[1]
cfg.data.download = False
cfg.train.num_epochs = 2
cfg.train.batch_size = 64
cfg.eval.baselines = False
if variant != "dense":
  cfg.optimizer.sparse_embeddings = "sparse" in variant
if "sharded" in variant:
  cfg.train.shard_embeddings = True
  cfg.model.table_rows_multiple = 8
  # The tables start and stay split by rows over the devices.
  prep = input_pipeline.prepare(cfg)
  model = model_lib.create_model(cfg.model, prep.query_features, prep.candidate_features)
  tables = [(tower, t) for tower, t, _ in model.sparse_tables()]
  assert tables == [("query", "user_id"), ("candidate", "title")], tables
  tx = train.create_optimizer(cfg.optimizer, 10)
  mesh = sharding.make_mesh()
  state = train.init_state(model, tx, prep, cfg, 0, mesh)
  step = train.make_step_fn(model, tx, cfg.loss, cfg.optimizer.sparse_embeddings,
                            jax.tree_util.tree_map(lambda x: x.sharding, state))
  idx, valid = input_pipeline.epoch_batches(len(prep.train_item), 64, 0, 0)
  state, _ = step(state, input_pipeline.device_data(prep, mesh), sharding.put_batches(idx, mesh),
                  sharding.put_batches(valid, mesh), 0)
  for tower, t in tables:
    spec = state.params[tower][t]["embedding"].sharding.spec
    assert tuple(spec) == ("data", None), (t, spec)
m = train.train_and_evaluate(cfg, sys.argv[2])
losses = [json.loads(l)["loss"] for l in open(sys.argv[2] + "/metrics.jsonl")]
leaves = [np.asarray(x, np.float64).ravel() for x in
          jax.tree_util.tree_leaves(checkpoints.load_params(sys.argv[2]))]
print(json.dumps({"devices": jax.device_count(), "losses": losses,
                  "params": np.concatenate(leaves).tolist(),
                  "hr100": m["top_100_accuracy"]}))
"""


def _run(devices: int, data_dir, workdir, variant: str = "dense") -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(data_dir), str(workdir), variant], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dense", "sharded", "sharded_sparse"])
def test_eight_devices_match_one(tmp_path, variant):
  """Also with sparse embedding updates (user-id and title rows gathered from the global
  batch) and with the user-id and title tables split by rows over the devices."""
  data_dir = write_synthetic_ml100k(tmp_path / "data", num_users=80, num_movies=150,
                                    num_ratings=3000, seed=3)
  one = _run(1, data_dir, tmp_path / "one", variant)
  eight = _run(8, data_dir, tmp_path / "eight", variant)
  assert one["devices"] == 1 and eight["devices"] == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  np.testing.assert_allclose(eight["params"], one["params"], rtol=1e-4, atol=1e-5)
  assert eight["hr100"] == pytest.approx(one["hr100"], abs=0.01)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sharded_sparse"])
def test_two_processes_match_one(tmp_path, variant):
  """jax.distributed over 2 local processes (1 CPU device each, each feeding its half of
  every batch) trains exactly like one process with 2 devices."""
  data_dir = write_synthetic_ml100k(tmp_path / "data", num_users=80, num_movies=150,
                                    num_ratings=3000, seed=3)
  one = _run(2, data_dir, tmp_path / "one", variant)
  workdir = tmp_path / "two"
  config = "configs/tiny.py" if variant == "dense" else "configs/tiny.py:user_id"
  extra = [] if variant == "dense" else [
      "--config.optimizer.sparse_embeddings=True",
      "--config.train.shard_embeddings=True", "--config.model.table_rows_multiple=8"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "twotower_jax.main", "--config", config,
       f"--workdir={workdir}", f"--config.data.dir={data_dir}", "--config.data.download=False",
       "--config.cpu_devices=1", "--config.train.batch_size=64", "--config.train.num_epochs=2",
       "--config.eval.baselines=False", "--config.distributed=True",
       f"--config.coordinator_address=localhost:{port}", "--config.num_processes=2",
       f"--config.process_id={rank}", *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for rank in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert "top-k accuracy" in outs[0] and "top-k accuracy" not in outs[1]  # process 0 reports
  losses = [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose(losses, one["losses"], rtol=1e-5)
  from twotower_jax import checkpoints  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  params = np.concatenate([np.asarray(x, np.float64).ravel()
                           for x in jax.tree_util.tree_leaves(checkpoints.load_params(workdir))])
  np.testing.assert_allclose(params, one["params"], rtol=1e-4, atol=1e-5)
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["devices"] == 2
  assert metrics["top_100_accuracy"] == pytest.approx(one["hr100"], abs=0.01)
