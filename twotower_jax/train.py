"""Training: the train state, the jitted step, the epoch loop, ``train_and_evaluate``.

All training examples live on the device as encoded arrays (``input_pipeline``); the step
gathers its batch on the device, so per step only a row of indices is read. The loop
checks each step's loss a few steps behind, saves orbax checkpoints of states it has
checked, then evaluates (``evaluate``) and writes the serving directory (``serving``). The
workdir is opened, checked against the run and locked by ``workdir``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
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

from twotower_jax import checkpoints
from twotower_jax import config as config_lib
from twotower_jax import evaluate
from twotower_jax import history
from twotower_jax import input_pipeline
from twotower_jax import logs
from twotower_jax import losses
from twotower_jax import model as model_lib
from twotower_jax import serving
from twotower_jax import sharding
from twotower_jax import sparse
from twotower_jax import workdir as workdir_lib

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
  # The sum and count of the step losses of the epoch so far. The step leaves them alone;
  # they are set in the copy a checkpoint saves, so a run resumed mid-epoch reports the
  # whole epoch's mean loss.
  epoch_loss_sum: Array
  epoch_loss_steps: Array


# ----------------------------------------------------------------------------
# Optimizer and state.


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


def _take(tree: dict[str, Array], idx: Array) -> dict[str, Array]:
  return {k: jnp.take(v, idx, axis=0) for k, v in tree.items()}


def init_state(model, tx, prep: input_pipeline.Prepared, config, rng: Array | int,
               mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """The initial train state; ``rng`` a key or a seed.

  With a ``mesh`` the state is built in place on it (``state_shardings``).
  """
  xq = input_pipeline.query_inputs(prep, np.arange(min(2, len(prep.train_item))))
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
                      freq=freq, rng=rng, epoch_loss_sum=jnp.zeros((), jnp.float32),
                      epoch_loss_steps=jnp.zeros((), jnp.int32))

  shardings = None
  if mesh is not None:
    shardings = sharding.state_shardings(jax.eval_shape(init, rng, xq, xc), mesh,
                                         model.sparse_tables(),
                                config.train.shard_embeddings)
  return jax.jit(init, out_shardings=shardings)(rng, xq, xc)


# ----------------------------------------------------------------------------
# The step.


def gather_batch(data: dict[str, Any], idx_B: Array, key: Array, num_extra: int
                 ) -> dict[str, Any]:
  """The batch ``idx_B`` (rows of the device-resident training data) and extra negatives."""
  item_B = jnp.take(data["train_item"], idx_B)
  xq = _take(data["train_q"], idx_B)
  for name, h in data.get("histories", {}).items():  # each example's window, gathered here
    start_B, end_B = xq.pop(f"{name}/start"), xq.pop(f"{name}/end")
    time_B = xq.pop(f"{name}/time", None)
    xq[name] = history.gather_windows(h["items"], start_B, end_B, h["pos_L"])
    xq.update(history.gather_extras(name, h, start_B, end_B, time_B))
  batch = {"item_B": item_B, "xq": xq, "xc": _take(data["cand"], item_B)}
  if num_extra:
    extra_M = jax.random.randint(key, (num_extra,), 0, data["p_item"].shape[0])
    batch["extra_M"] = extra_M
    batch["extra_xc"] = _take(data["cand"], extra_M)
  if "train_weight" in data:
    batch["weight_B"] = jnp.take(data["train_weight"], idx_B)
  return batch


def loss_fn(params, state: TrainState, data: dict[str, Any], batch: dict[str, Any],
            valid_B: Array, *, model, loss_cfg: ml_collections.FrozenConfigDict,
            variables_fn: Callable[[Any], dict[str, Any]] | None = None,
            dropout_rng: Array | None = None) -> Array:
  """Retrieval loss of a batch from ``gather_batch``.

  ``variables_fn`` builds the model variables from ``params`` (sparse embedding
  updates pass the used rows of the large tables this way); default ``{"params": params}``.
  ``dropout_rng``: the model runs in training mode, its dropout drawn from this key
  (None: deterministic).
  """
  item_B = batch["item_B"]
  variables = variables_fn(params) if variables_fn else {"params": params}
  if dropout_rng is None:
    q_BxD, c_BxD, temperature = model.apply(variables, batch["xq"], batch["xc"])
  else:
    q_BxD, c_BxD, temperature = model.apply(variables, batch["xq"], batch["xc"], train=True,
                                            rngs={"dropout": dropout_rng})
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


DROPOUT_STREAM = 1  # fold_in(state.rng, .): the step's dropout key


def train_step(state: TrainState, data: dict[str, Any], idx_B: Array, valid_B: Array, *,
               model, tx: optax.GradientTransformation,
               loss_cfg: ml_collections.FrozenConfigDict,
               sparse_embeddings: bool = False) -> tuple[TrainState, Array]:
  """One optimizer step on the batch ``idx_B``; returns the new state and the loss.

  With ``sparse_embeddings`` the tables of ``id`` features are read, differentiated and
  updated only at the rows the batch uses (``twotower_jax.sparse``).
  """
  rng, extra_key = jax.random.split(state.rng)
  batch = gather_batch(data, idx_B, extra_key, loss_cfg.num_uniform_negatives)
  grad_fn = jax.value_and_grad(loss_fn)
  kwargs = dict(model=model, loss_cfg=loss_cfg)
  if model.has_dropout():  # a key of its own per step, leaving the state's key chain as is
    kwargs["dropout_rng"] = jax.random.fold_in(state.rng, DROPOUT_STREAM)
  if sparse_embeddings:
    tables = model.sparse_tables()
    shapes = sparse.shapes_of(state.params, tables)
    rows, batch = sparse.remap(tables, state.params, batch)
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
    out = (state_sharding, sharding.replicated(jax.tree_util.tree_leaves(state_sharding)[0].mesh))
  return jax.jit(indexed_step, donate_argnums=0, out_shardings=out)


def create_step_fn(config, model, tx, state: TrainState
                   ) -> Callable[..., tuple[TrainState, Array]]:
  """``make_step_fn`` as ``config`` asks, keeping ``state``'s shardings."""
  return make_step_fn(model, tx, config.loss, sparse_step(config, model),
                      jax.tree_util.tree_map(lambda x: x.sharding, state))


