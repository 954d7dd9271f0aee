"""The mixture-of-experts decoder (models/moe.py): routing by hand, layers against numpy
references, a 2-way expert x 2-way data island against one device, and the `moe` task.

Layer tests use tiny shapes and numpy data, so XLA compiles few small programs.
"""

import dataclasses
import math

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from decoupled_diloco import config as config_lib
from decoupled_diloco import metrics as metrics_lib
from decoupled_diloco import islands as islands_lib
from decoupled_diloco import steps, train
from decoupled_diloco.algorithm import fragments
from decoupled_diloco.models import llama, moe
from decoupled_diloco.tasks import base as tasks_base
from experiments import llama as llama_experiment, methods, moe as moe_experiment
from tests import helpers


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 64
  seq_len: int = 8
  num_layers: int = 1
  d_model: int = 8
  num_heads: int = 2
  num_kv_heads: int = 1
  mlp_dim: int = 16
  tie_embeddings: bool = False
  qk_norm: bool = False
  rope_theta: float = 10_000.0
  dtype: str = "float32"
  num_experts: int = 4
  experts_per_token: int = 2
  capacity_factor: float = 1.25
  shared_expert: bool = False


def _layer_params(c, seed=0, router_kernel=None, bias=None):
  """Random MoeMlp parameters (numpy float32); the router's logits spread over a few units."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (rng.normal(size=shape) / np.sqrt(shape[-2])).astype(np.float32)
  e, d, f = c.num_experts, c.d_model, c.mlp_dim
  params = {
      "router": {"kernel": 3 * normal(d, e) if router_kernel is None else router_kernel},
      "router_bias": np.zeros(e, np.float32) if bias is None else np.float32(bias),
      "experts": {"wi": normal(e, d, f), "wg": normal(e, d, f), "wo": normal(e, f, d)},
  }
  if c.shared_expert:
    params["shared"] = {"gate": {"kernel": normal(d, f)}, "up": {"kernel": normal(d, f)},
                        "down": {"kernel": normal(f, d)}}
  return params


def _layer(c, params, x_BxLxD):
  """MoeMlp(c) on x: (y as numpy, stats as floats)."""
  y_BxLxD, stats = jax.jit(moe.MoeMlp(c).apply)({"params": params}, x_BxLxD)
  return np.asarray(y_BxLxD), {k: float(v) for k, v in stats.items() if not k.startswith("_")}


def _x(c, rows=2, seed=1):
  return np.random.default_rng(seed).normal(size=(rows, c.seq_len, c.d_model)).astype(np.float32)


def _softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _swiglu(x_D, wg_DxF, wi_DxF, wo_FxD):
  gate_F = x_D @ wg_DxF
  return (gate_F / (1 + np.exp(-gate_F)) * (x_D @ wi_DxF)) @ wo_FxD


def _route(logits_BxLxE, capacity_slots, k=2):
  dispatch, combine, stats, choices = jax.jit(moe.route, static_argnums=(2, 3))(
      np.float32(logits_BxLxE), np.zeros(logits_BxLxE.shape[-1], np.float32), k, capacity_slots)
  return (np.asarray(dispatch), np.asarray(combine),
          {name: float(v) for name, v in stats.items()}, np.asarray(choices))


# --- routing by hand ---------------------------------------------------------------

def test_load_balance_and_z_losses_equal_a_hand_computation():
  # Four tokens, two experts, top-1. Logits log(p) + s: probabilities p, logsumexp s.
  p_LxE = np.array([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.6, 0.4]])
  s_L = np.array([0.0, 1.0, 2.0, -1.0])
  _, _, stats, choices = _route((np.log(p_LxE) + s_L[:, None])[None], capacity_slots=4, k=1)
  assert choices.ravel().tolist() == [0, 0, 1, 0]
  # f = (3/4, 1/4); P = (2.35/4, 1.65/4) = (0.5875, 0.4125); 2 (0.75 0.5875 + 0.25 0.4125).
  assert stats["load_balance_loss"] == pytest.approx(1.0875, abs=1e-6)
  assert stats["router_z_loss"] == pytest.approx((0 + 1 + 4 + 1) / 4, abs=1e-5)
  entropy = lambda q: -sum(x * math.log(x) for x in q)
  assert stats["routing_entropy"] == pytest.approx(np.mean([entropy(q) for q in p_LxE]), abs=1e-6)
  assert stats["expert_load_max"] == 0.75 and stats["dropped_fraction"] == 0.0


BIAS = np.array([0.8, -0.6, 0.0, 0.3])  # Moves some tokens' choices (checked below).


def test_layer_statistics_equal_numpy_on_its_own_router_logits():
  """The bias picks the experts that f counts; P, the z-loss and the entropy ignore it."""
  c = Config(capacity_factor=2.0)  # C = L: nothing dropped.
  params, x_BxLxD = _layer_params(c, bias=BIAS), _x(c)
  _, stats = _layer(c, params, x_BxLxD)
  logits_BxLxE = x_BxLxD.astype(np.float64) @ params["router"]["kernel"].astype(np.float64)
  probs_BxLxE = _softmax(logits_BxLxE)
  top_BxLxK = np.argsort(-(logits_BxLxE + BIAS), axis=-1)[..., :c.experts_per_token]
  f_E = np.bincount(top_BxLxK.ravel(), minlength=c.num_experts) / top_BxLxK.size
  lse_BxL = np.log(np.exp(logits_BxLxE).sum(-1))
  want = {"load_balance_loss": c.num_experts * np.sum(f_E * probs_BxLxE.mean(axis=(0, 1))),
          "router_z_loss": np.mean(lse_BxL**2),
          "routing_entropy": np.mean(-(probs_BxLxE * np.log(probs_BxLxE)).sum(-1)),
          "expert_load_max": f_E.max(), "dropped_fraction": 0.0}
  assert stats == pytest.approx(want, abs=1e-5)
  assert f_E.max() > 1 / c.num_experts  # Unbalanced: a wrong f or P would show.


# Six tokens' (first, second) choices of three experts, two slots each.
CHOICES = [(1, 0), (1, 0), (0, 2), (0, 1), (1, 2), (0, 2)]
# First choices fill slots in position order (expert 1: tokens 0, 1; expert 0: tokens 2, 3;
# token 4's and 5's first choices find them full), then second choices (expert 0 is full
# for tokens 0 and 1 although they come first in the row; expert 2 takes tokens 2 and 4).
KEPT = {(0, 1): 0, (1, 1): 1, (2, 0): 0, (3, 0): 1, (2, 2): 0, (4, 2): 1}  # (l, e): slot.


def _choice_logits():
  logits_LxE = np.zeros((len(CHOICES), 3))
  for l, (first, second) in enumerate(CHOICES):
    logits_LxE[l, first], logits_LxE[l, second] = 2.0, 1.0
  return logits_LxE


def test_capacity_drops_exactly_the_assignments_over_capacity_first_choices_first():
  c = Config(seq_len=6, d_model=3, num_experts=3, capacity_factor=0.5)  # d_model: see below.
  assert moe.capacity(c, 6) == 2  # ceil(0.5 * 6 * 2 / 3).
  assert moe.capacity(dataclasses.replace(c, capacity_factor=10.0), 6) == 6  # At most L.
  logits_LxE = _choice_logits()
  dispatch_1xLxExC, combine_1xLxExC, stats, choices_1xLxK = _route(logits_LxE[None], 2)
  dispatch_LxExC, combine_LxExC = dispatch_1xLxExC[0], combine_1xLxExC[0]
  assert [tuple(t) for t in choices_1xLxK[0].tolist()] == CHOICES
  want_LxExC = np.zeros((6, 3, 2))
  for (l, e), slot in KEPT.items():
    want_LxExC[l, e, slot] = 1
  np.testing.assert_array_equal(dispatch_LxExC, want_LxExC)
  assert stats["dropped_fraction"] == 0.5  # 6 of 12 assignments.
  # f counts assignments before dropping: expert 0 was chosen 5 times, 1 4 times, 2 3 times.
  f_E = np.array([5, 4, 3]) / 12
  assert stats["expert_load_max"] == pytest.approx(5 / 12)
  assert stats["load_balance_loss"] == pytest.approx(
      3 * np.sum(f_E * _softmax(logits_LxE).mean(axis=0)), abs=1e-6)
  # Gates are renormalised over both choices before dropping: a dropped one's is lost.
  gate_first = math.e / (math.e + 1)  # softmax over the logits 2 and 1 (and 0, cancelled).
  for (l, e), slot in KEPT.items():
    want_LxExC[l, e, slot] = gate_first if CHOICES[l][0] == e else 1 - gate_first
  np.testing.assert_allclose(combine_LxExC, want_LxExC, atol=1e-6, rtol=0)

  # In the layer: x is the logits (router = identity). Token 5 lost both choices: output 0;
  # token 0 gets its first choice's expert alone, at its gate.
  params = _layer_params(c, router_kernel=np.eye(3, dtype=np.float32))
  y_LxD = _layer(c, params, np.float32(logits_LxE)[None])[0][0]
  np.testing.assert_array_equal(y_LxD[5], 0.0)
  w = {k: v.astype(np.float64) for k, v in params["experts"].items()}
  want_D = gate_first * _swiglu(logits_LxE[0], w["wg"][1], w["wi"][1], w["wo"][1])
  np.testing.assert_allclose(y_LxD[0], want_D, atol=1e-6, rtol=0)


# --- the layer against references ----------------------------------------------------

def _reference_layer(c, params, x_BxLxD):
  """Per token: sum over its top-k experts (by logits + bias) of gate * expert(x), in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x_BxLxD = np.asarray(x_BxLxD, np.float64)
  logits_BxLxE = x_BxLxD @ p["router"]["kernel"]
  w = p["experts"]
  out_BxLxD = np.zeros_like(x_BxLxD)
  for b, l in np.ndindex(*x_BxLxD.shape[:2]):
    x_D, probs_E = x_BxLxD[b, l], _softmax(logits_BxLxE[b, l])
    top = np.argsort(-(logits_BxLxE[b, l] + p["router_bias"]))[:c.experts_per_token]
    for e in top:
      gate = probs_E[e] / probs_E[top].sum()
      out_BxLxD[b, l] += gate * _swiglu(x_D, w["wg"][e], w["wi"][e], w["wo"][e])
    if c.shared_expert:
      s = p["shared"]
      out_BxLxD[b, l] += _swiglu(x_D, s["gate"]["kernel"], s["up"]["kernel"], s["down"]["kernel"])
  return out_BxLxD


