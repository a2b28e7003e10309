r"""Command line: train and evaluate, recommend, export for a ranker, report.

  python -m twotower_jax.main --config configs/seed.py --workdir /tmp/seed
  python -m twotower_jax.main --mode=recommend --workdir /tmp/seed --user_id=42
  python -m twotower_jax.main --mode=recommend --workdir /tmp/seed \
      --query='{"raw_user_age": 30, "user_occupation_text": "engineer", ...}'
  python -m twotower_jax.main --mode=recommend --workdir /tmp/seed \
      --age=30 --gender=F --occupation=engineer --time=890000000   # MovieLens shortcuts
  python -m twotower_jax.main --mode=export_ranker --workdir /tmp/seed --top_n=50
  python -m twotower_jax.main --mode=report --report_dirs=/tmp/a,/tmp/b --workdir /tmp/report
  python -m twotower_jax.main --mode=add_items --workdir /tmp/seed --items=new_items.csv
  python -m twotower_jax.main --mode=export_model --workdir /tmp/seed   # jax + numpy to load
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, serving).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "recommend", "export_ranker", "report",
                                            "add_items", "export_model"],
                          "What to do.")
_USER_ID = flags.DEFINE_string(
    "user_id", None, "recommend: a user's key. A known user starts from their own latest "
    "query columns; one without training interactions is served as a new user from --query.")
_QUERY = flags.DEFINE_string(
    "query", None, "recommend: the query's columns as JSON, keyed by the spec's column names, "
    "e.g. '{\"raw_user_age\": 30}'; they override a known user's own.")
_HISTORY = flags.DEFINE_string(
    "history", None, "recommend: the user's last items, most recent last, e.g. 50,181,1 (for "
    "a model with a history feature; replaces a known user's own).")
_AGE = flags.DEFINE_float("age", None, "recommend (MovieLens): the 'age' feature's column.")
_GENDER = flags.DEFINE_enum("gender", None, ["M", "F"],
                            "recommend (MovieLens): the 'gender' feature's column.")
_OCCUPATION = flags.DEFINE_string("occupation", None,
                                  "recommend (MovieLens): the 'occupation' feature's column.")
_TIME = flags.DEFINE_integer("time", None, "recommend: the 'time' feature's column (Unix s).")
_TOP_N = flags.DEFINE_integer("top_n", 10, "Number of recommendations (or exported candidates).",
                              lower_bound=1)
_BOTTOM_N = flags.DEFINE_integer("bottom_n", 0, "recommend: also print the N lowest-scored.",
                                 lower_bound=0)
_EXCLUDE_RATED = flags.DEFINE_boolean("exclude_rated", False,
                                      "Exclude the items the user interacted with in training.")
_EXPORT_SPLIT = flags.DEFINE_enum("export_split", "test", ["train", "test"],
                                  "export_ranker: which split's interactions are the queries.")
_EXPORT_PATH = flags.DEFINE_string("export_path", None,
                                   "export_ranker: output CSV (default WORKDIR/ranker_<split>.csv).")
_MAX_QUERIES = flags.DEFINE_integer("max_queries", 0, "export_ranker: 0 = all queries.",
                                    lower_bound=0)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "export_ranker: the data folder, when it has moved since training "
    "(default: the run's own, or $TWOTOWER_DATA_DIR when that one is gone).")
_REPORT_DIRS = flags.DEFINE_list("report_dirs", [], "report: workdirs to summarize.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "export_model: the portable export's folder (default "
    "WORKDIR/export_model), replaced whole if it holds an earlier export.")
_ITEMS = flags.DEFINE_string(
    "items", None, "add_items: a CSV or Parquet table of new items (the item key and the "
    "candidate tower's columns), embedded and added to WORKDIR/serving without retraining.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "train: discard the run already in --workdir (checkpoints, metrics, "
    "serving files) and train from scratch.")


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
    config_lib.validate(config)  # every value, before any data is loaded or file written
    import jax  # pylint: disable=g-import-not-at-top
    if config.distributed:
      explicit = {}
      if config.coordinator_address:
        explicit = {"coordinator_address": config.coordinator_address,
                    "num_processes": config.num_processes, "process_id": config.process_id}
      jax.distributed.initialize(**explicit)
    from twotower_jax import report, sharding, train  # pylint: disable=g-import-not-at-top
    sharding.configure_cpu_devices(config.cpu_devices, config.train.batch_size)
    metrics = train.train_and_evaluate(config, str(workdir), overwrite=_OVERWRITE.value)
    if jax.process_index() != 0:  # process 0 reports and wrote the serving files
      return
    report.print_summary(metrics)
    from twotower_jax import serving  # pylint: disable=g-import-not-at-top
    rec = serving.load(workdir / "serving")
    some_user = rec.users["user_key"][0].item()
    print(f"\nSample recommendations for user {some_user}:")
    _print_recs(rec, rec.query(some_user), 5, exclude_rated=True, user=some_user)
    return
  if mode == "recommend":
    _recommend(workdir)
    return
  if mode == "add_items":
    import logging as std_logging  # pylint: disable=g-import-not-at-top
    from twotower_jax import catalog  # pylint: disable=g-import-not-at-top
    if not _ITEMS.value:
      raise UsageError("--mode=add_items needs --items=FILE (CSV or Parquet of new items).")
    std_logging.getLogger(catalog.__name__).setLevel(std_logging.INFO)  # unknown values
    r = catalog.add_items(workdir, _ITEMS.value)
    print(f"Added {r['added']} items to {r['directory']}: {r['num_items']} items, "
          f"{r['index']} index.")
    return
  if mode == "export_model":
    from twotower_jax import export_model  # pylint: disable=g-import-not-at-top
    try:
      out = export_model.export_model(workdir, _EXPORT_DIR.value)
    except export_model.ExportModelError as e:
      raise UsageError(str(e)) from e
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"Wrote {out}: the query tower (jax.export), its encoders and {manifest['num_items']} "
          f"candidates ({manifest['dim']} dims, {manifest['index']['kind']} index). Load it "
          f"with jax and numpy only: sys.path.insert(0, {str(out)!r}); import portable; "
          f"portable.load({str(out)!r}).")
    return
  if mode == "export_ranker":
    import logging as std_logging  # pylint: disable=g-import-not-at-top
    from twotower_jax import export  # pylint: disable=g-import-not-at-top
    # export's info lines (which data folder it reads) show without --verbosity.
    std_logging.getLogger(export.__name__).setLevel(std_logging.INFO)
    config = _load_run_config(workdir)
    out = pathlib.Path(_EXPORT_PATH.value or workdir / f"ranker_{_EXPORT_SPLIT.value}.csv")
    try:
      n = export.export_ranker(config, workdir / "serving", out, split=_EXPORT_SPLIT.value,
                               top_n=_TOP_N.value, max_queries=_MAX_QUERIES.value,
                               exclude_rated=_EXCLUDE_RATED.value, data_dir=_DATA_DIR.value)
    except export.ExportError as e:
      raise UsageError(str(e)) from e
    print(f"Wrote {n} rows to {out}")
    return


def _query_values(rec) -> dict:
  """--query (JSON) plus the MovieLens shortcuts, keyed by the columns they set."""
  values = {}
  if _QUERY.value:
    try:
      values = json.loads(_QUERY.value)
    except json.JSONDecodeError as e:
      raise UsageError(f"--query is not valid JSON ({e}); pass an object keyed by column, "
                       "e.g. --query='{\"raw_user_age\": 30}'.") from e
    if not isinstance(values, dict):
      raise UsageError("--query must be a JSON object keyed by column, e.g. "
                       "--query='{\"raw_user_age\": 30}'.")
  shortcuts = {"age": _AGE.value, "occupation": _OCCUPATION.value, "time": _TIME.value,
               "gender": None if _GENDER.value is None else _GENDER.value == "M"}
  if _HISTORY.value is not None:
    names = rec.history_columns()
    if len(names) != 1:
      raise UsageError(f"--history needs a model with one history feature; this one has "
                       f"{len(names)}. Pass --query with the history columns {names}.")
    items = [v.strip() for v in _HISTORY.value.split(",") if v.strip()]
    if rec.item_ids_N.dtype.kind in "iu":
      try:
        items = [int(v) for v in items]
      except ValueError as e:
        raise UsageError(f"--history={_HISTORY.value!r}: this model's item keys are "
                         "integers, e.g. --history=50,181,1.") from e
    values[names[0]] = items
  for name, value in shortcuts.items():
    if value is None:
      continue
    if name not in rec.specs:
      raise UsageError(f"--{name} sets the query feature {name!r}, which this model does not "
                       f"have (it has {sorted(rec.specs)}); pass --query with its columns "
                       f"{rec.query_columns()}.")
    values[rec.specs[name].column] = value
  return values


def _user_key(rec, user):
  """--user_id in the type of the model's user keys (integers stay integers)."""
  if user is None or rec.users["user_key"].dtype.kind == "U":
    return user
  try:
    return int(user)
  except ValueError as e:
    raise UsageError(f"--user_id={user!r}: this model's user keys are integers.") from e


