"""Config helpers: load config files, reject unknown keys with a suggestion, check values.

``validate(config)`` checks every value before any work starts and raises one
:class:`ConfigError` listing every bad value with its valid range and the fix;
``check_against_data(config, num_items)`` adds the checks that need the data.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import numbers
import pathlib
import re
from collections.abc import Callable, Sequence

import ml_collections

from twotower_jax import spec
from twotower_jax.data import splits


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` (or ``get_config(arg)``) from a Python config file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Config file not found: {path}. Pass e.g. --config configs/seed.py.")
  spec = importlib.util.spec_from_file_location(f"_twotower_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def sibling_config(this_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config ``name`` from the same directory as ``this_file`` (for config inheritance)."""
  return load_config_file(pathlib.Path(this_file).with_name(f"{name}.py"), arg)


def set_path(config: ml_collections.ConfigDict, dotted_key: str, value) -> None:
  """``set_path(c, "train.batch_size", 512)``; strings are cast to the field's type."""
  *path, last = dotted_key.split(".")
  node = config
  for i, part in enumerate([*path, last]):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f"Unknown config key {dotted_key!r}: "
                       f"{'.'.join(path[:i])!r} is a value, not a section.")
    if part not in node:
      raise ValueError(f"Unknown config key {dotted_key!r} (no {part!r} here)."
                       f"{suggest(part, node.keys())} Valid keys here: {sorted(node.keys())}.")
    if i < len(path):
      node = node[part]
  if isinstance(value, str) and not isinstance(node[last], str):
    value = (value.lower() in ("1", "true", "yes")) if isinstance(node[last], bool) else type(
        node[last])(value)
  node[last] = value