@pytest.mark.parametrize("shared_expert", [False, True])
def test_without_drops_the_layer_is_each_tokens_gated_sum_of_its_experts(shared_expert):
  c = Config(capacity_factor=2.0, shared_expert=shared_expert)  # C = L.
  params, x_BxLxD = _layer_params(c, bias=BIAS), _x(c)
  logits_BxLxE = x_BxLxD @ params["router"]["kernel"]
  top = lambda z: np.sort(np.argsort(-z, axis=-1)[..., :2], axis=-1)
  assert (top(logits_BxLxE) != top(logits_BxLxE + BIAS)).any()  # The bias moves a choice.
  y_BxLxD, stats = _layer(c, params, x_BxLxD)
  assert stats["dropped_fraction"] == 0.0
  np.testing.assert_allclose(y_BxLxD, _reference_layer(c, params, x_BxLxD), atol=1e-5, rtol=0)


def test_one_expert_top_1_without_drops_is_a_swiglu_mlp():
  c = Config(num_experts=1, experts_per_token=1, capacity_factor=1.0)
  params, x_BxLxD = _layer_params(c), _x(c)
  y_BxLxD, stats = _layer(c, params, x_BxLxD)
  w = params["experts"]
  mlp = {"gate": {"kernel": w["wg"][0]}, "up": {"kernel": w["wi"][0]},
         "down": {"kernel": w["wo"][0]}}
  want_BxLxD = jax.jit(llama.Mlp(c).apply)({"params": mlp}, x_BxLxD)
  assert stats["dropped_fraction"] == 0.0 and stats["expert_load_max"] == 1.0
  np.testing.assert_allclose(y_BxLxD, want_BxLxD, atol=1e-6, rtol=0)