def sparse_step(config, model: model_lib.TwoTower) -> bool:
  """Whether steps update embeddings sparsely; an error if the model has no table for it."""
  if not config.optimizer.sparse_embeddings:
    return False
  if not model.sparse_tables():
    raise ValueError("optimizer.sparse_embeddings=True needs a feature of kind 'id' (a large "
                     "embedding table, e.g. spec.id('user_id')), or turn sparse_embeddings "
                     "off.")
  return True


CHECK_LAG = 8  # steps a loss may be in flight before it is checked
HOW_TO_CONTINUE = (
    "To continue, lower optimizer.learning_rate (or set optimizer.grad_clip_norm) and train "
    "in a new --workdir, or rerun with --overwrite; also check the input features for "
    "extreme values. The checkpoints already written hold checked, finite states.")


def check_finite(loss: Array, step: int) -> float:
  """``loss`` as a float; a NaN or infinity stops training naming ``step``."""
  value = float(loss)
  if not np.isfinite(value):
    raise NonFiniteLossError(f"Training loss is {value} at step {step}. {HOW_TO_CONTINUE}")
  return value


def make_state_check_fn(model, loss_cfg, mesh: jax.sharding.Mesh
                        ) -> Callable[..., Array]:
  """``check(state, data, idx_SxB, valid_SxB, i)``: the loss of ``state.params`` on batch
  ``i`` (a forward pass, jitted), or NaN if any parameter or optimizer value is not finite.

  The loss a step returns comes from the parameters before its update, so a finite loss
  says nothing about the state the step produced; this says whether that state is good.
  """
  frozen = ml_collections.FrozenConfigDict(loss_cfg)

  def check(state, data, idx_SxB, valid_SxB, i):
    leaves = [x for x in jax.tree_util.tree_leaves((state.params, state.opt_state, state.freq))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    batch = gather_batch(data, idx_SxB[i], jax.random.split(state.rng)[1],
                         frozen.num_uniform_negatives)
    loss = loss_fn(state.params, state, data, batch, valid_SxB[i], model=model,
                   loss_cfg=frozen)
    return jnp.where(finite, loss, jnp.nan)

  return jax.jit(check, out_shardings=sharding.replicated(mesh))


def check_state(check_fn, state: TrainState, data, idx_SxB: Array, valid_SxB: Array, i: int,
                step: int) -> None:
  """NonFiniteLossError unless ``check_fn`` (``make_state_check_fn``) finds ``state`` good."""
  value = float(check_fn(state, data, idx_SxB, valid_SxB, i))
  if not np.isfinite(value):
    raise NonFiniteLossError(
        f"Training diverged at step {step}: the state it produced has non-finite parameters "
        f"or gives a non-finite loss ({value}), so it was not checkpointed. {HOW_TO_CONTINUE}")


def run_epoch(state: TrainState, step_fn, data, idx_SxB: Array, valid_SxB: Array,
              first_step: int, on_step: Callable[..., None] | None = None,
              carried: tuple[float, int] = (0.0, 0)) -> tuple[TrainState, float]:
  """Runs every batch of an epoch; returns the new state and the epoch's mean loss.

  Each step's loss is checked for finiteness ``CHECK_LAG`` steps later, so the
  device keeps a few steps queued while the host waits, and a NaN still stops
  training naming the step that produced it. ``carried``: the loss sum and step count of
  the part of the epoch run before a resume. ``on_step(step, state, loss, so_far)`` runs
  after each step; ``so_far()`` gives the epoch's loss sum and step count up to it (and
  waits for the steps in flight). When it returns True (early stopping) the epoch ends
  after that step.
  """
  in_flight: collections.deque[Array] = collections.deque()
  values = []  # each step's loss as a Python float, once checked
  num_steps = idx_SxB.shape[0]

  def so_far() -> tuple[float, int]:
    done = values + [float(x) for x in in_flight]
    return carried[0] + float(np.sum(done)), carried[1] + len(done)

  for i in range(num_steps):
    state, loss = step_fn(state, data, idx_SxB, valid_SxB, i)
    in_flight.append(loss)
    if len(in_flight) > CHECK_LAG:
      values.append(check_finite(in_flight.popleft(), first_step + len(values) + 1))
    if on_step is not None and on_step(first_step + i + 1, state, loss, so_far):
      break
  while in_flight:
    values.append(check_finite(in_flight.popleft(), first_step + len(values) + 1))
  total, count = carried[0] + float(np.sum(values)), carried[1] + len(values)
  return state, total / count if count else float("nan")


# ----------------------------------------------------------------------------
# Set-up shared by training and the training benchmark.


@dataclasses.dataclass
class Setup:
  """Everything a training run holds: the data, the model, the optimizer, the state."""

  prep: input_pipeline.Prepared
  mesh: jax.sharding.Mesh
  model: model_lib.TwoTower
  tx: optax.GradientTransformation
  state: TrainState
  data: dict[str, Any]  # device-resident training arrays
  step_fn: Callable[..., tuple[TrainState, Array]]
  steps_per_epoch: int
  total_steps: int


def create_setup(config, prep: input_pipeline.Prepared | None = None, *,
                 total_steps: int | None = None, rng: Array | int | None = None) -> Setup:
  """Prepares the data (unless given), builds the mesh, model, optimizer, state and step.

  ``total_steps`` (default: every epoch of ``config.train``) sets the schedule length;
  ``rng`` (default ``config.seed``) the initialization.
  """
  prep = input_pipeline.prepare(config) if prep is None else prep
  b = config.train.batch_size
  mesh = sharding.make_mesh()
  if b % mesh.size:
    raise ValueError(f"train.batch_size={b} does not divide over {mesh.size} devices; "
                     f"use a multiple of {mesh.size}.")
  steps_per_epoch = -(-len(prep.train_item) // b)
  if total_steps is None:
    total_steps = steps_per_epoch * config.train.num_epochs
  model = model_lib.create_model(config.model, prep.query_features, prep.candidate_features)
  tx = create_optimizer(config.optimizer, total_steps)
  state = init_state(model, tx, prep, config, config.seed if rng is None else rng, mesh)
  data = input_pipeline.device_data(prep, mesh, config.train.recency_half_life_days)
  return Setup(prep=prep, mesh=mesh, model=model, tx=tx, state=state, data=data,
               step_fn=create_step_fn(config, model, tx, state),
               steps_per_epoch=steps_per_epoch, total_steps=total_steps)


# ----------------------------------------------------------------------------
# Validation and early stopping.


@flax.struct.dataclass
class BestState:
  """The best validation evaluation so far, as a checkpoint holds it. The bookkeeping is in
  host numbers (float64: a resumed run compares exactly as an uninterrupted one)."""

  params: Any  # its parameters (before the first evaluation: the state's own)
  metric: np.ndarray  # its value of train.early_stopping_metric; -inf before the first
  step: np.ndarray  # the step it was made at; -1 before the first
  bad_evals: np.ndarray  # evaluations since then without a gain


@flax.struct.dataclass
class TrainStateWithBest(TrainState):
  """The checkpoint of a run with a validation split: its train state and ``BestState``."""

  best: BestState


class EarlyStopping:
  """Evaluates on the validation split, keeps the best parameters, says when to stop.

  Evaluations fall at each epoch's last step, or every ``train.eval_every_steps`` steps, and
  at the last step; a gain is a value of ``train.early_stopping_metric`` above the best so
  far. The best parameters are a device copy (the state's own are donated to the next
  step); every checkpoint carries them and the bookkeeping (``checkpoint``), so a run
  resumed after a kill evaluates and stops exactly as an uninterrupted one.
  """

  def __init__(self, config, run: Setup):
    self.config, self.run = config, run
    self.key = config.train.early_stopping_metric
    self.patience = int(config.train.patience)
    self.every = int(config.train.eval_every_steps) or run.steps_per_epoch
    self.params = None  # the best parameters; None before the first evaluation
    self.metric, self.step, self.bad_evals = float("-inf"), -1, 0
    self.seconds = 0.0  # spent evaluating in this process
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, run.state.params)
    self._copy = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p),
                         out_shardings=shardings)

  @property
  def stopped(self) -> bool:
    """Whether ``train.patience`` evaluations in a row brought no gain."""
    return 0 < self.patience <= self.bad_evals

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.run.total_steps

  def evaluate(self, state: TrainState, step: int) -> dict[str, Any]:
    """Scores ``state`` (after ``step``) on validation and updates the best; returns the
    log record."""
    t0 = time.perf_counter()
    values = evaluate.validation_metrics(self.config, self.run.prep, self.run.model,
                                         sharding.host_params(state.params))
    if self.key not in values:
      raise ValueError(f"train.early_stopping_metric={self.key!r} is not among the validation "
                       f"metrics; choose one of {', '.join(sorted(values))}.")
    value = values[self.key]
    if value > self.metric:  # NaN never is a gain
      self.params, self.metric, self.step, self.bad_evals = (
          self._copy(state.params), value, step, 0)
    else:
      self.bad_evals += 1
    self.seconds += time.perf_counter() - t0
    return {f"validation/{self.key}": value, "best_step": self.step}

  def best_params(self, state: TrainState) -> Any:
    """The best evaluation's parameters (``state``'s before any evaluation)."""
    return state.params if self.params is None else self.params

  def checkpoint(self, state: TrainState) -> TrainStateWithBest:
    """``state`` with the best evaluation so far, as a checkpoint holds it."""
    best = BestState(params=self.best_params(state), metric=np.asarray(self.metric, np.float64),
                     step=np.asarray(self.step, np.int64),
                     bad_evals=np.asarray(self.bad_evals, np.int64))
    return TrainStateWithBest(best=best, **{f.name: getattr(state, f.name)
                                            for f in dataclasses.fields(TrainState)})

  def restore(self, saved: TrainStateWithBest) -> TrainState:
    """Takes the best evaluation from ``saved`` (a restored ``checkpoint``); returns its
    train state."""
    self.metric, self.step = float(saved.best.metric), int(saved.best.step)
    self.bad_evals = int(saved.best.bad_evals)
    self.params = saved.best.params if self.step >= 0 else None
    return TrainState(**{f.name: getattr(saved, f.name) for f in dataclasses.fields(TrainState)})

  def summary(self, steps: int) -> dict[str, Any]:
    """What metrics.json records of the validation and the early stopping."""
    return {"best_step": self.step, f"best_validation/{self.key}": self.metric,
            "stopped_early": self.stopped and steps < self.run.total_steps,
            "num_validation": len(self.run.prep.valid_item),
            "validation_seconds": self.seconds}


