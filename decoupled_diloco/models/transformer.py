"""A pre-norm, decoder-only transformer over bytes (flax linen).

Shapes are named in variables: B batch, L sequence, D model width, H heads,
K head width, F MLP width, V vocabulary.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoupled_diloco.config import ModelConfig
from decoupled_diloco.models import compiled


class Block(nn.Module):
  c: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.c
    dtype = jnp.dtype(c.dtype)
    h_BxLxD = nn.LayerNorm(dtype=dtype, name="attn_norm")(x_BxLxD)
    h_BxLxD = nn.MultiHeadDotProductAttention(
        num_heads=c.num_heads, dtype=dtype, use_bias=False, name="attn")(
            h_BxLxD, mask=nn.make_causal_mask(jnp.ones(x_BxLxD.shape[:2])))
    x_BxLxD = x_BxLxD + h_BxLxD
    h_BxLxD = nn.LayerNorm(dtype=dtype, name="mlp_norm")(x_BxLxD)
    h_BxLxF = nn.gelu(nn.Dense(c.mlp_dim, dtype=dtype, name="mlp_in")(h_BxLxD))
    return x_BxLxD + nn.Dense(c.d_model, dtype=dtype, name="mlp_out")(h_BxLxF)


class Transformer(nn.Module):
  """Maps tokens [B, L] to next-token logits [B, L, V]."""
  c: ModelConfig

  @nn.compact
  def __call__(self, y_BxL):
    c = self.c
    dtype = jnp.dtype(c.dtype)
    init = nn.initializers.normal(0.02)
    x_BxLxD = nn.Embed(c.vocab_size, c.d_model, embedding_init=init, name="embed")(y_BxL)
    pos_LxD = self.param("pos_embed", init, (c.seq_len, c.d_model))
    x_BxLxD = (x_BxLxD + pos_LxD[None, :y_BxL.shape[1]]).astype(dtype)
    for i in range(c.num_layers):
      x_BxLxD = Block(c, name=f"block_{i}")(x_BxLxD)
    x_BxLxD = nn.LayerNorm(dtype=dtype, name="final_norm")(x_BxLxD)
    logits_BxLxV = nn.Dense(c.vocab_size, dtype=dtype, kernel_init=init, name="head")(x_BxLxD)
    return logits_BxLxV.astype(jnp.float32)


def _init(c: ModelConfig, rng: jax.Array):
  return Transformer(c).init(rng, jnp.zeros((1, c.seq_len), jnp.int32))["params"]


def init_params(c: ModelConfig, rng: jax.Array):
  """Initial parameters, in one compiled program (not one per initializer)."""
  return compiled.init(_init, c, rng)


_AXES = {  # Logical axis names by (module, parameter) name.
    ("embed", "embedding"): ("vocab", "embed"), ("pos_embed", "pos_embed"): ("length", "embed"),
    ("query", "kernel"): ("embed", "heads", "head_dim"),
    ("key", "kernel"): ("embed", "heads", "head_dim"),
    ("value", "kernel"): ("embed", "heads", "head_dim"),
    ("out", "kernel"): ("heads", "head_dim", "embed"),
    ("mlp_in", "kernel"): ("embed", "mlp"), ("mlp_in", "bias"): ("mlp",),
    ("mlp_out", "kernel"): ("mlp", "embed"), ("mlp_out", "bias"): ("embed",),
    ("head", "kernel"): ("embed", "vocab"), ("head", "bias"): ("vocab",),
}


def param_axes(c: ModelConfig):
  """Logical axis names of every parameter (a tree like `init_params`'), by name."""
  def names(path, _):
    keys = [k.key for k in path]
    module = keys[-2] if len(keys) > 1 else keys[0]
    return ("norm",) if "norm" in module else _AXES[(module, keys[-1])]
  return jax.tree_util.tree_map_with_path(names, compiled.shapes(_init, c))
