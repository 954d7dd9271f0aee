"""The Llama decoder against textbook references written here in float64 numpy.

Test data comes from numpy and the whole suite initialises one model, so XLA
compiles few programs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decoupled_diloco.models import llama


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 64
  seq_len: int = 8
  num_layers: int = 1
  d_model: int = 32
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_dim: int = 64
  tie_embeddings: bool = False
  qk_norm: bool = True
  rope_theta: float = 10_000.0
  dtype: str = "float32"


@functools.cache
def _params():
  """Initial params of Config(), compiled once for every test that needs a whole model."""
  return llama.init_params(Config(), jax.random.key(0))


def _tokens(c, rows=2, length=None, seed=1):
  return np.random.default_rng(seed).integers(0, c.vocab_size, (rows, length or c.seq_len))


def _rope_reference(x_BxLxHxK, theta):
  """RoPE as complex multiplication: x[k] + i x[k + K/2] times exp(i l theta^(-2k/K))."""
  length, head_dim = x_BxLxHxK.shape[1], x_BxLxHxK.shape[-1]
  half = head_dim // 2
  z = x_BxLxHxK[..., :half] + 1j * x_BxLxHxK[..., half:]
  angle_LxK2 = np.arange(length)[:, None] * theta ** (-2.0 * np.arange(half) / head_dim)
  z = z * np.exp(1j * angle_LxK2)[None, :, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def _rms_norm_reference(x, scale):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale


def _mha_reference(p, x_BxLxD, c):
  """Textbook causal multi-head attention, one kv head per query head."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x_BxLxD = np.asarray(x_BxLxD, np.float64)
  q_BxLxHxK = np.einsum("bld,dhk->blhk", x_BxLxD, p["query"]["kernel"])
  k_BxLxHxK = np.einsum("bld,dhk->blhk", x_BxLxD, p["key"]["kernel"])
  v_BxLxHxK = np.einsum("bld,dhk->blhk", x_BxLxD, p["value"]["kernel"])
  if c.qk_norm:
    q_BxLxHxK = _rms_norm_reference(q_BxLxHxK, p["query_norm"]["scale"])
    k_BxLxHxK = _rms_norm_reference(k_BxLxHxK, p["key_norm"]["scale"])
  q_BxLxHxK = _rope_reference(q_BxLxHxK, c.rope_theta)
  k_BxLxHxK = _rope_reference(k_BxLxHxK, c.rope_theta)
  length, head_dim = x_BxLxD.shape[1], q_BxLxHxK.shape[-1]
  scores_BxHxLxL = np.einsum("blhk,bmhk->bhlm", q_BxLxHxK, k_BxLxHxK) / np.sqrt(head_dim)
  scores_BxHxLxL = np.where(np.tril(np.ones((length, length), bool)), scores_BxHxLxL, -np.inf)
  probs_BxHxLxL = np.exp(scores_BxHxLxL - scores_BxHxLxL.max(axis=-1, keepdims=True))
  probs_BxHxLxL /= probs_BxHxLxL.sum(axis=-1, keepdims=True)
  out_BxLxHxK = np.einsum("bhlm,bmhk->blhk", probs_BxHxLxL, v_BxLxHxK)
  return np.einsum("blhk,hkd->bld", out_BxLxHxK, p["out"]["kernel"])


