"""Compressed pseudo-gradient codecs: real wire payloads, exact byte counts.

A codec is a pure, jit-compatible `encode`/`decode` pair over ONE array (a
tensor of a parameter fragment). `encode` returns the payload, a dict of arrays
that is exactly what goes on the wire; `payload_nbytes` counts its bytes, so
bandwidth is measured, never estimated. `decode(payload, shape, dtype)` needs
`shape` and `dtype` static (they travel in the message header, not the payload).

Codecs (`CODEC_NAMES`):

  fp32   identity: {"values": float32[n]}.
  bf16   {"values": bfloat16[n]}.
  fp8    {"values": float8_e4m3fn[n], "scales": float32[1]}, per-tensor
         scale = absmax / 448 (448 is e4m3fn's largest finite value).
  int8   {"values": int8[n], "scales": float32[nb]}: per block q in [-127, 127],
         x̂ = scale * (q / 127) with scale = block absmax (step absmax / 127).
  int4   {"values": uint8[ceil(n/2)], "scales": float32[nb]}: q in [-7, 7],
         x̂ = scale * (q / 7); stored as the nibble q + 8.
  e3m0   {"values": uint8[ceil(n/2)], "scales": float32[nb]}: 4-bit float with
         1 sign bit and 3 exponent bits, no mantissa (Streaming DiLoCo). Nibble
         s·8 + e; x̂ = (-1)^s * scale * 2^-e for e in 0..6 and x̂ = 0 for e = 7,
         scale = block absmax. Levels {0} ∪ ±{2^-6, ..., 2^-1, 1}·scale; rounds
         to the nearest level (ties up): |x - x̂| <= max(|x|/3, scale/128).
  int2   {"values": uint8[ceil(n/4)], "scales": float32[nb]}: 4 symmetric
         levels x̂ = scale * (2c - 3) / 3, c in 0..3, i.e. ±{1/3, 1}·absmax
         (no zero level: with 2 bits, 4 uniform levels beat ternary on error).
  sign   {"values": uint8[ceil(n/8)], "scales": float32[nb]}: bit = (x < 0),
         x̂ = ±scale with scale = the block's mean |x| (signSGD with a scale).
  topk   {"indices": uint8|uint16[nb, k], "values": ...[nb, k] (+ "scales")}:
         per block keeps exactly k = max(1, round(topk_fraction * block_size))
         largest magnitudes (Python's round); index within its block (uint8
         when block_size <= 256); values float32, bfloat16, or int8 with a
         float32 block absmax. An index past its block decodes the block to NaN.

Layout. Arrays are flattened (row-major) and cut into blocks of `block_size`;
the last block is padded with zeros for the scale computation only: value
arrays carry exactly n codes (topk aside, whose padding positions can be kept
but decode to nothing). Sub-byte codes are packed little-end first: element
j of each group of 8 // bits sits at bits [j * bits, (j + 1) * bits) of its
byte; the last byte is zero-padded. So int4 / e3m0 send ceil(n/2) bytes of
values, int2 ceil(n/4), sign ceil(n/8), plus 4 bytes per block of scales.

Scales are float32: a bf16 scale would err by up to 2^-8 relative, as large as
int8's whole half-step (1/254), and would cost only 2 bytes per block less.
Scales are block absmax (mean |x| for sign), so each block's extreme values and
constant blocks round-trip exactly; all-zero blocks get scale 0 and decode to
exact zeros (encode divides by 1 in place of 0, never by 0). The unit levels
(q / 127, 2^-e, ...) are float32 tables, so x̂ = scale * level exactly as
written on every backend. A NaN or inf input makes its whole block (the whole
tensor for fp8; itself for fp32, bf16, topk) decode non-finite, so a receiver's
finiteness check still sees it.

Error feedback (`encode_with_feedback`): x = residual + delta is sent as
encode(x), and the part lost, x - decode(encode(x)), is carried to the next
round, so the decoded sum tracks the true sum of deltas up to one residual.
(How a learner carries it, in the next send or in where it restarts, is
`algorithm/learner.py`'s business.)

References:
  Douillard et al., 2025. Streaming DiLoCo with overlapping communication.
    https://arxiv.org/abs/2501.18512 (4-bit E3M0 pseudo-gradients).
  Sarfi et al., 2025. SparseLoCo: communication-efficient LLM training.
    https://arxiv.org/abs/2508.15706 (top-k with error feedback).
  Thérien et al., 2025. MuLoCo: Muon is a practical inner optimizer for
    DiLoCo. https://arxiv.org/abs/2505.23725 (quantisation, error feedback).
  Karimireddy et al., 2019. Error feedback fixes SignSGD.
    https://arxiv.org/abs/1901.09847
"""

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CODEC_NAMES = ("fp32", "bf16", "fp8", "int8", "int4", "e3m0", "int2", "sign",
               "topk")
