"""The two towers (Flax linen): encoded features in, one D-dim embedding out.

Initializers follow Keras (embeddings uniform(-0.05, 0.05), dense Glorot
uniform, zero bias) so that the seed configuration trains like the TFRS model
it reproduces.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax import arrays
from twotower_jax import sparse
from twotower_jax.features import PAD

_embed_init = nn.initializers.uniform(scale=0.1)  # shifted below to (-0.05, 0.05)


def _keras_embed_init(key, shape, dtype=jnp.float32):
  return _embed_init(key, shape, dtype) - 0.05


_dense_init = nn.initializers.glorot_uniform()


class MLP(nn.Module):
  """Dense layers with ReLU between them; the last layer is linear."""

  features: Sequence[int]

  @nn.compact
  def __call__(self, h_BxF: jax.Array) -> jax.Array:
    for i, width in enumerate(self.features):
      h_BxF = nn.Dense(width, kernel_init=_dense_init, name=f"dense_{i}")(h_BxF)
      if i < len(self.features) - 1:
        h_BxF = nn.relu(h_BxF)
    return h_BxF


class Embed(nn.Module):
  """``nn.Embed`` with Keras's initializer, whose rows can be supplied at apply time.

  Training with ``optimizer.sparse_embeddings`` passes the rows a batch uses in the
  ``sparse_rows`` collection (with the ids remapped into them), so the gradient is taken
  with respect to those rows only, never the whole table.
  """

  num_embeddings: int
  features: int

  @nn.compact
  def __call__(self, idx: jax.Array) -> jax.Array:
    table_VxE = self.param("embedding", _keras_embed_init, (self.num_embeddings, self.features))
    if self.has_variable("sparse_rows", "embedding"):
      return jnp.take(self.get_variable("sparse_rows", "embedding"), idx, axis=0)
    if self.num_embeddings == 1:
      return jnp.broadcast_to(table_VxE, idx.shape + (self.features,))
    return jnp.take(table_VxE, idx, axis=0)


def _embed(name: str, size: int, dim: int, idx: jax.Array) -> jax.Array:
  return Embed(size, dim, name=name)(idx)


def _bag(name: str, size: int, dim: int, idx_BxL: jax.Array) -> jax.Array:
  """Mean of the embeddings of the non-padding entries of each row (zeros if none)."""
  valid_BxL = idx_BxL != PAD
  e_BxLxE = _embed(name, size, dim, jnp.where(valid_BxL, idx_BxL, 0))
  n_B = jnp.maximum(valid_BxL.sum(-1, keepdims=True), 1)
  return (e_BxLxE * valid_BxL[..., None]).sum(1) / n_B


class QueryTower(nn.Module):
  """User age, gender, occupation, time (bucket embedding + value), optional user id."""

  vocab_sizes: tuple[tuple[str, int], ...]  # (feature, rows); a tuple keeps it hashable
  mlp: Sequence[int]
  user_dim: int = 32
  gender_dim: int = 2
  occupation_dim: int = 8
  time_dim: int = 32
  l2_normalize: bool = False

  @nn.compact
  def __call__(self, x: Mapping[str, jax.Array]) -> jax.Array:
    s = dict(self.vocab_sizes)
    parts = []
    if "user_id" in x:
      parts.append(_embed("user_id", s["user_id"], self.user_dim, x["user_id"]))
    if "age" in x:
      parts.append(x["age"][:, None])
    if "gender" in x:
      parts.append(_embed("gender", s["gender"], self.gender_dim, x["gender"]))
    if "occupation" in x:
      parts.append(_embed("occupation", s["occupation"], self.occupation_dim, x["occupation"]))
    if "time" in x:
      parts.append(_embed("time_bucket", s["time_bucket"], self.time_dim, x["time_bucket"]))
      parts.append(x["time"][:, None])
    if not parts:
      raise ValueError("The query tower has no input feature: enable one under config.features.")
    q_BxD = MLP(self.mlp, name="mlp")(jnp.concatenate(parts, axis=-1))
    return _maybe_normalize(q_BxD, self.l2_normalize)


class CandidateTower(nn.Module):
  """Movie title, genres (first or bag of all), title words (mean-pooled), release year."""

  vocab_sizes: tuple[tuple[str, int], ...]  # (feature, rows); a tuple keeps it hashable
  mlp: Sequence[int]
  title_dim: int = 32
  genre_dim: int = 32
  word_dim: int = 32
  year_dim: int = 8
  l2_normalize: bool = False

  @nn.compact
  def __call__(self, x: Mapping[str, jax.Array]) -> jax.Array:
    s = dict(self.vocab_sizes)
    parts = []
    if "title" in x:
      parts.append(_embed("title", s["title"], self.title_dim, x["title"]))
    if "genres" in x:
      parts.append(_bag("genres", s["genres"], self.genre_dim, x["genres"]))
    if "title_words" in x:
      parts.append(_bag("title_words", s["title_words"], self.word_dim, x["title_words"]))
    if "release_year" in x:
      parts.append(_embed("release_year", s["release_year"], self.year_dim, x["release_year"]))
    if not parts:
      raise ValueError(
          "The candidate tower has no input feature: enable one under config.features.")
    c_BxD = MLP(self.mlp, name="mlp")(jnp.concatenate(parts, axis=-1))
    return _maybe_normalize(c_BxD, self.l2_normalize)


def _maybe_normalize(x_BxD: jax.Array, on: bool) -> jax.Array:
  if not on:
    return x_BxD
  return x_BxD * jax.lax.rsqrt(jnp.maximum((x_BxD * x_BxD).sum(-1, keepdims=True), 1e-12))


class TwoTower(nn.Module):
  """Both towers plus an optional learned temperature, under params 'query'/'candidate'."""

  query: QueryTower
  candidate: CandidateTower
  learn_temperature: bool = False
  init_temperature: float = 1.0

  def setup(self):
    if self.learn_temperature:
      self.log_temperature = self.param(
          "log_temperature", lambda _: jnp.log(jnp.float32(self.init_temperature)))

  def __call__(self, xq, xc):
    return self.query(xq), self.candidate(xc), self.temperature()

  def embed_queries(self, xq):
    return self.query(xq)

  def embed_candidates(self, xc):
    return self.candidate(xc)

  def temperature(self) -> jax.Array:
    if not self.learn_temperature:
      return jnp.asarray(self.init_temperature, jnp.float32)
    return jnp.exp(self.log_temperature)


def create_model(model_cfg, sizes: Mapping[str, int]) -> TwoTower:
  """The two towers from ``config.model`` and the encoders' vocabulary sizes.

  The user-id and title tables are padded with unused rows up to a multiple of
  ``model.table_rows_multiple`` (so that they split evenly over devices).
  """
  m = model_cfg
  mult = m.table_rows_multiple
  if mult < 1:
    raise ValueError(f"model.table_rows_multiple={mult}: use a positive int (1: no padding).")
  sizes = dict(sizes)
  for _, name, _, _ in sparse.TABLES:
    if name in sizes:
      sizes[name] = -(-sizes[name] // mult) * mult
  sizes = tuple(sorted(sizes.items()))
  return TwoTower(
      query=QueryTower(
          vocab_sizes=sizes, mlp=tuple(m.mlp), user_dim=m.user_dim, gender_dim=m.gender_dim,
          occupation_dim=m.occupation_dim, time_dim=m.time_dim, l2_normalize=m.l2_normalize),
      candidate=CandidateTower(
          vocab_sizes=sizes, mlp=tuple(m.mlp), title_dim=m.title_dim, genre_dim=m.genre_dim,
          word_dim=m.word_dim, year_dim=m.year_dim, l2_normalize=m.l2_normalize),
      learn_temperature=m.learn_temperature,
      init_temperature=m.temperature,
  )


# ----------------------------------------------------------------------------
# Applying the towers to many rows (evaluation, serving).


@functools.partial(jax.jit, static_argnames=("model",))
def embed_queries(params, xq: Mapping[str, jax.Array], *, model: TwoTower) -> jax.Array:
  """Query embeddings [B, D] of encoded query features."""
  return model.apply({"params": params}, xq, method=TwoTower.embed_queries)


@functools.partial(jax.jit, static_argnames=("model",))
def embed_candidates(params, xc: Mapping[str, jax.Array], *, model: TwoTower) -> jax.Array:
  """Candidate embeddings [B, D] of encoded candidate features."""
  return model.apply({"params": params}, xc, method=TwoTower.embed_candidates)


def embed_in_batches(fn, params, x: Mapping[str, np.ndarray], batch_size: int, *,
                     model: TwoTower) -> np.ndarray:
  """``fn`` (``embed_queries`` or ``embed_candidates``) over the rows of ``x`` in fixed-size
  batches (the last one padded: one compiled shape); returns [N, D] on the host."""
  n = len(next(iter(x.values())))
  out = []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in x.items()}
    m = len(next(iter(chunk.values())))
    if m < batch_size and n > batch_size:
      chunk = {k: arrays.pad_rows(v, batch_size) for k, v in chunk.items()}
    out.append(np.asarray(fn(params, chunk, model=model))[:m])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
