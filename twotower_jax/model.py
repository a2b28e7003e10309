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
from twotower_jax.features import PAD, SIDE_SUFFIX, TIME_SINCE_SUFFIX, VALUE_SUFFIX

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


def history_pooling(s: Mapping[str, Any]) -> str:
  """A history spec as the pooling field of its ``FeatureDef``: "<encoder>:<blocks>", then
  only the options that are on (so a definition written before they existed reads the
  same): "side=<S>", "time", "dropout=<rate>", "share=<candidate feature>"."""
  parts = [str(s["encoder"]), str(s["blocks"])]
  side = tuple(s.get("side", ()) or ())
  if side:
    parts.append(f"side={len(side)}")
  if s.get("time_since"):
    parts.append("time")
  if s.get("dropout"):
    parts.append(f"dropout={float(s['dropout'])!r}")
  if s.get("share"):
    parts.append(f"share={s['share']}")
  return ":".join(parts)


def history_options(pooling: str) -> dict[str, Any]:
  """``history_pooling`` read back: encoder, blocks, side (count), time, dropout, share."""
  encoder, blocks, *rest = pooling.split(":")
  out = {"encoder": encoder, "blocks": int(blocks), "side": 0, "time": False,
         "dropout": 0.0, "share": ""}
  for part in rest:
    key, _, value = part.partition("=")
    out[key] = {"side": int, "dropout": float, "share": str}.get(key, bool)(value or True)
  return out


def feature_defs(specs: Mapping[str, Any], rows: Mapping[str, int]) -> tuple[FeatureDef, ...]:
  """The tower's features, in name order, from their specs and embedding rows. A history's
  pooling field is ``history_pooling``'s."""
  def pooling(s):
    if s["kind"] == "history":
      return history_pooling(s)
    return str(s.get("pooling", "mean"))

  return tuple((name, s["kind"], int(rows[name]), int(s["dim"]), pooling(s))
               for name, s in specs.items())


