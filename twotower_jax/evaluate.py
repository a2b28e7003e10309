"""Evaluation of a trained model and the baselines on the same split, same code."""

from __future__ import annotations

from typing import Any

import numpy as np

from twotower_jax import baselines
from twotower_jax import history
from twotower_jax import metrics as metrics_lib
from twotower_jax import model as model_lib


def evaluate(config, prep, model, params) -> dict[str, Any]:
  """Full-corpus metrics of the model and, optionally, of the baselines, under every protocol:
  include_seen, exclude_seen, and exclude_history (each test interaction's online history
  excluded: the user's training items and their test items strictly before it by time; the
  training items alone when the data has no timestamps)."""
  bs = config.eval.batch_size
  c_NxD = model_lib.embed_in_batches(model_lib.embed_candidates, params, prep.cand, bs,
                                     model=model)
  q_TxD = model_lib.embed_in_batches(model_lib.embed_queries, params, prep.test_q, bs,
                                     model=model)
  ks = tuple(config.eval.ks)
  indptr, seen = metrics_lib.seen_csr(prep.train_user, prep.train_item, prep.num_users)
  time_key = prep.dataset.time_key
  train_time = np.asarray(prep.train[time_key], np.float64) if time_key else None
  test_time = (np.asarray(prep.test[time_key], np.float64) if time_key
               else np.zeros(len(prep.test_user)))  # no times: no test item precedes another
  h_indptr, h_items = history.online_history(prep.train_user, prep.train_item, prep.test_user,
                                             prep.test_item, test_time, prep.num_users)
  out = metrics_lib.evaluate_protocols(
      prep.test_item, prep.test_user, indptr, seen, prep.item_counts(), ks=ks, q_BxD=q_TxD,
      c_NxD=c_NxD, history_indptr=h_indptr, history_items=h_items, batch_size=bs)
  if config.eval.baselines:
    out.update(baselines.evaluate_baselines(
        prep.train_user, prep.train_item, prep.test_user, prep.test_item,
        prep.num_users, prep.num_items, ks=ks, seed=int(config.seed),
        history_indptr=h_indptr, history_items=h_items, train_time=train_time,
        test_time=test_time, ease_lambda=float(config.eval.ease_lambda),
        ease_recency=float(config.eval.ease_recency),
        ease_max_items=int(config.eval.ease_max_items)))
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