def _recommend(workdir: pathlib.Path) -> None:
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from twotower_jax import serving  # pylint: disable=g-import-not-at-top
  # serving's info lines (e.g. "served as a new user") show without --verbosity.
  std_logging.getLogger(serving.__name__).setLevel(std_logging.INFO)
  rec = serving.load(workdir)
  user = _user_key(rec, _USER_ID.value)
  feats = rec.query(user, _query_values(rec))
  _print_recs(rec, feats, _TOP_N.value, exclude_rated=_EXCLUDE_RATED.value, user=user,
              bottom_n=_BOTTOM_N.value)


def _print_recs(rec, feats, top_n: int, *, exclude_rated: bool, user, bottom_n: int = 0):
  exclude = rec.rated([user]) if (exclude_rated and user is not None) else None
  for label, lowest, n in (("Top", False, top_n), ("Bottom", True, bottom_n)):
    if n <= 0:
      continue
    r = rec.recommend(feats, n, exclude_ids=exclude, lowest=lowest)
    print(f"{label} {n}:")
    extra = [c for c in r.columns if c != r.title_column and r.columns[c].dtype.kind == "U"]
    for j in np.flatnonzero(r.valid[0]):
      tags = ", ".join(t for c in extra for t in str(r.columns[c][0, j]).split("|") if t)
      print(f"  {j + 1:3d}. {r.score[0, j]:8.3f}  {r.title[0, j]}" + (f"  [{tags}]" if tags
                                                                        else ""))


