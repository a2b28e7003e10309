"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

All training examples live on the device as encoded arrays; an epoch is a
seeded permutation of their indices, cut into fixed-size batches (the last one
padded and masked, so one compiled step serves every batch). The step gathers
its batch on the device: per step only a row of indices is read.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from twotower_jax import data as data_lib
from twotower_jax import features as feat
from twotower_jax import losses
from twotower_jax import model as model_lib
from twotower_jax import sparse

Array = jax.Array


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  freq: Any  # streaming frequency-estimator state, or an empty dict
  rng: Array


# ----------------------------------------------------------------------------
# Prepared data: encoded features as arrays, plus the raw columns for reports.


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A data set encoded for the model. Rows of ``*_q`` align with ``*_item``."""

  encoders: feat.Encoders
  cand: dict[str, np.ndarray]  # encoded features of all N catalogue items
  movie_ids_N: np.ndarray
  train_q: dict[str, np.ndarray]
  train_item: np.ndarray  # catalogue index of each training example's movie
  train_user: np.ndarray  # user index (0..U-1) of each training example
  test_q: dict[str, np.ndarray]
  test_item: np.ndarray
  test_user: np.ndarray
  num_users: int
  dataset: data_lib.Dataset
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]

  @property
  def num_items(self) -> int:
    return len(self.movie_ids_N)

  def item_counts(self) -> np.ndarray:
    return np.bincount(self.train_item, minlength=self.num_items)

  def seen_csr(self) -> tuple[np.ndarray, np.ndarray]:
    """Each user's training items as CSR (indptr over user index, item indices)."""
    order = np.lexsort((self.train_item, self.train_user))
    indptr = np.zeros(self.num_users + 1, np.int64)
    np.cumsum(np.bincount(self.train_user, minlength=self.num_users), out=indptr[1:])
    return indptr, self.train_item[order]


def item_index(movie_ids_N: np.ndarray, movie_id: np.ndarray, what: str) -> np.ndarray:
  """Catalogue positions of ``movie_id``; an id outside the catalogue is an error."""
  order = np.argsort(movie_ids_N, kind="stable")
  pos = np.clip(np.searchsorted(movie_ids_N[order], movie_id), 0, len(order) - 1)
  bad = movie_ids_N[order][pos] != movie_id
  if bad.any():
    raise data_lib.DataError(
        f"{what}: movie id {movie_id[bad][0]} is not in the movie catalogue "
        f"({int(bad.sum())} such rows). Use ratings and movies from the same data set.")
  return order[pos].astype(np.int32)


def prepare(config: ml_collections.ConfigDict) -> Prepared:
  """Loads and splits the data, fits the encoders on the training split, encodes."""
  dataset = data_lib.load(config.data)
  train, test = data_lib.train_test(config.data, dataset, config.seed)
  if config.features.time and config.data.split in ("seed", "random"):
    logging.warning(
        "Time features with a random split (%s) let the model see the future of the test "
        "interactions; use data.split=temporal for a leak-free estimate.", config.data.split)
  encoders = feat.fit_encoders(train, dataset.movies, config.features)
  movie_ids = np.asarray(dataset.movies["movie_id"])
  users = np.unique(np.concatenate([train["user_id"], test["user_id"]]))
  return Prepared(
      encoders=encoders,
      cand=feat.encode_candidates(encoders, dataset.movies, config.features),
      movie_ids_N=movie_ids,
      train_q=feat.encode_queries(encoders, train),
      train_item=item_index(movie_ids, train["movie_id"], "training ratings"),
      train_user=np.searchsorted(users, train["user_id"]).astype(np.int32),
      test_q=feat.encode_queries(encoders, test),
      test_item=item_index(movie_ids, test["movie_id"], "test ratings"),
      test_user=np.searchsorted(users, test["user_id"]).astype(np.int32),
      num_users=len(users),
      dataset=dataset, train=train, test=test)


# ----------------------------------------------------------------------------
# Model, optimizer, state.


