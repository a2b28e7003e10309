"""Training throughput: the full epoch loop against the bare jitted step, same run.

  python benchmarks/bench.py train --config=configs/seed.py --batch_sizes=2048,8192

The bare figure calls the jitted step back to back on one epoch's batches with
nothing else; the loop figure is ``train.run_epoch`` with everything training
does per epoch (seeded permutation, host-to-device indices, per-step finiteness
checks). Compilation and ten warm-up steps are excluded; then bare and
loop epochs alternate and the medians are reported. ``--compare KEY=VALUE``
measures a second configuration in the same run (peak RSS is the process's, so
the second variant's figure includes the first's high-water mark).

Features are feature specs (``twotower_jax.spec``): pick a config variant with
``--config=configs/tiny.py:user_id``, or add, replace or drop one feature with
``--feature`` (also accepted by ``--compare``)::

  python benchmarks/bench.py train --set data.source=synthetic \\
    --feature query.age=none --feature query.gender=none --feature query.occupation=none \\
    --feature "query.user_id=id('user_id', dim=32)"

The feature switches of earlier versions (``--set features.user_id=True``,
``--set features.age=False``, ...; see ``LEGACY_FEATURES``) are translated into those specs,
so older commands keep measuring the same model.
"""

from __future__ import annotations

import argparse
import ast
import json
import resource
import time

import jax
import numpy as np

from twotower_jax import config as config_lib
from twotower_jax import input_pipeline
from twotower_jax import sharding
from twotower_jax import spec
from twotower_jax import train

# The boolean feature switches of the hard-coded feature set this driver used to take as
# --set features.NAME=BOOL: the tower and spec each switched on, with its old dimension.
LEGACY_FEATURES = {
    "user_id": ("query", spec.id("user_id", dim=32)),
    "age": ("query", spec.numeric("raw_user_age")),
    "gender": ("query", spec.categorical("user_gender", dim=2)),
    "occupation": ("query", spec.categorical("user_occupation_text", dim=8)),
    "time": ("query", spec.timestamp("timestamp", buckets=1000, dim=32)),
    "title": ("candidate", spec.id("movie_title", dim=32)),
    "title_words": ("candidate", spec.text("movie_title", dim=32, max_words=8)),
    "release_year": ("candidate", spec.categorical("movie_release_year", dim=8)),
}


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config, batch_size: int, epochs: int = 2, max_steps: int = 0) -> dict:
  """examples/s of the bare step and of the epoch loop for one batch size."""
  config = config.copy_and_resolve_references()
  config.train.batch_size = batch_size
  t0 = time.perf_counter()
  prep = input_pipeline.prepare(config)
  prepare_s = time.perf_counter() - t0
  n = len(prep.train_item)
  steps = -(-n // batch_size)
  if max_steps:  # time only the first steps of each epoch (large data sets)
    steps = min(steps, max_steps)
  run = train.create_setup(config, prep, total_steps=steps * epochs, rng=0)
  mesh, data, step_fn, state = run.mesh, run.data, run.step_fn, run.state
  idx, valid = input_pipeline.epoch_batches(n, batch_size, config.seed, 0)
  # The same [steps, B] shape as the loop's, so both run one compiled step.
  idx_d, valid_d = sharding.put_batches(idx[:steps], mesh), sharding.put_batches(valid[:steps], mesh)
  t0 = time.perf_counter()
  state, loss = step_fn(state, data, idx_d, valid_d, 0)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0

  def bare(state):
    # Steps in flight are bounded as in training (an unbounded queue of multi-device CPU
    # steps can starve XLA's collective rendezvous), with no other work between steps.
    losses = []
    for i in range(steps):
      state, loss = step_fn(state, data, idx_d, valid_d, i)
      losses.append(loss)
      if i >= train.CHECK_LAG:
        losses[i - train.CHECK_LAG].block_until_ready()
    return jax.block_until_ready(state)

  def loop(state, epoch):
    e_idx, e_valid = input_pipeline.epoch_batches(n, batch_size, config.seed, epoch)
    state, _ = train.run_epoch(state, step_fn, data, sharding.put_batches(e_idx[:steps], mesh),
                               sharding.put_batches(e_valid[:steps], mesh), 0)
    return jax.block_until_ready(state)

  for i in range(min(steps, 10)):  # warm-up: allocator, autotuning, caches
    state, _ = step_fn(state, data, idx_d, valid_d, i)
  jax.block_until_ready(state)
  bare_t, loop_t = [], []
  for epoch in range(epochs):  # alternate, so drift on a noisy machine hits both alike
    t0 = time.perf_counter()
    state = bare(state)
    bare_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    state = loop(state, epoch + 2)
    loop_t.append(time.perf_counter() - t0)
  bare_s, loop_s = float(np.median(bare_t)), float(np.median(loop_t))
  examples = steps * batch_size
  return {
      "batch_size": batch_size, "num_train": n, "steps_timed_per_epoch": steps, "epochs_timed": epochs,
      "prepare_seconds": round(prepare_s, 3), "compile_seconds": round(compile_s, 3),
      "bare_step_examples_per_second": round(examples / bare_s),
      "loop_examples_per_second": round(examples / loop_s),
      "loop_over_bare_time": round(loop_s / bare_s, 3),
      "peak_rss_mb": round(_peak_rss_mb()),
  }


def load_config(path: str):
  """``path`` or ``path:VARIANT`` (the argument of the file's ``get_config``)."""
  path, _, variant = path.partition(":")
  return config_lib.load_config_file(path, variant or None)


def parse_feature(text: str) -> tuple[str, str, object]:
  """``"query.user_id=id('user_id', dim=32)"`` -> (tower, name, spec); spec None for
  ``=none`` (drop the feature). The value is a call of a spec kind with literal arguments."""
  target, sep, value = text.partition("=")
  tower, _, name = target.strip().partition(".")
  if not sep or tower not in ("query", "candidate") or not name:
    raise ValueError(f"--feature {text!r}: use TOWER.NAME=SPEC with TOWER query or candidate, "
                     "e.g. query.user_id=id('user_id', dim=32), or query.age=none.")
  if value.strip().lower() == "none":
    return tower, name, None
  try:
    call = ast.parse(value.strip(), mode="eval").body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
      raise ValueError("not a call")
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"--feature {text!r}: the spec must be a kind called with literal "
                     f"arguments, e.g. id('user_id', dim=32) ({e}).") from None
  return tower, name, spec.make(call.func.id, *args, **kwargs)


