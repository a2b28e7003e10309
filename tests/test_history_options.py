"""The history feature's options: side columns, time since, dropout, the GRU encoder and a
table shared with the candidate tower, each trained, checked against a slow reference, and
served as evaluation sees it."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, write_synthetic_ml100k
from twotower_jax import checkpoints
from twotower_jax import features as feat
from twotower_jax import input_pipeline
from twotower_jax import model as model_lib
from twotower_jax import serving
from twotower_jax import spec
from twotower_jax import train

L = 10  # the tiny history's max_len


def options_config(data_dir, **options):
  """configs/tiny.py:history (mean or ``encoder``) with the history ``options`` on; a
  ``share`` adds the candidate feature "movie" (the item key, the history's dim)."""
  cfg = tiny_config(data_dir, "history")
  cfg.data.split = "temporal"
  cfg.eval.ks = (1, 5, 10, 20)
  h = cfg.features.query.history
  for key, value in options.items():
    h[key] = value
  if options.get("share"):
    cfg.features.candidate["movie"] = spec.id("movie_id", dim=h.dim)
  return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml"), num_ratings=1200)


@pytest.fixture(scope="module")
def side_prep(data_dir):
  return input_pipeline.prepare(options_config(data_dir, side=("user_rating",),
                                               time_since=True))


# ----------------------------------------------------------------------------
# Training with each option.


OPTIONS = {
    "side": dict(side=("user_rating",)),
    "time_since": dict(time_since=True),
    "attention_dropout": dict(encoder="attention", dropout=0.3, side=("user_rating",),
                              time_since=True),
    "gru": dict(encoder="gru"),
    "shared": dict(share="movie"),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_trains_a_few_steps_with_a_finite_loss(data_dir, name):
  cfg = options_config(data_dir, **OPTIONS[name])
  s = train.create_setup(cfg)
  idx, valid = input_pipeline.epoch_batches(len(s.prep.train_item), cfg.train.batch_size,
                                            cfg.seed, 0)
  state, losses = s.state, []
  for i in range(3):
    state, loss = s.step_fn(state, s.data, idx, valid, i)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  hist = state.params["query"].get("history", {})  # a shared mean history has no param
  assert ("per_position" in hist) == (name not in ("gru", "shared"))
  assert ("gru" in hist) == (name == "gru")
  assert ("items" in hist) == (name != "shared")
  assert int(state.step) == 3
  before = jax.tree_util.tree_leaves(s.state.params)  # the step moved every parameter group
  assert all(not np.array_equal(x, y) for x, y in zip(before,
                                                      jax.tree_util.tree_leaves(state.params)))


# ----------------------------------------------------------------------------
# Side columns and time since against a slow reference.


def reference_windows(prep, part: str):
  """Per interaction of ``part`` ("train" or "test"): the (item key, rating, time) of the
  user's last L interactions strictly before it (training ones only for a training
  interaction; training and test ones for a test interaction), oldest first."""
  ds = prep.dataset
  events = {}
  for p, cols in (("train", prep.train), ("test", prep.test)):
    for i in range(len(cols[ds.item_key])):
      events.setdefault(int(cols[ds.user_key][i]), []).append(
          (int(cols[ds.time_key][i]), p == "test", i, int(cols[ds.item_key][i]),
           float(cols["user_rating"][i])))
  cols = prep.train if part == "train" else prep.test
  out = []
  for i in range(len(cols[ds.item_key])):
    t = int(cols[ds.time_key][i])
    known = sorted(e for e in events[int(cols[ds.user_key][i])]
                   if e[0] < t and (part == "test" or not e[1]))
    out.append((t, [(e[3], e[4], e[0]) for e in known][-L:]))
  return out


def check_against_reference(prep, xq, part):
  enc = prep.encoders["history"]
  vocab = enc["vocab"]
  mean, std = enc["side_mean"][0], enc["side_std"][0]
  checked = 0
  for b, (t, want) in enumerate(reference_windows(prep, part)):
    n = len(want)
    ids = xq["history"][b]
    assert (ids[:L - n] == -1).all()
    assert [int(vocab[r - 1]) for r in ids[L - n:]] == [w[0] for w in want]
    side = xq["history" + feat.SIDE_SUFFIX][b, :, 0]
    np.testing.assert_allclose(side[L - n:], [(w[1] - mean) / std for w in want], rtol=1e-5,
                               atol=1e-5)
    assert (side[:L - n] == 0).all()
    since = xq["history" + feat.TIME_SINCE_SUFFIX][b]
    days = np.array([(t - w[2]) / 86400.0 for w in want])
    assert (days > 0).all()  # strictly before the query
    np.testing.assert_allclose(since[L - n:],
                               (np.log1p(days) - enc["time_mean"]) / enc["time_std"],
                               rtol=1e-4, atol=1e-4)
    assert (since[:L - n] == 0).all()
    checked += n
  assert checked > 100


def test_side_and_time_since_line_up_with_test_windows(side_prep):
  check_against_reference(side_prep, side_prep.test_q, "test")


def test_side_and_time_since_line_up_with_training_windows_on_host_and_device(side_prep):
  n = len(side_prep.train_item)
  host = input_pipeline.query_inputs(side_prep, np.arange(n))
  check_against_reference(side_prep, host, "train")
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  data = input_pipeline.device_data(side_prep, mesh)
  idx = np.arange(0, n, 3).astype(np.int32)
  batch = train.gather_batch(data, idx, jax.random.key(0), 0)
  for key in ("history", "history" + feat.SIDE_SUFFIX, "history" + feat.TIME_SINCE_SUFFIX):
    np.testing.assert_allclose(np.asarray(batch["xq"][key]), host[key][idx], rtol=1e-5,
                               atol=1e-5, err_msg=key)
  assert not any("/" in k for k in batch["xq"])


def test_time_since_statistics_come_from_training_windows_only(side_prep):
  enc = side_prep.encoders["history"]
  host = input_pipeline.query_inputs(side_prep, np.arange(len(side_prep.train_item)))
  valid = host["history"] >= 0
  since = host["history" + feat.TIME_SINCE_SUFFIX][valid]  # normalized by the stats
  assert abs(since.mean()) < 1e-3 and abs(since.std() - 1) < 1e-3
  ratings = np.asarray(side_prep.train["user_rating"], np.float64)
  np.testing.assert_allclose(enc["side_mean"], [ratings.mean()])
  np.testing.assert_allclose(enc["side_std"], [ratings.std()])


# ----------------------------------------------------------------------------
# Dropout and the GRU.


def history_module(**kw):
  return model_lib.History(rows=20, dim=8, **kw)


@pytest.mark.parametrize("encoder", ["mean", "attention"])
def test_side_and_time_since_enter_each_position_beside_its_item(encoder):
  m = history_module(encoder=encoder, side=2, time_since=True)
  ids = jnp.asarray([[-1, -1, 3, 4, 5], [-1, -1, -1, -1, -1], [1, 2, 3, 4, 5]])
  side = jax.random.normal(jax.random.key(1), (3, 5, 2))
  since = jax.random.normal(jax.random.key(2), (3, 5))
  params = m.init(jax.random.key(0), ids, side, since)
  out = m.apply(params, ids, side, since)
  p = params["params"]
  x = jnp.concatenate([side, since[..., None]], -1)
  per_pos = p["items"]["embedding"][jnp.maximum(ids, 0)] + x @ p["per_position"]["kernel"] \
      + p["per_position"]["bias"]
  valid = (ids >= 0)[..., None]
  np.testing.assert_allclose(out[:, 8:], jnp.where(valid, per_pos, 0)[:, -1], rtol=1e-5,
                             atol=1e-6)  # the most recent position's own vector
  if encoder == "mean":  # the mean over the valid positions
    n = jnp.maximum(valid.sum(1), 1)
    np.testing.assert_allclose(out[:, :8], jnp.where(valid, per_pos, 0).sum(1) / n,
                               rtol=1e-5, atol=1e-6)
  # Padding positions' side values and times do not matter.
  noise = jnp.where(ids[..., None] >= 0, 0.0, 100.0)
  np.testing.assert_allclose(m.apply(params, ids, side + noise, since + noise[..., 0]), out,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="takes 2 side columns per position"):
    m.apply(params, ids, None, since)


def test_dropout_is_off_at_evaluation_and_on_in_training():
  m = history_module(encoder="attention", dropout=0.5)
  ids = jnp.asarray([[-1, -1, 3, 4, 5], [1, 2, 3, 4, 5]])
  params = m.init(jax.random.key(0), ids)
  a, b = m.apply(params, ids), m.apply(params, ids)
  np.testing.assert_array_equal(a, b)
  t1 = m.apply(params, ids, train=True, rngs={"dropout": jax.random.key(1)})
  t2 = m.apply(params, ids, train=True, rngs={"dropout": jax.random.key(2)})
  t1_again = m.apply(params, ids, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(t1, a) and not np.allclose(t1, t2)
  np.testing.assert_array_equal(t1, t1_again)


def test_dropout_in_the_train_step_is_drawn_from_the_state_and_leaves_its_key_chain(data_dir):
  cfg = options_config(data_dir, encoder="attention", dropout=0.3)
  s = train.create_setup(cfg)
  idx, valid = input_pipeline.epoch_batches(len(s.prep.train_item), cfg.train.batch_size,
                                            cfg.seed, 0)
  rng0 = np.asarray(jax.random.key_data(s.state.rng))
  batch = train.gather_batch(s.data, idx[0], jax.random.split(s.state.rng)[1], 0)
  frozen = train.ml_collections.FrozenConfigDict(cfg.loss)
  kw = dict(model=s.model, loss_cfg=frozen)
  det = train.loss_fn(s.state.params, s.state, s.data, batch, valid[0], **kw)
  assert float(det) == float(train.loss_fn(s.state.params, s.state, s.data, batch, valid[0],
                                           **kw))
  drop = train.loss_fn(s.state.params, s.state, s.data, batch, valid[0],
                       dropout_rng=jax.random.fold_in(s.state.rng, train.DROPOUT_STREAM), **kw)
  assert float(drop) != float(det)
  # The same state gives the same step (a resumed run repeats it exactly) ...
  copy = jax.tree_util.tree_map(jnp.copy, s.state)
  state_a, loss_a = s.step_fn(s.state, s.data, idx, valid, 0)
  state_b, loss_b = s.step_fn(copy, s.data, idx, valid, 0)
  assert float(loss_a) == float(loss_b) == pytest.approx(float(drop), rel=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(state_a.params),
                  jax.tree_util.tree_leaves(state_b.params)):
    np.testing.assert_array_equal(x, y)
  # ... and its key chain is the one a model without dropout follows.
  want = np.asarray(jax.random.key_data(jax.random.split(jax.random.wrap_key_data(rng0))[0]))
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(state_a.rng)), want)


def test_dropout_training_resumed_from_a_checkpoint_matches_an_uninterrupted_run(data_dir,
                                                                                 tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  cfg = options_config(data_dir, encoder="attention", dropout=0.3)
  s = train.create_setup(cfg)
  idx, valid = input_pipeline.epoch_batches(len(s.prep.train_item), cfg.train.batch_size,
                                            cfg.seed, 0)
  fresh = lambda: jax.tree_util.tree_map(jnp.copy, s.state)  # noqa: E731
  straight = fresh()
  for i in range(4):
    straight, _ = s.step_fn(straight, s.data, idx, valid, i)
  half = fresh()
  for i in range(2):
    half, _ = s.step_fn(half, s.data, idx, valid, i)
  mngr = checkpoints.checkpoint_manager(tmp_path, 2)
  mngr.save(2, args=ocp.args.StandardSave(half), force=True)
  mngr.wait_until_finished()
  resumed = checkpoints.restore_latest(checkpoints.checkpoint_manager(tmp_path, 2), fresh())
  assert int(resumed.step) == 2
  for i in range(2, 4):
    resumed, _ = s.step_fn(resumed, s.data, idx, valid, i)
  for x, y in zip(jax.tree_util.tree_leaves((straight.params, straight.opt_state)),
                  jax.tree_util.tree_leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(jax.random.key_data(straight.rng),
                                jax.random.key_data(resumed.rng))


def gru_reference(params, e_LxD):
  """The GRU run step by step over the given (valid) positions from a zero state."""
  cell = nn.GRUCell(8)
  h = jnp.zeros(8)
  for x in e_LxD:
    h, _ = cell.apply({"params": params}, h, x)
  return h


def test_gru_ignores_left_padding_and_equals_a_step_by_step_run():
  m5 = history_module(encoder="gru")
  ids5 = jnp.asarray([[-1, -1, 3, 4, 5], [-1, -1, -1, -1, -1], [1, 2, 3, 4, 5]])
  params = m5.init(jax.random.key(0), ids5)
  out5 = m5.apply(params, ids5)
  out3 = history_module(encoder="gru").apply(params, jnp.asarray([[3, 4, 5]]))
  np.testing.assert_allclose(out5[0], out3[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out5[1], np.zeros(16))  # no history: zeros
  table = params["params"]["items"]["embedding"]
  gru = params["params"]["gru"]
  np.testing.assert_allclose(out5[0, :8], gru_reference(gru, table[jnp.asarray([3, 4, 5])]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out5[2, :8], gru_reference(gru, table[jnp.arange(1, 6)]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out5[0, 8:], table[5], rtol=1e-6)  # the last item beside it


# ----------------------------------------------------------------------------
# A table shared with the candidate tower.


def test_shared_table_is_one_table_and_both_towers_reach_it(data_dir):
  cfg = options_config(data_dir, share="movie")
  s = train.create_setup(cfg)
  enc = s.prep.encoders
  np.testing.assert_array_equal(enc["history"]["vocab"], enc["movie"]["vocab"])
  params = s.state.params
  assert "history" not in params["query"]  # a mean over the shared table: no own param
  tables = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if "embedding" in jax.tree_util.keystr(k)]
  assert [k for k in tables if "movie" in k or "history" in k] == [
      "['candidate']['movie']['embedding']"], tables
  xq = input_pipeline.query_inputs(s.prep, np.arange(64))
  xc = {k: v[:5] for k, v in s.prep.cand.items()}

  def grad_rows(fn):
    g = jax.grad(lambda p: fn(p).sum())(params)
    return set(np.flatnonzero(np.abs(np.asarray(g["candidate"]["movie"]["embedding"])).sum(1)))

  from_query = grad_rows(lambda p: model_lib.embed_queries(p, xq, model=s.model))
  from_cand = grad_rows(lambda p: model_lib.embed_candidates(p, xc, model=s.model))
  assert from_query == set(np.unique(xq["history"][xq["history"] >= 0]).tolist())
  assert from_cand == set(np.asarray(xc["movie"]).tolist())
  # The standalone query tower (serving) reads a copy of the same table.
  q = model_lib.query_tower_params(s.model, params)
  np.testing.assert_array_equal(q["history"]["items"]["embedding"],
                                params["candidate"]["movie"]["embedding"])


@pytest.mark.parametrize("problem, message", [
    (dict(share="nope"), "no candidate feature of that name"),
    (dict(share="genre"), "must be an id feature of the item key"),
    (dict(share="movie", dim=4), "dims differ"),
])
def test_shared_table_problems_are_named(data_dir, problem, message):
  cfg = options_config(data_dir, share="movie")
  cfg.features.query.history.share = problem["share"]
  if "dim" in problem:
    cfg.features.query.history.dim = problem["dim"]
  with pytest.raises(spec.SpecError, match=message):
    input_pipeline.prepare(cfg)


@pytest.mark.parametrize("options, message", [
    (dict(side="user_rating"), "side="),
    (dict(dropout=1.0), "dropout=1.0: must be a rate"),
    (dict(encoder="lstm"), "encoder='lstm': must be one of mean, attention, gru"),
    (dict(time_since="yes"), "time_since='yes'"),
])
def test_bad_option_values_are_named(options, message):
  with pytest.raises(spec.SpecError, match=message):
    spec.check_specs("query", {"h": spec.history("movie_id", **options)})


def test_a_missing_side_column_is_named(data_dir):
  cfg = options_config(data_dir, side=("user_ratin",))
  with pytest.raises(Exception, match="side column 'user_ratin' is not in the interactions"):
    input_pipeline.prepare(cfg)


# ----------------------------------------------------------------------------
# Serving equals evaluation.


def item_keys(prep, rows_BxL):
  vocab = prep.encoders["history"]["vocab"]
  return [[int(vocab[r - 1]) for r in row if r >= 0] for row in rows_BxL]


def served_history_columns(prep):
  """The test queries' histories as a caller gives them: item keys, their ratings and
  times (from the reference), and the query time."""
  ref = reference_windows(prep, "test")
  return {"history": [[w[0] for w in h] for _, h in ref],
          "history.user_rating": [[w[1] for w in h] for _, h in ref],
          "history.time": [[w[2] for w in h] for _, h in ref],
          prep.dataset.time_key: np.asarray(prep.test[prep.dataset.time_key])}


@pytest.mark.parametrize("options", [
    dict(encoder="attention", side=("user_rating",), time_since=True, dropout=0.2),
    dict(encoder="gru", side=("user_rating",), time_since=True, share="movie"),
])
def test_serving_a_given_history_with_its_side_values_equals_evaluation(data_dir, tmp_path,
                                                                        options):
  cfg = options_config(data_dir, **options)
  cfg.train.num_epochs = 1
  train.train_and_evaluate(cfg, str(tmp_path))
  prep = input_pipeline.prepare(cfg)
  model = model_lib.create_model(cfg.model, prep.query_features, prep.candidate_features)
  params = checkpoints.load_params(tmp_path)
  want = np.asarray(model_lib.embed_queries(params, prep.test_q, model=model))
  rec = serving.load(tmp_path)
  cols = {c: prep.test[c] for c in rec.query_columns() if c in prep.test}
  cols.update(served_history_columns(prep))
  assert cols["history"] == item_keys(prep, prep.test_q["history"])
  np.testing.assert_allclose(rec.embed(cols), want, rtol=1e-5, atol=1e-5)
  # Without the side values and times the answer changes (they are used).
  plain = {k: v for k, v in cols.items() if "." not in k}
  assert not np.allclose(rec.embed(plain), want, atol=1e-4)
  # A known user's query carries the side values and times of their last training items.
  ds = prep.dataset
  user = int(prep.train[ds.user_key][0])
  q = rec.query(user)
  u = np.asarray(prep.train[ds.user_key]) == user
  order = np.lexsort((np.arange(u.sum()), np.asarray(prep.train[ds.time_key])[u]))
  assert q["history"][0] == np.asarray(prep.train["movie_id"])[u][order][-L:].tolist()
  assert q["history.user_rating"][0] == np.asarray(
      prep.train["user_rating"], np.float64)[u][order][-L:].tolist()
  assert q["history.time"][0] == np.asarray(prep.train[ds.time_key])[u][order][-L:].tolist()
  assert q[ds.time_key][0] == np.asarray(prep.train[ds.time_key])[u][order][-1]
  assert np.isfinite(rec.embed(q)).all()
  one = {k: list(v[:1]) for k, v in plain.items()}
  r = rec.recommend({**one, "history": [[1, 2, 3]], "history.user_rating": [[5, None, 1]],
                     "history.time": [[880000000, 880000100, 880000200]],
                     ds.time_key: [880100000]}, k=3, check_range=False)
  assert r.valid.all()


def test_the_ranker_export_scores_each_query_as_evaluation_does(data_dir, tmp_path):
  from twotower_jax import export  # pylint: disable=g-import-not-at-top
  cfg = options_config(data_dir, encoder="attention", side=("user_rating",), time_since=True)
  del cfg.features.query["time"]  # the query time then comes from the data's time column
  cfg.train.num_epochs = 1
  train.train_and_evaluate(cfg, str(tmp_path))
  prep = input_pipeline.prepare(cfg)
  model = model_lib.create_model(cfg.model, prep.query_features, prep.candidate_features)
  q_TxD = np.asarray(model_lib.embed_queries(checkpoints.load_params(tmp_path), prep.test_q,
                                             model=model))
  with np.load(tmp_path / "serving" / "candidates.npz") as c:
    best_T = (q_TxD @ c["embeddings"].T).max(1)
  out = tmp_path / "ranker.csv"
  export.export_ranker(cfg, tmp_path / "serving", out, top_n=1, max_queries=40)
  rows = export.read_ranker_csv(out)
  got = dict(zip(rows["query_index"].astype(int), rows["retrieval_score"].astype(float)))
  assert len(got) == 40
  np.testing.assert_allclose([got[i] for i in range(40)], best_T[:40], rtol=1e-4, atol=1e-4)


def test_serving_rejects_side_values_that_do_not_line_up(data_dir, tmp_path):
  cfg = options_config(data_dir, side=("user_rating",), time_since=True)
  del cfg.features.query["time"]  # no timestamp feature: the query time is optional
  cfg.train.num_epochs = 1
  train.train_and_evaluate(cfg, str(tmp_path))
  rec = serving.load(tmp_path)
  test = input_pipeline.prepare(cfg).test
  base = {c: [test[c][0]] for c in rec.query_columns() if c in test}
  assert "timestamp" not in base
  assert np.isfinite(rec.embed({**base, "history": [[1, 2]]})).all()  # times left out
  with pytest.raises(serving.ServingError, match="history.user_rating has 1 values in query 0"):
    rec.embed({**base, "history": [[1, 2]], "history.user_rating": [[4]]})
  with pytest.raises(serving.ServingError, match="list of numbers"):
    rec.embed({**base, "history": [[1, 2]], "history.user_rating": [["a", "b"]]})
  with pytest.raises(serving.ServingError, match="needs the query's time too"):
    rec.embed({**base, "history": [[1, 2]], "history.time": [[1, 2]]})


def test_an_older_serving_directory_without_the_options_still_loads(data_dir, tmp_path):
  cfg = options_config(data_dir)
  cfg.train.num_epochs = 1
  train.train_and_evaluate(cfg, str(tmp_path))
  prep = input_pipeline.prepare(cfg)
  query = {c: prep.test[c][:20] for c in ("raw_user_age", "user_gender",
                                          "user_occupation_text", "timestamp")}
  query["history"] = item_keys(prep, prep.test_q["history"][:20])
  want = serving.load(tmp_path).embed(query)
  path = pathlib.Path(tmp_path) / "serving" / "serving.json"
  meta = json.loads(path.read_text())
  for key in ("side", "time_since", "dropout", "share"):  # as written before they existed
    del meta["features"]["query"]["history"][key]
  path.write_text(json.dumps(meta))
  np.testing.assert_array_equal(serving.load(tmp_path).embed(query), want)


def test_every_history_config_variant_validates():
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  module = config_lib.load_config_file  # configs/history.py:VARIANT for each variant
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "history.py"
  for variant in ("mean", "attention", "gru", "attention_side", "shared"):
    cfg = module(path, variant)
    config_lib.check_keys(cfg, config_lib.base_config())
    config_lib.validate(cfg)
  assert cfg.features.query.history.share == "movie"
  with pytest.raises(ValueError, match="unknown variant; use one of mean, attention, gru"):
    module(path, "lstm")


def test_a_run_written_before_the_options_existed_keeps_its_fingerprint(data_dir):
  from twotower_jax import workdir  # pylint: disable=g-import-not-at-top
  cfg = options_config(data_dir)
  new = workdir.config_fingerprint(json.loads(cfg.to_json()))
  late = ("side", "time_since", "dropout", "share")
  nested = json.loads(cfg.to_json())
  for key in late:
    del nested["features"]["query"]["history"][key]
  assert workdir.config_fingerprint(nested) == new  # a config.json of an older version
  flat = {k: v for k, v in new.items() if k.split(".")[-1] not in late}
  assert len(flat) == len(new) - 4
  assert workdir.config_fingerprint(flat) == new  # a fingerprint file of an older version
  cfg.features.query.history.dropout = 0.2
  changed = workdir.config_fingerprint(json.loads(cfg.to_json()))
  assert workdir.differences({"config": new}, {"config": changed}) == [
      "features.query.history.dropout 0.0 -> 0.2"]


class _FullSequenceAttention(nn.Module):
  """The SASRec encoder computed at every position in every block (the textbook form), with
  History's parameter names, as a reference for its last-position-only final block."""

  rows: int
  dim: int
  blocks: int

  @nn.compact
  def __call__(self, ids_BxL):
    valid_BxL = ids_BxL != model_lib.PAD
    e_BxLxD = model_lib.Embed(self.rows, self.dim, name="items")(jnp.where(valid_BxL, ids_BxL, 0))
    e_BxLxD = e_BxLxD * valid_BxL[..., None]
    last_BxD = e_BxLxD[:, -1]
    pos_LxD = self.param("positions", nn.initializers.normal(0.02), (ids_BxL.shape[1], self.dim))
    h_BxLxD = (e_BxLxD + pos_LxD) * valid_BxL[..., None]
    mask = nn.combine_masks(nn.make_attention_mask(valid_BxL, valid_BxL),
                            nn.make_causal_mask(valid_BxL))
    for b in range(self.blocks):
      x = nn.LayerNorm(name=f"ln_attn_{b}")(h_BxLxD)
      h_BxLxD = h_BxLxD + nn.MultiHeadDotProductAttention(num_heads=1, name=f"attn_{b}")(
          x, mask=mask, deterministic=True)
      x = nn.LayerNorm(name=f"ln_ffn_{b}")(h_BxLxD)
      h_BxLxD = h_BxLxD + model_lib.MLP((self.dim, self.dim), name=f"ffn_{b}")(x)
    pooled_BxD = nn.LayerNorm(name="ln_out")(h_BxLxD)[:, -1] * valid_BxL[:, -1:]
    return jnp.concatenate([pooled_BxD, last_BxD], axis=-1)


@pytest.mark.parametrize("blocks", [1, 2])
def test_attention_last_block_equals_every_position_computed(blocks):
  rng = np.random.default_rng(blocks)
  ids_BxL = rng.integers(0, 40, (16, 12)).astype(np.int32)
  n_B = rng.integers(0, 13, 16)
  ids_BxL[np.arange(12)[None, :] < (12 - n_B)[:, None]] = model_lib.PAD  # left padding
  m = model_lib.History(rows=40, dim=16, encoder="attention", blocks=blocks)
  params = m.init(jax.random.key(0), ids_BxL)
  params = jax.tree.map(  # non-trivial values everywhere, LayerNorm scales included
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  got = m.apply(params, ids_BxL)
  want = _FullSequenceAttention(rows=40, dim=16, blocks=blocks).apply(params, ids_BxL)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got)).max() > 0.1
