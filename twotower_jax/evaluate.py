"""Evaluation of a trained model and the baselines on the same split, same code.

Beside the test split: the validation split (``validation_metrics``, what early stopping
reads), cold users held out of training (``cold_user_metrics``: served from a given history,
no retraining) and a blend of the model with EASE (``blend_metrics``: standardized scores
under ``exclude_history``, its weight chosen on validation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twotower_jax import baselines
from twotower_jax import features as feat
from twotower_jax import history
from twotower_jax import input_pipeline
from twotower_jax import metrics as metrics_lib
from twotower_jax import model as model_lib
from twotower_jax.data import dataset as dataset_lib
from twotower_jax.data import sources


def known_before_test(prep) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
  """(user, item, time, columns) of every interaction a live system knows before the test
  period: the training interactions and, with a validation split, the validation ones
  (held out of training, not out of the log). ``time`` is None without timestamps;
  ``columns`` holds the key, time and history side columns of both."""
  ds = prep.dataset
  time_key = ds.time_key
  if prep.valid_item is None:
    user, item, cols = prep.train_user, prep.train_item, prep.train
  else:
    user = np.concatenate([prep.train_user, prep.valid_user])
    item = np.concatenate([prep.train_item, prep.valid_item])
    names = {ds.user_key, ds.item_key, time_key} | {
        c for s in prep.specs["query"].values() if s.kind == "history"
        for c in feat.side_columns(s)}
    cols = {c: input_pipeline.concat_keys(prep.train[c], prep.validation[c])
            for c in names if c and c in prep.train}
  time = np.asarray(cols[time_key], np.float64) if time_key else None
  return user, item, time, cols


def test_queries(prep) -> dict[str, np.ndarray]:
  """The model's query inputs of the test interactions: ``prep.test_q``, with every history
  window over the interactions known before the test period (`known_before_test`: the
  validation ones too) and the earlier test interactions."""
  if prep.valid_item is None or not any(s.kind == "history"
                                        for s in prep.specs["query"].values()):
    return prep.test_q
  user, item, _, cols = known_before_test(prep)
  q = dict(prep.test_q)
  input_pipeline.add_histories(prep.specs["query"], prep.encoders, prep.dataset,
                               prep.item_ids_N, cols, prep.test, (user, item, {}),
                               (prep.test_user, prep.test_item, q), prep.num_users)
  return q


def evaluate(config, prep, model, params) -> dict[str, Any]:
  """Full-corpus metrics of the model and, optionally, of the baselines, under every protocol:
  include_seen, exclude_seen, and exclude_history (each test interaction's online history
  excluded: the user's training items and their test items strictly before it by time; the
  training items alone when the data has no timestamps).

  With a validation split its interactions count as known before the test period, as in a
  live system: they are in each test interaction's history (the model's history features
  and the exclusions) and among the seen items, and the baselines are fitted on them too;
  only the model's parameters never saw them."""
  bs = config.eval.batch_size
  c_NxD = model_lib.embed_in_batches(model_lib.embed_candidates, params, prep.cand, bs,
                                     model=model)
  q_TxD = model_lib.embed_in_batches(model_lib.embed_queries, params, test_queries(prep), bs,
                                     model=model)
  ks = tuple(config.eval.ks)
  known_user, known_item, known_time, _ = known_before_test(prep)
  indptr, seen = metrics_lib.seen_csr(known_user, known_item, prep.num_users)
  time_key = prep.dataset.time_key
  test_time = (np.asarray(prep.test[time_key], np.float64) if time_key
               else np.zeros(len(prep.test_user)))  # no times: no test item precedes another
  h_indptr, h_items = history.online_history(known_user, known_item, prep.test_user,
                                             prep.test_item, test_time, prep.num_users)
  out = metrics_lib.evaluate_protocols(
      prep.test_item, prep.test_user, indptr, seen, prep.item_counts(), ks=ks, q_BxD=q_TxD,
      c_NxD=c_NxD, history_indptr=h_indptr, history_items=h_items, batch_size=bs)
  if config.eval.baselines:
    out.update(baselines.evaluate_baselines(
        known_user, known_item, prep.test_user, prep.test_item,
        prep.num_users, prep.num_items, ks=ks, seed=int(config.seed),
        history_indptr=h_indptr, history_items=h_items, train_time=known_time,
        test_time=test_time, ease_lambda=float(config.eval.ease_lambda),
        ease_recency=float(config.eval.ease_recency),
        ease_max_items=int(config.eval.ease_max_items)))
  if config.eval.blend_ease_weights:
    out.update(blend_metrics(config, prep, model, params, c_NxD=c_NxD, q_TxD=q_TxD))
  if config.data.cold_user_fraction:
    out.update(cold_user_metrics(config, prep, model, params, c_NxD=c_NxD))
  return {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v)
          for k, v in out.items()}


