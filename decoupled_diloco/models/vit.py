"""A small pre-norm vision transformer (flax linen), after big_vision's ViT.

Images are cut into patches by a strided convolution, the patch tokens get a
position embedding (learned, or a fixed 2-D sin/cos grid), an encoder of
pre-norm blocks mixes them, and one token (a learned class token) or the mean
of all tokens feeds a zero-initialised linear head.

Shapes are named in variables: B batch, H and W image height and width, C
image channels, G patch grid side, N patch tokens (G * G), T tokens the
encoder sees (N, plus one for a class token), D model width, F MLP width,
K classes.

Every parameter carries logical axis names ("embed", "heads", "head_dim",
"mlp", "patch", "classes"; None for axes never split); `param_axes` reads
them without allocating anything.

References:
  Dosovitskiy et al., An Image is Worth 16x16 Words, 2020.
  https://arxiv.org/abs/2010.11929
  Beyer et al., Better plain ViT baselines for ImageNet-1k, 2022.
  https://arxiv.org/abs/2205.01580
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from decoupled_diloco.models import compiled

POOLS = ("cls", "mean")
POSEMBS = ("learned", "sincos")


def _axes(init, *names):
  return nn.with_logical_partitioning(init, names)


def check(c: Any):
  """Raises ValueError, naming the field, when `c` cannot describe a ViT."""
  if c.pool not in POOLS:
    raise ValueError(f"model.pool={c.pool!r} must be one of {POOLS}.")
  if c.posemb not in POSEMBS:
    raise ValueError(f"model.posemb={c.posemb!r} must be one of {POSEMBS}.")
  if c.image_size % c.patch_size:
    raise ValueError(f"model.patch_size={c.patch_size} must divide"
                     f" model.image_size={c.image_size}.")
  if c.d_model % c.num_heads:
    raise ValueError(f"model.d_model={c.d_model} must be divisible by"
                     f" model.num_heads={c.num_heads}.")
  if c.posemb == "sincos" and c.d_model % 4:
    raise ValueError(f"model.d_model={c.d_model} must be a multiple of 4 for"
                     " model.posemb='sincos' (sin and cos of rows and columns).")


def posemb_sincos_2d(grid: int, width: int) -> np.ndarray:
  """Fixed position codes [G * G, width]: sin and cos of row, then of column.

  Each quarter of the width holds one of sin(row), cos(row), sin(col),
  cos(col) at width / 4 frequencies spaced geometrically from 1 to 1/10000.
  """
  rows_N, cols_N = [a.reshape(-1) for a in np.mgrid[:grid, :grid]]
  freq_Q = 1.0 / 10_000 ** (np.arange(width // 4) / (width // 4))
  row_NxQ, col_NxQ = np.outer(rows_N, freq_Q), np.outer(cols_N, freq_Q)
  codes = [np.sin(row_NxQ), np.cos(row_NxQ), np.sin(col_NxQ), np.cos(col_NxQ)]
  return np.concatenate(codes, axis=1).astype(np.float32)


class Mlp(nn.Module):
  """Dense, GELU, dense: the feed-forward half of a block."""
  c: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.c
    dtype = jnp.dtype(c.dtype)
    init = nn.initializers.xavier_uniform()
    bias = nn.initializers.normal(1e-6)
    h_BxTxF = nn.Dense(c.mlp_dim, dtype=dtype, kernel_init=_axes(init, "embed", "mlp"),
                       bias_init=_axes(bias, "mlp"), name="mlp_in")(x_BxTxD)
    return nn.Dense(c.d_model, dtype=dtype, kernel_init=_axes(init, "mlp", "embed"),
                    bias_init=_axes(bias, "embed"), name="mlp_out")(nn.gelu(h_BxTxF))


class Block(nn.Module):
  """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""
  c: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.c
    dtype = jnp.dtype(c.dtype)
    norm = dict(dtype=dtype, scale_init=_axes(nn.initializers.ones, "embed"),
                bias_init=_axes(nn.initializers.zeros, "embed"))
    init, zeros = nn.initializers.xavier_uniform(), nn.initializers.zeros
    h_BxTxD = nn.LayerNorm(**norm, name="attn_norm")(x_BxTxD)
    x_BxTxD = x_BxTxD + nn.MultiHeadDotProductAttention(
        num_heads=c.num_heads, dtype=dtype,
        kernel_init=_axes(init, "embed", "heads", "head_dim"),
        bias_init=_axes(zeros, "heads", "head_dim"),
        out_kernel_init=_axes(init, "heads", "head_dim", "embed"),
        out_bias_init=_axes(zeros, "embed"), name="attn")(h_BxTxD)
    h_BxTxD = nn.LayerNorm(**norm, name="mlp_norm")(x_BxTxD)
    return x_BxTxD + Mlp(c, name="mlp")(h_BxTxD)


