"""Config values are checked before any work starts: one message lists every bad value.

``config.validate`` runs before data loading, ``config.check_against_data`` once the
catalogue size is known; the command line prints either as one line per problem, exit 2,
with nothing written to the workdir. Also: the text of a bad ``--config.*`` flag.
"""

import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from conftest import write_synthetic_ml100k
from twotower_jax import config as config_lib
from twotower_jax import spec

REPO = pathlib.Path(__file__).resolve().parents[1]


def config_with(**overrides) -> ml_collections.ConfigDict:
  """base_config() with ``overrides`` ({"train__batch_size": 0}), of any type (no type check)."""
  d = config_lib.base_config().to_dict()
  for dotted, value in overrides.items():
    *path, last = dotted.split("__")
    node = d
    for part in path:
      node = node[part]
    node[last] = value
  return ml_collections.ConfigDict(d)


def problems_of(config) -> list[str]:
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  return info.value.problems


# --------------------------------------------------------------------------- validate()


@pytest.mark.parametrize("key,value,expected", [
    ("train.batch_size", 0, "train.batch_size=0: must be a positive integer (e.g. 2048)."),
    ("train.batch_size", -8, "train.batch_size=-8: must be a positive integer (e.g. 2048)."),
    ("features.candidate.title.dim", 0,
     "features.candidate.title.dim=0: must be an integer >= 1"),
    ("features.query.occupation.dim", 0,
     "features.query.occupation.dim=0: must be an integer >= 1"),
    ("model.mlp", (16, 0),
     "model.mlp=(16, 0): every layer width must be a positive integer, e.g. (64, 32, 16)."),
    ("train.num_epochs", 0, "train.num_epochs=0: must be a positive integer (e.g. 5)."),
    ("train.num_epochs", -1, "train.num_epochs=-1: must be a positive integer (e.g. 5)."),
])
def test_each_bad_value_of_the_issue_is_one_problem_with_its_fix(key, value, expected):
  cfg = config_lib.base_config()
  config_lib.set_path(cfg, key, value)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(cfg)
  assert info.value.problems == [expected]
  assert str(info.value) == f"Invalid config (1 problem):\n  {expected}"
  assert isinstance(info.value, ValueError)


def test_several_bad_values_give_one_message_listing_all():
  cfg = config_lib.base_config()
  cfg.train.batch_size = 0
  cfg.model.mlp = (16, 0)
  cfg.train.num_epochs = -1
  cfg.data.source = "grouplnes"
  cfg.optimizer.learning_rate = float("nan")
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(cfg)
  msg = str(info.value)
  lines = msg.splitlines()
  assert lines[0] == "Invalid config (5 problems):"
  assert sorted(lines[1:]) == sorted([
      "  train.batch_size=0: must be a positive integer (e.g. 2048).",
      "  model.mlp=(16, 0): every layer width must be a positive integer, e.g. (64, 32, 16).",
      "  train.num_epochs=-1: must be a positive integer (e.g. 5).",
      "  data.source='grouplnes': must be one of 'tables', 'grouplens', 'tfds', 'ml-1m', 'ml-20m', "
      "'ml-25m', 'ml-latest', 'synthetic'. Did you mean 'grouplens'?",
      "  optimizer.learning_rate=nan: must be a finite number > 0 (e.g. 0.1).",
  ])