def suggest(key: str, known) -> str:
  match = difflib.get_close_matches(key, list(known), n=1)
  return f" Did you mean {match[0]!r}?" if match else ""


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
               prefix: str = "") -> None:
  """Raises ValueError for any key of ``config`` that ``reference`` (the seed config) lacks."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if name in SPEC_SECTIONS:  # feature names are the user's; spec.check_specs checks them
      continue
    if key not in reference:
      raise ValueError(
          f"Unknown config key {name!r}.{suggest(key, reference.keys())} "
          f"Valid keys here: {sorted(reference.keys())}.")
    if isinstance(value, ml_collections.ConfigDict):
      check_keys(value, reference[key], prefix=f"{name}.")


def base_config() -> ml_collections.ConfigDict:
  """Every config key with its default: the TFRS notebook's settings (configs/seed.py)."""
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 42
  c.cpu_devices = 0  # on CPU: XLA devices the host is split into (0: one per core)
  c.distributed = False  # True: jax.distributed.initialize() for multi-host runs.
  c.coordinator_address = ""  # with distributed: host:port of process 0 (empty: auto-detect)
  c.num_processes = 0
  c.process_id = -1

  c.data = ml_collections.ConfigDict()
  # tables (your own files) | grouplens | tfds | ml-1m | ml-20m | ml-25m | ml-latest | synthetic
  c.data.source = "grouplens"
  c.data.dir = ""  # empty: $TWOTOWER_DATA_DIR, then the user cache (downloading if online)
  c.data.download = True
  c.data.tfds_data_dir = ""  # source=tfds: TFDS data_dir (empty: TFDS's default)
  c.data.split = "seed"  # seed | random | temporal | leave_last_out | files
  c.data.train_size = 80_000
  c.data.test_size = 10_000
  c.data.test_fraction = 0.2
  # > 0: this share of the training interactions (after the train/test split) is held out
  # for validation: the latest part for temporal splits, a seeded random part otherwise.
  c.data.validation_fraction = 0.0
  # > 0: this share of the users (seeded, among those with more than cold_user_history
  # interactions) is held out of training entirely; each is evaluated from their first
  # cold_user_history interactions by time, without retraining (metrics.json cold_users/...).
  c.data.cold_user_fraction = 0.0
  c.data.cold_user_history = 5
  c.data.train_file = ""
  c.data.test_file = ""
  c.data.synthetic_users = 10_000
  c.data.synthetic_items = 10_000
  c.data.synthetic_interactions = 1_000_000
  c.data.synthetic_clusters = 20
  c.data.synthetic_affinity = 0.8
  c.data.synthetic_zipf_a = 1.1
  c.data.synthetic_seed = 0
  # source=tables: your interactions (required), items and users (optional) as CSV or Parquet
  # (paths relative to data.dir), and the columns that play each role.
  c.data.interactions_file = ""
  c.data.items_file = ""
  c.data.users_file = ""
  c.data.user_key = "user_id"
  c.data.item_key = "item_id"
  c.data.time_key = ""  # empty: no timestamp (no temporal split, no timestamp feature)
  c.data.weight_key = ""  # a rating or weight column, kept for export
  c.data.unknown_items = "error"  # error | drop: interactions whose item is not in items_file

  # What each tower reads: feature name -> spec (twotower_jax.spec). Query features read the
  # interactions (with the users table joined in), candidate features the items table.
  c.features = ml_collections.ConfigDict()
  c.features.query = {
      "age": spec.numeric("raw_user_age"),
      "gender": spec.categorical("user_gender", dim=2),
      "occupation": spec.categorical("user_occupation_text", dim=8),
      "time": spec.timestamp("timestamp", buckets=1000, dim=32),
  }
  c.features.candidate = {
      "title": spec.id("movie_title", dim=32),
      "genre": spec.multi_hot("movie_genres", dim=8, max_values=1),  # the first genre
  }

  c.model = ml_collections.ConfigDict()
  c.model.mlp = (64, 32, 16)
  c.model.l2_normalize = False
  c.model.temperature = 1.0
  c.model.learn_temperature = False
  c.model.table_rows_multiple = 1  # pad the id tables to a multiple of rows (for sharding)

  c.loss = ml_collections.ConfigDict()
  c.loss.logq = "none"  # none | counts (training frequencies) | streaming (Yi et al. 2019)
  c.loss.streaming_buckets = 1 << 16
  c.loss.streaming_alpha = 0.01
  c.loss.remove_accidental_hits = False
  c.loss.num_hard_negatives = 0  # 0: all in-batch negatives
  c.loss.num_uniform_negatives = 0  # > 0: mixed negative sampling (Yang et al. 2020)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adagrad"  # adagrad | adam | adamw | sgd
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = "constant"  # constant | cosine (after warmup)
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 0.0  # 0: off
  # True: the tables of `id` features are updated only at the rows a batch uses (for
  # adagrad/sgd without weight decay equal to the dense update; adam moments become lazy).
  c.optimizer.sparse_embeddings = False

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 2048
  c.train.num_epochs = 5
  # True: the tables of `id` features (and their optimizer state) are split by rows over
  # the devices instead of replicated on each.
  c.train.shard_embeddings = False
  c.train.recency_half_life_days = 0.0  # > 0: weight examples by 0.5 ** (age / half-life)
  c.train.checkpoint_every_steps = 500
  c.train.max_checkpoints = 2
  c.train.progress = True
  # With a validation split: evaluate on it every epoch (or every eval_every_steps steps),
  # keep the best parameters by early_stopping_metric, and stop after `patience`
  # evaluations without a gain (0: never stop early).
  c.train.patience = 0
  c.train.eval_every_steps = 0
  c.train.early_stopping_metric = "exclude_seen/hr_100"

  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (1, 5, 10, 50, 100)
  c.eval.batch_size = 4096
  c.eval.baselines = True
  # The EASE baseline (Steck 2019): its L2 weight, the weight factor**k of the history item
  # k steps back (1: no recency weighting), and the largest catalogue it runs on (it inverts
  # an N x N matrix; above, it is skipped with one log line).
  c.eval.ease_lambda = 500.0
  c.eval.ease_recency = 1.0
  c.eval.ease_max_items = 20_000
  # Weights w of a blend of the model and EASE under exclude_history: (1 - w) * model + w *
  # EASE, each standardized per query. Several: each scored on validation, the best one
  # (by train.early_stopping_metric if it is an exclude_history metric, else
  # exclude_history/hr_<largest k>) scored on test. Empty: no blend.
  c.eval.blend_ease_weights = ()

  c.serve = ml_collections.ConfigDict()
  c.serve.top_n = 10
  c.serve.bottom_n = 0
  c.serve.exclude_rated = False
  c.serve.title_column = ""  # the items' title column shown by recommend ('': first text one)
  # The index saved in the serving directory (twotower_jax/ann.py): exact, or FAISS IVF /
  # HNSW by inner product (needs pip install 'twotower_jax[faiss]'). IVF: cells (0: about
  # 4 sqrt(N)) and cells searched per query; HNSW: links per node and the beam widths.
  c.serve.index = "exact"
  c.serve.ivf_nlist = 0
  c.serve.ivf_nprobe = 32
  c.serve.hnsw_m = 32
  c.serve.hnsw_ef_construction = 64
  c.serve.hnsw_ef_search = 128
  return c


