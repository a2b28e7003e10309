r"""Command line: train and evaluate, recommend, export for a ranker, report.

  python -m twotower_jax.main --config configs/seed.py --workdir /tmp/seed
  python -m twotower_jax.main --mode=recommend --workdir /tmp/seed --user_id=42
  python -m twotower_jax.main --mode=recommend --workdir /tmp/seed \
      --age=30 --gender=F --occupation=engineer --time=890000000
  python -m twotower_jax.main --mode=export_ranker --workdir /tmp/seed --top_n=50
  python -m twotower_jax.main --mode=report --report_dirs=/tmp/a,/tmp/b --workdir /tmp/report
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, serving).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "recommend", "export_ranker", "report"],
                          "What to do.")
_USER_ID = flags.DEFINE_integer("user_id", None, "recommend: a known user's id.")
_AGE = flags.DEFINE_float("age", None, "recommend: user age in years.")
_GENDER = flags.DEFINE_enum("gender", None, ["M", "F"], "recommend: user gender.")
_OCCUPATION = flags.DEFINE_string("occupation", None, "recommend: occupation, e.g. 'engineer'.")
_TIME = flags.DEFINE_integer("time", None, "recommend: Unix timestamp of the query.")
_TOP_N = flags.DEFINE_integer("top_n", 10, "Number of recommendations (or exported candidates).")
_BOTTOM_N = flags.DEFINE_integer("bottom_n", 0, "recommend: also print the N lowest-scored.")
_EXCLUDE_RATED = flags.DEFINE_boolean("exclude_rated", False,
                                      "Exclude movies the user rated in training.")
_ALLOW_UNKNOWN = flags.DEFINE_boolean(
    "allow_unknown", False, "recommend: encode an unknown occupation as out-of-vocabulary "
    "instead of stopping with an error.")
_EXPORT_SPLIT = flags.DEFINE_enum("export_split", "test", ["train", "test"],
                                  "export_ranker: which split's interactions are the queries.")
_EXPORT_PATH = flags.DEFINE_string("export_path", None,
                                   "export_ranker: output CSV (default WORKDIR/ranker_<split>.csv).")
_MAX_QUERIES = flags.DEFINE_integer("max_queries", 0, "export_ranker: 0 = all queries.")
_REPORT_DIRS = flags.DEFINE_list("report_dirs", [], "report: workdirs to summarize.")


class UsageError(ValueError):
  """A command-line problem; printed without a traceback."""


def _load_run_config(workdir: pathlib.Path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = workdir / "config.json"
  if not path.is_file():
    raise UsageError(f"{workdir} holds no trained run (no config.json). Train first with "
                     f"--config configs/default.py --workdir {workdir}.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def run(argv) -> None:
  """Dispatches on --mode."""
  if len(argv) > 1:
    raise UsageError(f"Unexpected arguments: {argv[1:]}. Options take the form --flag=value "
                     "(e.g. --config.train.num_epochs=3); positional arguments are not accepted.")
  from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  mode = _MODE.value
  if mode == "report":
    from twotower_jax import report  # pylint: disable=g-import-not-at-top
    if not _REPORT_DIRS.value or not _WORKDIR.value:
      raise UsageError("--mode=report needs --report_dirs=DIR1,DIR2,... and --workdir=OUT.")
    png, table = report.write_report(_REPORT_DIRS.value, _WORKDIR.value)
    print(table)
    print(f"Plot: {png}")
    return
  if not _WORKDIR.value:
    raise UsageError("--workdir is required.")
  workdir = pathlib.Path(_WORKDIR.value)
  if mode == "train":
    if _CONFIG.value is None:
      raise UsageError("--config is required for training, e.g. --config configs/default.py.")
    config = _CONFIG.value
    config_lib.check_keys(config, config_lib.base_config())
    import jax  # pylint: disable=g-import-not-at-top
    if config.distributed:
      explicit = {}
      if config.coordinator_address:
        explicit = {"coordinator_address": config.coordinator_address,
                    "num_processes": config.num_processes, "process_id": config.process_id}
      jax.distributed.initialize(**explicit)
    from twotower_jax import report, sharding, train  # pylint: disable=g-import-not-at-top
    sharding.configure_cpu_devices(config.cpu_devices, config.train.batch_size)
    metrics = train.train_and_evaluate(config, str(workdir))
    if jax.process_index() != 0:  # process 0 reports and wrote the serving files
      return
    report.print_summary(metrics)
    from twotower_jax import serving  # pylint: disable=g-import-not-at-top
    rec = serving.load(workdir / "serving")
    some_user = int(rec.users["user_id"][0])
    print(f"\nSample recommendations for user {some_user}:")
    _print_recs(rec, rec.user_features([some_user]), 5, exclude_rated=True, user=some_user)
    return
  if mode == "recommend":
    _recommend(workdir)
    return
  if mode == "export_ranker":
    from twotower_jax import export  # pylint: disable=g-import-not-at-top
    config = _load_run_config(workdir)
    out = pathlib.Path(_EXPORT_PATH.value or workdir / f"ranker_{_EXPORT_SPLIT.value}.csv")
    n = export.export_ranker(config, workdir / "serving", out, split=_EXPORT_SPLIT.value,
                             top_n=_TOP_N.value, max_queries=_MAX_QUERIES.value,
                             exclude_rated=_EXCLUDE_RATED.value)
    print(f"Wrote {n} rows to {out}")
    return


def _recommend(workdir: pathlib.Path) -> None:
  from twotower_jax import serving  # pylint: disable=g-import-not-at-top
  rec = serving.load(workdir)
  feats = rec.query(user_id=_USER_ID.value, age=_AGE.value, gender=_GENDER.value,
                    occupation=_OCCUPATION.value, time=_TIME.value,
                    allow_unknown=_ALLOW_UNKNOWN.value)
  _print_recs(rec, feats, _TOP_N.value, exclude_rated=_EXCLUDE_RATED.value, user=_USER_ID.value,
              bottom_n=_BOTTOM_N.value)


def _print_recs(rec, feats, top_n: int, *, exclude_rated: bool, user, bottom_n: int = 0):
  exclude = rec.rated([user]) if (exclude_rated and user is not None) else None
  for label, lowest, n in (("Top", False, top_n), ("Bottom", True, bottom_n)):
    if n <= 0:
      continue
    r = rec.recommend(feats, n, exclude_ids=exclude, lowest=lowest)
    print(f"{label} {n}:")
    for rank, (mid, title, genres, score) in enumerate(
        zip(r.movie_id[0], r.movie_title[0], r.genres[0], r.score[0]), start=1):
      if mid < 0:
        break
      print(f"  {rank:3d}. {score:8.3f}  {title}  [{', '.join(genres)}]")


def main() -> None:
  """Entry point: flags errors and bad input print a one-line error, exit status 2."""
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
      msg = str(e).replace("\\n", " ").replace("\n", " ").strip("'\"")
      if isinstance(e, AttributeError) or "does not exist" in msg:
        msg = f"Unknown config key: {msg}"
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(2)

  def guarded(argv):
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax) only on request
      logging.set_verbosity(logging.WARNING)
    from twotower_jax import serving  # pylint: disable=g-import-not-at-top
    from twotower_jax import train  # pylint: disable=g-import-not-at-top
    from twotower_jax.data import dataset  # pylint: disable=g-import-not-at-top
    try:
      run(argv)
    except (UsageError, dataset.DataError, serving.ServingError, train.NonFiniteLossError,
            FileNotFoundError) as e:
      logging.flush()
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except ValueError as e:
      if "config" in str(e).lower() or "Unsupported" in str(e):
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
      raise

  app.run(guarded, flags_parser=parse)


if __name__ == "__main__":
  main()