# ----------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overwrite: bool = False) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints), evaluates, serves.

  A workdir holding a different run is an error, raised before anything is written,
  unless ``overwrite`` (then the old run is deleted first); so is one that another process
  is using (``workdir.open_run``).
  """
  if not config.data.get("validation_fraction") and (
      config.train.get("patience") or config.train.get("eval_every_steps")):
    raise config_lib.ConfigError([
        "train.patience and train.eval_every_steps need a validation split to evaluate on; "
        "set e.g. --config.data.validation_fraction=0.1, or set them to 0."])
  workdir_path = pathlib.Path(workdir)
  primary = jax.process_index() == 0  # with several processes, one writes the files
  t_start = time.perf_counter()
  prep = input_pipeline.prepare(config)
  config_lib.check_against_data(config, prep.num_items)
  t_prepared = time.perf_counter()
  split_files = ()
  if config.data.split == "files":
    split_files = tuple(t for t in (prep.train, prep.validation, prep.test) if t is not None)
  fp = workdir_lib.fingerprint(config, workdir_lib.data_digest(prep.dataset, split_files))
  with workdir_lib.open_run(workdir_path, config, fp, overwrite=overwrite,
                            process_index=jax.process_index(),
                            agree=_process_0_failed if jax.process_count() > 1 else None):
    return _run(config, workdir_path, prep, primary, t_prepared - t_start)


def _process_0_failed(failed: bool) -> bool:
  """Whether process 0 reported ``failed``; every process calls this together."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))


