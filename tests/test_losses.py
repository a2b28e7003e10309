"""The retrieval loss against hand-computed values and a literal NumPy port of TFRS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax import losses

Q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
C = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)  # scores = [[1, 1], [0, 1]]


def tfrs_reference(q, c, temperature=None, p=None, ids=None, num_hard=None):
  """TFRS tasks.Retrieval.call, statement by statement, in NumPy (mean reduction)."""
  scores = q @ c.T
  labels = np.eye(*scores.shape, dtype=np.float32)
  if temperature is not None:
    scores = scores / temperature
  if p is not None:
    scores = scores - np.log(np.clip(p, 1e-6, 1.0))
  if ids is not None:
    pos_ids = ids[np.argmax(labels, axis=1)]
    duplicate = (pos_ids[:, None] == ids[None, :]).astype(np.float32) - labels
    scores = scores + duplicate * (np.finfo(np.float32).min / 100)
  if num_hard is not None:
    k = min(num_hard + 1, scores.shape[1])
    cols = np.argsort(-(scores + labels * np.finfo(np.float32).max / 100), axis=1,
                      kind="stable")[:, :k]
    scores = np.take_along_axis(scores, cols, 1)
    labels = np.take_along_axis(labels, cols, 1)
  z = scores - scores.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return float(-(labels * logp).sum(1).mean())


def test_plain_softmax_by_hand():
  # Row 0: -log(e/(e+e)) = log 2; row 1: -log(e/(1+e)) = log(1 + 1/e).
  expected = (np.log(2.0) + np.log1p(np.exp(-1.0))) / 2
  assert float(losses.retrieval_loss(Q, C)) == pytest.approx(expected, rel=1e-6)


def test_temperature_by_hand():
  expected = (np.log(2.0) + np.log1p(np.exp(-2.0))) / 2
  assert float(losses.retrieval_loss(Q, C, temperature=0.5)) == pytest.approx(expected, rel=1e-6)


def test_logq_by_hand():
  p = np.array([0.5, 0.25], np.float32)
  # Corrected scores: [[1 + ln2, 1 + ln4], [ln2, 1 + ln4]].
  row0 = np.log1p(np.exp(np.log(4) - np.log(2)))  # log 3
  row1 = np.log1p(np.exp(np.log(2) - 1 - np.log(4)))
  got = losses.retrieval_loss(Q, C, log_q_B=jnp.log(p))
  assert float(got) == pytest.approx((row0 + row1) / 2, rel=1e-6)
  assert float(got) == pytest.approx(tfrs_reference(Q, C, p=p), rel=1e-6)


def test_logq_clips_tiny_probabilities_like_tfrs():
  p = np.array([1e-9, 0.5], np.float32)
  assert float(losses.retrieval_loss(Q, C, log_q_B=jnp.log(p))) == pytest.approx(
      tfrs_reference(Q, C, p=p), rel=1e-5)


def test_accidental_hits_removed():
  # Both candidates are the same movie: each row's only negative is an accidental hit.
  assert float(losses.retrieval_loss(Q, C, candidate_ids_B=jnp.array([7, 7]))) == pytest.approx(
      0.0, abs=1e-6)
  # Different ids: nothing changes.
  assert float(losses.retrieval_loss(Q, C, candidate_ids_B=jnp.array([1, 2]))) == pytest.approx(
      float(losses.retrieval_loss(Q, C)), rel=1e-6)


def test_hard_negatives_by_hand():
  q = np.eye(3, dtype=np.float32)
  c = np.array([[1, 3, 0], [2, 1, 0], [0, 5, 1]], np.float32)  # scores = c.T
  scores = q @ c.T
  # num_hard_negatives=1: row i keeps its positive and its best negative.
  expected = []
  for i in range(3):
    neg = max(scores[i, j] for j in range(3) if j != i)
    expected.append(np.log1p(np.exp(neg - scores[i, i])))
  got = float(losses.retrieval_loss(q, c, num_hard_negatives=1))
  assert got == pytest.approx(np.mean(expected), rel=1e-6)
  assert got == pytest.approx(tfrs_reference(q, c, num_hard=1), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_options_match_tfrs_order(seed):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(6, 4)).astype(np.float32)
  c = rng.normal(size=(6, 4)).astype(np.float32)
  p = rng.uniform(0.01, 0.5, size=6).astype(np.float32)
  ids = np.array([3, 1, 3, 2, 5, 1])
  got = losses.retrieval_loss(q, c, temperature=0.2, log_q_B=jnp.log(p),
                              candidate_ids_B=jnp.asarray(ids), num_hard_negatives=2)
  ref = tfrs_reference(q, c, temperature=0.2, p=p, ids=ids, num_hard=2)
  assert float(got) == pytest.approx(ref, rel=1e-5)


def test_padding_rows_are_ignored():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(5, 3)).astype(np.float32)
  c = rng.normal(size=(5, 3)).astype(np.float32)
  valid = jnp.array([True, True, True, False, False])
  got = losses.retrieval_loss(q, c, valid_B=valid)
  want = losses.retrieval_loss(q[:3], c[:3])
  assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_weights_give_a_weighted_mean():
  rng = np.random.default_rng(4)
  q = rng.normal(size=(4, 3)).astype(np.float32)
  c = rng.normal(size=(4, 3)).astype(np.float32)
  logits = q @ c.T
  ce = np.log(np.exp(logits).sum(1)) - np.diag(logits)
  w = np.array([1.0, 0.5, 0.25, 0.0], np.float32)
  got = losses.retrieval_loss(q, c, weight_B=jnp.asarray(w))
  assert float(got) == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-5)
  # Weights and padding combine: the padded row counts neither as query nor as candidate.
  valid = jnp.array([True, True, True, False])
  got = losses.retrieval_loss(q, c, weight_B=jnp.asarray(w), valid_B=valid)
  want = losses.retrieval_loss(q[:3], c[:3], weight_B=jnp.asarray(w[:3]))
  assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_extra_negatives_are_extra_columns():
  q, c = Q, C
  extra = np.array([[0.0, 2.0]], np.float32)  # scores [0, 2]
  row0 = -np.log(np.e / (np.e + np.e + 1.0))
  row1 = -np.log(np.e / (1.0 + np.e + np.e ** 2))
  got = losses.retrieval_loss(q, c, extra_c_MxD=extra)
  assert float(got) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_mixed_log_q():
  # B=4 in-batch with p=0.25, M=2 uniform over N=8: (4*0.25 + 2/8) / 6.
  assert float(losses.mixed_log_q(jnp.float32(0.25), 4, 2, 8)) == pytest.approx(
      np.log((1 + 0.25) / 6), rel=1e-6)


def test_streaming_frequency_estimator():
  state = losses.freq_init(16)
  # Item 3 appears every 2 steps: the estimated gap converges to 2 (probability 1/2).
  for step in range(0, 400, 2):
    state = losses.freq_update(state, jnp.array([3]), jnp.int32(step), alpha=0.1)
  assert float(losses.freq_probability(state, jnp.array([3]))[0]) == pytest.approx(0.5, rel=0.01)
  # Item 5 never seen: probability stays at the prior 1/num_buckets.
  assert float(losses.freq_probability(state, jnp.array([5]))[0]) == pytest.approx(1 / 16)


def test_loss_is_differentiable_and_finite():
  g = jax.grad(lambda q: losses.retrieval_loss(q, C, temperature=0.1))(Q)
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.abs(np.asarray(g)).sum() > 0


def test_extra_negative_equal_to_the_positive_is_removed():
  extra = np.array([[0.0, 2.0]], np.float32)  # scores [0, 2]; its id is 9
  # Row 1's positive is also id 9: that extra column is dropped for row 1 only.
  got = losses.retrieval_loss(Q, C, extra_c_MxD=extra, extra_ids_M=jnp.array([9]),
                              positive_ids_B=jnp.array([4, 9]))
  row0 = -np.log(np.e / (np.e + np.e + 1.0))
  row1 = -np.log(np.e / (1.0 + np.e))
  assert float(got) == pytest.approx((row0 + row1) / 2, rel=1e-6)