@pytest.mark.parametrize("key,value,says", [
    # positive integers
    ("eval__batch_size", 0, "must be a positive integer"),
    ("model__mlp", (), "must be a non-empty tuple of layer widths"),
    ("model__mlp", (64, 2.5), "every layer width must be a positive integer"),
    ("features__query__time__buckets", 1, "must be an integer >= 2"),
    ("features__query__time__dim", 0, "must be an integer >= 1"),
    ("features__query__occupation__min_count", 0, "must be an integer >= 1"),
    ("features__candidate__title__max_size", -1, "must be an integer >= 0"),
    ("features__candidate__genre__max_values", -1, "must be an integer >= 0"),
    ("train__checkpoint_every_steps", 0, "must be a positive integer"),
    ("train__max_checkpoints", 0, "must be a positive integer"),
    ("model__table_rows_multiple", 0, "must be a positive integer (1: no padding)"),
    ("loss__streaming_buckets", 0, "must be a positive integer"),
    ("data__synthetic_items", 0, "must be a positive integer"),
    ("data__synthetic_interactions", -5, "must be a positive integer"),
    ("data__train_size", 0, "must be a positive integer"),
    # non-negative integers
    ("optimizer__warmup_steps", -1, "must be an integer >= 0"),
    ("loss__num_hard_negatives", -1, "must be an integer >= 0"),
    ("loss__num_uniform_negatives", -2, "must be an integer >= 0"),
    ("cpu_devices", -1, "must be an integer >= 0"),
    ("seed", -3, "must be an integer >= 0"),
    # finite positive floats
    ("optimizer__learning_rate", 0.0, "must be a finite number > 0"),
    ("optimizer__learning_rate", math.inf, "must be a finite number > 0"),
    ("model__temperature", -1.0, "must be a finite number > 0"),
    # ranges
    ("data__test_fraction", 0.0, "must be a number in (0, 1)"),
    ("data__test_fraction", 1.0, "must be a number in (0, 1)"),
    ("loss__streaming_alpha", 0.0, "must be a number in (0, 1]"),
    ("loss__streaming_alpha", 1.5, "must be a number in (0, 1]"),
    ("data__synthetic_affinity", 1.5, "must be a number in [0, 1]"),
    ("optimizer__weight_decay", -0.1, "must be a finite number >= 0"),
    ("optimizer__grad_clip_norm", math.nan, "must be a finite number >= 0 (0: off)"),
    ("train__recency_half_life_days", -1.0, "must be a finite number >= 0 (0: off)"),
    # choices
    ("data__split", "temporl", "Did you mean 'temporal'?"),
    ("features__candidate__genre__pooling", "max", "must be one of mean, sum"),
    ("features__candidate__genre__sep", "", "must be a non-empty string"),
    ("features__query__age__boundaries", (35, 18), "must be increasing numbers"),
    ("loss__logq", "count", "Did you mean 'counts'?"),
    ("optimizer__name", "adamx", "must be one of 'adagrad', 'adam', 'adamw', 'sgd'."),
    ("optimizer__schedule", "linear", "must be one of 'constant', 'cosine'."),
    # cutoffs
    ("eval__ks", (), "must be a non-empty tuple of positive integers"),
    ("eval__ks", (0, 5), "must be a non-empty tuple of positive integers"),
    ("eval__ks", (5, 1, 5), "the cutoffs must be distinct (5 repeated)"),
    # types: a message, not a traceback
    ("train__batch_size", "abc", "train.batch_size='abc': must be a positive integer"),
    ("train__batch_size", True, "train.batch_size=True: must be a positive integer"),
    ("train__num_epochs", 2.0, "train.num_epochs=2.0: must be a positive integer"),
    ("train__batch_size", None, "train.batch_size=None: must be a positive integer"),
    ("optimizer__learning_rate", "fast", "optimizer.learning_rate='fast': must be a finite"),
    ("features__candidate__title__dim", True,
     "features.candidate.title.dim=True: must be an integer >= 1"),
    ("features__query__time__dim", 2.5,
     "features.query.time.dim=2.5: must be an integer >= 1"),
    ("features__query__age__normalize", 1,
     "features.query.age.normalize=1: must be True or False"),
    ("data__source", 3, "data.source=3: must be one of"),
    ("data__dir", 5, "data.dir=5: must be a string"),
    ("eval__ks", "10", "eval.ks='10': must be a non-empty tuple of positive integers"),
    ("train", 3, "train=3: must be a section of keys"),
])
def test_every_kind_of_bad_value_is_named_with_its_range(key, value, says):
  problems = problems_of(config_with(**{key: value}))
  assert len(problems) == 1, problems
  assert problems[0].startswith(key.replace("__", ".") + "="), problems
  assert says in problems[0], problems