# ----------------------------------------------------------------------------
# Value checks: one pass over every key, before any work starts.

# The accepted values of each choice key. Modules above this one act on them (they import
# config, so config cannot import them back); tests/test_config_validation.py checks these
# lists against data/sources.py LOADERS, features.py, and train.create_optimizer.
DATA_SOURCES = ("tables", "grouplens", "tfds", "ml-1m", "ml-20m", "ml-25m", "ml-latest",
                "synthetic")
UNKNOWN_ITEMS = ("error", "drop")
# The sections holding feature specs (keys are feature names, values specs).
SPEC_SECTIONS = ("features.query", "features.candidate")
DATA_SPLITS = (*splits.SPLIT_KINDS, "files")
LOGQ_MODES = ("none", "counts", "streaming")
OPTIMIZERS = ("adagrad", "adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
INDEX_KINDS = ("exact", "faiss_ivf", "faiss_hnsw")  # ann.KINDS


class ConfigError(ValueError):
  """Bad config values; the message lists every problem, one a line, each with its fix."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    n = len(self.problems)
    super().__init__(f"Invalid config ({n} problem{'' if n == 1 else 's'}):\n"
                     + "\n".join(f"  {p}" for p in self.problems))


# A check takes (value, example: the key's default) and returns None, or what is wrong
# and how to fix it (a sentence).
Check = Callable[[object, object], "str | None"]


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int, what: str) -> Check:
  def check(v, eg):
    return None if _is_int(v) and v >= low else f"must be {what} (e.g. {eg!r})."
  return check


def _real(what: str, ok: Callable[[float], bool]) -> Check:
  def check(v, eg):
    return None if _is_real(v) and ok(v) else f"must be {what} (e.g. {eg!r})."
  return check


def _one_of(choices: Sequence[str]) -> Check:
  def check(v, eg):
    if isinstance(v, str) and v in choices:
      return None
    hint = suggest(v, choices) if isinstance(v, str) else ""
    return (f"must be one of {', '.join(map(repr, choices))}."
            f"{hint or f' E.g. {eg!r}.'}")
  return check


def _string(what: str) -> Check:
  def check(v, eg):
    del eg
    return None if isinstance(v, str) else f"must be a string: {what}."
  return check


def _bool(v, eg) -> str | None:
  del eg
  return None if isinstance(v, bool) else "must be True or False."


def _layer_widths(v, eg) -> str | None:
  if not isinstance(v, (tuple, list)) or not v:
    return f"must be a non-empty tuple of layer widths, e.g. {eg!r}."
  if not all(_is_int(w) and w >= 1 for w in v):
    return f"every layer width must be a positive integer, e.g. {eg!r}."
  return None


def _cutoffs(v, eg) -> str | None:
  if not isinstance(v, (tuple, list)) or not v or not all(_is_int(k) and k >= 1 for k in v):
    return f"must be a non-empty tuple of positive integers (top-k cutoffs), e.g. {eg!r}."
  repeated = sorted({int(k) for k in v if list(v).count(k) > 1})
  if repeated:
    return (f"the cutoffs must be distinct ({', '.join(map(str, repeated))} repeated), "
            f"e.g. {eg!r}.")
  return None


def _blend_weights(v, eg) -> str | None:
  del eg
  if not isinstance(v, (tuple, list)) or not all(_is_real(w) and 0 <= w <= 1 for w in v):
    return ("must be a tuple of weights in [0, 1] (the EASE share of a model + EASE blend), "
            "e.g. (0.25, 0.5), or () for no blend.")
  return None


# A model metric where higher is better: "<protocol>/<metric>" (twotower_jax.metrics), or
# the TFRS alias "top_<k>_accuracy".
METRIC_KEY = re.compile(r"(?:(?:include_seen|exclude_seen|exclude_history)/"
                        r"(?:(?:user/)?mrr|(?:hr|ndcg|recall|user/hr|user/ndcg)_(\d+))"
                        r"|top_(\d+)_accuracy)")


def _metric_key(v, eg) -> str | None:
  if isinstance(v, str) and METRIC_KEY.fullmatch(v):
    return None
  return ("must be a model metric where higher is better: '<protocol>/<metric>' with protocol "
          "include_seen, exclude_seen or exclude_history and metric mrr, user/mrr, or hr, "
          f"ndcg, recall, user/hr, user/ndcg followed by _<k> (e.g. {eg!r}), or "
          "'top_<k>_accuracy'.")


_POSITIVE = _int_at_least(1, "a positive integer")
_NON_NEGATIVE = _int_at_least(0, "an integer >= 0")
_POSITIVE_REAL = _real("a finite number > 0", lambda x: x > 0)
_NON_NEGATIVE_REAL = _real("a finite number >= 0", lambda x: x >= 0)

# Every key of base_config() and its check (a test asserts that none is missing).
CHECKS: dict[str, Check] = {
    "name": _string("the run's name, e.g. 'default'"),
    "seed": _int_at_least(0, "an integer >= 0"),
    "cpu_devices": _int_at_least(0, "an integer >= 0 (0: one device per core)"),
    "distributed": _bool,
    "coordinator_address": _string("'host:port' of process 0, or '' to auto-detect"),
    "num_processes": _int_at_least(0, "an integer >= 0 (0: auto-detect)"),
    "process_id": _int_at_least(-1, "an integer >= -1 (-1: auto-detect)"),
    "data.source": _one_of(DATA_SOURCES),
    "data.dir": _string("a folder path, or '' for the default lookup"),
    "data.download": _bool,
    "data.tfds_data_dir": _string("a folder path, or '' for TFDS's default"),
    "data.split": _one_of(DATA_SPLITS),
    "data.train_size": _POSITIVE,
    "data.test_size": _POSITIVE,
    "data.test_fraction": _real("a number in (0, 1): the test share", lambda x: 0 < x < 1),
    "data.validation_fraction": _real(
        "a number in [0, 1): the validation share of the training part (0: none)",
        lambda x: 0 <= x < 1),
    "data.cold_user_fraction": _real(
        "a number in [0, 1): the share of users held out as cold users (0: none)",
        lambda x: 0 <= x < 1),
    "data.cold_user_history": _int_at_least(1, "an integer >= 1: each cold user's given "
                                            "history length"),
    "data.train_file": _string("a ratings file path (split='files'), or ''"),
    "data.test_file": _string("a ratings file path (split='files'), or ''"),
    "data.synthetic_users": _POSITIVE,
    "data.synthetic_items": _POSITIVE,
    "data.synthetic_interactions": _POSITIVE,
    "data.synthetic_clusters": _POSITIVE,
    "data.synthetic_affinity": _real("a number in [0, 1]", lambda x: 0 <= x <= 1),
    "data.synthetic_zipf_a": _real("a finite number >= 0 (0: uniform popularity)",
                                   lambda x: x >= 0),
    "data.synthetic_seed": _int_at_least(0, "an integer >= 0"),
    "data.interactions_file": _string("a CSV or Parquet file (source='tables'), or ''"),
    "data.items_file": _string("a CSV or Parquet file, or '' (no items table)"),
    "data.users_file": _string("a CSV or Parquet file, or '' (no users table)"),
    "data.user_key": _string("the user key column of the interactions"),
    "data.item_key": _string("the item key column of the interactions"),
    "data.time_key": _string("the timestamp column, or '' for none"),
    "data.weight_key": _string("a weight or rating column, or '' for none"),
    "data.unknown_items": _one_of(UNKNOWN_ITEMS),
    "model.mlp": _layer_widths,
    "model.l2_normalize": _bool,
    "model.temperature": _POSITIVE_REAL,
    "model.learn_temperature": _bool,
    "model.table_rows_multiple": _int_at_least(1, "a positive integer (1: no padding)"),
    "loss.logq": _one_of(LOGQ_MODES),
    "loss.streaming_buckets": _POSITIVE,
    "loss.streaming_alpha": _real("a number in (0, 1]", lambda x: 0 < x <= 1),
    "loss.remove_accidental_hits": _bool,
    "loss.num_hard_negatives": _int_at_least(0, "an integer >= 0 (0: all in-batch negatives)"),
    "loss.num_uniform_negatives": _NON_NEGATIVE,
    "optimizer.name": _one_of(OPTIMIZERS),
    "optimizer.learning_rate": _POSITIVE_REAL,
    "optimizer.schedule": _one_of(SCHEDULES),
    "optimizer.warmup_steps": _NON_NEGATIVE,
    "optimizer.weight_decay": _NON_NEGATIVE_REAL,
    "optimizer.grad_clip_norm": _real("a finite number >= 0 (0: off)", lambda x: x >= 0),
    "optimizer.sparse_embeddings": _bool,
    "train.batch_size": _POSITIVE,
    "train.num_epochs": _POSITIVE,
    "train.shard_embeddings": _bool,
    "train.recency_half_life_days": _real("a finite number >= 0 (0: off)", lambda x: x >= 0),
    "train.checkpoint_every_steps": _POSITIVE,
    "train.max_checkpoints": _POSITIVE,
    "train.progress": _bool,
    "train.patience": _int_at_least(0, "an integer >= 0 (0: never stop early)"),
    "train.eval_every_steps": _int_at_least(0, "an integer >= 0 (0: once per epoch)"),
    "train.early_stopping_metric": _metric_key,
    "eval.ks": _cutoffs,
    "eval.batch_size": _POSITIVE,
    "eval.baselines": _bool,
    "eval.ease_lambda": _POSITIVE_REAL,
    "eval.ease_recency": _real("a number in (0, 1] (1: no recency weighting)",
                               lambda x: 0 < x <= 1),
    "eval.ease_max_items": _int_at_least(0, "an integer >= 0 (0: never run EASE)"),
    "eval.blend_ease_weights": _blend_weights,
    "serve.top_n": _POSITIVE,
    "serve.bottom_n": _NON_NEGATIVE,
    "serve.exclude_rated": _bool,
    "serve.title_column": _string("an items column, or '' for the first text column"),
    "serve.index": _one_of(INDEX_KINDS),
    "serve.ivf_nlist": _int_at_least(0, "an integer >= 0 (0: about 4 sqrt(items))"),
    "serve.ivf_nprobe": _POSITIVE,
    "serve.hnsw_m": _int_at_least(2, "an integer >= 2"),
    "serve.hnsw_ef_construction": _POSITIVE,
    "serve.hnsw_ef_search": _POSITIVE,
}


def _show(value) -> str:
  """``value`` as it is written after ``key=`` in a message: one line, at most 80 chars."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  elif _is_int(value):
    value = int(value)
  elif isinstance(value, (tuple, list)):
    value = type(value)(int(v) if _is_int(v) else v for v in value)
  text = repr(value).replace("\n", " ")
  return text if len(text) <= 80 else text[:77] + "..."


def _leaves(node, prefix: str = ""):
  """(dotted key, value) of every non-section key under ``node``."""
  for key, value in node.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


_MISSING = object()


def _lookup(config, dotted: str):
  """(value or _MISSING, the dotted name of a section that is set to a plain value)."""
  node = config
  *path, last = dotted.split(".")
  for i, part in enumerate(path):
    if part not in node:
      return _MISSING, None
    node = node[part]
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return _MISSING, ".".join(path[:i + 1])
  return (node[last] if last in node else _MISSING), None


def _section(config, dotted: str):
  value, _ = _lookup(config, dotted)
  return value if isinstance(value, (ml_collections.ConfigDict, dict)) else {}


def _feature_problems(config) -> list[str]:
  """Every problem of the two towers' feature specs, and names used by both towers."""
  problems = []
  for section in SPEC_SECTIONS:
    value, _ = _lookup(config, section)
    if not isinstance(value, (ml_collections.ConfigDict, dict)):
      problems.append(f"{section}: must map feature names to specs, e.g. "
                      "{'item': spec.id('item_id')}.")
      continue
    try:
      spec.check_specs(section.split(".")[1], value)
    except spec.SpecError as e:
      problems += [line.strip() for line in str(e).splitlines()[1:]]
  for name, s in _section(config, "features.candidate").items():
    if hasattr(s, "get") and s.get("kind") == "history":
      problems.append(f"features.candidate.{name}: a history describes the user, so it "
                      "belongs in features.query.")
  problems += spec.shared_table_problems(_section(config, "features.query"),
                                         _section(config, "features.candidate"))
  both = set(_section(config, SPEC_SECTIONS[0])) & set(_section(config, SPEC_SECTIONS[1]))
  if both:
    problems.append(f"features: {sorted(both)} named in both towers; give each feature its "
                    "own name (they name the encoders and the embedding tables).")
  return problems


def _cross_checks(ok: dict, config) -> list[str]:
  """Problems that involve several keys; only keys whose own check passed are in ``ok``."""
  problems = []

  def have(*keys):
    return all(k in ok for k in keys)

  if have("data.split") and ok["data.split"] == "files":
    for key, example in (("train_file", "u1.base"), ("test_file", "u1.test")):
      if have(f"data.{key}") and not ok[f"data.{key}"]:
        problems.append(f"data.{key}='': data.split='files' needs it (a u.data-format "
                        f"ratings file); set e.g. --config.data.{key}={example}.")
  if (have("data.source", "data.synthetic_clusters", "data.synthetic_items")
      and ok["data.source"] == "synthetic"
      and ok["data.synthetic_clusters"] > ok["data.synthetic_items"]):
    items = ok["data.synthetic_items"]
    problems.append(f"data.synthetic_clusters={ok['data.synthetic_clusters']}: more clusters "
                    f"than the {items} items of data.synthetic_items; use at most {items}.")
  if have("data.validation_fraction", "train.patience", "train.eval_every_steps") and (
      not ok["data.validation_fraction"]):
    for key in ("train.patience", "train.eval_every_steps"):
      if ok[key]:
        problems.append(f"{key}={ok[key]}: needs a validation split to evaluate on; set e.g. "
                        f"--config.data.validation_fraction=0.1, or {key}=0.")
  if have("train.early_stopping_metric", "eval.ks", "data.validation_fraction") and (
      ok["data.validation_fraction"]):  # the metric is computed only with a validation split
    m = METRIC_KEY.fullmatch(ok["train.early_stopping_metric"])
    k = m.group(1) or m.group(2)
    if k is not None and int(k) not in [int(x) for x in ok["eval.ks"]]:
      problems.append(f"train.early_stopping_metric={ok['train.early_stopping_metric']!r}: "
                      f"its cutoff {k} is not one of eval.ks={_show(ok['eval.ks'])}; add it "
                      "to eval.ks or choose a metric at one of those cutoffs.")
  if have("eval.blend_ease_weights", "data.validation_fraction") and (
      len(ok["eval.blend_ease_weights"]) > 1 and not ok["data.validation_fraction"]):
    problems.append(f"eval.blend_ease_weights={_show(ok['eval.blend_ease_weights'])}: several "
                    "weights are chosen between on validation; set e.g. "
                    "--config.data.validation_fraction=0.1, or give one weight.")
  if have("data.source", "data.interactions_file") and ok["data.source"] == "tables" and (
      not ok["data.interactions_file"]):
    problems.append("data.interactions_file='': data.source='tables' needs your interactions "
                    "(CSV or Parquet); set e.g. --config.data.interactions_file=events.parquet.")
  if have("serve.index") and ok["serve.index"] != "exact" and (
      importlib.util.find_spec("faiss") is None):
    problems.append(f"serve.index={ok['serve.index']!r}: needs FAISS, an optional extra; "
                    "install it with pip install 'twotower_jax[faiss]', or use "
                    "serve.index='exact'.")
  if have("serve.ivf_nlist", "serve.ivf_nprobe") and 0 < ok["serve.ivf_nlist"] < (
      ok["serve.ivf_nprobe"]):
    problems.append(f"serve.ivf_nprobe={ok['serve.ivf_nprobe']}: more cells than the "
                    f"{ok['serve.ivf_nlist']} of serve.ivf_nlist; use at most "
                    f"{ok['serve.ivf_nlist']}.")
  problems += _feature_problems(config)
  kinds = [s.get("kind") for t in SPEC_SECTIONS for s in _section(config, t).values()
           if hasattr(s, "get")]
  if have("optimizer.sparse_embeddings") and ok["optimizer.sparse_embeddings"] and (
      "id" not in kinds):
    problems.append("optimizer.sparse_embeddings=True: needs a feature of kind 'id' (a large "
                    "embedding table, e.g. spec.id('user_id')), or turn sparse_embeddings off.")
  if (have("distributed", "coordinator_address", "num_processes", "process_id")
      and ok["distributed"] and ok["coordinator_address"]):
    n, rank = ok["num_processes"], ok["process_id"]
    if n < 1:
      problems.append(f"num_processes={n}: with distributed=True and a coordinator_address it "
                      "must be the number of processes, e.g. --config.num_processes=2.")
    elif not 0 <= rank < n:
      problems.append(f"process_id={rank}: with distributed=True and a coordinator_address it "
                      f"must be this process's rank in [0, {n}), e.g. --config.process_id=0.")
  return problems


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every value of ``config`` (each key of :func:`base_config`) before any work.

  Raises:
    ConfigError: one message listing every bad value with its valid range and the fix.
  """
  problems, ok, bad_sections = [], {}, set()
  for key, default in _leaves(base_config()):
    if key.startswith(tuple(f"{t}." for t in SPEC_SECTIONS)):
      continue  # the specs: _feature_problems
    value, not_a_section = _lookup(config, key)
    if not_a_section is not None and not_a_section not in bad_sections:
      bad_sections.add(not_a_section)
      problems.append(f"{not_a_section}={_show(_lookup(config, not_a_section)[0])}: must be a "
                      f"section of keys (like {key}), not a value; remove this setting.")
    if value is _MISSING or key not in CHECKS:
      continue
    problem = CHECKS[key](value, default)
    if problem is None:
      ok[key] = value
    else:
      problems.append(f"{key}={_show(value)}: {problem}")
  problems += _cross_checks(ok, config)
  if problems:
    raise ConfigError(problems)


def check_against_data(config: ml_collections.ConfigDict, num_items: int) -> None:
  """The checks that need the data: ``num_items`` is the catalogue size.

  Raises:
    ConfigError: e.g. an ``eval.ks`` cutoff above the catalogue size.
  """
  problems = []
  ks = config.eval.ks
  if _cutoffs(ks, ()) is None:
    above = [int(k) for k in ks if k > num_items]
    if above:
      one = len(above) == 1
      problems.append(f"eval.ks={_show(ks)}: {', '.join(map(str, above))} "
                      f"{'is' if one else 'are'} above the {num_items} items of the catalogue; "
                      f"drop {'it' if one else 'them'} or use ks <= {num_items}.")
  serve = config.get("serve", {})
  if serve.get("index") == "faiss_ivf" and serve.get("ivf_nlist", 0) > num_items:
    problems.append(f"serve.ivf_nlist={serve.ivf_nlist}: more IVF cells than the {num_items} "
                    "items of the catalogue; use at most that (about 4 sqrt(items)), or 0 to "
                    "choose it from the catalogue size.")
  if problems:
    raise ConfigError(problems)