def main() -> None:
  """Entry point: flags errors and bad input print a one-line error, exit status 2."""
  def parse(argv):
    """absl's flag parsing; a bad flag prints one readable line and exits with status 2.

    ml_collections reports an unknown --config.KEY as a KeyError (or an AttributeError
    around one) holding a quoted repr, so the key is looked up again here in the flags.
    """
    import re  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    from twotower_jax import config as config_lib  # pylint: disable=g-import-not-at-top

    def reference():
      """The config file given with --config (its feature names), else base_config()."""
      for i, arg in enumerate(argv[1:], start=1):
        m = re.fullmatch(r"--?config(?:=(.+))?", arg)
        value = m and (m[1] or (argv[i + 1] if i + 1 < len(argv) else None))
        if value:
          path, _, variant = value.partition(":")
          try:
            return config_lib.load_config_file(path, variant or None)
          except Exception:  # noqa: BLE001 - absl reports a broken config file itself
            break
      return config_lib.base_config()

    def unknown_key():
      """The first --config.KEY in argv that the config lacks, as a message; or None."""
      ref = reference()
      for arg in argv[1:]:
        m = re.match(r"--?(?:no)?config\.([^=]+)", arg)
        if not m:
          continue
        parts, node = m[1].split("."), ref
        for i, part in enumerate(parts):
          name, parent = ".".join(parts[:i + 1]), ".".join(parts[:i])
          if not isinstance(node, ml_collections.ConfigDict):
            return (f"Unknown config key {m[1]!r} in {arg}: {parent!r} is a value, "
                    "not a section.")
          if part not in node:
            where = f"in {parent!r}" if parent else "at the top level"
            hint = config_lib.suggest(part, node.keys())
            return (f"Unknown config key {name!r} in {arg}.{hint} "
                    f"Valid keys {where}: {', '.join(sorted(node.keys()))}.")
          node = node[part]
      return None

    def message(e):
      key_error = isinstance(e, (KeyError, AttributeError))
      found = unknown_key() if key_error else None
      if found:
        return found
      while isinstance(e, BaseException) and e.args:  # AttributeError(KeyError("..."))
        e = e.args[0]
      msg = " ".join(str(e).split())
      if key_error:  # no --config.KEY to blame: ml_collections' own text, unquoted
        m = re.fullmatch(r"'([^']+)' Did you mean \"([^\"]+)\".*", msg)
        msg = (f"Unknown config key {m[1]!r}. Did you mean {m[2]!r}?" if m
               else f"Unknown config key: {msg}")
      for pattern, say in ((r"invalid literal for int\(\) with base 10: (.*)$",
                            r"\1 is not an integer."),
                           (r"could not convert string to float: (.*)$", r"\1 is not a number."),
                           (r"\('Non-boolean argument to boolean flag', (.*)\)$",
                            r"\1 is not a boolean; use True or False.")):
        msg = re.sub(pattern, say, msg)
      return msg

    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
      print(f"error: {message(e)}", file=sys.stderr)
      sys.exit(2)

  def guarded(argv):
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax) only on request
      logging.set_verbosity(logging.WARNING)
    from twotower_jax import serving  # pylint: disable=g-import-not-at-top
    from twotower_jax import train  # pylint: disable=g-import-not-at-top
    from twotower_jax import checkpoints, workdir  # pylint: disable=g-import-not-at-top
    from twotower_jax.data import dataset  # pylint: disable=g-import-not-at-top
    try:
      run(argv)
    except (UsageError, dataset.DataError, serving.ServingError, train.NonFiniteLossError,
            workdir.WorkdirError, checkpoints.CheckpointError, FileNotFoundError) as e:
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