class History(nn.Module):
  """The user's recent items [B, L] (most recent last, -1 padding on the left) -> one vector:
  their mean embedding, the last position of causal self-attention blocks with learned
  positions (``encoder`` "attention", SASRec), or the last hidden state of a GRU run over
  the valid positions only ("gru"); then the most recent position's own vector beside it.

  Per position, ``side`` numeric inputs [B, L, S] and the time since the item
  (``time_since``, [B, L]) enter through one linear layer added to the item embedding.
  ``dropout`` acts on the per-position vectors (and inside the attention blocks) when
  ``train``. ``table`` (a [rows, dim] array) replaces the history's own item table: the
  candidate tower's, when the two share one.
  """

  rows: int
  dim: int
  encoder: str = "mean"
  blocks: int = 1
  dropout: float = 0.0
  side: int = 0
  time_since: bool = False

  @nn.compact
  def __call__(self, ids_BxL: jax.Array, side_BxLxS: jax.Array | None = None,
               time_since_BxL: jax.Array | None = None, *, table: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    valid_BxL = ids_BxL != PAD
    safe_BxL = jnp.where(valid_BxL, ids_BxL, 0)
    if table is None:
      e_BxLxD = Embed(self.rows, self.dim, name="items")(safe_BxL)
    else:
      e_BxLxD = jnp.take(table, safe_BxL, axis=0)
    per_position = []
    if self.side:
      if side_BxLxS is None or side_BxLxS.shape[-1] != self.side:
        raise ValueError(f"This history takes {self.side} side columns per position; give "
                         f"them as its '{SIDE_SUFFIX}' input [B, L, {self.side}].")
      per_position.append(side_BxLxS.astype(jnp.float32))
    if self.time_since:
      if time_since_BxL is None:
        raise ValueError(f"This history takes the time since each item; give it as its "
                         f"'{TIME_SINCE_SUFFIX}' input [B, L].")
      per_position.append(time_since_BxL.astype(jnp.float32)[..., None])
    dense = nn.Dense(self.dim, kernel_init=_dense_init, name="per_position")
    x_BxLxP = jnp.concatenate(per_position, axis=-1) if per_position else None
    # The mean of (item + dense(x)) over the valid positions is mean(item) + dense(mean(x)):
    # without dropout the mean encoder adds the dense term after pooling ([B, P], not
    # [B, L, D]); the other encoders need each position's vector.
    after_pooling = x_BxLxP is not None and self.encoder == "mean" and not self.dropout
    if x_BxLxP is not None and not after_pooling:
      e_BxLxD = e_BxLxD + dense(x_BxLxP)
    e_BxLxD = e_BxLxD * valid_BxL[..., None]
    if self.dropout:
      e_BxLxD = nn.Dropout(self.dropout)(e_BxLxD, deterministic=not train)
    last_BxD = e_BxLxD[:, -1]
    if self.encoder == "mean":
      n_Bx1 = valid_BxL.sum(-1, keepdims=True)
      pooled_BxD = e_BxLxD.sum(1) / jnp.maximum(n_Bx1, 1)
      if after_pooling:
        x_BxLxP = x_BxLxP * valid_BxL[..., None]
        pooled_BxD = pooled_BxD + dense(x_BxLxP.sum(1) / jnp.maximum(n_Bx1, 1)) * (n_Bx1 > 0)
        last_BxD = last_BxD + dense(x_BxLxP[:, -1]) * valid_BxL[:, -1:]
    elif self.encoder == "gru":
      pooled_BxD = self._gru(e_BxLxD, valid_BxL)
    else:
      pooled_BxD = self._attention(e_BxLxD, valid_BxL, train)
    return jnp.concatenate([pooled_BxD, last_BxD], axis=-1)

  def _gru(self, e_BxLxD: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """The GRU's hidden state after the last valid position (zeros for no history). The
    valid positions (on the right) are moved to the front, so padding never enters it."""
    length = e_BxLxD.shape[1]
    n_B = valid_BxL.sum(-1).astype(jnp.int32)
    src_BxL = (jnp.arange(length)[None, :] + (length - n_B)[:, None]) % length
    x_BxLxD = jnp.take_along_axis(e_BxLxD, src_BxL[..., None], axis=1)
    h_BxD, _ = nn.RNN(nn.GRUCell(self.dim, name="gru"), return_carry=True)(
        x_BxLxD, seq_lengths=n_B)
    return jnp.where(n_B[:, None] > 0, h_BxD, 0.0)

  def _attention(self, e_BxLxD: jax.Array, valid_BxL: jax.Array, train: bool) -> jax.Array:
    length = e_BxLxD.shape[1]
    pos_LxD = self.param("positions", nn.initializers.normal(0.02), (length, self.dim))
    h_BxLxD = (e_BxLxD + pos_LxD) * valid_BxL[..., None]
    mask = nn.combine_masks(nn.make_attention_mask(valid_BxL, valid_BxL),
                            nn.make_causal_mask(valid_BxL))
    drop = functools.partial(nn.Dropout(self.dropout), deterministic=not train) \
        if self.dropout else (lambda x: x)
    # Only the last position's output is used, so the last block computes that position
    # alone: its query is one row ([B, 1, D]) against every key, and its feed-forward layer
    # runs on one position. The same values as the full block's last row, with ~5x fewer
    # FLOPs for one block at L = 50; earlier blocks need every position.
    for b in range(self.blocks):
      kv_BxLxD = nn.LayerNorm(name=f"ln_attn_{b}")(h_BxLxD)
      q_BxQxD = kv_BxLxD
      if b == self.blocks - 1:
        h_BxLxD, q_BxQxD, mask = h_BxLxD[:, -1:], kv_BxLxD[:, -1:], mask[:, :, -1:]
      h_BxLxD = h_BxLxD + drop(nn.MultiHeadDotProductAttention(
          num_heads=1, dropout_rate=self.dropout, name=f"attn_{b}")(
              q_BxQxD, kv_BxLxD, mask=mask, deterministic=not train))
      x = nn.LayerNorm(name=f"ln_ffn_{b}")(h_BxLxD)
      h_BxLxD = h_BxLxD + drop(MLP((self.dim, self.dim), name=f"ffn_{b}")(x))
    return nn.LayerNorm(name="ln_out")(h_BxLxD)[:, -1] * valid_BxL[:, -1:]


class Tower(nn.Module):
  """Every feature encoded (an embedding, a pooled bag, or the value), concatenated, an MLP."""

  features: tuple[FeatureDef, ...]
  mlp: Sequence[int]
  l2_normalize: bool = False

  @nn.compact
  def __call__(self, x: Mapping[str, jax.Array], train: bool = False,
               shared: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """``train``: dropout on (it needs a "dropout" rng); ``shared``: candidate tables by
    feature name, for histories that share one (without it they read their own copy)."""
    parts = []
    for name, kind, rows, dim, pooling in self.features:
      if kind == "history":
        o = history_options(pooling)
        table = (shared or {}).get(o["share"]) if o["share"] else None
        parts.append(History(rows, dim, o["encoder"], o["blocks"], o["dropout"], o["side"],
                             o["time"], name=name)(
            x[name], x.get(name + SIDE_SUFFIX), x.get(name + TIME_SINCE_SUFFIX), table=table,
            train=train))
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

  def __call__(self, xq, xc, train: bool = False):
    if not self.shared_tables():
      return self.query(xq, train=train), self.candidate(xc), self.temperature()
    c_BxD = self.candidate(xc)  # first: it creates the tables the query tower reads
    return self.query(xq, train=train, shared=self._shared()), c_BxD, self.temperature()

  def embed_queries(self, xq):
    return self.query(xq, shared=self._shared())

  def shared_tables(self) -> tuple[tuple[str, str], ...]:
    """(history feature, candidate feature) of each history that reads the candidate
    tower's table of that feature (``share``)."""
    return tuple((f[0], history_options(f[4])["share"]) for f in self.query.features
                 if f[1] == "history" and history_options(f[4])["share"])

  def has_dropout(self) -> bool:
    return any(f[1] == "history" and history_options(f[4])["dropout"]
               for f in self.query.features)

  def _shared(self) -> dict[str, jax.Array] | None:
    if not self.shared_tables():
      return None
    params = self.candidate.variables["params"]
    return {c: params[c]["embedding"] for _, c in self.shared_tables()}

  def embed_candidates(self, xc):
    return self.candidate(xc)

  def temperature(self) -> jax.Array:
    if not self.learn_temperature:
      return jnp.asarray(self.init_temperature, jnp.float32)
    return jnp.exp(self.log_temperature)

  def sparse_tables(self) -> tuple[sparse.Table, ...]:
    """The tables of ``id`` features: large, so they can be updated sparsely and sharded.
    A candidate table a history shares is left out: the history reads it at rows of its
    own, so it is updated and stored whole."""
    shared = {c for _, c in self.shared_tables()}
    return (tuple(("query", f[0], ("xq",)) for f in self.query.features if f[1] == "id")
            + tuple(("candidate", f[0], ("xc", "extra_xc")) for f in self.candidate.features
                    if f[1] == "id" and f[0] not in shared))


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

  candidate = padded(candidate)
  cand_rows = {f[0]: f[2] for f in candidate}

  def shared_rows(f):  # a history sharing a candidate table has that table's rows
    share = history_options(f[4])["share"] if f[1] == "history" else ""
    if share and share not in cand_rows:
      raise ValueError(f"History {f[0]!r} shares the table of candidate feature {share!r}, "
                       f"which the candidate tower lacks ({sorted(cand_rows)}).")
    return (f[0], f[1], cand_rows[share], f[3], f[4]) if share else f

  return TwoTower(
      query=Tower(features=tuple(shared_rows(f) for f in padded(query)), mlp=tuple(m.mlp),
                  l2_normalize=m.l2_normalize),
      candidate=Tower(features=candidate, mlp=tuple(m.mlp),
                      l2_normalize=m.l2_normalize),
      learn_temperature=m.learn_temperature,
      init_temperature=m.temperature,
  )


def query_tower_params(model: TwoTower, params) -> dict[str, Any]:
  """The query tower's parameters as a standalone ``Tower`` reads them (serving): a history
  sharing a candidate table gets a copy of it as its own item table."""
  out = dict(params["query"])
  for name, share in model.shared_tables():
    out[name] = {**out.get(name, {}),
                 "items": {"embedding": params["candidate"][share]["embedding"]}}
  return out


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