def test_routing_gives_every_layers_probabilities_and_choices():
  c = Config(num_layers=2)
  params = moe.init_params(c, jax.random.key(0))
  tokens_BxL = np.random.default_rng(0).integers(0, c.vocab_size, (2, c.seq_len))
  r = jax.jit(moe.routing, static_argnums=0)(c, params, tokens_BxL)
  assert r["probs"].shape == (2, 2 * c.seq_len, 4) and r["choices"].shape == (2, 16, 2)
  np.testing.assert_allclose(r["probs"].sum(-1), 1.0, atol=1e-6)
  top_2 = np.argsort(-np.asarray(r["probs"]), axis=-1)[..., :2]  # The bias starts at 0.
  np.testing.assert_array_equal(r["choices"], top_2)


# --- the task -----------------------------------------------------------------------

def _config(**model):
  return helpers.tiny_config(**{"model.name": "moe", "model.seq_len": 16, "model.num_experts": 4,
                                "model.mlp_dim": 32,
                                **{f"model.{k}": v for k, v in model.items()}})


def test_a_two_way_expert_two_way_data_island_matches_one_device():
  """Experts split over `expert`, the batch over data x expert (fake CPU devices)."""
  task = helpers.task(_config())
  params = task.init(jax.random.key(0))
  batch = {"tokens": np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, 256))}
  axes = tasks_base.param_axes(task)
  one = islands_lib.make_islands(1, axes=axes, devices=jax.devices()[:1])[0]
  four = islands_lib.make_islands(2, expert=2, axes=axes)[0]
  assert dict(four.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 2}
  experts = four.shardings(params)["block_0"]["mlp"]["experts"]
  assert experts["wi"].spec == P("expert", None, None) == experts["wo"].spec
  out = [helpers.sgd_step_on(task, island, params, batch) for island in (one, four)]
  assert abs(out[0][1] - out[1][1]) < 1e-5
  for path, a in out[0][0].items():
    np.testing.assert_allclose(a, out[1][0][path], atol=1e-5, err_msg=path)
    if path.endswith("router_bias"):
      assert not a.any(), path  # It only picks experts: no gradient.
    else:
      assert np.abs(a).max() > 0, path  # Every other tensor has a gradient to compare.


