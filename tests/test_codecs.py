"""Tests for algorithm/codecs.py: bounds, bytes, packing, error feedback."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoupled_diloco.algorithm import codecs

EPS32 = 2.0**-23  # float32 machine epsilon.
# Float32 rounding inside encode (x / scale, * qmax) and decode (q / qmax,
# * scale) moves x̂ by at most a few ulps of the block scale; 2^-21 * scale is
# four ulps' worth, i.e. 2x the worst case worked out from 2^-24 per operation.
ARITH = 4 * EPS32


def _blocky(n, block_size, seed=0):
  """Gaussian values whose blocks span magnitudes 1e-3 .. 1e3."""
  key_x, key_m = jax.random.split(jax.random.key(seed))
  x = np.asarray(jax.random.normal(key_x, (n,)), np.float64)
  nb = -(-n // block_size)
  exponents = jax.random.uniform(key_m, (nb,), minval=-3, maxval=3)
  mags = 10.0 ** np.asarray(exponents, np.float64)
  return (x * np.repeat(mags, block_size)[:n]).astype(np.float32)


def _roundtrip(codec, x, dtype=jnp.float32):
  """Jitted encode and decode (one compile each, faster than op by op)."""
  payload = jax.jit(codec.encode)(jnp.asarray(x))
  decode = jax.jit(codec.decode, static_argnums=(1, 2))
  return payload, np.asarray(decode(payload, np.shape(x), dtype))


def _per_element(scales, block_size, n):
  return np.repeat(np.asarray(scales, np.float64), block_size)[:n]


# ------------------------------------------------------------- arguments


def test_unknown_name_raises_naming_it():
  with pytest.raises(ValueError, match=r"Unknown codec name 'int3'.*int4"):
    codecs.make_codec("int3")


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=-4), "block_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(block_size=True), "block_size"),
    (dict(topk_fraction=0.0), "topk_fraction"),
    (dict(topk_fraction=1.5), "topk_fraction"),
    (dict(topk_values="fp16"), "topk_values"),
    (dict(block_size=70000), "block_size"),
])
def test_bad_options_raise_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    codecs.make_codec("topk", **kwargs)


def test_integer_input_is_rejected():
  with pytest.raises(ValueError, match="floating"):
    codecs.make_codec("int8").encode(jnp.arange(4))


# ------------------------------------------------------------ exact bytes


@pytest.mark.parametrize("name, kwargs, expected", [
    # n = 1001, block 256: 4 blocks, 4 float32 scales = 16 bytes.
    ("fp32", {}, 4 * 1001),
    ("bf16", {}, 2 * 1001),
    ("fp8", {}, 1001 + 4),
    ("int8", {}, 1001 + 16),
    ("int4", {}, 501 + 16),  # ceil(1001 / 2) bytes of nibbles.
    ("e3m0", {}, 501 + 16),
    ("int2", {}, 251 + 16),  # ceil(1001 / 4).
    ("sign", {}, 126 + 16),  # ceil(1001 / 8).
    # k = round(0.01 * 256) = 3 per block: 12 uint8 indices + 12 values.
    ("topk", {}, 12 * (1 + 4)),
    ("topk", dict(topk_values="bf16"), 12 * (1 + 2)),
    ("topk", dict(topk_values="int8"), 12 * (1 + 1) + 16),
    # block 512: 2 blocks, k = round(5.12) = 5, uint16 indices.
    ("topk", dict(block_size=512), 10 * (2 + 4)),
])
def test_payload_nbytes_is_exact(name, kwargs, expected):
  codec = codecs.make_codec(name, **kwargs)
  x = jnp.ones((7, 143), jnp.float32)  # n = 1001.
  assert codecs.payload_nbytes(codec.encode(x)) == expected
  assert codecs.payload_nbytes(jax.eval_shape(codec.encode, x)) == expected


def test_payload_nbytes_sums_a_tree_of_payloads():
  codec = codecs.make_codec("int4", block_size=16)
  tree = {"w": jnp.ones((4, 8)), "b": jnp.ones((3,))}
  payloads = jax.eval_shape(lambda t: codecs.encode_tree(codec, t), tree)
  # w: 16 bytes of nibbles + 2 scales; b: 2 bytes + 1 scale.
  assert codecs.payload_nbytes(payloads) == (
      16 + 8 + 2 + 4)


# -------------------------------------------------------- hand-made layouts


def test_int4_packs_two_nibbles_per_byte_low_first():
  codec = codecs.make_codec("int4", block_size=8)
  x = np.array([7, -7, 3, 0, 1, -2], np.float32)  # absmax 7: q = x.
  payload, y = _roundtrip(codec, x)
  # Nibbles q + 8 = 15, 1, 11, 8, 9, 6.
  np.testing.assert_array_equal(payload["values"], [15 | 1 << 4, 11 | 8 << 4,
                                                    9 | 6 << 4])
  np.testing.assert_array_equal(payload["scales"], [7.0])
  q = x.astype(np.float32)  # x̂ = scale * (q / 7), each op rounded to float32.
  np.testing.assert_array_equal(y, np.float32(7) * (q / np.float32(7)))


def test_int2_packs_four_codes_per_byte():
  codec = codecs.make_codec("int2", block_size=8)
  x = np.array([3, -3, 1, -1, 3], np.float32)  # Levels ±1, ±3 of scale 3.
  payload, y = _roundtrip(codec, x)
  # Codes c with x̂ = 3 (2c - 3) / 3: 3, 0, 2, 1 | 3.
  np.testing.assert_array_equal(payload["values"],
                                [3 | 0 << 2 | 2 << 4 | 1 << 6, 3])
  np.testing.assert_array_equal(y, x)


def test_sign_packs_eight_bits_per_byte_with_mean_abs_scale():
  codec = codecs.make_codec("sign", block_size=16)
  x = np.array([1, -2, 3, 0, -4, 5, 6, -7, 8], np.float32)
  payload, y = _roundtrip(codec, x)
  np.testing.assert_array_equal(payload["values"], [2 + 16 + 128, 0])
  np.testing.assert_array_equal(payload["scales"], [36.0 / 9])  # Mean |x|.
  np.testing.assert_array_equal(y, np.where(x < 0, -4.0, 4.0))


def test_e3m0_levels_and_rounding():
  codec = codecs.make_codec("e3m0", block_size=32)
  x = np.array([1, -0.5, 0.25, 0.125, 2**-4, 2**-5, 2**-6, 0,
                0.76, 0.74, 0.3, -0.0079, 2**-7, 0.0077], np.float32)
  expected = np.array([1, -0.5, 0.25, 0.125, 2**-4, 2**-5, 2**-6, 0,
                       1, 0.5, 0.25, -2**-6, 2**-6, 0], np.float32)
  payload, y = _roundtrip(codec, x)
  np.testing.assert_array_equal(y, expected)
  # Nibble sign * 8 + e: 1 -> 0, -0.5 -> 9, 0.25 -> 2, 0.125 -> 3, 0 -> 7.
  np.testing.assert_array_equal(
      payload["values"][:4], [0 | 9 << 4, 2 | 3 << 4, 4 | 5 << 4, 6 | 7 << 4])


# --------------------------------------------------------- error bounds


@pytest.mark.parametrize("name, qmax", [("int8", 127), ("int4", 7)])
def test_int_error_is_at_most_half_a_step(name, qmax):
  n, block_size = 5000, 128
  x = _blocky(n, block_size)
  payload, y = _roundtrip(codecs.make_codec(name, block_size=block_size), x)
  scale = _per_element(payload["scales"], block_size, n)
  absmax = _per_element(np.abs(np.pad(x, (0, -n % block_size)))
                        .reshape(-1, block_size).max(1), block_size, n)
  np.testing.assert_array_equal(scale, absmax)
  err = np.abs(x.astype(np.float64) - y)
  assert np.all(err <= scale / qmax / 2 + ARITH * scale)
  # The bound is tight: some element sits nearly half a step away.
  assert np.max(err / (scale / qmax)) > 0.45


def test_e3m0_error_bound():
  n, block_size = 5000, 64
  x = _blocky(n, block_size)
  payload, y = _roundtrip(codecs.make_codec("e3m0", block_size=block_size), x)
  scale = _per_element(payload["scales"], block_size, n)
  err = np.abs(x.astype(np.float64) - y)
  assert np.all(err <= np.maximum(np.abs(x) / 3, scale / 128) + ARITH * scale)


def test_int2_and_sign_error_bounds():
  n, block_size = 5000, 64
  x = _blocky(n, block_size)
  payload, y = _roundtrip(codecs.make_codec("int2", block_size=block_size), x)
  scale = _per_element(payload["scales"], block_size, n)
  assert np.all(np.abs(x - y) <= scale / 3 + ARITH * scale)  # Half of 2/3.
  payload, y = _roundtrip(codecs.make_codec("sign", block_size=block_size), x)
  scale = _per_element(payload["scales"], block_size, n)
  np.testing.assert_array_equal(np.abs(y), scale.astype(np.float32))
  np.testing.assert_array_equal(np.signbit(y), np.signbit(x))


def test_bf16_relative_bound():
  x = _blocky(5000, 64)
  _, y = _roundtrip(codecs.make_codec("bf16"), x)
  # 8 significant bits: round-to-nearest errs by at most 2^-8 relative.
  assert np.all(np.abs(x.astype(np.float64) - y) <= 2.0**-8 * np.abs(x))


def test_fp8_bound_with_per_tensor_scale():
  x = _blocky(5000, 64)
  payload, y = _roundtrip(codecs.make_codec("fp8"), x)
  scale = float(payload["scales"][0])
  assert scale == np.float32(np.abs(x).max()) / np.float32(448)
  # e4m3: 4 significant bits (2^-4 relative) down to 2^-6, then subnormal
  # spacing 2^-9 (half: 2^-10) in units of the scale; plus the float32 ops.
  err = np.abs(x.astype(np.float64) - y)
  assert np.all(err <= (2.0**-4 + ARITH) * np.abs(x) + 2.0**-10 * scale)


# ------------------------------------------------------------------ top-k


@pytest.mark.parametrize("block_size, index_dtype", [(64, np.uint8),
                                                     (512, np.uint16)])
def test_topk_keeps_exactly_the_k_largest_per_block(block_size, index_dtype):
  n = 7 * block_size + 40  # Partial last block with more than k entries.
  x = np.asarray(jax.random.normal(jax.random.key(3), (n,)), np.float32)
  codec = codecs.make_codec("topk", block_size=block_size, topk_fraction=0.05)
  k = max(1, round(0.05 * block_size))
  payload, y = _roundtrip(codec, x)
  assert payload["indices"].dtype == index_dtype
  assert payload["indices"].shape == (8, k)
  blocks = np.pad(x, (0, -n % block_size)).reshape(-1, block_size)
  expected = np.argsort(-np.abs(blocks), axis=1)[:, :k]
  np.testing.assert_array_equal(np.sort(payload["indices"], axis=1),
                                np.sort(expected, axis=1))
  kept = np.zeros_like(blocks)
  np.put_along_axis(kept, expected, np.take_along_axis(blocks, expected, 1), 1)
  np.testing.assert_array_equal(y, kept.reshape(-1)[:n])


def test_topk_quantized_values():
  n, block_size = 4096, 256
  x = _blocky(n, block_size)
  exact = codecs.make_codec("topk", block_size=block_size, topk_fraction=0.1)
  _, y_exact = _roundtrip(exact, x)
  kept = y_exact != 0
  _, y = _roundtrip(codecs.make_codec(
      "topk", block_size=block_size, topk_fraction=0.1, topk_values="bf16"), x)
  assert np.all(np.abs(y - y_exact) <= 2.0**-8 * np.abs(y_exact))
  payload, y = _roundtrip(codecs.make_codec(
      "topk", block_size=block_size, topk_fraction=0.1, topk_values="int8"), x)
  scale = _per_element(payload["scales"], block_size, n)
  np.testing.assert_array_equal(y != 0, kept)
  assert np.all(np.abs(y - y_exact) <= scale / 254 + ARITH * scale)


# ----------------------------------------------- degenerate blocks and jit


@pytest.mark.parametrize("name", codecs.CODEC_NAMES)
def test_zero_and_constant_blocks(name):
  block_size = 32
  x = np.concatenate([np.zeros(block_size), np.full(block_size, 0.3),
                      np.full(block_size, -2.5), np.full(10, 0.7)])
  x = x.astype(np.float32)
  codec = codecs.make_codec(name, block_size=block_size)
  _, y = _roundtrip(codec, x)
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(y[:block_size], 0.0)
  if name in ("fp32", "int8", "int4", "e3m0", "int2", "sign"):
    np.testing.assert_array_equal(y, x)  # Block scale = |constant|.
  _, y = _roundtrip(codec, np.zeros((3, 5), np.float32), jnp.bfloat16)
  assert y.dtype == jnp.bfloat16 and y.shape == (3, 5)
  np.testing.assert_array_equal(y, 0.0)


@pytest.mark.parametrize("name", codecs.CODEC_NAMES)
def test_non_finite_input_decodes_non_finite(name):
  x = np.ones(64, np.float32)
  x[3], x[40] = np.nan, np.inf
  _, y = _roundtrip(codecs.make_codec(name, block_size=32), x)
  assert not np.isfinite(y[3]) and not np.isfinite(y[40])


@pytest.mark.parametrize("name", codecs.CODEC_NAMES)
def test_jit_restores_shape_and_dtype_fused_or_not(name):
  codec = codecs.make_codec(name, block_size=64, topk_fraction=0.1)
  x = jax.random.normal(jax.random.key(5), (9, 30), jnp.bfloat16)
  payload, y = _roundtrip(codec, x, x.dtype)
  shapes = jax.eval_shape(codec.encode, x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), payload) == jax.tree.map(
      lambda a: (a.shape, a.dtype), shapes)
  assert y.shape == x.shape and y.dtype == x.dtype
  fused = jax.jit(lambda x: codec.decode(codec.encode(x), x.shape, x.dtype))
  np.testing.assert_array_equal(fused(x), y)


def test_encode_tree_and_decode_tree():
  codec = codecs.make_codec("int8", block_size=16)
  tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.full((2,), -1.0)}
  out = jax.jit(lambda t: codecs.decode_tree(
      codec, codecs.encode_tree(codec, t), t))(tree)
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  np.testing.assert_array_equal(out["b"], tree["b"])
  assert np.all(np.abs(out["w"] - tree["w"]) <= 11.0 / 254 * (1 + ARITH))


# --------------------------------------------------------- error feedback


@pytest.mark.parametrize("name, kwargs", [("sign", {}), ("int2", {}),
                                          ("topk", dict(topk_fraction=0.1))])
def test_error_feedback_keeps_the_decoded_sum_on_track(name, kwargs):
  rounds, n = 200, 2048
  codec = codecs.make_codec(name, block_size=256, **kwargs)
  deltas = jax.random.normal(jax.random.key(7), (rounds, n))

  @jax.jit
  def run(deltas):
    def one_round(carry, delta):
      residual, sent_ef, sent_plain = carry
      payload, residual = codecs.encode_with_feedback(codec, delta, residual)
      sent_ef += codec.decode(payload, (n,), jnp.float32)
      sent_plain += codec.decode(codec.encode(delta), (n,), jnp.float32)
      return (residual, sent_ef, sent_plain), jnp.linalg.norm(residual)
    zeros = jnp.zeros((n,))
    return jax.lax.scan(one_round, (zeros, zeros, zeros), deltas)

  (residual, sent_ef, sent_plain), residual_norms = run(deltas)
  true_sum = np.asarray(deltas.sum(0), np.float64)
  # Sum sent = sum of deltas - final residual, up to float32 accumulation.
  np.testing.assert_allclose(sent_ef, true_sum - residual, atol=1e-3)
  drift_ef = np.linalg.norm(true_sum - sent_ef)
  drift_plain = np.linalg.norm(true_sum - sent_plain)
  delta_norm = math.sqrt(n)
  # Residual stays bounded (below ~1.25 delta norms, no growth after warm-up);
  # without feedback the drift is a random walk, ~sqrt(rounds) times larger.
  residual_norms = np.asarray(residual_norms)
  assert residual_norms.max() < 1.5 * delta_norm
  assert residual_norms[rounds // 2:].max() < 1.1 * residual_norms[
      :rounds // 2].max()
  assert drift_plain > 5 * drift_ef


def test_feedback_without_residual_is_plain_encoding_plus_its_error():
  codec = codecs.make_codec("sign", block_size=8)
  x = jnp.linspace(-1.0, 2.0, 20)
  payload, residual = jax.jit(lambda x: codecs.encode_with_feedback(codec, x))(x)
  jax.tree.map(np.testing.assert_array_equal, payload, codec.encode(x))
  np.testing.assert_allclose(residual, x - codec.decode(payload, x.shape, jnp.float32))
  # With a zero residual it is the same send.
  again, _ = codecs.encode_with_feedback(codec, x, jnp.zeros(20))
  jax.tree.map(np.testing.assert_array_equal, again, payload)
  # Constant blocks are exact: nothing is left over.
  _, constant = codecs.encode_with_feedback(codec, jnp.ones((2, 3)))
  np.testing.assert_array_equal(constant, 0.0)
