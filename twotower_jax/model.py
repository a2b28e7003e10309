"""The two towers (Flax linen): encoded features in, one D-dim embedding out.

Initializers follow Keras (embeddings uniform(-0.05, 0.05), dense Glorot
uniform, zero bias) so that the seed configuration trains like the TFRS model
it reproduces.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax import arrays
from twotower_jax import sparse
from twotower_jax.features import PAD, VALUE_SUFFIX

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


def _bag(name: str, size: int, dim: int, idx_BxL: jax.Array, pooling: str = "mean"
         ) -> jax.Array:
  """Mean (or sum) of the embeddings of the non-padding entries of each row (zeros if none)."""
  valid_BxL = idx_BxL != PAD
  e_BxLxE = _embed(name, size, dim, jnp.where(valid_BxL, idx_BxL, 0))
  summed_BxE = (e_BxLxE * valid_BxL[..., None]).sum(1)
  if pooling == "sum":
    return summed_BxE
  return summed_BxE / jnp.maximum(valid_BxL.sum(-1, keepdims=True), 1)


# (feature name, kind, embedding rows (0: the value enters as is), dim, pooling): everything
# a tower needs to know of one feature. Tuples keep the module hashable.
FeatureDef = tuple[str, str, int, int, str]


def feature_defs(specs: Mapping[str, Any], rows: Mapping[str, int]) -> tuple[FeatureDef, ...]:
  """The tower's features, in name order, from their specs and embedding rows. A history's
  pooling field is "<encoder>:<blocks>"."""
  def pooling(s):
    if s["kind"] == "history":
      return f"{s['encoder']}:{s['blocks']}"
    return str(s.get("pooling", "mean"))

  return tuple((name, s["kind"], int(rows[name]), int(s["dim"]), pooling(s))
               for name, s in specs.items())


class History(nn.Module):
  """The user's recent items [B, L] (most recent last, -1 padding on the left) -> one vector:
  their mean embedding, or (``encoder`` "attention") the last position of causal
  self-attention blocks with learned positions (SASRec), then the most recent item's own
  embedding beside it."""

  rows: int
  dim: int
  encoder: str = "mean"
  blocks: int = 1

  @nn.compact
  def __call__(self, ids_BxL: jax.Array) -> jax.Array:
    valid_BxL = ids_BxL != PAD
    e_BxLxD = Embed(self.rows, self.dim, name="items")(jnp.where(valid_BxL, ids_BxL, 0))
    e_BxLxD = e_BxLxD * valid_BxL[..., None]
    last_BxD = e_BxLxD[:, -1]
    if self.encoder == "mean":
      pooled_BxD = e_BxLxD.sum(1) / jnp.maximum(valid_BxL.sum(-1, keepdims=True), 1)
    else:
      length = ids_BxL.shape[1]
      pos_LxD = self.param("positions", nn.initializers.normal(0.02), (length, self.dim))
      h_BxLxD = (e_BxLxD + pos_LxD) * valid_BxL[..., None]
      mask = nn.combine_masks(nn.make_attention_mask(valid_BxL, valid_BxL),
                              nn.make_causal_mask(valid_BxL))
      for b in range(self.blocks):
        x = nn.LayerNorm(name=f"ln_attn_{b}")(h_BxLxD)
        h_BxLxD = h_BxLxD + nn.MultiHeadDotProductAttention(num_heads=1, name=f"attn_{b}")(
            x, mask=mask)
        x = nn.LayerNorm(name=f"ln_ffn_{b}")(h_BxLxD)
        h_BxLxD = h_BxLxD + MLP((self.dim, self.dim), name=f"ffn_{b}")(x)
      pooled_BxD = nn.LayerNorm(name="ln_out")(h_BxLxD)[:, -1] * valid_BxL[:, -1:]
    return jnp.concatenate([pooled_BxD, last_BxD], axis=-1)


class Tower(nn.Module):
  """Every feature encoded (an embedding, a pooled bag, or the value), concatenated, an MLP."""

  features: tuple[FeatureDef, ...]
  mlp: Sequence[int]
  l2_normalize: bool = False

  @nn.compact
  def __call__(self, x: Mapping[str, jax.Array]) -> jax.Array:
    parts = []
    for name, kind, rows, dim, pooling in self.features:
      if kind == "history":
        encoder, blocks = pooling.split(":")
        parts.append(History(rows, dim, encoder, int(blocks), name=name)(x[name]))
      elif kind in ("multi_hot", "text"):
        parts.append(_bag(name, rows, dim, x[name], pooling))
      elif rows:  # a vocabulary, a bucketized number, a timestamp's bucket
        parts.append(_embed(name, rows, dim, x[name]))
      else:
        parts.append(x[name][:, None])
      if kind == "timestamp":
        parts.append(x[name + VALUE_SUFFIX][:, None])
    if not parts:
      raise ValueError("A tower has no input feature: declare one under config.features.")
    h_BxD = MLP(self.mlp, name="mlp")(jnp.concatenate(parts, axis=-1))
    return _maybe_normalize(h_BxD, self.l2_normalize)


def _maybe_normalize(x_BxD: jax.Array, on: bool) -> jax.Array:
  if not on:
    return x_BxD
  return x_BxD * jax.lax.rsqrt(jnp.maximum((x_BxD * x_BxD).sum(-1, keepdims=True), 1e-12))


class TwoTower(nn.Module):
  """Both towers plus an optional learned temperature, under params 'query'/'candidate'."""

  query: Tower
  candidate: Tower
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

  def sparse_tables(self) -> tuple[sparse.Table, ...]:
    """The tables of ``id`` features: large, so they can be updated sparsely and sharded."""
    return (tuple(("query", f[0], ("xq",)) for f in self.query.features if f[1] == "id")
            + tuple(("candidate", f[0], ("xc", "extra_xc")) for f in self.candidate.features
                    if f[1] == "id"))


def create_model(model_cfg, query: tuple[FeatureDef, ...], candidate: tuple[FeatureDef, ...]
                 ) -> TwoTower:
  """The two towers from ``config.model`` and each tower's features (``feature_defs``).

  The tables of ``id`` features are padded with unused rows up to a multiple of
  ``model.table_rows_multiple`` (so that they split evenly over devices).
  """
  m = model_cfg
  mult = m.table_rows_multiple
  if mult < 1:
    raise ValueError(f"model.table_rows_multiple={mult}: use a positive int (1: no padding).")

  def padded(defs):
    return tuple((n, k, -(-rows // mult) * mult if k == "id" else rows, d, p)
                 for n, k, rows, d, p in defs)

  return TwoTower(
      query=Tower(features=padded(query), mlp=tuple(m.mlp), l2_normalize=m.l2_normalize),
      candidate=Tower(features=padded(candidate), mlp=tuple(m.mlp),
                      l2_normalize=m.l2_normalize),
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