def _model_reference(p, tokens_BxL, c):
  """A one-layer pre-norm decoder with a SwiGLU MLP and an untied head, written out."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  block, mlp = p["block_0"], p["block_0"]["mlp"]
  x_BxLxD = p["embed"]["embedding"][tokens_BxL]
  h_BxLxD = _rms_norm_reference(x_BxLxD, block["attn_norm"]["scale"])
  x_BxLxD = x_BxLxD + _mha_reference(block["attn"], h_BxLxD, c)
  h_BxLxD = _rms_norm_reference(x_BxLxD, block["mlp_norm"]["scale"])
  gate_BxLxF, up_BxLxF = h_BxLxD @ mlp["gate"]["kernel"], h_BxLxD @ mlp["up"]["kernel"]
  silu_BxLxF = gate_BxLxF / (1 + np.exp(-gate_BxLxF))
  x_BxLxD = x_BxLxD + (silu_BxLxF * up_BxLxF) @ mlp["down"]["kernel"]
  return _rms_norm_reference(x_BxLxD, p["final_norm"]["scale"]) @ p["head"]["kernel"]


def _attention_params(c, seed=0):
  """Random attention params, norm scales off 1 so that a skipped norm shows."""
  rng, head_dim = np.random.default_rng(seed), c.d_model // c.num_heads
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {
      "query": {"kernel": normal(c.d_model, c.num_heads, head_dim) / np.sqrt(c.d_model)},
      "key": {"kernel": normal(c.d_model, c.num_kv_heads, head_dim) / np.sqrt(c.d_model)},
      "value": {"kernel": normal(c.d_model, c.num_kv_heads, head_dim) / np.sqrt(c.d_model)},
      "out": {"kernel": normal(c.num_heads, head_dim, c.d_model) / np.sqrt(c.d_model)},
  }
  if c.qk_norm:
    params["query_norm"] = {"scale": 1 + 0.5 * normal(head_dim)}
    params["key_norm"] = {"scale": 1 + 0.5 * normal(head_dim)}
  return params


def _attention(c, params, x_BxLxD):
  return np.asarray(jax.jit(llama.Attention(c).apply)({"params": params}, x_BxLxD))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_with_as_many_kv_heads_as_heads_is_textbook_mha(qk_norm):
  c = Config(num_kv_heads=4, qk_norm=qk_norm)
  x_BxLxD = np.random.default_rng(1).normal(size=(2, c.seq_len, c.d_model)).astype(np.float32)
  params = _attention_params(c)
  got = _attention(c, params, x_BxLxD)
  np.testing.assert_allclose(got, _mha_reference(params, x_BxLxD, c), atol=1e-5, rtol=0)


def test_grouped_attention_is_mha_with_each_kv_head_repeated_for_its_group():
  gqa = Config(num_heads=4, num_kv_heads=2)
  mha = dataclasses.replace(gqa, num_kv_heads=4)
  x_BxLxD = np.random.default_rng(1).normal(size=(2, gqa.seq_len, gqa.d_model)).astype(np.float32)
  params = _attention_params(gqa)
  groups = gqa.num_heads // gqa.num_kv_heads  # Query head h reads kv head h // groups.
  repeated = params | {name: {"kernel": np.repeat(params[name]["kernel"], groups, axis=1)}
                       for name in ("key", "value")}
  got = _attention(gqa, params, x_BxLxD)
  np.testing.assert_allclose(got, _attention(mha, repeated, x_BxLxD), atol=1e-5, rtol=0)
  np.testing.assert_allclose(got, _mha_reference(repeated, x_BxLxD, mha), atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads, kv_heads, match", [(4, 3, "num_kv_heads"), (32, 4, "even")])
def test_head_counts_that_do_not_fit_are_refused(heads, kv_heads, match):
  c = Config(num_heads=heads, num_kv_heads=kv_heads)  # d_model is 32.
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda key: llama.init_params(c, key), jax.random.key(0))


def test_rope_scores_depend_only_on_relative_position():
  length, head_dim = 24, 16
  q_K, k_K = np.random.default_rng(0).normal(size=(2, head_dim)).astype(np.float32)

  def rotate(v_K):  # Row l is v rotated to position l.
    v_1xLx1xK = np.broadcast_to(v_K, (1, length, 1, head_dim))
    return np.asarray(jax.jit(llama.apply_rope, static_argnums=1)(v_1xLx1xK, 10_000.0)[0, :, 0])

  q_LxK, k_LxK = rotate(q_K), rotate(k_K)
  score = lambda i, j: float(q_LxK[i] @ k_LxK[j])
  for i, j in [(0, 0), (3, 1), (2, 7), (5, 0)]:
    for shift in (1, 4, 16):
      assert score(i + shift, j + shift) == pytest.approx(score(i, j), abs=1e-5)
  assert abs(score(3, 1) - score(3, 2)) > 1e-2  # Another offset, another score.
  np.testing.assert_array_equal(q_LxK[0], q_K)  # Position 0 is not rotated.


def test_rope_is_complex_rotation_of_the_two_halves():
  x_BxLxHxK = np.random.default_rng(0).normal(size=(2, 8, 3, 16)).astype(np.float32)
  got = jax.jit(llama.apply_rope, static_argnums=1)(x_BxLxHxK, 500.0)
  want = _rope_reference(x_BxLxHxK.astype(np.float64), 500.0)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_one_layer_model_matches_reference():
  c = Config()
  rng = np.random.default_rng(2)
  scales = lambda tree: jax.tree.map(lambda a: a * rng.uniform(0.5, 1.5, a.shape), tree)
  params = jax.tree.map(np.asarray, _params())
  for name in ("attn_norm", "mlp_norm"):  # Scales off 1, so that a skipped one shows.
    params["block_0"][name] = scales(params["block_0"][name])
  params["final_norm"] = scales(params["final_norm"])
  got_BxLxV = jax.jit(llama.Llama(c).apply)({"params": params}, _tokens(c))
  # The reference's attention has one kv head per query head: repeat each for its group.
  mha, reference = dataclasses.replace(c, num_kv_heads=c.num_heads), jax.tree.map(np.copy, params)
  for name in ("key", "value"):
    attn = reference["block_0"]["attn"]
    attn[name]["kernel"] = np.repeat(attn[name]["kernel"], c.num_heads // c.num_kv_heads, axis=1)
  want_BxLxV = _model_reference(reference, _tokens(c), mha)
  np.testing.assert_allclose(got_BxLxV, want_BxLxV, atol=1e-5, rtol=0)


def test_changing_a_token_changes_no_earlier_logit():
  c, t = Config(), 5
  tokens_BxL = _tokens(c)
  changed_BxL = tokens_BxL.copy()
  changed_BxL[:, t] = (tokens_BxL[:, t] + 1) % c.vocab_size
  apply = jax.jit(llama.Llama(c).apply)
  before_BxLxV = np.asarray(apply({"params": _params()}, tokens_BxL))
  after_BxLxV = np.asarray(apply({"params": _params()}, changed_BxL))
  np.testing.assert_allclose(after_BxLxV[:, :t], before_BxLxV[:, :t], atol=1e-6, rtol=0)
  assert np.abs(after_BxLxV[:, t:] - before_BxLxV[:, t:]).max(axis=(0, 2)).min() > 1e-3


def test_tied_logits_are_final_hidden_times_embedding():
  c = Config(tie_embeddings=True)
  shapes = jax.eval_shape(lambda key: llama.init_params(c, key), jax.random.key(0))
  assert set(shapes) == {"embed", "block_0", "final_norm"}
  params = {name: p for name, p in _params().items() if name in shapes}  # Same init, no head.
  apply = jax.jit(functools.partial(llama.Llama(c).apply, capture_intermediates=True))
  logits_BxLxV, state = apply({"params": params}, _tokens(c))
  hidden_BxLxD = state["intermediates"]["final_norm"]["__call__"][0]
  want_BxLxV = np.asarray(hidden_BxLxD, np.float64) @ np.asarray(params["embed"]["embedding"]).T
  assert logits_BxLxV.shape == (2, c.seq_len, c.vocab_size)
  np.testing.assert_allclose(logits_BxLxV, want_BxLxV, atol=1e-5, rtol=0)


def test_untied_model_has_its_own_head_and_names_as_the_framework_expects():
  c = Config(tie_embeddings=False, qk_norm=False, num_layers=2)
  params = jax.eval_shape(lambda key: llama.init_params(c, key), jax.random.key(0))
  assert set(params) == {"embed", "block_0", "block_1", "final_norm", "head"}
  assert params["head"]["kernel"].shape == (c.d_model, c.vocab_size)
  assert set(params["block_1"]) == {"attn_norm", "attn", "mlp_norm", "mlp"}
  assert set(params["block_1"]["attn"]) == {"query", "key", "value", "out"}
  assert set(params["block_1"]["mlp"]) == {"gate", "up", "down"}
  assert params["block_1"]["attn"]["key"]["kernel"].shape == (32, 2, 8)
  assert params["block_1"]["attn"]["out"]["kernel"].shape == (4, 8, 32)


def test_param_axes_name_every_axis_of_every_param():
  c = Config(num_layers=2)
  params = jax.eval_shape(lambda key: llama.init_params(c, key), jax.random.key(0))
  axes = llama.param_axes(c)
  is_names = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(axes, is_leaf=is_names) == jax.tree.structure(params)
  for names, param in zip(jax.tree.leaves(axes, is_leaf=is_names), jax.tree.leaves(params)):
    assert len(names) == param.ndim
    assert param.dtype == jnp.float32
  assert axes["embed"]["embedding"] == ("vocab", "embed")
  assert axes["block_0"]["attn"]["query_norm"]["scale"] == ("norm",)
  assert axes["block_1"]["attn"]["key"]["kernel"] == ("embed", "kv_heads", "head_dim")
  assert axes["block_1"]["attn"]["out"]["kernel"] == ("heads", "head_dim", "embed")
  assert axes["block_1"]["mlp"]["down"]["kernel"] == ("mlp", "embed")


def test_bfloat16_compute_keeps_float32_params_and_logits():
  c = Config(dtype="bfloat16")
  shapes = jax.eval_shape(lambda key: llama.init_params(c, key), jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  # The same tree as Config()'s: dtype changes the computation only.
  logits_BxLxV = jax.jit(llama.Llama(c).apply)({"params": _params()}, _tokens(c))
  float32_BxLxV = jax.jit(llama.Llama(Config()).apply)({"params": _params()}, _tokens(c))
  assert logits_BxLxV.dtype == jnp.float32
  # Logits reach about 0.33 here; bf16 rounding moved them by 0.0065 when this was written.
  np.testing.assert_allclose(logits_BxLxV, float32_BxLxV, atol=0.02, rtol=0)


def test_a_few_adamw_steps_fit_a_repeated_batch():
  c = Config()
  model, opt = llama.Llama(c), optax.adamw(1e-2)
  tokens_BxL1 = _tokens(c, rows=4, length=c.seq_len + 1)

  def loss_fn(params):
    logits_BxLxV = model.apply({"params": params}, tokens_BxL1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, tokens_BxL1[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = _params()
  opt_state = opt.init(params)
  losses = []
  for _ in range(20):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(np.log(c.vocab_size), abs=0.5)
  assert losses[-1] < 0.5 * losses[0]