def create_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """The optax optimizer that ``config.optimizer`` names."""
  lr = opt_cfg.learning_rate
  if opt_cfg.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, opt_cfg.learning_rate, max(opt_cfg.warmup_steps, 1), max(total_steps, 2))
  elif opt_cfg.schedule == "constant":
    if opt_cfg.warmup_steps:
      lr = optax.join_schedules(
          [optax.linear_schedule(0.0, opt_cfg.learning_rate, opt_cfg.warmup_steps),
           optax.constant_schedule(opt_cfg.learning_rate)], [opt_cfg.warmup_steps])
  else:
    raise ValueError(f"Unsupported optimizer.schedule {opt_cfg.schedule!r}: "
                     "use 'constant' or 'cosine'.")
  name = opt_cfg.name
  if name == "adagrad":
    tx = optax.adagrad(lr, initial_accumulator_value=0.1, eps=1e-7)  # Keras defaults
  elif name == "adam":
    tx = optax.adam(lr)
  elif name == "adamw":
    tx = optax.adamw(lr, weight_decay=opt_cfg.weight_decay)
  elif name == "sgd":
    tx = optax.sgd(lr)
  else:
    raise ValueError(f"Unsupported optimizer.name {name!r}: use adagrad, adam, adamw or sgd.")
  if opt_cfg.weight_decay and name != "adamw":
    tx = optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay), tx)
  if opt_cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), tx)
  return tx


def create_model(config, prep: Prepared) -> model_lib.TwoTower:
  """The two towers; the user-id and title tables are padded with unused rows up to a
  multiple of ``model.table_rows_multiple`` (so that they split evenly over devices)."""
  sizes = dict(feat.vocab_sizes(prep.encoders))
  m = config.model.table_rows_multiple
  if m < 1:
    raise ValueError(f"model.table_rows_multiple={m}: use a positive int (1: no padding).")
  for _, name, _, _ in sparse.TABLES:
    if name in sizes:
      sizes[name] = -(-sizes[name] // m) * m
  return model_lib.create_model(config.model, sizes)


def _take(tree: dict[str, Array], idx: Array) -> dict[str, Array]:
  return {k: jnp.take(v, idx, axis=0) for k, v in tree.items()}


def init_state(model, tx, prep: Prepared, config, rng: Array | int,
               mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """The initial train state; ``rng`` a key or a seed.

  With a ``mesh`` the state is built in place on it (``state_shardings``).
  """
  xq = {k: v[:2] for k, v in prep.train_q.items()}
  xc = {k: v[:2] for k, v in prep.cand.items()}
  streaming = config.loss.logq == "streaming"
  buckets = config.loss.streaming_buckets

  # One compilation instead of one per initializer op; with several processes every one
  # of them runs it, so the state is built in place rather than copied there.
  def init(rng, xq, xc):
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.key(rng)
    init_rng, rng = jax.random.split(rng)
    params = model.init(init_rng, xq, xc)["params"]
    freq = losses.freq_init(buckets) if streaming else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      freq=freq, rng=rng)

  shardings = None
  if mesh is not None:
    shardings = state_shardings(jax.eval_shape(init, rng, xq, xc), mesh,
                                config.train.shard_embeddings)
  return jax.jit(init, out_shardings=shardings)(rng, xq, xc)


def state_shardings(state: Any, mesh: jax.sharding.Mesh, shard_embeddings: bool) -> Any:
  """Replicated everywhere, except (with ``shard_embeddings``) the user-id and title tables
  and their optimizer-state twins, whose rows are split over "data"."""
  rep = replicated(mesh)
  if not shard_embeddings:
    return jax.tree_util.tree_map(lambda _: rep, state)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  shapes = sparse.shapes_of(state.params)
  for (_, name), shape in shapes.items():
    if shape[0] % mesh.size:
      raise ValueError(
          f"train.shard_embeddings: the {name} table has {shape[0]} rows, which do not split "
          f"over {mesh.size} devices. Set model.table_rows_multiple to a multiple of "
          f"{mesh.size} (e.g. 128) to pad it with unused rows.")
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: rows if sparse.table_of(path, leaf, shapes) else rep, state)


# ----------------------------------------------------------------------------
# The step.