def test_split_files_needs_both_files():
  problems = problems_of(config_with(data__split="files", data__test_file="u1.test"))
  assert problems == ["data.train_file='': data.split='files' needs it (a u.data-format ratings "
                      "file); set e.g. --config.data.train_file=u1.base."]
  config_lib.validate(config_with(data__split="files", data__train_file="u1.base",
                                  data__test_file="u1.test"))


def test_feature_specs_of_an_unknown_kind_or_option():
  problems = problems_of(config_with(features__query__age__kind="numerc"))
  assert problems == ["features.query.age: unknown kind 'numerc'. Did you mean 'numeric'? "
                      "Kinds: id, categorical, numeric, timestamp, multi_hot, text, history."]
  cfg = config_lib.base_config()
  cfg.features.query.time.bukets = 50
  [problem] = problems_of(cfg)
  assert problem.startswith("features.query.time: unknown option 'bukets' for a timestamp "
                            "feature. Did you mean 'buckets'?"), problem
  problems = problems_of(config_with(features__query__age__buckets=4,
                                     features__query__age__boundaries=(18, 35)))
  assert problems == ["features.query.age.buckets=4: give buckets (quantiles) or boundaries, "
                      "not both"]
  problems = problems_of(config_with(features=3))
  assert [p.split(":")[0] for p in problems] == ["features.query", "features.candidate"]
  assert all("must map feature names to specs" in p for p in problems)


def test_settings_that_contradict_each_other():
  assert problems_of(config_with(features__query={})) == [
      "features.query declares no feature; add at least one, e.g. {'item': S.id('item_id')}."]
  assert problems_of(config_with(features__candidate={})) == [
      "features.candidate declares no feature; add at least one, e.g. "
      "{'item': S.id('item_id')}."]
  both = config_lib.base_config()
  both.features.query["title"] = both.features.candidate.title
  [problem] = problems_of(both)
  assert problem.startswith("features: ['title'] named in both towers"), problem
  # base_config's only `id` feature is the title: without it there is nothing to update
  # sparsely.
  sparse = dict(optimizer__sparse_embeddings=True, features__candidate__title__kind="categorical")
  assert problems_of(config_with(**sparse)) == [
      "optimizer.sparse_embeddings=True: needs a feature of kind 'id' (a large embedding "
      "table, e.g. spec.id('user_id')), or turn sparse_embeddings off."]
  config_lib.validate(config_with(optimizer__sparse_embeddings=True))
  config_lib.validate(config_with(features__candidate__title__kind="categorical"))
  assert problems_of(config_with(distributed=True, coordinator_address="h:1"))[0].startswith(
      "num_processes=0: with distributed=True and a coordinator_address")
  assert problems_of(config_with(distributed=True, coordinator_address="h:1",
                                 num_processes=2, process_id=2))[0].startswith("process_id=2:")
  config_lib.validate(config_with(distributed=True))  # auto-detected cluster: nothing to check
  clusters = dict(data__source="synthetic", data__synthetic_items=5, data__synthetic_clusters=8)
  assert problems_of(config_with(**clusters)) == [
      "data.synthetic_clusters=8: more clusters than the 5 items of data.synthetic_items; "
      "use at most 5."]
  config_lib.validate(config_with(data__synthetic_items=5, data__synthetic_clusters=8))