def test_roles_axes_and_the_task_check():
  task = helpers.task(_config(shared_expert=True))
  flat = fragments.flatten(jax.eval_shape(task.init, jax.random.key(0)))
  roles, axes = task.roles(flat), task.axes(flat)
  mlp = "block_0/mlp/"
  assert roles[mlp + "router/kernel"] == "router" and axes[mlp + "router/kernel"] == (
      "embed", "exp")
  assert roles[mlp + "router_bias"] == "local" and axes[mlp + "router_bias"] == ("exp",)
  for name, names in [("wi", ("exp", "embed", "mlp")), ("wg", ("exp", "embed", "mlp")),
                      ("wo", ("exp", "mlp", "embed"))]:
    assert roles[mlp + "experts/" + name] == "expert" and axes[mlp + "experts/" + name] == names
  assert {roles[mlp + f"shared/{n}/kernel"] for n in ("gate", "up", "down")} == {"mlp"}
  assert roles["block_0/attn/query/kernel"] == "attention" and roles["embed/embedding"] == "embed"
  assert set(flat) - set(tasks_base.mergeable(task, flat)) == {mlp + "router_bias"}
  tasks_base.check(task, 16, jax.random.key(0))


def test_the_loss_adds_the_weighted_aux_losses_and_bits_come_from_the_cross_entropy():
  task = helpers.task(_config(load_balance_weight=0.5, router_z_weight=0.25))
  params = task.init(jax.random.key(0))
  batch = {"tokens": np.asarray(jax.random.randint(jax.random.key(1), (4, 17), 0, 256))}
  loss, aux = jax.jit(task.loss)(params, batch)
  assert aux.pop("_expert_load").shape == (1, 4)  # Private: [layers, experts], for update_local.
  aux = {k: float(v) for k, v in aux.items()}
  assert set(aux) == {"cross_entropy", "load_balance_loss", "router_z_loss", "routing_entropy",
                      "dropped_fraction", "expert_load_max"}
  want = aux["cross_entropy"] + 0.5 * aux["load_balance_loss"] + 0.25 * aux["router_z_loss"]
  assert float(loss) == pytest.approx(want, abs=1e-6)
  assert float(loss) > aux["cross_entropy"] + 0.4  # The load-balance loss is about 1.
  assert 1 / 4 <= aux["expert_load_max"] <= 1 and 0 <= aux["dropped_fraction"] < 1
  assert task.eval_metrics({"loss": 9.0, "cross_entropy": 2.0})["bits_per_byte"] == (
      2.0 / math.log(2))