def gather_batch(data: dict[str, Any], idx_B: Array, key: Array, num_extra: int
                 ) -> dict[str, Any]:
  """The batch ``idx_B`` (rows of the device-resident training data) and extra negatives."""
  item_B = jnp.take(data["train_item"], idx_B)
  batch = {"item_B": item_B, "xq": _take(data["train_q"], idx_B),
           "xc": _take(data["cand"], item_B)}
  if num_extra:
    extra_M = jax.random.randint(key, (num_extra,), 0, data["p_item"].shape[0])
    batch["extra_M"] = extra_M
    batch["extra_xc"] = _take(data["cand"], extra_M)
  if "train_weight" in data:
    batch["weight_B"] = jnp.take(data["train_weight"], idx_B)
  return batch


def loss_fn(params, state: TrainState, data: dict[str, Any], batch: dict[str, Any],
            valid_B: Array, *, model, loss_cfg: ml_collections.FrozenConfigDict,
            variables_fn: Callable[[Any], dict[str, Any]] | None = None) -> Array:
  """Retrieval loss of a batch from ``gather_batch``.

  ``variables_fn`` builds the model variables from ``params`` (sparse embedding
  updates pass the used rows of the large tables this way); default ``{"params": params}``.
  """
  item_B = batch["item_B"]
  variables = variables_fn(params) if variables_fn else {"params": params}
  q_BxD, c_BxD, temperature = model.apply(variables, batch["xq"], batch["xc"])
  b = item_B.shape[0]
  kwargs: dict[str, Any] = {}
  log_q_B = None
  if loss_cfg.logq == "counts":
    log_q_B = jnp.log(jnp.take(data["p_item"], item_B))
  elif loss_cfg.logq == "streaming":
    log_q_B = jnp.log(losses.freq_probability(state.freq, item_B) / b)
  if "extra_M" in batch:
    extra_M = batch["extra_M"]
    m, n = extra_M.shape[0], data["p_item"].shape[0]
    kwargs["extra_c_MxD"] = model.apply(variables, batch["extra_xc"],
                                        method=model_lib.TwoTower.embed_candidates)
    kwargs["extra_ids_M"] = extra_M
    kwargs["positive_ids_B"] = item_B
    if log_q_B is not None:
      p_B = jnp.exp(log_q_B)
      log_q_B = losses.mixed_log_q(p_B, b, m, n)
      kwargs["extra_log_q_M"] = losses.mixed_log_q(
          jnp.take(data["p_item"], extra_M) if loss_cfg.logq == "counts"
          else losses.freq_probability(state.freq, extra_M) / b, b, m, n)
  if "weight_B" in batch:
    kwargs["weight_B"] = batch["weight_B"]
  return losses.retrieval_loss(
      q_BxD, c_BxD, temperature=temperature, log_q_B=log_q_B,
      candidate_ids_B=item_B if loss_cfg.remove_accidental_hits else None,
      num_hard_negatives=loss_cfg.num_hard_negatives or None, valid_B=valid_B, **kwargs)


def train_step(state: TrainState, data: dict[str, Any], idx_B: Array, valid_B: Array, *,
               model, tx: optax.GradientTransformation,
               loss_cfg: ml_collections.FrozenConfigDict,
               sparse_embeddings: bool = False) -> tuple[TrainState, Array]:
  """One optimizer step on the batch ``idx_B``; returns the new state and the loss.

  With ``sparse_embeddings`` the user-id and title tables are read, differentiated and
  updated only at the rows the batch uses (``twotower_jax.sparse``).
  """
  rng, extra_key = jax.random.split(state.rng)
  batch = gather_batch(data, idx_B, extra_key, loss_cfg.num_uniform_negatives)
  grad_fn = jax.value_and_grad(loss_fn)
  kwargs = dict(model=model, loss_cfg=loss_cfg)
  if sparse_embeddings:
    shapes = sparse.shapes_of(state.params)
    rows, batch = sparse.remap(state.params, batch)
    params = sparse.gather(state.params, rows, shapes)
    opt_state = sparse.gather(state.opt_state, rows, shapes)
    kwargs["variables_fn"] = lambda p: sparse.variables(p, state.params, shapes)
  else:
    params, opt_state = state.params, state.opt_state
  loss, grads = grad_fn(params, state, data, batch, valid_B, **kwargs)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  if sparse_embeddings:
    params = sparse.scatter(state.params, params, rows, shapes)
    opt_state = sparse.scatter(state.opt_state, opt_state, rows, shapes)
  freq = state.freq
  if loss_cfg.logq == "streaming":
    # Padding rows repeat a real index: they only re-record a hit at the same step.
    freq = losses.freq_update(freq, batch["item_B"], state.step, loss_cfg.streaming_alpha)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, freq=freq,
                       rng=rng), loss


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The epoch's seeded permutation as [steps, B] indices and validity (last batch padded)."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = -(-num_examples // batch_size)
  pad = steps * batch_size - num_examples
  idx = np.concatenate([perm, perm[:pad]]).reshape(steps, batch_size).astype(np.int32)
  valid = (np.arange(steps * batch_size) < num_examples).reshape(steps, batch_size)
  return idx, valid


