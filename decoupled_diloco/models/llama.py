"""A Llama-style dense decoder (flax linen): RMSNorm, RoPE, SwiGLU, GQA.

Shapes are named in variables: B batch, L length (T for key positions when
both appear), D width, H heads, G kv heads, R query heads per kv head (H / G),
K head width, F mlp width, V vocab.

Every parameter carries logical axis names drawn from "vocab", "embed",
"heads", "kv_heads", "head_dim", "mlp" and "norm"; `param_axes` reads them
back without allocating anything.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoupled_diloco.models import compiled

_part = nn.with_logical_partitioning
_embed_init = nn.initializers.normal(0.02)
_kernel_init = nn.linear.default_kernel_init


class RMSNorm(nn.Module):
  """Scales x by the inverse root mean square of its last axis, then a learned scale."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _part(nn.initializers.ones, ("norm",)), (x.shape[-1],))
    x = x.astype(jnp.float32)  # bf16 rounds the mean of squares too coarsely.
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return (x * scale).astype(self.dtype)


def apply_rope(x_BxLxHxK, theta: float):
  """Rotates the pair (x[k], x[k + K/2]) at position l by angle l * theta^(-2k/K).

  References:
    Su et al., RoFormer, https://arxiv.org/abs/2104.09864
  """
  _, length, _, head_dim = x_BxLxHxK.shape
  inv_freq_K2 = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angle_Lx1xK2 = (jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_K2)[:, None, :]
  cos, sin = jnp.cos(angle_Lx1xK2), jnp.sin(angle_Lx1xK2)
  x1_BxLxHxK2, x2_BxLxHxK2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  rotated_BxLxHxK = jnp.concatenate(
      [x1_BxLxHxK2 * cos - x2_BxLxHxK2 * sin, x2_BxLxHxK2 * cos + x1_BxLxHxK2 * sin], axis=-1)
  return rotated_BxLxHxK.astype(x_BxLxHxK.dtype)