def validation_metrics(config, prep, model, params) -> dict[str, float]:
  """The model's metrics on the validation interactions (``data.validation_fraction``): the
  same full-corpus ranking, protocols and keys as ``evaluate`` (seen items: the training
  part; history: it and the earlier validation items); no baselines. Training selects its best parameters and stops early on these, never on test.
  """
  if prep.valid_item is None or not len(prep.valid_item):
    raise ValueError("No validation interactions: set data.validation_fraction > 0.")
  bs = config.eval.batch_size
  c_NxD = model_lib.embed_in_batches(model_lib.embed_candidates, params, prep.cand, bs,
                                     model=model)
  q_VxD = model_lib.embed_in_batches(model_lib.embed_queries, params, prep.valid_q, bs,
                                     model=model)
  indptr, seen = metrics_lib.seen_csr(prep.train_user, prep.train_item, prep.num_users)
  time_key = prep.dataset.time_key
  valid_time = (np.asarray(prep.validation[time_key], np.float64) if time_key
                else np.zeros(len(prep.valid_user)))
  h_indptr, h_items = history.online_history(prep.train_user, prep.train_item,
                                             prep.valid_user, prep.valid_item, valid_time,
                                             prep.num_users)
  out = metrics_lib.evaluate_protocols(
      prep.valid_item, prep.valid_user, indptr, seen, prep.item_counts(),
      ks=tuple(config.eval.ks), q_BxD=q_VxD, c_NxD=c_NxD, history_indptr=h_indptr,
      history_items=h_items, batch_size=bs)
  return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- the blend


def standardized(s_BxN: np.ndarray) -> np.ndarray:
  """Each row's scores minus their mean, over their standard deviation (float64)."""
  s_BxN = np.asarray(s_BxN, np.float64)
  s_BxN = s_BxN - s_BxN.mean(axis=1, keepdims=True)
  return s_BxN / np.maximum(s_BxN.std(axis=1, keepdims=True), 1e-12)


def blend_score_fn(q_TxD, c_NxD, ease_fn, weight: float) -> metrics_lib.HistoryScoreFn:
  """rows_b -> (1 - weight) * z(model scores) + weight * z(``ease_fn(rows_b)``), z
  standardizing each row (`standardized`), so neither side's scale decides the mix."""
  q_TxD, c_NxD = np.asarray(q_TxD, np.float32), np.asarray(c_NxD, np.float32)

  def score(rows_b):
    model_bxN = q_TxD[np.asarray(rows_b)] @ c_NxD.T
    if weight == 0.0:
      return standardized(model_bxN)
    return (1.0 - weight) * standardized(model_bxN) + weight * standardized(ease_fn(rows_b))

  return score


def _no_user_scores(user_ids_B):
  raise AssertionError("the blend is scored per interaction (exclude_history) only")


def _blend_on(config, prep, q_XxD, c_NxD, user_X, item_X, time_X, weights,
              known=None) -> dict:
  """{weight: exclude_history metrics} of the blend on one evaluation split (EASE fitted on
  ``known`` (user, item, time), by default ``prep``'s training interactions, each
  evaluation interaction scored from its online history over them)."""
  if known is None:
    time_key = prep.dataset.time_key
    known = (prep.train_user, prep.train_item,
             np.asarray(prep.train[time_key], np.float64) if time_key else None)
  known_user, known_item, known_time = known
  ease_fn = baselines.ease_online_score_fn(
      known_user, known_item, user_X, item_X, prep.num_users, prep.num_items,
      train_time=known_time, eval_time=time_X, lam=float(config.eval.ease_lambda),
      recency=float(config.eval.ease_recency))
  indptr, seen = metrics_lib.seen_csr(known_user, known_item, prep.num_users)
  h_indptr, h_items = history.online_history(known_user, known_item, user_X, item_X,
                                             time_X, prep.num_users)
  return {w: metrics_lib.evaluate_protocols(
      item_X, user_X, indptr, seen, prep.item_counts(), ks=tuple(config.eval.ks),
      score_fn=_no_user_scores, history_indptr=h_indptr, history_items=h_items,
      history_score_fn=blend_score_fn(q_XxD, c_NxD, ease_fn, float(w)),
      protocols=("exclude_history",), batch_size=int(config.eval.batch_size))
      for w in weights}