def make_step_fn(model, tx, loss_cfg, sparse_embeddings: bool = False,
                 state_sharding: Any = None) -> Callable[..., tuple[TrainState, Array]]:
  """``step_fn(state, data, idx_SxB, valid_SxB, i)``: the jitted step on batch ``i``.

  Taking the whole epoch's index array and a step number keeps each step to a
  single dispatch; the state is donated, and keeps ``state_sharding`` if given.
  """
  frozen = ml_collections.FrozenConfigDict(loss_cfg)

  def indexed_step(state, data, idx_SxB, valid_SxB, i):
    return train_step(state, data, idx_SxB[i], valid_SxB[i], model=model, tx=tx,
                      loss_cfg=frozen, sparse_embeddings=sparse_embeddings)

  out = None
  if state_sharding is not None:
    out = (state_sharding, replicated(jax.tree_util.tree_leaves(state_sharding)[0].mesh))
  return jax.jit(indexed_step, donate_argnums=0, out_shardings=out)


def create_step_fn(config, model, tx, state: TrainState
                   ) -> Callable[..., tuple[TrainState, Array]]:
  """``make_step_fn`` as ``config`` asks, keeping ``state``'s shardings."""
  return make_step_fn(model, tx, config.loss, sparse_step(config, state.params),
                      jax.tree_util.tree_map(lambda x: x.sharding, state))


def sparse_step(config, params) -> bool:
  """Whether steps update embeddings sparsely; an error if the model has no table for it."""
  if not config.optimizer.sparse_embeddings:
    return False
  if not sparse.tables(params):
    raise ValueError("optimizer.sparse_embeddings=True needs a user-id or title embedding "
                     "table: set features.user_id=True or features.title=True, or turn "
                     "sparse_embeddings off.")
  return True


CHECK_LAG = 8  # steps a loss may be in flight before it is checked


def run_epoch(state: TrainState, step_fn, data, idx_SxB: Array, valid_SxB: Array,
              first_step: int, on_step: Callable[[int, TrainState, Array], None] | None = None
              ) -> tuple[TrainState, float]:
  """Runs every batch of an epoch; returns the new state and the epoch's mean loss.

  Each step's loss is checked for finiteness ``CHECK_LAG`` steps later, so the
  device keeps a few steps queued while the host waits, and a NaN still stops
  training naming the step that produced it.
  """
  in_flight: collections.deque[Array] = collections.deque()
  values = []  # each step's loss as a Python float, once checked
  num_steps = idx_SxB.shape[0]
  for i in range(num_steps):
    state, loss = step_fn(state, data, idx_SxB, valid_SxB, i)
    in_flight.append(loss)
    if len(in_flight) > CHECK_LAG:
      values.append(_check_finite(in_flight.popleft(), first_step + len(values) + 1))
    if on_step is not None:
      on_step(first_step + i + 1, state, loss)
  while in_flight:
    values.append(_check_finite(in_flight.popleft(), first_step + len(values) + 1))
  return state, float(np.mean(values)) if values else float("nan")


# ----------------------------------------------------------------------------
# Devices.


def configure_cpu_devices(requested: int, batch_size: int) -> int:
  """Splits the host CPU into several XLA devices so data parallelism uses every core.

  XLA runs most element-wise work of one device on one thread; with one device
  per core, the [B, B] in-batch softmax is split by rows across cores. ``requested``
  0 means one device per available core, lowered to a divisor of ``batch_size``.
  Must run before JAX starts its backends; returns the device count asked for
  (1: nothing changed).
  """
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  n = requested or cores or 1
  n = max(1, min(n, batch_size))
  while batch_size % n:
    n -= 1
  if n <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 1
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:  # backends already started (e.g. inside a test session)
    logging.warning("Could not split the CPU into %d devices (%s); using one.", n, e)
    return 1
  return n