TOPK_VALUE_DTYPES = ("fp32", "bf16", "int8")
_FP8_MAX = 448.0  # Largest finite float8_e4m3fn.
# e3m0 decision thresholds on |x| / scale, largest first: |x| below the j-th
# one means exponent code > j. Midpoints between 2^-j and 2^-(j+1) are
# 0.75 * 2^-j; between 2^-6 and 0 it is 2^-7. All exact in float32.
_E3M0_THRESHOLDS = tuple(0.75 * 2.0**-j for j in range(6)) + (2.0**-7,)

Payload = dict[str, jax.Array]


class Codec(NamedTuple):
  """An encode/decode pair over one array; see the module docstring."""
  name: str
  encode: Callable[[jax.Array], Payload]
  decode: Callable[[Payload, tuple[int, ...], Any], jax.Array]


def payload_nbytes(payload) -> int:
  """Exact bytes on the wire of a payload, or of any pytree of payloads.

  Works on arrays and on `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape`).
  """
  return sum(int(math.prod(a.shape)) * np.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(payload))


def encode_tree(codec: Codec, tree) -> Any:
  """Encodes every leaf of `tree`; returns the same tree of payloads."""
  return jax.tree.map(codec.encode, tree)


def decode_tree(codec: Codec, payloads, like_tree) -> Any:
  """Decodes a tree of payloads to the shapes and dtypes of `like_tree`."""
  return jax.tree.map(lambda like, p: codec.decode(p, like.shape, like.dtype),
                      like_tree, payloads)


def encode_with_feedback(codec: Codec, delta: jax.Array,
                         residual: jax.Array | None = None) -> tuple[Payload, jax.Array]:
  """Encodes x = residual + delta (x = delta if no residual).

  Returns (payload, float32 new residual x - decode(payload)).
  """
  x = delta.astype(jnp.float32)
  if residual is not None:
    x = residual.astype(jnp.float32) + x
  payload = codec.encode(x)
  return payload, x - codec.decode(payload, x.shape, jnp.float32)


# ----------------------------------------------------------------- helpers


def _check_floating(x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"The array to encode must be floating point; got dtype {x.dtype}.")