def _times(prep, cols, n: int) -> np.ndarray:
  key = prep.dataset.time_key
  return np.asarray(cols[key], np.float64) if key else np.zeros(n)  # no times: all equal


def blend_metrics(config, prep, model, params, *, c_NxD=None, q_TxD=None) -> dict[str, float]:
  """The model blended with EASE (``eval.blend_ease_weights``; EASE at ``eval.ease_lambda``
  and ``eval.ease_recency``) under ``exclude_history``: ``blend/weight`` and
  ``blend/exclude_history/<metric>`` on test. With several weights each is first scored on
  validation (``validation_blend/<w>/exclude_history/<metric>``, EASE fitted on the training
  part; weight 0 is the model alone), and test is scored once, with the best weight: by
  ``train.early_stopping_metric`` when it is an ``exclude_history`` metric, else by
  ``exclude_history/hr_<largest k>``. On test, EASE is fitted on, and the histories hold,
  every interaction known before the test period (`known_before_test`), as in `evaluate`."""
  weights = [float(w) for w in config.eval.blend_ease_weights]
  bs = config.eval.batch_size
  if c_NxD is None:
    c_NxD = model_lib.embed_in_batches(model_lib.embed_candidates, params, prep.cand, bs,
                                       model=model)
  out = {}
  have_validation = prep.valid_item is not None and len(prep.valid_item)
  if len(weights) > 1 and not have_validation:
    raise ValueError(f"eval.blend_ease_weights={tuple(weights)}: choosing among several "
                     "weights needs a validation split; set data.validation_fraction=0.1, or "
                     "give one weight.")
  chosen = weights[0]
  if have_validation:
    key = str(config.train.early_stopping_metric)
    key = (key if key.startswith("exclude_history/")
           else f"exclude_history/hr_{max(int(k) for k in config.eval.ks)}")
    q_VxD = model_lib.embed_in_batches(model_lib.embed_queries, params, prep.valid_q, bs,
                                       model=model)
    by_w = _blend_on(config, prep, q_VxD, c_NxD, prep.valid_user, prep.valid_item,
                     _times(prep, prep.validation, len(prep.valid_item)), weights)
    for w, res in by_w.items():
      out.update({f"validation_blend/{w:g}/{k}": v for k, v in res.items()})
    chosen = max(weights, key=lambda w: (by_w[w][key], -weights.index(w)))
  if q_TxD is None:
    q_TxD = model_lib.embed_in_batches(model_lib.embed_queries, params, test_queries(prep),
                                       bs, model=model)
  res = _blend_on(config, prep, q_TxD, c_NxD, prep.test_user, prep.test_item,
                  _times(prep, prep.test, len(prep.test_item)), [chosen],
                  known=known_before_test(prep)[:3])[chosen]
  out["blend/weight"] = chosen
  out.update({f"blend/{k}": v for k, v in res.items()})
  return out


# ----------------------------------------------------------------------------- cold users