def make_mesh() -> jax.sharding.Mesh:
  """One ("data",) mesh over every device."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def recency_weights(timestamps: np.ndarray, half_life_days: float) -> np.ndarray:
  """Example weights 0.5 ** (age / half-life), age measured from the newest example."""
  if half_life_days <= 0:
    raise ValueError(f"train.recency_half_life_days={half_life_days}: use a positive number "
                     "of days, or 0 to weight every example equally.")
  t = np.asarray(timestamps, np.float64)
  if not len(t) or not np.isfinite(t).all():
    raise data_lib.DataError("train.recency_half_life_days needs a finite timestamp on every "
                             "training example; set it to 0 for this data set.")
  return np.exp2(-(t.max() - t) / (half_life_days * 86400.0)).astype(np.float32)


def device_data(prep: Prepared, mesh, recency_half_life_days: float = 0.0) -> dict[str, Any]:
  """Training arrays on the device(s), replicated."""
  counts = prep.item_counts().astype(np.float64)
  data = {
      "train_q": prep.train_q,
      "train_item": prep.train_item,
      "cand": prep.cand,
      "p_item": (counts / max(counts.sum(), 1.0)).astype(np.float32),
  }
  if recency_half_life_days:
    data["train_weight"] = recency_weights(prep.train["timestamp"], recency_half_life_days)
  return to_devices(data, replicated(mesh))


def to_devices(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host arrays (the same on every process) as global arrays with ``sharding``."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                             lambda idx: np.asarray(x)[idx]), tree)


# ----------------------------------------------------------------------------
# Embeddings for evaluation and serving.


@functools.partial(jax.jit, static_argnames=("model",))
def _embed_queries(params, xq, *, model):
  return model.apply({"params": params}, xq, method=model_lib.TwoTower.embed_queries)


@functools.partial(jax.jit, static_argnames=("model",))
def _embed_candidates(params, xc, *, model):
  return model.apply({"params": params}, xc, method=model_lib.TwoTower.embed_candidates)


def embed_in_batches(fn, params, x: dict[str, np.ndarray], batch_size: int, *, model
                     ) -> np.ndarray:
  """Embeds rows of ``x`` in fixed-size batches (last one padded: one compiled shape)."""
  n = len(next(iter(x.values())))
  out = []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in x.items()}
    m = len(next(iter(chunk.values())))
    if m < batch_size and n > batch_size:
      chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - m, axis=0)])
               for k, v in chunk.items()}
    out.append(np.asarray(fn(params, chunk, model=model))[:m])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.train.max_checkpoints,
                                           create=True))


def restore_latest(mngr: ocp.CheckpointManager, state: TrainState) -> TrainState:
  """The newest checkpoint that restores; a corrupt one is skipped with a warning."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return mngr.restore(step, args=ocp.args.StandardRestore(state))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
      logging.warning("Checkpoint at step %d could not be restored (%s); trying the previous "
                      "one.", step, e)
  return state


def load_params(workdir: str | pathlib.Path) -> Any:
  """The model parameters of the newest checkpoint in ``workdir`` (as a nested dict)."""
  mngr = ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").absolute(),
                               item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints; train first.")
    # Onto one local device, whatever devices and processes saved it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        mngr.item_metadata(step))
    return mngr.restore(step, args=ocp.args.StandardRestore(target))["params"]
  finally:
    mngr.close()


def put_batches(idx_SxB: np.ndarray, mesh) -> Array:
  """Epoch batch indices as a global array sharded over "data" along the batch axis.

  With several processes (``config.distributed``) each process supplies its own
  contiguous share of every batch, so each reads only its share of the examples.
  """
  sharding = batch_sharding_2d(mesh)
  if jax.process_count() == 1:
    return jax.device_put(idx_SxB, sharding)
  per = idx_SxB.shape[1] // jax.process_count()
  lo = jax.process_index() * per
  return jax.make_array_from_process_local_data(sharding, idx_SxB[:, lo:lo + per],
                                                idx_SxB.shape)


