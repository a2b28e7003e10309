"""Feature specs: what each tower reads, declared in the config.

A tower is a mapping from feature name to a spec; a spec names its source column, its kind
and the kind's options::

  from twotower_jax import spec as S
  c.features.query = {"user": S.id("user_id", dim=32), "age": S.numeric(normalize=True),
                      "ts": S.timestamp(buckets=1000, dim=32)}
  c.features.candidate = {"item": S.id("item_id"), "tags": S.multi_hot(sep="|")}

The column defaults to the feature's name. Query features read the interactions table
(with the users table joined in by user key); candidate features read the items table.

| kind | encodes | options |
|---|---|---|
| ``id`` | vocabulary lookup (OOV index 0); a large table, updated sparsely on request | ``dim``, ``max_size``, ``min_count``, ``hash_buckets`` |
| ``categorical`` | the same, for small vocabularies | ``dim``, ``max_size``, ``min_count``, ``hash_buckets`` |
| ``numeric`` | the value, normalized (``log`` first), or an embedding per bucket | ``normalize``, ``log``, ``buckets`` (quantiles), ``boundaries``, ``dim`` |
| ``timestamp`` | an embedding of one of ``buckets`` even time buckets plus the normalized value | ``buckets``, ``dim`` |
| ``multi_hot`` | the pooled embeddings of the values of one column (``"Action|Comedy"``) | ``sep``, ``pooling``, ``max_values``, ``dim``, ``max_size``, ``min_count`` |
| ``text`` | the pooled embeddings of the words of a string | ``max_words``, ``pooling``, ``dim``, ``max_size``, ``min_count`` |
| ``history`` | the user's last items before the query (query tower only) | ``max_len``, ``encoder``, ``blocks``, ``dim``, ``min_count``, ``side``, ``time_since``, ``dropout``, ``share`` |

A spec is a plain ``ml_collections.ConfigDict`` (``kind``, ``column`` and the options, every
one present), so ``--config.features.query.age.normalize=False`` overrides work and a typo
is an error: ``check_specs`` rejects unknown options and kinds with a suggestion.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Mapping

import ml_collections

# Every option of every kind, with its default.
_VOCAB = {"max_size": 0, "min_count": 1, "hash_buckets": 0}
OPTIONS: dict[str, dict[str, Any]] = {
    "id": {"dim": 32, **_VOCAB},
    "categorical": {"dim": 8, **_VOCAB},
    "numeric": {"normalize": True, "log": False, "buckets": 0, "boundaries": (), "dim": 8},
    "timestamp": {"buckets": 1000, "dim": 32},
    "multi_hot": {"dim": 8, "sep": "|", "pooling": "mean", "max_values": 0, **_VOCAB},
    "text": {"dim": 32, "max_words": 8, "pooling": "mean", **_VOCAB},
    "history": {"dim": 32, "max_len": 50, "encoder": "mean", "blocks": 1, "min_count": 1,
                "side": (), "time_since": False, "dropout": 0.0, "share": ""},
}
KINDS = tuple(OPTIONS)
POOLINGS = ("mean", "sum")
HISTORY_ENCODERS = ("mean", "attention", "gru")
# Kinds whose encoder is a vocabulary (an embedding table with an OOV row 0).
VOCAB_KINDS = ("id", "categorical", "multi_hot", "text")


class SpecError(ValueError):
  """A feature spec names an unknown kind or option, or a bad value; the message says which."""


def _suggest(key: str, known) -> str:
  match = difflib.get_close_matches(key, list(known), n=1)
  return f" Did you mean {match[0]!r}?" if match else ""


def make(kind: str, column: str | None = None, **options) -> ml_collections.ConfigDict:
  """The spec of a ``kind`` feature reading ``column`` (default: the feature's name)."""
  if kind not in OPTIONS:
    raise SpecError(f"Unknown feature kind {kind!r}.{_suggest(kind, KINDS)} Kinds: "
                    f"{', '.join(KINDS)}.")
  unknown = [k for k in options if k not in OPTIONS[kind]]
  if unknown:
    raise SpecError(f"Unknown option {unknown[0]!r} for a {kind} feature."
                    f"{_suggest(unknown[0], OPTIONS[kind])} Options: "
                    f"{', '.join(OPTIONS[kind])}.")
  options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
  # Built whole, not assigned key by key: a value of the wrong type is reported by
  # check_specs ("dim='8': must be an integer >= 1"), not refused by the ConfigDict.
  return ml_collections.ConfigDict({"kind": kind, "column": column or "", **OPTIONS[kind],
                                    **options})


def id(column: str | None = None, **options) -> ml_collections.ConfigDict:  # noqa: A001
  """A large vocabulary (user or item ids): ``dim``, ``max_size``, ``min_count``,
  ``hash_buckets`` (N > 0: ids hashed into N rows, no vocabulary)."""
  return make("id", column, **options)


def categorical(column: str | None = None, **options) -> ml_collections.ConfigDict:
  """A small vocabulary (a category, a country): options as ``id``."""
  return make("categorical", column, **options)


def numeric(column: str | None = None, **options) -> ml_collections.ConfigDict:
  """A number: ``normalize``, ``log`` (log1p first), ``buckets`` (quantile buckets, each
  embedded in ``dim``) or ``boundaries`` (given bucket edges)."""
  return make("numeric", column, **options)


def timestamp(column: str | None = None, **options) -> ml_collections.ConfigDict:
  """Unix seconds: an embedding of ``buckets`` even buckets plus the normalized value."""
  return make("timestamp", column, **options)


def multi_hot(column: str | None = None, **options) -> ml_collections.ConfigDict:
  """Several values in one column (``sep``-separated strings, or a -1-padded array):
  ``pooling`` mean or sum, ``max_values`` (0: all), vocabulary options as ``id``."""
  return make("multi_hot", column, **options)


def text(column: str | None = None, **options) -> ml_collections.ConfigDict:
  """The words of a string (lower-cased, a trailing "(1995)" year dropped): ``max_words``,
  ``pooling``, vocabulary options as ``id``."""
  return make("text", column, **options)


def history(column: str | None = None, **options) -> ml_collections.ConfigDict:
  """What the user did just before: their last ``max_len`` items strictly before the
  interaction's time (training interactions only, when training; at evaluation and serving
  also the later ones a live system knows), ``encoder`` mean, attention (causal
  self-attention with learned positions, ``blocks`` 1 or 2) or gru (the last hidden state),
  concatenated with the most recent item's embedding. ``column`` is the interactions' item
  key; the items get a table of their own (``dim``), over the items seen ``min_count`` times
  in training.

  Per position, beside the item: ``side`` (interaction columns such as ``("user_rating",)``,
  each normalized with training statistics) and ``time_since`` (log1p of the days between
  the item and the query, normalized). ``dropout`` (a rate in [0, 1)) acts in training only.
  ``share`` names a candidate ``id`` feature reading the same item key with the same
  ``dim``: the history then looks its items up in that feature's table and vocabulary."""
  return make("history", column, **options)


def json_defaults(kind: str) -> dict[str, Any]:
  """Every option of ``kind`` at its default, as JSON holds it (tuples as lists); {} for an
  unknown kind. A config written before an option existed reads it at this default."""
  return json.loads(json.dumps(OPTIONS.get(kind, {})))


def check_specs(tower: str, specs: Mapping[str, Any]) -> dict[str, ml_collections.ConfigDict]:
  """``specs`` with every column resolved; an error lists every unknown kind or option and
  every bad value of the tower."""
  problems, out = [], {}
  if not specs:
    problems.append(f"features.{tower} declares no feature; add at least one, e.g. "
                    f"{{'item': S.id('item_id')}}.")
  for name, s in (specs or {}).items():
    where = f"features.{tower}.{name}"
    kind = s.get("kind") if hasattr(s, "get") else None
    if kind not in OPTIONS:
      problems.append(f"{where}: unknown kind {kind!r}.{_suggest(str(kind), KINDS)} Kinds: "
                      f"{', '.join(KINDS)}.")
      continue
    allowed = {"kind", "column", *OPTIONS[kind]}
    for key in s:
      if key not in allowed:
        problems.append(f"{where}: unknown option {key!r} for a {kind} feature."
                        f"{_suggest(key, allowed)} Options: {', '.join(sorted(allowed))}.")
    full = make(kind, s.get("column") or name,
                **{key: s[key] for key in OPTIONS[kind] if key in s})
    problems.extend(f"{where}.{p}" for p in _value_problems(full))
    out[name] = full
  if problems:
    raise SpecError("Invalid feature spec:\n  " + "\n  ".join(problems))
  return out


def shared_table_problems(query: Mapping[str, Any], candidate: Mapping[str, Any]
                          ) -> list[str]:
  """Problems of history features sharing a candidate table (``share``): the candidate
  feature must exist, be an ``id`` or ``categorical`` feature of the same item key, and have
  the history's ``dim``, so that both towers look the same items up in one table."""
  out = []
  for name, s in query.items():
    if not hasattr(s, "get") or s.get("kind") != "history" or not s.get("share"):
      continue
    where, share = f"features.query.{name}.share={s['share']!r}", s["share"]
    c = candidate.get(share) if hasattr(candidate, "get") else None
    if c is None or not hasattr(c, "get"):
      out.append(f"{where}: no candidate feature of that name; name one of "
                 f"{sorted(candidate or {})} (an id feature of the item key), or '' for a "
                 "table of its own.")
      continue
    column = s.get("column") or name
    if c.get("kind") not in ("id", "categorical") or (c.get("column") or share) != column:
      out.append(f"{where}: the shared feature must be an id feature of the item key "
                 f"{column!r} (e.g. spec.id({column!r})); it is a {c.get('kind')} feature of "
                 f"column {c.get('column') or share!r}.")
    elif c.get("dim", OPTIONS[c["kind"]]["dim"]) != s.get("dim", OPTIONS["history"]["dim"]):
      out.append(f"{where}: dims differ (history dim={s.get('dim')}, candidate "
                 f"{share} dim={c.get('dim')}); one table needs one dim: set both to the same "
                 "value.")
  return out


def _value_problems(s) -> list[str]:
  """Bad option values of one complete spec, as 'option=value: what is expected' lines."""
  out = []

  def need(ok: bool, key: str, expected: str):
    if not ok:
      out.append(f"{key}={s[key]!r}: {expected}")

  def positive_int(key: str, minimum: int = 1):
    v = s[key]
    need(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, key,
         f"must be an integer >= {minimum}")

  positive_int("dim")
  for key in ("max_size", "hash_buckets", "max_values", "buckets"):
    if key in s and s.kind != "timestamp":
      positive_int(key, 0)
  if "min_count" in s:
    positive_int("min_count")
  if s.kind == "timestamp":
    positive_int("buckets", 2)
  if s.kind == "text":
    positive_int("max_words")
  for key in ("normalize", "log"):
    if key in s:
      need(isinstance(s[key], bool), key, "must be True or False")
  if s.kind == "history":
    positive_int("max_len")
    need(s.encoder in HISTORY_ENCODERS, "encoder",
         f"must be one of {', '.join(HISTORY_ENCODERS)}")
    need(s.blocks in (1, 2), "blocks", "must be 1 or 2")
    side = s.side
    need(isinstance(side, (tuple, list)) and all(isinstance(c, str) and c for c in side)
         and len(set(side)) == len(side), "side",
         "must be distinct column names, e.g. ('user_rating',)")
    need(isinstance(s.time_since, bool), "time_since", "must be True or False")
    need(isinstance(s.dropout, (int, float)) and not isinstance(s.dropout, bool)
         and 0 <= s.dropout < 1, "dropout", "must be a rate in [0, 1), e.g. 0.2")
    need(isinstance(s.share, str), "share",
         "must name a candidate id feature (e.g. 'movie'), or be '' for a table of its own")
  if "pooling" in s:
    need(s.pooling in POOLINGS, "pooling", f"must be one of {', '.join(POOLINGS)}")
  if s.kind == "multi_hot":
    need(isinstance(s.sep, str) and len(s.sep) >= 1, "sep", "must be a non-empty string")
  if s.kind == "numeric":
    b = tuple(s.boundaries)
    need(all(isinstance(x, (int, float)) for x in b) and list(b) == sorted(set(b)),
         "boundaries", "must be increasing numbers, e.g. (18, 25, 35)")
    need(not (b and s.buckets), "buckets", "give buckets (quantiles) or boundaries, not both")
  return out