class ViT(nn.Module):
  """Maps images [B, H, W, C] to class logits [B, K] (float32).

  Attributes:
    c: any object with image_size, channels, patch_size, num_classes,
      num_layers, d_model, num_heads, mlp_dim, pool ("cls" or "mean"), posemb
      ("learned" or "sincos") and dtype ("float32" or "bfloat16": the compute
      dtype; parameters stay float32).
  """
  c: Any

  @nn.compact
  def __call__(self, images_BxHxWxC):
    c = self.c
    check(c)
    dtype = jnp.dtype(c.dtype)
    p = c.patch_size
    x_BxGxGxD = nn.Conv(
        c.d_model, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
        kernel_init=_axes(nn.initializers.lecun_normal(), None, None, None, "embed"),
        bias_init=_axes(nn.initializers.zeros, "embed"), name="embed")(images_BxHxWxC)
    b, g, _, d = x_BxGxGxD.shape
    x_BxNxD = x_BxGxGxD.reshape(b, g * g, d)
    if c.posemb == "learned":
      pos_NxD = self.param("pos_embed", _axes(nn.initializers.normal(d ** -0.5), "patch", "embed"),
                           (g * g, d))
    else:
      pos_NxD = jnp.asarray(posemb_sincos_2d(g, d))
    x_BxTxD = (x_BxNxD + pos_NxD[None]).astype(dtype)
    if c.pool == "cls":
      # Added after the position codes: the class token has no position.
      cls_D = self.param("cls", _axes(nn.initializers.zeros, "embed"), (d,))
      cls_Bx1xD = jnp.broadcast_to(cls_D.astype(dtype), (b, 1, d))
      x_BxTxD = jnp.concatenate([cls_Bx1xD, x_BxTxD], axis=1)
    for i in range(c.num_layers):
      x_BxTxD = Block(c, name=f"block_{i}")(x_BxTxD)
    x_BxTxD = nn.LayerNorm(dtype=dtype, scale_init=_axes(nn.initializers.ones, "embed"),
                           bias_init=_axes(nn.initializers.zeros, "embed"),
                           name="final_norm")(x_BxTxD)
    x_BxD = x_BxTxD[:, 0] if c.pool == "cls" else x_BxTxD.mean(axis=1)
    # A zero head starts every class at the same logit, as big_vision does.
    logits_BxK = nn.Dense(c.num_classes, dtype=dtype,
                          kernel_init=_axes(nn.initializers.zeros, "embed", "classes"),
                          bias_init=_axes(nn.initializers.zeros, "classes"), name="head")(x_BxD)
    return logits_BxK.astype(jnp.float32)


def _init_boxed(c: Any, rng: jax.Array):
  images = jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32)
  return ViT(c).init(rng, images)["params"]


def init_params(c: Any, rng: jax.Array):
  """Initial parameters (plain arrays, no axis boxes), in one compiled program."""
  check(c)
  return compiled.init(_init_boxed, c, rng)


def param_axes(c: Any):
  """Logical axis names per parameter: a tuple (None for unnamed axes) per leaf.

  Same tree structure as `init_params(c, rng)` when each tuple is taken as a
  leaf; computed from shapes alone (jax.eval_shape), nothing is allocated.
  """
  check(c)
  return compiled.axes(_init_boxed, c)
