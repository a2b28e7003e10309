"""Config helpers: load config files, reject unknown keys with a suggestion."""

from __future__ import annotations

import difflib
import importlib.util
import pathlib

import ml_collections


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
  c.data.source = "grouplens"  # grouplens | tfds | ml-1m | ml-20m | ml-25m | ml-latest | synthetic
  c.data.dir = ""  # empty: $TWOTOWER_DATA_DIR, then the user cache (downloading if online)
  c.data.download = True
  c.data.tfds_data_dir = ""  # source=tfds: TFDS data_dir (empty: TFDS's default)
  c.data.split = "seed"  # seed | random | temporal | leave_last_out | files
  c.data.train_size = 80_000
  c.data.test_size = 10_000
  c.data.test_fraction = 0.2
  c.data.train_file = ""
  c.data.test_file = ""
  c.data.synthetic_users = 10_000
  c.data.synthetic_items = 10_000
  c.data.synthetic_interactions = 1_000_000
  c.data.synthetic_clusters = 20
  c.data.synthetic_affinity = 0.8
  c.data.synthetic_zipf_a = 1.1
  c.data.synthetic_seed = 0

  c.features = ml_collections.ConfigDict()
  c.features.user_id = False
  c.features.age = True
  c.features.gender = True
  c.features.occupation = True
  c.features.time = True
  c.features.num_time_buckets = 1000
  c.features.title = True
  c.features.genres = "first"  # first | all | none
  c.features.title_words = False
  c.features.max_title_words = 8
  c.features.max_vocab = 20_000
  c.features.release_year = False

  c.model = ml_collections.ConfigDict()
  c.model.mlp = (64, 32, 16)
  c.model.user_dim = 32
  c.model.gender_dim = 2
  c.model.occupation_dim = 8
  c.model.time_dim = 32
  c.model.title_dim = 32
  c.model.genre_dim = 8
  c.model.word_dim = 32
  c.model.year_dim = 8
  c.model.l2_normalize = False
  c.model.temperature = 1.0
  c.model.learn_temperature = False
  c.model.table_rows_multiple = 1  # pad user-id/title tables to a multiple (for sharding)

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
  # True: the user-id and title tables are updated only at the rows a batch uses (for
  # adagrad/sgd without weight decay equal to the dense update; adam moments become lazy).
  c.optimizer.sparse_embeddings = False

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 2048
  c.train.num_epochs = 5
  # True: the user-id and title tables (and their optimizer state) are split by rows over
  # the devices instead of replicated on each.
  c.train.shard_embeddings = False
  c.train.recency_half_life_days = 0.0  # > 0: weight examples by 0.5 ** (age / half-life)
  c.train.checkpoint_every_steps = 500
  c.train.max_checkpoints = 2
  c.train.progress = True

  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (1, 5, 10, 50, 100)
  c.eval.batch_size = 4096
  c.eval.baselines = True

  c.serve = ml_collections.ConfigDict()
  c.serve.top_n = 10
  c.serve.bottom_n = 0
  c.serve.exclude_rated = False
  return c