class Attention(nn.Module):
  """Causal grouped-query attention: G kv heads, each shared by R = H / G query heads."""
  c: object

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.c
    if c.d_model % c.num_heads or c.num_heads % c.num_kv_heads:
      raise ValueError(f"num_heads ({c.num_heads}) must divide d_model ({c.d_model}) and "
                       f"num_kv_heads ({c.num_kv_heads}) must divide num_heads.")
    dtype, head_dim = jnp.dtype(c.dtype), c.d_model // c.num_heads
    if head_dim % 2:
      raise ValueError(f"d_model / num_heads ({head_dim}) must be even for rotary embeddings.")
    groups = c.num_heads // c.num_kv_heads

    def proj(heads, axis_name, name):
      return nn.DenseGeneral(
          (heads, head_dim), use_bias=False, dtype=dtype, name=name,
          kernel_init=_part(_kernel_init, ("embed", axis_name, "head_dim")))

    q_BxLxHxK = proj(c.num_heads, "heads", "query")(x_BxLxD)
    k_BxTxGxK = proj(c.num_kv_heads, "kv_heads", "key")(x_BxLxD)
    v_BxTxGxK = proj(c.num_kv_heads, "kv_heads", "value")(x_BxLxD)
    if c.qk_norm:
      q_BxLxHxK = RMSNorm(dtype, name="query_norm")(q_BxLxHxK)
      k_BxTxGxK = RMSNorm(dtype, name="key_norm")(k_BxTxGxK)
    q_BxLxHxK = apply_rope(q_BxLxHxK, c.rope_theta)
    k_BxTxGxK = apply_rope(k_BxTxGxK, c.rope_theta)

    # Query head h = g * R + r reads kv head g.
    batch, length = x_BxLxD.shape[:2]
    q_BxLxGxRxK = q_BxLxHxK.reshape(batch, length, c.num_kv_heads, groups, head_dim)
    scores_BxGxRxLxT = jnp.einsum("blgrk,btgk->bgrlt", q_BxLxGxRxK, k_BxTxGxK)
    scores_BxGxRxLxT = scores_BxGxRxLxT.astype(jnp.float32) / jnp.sqrt(head_dim)
    causal_LxT = jnp.tril(jnp.ones((length, length), bool))
    scores_BxGxRxLxT = jnp.where(causal_LxT, scores_BxGxRxLxT, jnp.finfo(jnp.float32).min)
    probs_BxGxRxLxT = jax.nn.softmax(scores_BxGxRxLxT, axis=-1).astype(dtype)
    out_BxLxGxRxK = jnp.einsum("bgrlt,btgk->blgrk", probs_BxGxRxLxT, v_BxTxGxK)
    out_BxLxHxK = out_BxLxGxRxK.reshape(batch, length, c.num_heads, head_dim)
    return nn.DenseGeneral(
        c.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, name="out",
        kernel_init=_part(_kernel_init, ("heads", "head_dim", "embed")))(out_BxLxHxK)


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)).

  References:
    Shazeer, GLU Variants Improve Transformer, https://arxiv.org/abs/2002.05202
  """
  c: object

  @nn.compact
  def __call__(self, x_BxLxD):
    c, dtype = self.c, jnp.dtype(self.c.dtype)
    dense = lambda features, names, name: nn.Dense(
        features, use_bias=False, dtype=dtype, name=name, kernel_init=_part(_kernel_init, names))
    gate_BxLxF = dense(c.mlp_dim, ("embed", "mlp"), "gate")(x_BxLxD)
    up_BxLxF = dense(c.mlp_dim, ("embed", "mlp"), "up")(x_BxLxD)
    return dense(c.d_model, ("mlp", "embed"), "down")(nn.silu(gate_BxLxF) * up_BxLxF)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  c: object

  @nn.compact
  def __call__(self, x_BxLxD):
    dtype = jnp.dtype(self.c.dtype)
    x_BxLxD = x_BxLxD + Attention(self.c, name="attn")(RMSNorm(dtype, name="attn_norm")(x_BxLxD))
    return x_BxLxD + Mlp(self.c, name="mlp")(RMSNorm(dtype, name="mlp_norm")(x_BxLxD))


class Llama(nn.Module):
  """Maps tokens [B, L] to next-token logits [B, L, V] (float32); params stay float32.

  `c` is any object with vocab_size, seq_len, num_layers, d_model, num_heads,
  num_kv_heads, mlp_dim, tie_embeddings, qk_norm, rope_theta and dtype.

  References:
    Touvron et al., Llama 2, https://arxiv.org/abs/2307.09288
  """
  c: object

  @nn.compact
  def __call__(self, tokens_BxL):
    embed = make_embed(self.c)
    x_BxLxD = embed(tokens_BxL)
    for i in range(self.c.num_layers):
      x_BxLxD = Block(self.c, name=f"block_{i}")(x_BxLxD)
    return logits(self.c, embed, x_BxLxD)


def make_embed(c) -> nn.Embed:
  """The token embedding, `embed` in the calling module (the tied head too)."""
  return nn.Embed(c.vocab_size, c.d_model, dtype=jnp.dtype(c.dtype), name="embed",
                  embedding_init=_part(_embed_init, ("vocab", "embed")))


def logits(c, embed: nn.Embed, x_BxLxD):
  """`final_norm`, then the head (`embed` tied, or `head`): float32 logits [B, L, V].

  Called inside a compact module, whose parameters these become.
  """
  dtype = jnp.dtype(c.dtype)
  x_BxLxD = RMSNorm(dtype, name="final_norm")(x_BxLxD)
  if c.tie_embeddings:
    logits_BxLxV = embed.attend(x_BxLxD)
  else:
    logits_BxLxV = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, name="head",
                            kernel_init=_part(_embed_init, ("embed", "vocab")))(x_BxLxD)
  return logits_BxLxV.astype(jnp.float32)


def _boxed_init(c, rng):
  return Llama(c).init(rng, jnp.zeros((1, c.seq_len), jnp.int32))["params"]


def init_params(c, rng: jax.Array):
  """Initial parameters as plain float32 arrays, in one compiled program."""
  return compiled.init(_boxed_init, c, rng)


def param_axes(c):
  """The logical axis names of each parameter: a tree like `init_params`'s, tuples as leaves.

  Tuples are pytree nodes, so map over it with `is_leaf=lambda x: isinstance(x, tuple)`.
  """
  return compiled.axes(_boxed_init, c)
