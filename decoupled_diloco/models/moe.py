"""A mixture-of-experts Llama decoder: llama.py's blocks with a routed MLP (flax linen).

Shapes are named as in llama.py, plus E experts, k choices per token (top-k)
and C an expert's capacity (token slots) per group.

Each block's MLP (`MoeMlp`) sends every token to k of E SwiGLU experts
(token choice) and adds their outputs, weighted by the router's gates:

  router   float32 logits [B, L, E] = x @ kernel [embed, exp]; probabilities
           p = softmax(logits); the k experts with the largest logits + `router_bias`
           are chosen, and their gates are their p renormalised to sum to 1. The
           bias only picks experts (it never weights them), so it gets no gradient:
           it is a slot for a learner's own balancing rule, kept local (role
           `local`, never merged), and stays at zero under plain gradient training.
           With k = 1 the one gate is 1, so the router learns from the aux losses only.
  capacity groups are batch rows, so splitting the batch over devices changes
           nothing; each expert takes C = ceil(capacity_factor * L * k / E) of a
           row's L * k assignments (capped at L, the most it can be sent). Slots
           go first to all first choices, then all second choices, and so on;
           within one choice rank, by position in the row. An assignment that
           finds its expert full is dropped: that expert adds nothing to the
           token, and its gate goes to no other (with every choice dropped,
           only the residual passes).
  experts  wi, wg [exp, embed, mlp] and wo [exp, mlp, embed], stacked, each
           expert down(silu(x wg) * x wi) like llama.Mlp; dispatch and combine
           are one-hot einsums, so every shape is static (CPU too).
  shared   with `shared_expert`, a dense llama.Mlp every token goes through,
           added to the routed output.

The model returns (logits, aux): aux holds scalars, each the mean over layers
of a per-layer value over all B * L tokens of the batch:

  load_balance_loss  Switch's E * sum_e f_e * P_e: f_e the fraction of the
                     B * L * k assignments the router sends to e *before*
                     dropping, P_e the mean probability of e; 1 when balanced.
  router_z_loss      mean over tokens of logsumexp(logits)^2 (ST-MoE).
  routing_entropy    mean over tokens of the entropy of p (nats).
  dropped_fraction   the fraction of assignments dropped by capacity.
  expert_load_max    max_e f_e: 1 / E when balanced, 1 when one expert takes all.

The task adds the two losses to the cross-entropy with its weights.

References:
  Shazeer et al., Outrageously Large Neural Networks, https://arxiv.org/abs/1701.06538
  Lepikhin et al., GShard, https://arxiv.org/abs/2006.16668
  Fedus et al., Switch Transformers, https://arxiv.org/abs/2101.03961
  Zoph et al., ST-MoE (router z-loss), https://arxiv.org/abs/2202.08906
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoupled_diloco.models import compiled, llama

_part = nn.with_logical_partitioning
# One expert's fan-in (embed or mlp), not E times it: each expert starts like llama's Dense.
_expert_init = nn.initializers.lecun_normal(batch_axis=(0,))
# llama's initialisers, so that a moe and a llama of one shape start alike.
_kernel_init = llama._kernel_init  # pylint: disable=protected-access


def capacity(c, length: int) -> int:
  """Token slots per expert in a group of `length` tokens (see the module docstring)."""
  slots = math.ceil(c.capacity_factor * length * c.experts_per_token / c.num_experts)
  return min(slots, length)  # An expert is chosen at most once per token.


def route(logits_BxLxE, bias_E, k: int, capacity_slots: int):
  """Top-k token choice with capacity, per row: dispatch and combine tensors and statistics.

  Args:
    logits_BxLxE: float32 router logits.
    bias_E: added to the logits to choose experts only.
    k: experts per token.
    capacity_slots: C, slots per expert per row.

  Returns:
    (dispatch_BxLxExC, combine_BxLxExC, stats, choice_BxLxK): dispatch is 1
    where token l's assignment to expert e holds slot c, combine is its gate
    there; stats are the module docstring's scalars over the whole batch;
    choice holds the k chosen experts of each token, first choice first.
  """
  batch, length, experts = logits_BxLxE.shape
  probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
  _, choice_BxLxK = jax.lax.top_k(logits_BxLxE + bias_E, k)
  gate_BxLxK = jnp.take_along_axis(probs_BxLxE, choice_BxLxK, axis=-1)
  gate_BxLxK = gate_BxLxK / gate_BxLxK.sum(axis=-1, keepdims=True)

  # Slot = how many assignments to the same expert come first: rank-major, then position.
  chosen_BxLxKxE = jax.nn.one_hot(choice_BxLxK, experts, dtype=jnp.int32)
  chosen_BxKLxE = chosen_BxLxKxE.transpose(0, 2, 1, 3).reshape(batch, k * length, experts)
  before_BxKLxE = jnp.cumsum(chosen_BxKLxE, axis=1) - chosen_BxKLxE
  before_BxLxKxE = before_BxKLxE.reshape(batch, k, length, experts).transpose(0, 2, 1, 3)
  slot_BxLxK = (before_BxLxKxE * chosen_BxLxKxE).sum(axis=-1)
  kept_BxLxK = slot_BxLxK < capacity_slots
  slot_BxLxKxC = jax.nn.one_hot(slot_BxLxK, capacity_slots) * kept_BxLxK[..., None]
  chosen_f32_BxLxKxE = chosen_BxLxKxE.astype(jnp.float32)
  dispatch_BxLxExC = jnp.einsum("blke,blkc->blec", chosen_f32_BxLxKxE, slot_BxLxKxC)
  combine_BxLxExC = jnp.einsum("blke,blkc->blec", chosen_f32_BxLxKxE * gate_BxLxK[..., None],
                               slot_BxLxKxC)

  fraction_E = chosen_f32_BxLxKxE.mean(axis=(0, 1, 2))  # Before dropping; sums to 1.
  mean_prob_E = probs_BxLxE.mean(axis=(0, 1))
  stats = {
      "load_balance_loss": experts * jnp.sum(fraction_E * mean_prob_E),
      "router_z_loss": jnp.mean(jax.nn.logsumexp(logits_BxLxE, axis=-1) ** 2),
      "routing_entropy": -jnp.mean(jnp.sum(
          probs_BxLxE * jax.nn.log_softmax(logits_BxLxE, axis=-1), axis=-1)),
      "dropped_fraction": 1.0 - kept_BxLxK.astype(jnp.float32).mean(),
      "expert_load_max": fraction_E.max(),
  }
  return dispatch_BxLxExC, combine_BxLxExC, stats, choice_BxLxK


class Experts(nn.Module):
  """E SwiGLU MLPs stacked along a leading `exp` axis, each applied to its own slots."""
  c: object

  @nn.compact
  def __call__(self, x_BxExCxD):
    c, dtype = self.c, jnp.dtype(self.c.dtype)
    e, d, f = c.num_experts, c.d_model, c.mlp_dim
    param = lambda name, names, shape: self.param(name, _part(_expert_init, names), shape)
    wi_ExDxF = param("wi", ("exp", "embed", "mlp"), (e, d, f)).astype(dtype)
    wg_ExDxF = param("wg", ("exp", "embed", "mlp"), (e, d, f)).astype(dtype)
    wo_ExFxD = param("wo", ("exp", "mlp", "embed"), (e, f, d)).astype(dtype)
    x_BxExCxD = x_BxExCxD.astype(dtype)
    gate_BxExCxF = jnp.einsum("becd,edf->becf", x_BxExCxD, wg_ExDxF)
    up_BxExCxF = jnp.einsum("becd,edf->becf", x_BxExCxD, wi_ExDxF)
    return jnp.einsum("becf,efd->becd", nn.silu(gate_BxExCxF) * up_BxExCxF, wo_ExFxD)


class MoeMlp(nn.Module):
  """x -> (sum of each token's gated experts [+ the shared expert], stats); module docstring."""
  c: object

  @nn.compact
  def __call__(self, x_BxLxD):
    c, dtype = self.c, jnp.dtype(self.c.dtype)
    # float32 at the highest precision: routing decisions flip on small logit errors.
    logits_BxLxE = nn.Dense(
        c.num_experts, use_bias=False, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
        name="router", kernel_init=_part(_kernel_init, ("embed", "exp")))(
            x_BxLxD.astype(jnp.float32))
    bias_E = self.param("router_bias", _part(nn.initializers.zeros, ("exp",)), (c.num_experts,))
    dispatch_BxLxExC, combine_BxLxExC, stats, choice_BxLxK = route(
        logits_BxLxE, bias_E, c.experts_per_token, capacity(c, x_BxLxD.shape[1]))
    # For routing diagnostics: Moe.apply(..., mutable=["intermediates"]) returns them.
    self.sow("intermediates", "router_probs", jax.nn.softmax(logits_BxLxE, axis=-1))
    self.sow("intermediates", "choices", choice_BxLxK)
    in_BxExCxD = jnp.einsum("blec,bld->becd", dispatch_BxLxExC.astype(dtype),
                            x_BxLxD.astype(dtype))
    out_BxExCxD = Experts(c, name="experts")(in_BxExCxD)
    y_BxLxD = jnp.einsum("blec,becd->bld", combine_BxLxExC.astype(dtype), out_BxExCxD)
    if c.shared_expert:
      y_BxLxD = y_BxLxD + llama.Mlp(c, name="shared")(x_BxLxD)
    # Each expert's share of the assignments (before dropping): what `router_bias` follows.
    load_E = jax.nn.one_hot(choice_BxLxK, c.num_experts).mean(axis=(0, 1, 2))
    return y_BxLxD, {**stats, "_expert_load": load_E}


class Block(nn.Module):
  """llama.Block with a `MoeMlp`: x + attn(norm(x)), then x + moe(norm(x)), and its stats."""
  c: object

  @nn.compact
  def __call__(self, x_BxLxD):
    dtype = jnp.dtype(self.c.dtype)
    x_BxLxD = x_BxLxD + llama.Attention(self.c, name="attn")(
        llama.RMSNorm(dtype, name="attn_norm")(x_BxLxD))
    y_BxLxD, stats = MoeMlp(self.c, name="mlp")(llama.RMSNorm(dtype, name="mlp_norm")(x_BxLxD))
    return x_BxLxD + y_BxLxD, stats


class Moe(nn.Module):
  """Maps tokens [B, L] to (logits [B, L, V] float32, aux scalars); params stay float32.

  `c` is what llama.Llama reads plus num_experts, experts_per_token,
  capacity_factor and shared_expert. The embedding and head are llama's
  (same names, axes and initialisers).
  """
  c: object

  @nn.compact
  def __call__(self, tokens_BxL):
    embed = llama.make_embed(self.c)
    x_BxLxD = embed(tokens_BxL)
    layer_stats = []
    for i in range(self.c.num_layers):
      x_BxLxD, stats = Block(self.c, name=f"block_{i}")(x_BxLxD)
      layer_stats.append(stats)
    logits_BxLxV = llama.logits(self.c, embed, x_BxLxD)
    # Scalars: means over layers; `_expert_load` [layers, experts] (private: task.update_local).
    aux = {k: jnp.stack([s[k] for s in layer_stats]) for k in layer_stats[0]}
    aux = {k: v if k.startswith("_") else jnp.mean(v) for k, v in aux.items()}
    return logits_BxLxV, aux


def routing(c, params, tokens_BxL) -> dict:
  """Every layer's router on `tokens`: {"probs": [layers, B*L, E], "choices": [layers, B*L, k]}."""
  _, state = Moe(c).apply({"params": params}, tokens_BxL, mutable=["intermediates"])
  blocks = [state["intermediates"][f"block_{i}"]["mlp"] for i in range(c.num_layers)]
  flat = lambda name: jnp.stack([b[name][0].reshape(-1, b[name][0].shape[-1]) for b in blocks])
  return {"probs": flat("router_probs"), "choices": flat("choices")}


def _boxed_init(c, rng):
  return Moe(c).init(rng, jnp.zeros((1, c.seq_len), jnp.int32))["params"]


def init_params(c, rng: jax.Array):
  """Initial parameters as plain float32 arrays, in one compiled program."""
  return compiled.init(_boxed_init, c, rng)


def param_axes(c):
  """The logical axis names of each parameter, as llama.param_axes gives them."""
  return compiled.axes(_boxed_init, c)