def test_every_key_of_base_config_has_a_check():
  def leaves(node, prefix=""):
    for key, value in node.items():
      if f"{prefix}{key}" in config_lib.SPEC_SECTIONS:
        continue  # feature specs: spec.check_specs, below
      if isinstance(value, ml_collections.ConfigDict):
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"
  base = config_lib.base_config()
  assert set(leaves(base)) == set(config_lib.CHECKS)
  # Every key of every spec of the spec sections is one that spec.check_specs checks.
  assert config_lib.SPEC_SECTIONS == ("features.query", "features.candidate")
  assert set(base.features) == {"query", "candidate"}
  for tower in ("query", "candidate"):
    assert base.features[tower]
    for name, s in base.features[tower].items():
      assert set(s) == {"kind", "column", *spec.OPTIONS[s.kind]}, (tower, name)
    assert set(spec.check_specs(tower, base.features[tower])) == set(base.features[tower])


def test_choice_lists_match_the_code_that_acts_on_them():
  from twotower_jax import train
  from twotower_jax.data import sources, splits
  assert config_lib.DATA_SOURCES == tuple(sources.LOADERS)
  assert config_lib.DATA_SPLITS == (*splits.SPLIT_KINDS, "files")
  base = config_lib.base_config().optimizer
  for name in config_lib.OPTIMIZERS:
    for schedule in config_lib.SCHEDULES:
      opt = ml_collections.ConfigDict(dict(base.to_dict(), name=name, schedule=schedule))
      train.create_optimizer(opt, total_steps=10)
  for bad in (dict(name="adamx"), dict(schedule="linear")):
    with pytest.raises(ValueError, match="Unsupported"):
      train.create_optimizer(ml_collections.ConfigDict(dict(base.to_dict(), **bad)), 10)


@pytest.mark.parametrize("name,arg", [("seed", None), ("tiny", None), ("tiny", "user_id"),
                                      ("tiny", "all"), ("default", None),
                                      ("default", "temporal"), ("demographic", None),
                                      ("shop", None),
                                      ("shop", "csv"), ("ids", None), ("ids", "ml-25m"),
                                      ("history", None), ("history", "attention"),
                                      ("tiny", "history"), ("tiny", "attention")])
def test_committed_configs_validate(name, arg):
  cfg = config_lib.load_config_file(REPO / "configs" / f"{name}.py", arg)
  config_lib.check_keys(cfg, config_lib.base_config())
  config_lib.validate(cfg)


def test_every_committed_config_file_is_covered():
  assert {p.stem for p in (REPO / "configs").glob("*.py")} == {
      "seed", "tiny", "default", "demographic", "shop", "ids", "history"}


def test_check_keys_leaves_feature_names_to_the_user():
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py", "all")
  assert "user_id" in cfg.features.query and "user_id" not in config_lib.base_config().features.query
  config_lib.check_keys(cfg, config_lib.base_config())  # feature names are not base keys
  cfg.features.qurey = cfg.features.query
  with pytest.raises(ValueError, match=r"Unknown config key 'features.qurey'. Did you mean "
                                       r"'query'\?"):
    config_lib.check_keys(cfg, config_lib.base_config())


# --------------------------------------------------------------------- check_against_data()


def test_ks_above_the_catalogue_size():
  cfg = config_lib.base_config()
  cfg.eval.ks = (1, 10, 2000)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.check_against_data(cfg, 1682)
  assert str(info.value) == (
      "Invalid config (1 problem):\n  eval.ks=(1, 10, 2000): 2000 is above the 1682 items of "
      "the catalogue; drop it or use ks <= 1682.")
  cfg.eval.ks = (1, 2000, 5000)
  with pytest.raises(config_lib.ConfigError, match="2000, 5000 are above the 1682 items"):
    config_lib.check_against_data(cfg, 1682)
  cfg.eval.ks = (1, 10, 1682)
  config_lib.check_against_data(cfg, 1682)


# ----------------------------------------------------------------------------- the CLI


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "twotower_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  # 150 movies: the tiny config's ks (up to 100) fit, so nothing but the flag is wrong.
  return write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80, num_movies=150,
                                num_ratings=3000, seed=2)


def train_cli(data_dir, workdir, *flags):
  return run_cli("--config", "configs/tiny.py", f"--workdir={workdir}",
                 f"--config.data.dir={data_dir}", "--config.data.download=False", *flags)


