"""Feature specs: short to write, typo-proof, every option present and checked."""

import pytest

from twotower_jax import config as config_lib
from twotower_jax import spec


def test_a_spec_holds_every_option_and_defaults_the_column_to_the_name():
  s = spec.id(dim=16)
  assert s.kind == "id" and s.dim == 16 and s.hash_buckets == 0 and s.column == ""
  specs = spec.check_specs("query", {"user_id": s, "age": spec.numeric("raw_age")})
  assert specs["user_id"].column == "user_id" and specs["age"].column == "raw_age"


def test_unknown_option_or_kind_suggests_the_nearest():
  with pytest.raises(spec.SpecError, match=r"Unknown option 'dimm' .*Did you mean 'dim'"):
    spec.categorical("c", dimm=3)
  with pytest.raises(spec.SpecError, match=r"Unknown feature kind 'numerc'.*'numeric'"):
    spec.make("numerc")
  bad = {"a": {"kind": "text", "column": "t", "max_word": 3}}
  with pytest.raises(spec.SpecError, match=r"features.query.a: unknown option 'max_word'.*"
                     r"Did you mean 'max_words'"):
    spec.check_specs("query", bad)


def test_bad_values_are_listed_together():
  s = spec.multi_hot("tags")
  s.pooling = "max"
  s.dim = 0
  with pytest.raises(spec.SpecError) as e:
    spec.check_specs("candidate", {"tags": s, "price": spec.numeric(buckets=3,
                                                                     boundaries=(1, 2))})
  msg = str(e.value)
  assert "features.candidate.tags.dim=0: must be an integer >= 1" in msg
  assert "features.candidate.tags.pooling='max'" in msg
  assert "features.candidate.price.buckets=3: give buckets (quantiles) or boundaries" in msg


def test_config_validation_reports_spec_problems_and_shared_names():
  c = config_lib.base_config()
  c.features.query.time.buckets = 1
  c.features.candidate["age"] = spec.numeric("movie_release_year")
  c.features.query["age"].dim = 0
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert "features.query.time.buckets=1: must be an integer >= 2" in msg
  assert "features.query.age.dim=0" in msg
  assert "['age'] named in both towers" in msg


def test_override_of_a_spec_option_works_and_a_typo_is_caught():
  c = config_lib.base_config()
  config_lib.set_path(c, "features.query.time.buckets", "50")
  assert c.features.query.time.buckets == 50
  with pytest.raises(ValueError, match="Unknown config key"):
    config_lib.set_path(c, "features.query.time.bukets", "50")


def test_cli_typo_in_a_spec_option_names_the_feature_and_suggests(tmp_path):
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, "-m", "twotower_jax.main", "--config", "configs/tiny.py:user_id",
       f"--workdir={tmp_path / 'w'}", "--config.features.query.user_id.dmi=3"],
      cwd=repo, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert ("Unknown config key 'features.query.user_id.dmi' in "
          "--config.features.query.user_id.dmi=3. Did you mean 'dim'?") in proc.stderr
  assert not (tmp_path / "w").exists()


def test_history_options_are_checked_and_it_belongs_to_the_query_tower():
  c = config_lib.base_config()
  c.features.query["history"] = spec.history("movie_id", encoder="lstm", blocks=3)
  c.features.candidate["past"] = spec.history("movie_id")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert "features.query.history.encoder='lstm': must be one of mean, attention, gru" in msg
  assert "features.query.history.blocks=3: must be 1 or 2" in msg
  assert "features.candidate.past: a history describes the user" in msg