def _to_blocks(flat: jax.Array, block_size: int) -> jax.Array:
  """Zero-pads a 1-D array to whole blocks; returns [num_blocks, block_size]."""
  n = flat.shape[0]
  num_blocks = -(-n // block_size)
  flat = jnp.pad(flat, (0, num_blocks * block_size - n))
  return flat.reshape(num_blocks, block_size)


def _from_blocks(blocks: jax.Array, shape, dtype) -> jax.Array:
  n = math.prod(shape)
  return blocks.reshape(-1)[:n].reshape(shape).astype(dtype)


def _nonzero(scale: jax.Array) -> jax.Array:
  """Scale to divide by: 1 where it is 0 (those blocks are all zeros)."""
  return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def _pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs unsigned `bits`-wide codes (1-D) into bytes, first code lowest."""
  per_byte = 8 // bits
  codes = codes.astype(jnp.uint8)
  codes = jnp.pad(codes, (0, -codes.shape[0] % per_byte))
  shifts = jnp.arange(0, 8, bits, dtype=jnp.uint8)
  # Fields are disjoint, so their sum is their bitwise OR and cannot overflow.
  return jnp.sum(codes.reshape(-1, per_byte) << shifts, axis=-1,
                 dtype=jnp.uint8)


def _unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of `_pack`: the first `n` codes, uint8."""
  shifts = jnp.arange(0, 8, bits, dtype=jnp.uint8)
  codes = (packed[:, None] >> shifts) & jnp.uint8((1 << bits) - 1)
  return codes.reshape(-1)[:n]


# ---------------------------------------------------------- element codecs


def _make_cast(name: str, dtype) -> Codec:
  def encode(x):
    _check_floating(x)
    return {"values": jnp.ravel(x).astype(dtype)}

  def decode(payload, shape, out_dtype):
    return payload["values"].reshape(shape).astype(out_dtype)

  return Codec(name, encode, decode)


def _make_fp8() -> Codec:
  def encode(x):
    _check_floating(x)
    flat = jnp.ravel(x).astype(jnp.float32)
    scale = jnp.max(jnp.abs(flat), initial=0.0) / _FP8_MAX
    scaled = jnp.clip(flat / _nonzero(scale), -_FP8_MAX, _FP8_MAX)
    return {"values": scaled.astype(jnp.float8_e4m3fn),
            "scales": scale.reshape(1)}

  def decode(payload, shape, dtype):
    values = payload["values"].astype(jnp.float32) * payload["scales"][0]
    return values.reshape(shape).astype(dtype)

  return Codec("fp8", encode, decode)


# ------------------------------------------------------------ block codecs
# Each is (bits, scale_fn, to_codes, levels): `to_codes` maps x / scale (in
# [-1, 1]) to codes; `levels[code]` (float32, built here in numpy) maps a code
# back, so x̂ = levels[code] * scale. A table, not arithmetic, because XLA
# rewrites `q / 7` as `q * (1 / 7)`, which is not the correctly rounded level.


def _absmax(blocks, n):
  del n
  return jnp.max(jnp.abs(blocks), axis=1)


def _mean_abs(blocks, n):
  num_blocks, block_size = blocks.shape
  valid = jnp.clip(n - block_size * jnp.arange(num_blocks), 1, block_size)
  absmax = _absmax(blocks, n)
  # Averaging |x| / absmax (then scaling back) is exact for constant blocks.
  relative = jnp.abs(blocks) / _nonzero(absmax)[:, None]
  return absmax * (jnp.sum(relative, axis=1) / valid.astype(jnp.float32))


def _int_codec(qmax: int):
  """Symmetric grid q in [-qmax, qmax]: int8 as is, int4 as nibble q + 8."""
  offset = 0 if qmax == 127 else qmax + 1
  codes = np.arange(256 if offset == 0 else 16)
  q = codes - offset if offset else np.where(codes < 128, codes, codes - 256)
  levels = q.astype(np.float32) / np.float32(qmax)

  def to_codes(u):
    q = jnp.clip(jnp.round(u * qmax), -qmax, qmax)
    return (q + offset).astype(jnp.int8 if offset == 0 else jnp.uint8)

  return to_codes, levels


def _int2_to_codes(u):
  return jnp.clip(jnp.round((3.0 * u + 3.0) / 2.0), 0, 3).astype(jnp.uint8)


_INT2_LEVELS = (2 * np.arange(4, dtype=np.float32) - 3) / np.float32(3)


def _e3m0_to_codes(u):
  mag = jnp.abs(u)
  exponent = jnp.sum(mag[..., None] < jnp.asarray(_E3M0_THRESHOLDS), axis=-1)
  sign = (u < 0) & (exponent < 7)  # Zero is sent as +0.
  return (sign.astype(jnp.uint8) << 3) | exponent.astype(jnp.uint8)


_E3M0_LEVELS = np.array(
    [(-1.0)**(c >> 3) * (2.0**-(c & 7) if c & 7 < 7 else 0.0)
     for c in range(16)], np.float32)


def _sign_to_codes(u):
  return (u < 0).astype(jnp.uint8)


_SIGN_LEVELS = np.array([1.0, -1.0], np.float32)


def _make_block(name, block_size, bits, scale_fn, to_codes, levels):
  def encode(x):
    _check_floating(x)
    flat = jnp.ravel(x).astype(jnp.float32)
    n = flat.shape[0]
    blocks = _to_blocks(flat, block_size)
    scales = scale_fn(blocks, n)
    codes = to_codes(blocks / _nonzero(scales)[:, None]).reshape(-1)[:n]
    values = codes if bits == 8 else _pack(codes, bits)
    return {"values": values, "scales": scales}

  def decode(payload, shape, dtype):
    n = math.prod(shape)
    codes = payload["values"]
    codes = codes.astype(jnp.uint8) if bits == 8 else _unpack(codes, bits, n)
    unit = _to_blocks(jnp.asarray(levels)[codes], block_size)
    return _from_blocks(unit * payload["scales"][:, None], shape, dtype)

  return Codec(name, encode, decode)


def _make_topk(block_size: int, fraction: float, values_dtype: str) -> Codec:
  k = max(1, round(fraction * block_size))
  index_dtype = jnp.uint8 if block_size <= 256 else jnp.uint16
  quantize, int8_levels = _int_codec(127)

  def encode(x):
    _check_floating(x)
    blocks = _to_blocks(jnp.ravel(x).astype(jnp.float32), block_size)
    _, indices = jax.lax.top_k(jnp.abs(blocks), k)
    kept = jnp.take_along_axis(blocks, indices, axis=1)
    payload = {"indices": indices.astype(index_dtype)}
    if values_dtype == "int8":
      scales = jnp.max(jnp.abs(kept), axis=1)
      payload["values"] = quantize(kept / _nonzero(scales)[:, None])
      payload["scales"] = scales
    else:
      payload["values"] = kept.astype(
          jnp.float32 if values_dtype == "fp32" else jnp.bfloat16)
    return payload

  def decode(payload, shape, dtype):
    num_blocks = -(-math.prod(shape) // block_size)
    kept = payload["values"]
    if values_dtype == "int8":
      unit = jnp.asarray(int8_levels)[kept.astype(jnp.uint8)]
      kept = unit * payload["scales"][:, None]
    rows = jnp.arange(num_blocks)[:, None]
    blocks = jnp.zeros((num_blocks, block_size), jnp.float32)
    indices = payload["indices"].astype(jnp.int32)
    blocks = blocks.at[rows, indices].set(kept.astype(jnp.float32), unique_indices=True)
    # An index past its block (only a corrupted or hostile payload has one)
    # makes the block non-finite, so the receiver's finiteness check rejects it.
    outside = jnp.any(indices >= block_size, axis=1, keepdims=True)
    return _from_blocks(jnp.where(outside, jnp.nan, blocks), shape, dtype)

  return Codec("topk", encode, decode)


@functools.lru_cache(maxsize=None)  # One object per setting: jit caches hit across runs.
def make_codec(name: str, *, block_size: int = 256,
               topk_fraction: float = 0.01, topk_values: str = "fp32") -> Codec:
  """Builds the codec called `name`; see the module docstring for formats.

  Args:
    name: one of `CODEC_NAMES`.
    block_size: elements per scale block (int8, int4, e3m0, int2, sign) and
      per top-k block (topk, at most 65536 so indices fit in uint16).
    topk_fraction: share of each block topk keeps, in (0, 1].
    topk_values: how topk sends kept values: "fp32", "bf16" or "int8".

  Returns:
    A `Codec`.

  Raises:
    ValueError: for an unknown name or an out-of-range option.
  """
  if name not in CODEC_NAMES:
    raise ValueError(f"Unknown codec name {name!r}; allowed: "
                     f"{', '.join(CODEC_NAMES)}.")
  # Option errors start with `option=value`, so a config can prefix its section.
  if (isinstance(block_size, bool) or not isinstance(block_size, int)
      or block_size < 1):
    raise ValueError(f"block_size={block_size!r} must be a positive int.")
  if name == "topk" and block_size > 65536:
    raise ValueError(f"block_size={block_size} must be at most 65536 for topk "
                     f"(indices are uint16).")
  if not 0.0 < topk_fraction <= 1.0:
    raise ValueError(f"topk_fraction={topk_fraction!r} must be in (0, 1].")
  if topk_values not in TOPK_VALUE_DTYPES:
    raise ValueError(f"topk_values={topk_values!r} must be one of "
                     f"{', '.join(TOPK_VALUE_DTYPES)}.")

  if name == "fp32":
    return _make_cast(name, jnp.float32)
  if name == "bf16":
    return _make_cast(name, jnp.bfloat16)
  if name == "fp8":
    return _make_fp8()
  if name == "topk":
    return _make_topk(block_size, topk_fraction, topk_values)
  bits, scale_fn, to_codes, levels = {
      "int8": (8, _absmax, *_int_codec(127)),
      "int4": (4, _absmax, *_int_codec(7)),
      "e3m0": (4, _absmax, _e3m0_to_codes, _E3M0_LEVELS),
      "int2": (2, _absmax, _int2_to_codes, _INT2_LEVELS),
      "sign": (1, _mean_abs, _sign_to_codes, _SIGN_LEVELS),
  }[name]
  return _make_block(name, block_size, bits, scale_fn, to_codes, levels)


EXACT = make_codec("fp32")  # How full copies of fragments travel (lossless).
