"""Sparse embedding updates equal dense ones where the optimizer allows it."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax import features
from twotower_jax import sparse
from twotower_jax import train
from twotower_jax import input_pipeline
from twotower_jax import sharding
from twotower_jax import spec
from twotower_jax import model as model_lib
from conftest import load_benchmark, write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80, num_movies=150,
                                num_ratings=3000, seed=7)


def make_config(data_dir, variant="user_id", **overrides):
  """tiny.py's ``variant`` (default: with the user id, so both towers have an id table)."""
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py", variant)
  cfg.data.dir = str(data_dir)
  cfg.data.download = False
  cfg.eval.baselines = False
  cfg.train.batch_size = 64
  for key, value in overrides.items():
    config_lib.set_path(cfg, key, value)
  return cfg


def run_steps(cfg, sparse_embeddings: bool, steps: int = STEPS):
  """Jitted steps from the same initial state; returns every state and the losses."""
  prep = input_pipeline.prepare(cfg)
  model = model_lib.create_model(cfg.model, prep.query_features, prep.candidate_features)
  assert model.sparse_tables() == (("query", "user_id", ("xq",)),
                                   ("candidate", "title", ("xc", "extra_xc")))
  tx = train.create_optimizer(cfg.optimizer, 100)
  state = train.init_state(model, tx, prep, cfg, jax.random.key(0))
  data = input_pipeline.device_data(prep, sharding.make_mesh())
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx, loss_cfg=ml_collections.FrozenConfigDict(cfg.loss),
      sparse_embeddings=sparse_embeddings))
  idx, valid = input_pipeline.epoch_batches(len(prep.train_item), cfg.train.batch_size, 0, 0)
  states, losses = [state], []
  for i in range(steps):
    state, loss = step(state, data, idx[i], valid[i])
    states.append(jax.device_get(state))
    losses.append(float(loss))
  return states, losses, prep, idx


def assert_trees_close(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path),
                               **tol)


@pytest.mark.parametrize("overrides", [
    {"optimizer.name": "adagrad"},
    {"optimizer.name": "sgd", "optimizer.learning_rate": 0.5},
    # Extra negatives look titles up in a second batch; clipping sees the same global norm.
    {"optimizer.name": "adagrad", "loss.logq": "counts", "loss.num_uniform_negatives": 16,
     "optimizer.grad_clip_norm": 0.05},
], ids=["adagrad", "sgd", "adagrad_extra_negatives_clipped"])
def test_sparse_equals_dense(data_dir, overrides):
  cfg = make_config(data_dir, **overrides)
  dense, dense_losses, _, _ = run_steps(cfg, False)
  sparse_states, sparse_losses, _, _ = run_steps(cfg, True)
  np.testing.assert_allclose(sparse_losses, dense_losses, rtol=1e-5)
  assert dense_losses[-1] != dense_losses[0]  # the steps did change the model
  assert_trees_close(sparse_states[-1].params, dense[-1].params, rtol=1e-5, atol=1e-7)
  assert_trees_close(sparse_states[-1].opt_state, dense[-1].opt_state, rtol=1e-5, atol=1e-7)


def test_lazy_adam_leaves_unused_rows_alone(data_dir):
  cfg = make_config(data_dir, **{"optimizer.name": "adam", "optimizer.learning_rate": 0.01})
  lazy, _, prep, idx = run_steps(cfg, True)
  dense, _, _, _ = run_steps(cfg, False)
  def users(i):
    return prep.train_q["user_id"][idx[i]]
  earlier = np.unique(users(np.arange(STEPS - 1)))
  # Rows used before the last step but not in it.
  rows = np.setdiff1d(earlier, users(STEPS - 1))
  assert len(rows)
  def table(s):
    return np.asarray(s.params["query"]["user_id"]["embedding"])[rows]
  # Lazy Adam leaves them where they were; dense Adam keeps moving them by their momentum.
  np.testing.assert_array_equal(table(lazy[-1]), table(lazy[-2]))
  assert not np.allclose(table(dense[-1]), table(dense[-2]))
  # Rows the last step uses move in both.
  used = np.unique(users(STEPS - 1))
  assert not np.allclose(np.asarray(lazy[-1].params["query"]["user_id"]["embedding"])[used],
                         np.asarray(lazy[-2].params["query"]["user_id"]["embedding"])[used])


def test_unique_rows_remaps_and_pads():
  rows, inverse = sparse.unique_rows(jnp.array([7, 3, 7, 1]), num_rows=10)
  np.testing.assert_array_equal(rows, [1, 3, 7, 10])  # padded with the out-of-range id
  np.testing.assert_array_equal(np.asarray(rows)[np.asarray(inverse)], [7, 3, 7, 1])


def test_scatter_drops_padding_rows():
  full = {"candidate": {"title": {"embedding": jnp.zeros((4, 2))}}}
  rows = {("candidate", "title"): jnp.array([1, 4])}  # 4: a padding slot
  sub = {"candidate": {"title": {"embedding": jnp.ones((2, 2))}}}
  out = sparse.scatter(full, sub, rows,
                       sparse.shapes_of(full, (("candidate", "title", ("xc", "extra_xc")),)))
  np.testing.assert_array_equal(out["candidate"]["title"]["embedding"][:, 0], [0, 1, 0, 0])