# ----------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints), evaluates, serves."""
  from twotower_jax import evaluate, serving  # pylint: disable=g-import-not-at-top
  from twotower_jax import logs  # pylint: disable=g-import-not-at-top

  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  primary = jax.process_index() == 0  # with several processes, one writes the files
  if primary:
    (workdir_path / "config.json").write_text(config.to_json(indent=1))
  t_start = time.perf_counter()
  prep = prepare(config)
  t_prepared = time.perf_counter()

  b = config.train.batch_size
  mesh = make_mesh()
  if b % mesh.size:
    raise ValueError(f"train.batch_size={b} does not divide over {mesh.size} devices; "
                     f"use a multiple of {mesh.size}.")
  num_train = len(prep.train_item)
  steps_per_epoch = -(-num_train // b)
  total_steps = steps_per_epoch * config.train.num_epochs
  model = create_model(config, prep)
  tx = create_optimizer(config.optimizer, total_steps)
  state = init_state(model, tx, prep, config, config.seed, mesh)
  mngr = checkpoint_manager(workdir_path, config)
  state = restore_latest(mngr, state)
  start_step = int(state.step)

  data = device_data(prep, mesh, config.train.recency_half_life_days)
  step_fn = create_step_fn(config, model, tx, state)

  log = logs.RunLog(workdir_path, total_examples=total_steps * b,
                    initial_examples=start_step * b,
                    progress=config.train.progress and primary, write=primary)
  train_seconds = 0.0
  try:
    for epoch in range(start_step // steps_per_epoch, config.train.num_epochs):
      idx_SxB, valid_SxB = epoch_batches(num_train, b, config.seed, epoch)
      first = max(start_step - epoch * steps_per_epoch, 0)
      idx_SxB = put_batches(idx_SxB[first:], mesh)
      valid_SxB = put_batches(valid_SxB[first:], mesh)
      t0 = time.perf_counter()

      def on_step(step, state, loss):
        log.progress(b)
        if step % config.train.checkpoint_every_steps == 0:
          _check_finite(loss, step)
          mngr.save(step, args=ocp.args.StandardSave(state))

      state, epoch_loss = run_epoch(state, step_fn, data, idx_SxB, valid_SxB,
                                    epoch * steps_per_epoch + first, on_step)
      jax.block_until_ready(state)
      seconds = time.perf_counter() - t0
      train_seconds += seconds
      n_ex = int(jnp.sum(valid_SxB))
      log.epoch({"epoch": epoch + 1, "step": int(state.step),
                 "loss": epoch_loss,
                 "examples_per_second": n_ex / max(seconds, 1e-9), "epoch_seconds": seconds})
    final_step = int(state.step)
    if final_step not in mngr.all_steps():
      mngr.save(final_step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
    log.close_progress()

  t_eval = time.perf_counter()
  params = host_params(state.params)
  metrics = evaluate.evaluate(config, prep, model, params)
  eval_seconds = time.perf_counter() - t_eval
  if primary:
    serving.save(workdir_path / "serving", config, prep, model, params)
  trained_examples = (total_steps - start_step) * b
  metrics.update({
      "config": config.name, "split": config.data.split, "seed": int(config.seed),
      "source": prep.dataset.source, "num_train": num_train, "num_test": len(prep.test_item),
      "num_candidates": prep.num_items, "prepare_seconds": t_prepared - t_start,
      "train_seconds": train_seconds, "eval_seconds": eval_seconds,
      "examples_per_second": trained_examples / train_seconds if train_seconds else None,
      "resumed_from_step": start_step, "steps": final_step,
      "devices": jax.device_count(), "backend": jax.default_backend(),
  })
  if primary:
    (workdir_path / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
  log.final(metrics)
  return metrics


def host_params(params: Any) -> Any:
  """Parameters as host arrays, whole (row-sharded tables gathered from every process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def batch_sharding_2d(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))


def _check_finite(loss: Array, step: int) -> float:
  """``loss`` as a float; a NaN or infinity stops training naming ``step``."""
  value = float(loss)
  if not np.isfinite(value):
    raise NonFiniteLossError(
        f"Training loss is {value} at step {step}. Lower optimizer.learning_rate, set "
        "optimizer.grad_clip_norm, or check the input features for extreme values; the last "
        "good checkpoint is kept in the workdir.")
  return value
