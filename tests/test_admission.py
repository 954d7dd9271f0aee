"""Nothing a learner sends can poison or steer the global model (issue 10, findings 1-2).

Table-driven: every hostile contribution is rejected or bounded, and the global
model stays finite and within the bound afterwards.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decoupled_diloco.algorithm import codecs
from decoupled_diloco.algorithm.messages import Contribution
from decoupled_diloco.algorithm.syncer import Syncer, cap_shares
from tests.helpers import make_team

N = 64
FP32, INT4 = codecs.make_codec("fp32"), codecs.make_codec("int4", block_size=32)
TOKENS_PER_STEP = 256


def syncer(up=FP32, **kw):
  kw = {"merge_rule": "mean", "weighting": "tokens2_per_step", "num_learners": 4,
        "max_abs_delta": 1e4, "max_tokens_per_step": TOKENS_PER_STEP,
        "max_weight_share": 0.5, "max_norm_ratio": 10.0, "sync_every": 10, **kw}
  return Syncer({"a": np.zeros(N, np.float32)}, (("a",),), outer_tx=optax.sgd(1.0), up=up,
                down=FP32, **kw)


def honest(learner, delta, *, steps=10, codec=FP32, rnd=0):
  payload = (codec.encode(jnp.asarray(delta, jnp.float32)),)
  return Contribution(learner, 0, rnd, 0, steps, steps * TOKENS_PER_STEP, payload,
                      codecs.payload_nbytes(payload))


def small(seed):
  return np.random.default_rng(seed).normal(size=N).astype(np.float32) * 0.01


def negative_scale():
  c = honest(0, small(0), codec=INT4)
  p = dict(c.payload[0])
  p["scales"] = -p["scales"]
  return c._replace(payload=(p,))


HOSTILE = {
    "tokens 1e40": lambda: honest(0, small(0))._replace(tokens=10**40),
    "tokens nan": lambda: honest(0, small(0))._replace(tokens=float("nan")),
    "tokens inf": lambda: honest(0, small(0))._replace(tokens=float("inf")),
    "tokens 1e19 over one step": lambda: honest(0, small(0), steps=1)._replace(tokens=10**19),
    "nbytes 1": lambda: honest(0, small(0))._replace(nbytes=1),
    "nbytes negative": lambda: honest(0, small(0))._replace(nbytes=-10**12),
    "learner 1.5": lambda: honest(0, small(0))._replace(learner=1.5),
    "learner out of range": lambda: honest(0, small(0))._replace(learner=9),
    "base version -7": lambda: honest(0, small(0))._replace(base_version=-7),
    "base version ahead": lambda: honest(0, small(0))._replace(base_version=3),
    "zero steps": lambda: honest(0, small(0))._replace(steps=0, tokens=0),
    "steps bool": lambda: honest(0, small(0))._replace(steps=True),
    "round negative": lambda: honest(0, small(0))._replace(round=-1),
    "sent_at nan": lambda: honest(0, small(0))._replace(sent_at=float("nan")),
    "nan values": lambda: honest(0, np.full(N, np.nan)),
    "inf values": lambda: honest(0, np.full(N, np.inf)),
    "1e6 values": lambda: honest(0, np.full(N, 1e6)),
    "negative int4 scale": negative_scale,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_contribution_is_rejected_and_the_model_stays_intact(name):
  s = syncer(up=INT4 if "int4" in name else FP32)
  c = HOSTILE[name]()
  assert not s.receive(c, 0), name
  assert s.merge(0, 0) is None
  assert sum(s.rejected.values()) == 1
  np.testing.assert_array_equal(np.asarray(s.theta[0][0]), np.zeros(N, np.float32))
  # Honest learners go on as before.
  assert s.receive(honest(1, small(1), codec=s.up), 0) and s.merge(0, 0) is not None
  assert np.all(np.isfinite(np.asarray(s.theta[0][0])))


def test_one_learner_cannot_claim_most_of_the_weight():
  s = syncer()
  attacker = np.ones(N, np.float32) * 0.01
  for m in range(3):
    assert s.receive(honest(m, small(m)), 0)
  # It claims 1000x the steps (and as many tokens as they could hold): it is
  # capped at half of the round's weight, not 99.9997%.
  assert s.receive(honest(3, attacker, steps=10_000), 0)
  s.merge(0, 0)
  merged = -np.asarray(s.theta[0][0])
  honest_mean = np.mean([small(m) for m in range(3)], axis=0)
  np.testing.assert_allclose(merged, 0.5 * attacker + 0.5 * honest_mean, rtol=1e-5, atol=1e-7)


def test_cap_shares_water_fills():
  w = np.array([100.0, 1.0, 1.0, 2.0], np.float32)
  capped = cap_shares(w, [0, 1, 2, 3], 0.5)
  share = capped / capped.sum()
  np.testing.assert_allclose(share, [0.5, 0.125, 0.125, 0.25], rtol=1e-6)
  np.testing.assert_array_equal(cap_shares(w, [0, 0, 0, 0], 0.5), w)  # One learner: all of it.
  even = np.array([1.0, 1.0], np.float32)
  assert cap_shares(even, [0, 1], 0.5) is even  # Under the cap: untouched, bit for bit.


@pytest.mark.parametrize("bound", ["clip", "reject"])
def test_a_huge_delta_is_clipped_or_rejected_once_norms_are_known(bound):
  s = syncer(norm_bound=bound)
  for r in range(3):  # The honest learners' norms set the bound.
    for m in range(3):
      assert s.receive(honest(m, small(10 * r + m), rnd=r), r)
    s.merge(0, r)
  before = np.asarray(s.theta[0][0]).copy()
  huge = np.full(N, 9000.0, np.float32)  # Passes max_abs_delta = 1e4.
  admitted = s.receive(honest(3, huge, rnd=3), 3)
  assert admitted == (bound == "clip")
  if admitted:
    assert s.clipped == 1
    s.receive(honest(0, small(99), rnd=3), 3)
    s.merge(0, 3)
    moved = np.linalg.norm(np.asarray(s.theta[0][0]) - before)
    assert moved < 10 * 10 * np.linalg.norm(small(0))  # Bounded: not 9000 * sqrt(64).
  else:
    assert s.rejected["norm above bound"] == 1


def test_a_spoofed_nan_message_does_not_reset_a_healthy_learner():
  team = make_team()
  team.inner_step(1)
  params = jax.device_get(team.learners[1].params)
  real = team.send(1, 0, 0)
  spoof = real._replace(payload=jax.tree.map(lambda x: x * np.nan, real.payload))
  assert team.validate(spoof) is None
  assert team.syncer.rejected["non-finite"] == 1
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(team.learners[1].params)):
    np.testing.assert_array_equal(a, np.asarray(b))  # Not restarted.


def test_zero_deltas_do_not_freeze_the_norm_bound():
  # A first step at learning rate 0 sends an exact zero; the bound must not become 0.
  s = syncer()
  for r in range(4):
    for m in range(3):
      delta = np.zeros(N, np.float32) if r == 0 else small(10 * r + m)
      assert s.receive(honest(m, delta, rnd=r), r)
    s.merge(0, r)
  assert s.clipped == 0 and np.all(s.recent_norm[0, :3] > 0)