def test_no_table_is_an_error(data_dir, tmp_path):
  # No feature of kind id: the title becomes a categorical feature, the user id is left out.
  cfg = make_config(data_dir, "", **{"features.candidate.title.kind": "categorical",
                                     "optimizer.sparse_embeddings": True})
  prep = input_pipeline.prepare(cfg)
  model = model_lib.create_model(cfg.model, prep.query_features, prep.candidate_features)
  assert model.sparse_tables() == ()
  with pytest.raises(ValueError, match="sparse_embeddings=True needs a feature of kind 'id'"):
    train.sparse_step(cfg, model)
  with pytest.raises(ValueError, match="sparse_embeddings=True needs a feature of kind 'id'"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
  cfg.optimizer.sparse_embeddings = False
  assert train.sparse_step(cfg, model) is False


def test_training_benchmark_compares_sparse_with_dense(tmp_path, capsys):
  bench = load_benchmark()
  out = tmp_path / "train.json"
  # The synthetic data have no demographics: the user id and time make up the query tower.
  synthetic = ["data.source=synthetic", "data.synthetic_users=300", "data.synthetic_items=500",
               "data.synthetic_interactions=5000", "data.split=random"]
  drop = ["query.age=none", "query.gender=none", "query.occupation=none"]
  rc = bench.main(["train", f"--config={REPO / 'configs' / 'tiny.py'}:user_id",
                   "--batch_sizes=64", "--epochs=1", "--max_steps=3",
                   *[f"--set={s}" for s in synthetic], *[f"--feature={f}" for f in drop],
                   "--compare=optimizer.sparse_embeddings=True", f"--out={out}"])
  assert rc == 0
  import json  # pylint: disable=g-import-not-at-top
  results = json.loads(out.read_text())["results"]
  assert [r["variant"] for r in results] == ["base", "optimizer.sparse_embeddings=True"]
  assert all(r["features"] == {"query": ["time", "user_id"], "candidate": ["genre", "title"]}
             for r in results), results
  assert all(r["bare_step_examples_per_second"] > 0 for r in results)
  assert "variant_over_base_bare_speed" in capsys.readouterr().out


def test_training_benchmark_reads_the_documented_feature_switches():
  """BENCHMARKS.md's command (--set features.user_id=True --set features.age=False ...)
  measures the same model as the --feature specs."""
  bt = load_benchmark("bench_train")
  cfg = bt.load_config(str(REPO / "configs" / "seed.py"))
  for item in ("features.age=False", "features.gender=False", "features.occupation=False",
               "features.user_id=True"):
    bt.override(cfg, item)
  assert bt.feature_names(cfg) == {"query": ["time", "user_id"], "candidate": ["genre", "title"]}
  assert cfg.features.query.user_id.to_dict() == spec.id("user_id", dim=32).to_dict()
  config_lib.validate(cfg)
  same = bt.load_config(str(REPO / "configs" / "seed.py"))
  for item in ("query.age=none", "query.gender=none", "query.occupation=none",
               "query.user_id=id('user_id', dim=32)"):
    bt.override(same, f"feature:{item}")
  assert same.to_dict() == cfg.to_dict()
  assert bt.feature_names(bt.load_config(f"{REPO / 'configs' / 'tiny.py'}:all")) == {
      "query": ["age", "gender", "occupation", "time", "user_id"],
      "candidate": ["genre", "release_year", "title", "title_words"]}
  with pytest.raises(ValueError, match="no feature 'age' to drop"):
    bt.override(same, "feature:query.age=none")
  with pytest.raises(ValueError, match="Unknown config key 'features.genres'"):
    bt.override(same, "features.genres=all")


def test_sharding_needs_rows_that_split(data_dir):
  cfg = make_config(data_dir, **{"train.shard_embeddings": True})
  prep = input_pipeline.prepare(cfg)
  tx = train.create_optimizer(cfg.optimizer, 10)
  # A device count that cannot divide the user-id table: its row count plus one.
  n = features.embedding_rows(prep.specs["query"], prep.encoders)["user_id"] + 1
  mesh = jax.sharding.AbstractMesh((n,), ("data",))

  def create_model():
    return model_lib.create_model(cfg.model, prep.query_features, prep.candidate_features)

  def abstract_state(model):
    return jax.eval_shape(lambda: train.init_state(model, tx, prep, cfg, 0))

  def rows(tower):
    return {f[0]: f[2] for f in tower.features}

  model = create_model()
  with pytest.raises(ValueError, match=f"table_rows_multiple to a multiple of {n}"):
    sharding.state_shardings(abstract_state(model), mesh, model.sparse_tables(), True)
  cfg.model.table_rows_multiple = n
  model = create_model()
  assert rows(model.query)["user_id"] == n
  assert rows(model.candidate)["title"] % n == 0
  # Only the id tables are padded.
  assert rows(model.query)["gender"] == {f[0]: f[2] for f in prep.query_features}["gender"] < n
  shardings = sharding.state_shardings(abstract_state(model), mesh, model.sparse_tables(), True)
  assert tuple(shardings.params["candidate"]["title"]["embedding"].spec) == ("data", None)
  assert tuple(shardings.params["candidate"]["mlp"]["dense_0"]["kernel"].spec) == ()
  # Adagrad's accumulator for the table is split like the table.
  acc = [s for p, s in jax.tree_util.tree_leaves_with_path(shardings.opt_state)
         if "title" in jax.tree_util.keystr(p)]
  assert acc and all(tuple(s.spec) == ("data", None) for s in acc)


def test_table_rows_multiple_must_be_positive(data_dir):
  cfg = make_config(data_dir, **{"model.table_rows_multiple": 0})
  prep = input_pipeline.prepare(cfg)
  with pytest.raises(ValueError, match="table_rows_multiple=0: use a positive int"):
    model_lib.create_model(cfg.model, prep.query_features, prep.candidate_features)
