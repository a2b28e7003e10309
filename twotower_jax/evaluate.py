"""Evaluation of a trained model and the baselines on the same split, same code."""

from __future__ import annotations

from typing import Any

import numpy as np

from twotower_jax import baselines
from twotower_jax import metrics as metrics_lib
from twotower_jax import model as model_lib


def evaluate(config, prep, model, params) -> dict[str, Any]:
  """Full-corpus metrics of the model (both protocols) and, optionally, of the baselines."""
  bs = config.eval.batch_size
  c_NxD = model_lib.embed_in_batches(model_lib.embed_candidates, params, prep.cand, bs,
                                     model=model)
  q_TxD = model_lib.embed_in_batches(model_lib.embed_queries, params, prep.test_q, bs,
                                     model=model)
  ks = tuple(config.eval.ks)
  indptr, seen = metrics_lib.seen_csr(prep.train_user, prep.train_item, prep.num_users)
  out = metrics_lib.evaluate_protocols(
      prep.test_item, prep.test_user, indptr, seen, prep.item_counts(), ks=ks, q_BxD=q_TxD,
      c_NxD=c_NxD, batch_size=bs)
  if config.eval.baselines:
    out.update(baselines.evaluate_baselines(
        prep.train_user, prep.train_item, prep.test_user, prep.test_item,
        prep.num_users, prep.num_items, ks=ks, seed=int(config.seed)))
  return {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v)
          for k, v in out.items()}