@pytest.mark.parametrize("flag,line", [
    ("--config.train.batch_size=0", "train.batch_size=0: must be a positive integer (e.g. 2048)."),
    ("--config.train.num_epochs=0", "train.num_epochs=0: must be a positive integer (e.g. 5)."),
    ("--config.model.mlp=(16,0)",
     "model.mlp=(16, 0): every layer width must be a positive integer, e.g. (64, 32, 16)."),
])
def test_cli_bad_value_exits_2_before_writing_anything(data_dir, tmp_path, flag, line):
  workdir = tmp_path / "run"
  proc = train_cli(data_dir, workdir, flag)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr == f"error: Invalid config (1 problem):\n  {line}\n"
  assert not workdir.exists()  # no config.json, no checkpoints, no serving files


def test_cli_lists_every_bad_value_at_once(data_dir, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  proc = train_cli(data_dir, workdir, "--config.train.batch_size=-8",
                   "--config.features.candidate.title.dim=0", "--config.train.num_epochs=-1",
                   "--config.eval.ks=(1,1)")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines() == [
      "error: Invalid config (4 problems):",
      "  eval.ks=(1, 1): the cutoffs must be distinct (1 repeated), e.g. (1, 5, 10, 50, 100).",
      "  train.batch_size=-8: must be a positive integer (e.g. 2048).",
      "  train.num_epochs=-1: must be a positive integer (e.g. 5).",
      "  features.candidate.title.dim=0: must be an integer >= 1",
  ]
  assert list(workdir.iterdir()) == []


def test_cli_typo_in_a_section_name(tmp_path):
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path}",
                 "--config.trian.batch_size=3")
  assert proc.returncode == 2
  assert proc.stderr.startswith(
      "error: Unknown config key 'trian' in --config.trian.batch_size=3. Did you mean 'train'? "
      "Valid keys at the top level: coordinator_address, cpu_devices, data, ")
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_cli_typo_in_a_key_name_has_no_escaped_quotes(tmp_path):
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path}",
                 "--config.train.batchsize=3")
  assert proc.returncode == 2
  assert proc.stderr.startswith(
      "error: Unknown config key 'train.batchsize' in --config.train.batchsize=3. "
      "Did you mean 'batch_size'? Valid keys in 'train': batch_size, ")
  assert "\\" not in proc.stderr and '"' not in proc.stderr
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path}",
                 "--config.train.batch_size.x=3")
  assert proc.returncode == 2
  assert proc.stderr == ("error: Unknown config key 'train.batch_size.x' in "
                         "--config.train.batch_size.x=3: 'train.batch_size' is a value, "
                         "not a section.\n")
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path}",
                 "--config.features.query.time.bukets=50")
  assert proc.returncode == 2
  assert proc.stderr == (
      "error: Unknown config key 'features.query.time.bukets' in "
      "--config.features.query.time.bukets=50. Did you mean 'buckets'? Valid keys in "
      "'features.query.time': buckets, column, dim, kind.\n")


@pytest.mark.parametrize("flag,expected", [
    ("--config.train.batch_size=abc",
     "error: flag --config.train.batch_size=abc: 'abc' is not an integer.\n"),
    ("--config.optimizer.learning_rate=fast",
     "error: flag --config.optimizer.learning_rate=fast: 'fast' is not a number.\n"),
    ("--config.features.query.age.normalize=maybe",
     "error: flag --config.features.query.age.normalize=maybe: 'maybe' is not a boolean; use "
     "True or False.\n"),
    ("--config.features.query.time.buckets=many",
     "error: flag --config.features.query.time.buckets=many: 'many' is not an integer.\n"),
])
def test_cli_value_of_the_wrong_type_reads_naturally(tmp_path, flag, expected):
  proc = run_cli("--config", "configs/tiny.py", f"--workdir={tmp_path}", flag)
  assert proc.returncode == 2
  assert proc.stderr == expected
