"""The blend of the model and EASE under exclude_history: its ends equal the model and EASE
alone, its weight is chosen on validation, its settings are checked."""

import numpy as np
import pytest

import conftest
from conftest import write_synthetic_ml100k
from twotower_jax import config as config_lib
from twotower_jax import evaluate
from twotower_jax import sharding
from twotower_jax import train

EASE = {"eval.ease_lambda": 50.0, "eval.ease_recency": 0.9, "eval.ks": (1, 10, 50)}


def test_standardized_rows_have_mean_0_and_std_1():
  s = np.array([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
  z = evaluate.standardized(s)
  assert np.allclose(z[0].mean(), 0) and np.isclose(z[0].std(), 1)
  assert np.array_equal(np.argsort(z[0]), np.argsort(s[0]))  # order kept
  assert np.array_equal(z[1], np.zeros(4))  # a constant row: no NaN


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  data = write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=70,
                                num_movies=50, num_ratings=2000, seed=2)
  cfg = conftest.tiny_config(data, "history", **EASE,
                             **{"data.split": "temporal", "data.validation_fraction": 0.2})
  run = train.create_setup(cfg)
  return cfg, run, sharding.host_params(run.state.params)


def test_blend_weight_0_is_the_model_and_weight_1_is_ease(setup):
  cfg, run, params = setup
  alone = evaluate.evaluate(cfg, run.prep, run.model, params)  # model and baselines
  for w, who in ((0.0, ""), (1.0, "ease/")):
    cfg_w = cfg.copy_and_resolve_references()
    cfg_w.eval.blend_ease_weights = (w,)
    got = evaluate.blend_metrics(cfg_w, run.prep, run.model, params)
    assert got["blend/weight"] == w
    for k in ("hr_1", "hr_10", "mrr", "coverage_10"):
      assert got[f"blend/exclude_history/{k}"] == pytest.approx(
          alone[f"{who}exclude_history/{k}"], abs=1e-9), (w, k)


def test_blend_weight_is_chosen_on_validation(setup):
  cfg, run, params = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.eval.blend_ease_weights = (0.0, 0.5, 1.0)
  cfg.train.early_stopping_metric = "exclude_history/hr_10"
  got = evaluate.blend_metrics(cfg, run.prep, run.model, params)
  valid = {w: got[f"validation_blend/{w:g}/exclude_history/hr_10"] for w in (0.0, 0.5, 1.0)}
  assert got["blend/weight"] == max(valid, key=lambda w: (valid[w], -w))
  # Weight 0 on validation is the model's own validation figure.
  model_valid = evaluate.validation_metrics(cfg, run.prep, run.model, params)
  assert valid[0.0] == pytest.approx(model_valid["exclude_history/hr_10"], abs=1e-9)
  # Test is scored with that weight only.
  assert not any(k.startswith("blend/") and "/0.5/" in k for k in got)


@pytest.mark.parametrize("overrides, says", [
    ({"eval.blend_ease_weights": (0.5, 1.5)}, "weights in \\[0, 1\\]"),
    ({"eval.blend_ease_weights": (0.0, 0.5)}, "validation_fraction"),
])
def test_bad_blend_settings_are_config_errors(overrides, says):
  cfg = config_lib.base_config()
  for k, v in overrides.items():
    config_lib.set_path(cfg, k, v)
  with pytest.raises(config_lib.ConfigError, match=says):
    config_lib.validate(cfg)