def _run(config, workdir_path: pathlib.Path, prep: input_pipeline.Prepared, primary: bool,
         prepare_seconds: float) -> dict[str, Any]:
  """Restores, trains, evaluates and writes the serving files and metrics (workdir opened).

  With a validation split the test split is scored once, here, with the best parameters.
  """
  run = create_setup(config, prep)
  early = EarlyStopping(config, run) if prep.valid_item is not None else None
  mngr = checkpoints.checkpoint_manager(workdir_path, config.train.max_checkpoints)
  try:
    if early is None:
      run.state = checkpoints.restore_latest(mngr, run.state)
    else:
      run.state = early.restore(checkpoints.restore_latest(mngr, early.checkpoint(run.state)))
  except BaseException:
    mngr.close()
    raise
  start_step = int(run.state.step)
  log = logs.RunLog(workdir_path, total_examples=run.total_steps * config.train.batch_size,
                    initial_examples=start_step * config.train.batch_size,
                    progress=config.train.progress and primary, write=primary)
  try:
    train_seconds = _train_epochs(config, run, mngr, log, early)
  finally:
    mngr.close()
    log.close_progress()

  t_eval = time.perf_counter()
  params = sharding.host_params(run.state.params if early is None
                                else early.best_params(run.state))
  metrics = evaluate.evaluate(config, prep, run.model, params)
  eval_seconds = time.perf_counter() - t_eval
  if primary:
    serving.save(workdir_path / "serving", config, prep, run.model, params)
  trained_examples = (int(run.state.step) - start_step) * config.train.batch_size
  metrics.update({
      "config": config.name, "split": config.data.split, "seed": int(config.seed),
      "source": prep.dataset.source, "num_train": len(prep.train_item),
      "num_test": len(prep.test_item),
      "num_candidates": prep.num_items, "prepare_seconds": prepare_seconds,
      "train_seconds": train_seconds, "eval_seconds": eval_seconds,
      "examples_per_second": trained_examples / train_seconds if train_seconds else None,
      "resumed_from_step": start_step, "steps": int(run.state.step),
      "devices": jax.device_count(), "backend": jax.default_backend(),
  })
  if early is not None:
    metrics.update(early.summary(int(run.state.step)))
  if primary:
    (workdir_path / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
  log.final(metrics)
  return metrics


def _train_epochs(config, run: Setup, mngr: ocp.CheckpointManager, log: logs.RunLog,
                  early: EarlyStopping | None = None) -> float:
  """Trains ``run.state`` from its step to the last epoch, checkpointing; returns seconds.

  Checkpoints (every ``checkpoint_every_steps`` and at the last step) are written only of
  states ``make_state_check_fn`` finds good, with the epoch's losses so far. With ``early``
  (a validation split) the state is checked and evaluated on validation at each of
  ``early``'s steps, each evaluation is logged (with its epoch's row when it falls at the
  epoch's end), checkpoints carry the best evaluation so far, and training stops after
  ``train.patience`` evaluations without a gain. The seconds leave the evaluations out.
  """
  b = config.train.batch_size
  num_train = len(run.prep.train_item)
  start_step = int(run.state.step)
  train_seconds = 0.0
  check_fn = make_state_check_fn(run.model, config.loss, run.mesh)
  rep = sharding.replicated(run.mesh)
  first_epoch = start_step // run.steps_per_epoch
  if early is not None and early.stopped:  # resumed from the checkpoint it stopped at
    first_epoch = config.train.num_epochs

  for epoch in range(first_epoch, config.train.num_epochs):
    idx_SxB, valid_SxB = input_pipeline.epoch_batches(num_train, b, config.seed, epoch)
    first = max(start_step - epoch * run.steps_per_epoch, 0)
    idx_SxB = sharding.put_batches(idx_SxB[first:], run.mesh)
    valid_SxB = sharding.put_batches(valid_SxB[first:], run.mesh)
    base = epoch * run.steps_per_epoch + first
    carried = (0.0, 0)
    if first:  # resumed mid-epoch: the checkpoint carries the epoch's losses so far
      carried = (float(run.state.epoch_loss_sum), int(run.state.epoch_loss_steps))
    at_end: dict[str, Any] = {}  # an evaluation at the epoch's last step, for its row

    def on_step(step, state, loss, so_far, idx_SxB=idx_SxB, valid_SxB=valid_SxB, base=base,
                epoch=epoch, at_end=at_end) -> bool:
      log.progress(b)
      checked = stop = False
      if early is not None and early.due(step):
        # Only a state known good is evaluated (and may become the best).
        check_finite(loss, step)
        check_state(check_fn, state, run.data, idx_SxB, valid_SxB, step - base - 1, step)
        checked = True
        record = early.evaluate(state, step)
        stop = early.stopped and step < run.total_steps
        if step == (epoch + 1) * run.steps_per_epoch or stop:
          at_end.update(record)
        else:
          loss_sum, loss_steps = so_far()
          log.epoch({"epoch": epoch + 1, "step": step, "loss": loss_sum / loss_steps, **record})
      last = step == run.total_steps or stop
      if step % config.train.checkpoint_every_steps == 0 or last:
        if not checked:
          check_finite(loss, step)
          check_state(check_fn, state, run.data, idx_SxB, valid_SxB, step - base - 1, step)
        loss_sum, loss_steps = so_far()
        state = state.replace(epoch_loss_sum=sharding.to_devices(np.float32(loss_sum), rep),
                              epoch_loss_steps=sharding.to_devices(np.int32(loss_steps), rep))
        saved = state if early is None else early.checkpoint(state)
        mngr.save(step, args=ocp.args.StandardSave(saved), force=last)
      return stop

    t0 = time.perf_counter()
    eval_before = early.seconds if early is not None else 0.0
    run.state, epoch_loss = run_epoch(run.state, run.step_fn, run.data, idx_SxB, valid_SxB,
                                      base, on_step, carried)
    jax.block_until_ready(run.state)
    seconds = time.perf_counter() - t0
    if early is not None:
      seconds -= early.seconds - eval_before
    train_seconds += seconds
    n_ex = int(jnp.sum(valid_SxB[:int(run.state.step) - base]))
    log.epoch({"epoch": epoch + 1, "step": int(run.state.step), "loss": epoch_loss,
               "examples_per_second": n_ex / max(seconds, 1e-9), "epoch_seconds": seconds,
               **at_end})
    if early is not None and early.stopped:
      break
  final_step = int(run.state.step)
  if final_step not in mngr.all_steps():  # nothing trained: the initial state
    saved = run.state if early is None else early.checkpoint(run.state)
    mngr.save(final_step, args=ocp.args.StandardSave(saved), force=True)
  mngr.wait_until_finished()
  return train_seconds
