"""Data parallelism: 8 forced CPU devices train exactly like 1 (global in-batch negatives)."""

import json
import os
import pathlib
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
cfg = config_lib.load_config_file("configs/tiny.py")
cfg.data.dir = sys.argv[1]
cfg.data.download = False
cfg.train.num_epochs = 2
cfg.train.batch_size = 64
cfg.eval.baselines = False
if sys.argv[3] == "sparse":
  cfg.features.user_id = True
  cfg.optimizer.sparse_embeddings = True
m = train.train_and_evaluate(cfg, sys.argv[2])
losses = [json.loads(l)["loss"] for l in open(sys.argv[2] + "/metrics.jsonl")]
leaves = [np.asarray(x, np.float64).ravel() for x in
          jax.tree_util.tree_leaves(train.load_params(sys.argv[2]))]
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
@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_eight_devices_match_one(tmp_path, variant):
  """Also with sparse embedding updates (user-id and title rows gathered from the global batch)."""
  data_dir = write_synthetic_ml100k(tmp_path / "data", num_users=80, num_movies=150,
                                    num_ratings=3000, seed=3)
  one = _run(1, data_dir, tmp_path / "one", variant)
  eight = _run(8, data_dir, tmp_path / "eight", variant)
  assert one["devices"] == 1 and eight["devices"] == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  np.testing.assert_allclose(eight["params"], one["params"], rtol=1e-4, atol=1e-5)
  assert eight["hr100"] == pytest.approx(one["hr100"], abs=0.01)