def set_feature(config, tower: str, name: str, value) -> None:
  """Adds, replaces or (``value`` None) drops feature ``name`` of ``tower``."""
  specs = config.features[tower]
  if value is None:
    if name not in specs:
      raise ValueError(f"features.{tower} has no feature {name!r} to drop; it has "
                       f"{', '.join(specs)}.")
    del specs[name]
  else:
    specs[name] = value


def override(config, item: str) -> None:
  """One ``--set``/``--compare`` KEY=VALUE, a legacy feature switch, or a ``--feature``."""
  if item.startswith("feature:"):
    set_feature(config, *parse_feature(item.removeprefix("feature:")))
    return
  key, _, value = item.partition("=")
  name = key.removeprefix("features.")
  if key.startswith("features.") and name in LEGACY_FEATURES:
    tower, legacy = LEGACY_FEATURES[name]
    on = value.strip().lower() in ("1", "true", "yes")
    if on:
      set_feature(config, tower, name, legacy.copy_and_resolve_references())
    elif name in config.features[tower]:
      set_feature(config, tower, name, None)
    return
  config_lib.set_path(config, key, value)


def feature_names(config) -> dict[str, list[str]]:
  return {t: list(config.features[t]) for t in ("query", "candidate")}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python benchmarks/bench.py train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/seed.py",
                 help="a config file, or FILE:VARIANT, e.g. configs/tiny.py:user_id")
  p.add_argument("--batch_sizes", default="2048,8192")
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--max_steps", type=int, default=0,
                 help="time only this many steps per epoch (0: whole epochs)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set data.source=synthetic")
  p.add_argument("--feature", action="append", default=[], metavar="TOWER.NAME=SPEC",
                 help="add or replace a feature, or drop it with SPEC none, e.g. "
                      "--feature \"query.user_id=id('user_id', dim=32)\" --feature query.age=none")
  p.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                 help="also measure each batch size with these overrides, in the same run, "
                      "and print the speed-up, e.g. --compare optimizer.sparse_embeddings=True "
                      "(feature:TOWER.NAME=SPEC changes a feature)")
  p.add_argument("--out", default=None, help="also write the figures as JSON here")
  args = p.parse_args(argv)
  config = load_config(args.config)
  for item in [*args.set, *(f"feature:{f}" for f in args.feature)]:
    override(config, item)
  config_lib.validate(config)
  sharding.configure_cpu_devices(config.cpu_devices,
                              int(args.batch_sizes.split(",")[0]))
  results = []
  header = {"device": str(jax.devices()[0]), "device_count": jax.device_count(),
            "backend": jax.default_backend(), "jax": jax.__version__}
  print(json.dumps(header))
  variants = [("base", config)]
  if args.compare:
    other = config.copy_and_resolve_references()
    for item in args.compare:
      override(other, item)
    config_lib.validate(other)
    variants.append((" ".join(args.compare), other))
  for b in (int(x) for x in args.batch_sizes.split(",")):
    rows = []
    for name, cfg in variants:
      r = {"variant": name, "features": feature_names(cfg),
           **measure(cfg, b, args.epochs, args.max_steps)}
      print(json.dumps(r), flush=True)
      rows.append(r)
    if len(rows) == 2:
      print(json.dumps({"batch_size": b, "variant_over_base_bare_speed": round(
          rows[1]["bare_step_examples_per_second"] / rows[0]["bare_step_examples_per_second"],
          3)}), flush=True)
    results.extend(rows)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"header": header, "results": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
