"""Fragments, merge rules, weights, the syncer and the learner, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decoupled_diloco import config as config_lib
from decoupled_diloco import islands as islands_lib
from decoupled_diloco.algorithm import codecs, fragments, merge
from decoupled_diloco.algorithm.learner import Learner
from decoupled_diloco.algorithm.messages import Contribution
from decoupled_diloco.algorithm.syncer import Syncer
from decoupled_diloco.models import transformer

FP32 = codecs.make_codec("fp32")


def tiny_flat():
  c = config_lib.ModelConfig(**config_lib.PRESETS["tiny"])
  return fragments.flatten(transformer.init_params(c, jax.random.key(0)))


@pytest.mark.parametrize("strategy", fragments.STRATEGIES)
@pytest.mark.parametrize("num", [1, 3, 5])
def test_fragments_cover_every_tensor_once(strategy, num):
  flat = tiny_flat()
  frags = fragments.partition(flat, num, strategy)
  assert len(frags) == num and all(frags)
  together = [k for f in frags for k in f]
  assert sorted(together) == sorted(flat) and len(set(together)) == len(together)


@pytest.mark.parametrize("num", [2, 3, 4, 6])
def test_balanced_packing_is_within_four_thirds_of_ideal(num):
  flat = tiny_flat()
  sizes = fragments.fragment_bytes(flat, fragments.partition(flat, num, "balanced"))
  ideal = sum(sizes) / num
  assert max(np.prod(np.shape(v)) * 4 for v in flat.values()) <= ideal  # Precondition.
  assert max(sizes) <= 4 / 3 * ideal
  layer = fragments.fragment_bytes(flat, fragments.partition(flat, num, "layer"))
  assert max(sizes) <= max(layer)


def test_split_experts_partition_a_stacked_tensor_by_expert_and_reassemble_exactly():
  rng = np.random.default_rng(0)
  flat = {"block_0/moe/wi": rng.normal(size=(4, 6, 8)).astype(np.float32),  # [exp, embed, mlp]
          "block_0/moe/router": rng.normal(size=(6, 4)).astype(np.float32),
          "embed/embedding": rng.normal(size=(10, 6)).astype(np.float32)}
  frags = fragments.partition(flat, 3, "balanced", split={"block_0/moe/wi"})
  keys = [k for f in frags for k in f]
  assert sorted(keys) == sorted([f"block_0/moe/wi#{e}" for e in range(4)]
                                + ["block_0/moe/router", "embed/embedding"])
  # The experts (48 floats each) spread over fragments; bytes count pieces.
  assert len({p for p, f in enumerate(frags) for k in f if "#" in k}) > 1
  assert sum(fragments.fragment_bytes(flat, frags)) == 4 * sum(x.size for x in flat.values())
  np.testing.assert_array_equal(fragments.take(flat, "block_0/moe/wi#2"), flat["block_0/moe/wi"][2])
  # Every piece back, and the whole tensor is the original, bit for bit.
  pieces = {k: fragments.take(flat, k) for k in keys}
  whole = fragments.assemble(pieces)
  assert sorted(whole) == sorted(flat)
  for k in flat:
    np.testing.assert_array_equal(whole[k], flat[k])
  # Writing some experts sets exactly those slices; writing all of them stacks them.
  some = fragments.put(flat, ["block_0/moe/wi#1", "embed/embedding"],
                       [np.ones((6, 8), np.float32), np.zeros((10, 6), np.float32)])
  want = flat["block_0/moe/wi"].copy()
  want[1] = 1
  np.testing.assert_array_equal(some["block_0/moe/wi"], want)
  assert not some["embed/embedding"].any() and flat["embed/embedding"].any()
  every = fragments.put(flat, [f"block_0/moe/wi#{e}" for e in range(4)],
                        [np.full((6, 8), e, np.float32) for e in range(4)])
  np.testing.assert_array_equal(every["block_0/moe/wi"][:, 0, 0], [0, 1, 2, 3])
  with pytest.raises(ValueError, match="do not cover"):
    fragments.assemble({k: pieces[k] for k in ("block_0/moe/wi#0", "block_0/moe/wi#2")})
  with pytest.raises(ValueError, match="no expert axis"):
    fragments.partition({"bias": np.zeros(4)}, 1, "balanced", split={"bias"})


def test_layer_fragments_are_contiguous_modules():
  frags = fragments.partition(tiny_flat(), 2, "layer")
  mods = [sorted({k.split("/")[0] for k in f}) for f in frags]
  assert "embed" in mods[0] and "head" in mods[1]
  assert not set(mods[0]) & set(mods[1])


def test_too_many_fragments_and_unknown_strategy():
  with pytest.raises(ValueError, match="diloco.num_fragments"):
    fragments.partition({"a": np.zeros(2)}, 2, "balanced")
  with pytest.raises(ValueError, match="diloco.fragmentation='x'"):
    fragments.partition({"a": np.zeros(2)}, 1, "x")


def test_sync_offsets_are_staggered_and_each_fragment_due_once_per_period():
  offsets = fragments.sync_offsets(4, 24)
  assert offsets == (0, 6, 12, 18)
  due_steps = {p: [t for t in range(1, 49) if p in fragments.due(t, offsets, 24)]
               for p in range(4)}
  assert due_steps == {0: [24, 48], 1: [6, 30], 2: [12, 36], 3: [18, 42]}
  assert fragments.due(0, offsets, 24) == []


def test_rda_keeps_norm_of_orthogonal_equal_deltas():
  d = jnp.eye(4) * 3.0  # Four orthogonal deltas of norm 3.
  w = jnp.ones(4)
  np.testing.assert_allclose(jnp.linalg.norm(merge.merge_rda(d, w)), 3.0, rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(merge.merge_mean(d, w)), 1.5, rtol=1e-6)


def test_rda_equals_mean_for_equal_deltas_and_handles_zero():
  d = jnp.stack([jnp.array([1.0, -2.0, 2.0])] * 3)
  w = jnp.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(merge.merge_rda(d, w), d[0], rtol=1e-6)
  np.testing.assert_allclose(merge.merge_mean(d, w), d[0], rtol=1e-6)
  z = jnp.stack([jnp.zeros(3), jnp.array([0.0, 3.0, 4.0])])
  # unit(0) = 0: radius (0 + 5)/2, direction unit((0 + (0, .6, .8))/2) = (0, .6, .8).
  np.testing.assert_allclose(merge.merge_rda(z, jnp.ones(2)), [0.0, 1.5, 2.0], rtol=1e-6)
  assert np.all(merge.merge_rda(jnp.zeros((2, 3)), jnp.ones(2)) == 0)


def test_weights():
  np.testing.assert_allclose(merge.weights([10, 5], [100, 100], "tokens2_per_step"),
                             [1000.0, 2000.0])
  np.testing.assert_allclose(merge.weights([10, 5], [100, 50], "tokens"), [100.0, 50.0])
  np.testing.assert_allclose(merge.weights([10, 0], [100, 0], "uniform"), [1.0, 1.0])
  np.testing.assert_allclose(merge.weights([0], [0], "tokens2_per_step"), [0.0])
  with pytest.raises(ValueError, match="diloco.weighting"):
    merge.weights([1], [1], "votes")


def test_rda_rule_keeps_embeddings_on_mean():
  assert merge.rule_for("rda", on_mean=True) is merge.merge_mean
  assert merge.rule_for("rda", on_mean=False) is merge.merge_rda
  assert merge.rule_for("rda_everywhere", on_mean=True) is merge.merge_rda
  assert merge.rule_for("mean", on_mean=False) is merge.merge_mean


def contribution(learner, fragment, deltas, *, version=0, steps=1, tokens=1):
  payload = codecs.encode_tree(FP32, [jnp.asarray(d, jnp.float32) for d in deltas])
  return Contribution(learner, fragment, 0, version, steps, tokens, tuple(payload),
                      codecs.payload_nbytes(payload))


def make_syncer(flat, frags, tx, **kw):
  kw = {"merge_rule": "mean", "weighting": "uniform", "num_learners": 2,
        "max_abs_delta": 1e4, "up": FP32, "down": FP32, **kw}
  return Syncer(flat, frags, outer_tx=tx, **kw)


def test_outer_nesterov_matches_hand_computation():
  flat = {"a": np.array([1.0, 2.0], np.float32), "b": np.array(4.0, np.float32)}
  s = make_syncer(flat, (("a", "b"),), optax.sgd(0.5, momentum=0.5, nesterov=True))
  # Round 1: learners send (1, 2 | 2) and (3, 2 | 0): mean delta (2, 2 | 1).
  s.receive(contribution(0, 0, [[1.0, 2.0], 2.0]), 0)
  s.receive(contribution(1, 0, [[3.0, 2.0], 0.0]), 0)
  pub = s.merge(0, 0)
  # Nesterov: trace = d; update = -lr (d + mu trace) = -0.5 * 1.5 d.
  np.testing.assert_allclose(s.theta[0][0], [1.0 - 1.5, 2.0 - 1.5])
  np.testing.assert_allclose(s.theta[0][1], 4.0 - 0.75)
  assert pub.version == 1 and s.version[0] == 1
  # Round 2: mean delta (0, 2 | -1); trace = d2 + mu d1 = (1, 3 | -0.5).
  s.receive(contribution(0, 0, [[0.0, 2.0], -1.0], version=1), 0)
  s.merge(0, 0)
  # update = -0.5 (d2 + 0.5 trace) = -0.5 * ((0.5, 3.5 | -1.25)).
  np.testing.assert_allclose(s.theta[0][0], [-0.5 - 0.25, 0.5 - 1.75])
  np.testing.assert_allclose(s.theta[0][1], 3.25 + 0.625)


def test_syncer_rejects_bad_contributions_and_counts_them():
  flat = {"a": np.zeros(3, np.float32)}
  s = make_syncer(flat, (("a",),), optax.sgd(1.0), max_abs_delta=100.0)
  assert not s.receive(contribution(0, 0, [[1.0, np.nan, 0.0]]), 0)
  assert not s.receive(contribution(1, 0, [[1.0, np.inf, 0.0]]), 0)
  assert not s.receive(contribution(0, 0, [[1e6, 0.0, 0.0]]), 0)
  assert not s.receive(contribution(5, 0, [[1.0, 0.0, 0.0]]), 0)
  assert not s.receive(contribution(0, 3, [[1.0, 0.0, 0.0]]), 0)
  assert not s.receive(contribution(0, 0, [[1.0, 0.0, 0.0]], version=7), 0)
  assert not s.receive(contribution(0, 0, [[1.0, 0.0]]), 0)  # Wrong shape.
  assert s.contributors(0, 0) == 0 and s.merge(0, 0) is None
  assert sum(s.rejected.values()) == 7 and s.rejected["non-finite"] == 2
  assert s.receive(contribution(1, 0, [[1.0, 2.0, 3.0]]), 0)
  s.merge(0, 0)
  np.testing.assert_allclose(s.theta[0][0], [-1.0, -2.0, -3.0])


@pytest.mark.parametrize("name", ["int4", "sign", "topk"])
def test_syncer_rejects_malformed_compressed_payloads(name):
  up = codecs.make_codec(name, block_size=64, topk_fraction=0.1)
  s = make_syncer({"a": np.zeros(100, np.float32)}, (("a",),), optax.sgd(1.0), up=up)
  good = up.encode(jnp.linspace(-1.0, 1.0, 100))
  key = "indices" if name == "topk" else "scales"
  malformed = [
      {**good, "extra": jnp.zeros(2)},  # A key the codec does not send.
      {k: v for k, v in good.items() if k != "values"},  # A key missing.
      {**good, "values": jnp.concatenate([good["values"]] * 2)},  # Too long.
      {**good, "values": good["values"].astype(jnp.float32)},  # Wrong dtype (topk: below).
      {**good, key: good[key][:1]},  # One scale (or index row) broadcast to every block.
      [good],  # Not a dict.
  ]
  if name == "topk":
    malformed[3] = {**good, "values": good["values"].astype(jnp.bfloat16)}
  for payload in malformed:
    c = Contribution(0, 0, 0, 0, 1, 1, (payload,), 0)
    assert not s.receive(c, 0)
  assert s.rejected["malformed payload"] == len(malformed)
  if name == "topk":  # Well-formed, but an index past its 64-value block.
    outside = {**good, "indices": good["indices"].at[1, 0].set(64)}
    assert not s.receive(Contribution(0, 0, 0, 0, 1, 1, (outside,), codecs.payload_nbytes(outside)), 0)
    assert s.rejected["non-finite"] == 1
  assert s.contributors(0, 0) == 0
  assert s.receive(Contribution(1, 0, 0, 0, 1, 1, (good,), codecs.payload_nbytes(good)), 0)
  s.merge(0, 0)
  np.testing.assert_array_equal(s.theta[0][0], -up.decode(good, (100,), jnp.float32))


def test_learner_pseudo_gradient_and_align():
  island = islands_lib.make_islands(2)[1]
  flat = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([5.0], np.float32)}
  params = fragments.unflatten(flat)

  def fake_step(params, opt_state, batch):  # "Training" subtracts the batch.
    return jax.tree.map(lambda p: p - batch, params), opt_state, jnp.float32(0.0)

  learner = Learner(0, island, fake_step, params, {}, (("a",), ("b",)), alpha=0.25,
                    up=FP32, down=FP32, error_feedback=False, units_per_step=8)
  learner.inner_step(jnp.float32(1.0))
  learner.inner_step(jnp.float32(0.5))
  c = learner.pseudo_gradient(0, 0)
  assert (c.fragment, c.steps, c.tokens, c.base_version, c.nbytes) == (0, 2, 16, 0, 8)
  np.testing.assert_allclose(codecs.decode_tree(FP32, list(c.payload), [flat["a"]])[0],
                             [1.5, 1.5])
  sync = make_syncer(flat, (("a",), ("b",)), optax.sgd(1.0), num_learners=1)
  sync.receive(c, 0)
  pub = sync.merge(0, 0)  # Global a = (1, 2) - (1.5, 1.5) = (-0.5, 0.5).
  learner.align(pub)
  a = fragments.flatten(learner.params)["a"]
  # 0.25 * local (-0.5, 0.5) + 0.75 * global (-0.5, 0.5).
  np.testing.assert_allclose(a, [-0.5, 0.5])
  assert {d.id for d in a.devices()} == {d.id for d in island.mesh.devices.flat}
  assert learner.c_steps.tolist() == [0, 2] and learner.base_version.tolist() == [1, 0]
  learner.inner_step(jnp.float32(1.0))  # Donation must not delete the new base.
  np.testing.assert_allclose(learner.base[0][0], [-0.5, 0.5])
  np.testing.assert_allclose(fragments.flatten(learner.params)["b"], [2.5])


SIGN4 = codecs.make_codec("sign", block_size=4)


def sign_feedback_learner(**kw):
  """One learner on a 4-value fragment, sign codec with error feedback, and a syncer
  whose unit outer SGD step moves the global model by exactly what was sent."""
  flat = {"a": np.zeros(4, np.float32)}

  def fake_step(params, opt_state, batch):  # "Training" subtracts the batch.
    return jax.tree.map(lambda p: p - batch, params), opt_state, jnp.float32(0.0)

  learner = Learner(0, islands_lib.make_islands(2)[0], fake_step, fragments.unflatten(flat), {},
                    (("a",),), alpha=0.0, up=SIGN4, down=FP32, error_feedback=True,
                    units_per_step=8, **kw)
  return learner, make_syncer(flat, (("a",),), optax.sgd(1.0), num_learners=1, up=SIGN4)


@pytest.mark.parametrize("restart", ["offset", "global"])
def test_error_feedback_restart_points(restart):
  learner, sync = sign_feedback_learner(feedback_restart=restart)
  sign = SIGN4
  progress = [np.array([1.0, 0.1, -0.2, 0.5], np.float32),
              np.array([0.3, -0.4, 0.2, 0.1], np.float32)]
  sent = np.zeros(4)
  for r, v in enumerate(progress):
    learner.inner_step(jnp.asarray(v))
    local = np.asarray(fragments.flatten(learner.params)["a"])
    c = learner.pseudo_gradient(0, 0)
    decoded = np.asarray(sign.decode(c.payload[0], (4,), jnp.float32))
    # Either way the send is x = residual before + this round's progress.
    x = decoded + np.asarray(learner.residual[0][0])
    np.testing.assert_allclose(x, sum(progress[:r + 1]) - sent, atol=1e-6)
    sent += decoded
    assert sync.receive(c, 0)
    learner.align(sync.merge(0, 0))
    glob = np.asarray(sync.theta[0][0])
    np.testing.assert_allclose(glob, -sent, atol=1e-6)
    restarted = np.asarray(fragments.flatten(learner.params)["a"])
    if restart == "offset":  # Where its own steps took it: Theta - residual.
      np.testing.assert_allclose(restarted, local, atol=1e-6)
    else:
      np.testing.assert_array_equal(restarted, glob)
  # The residual is what the global model still lacks of the learner's progress.
  np.testing.assert_allclose(np.asarray(learner.residual[0][0]), sum(progress) - sent, atol=1e-6)
  assert np.any(np.asarray(learner.residual[0][0]) != 0)  # Sign is lossy here.


def test_error_feedback_decay_carries_a_share_of_the_residual():
  learner, sync = sign_feedback_learner(feedback_decay=0.5)
  sign = SIGN4
  carried = np.zeros(4, np.float32)
  for v in ([1.0, 0.1, -0.2, 0.5], [0.3, -0.4, 0.2, 0.1]):
    learner.inner_step(jnp.asarray(v, jnp.float32))
    c = learner.pseudo_gradient(0, 0)
    x = carried + np.asarray(v, np.float32)  # Restarted at Theta - carried: the delta holds it.
    decoded = np.asarray(sign.decode(c.payload[0], (4,), jnp.float32))
    np.testing.assert_allclose(decoded, np.mean(np.abs(x)) * np.sign(x), rtol=1e-6)
    carried = 0.5 * (x - decoded)  # Half of what the codec dropped.
    np.testing.assert_allclose(np.asarray(learner.residual[0][0]), carried, atol=1e-6)
    assert sync.receive(c, 0)
    learner.align(sync.merge(0, 0))
    restarted = np.asarray(fragments.flatten(learner.params)["a"])
    np.testing.assert_allclose(restarted, np.asarray(sync.theta[0][0]) - carried, atol=1e-6)
  with pytest.raises(ValueError, match="feedback_decay"):
    sign_feedback_learner(feedback_decay=1.5)


def test_syncer_admits_stale_contributions_unless_bounded():
  flat = {"a": np.zeros(2, np.float32)}
  for bound, admitted in ((None, True), (2, True), (1, False)):
    s = make_syncer(flat, (("a",),), optax.sgd(1.0), max_staleness=bound)
    for _ in range(2):  # Two merges: the global fragment is at version 2.
      s.receive(contribution(0, 0, [[1.0, 1.0]], version=int(s.version[0])), 0)
      s.merge(0, 0)
    assert s.receive(contribution(1, 0, [[1.0, 1.0]], version=0), 0) is admitted
    assert s.rejected["stale"] == (0 if admitted else 1)