@pytest.mark.parametrize("fields,match", [
    ({"model.experts_per_token": 3, "model.num_experts": 2},
     "model.experts_per_token=3 must be at most model.num_experts=2"),
    ({"model.capacity_factor": 0.0}, r"model.capacity_factor=0.0 must be in \(0, inf\)"),
    ({"model.router_z_weight": -1.0}, r"model.router_z_weight=-1.0 must be in \[0, inf\)"),
])
def test_bad_moe_fields_are_refused_at_parse_time(fields, match):
  with pytest.raises(ValueError, match=match):
    config_lib.parse(helpers.tiny_config(**fields))


def test_the_experiment_has_every_method_and_llamas_active_parameters():
  for method in methods.METHODS:
    c = moe_experiment.get_config(method)
    assert config_lib.parse(c).model.name == "moe"
    assert c.runtime == methods.METHODS[method]().runtime
  sizes = lambda c: {k: math.prod(x.shape) for k, x in fragments.flatten(
      jax.eval_shape(helpers.task(c).init, jax.random.key(0))).items()}
  moe_sizes, llama_sizes = sizes(moe_experiment.get_config()), sizes(llama_experiment.get_config())
  m = moe_experiment.get_config().model
  experts = sum(n for k, n in moe_sizes.items() if "/experts/" in k)
  routers = sum(n for k, n in moe_sizes.items() if "/router" in k)
  active = sum(moe_sizes.values()) - experts * (1 - m.experts_per_token / m.num_experts)
  assert active - routers == sum(llama_sizes.values())
  assert routers == m.num_layers * (m.d_model + 1) * m.num_experts


def test_the_moe_task_trains_with_data_parallel(tmp_path):
  c = _config()
  c.train.steps = 30
  task = helpers.task(c)
  summary = train.train_and_evaluate(c, str(tmp_path))
  # From about chance (5.57 at init; uniform over bytes is 5.55) to about 3.75.
  assert summary["final_eval_loss"] < task.chance_loss - 1.0, summary["final_eval_loss"]
  assert summary["final_eval_bits_per_byte"] == pytest.approx(
      summary["final_eval_cross_entropy"] / math.log(2))
  assert 0 <= summary["final_eval_dropped_fraction"] < 0.5
  # One router: how far it moved since the last eval (the first: since init), its spread.
  evals = [r for r in metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl")) if "eval_loss" in r]
  assert 0 < evals[0]["routing/topk_overlap_since_last_eval"] < 1
  assert 0 < evals[0]["routing/utilisation_entropy_global"] <= 1
  assert not any(k.endswith("_learners") for k in evals[0])


def test_router_bias_follows_the_load_after_each_step_without_a_gradient():
  """`model.router_bias_rate`: the bias moves by rate x sign(1/E - load), nothing else does."""
  rate = 0.01
  task = helpers.task(_config(router_bias_rate=rate))
  params = task.init(jax.random.key(0))
  island = islands_lib.make_islands(1, devices=jax.devices()[:1])[0]
  tx = optax.sgd(0.0)  # The optimizer changes nothing: only the bias update shows.
  batch = {"tokens": np.asarray(jax.random.randint(jax.random.key(1), (4, 17), 0, 256))}
  load_LxE = np.asarray(jax.jit(task.loss)(params, batch)[1]["_expert_load"])
  assert load_LxE.shape == (1, 4) and np.allclose(load_LxE.sum(-1), 1)
  p, o = island.put(params), island.put(tx.init(params))
  step = steps.make_inner_step(task, tx, island, p, o)
  after, _, _ = step(p, o, jax.device_put(batch, island.batch))
  after, before = fragments.flatten(jax.device_get(after)), fragments.flatten(params)
  for i, load_E in enumerate(load_LxE):
    key = f"block_{i}/mlp/router_bias"
    np.testing.assert_allclose(after[key], rate * np.sign(1 / 4 - load_E), atol=1e-7)
    assert np.abs(after[key]).max() == pytest.approx(rate)
  for key in before:
    if not key.endswith("router_bias"):
      np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  # Off by default: the bias stays at zero.
  plain = helpers.task(_config())
  step = steps.make_inner_step(plain, tx, island, p, o)
  p, o = island.put(params), island.put(tx.init(params))
  after, _, _ = step(p, o, jax.device_put(batch, island.batch))
  assert not np.asarray(after["block_0"]["mlp"]["router_bias"]).any()
  # Private aux values are never reported by an eval.
  means = steps.make_eval(task, island)(island.put(params), jax.device_put(batch, island.batch))
  assert "_expert_load" not in means and "expert_load_max" in means