def cold_user_queries(prep, given: dict, test: dict, given_parts, test_parts, num_cold: int,
                      online: bool) -> dict[str, np.ndarray]:
  """The model's query inputs of cold users' test interactions (``*_parts``: (user, item)
  of the given and test interactions): their own columns (a user id the model never saw
  goes to its out-of-vocabulary row), and for each history feature the user's given
  interactions only (their last L, most recent last, as `serving` encodes a given
  history), or with ``online`` also their test interactions before it (as for every other
  test interaction, `input_pipeline.add_histories`)."""
  q = feat.encode_tower(prep.specs["query"], prep.encoders, test, "cold-user interactions")
  if online:
    input_pipeline.add_histories(prep.specs["query"], prep.encoders, prep.dataset,
                                 prep.item_ids_N, given, test, (*given_parts, {}),
                                 (*test_parts, q), num_cold)
    return q
  (given_user, given_item), (test_user, _) = given_parts, test_parts
  time_key = prep.dataset.time_key
  for name, s in prep.specs["query"].items():
    if s.kind != "history":
      continue
    enc = prep.encoders[name]
    side = feat.side_columns(s)
    side_NxS = (feat.side_values(enc, [feat.column(given, c, "cold-user history")
                                       for c in side]) if side else None)
    seqs = history.sequences(given_user, feat.lookup(enc, prep.item_ids_N)[given_item],
                             given[time_key], num_cold, side_NxS)
    q.update(input_pipeline.window_inputs(name, s, enc, seqs, test_user,
                                          seqs.indptr_U1[np.asarray(test_user) + 1],
                                          test[time_key]))
  return q


def cold_user_metrics(config, prep, model, params, *, c_NxD=None) -> dict[str, float]:
  """Users held out of training entirely (``data.cold_user_fraction``), each given their
  first ``data.cold_user_history`` interactions, without retraining, and tested on the
  rest under ``exclude_history`` (each test interaction's exclusions: the given items and
  the user's earlier test items). ``cold_users/exclude_history/<metric>``: the model served
  from the given history alone; ``cold_users/online/exclude_history/<metric>``: from the
  given history and the user's test interactions before each one (what a live system
  would know); ``cold_users/<baseline>/...`` and ``cold_users/online/<baseline>/...``: the
  same for popularity, item-CF and EASE fitted on training
  (`baselines.given_history_baselines`); and the counts."""
  ds = prep.dataset
  _, given_idx, test_idx = sources.cold_user_rows(config.data, ds, int(config.seed))
  given = dataset_lib.take_rows(ds.ratings, given_idx)
  test = dataset_lib.take_rows(ds.ratings, test_idx)
  given_user, test_user, num_cold = input_pipeline.user_index(given[ds.user_key],
                                                              test[ds.user_key])
  given_item = input_pipeline.item_index(prep.item_ids_N, given[ds.item_key],
                                         "cold-user history")
  test_item = input_pipeline.item_index(prep.item_ids_N, test[ds.item_key], "cold-user tests")
  given_time, test_time = (np.asarray(given[ds.time_key], np.float64),
                           np.asarray(test[ds.time_key], np.float64))
  bs, ks = config.eval.batch_size, tuple(config.eval.ks)
  if c_NxD is None:
    c_NxD = model_lib.embed_in_batches(model_lib.embed_candidates, params, prep.cand, bs,
                                       model=model)
  indptr, seen = metrics_lib.seen_csr(given_user, given_item, num_cold)
  h_indptr, h_items = history.online_history(given_user, given_item, test_user, test_item,
                                             test_time, num_cold)
  out = {"num_users": num_cold, "num_test": len(test_item),
         "history": int(config.data.cold_user_history)}
  for online, prefix in ((False, ""), (True, "online/")):
    q_CxD = model_lib.embed_in_batches(
        model_lib.embed_queries, params,
        cold_user_queries(prep, given, test, (given_user, given_item), (test_user, test_item),
                          num_cold, online), bs, model=model)
    res = metrics_lib.evaluate_protocols(
        test_item, test_user, indptr, seen, prep.item_counts(), ks=ks, q_BxD=q_CxD,
        c_NxD=c_NxD, history_indptr=h_indptr, history_items=h_items,
        protocols=("exclude_history",), batch_size=bs)
    if config.eval.baselines:
      res.update({k: v for k, v in baselines.given_history_baselines(
          prep.train_user, prep.train_item, prep.num_users, prep.num_items, given_user,
          given_item, test_user, test_item, num_cold, given_time=given_time,
          test_time=test_time, online=online, ks=ks, ease_lambda=float(config.eval.ease_lambda),
          ease_recency=float(config.eval.ease_recency),
          ease_max_items=int(config.eval.ease_max_items), batch_size=bs).items()
          if not (online and k.startswith("popularity/"))})  # the same in both
    out.update({prefix + k: v for k, v in res.items()})
  return {f"cold_users/{k}": v for k, v in out.items()}
