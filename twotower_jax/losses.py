"""In-batch sampled-softmax retrieval loss, formula for formula as TFRS ``tasks.Retrieval``.

Order of operations (as TFRS): scores = q @ c.T; divide by the temperature;
subtract log of the candidates' sampling probabilities (logQ correction);
push accidental hits (another in-batch column holding the positive's id) to
a very negative value; keep the ``num_hard_negatives`` highest-scoring
negatives; softmax cross-entropy with the diagonal as the label. Mean
reduction over the (valid) queries.

Additions beyond TFRS, both off by default:
* extra negatives (mixed negative sampling, Yang et al. 2020): candidates
  shared by the whole batch, appended as columns with label 0; the logQ term
  then uses the mixture's sampling probability.
* validity masks, so a padded last batch uses the same compiled step.
* per-query weights (recency weighting of the training examples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MIN_FLOAT = float(np.finfo(np.float32).min / 100.0)
MAX_FLOAT = float(np.finfo(np.float32).max / 100.0)


def retrieval_loss(
    q_BxD: jax.Array,
    c_BxD: jax.Array,
    *,
    temperature: float | jax.Array | None = None,
    log_q_B: jax.Array | None = None,
    candidate_ids_B: jax.Array | None = None,
    num_hard_negatives: int | None = None,
    valid_B: jax.Array | None = None,
    extra_c_MxD: jax.Array | None = None,
    extra_log_q_M: jax.Array | None = None,
    extra_ids_M: jax.Array | None = None,
    positive_ids_B: jax.Array | None = None,
    weight_B: jax.Array | None = None,
) -> jax.Array:
  """Mean softmax cross-entropy of each query against the batch's candidates.

  Args:
    q_BxD: query embeddings; row i's positive is candidate i.
    c_BxD: candidate embeddings of the batch.
    temperature: logits are divided by it (TFRS ``temperature``).
    log_q_B: log sampling probability of each in-batch candidate (logQ
      correction, TFRS ``candidate_sampling_probability`` after the log).
    candidate_ids_B: ids of the candidates; when given, accidental hits
      (same id as the row's positive, off the diagonal) are removed.
    num_hard_negatives: keep only this many highest-scoring negatives.
    valid_B: False for padding rows (excluded as queries and as candidates).
    extra_c_MxD, extra_log_q_M, extra_ids_M: shared extra negatives; with
      ``positive_ids_B`` an extra negative equal to a row's positive is removed
      for that row (an accidental hit of the sampler).
    positive_ids_B: ids of the rows' positives, for the extra negatives.
    weight_B: per-query loss weights (e.g. recency); the mean is weighted.
  Returns:
    The scalar loss.
  """
  scores_BxN = jnp.dot(q_BxD, c_BxD.T, preferred_element_type=jnp.float32)
  b = scores_BxN.shape[0]
  labels_BxN = jnp.eye(b, scores_BxN.shape[1], dtype=jnp.float32)
  log_q_N = log_q_B
  ids_N = candidate_ids_B
  if extra_c_MxD is not None:
    extra_BxM = jnp.dot(q_BxD, extra_c_MxD.T, preferred_element_type=jnp.float32)
    scores_BxN = jnp.concatenate([scores_BxN, extra_BxM], axis=1)
    labels_BxN = jnp.pad(labels_BxN, ((0, 0), (0, extra_c_MxD.shape[0])))
    if log_q_B is not None:
      log_q_N = jnp.concatenate([log_q_B, extra_log_q_M])
    if candidate_ids_B is not None:
      ids_N = jnp.concatenate([candidate_ids_B, extra_ids_M])

  if temperature is not None:
    scores_BxN = scores_BxN / temperature
  if log_q_N is not None:
    scores_BxN = scores_BxN - jnp.maximum(log_q_N, np.log(1e-6))[None, :]
  if ids_N is not None:
    positive_ids_B = ids_N[:b]
    duplicate_BxN = (positive_ids_B[:, None] == ids_N[None, :]).astype(jnp.float32) - labels_BxN
    scores_BxN = scores_BxN + duplicate_BxN * MIN_FLOAT
  if extra_c_MxD is not None and extra_ids_M is not None and positive_ids_B is not None:
    hit_BxM = positive_ids_B[:, None] == extra_ids_M[None, :]
    hit_BxN = jnp.pad(hit_BxM, ((0, 0), (b, 0)))  # in-batch columns untouched
    scores_BxN = jnp.where(hit_BxN, MIN_FLOAT, scores_BxN)
  if valid_B is not None:
    valid_N = valid_B
    if extra_c_MxD is not None:
      valid_N = jnp.concatenate([valid_B, jnp.ones(extra_c_MxD.shape[0], bool)])
    scores_BxN = jnp.where(valid_N[None, :], scores_BxN, MIN_FLOAT)
  if num_hard_negatives is not None:
    k = min(num_hard_negatives + 1, scores_BxN.shape[1])
    _, cols_Bxk = jax.lax.top_k(scores_BxN + labels_BxN * MAX_FLOAT, k)
    scores_BxN = jnp.take_along_axis(scores_BxN, cols_Bxk, axis=1)
    positive_B = (jnp.take_along_axis(labels_BxN, cols_Bxk, axis=1) * scores_BxN).sum(1)
  else:
    positive_B = jnp.diagonal(scores_BxN)  # the label is one-hot on the diagonal

  # Softmax cross-entropy with a one-hot label, without materializing log-probabilities.
  ce_B = jax.nn.logsumexp(scores_BxN, axis=1) - positive_B
  if valid_B is None and weight_B is None:
    return ce_B.mean()
  w_B = jnp.ones_like(ce_B) if valid_B is None else valid_B.astype(jnp.float32)
  if weight_B is not None:
    w_B = w_B * weight_B
  return (ce_B * w_B).sum() / jnp.maximum(w_B.sum(), 1e-12)


def mixed_log_q(p_in_batch: jax.Array, batch_size: int, num_extra: int,
                num_candidates: int) -> jax.Array:
  """log of the mixture sampling probability (B * p_j + M / N) / (B + M)."""
  return jnp.log((batch_size * p_in_batch + num_extra / num_candidates) /
                 (batch_size + num_extra))


# ----------------------------------------------------------------------------
# Streaming frequency estimation (Yi et al., RecSys 2019), for logQ without counting.


def freq_init(num_buckets: int) -> dict[str, jax.Array]:
  """State: step each hashed id was last seen (A) and the estimated gap between hits (B)."""
  return {"last_step": jnp.zeros(num_buckets, jnp.float32),
          "gap": jnp.full(num_buckets, float(num_buckets), jnp.float32)}


def freq_update(state: dict[str, jax.Array], ids_B: jax.Array, step: jax.Array,
                alpha: float) -> dict[str, jax.Array]:
  """One step of the estimator: gap <- (1-a) gap + a (step - last_step); last_step <- step."""
  h_B = ids_B % state["gap"].shape[0]
  step = step.astype(jnp.float32)
  gap_B = (1.0 - alpha) * state["gap"][h_B] + alpha * (step - state["last_step"][h_B])
  return {"gap": state["gap"].at[h_B].set(gap_B),
          "last_step": state["last_step"].at[h_B].set(step)}


def freq_probability(state: dict[str, jax.Array], ids_B: jax.Array) -> jax.Array:
  """Estimated per-step sampling probability 1 / gap of each id (clipped to (0, 1])."""
  return 1.0 / jnp.maximum(state["gap"][ids_B % state["gap"].shape[0]], 1.0)
