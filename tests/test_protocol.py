"""The protocol made faithful: numbered rounds, live sets by identity, honest rejoin,
delta downloads, elastic batches and measured grace inputs (one test per finding)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decoupled_diloco import config as config_lib
from decoupled_diloco import islands as islands_lib
from decoupled_diloco.algorithm import codecs, fragments, merge
from decoupled_diloco.algorithm.learner import Learner
from decoupled_diloco.algorithm.rounds import RoundRules, Rounds, grace_window
from decoupled_diloco.algorithm.syncer import Syncer
from decoupled_diloco.runtime import chaos, goodput
from tests.helpers import compute_free, make_team, simulation

FP32 = codecs.make_codec("fp32")


def paper_run(variant: str):
  """A variant of experiments/decoupled_diloco.py run compute-free; (sim, backend, cfg)."""
  from experiments import decoupled_diloco  # pylint: disable=g-import-not-at-top
  c = decoupled_diloco.get_config(variant)
  cfg = config_lib.parse(c)
  sim = compute_free(c, fragment_bytes=1000)
  sim.run(cfg.train.steps * cfg.diloco.num_learners)
  return sim, sim.backend, cfg


# --- 1. Rounds follow the schedule ------------------------------------------------------


@pytest.mark.parametrize("variant", ["hetero_k1", "hetero_k1_grace", "chaos"])
def test_out_of_phase_learners_create_no_extra_outer_steps(variant):
  sim, _, cfg = paper_run(variant)
  # The schedule's rounds: how far the furthest learner's position got.
  furthest = max(ln.schedule.position for ln in sim.learners)
  scheduled = furthest / cfg.diloco.sync_every
  outer_steps = sim.merges.mean()
  assert abs(outer_steps - scheduled) <= 0.05 * scheduled, (outer_steps, scheduled)


def test_slow_learners_are_rephased_and_their_late_work_is_merged():
  sim, backend, _ = paper_run("hetero_k1")
  report = sim.report()["protocol"]
  assert report["rephases"] > 0 and report["late_joined"] > 0
  # Every learner's work reaches merges: the slow ones (2, 3) too.
  merged_from = {c.learner for entries in backend.merged for c in entries}
  assert merged_from == {0, 1, 2, 3}


def test_late_policies():
  rules = RoundRules(quorum=1, grace_gamma=0.0, grace_max_s=0.0, overlap=0)
  for late, status in (("next", "late"), ("drop", "dropped"), ("reject", "rejected")):
    r = Rounds(1, 2, rules._replace(late=late), step_s=1.0, sync_s=0.0, first_rounds=[3])
    assert r.arrive(0, 0, 3, sent_at=0.0, step_s=1.0).status == "on_time"
    assert r.decide(0, 0.0).close
    assert r.close(0) == 3
    v = r.arrive(1, 0, 3, sent_at=0.0, step_s=1.0)
    assert v.status == status and v.round == (4 if late == "next" else -1)
    # A passenger never closes a round by itself.
    assert not r.decide(0, 1.0).close


# --- 2. Live sets by identity -------------------------------------------------------------


def test_a_reporter_that_went_down_does_not_fill_the_quorum():
  # M = 3, K = 1 with a grace window: learner 0 reports, then goes down.
  rules = RoundRules(quorum=1, grace_gamma=1.0, grace_max_s=10.0, overlap=2)
  r = Rounds(1, 3, rules, step_s=2.0, sync_s=0.0, first_rounds=[1])
  r.arrive(0, 0, 1, sent_at=0.0, step_s=2.0)
  r.set_live(0, False)
  d = r.decide(0, 0.5)
  assert not d.close and d.deadline is None  # No live learner has sent it: no quorum.
  r.arrive(1, 0, 1, sent_at=1.0, step_s=2.0)
  d = r.decide(0, 1.0)
  assert not d.close and d.deadline > 1.0  # Quorum by learner 1; learner 2 still has time.
  r.arrive(2, 0, 1, sent_at=1.5, step_s=2.0)
  assert r.decide(0, 1.5).close  # Every live learner has reported.


def test_k_equals_m_with_a_learner_failing_mid_round_waits_for_the_live_ones_only():
  rules = RoundRules(quorum=3, grace_gamma=0.0, grace_max_s=0.0, overlap=0)
  r = Rounds(1, 3, rules, step_s=1.0, sync_s=0.0, first_rounds=[1])
  r.arrive(0, 0, 1, sent_at=0.0, step_s=1.0)
  r.set_live(0, False)
  r.arrive(1, 0, 1, sent_at=0.0, step_s=1.0)
  assert not r.decide(0, 1.0).close  # Learner 2 is live and has not reported.
  r.arrive(2, 0, 1, sent_at=0.0, step_s=1.0)
  assert r.decide(0, 2.0).close
  # And a learner that fails while the others wait for it releases the round.
  r.close(0)
  r.set_live(0, True)
  r.arrive(0, 0, 2, sent_at=3.0, step_s=1.0)
  r.arrive(1, 0, 2, sent_at=3.0, step_s=1.0)
  assert not r.decide(0, 3.0).close
  r.set_live(2, False)
  assert r.decide(0, 3.5).close


def test_simulated_k_equals_m_merges_without_a_learner_that_went_down(tmp_path):
  # Learner 1 loses both slices at t = 2.5 (its round-3 send never happens).
  down = chaos.Timeline(start=np.array([0.0, 2.5]), end=np.array([2.5, 1e9]),
                        slices_up=np.array([2, 0]), running=np.array([True, False]),
                        num_reconfigurations=1)
  up = chaos.Timeline(np.array([0.0]), np.array([1e9]), np.array([2]), np.array([True]), 0)
  log = str(tmp_path / "e.jsonl")
  sim = simulation([1.0, 1.0, 1.0], quorum=3, timelines=[up, down, up], log_path=log)
  sim.run(12)
  sim.close()
  import json  # pylint: disable=g-import-not-at-top
  merges = [e for e in map(json.loads, open(log)) if e["event"] == "merge"]
  assert [(e["round"], e["t"], e["contributors"]) for e in merges[:4]] == [
      (1, 1.0, 3), (2, 2.0, 3), (3, 3.0, 2), (4, 4.0, 2)]


# --- 3. Honest rejoin -----------------------------------------------------------------------


def test_rejoin_resets_the_inner_optimizer_and_keeps_the_schedule():
  team = make_team()
  for _ in range(3):
    team.inner_step(1)
  mu = lambda learner: jax.tree.leaves(learner.opt_state[1][0].mu)
  assert any(np.any(np.asarray(x) != 0) for x in mu(team.learners[1]))
  team.restart(1, fresh_optimizer=True, schedule_step=7)
  learner = team.learners[1]
  assert all(np.all(np.asarray(x) == 0) for x in mu(learner))
  assert int(learner.opt_state[1][0].count) == 0  # Adam's bias correction starts anew...
  assert int(learner.opt_state[1][-1].count) == 7  # ...the learning-rate schedule does not.
  flat = fragments.flatten(learner.params)
  for f, theta in zip(team.fragments, team.syncer.theta):
    for k, t in zip(f, theta):
      np.testing.assert_array_equal(flat[k], t)
  # The optimistic ablation keeps the moments.
  team.inner_step(0)
  kept = [np.asarray(x) for x in mu(team.learners[0])]
  team.restart(0, fresh_optimizer=False)
  for a, b in zip(kept, mu(team.learners[0])):
    np.testing.assert_array_equal(a, b)


# --- 4. Delta downloads -----------------------------------------------------------------------


def test_lossy_downloads_track_theta_without_drift_and_a_rejoin_gets_theta_exactly():
  int4 = codecs.make_codec("int4", block_size=64)
  rng = np.random.default_rng(0)
  flat = {"a": rng.normal(size=256).astype(np.float32)}
  params = fragments.unflatten(flat)

  def fake_step(params, opt_state, batch):
    return jax.tree.map(lambda p: p - batch, params), opt_state, jnp.float32(0.0)

  island = islands_lib.make_islands(2)[0]
  make = lambda: Learner(0, island, fake_step, params, {}, (("a",),), alpha=0.0, up=FP32,
                         down=int4, error_feedback=False, units_per_step=1)
  learner = make()
  sync = Syncer(flat, (("a",),), outer_tx=optax.sgd(0.7, momentum=0.9, nesterov=True),
                merge_rule="mean", weighting="uniform", up=FP32, down=int4, num_learners=1,
                max_abs_delta=1e4)
  errors, updates = [], []
  for rnd in range(50):
    before = np.asarray(sync.theta[0][0])
    learner.inner_step(jnp.asarray(rng.normal(size=256).astype(np.float32) * 0.01))
    sync.receive(learner.pseudo_gradient(0, rnd), rnd)
    pub = sync.merge(0, rnd)
    assert pub.base_version == pub.version - 1  # An update, not the fragment.
    assert learner.align(pub) == "applied"
    theta = np.asarray(sync.theta[0][0])
    errors.append(np.abs(np.asarray(learner.base[0][0]) - theta).max())
    updates.append(np.abs(theta - before).max())
  # Within one update's int4 rounding (half a step of 7 levels of the block's
  # largest |update|), every round: no drift, and far below quantizing Theta.
  assert all(e <= u / 7 for e, u in zip(errors, updates)), list(zip(errors, updates))
  assert max(errors[-10:]) <= 2 * max(errors[:10])
  theta_quantized = np.abs(np.asarray(int4.decode(int4.encode(jnp.asarray(theta)), (256,),
                                                  jnp.float32)) - theta).max()
  assert max(errors) < theta_quantized / 4
  # An update against a version the learner does not hold is refused, not applied.
  stale = make()
  assert stale.align(pub) == "gap"
  # A learner that rejoins gets Theta exactly, then follows the updates again.
  stale.recover([sync.publication(0)])
  np.testing.assert_array_equal(np.asarray(stale.base[0][0]), theta)
  stale.inner_step(jnp.float32(0.01))
  sync.receive(stale.pseudo_gradient(0, 50), 50)
  assert stale.align(sync.merge(0, 50)) == "applied"


def test_alignment_mixes_local_and_global_with_alpha():
  island = islands_lib.make_islands(2)[1]
  flat = {"a": np.array([1.0, 2.0], np.float32)}

  def fake_step(params, opt_state, batch):
    return jax.tree.map(lambda p: p - batch, params), opt_state, jnp.float32(0.0)

  learner = Learner(0, island, fake_step, fragments.unflatten(flat), {}, (("a",),),
                    alpha=0.25, up=FP32, down=FP32, error_feedback=False, units_per_step=1)
  learner.inner_step(jnp.float32(1.5))  # a = (-0.5, 0.5), sent.
  sync = Syncer(flat, (("a",),), outer_tx=optax.sgd(2.0), merge_rule="mean",
                weighting="uniform", up=FP32, down=FP32, num_learners=1, max_abs_delta=1e4)
  sync.receive(learner.pseudo_gradient(0, 0), 0)
  learner.inner_step(jnp.float32(1.0))  # The overlap step: local a = (-1.5, -0.5).
  learner.align(sync.merge(0, 0))  # Global: (1, 2) - 2 * (1.5, 1.5) = (-2, -1).
  # 0.25 * local + 0.75 * global = (-0.375 - 1.5, -0.125 - 0.75).
  np.testing.assert_allclose(fragments.flatten(learner.params)["a"], [-1.875, -0.875])


# --- 5. Elastic batches -------------------------------------------------------------------------


def test_tokens2_per_step_weights_a_shrunken_learner_lower():
  # Learner 1 runs on one of its two slices for the whole run.
  half = chaos.Timeline(np.array([0.0]), np.array([1e9]), np.array([1]), np.array([True]), 0)
  full = chaos.Timeline(np.array([0.0]), np.array([1e9]), np.array([2]), np.array([True]), 0)
  backend = goodput.AnalyticBackend(2, [100], [100], units_per_step=64)
  sim = simulation([1.0, 1.0], quorum=2, sync_every=4, timelines=[full, half], backend=backend)
  sim.run(16)
  assert sim.learners[1].schedule.step == 8  # Same step time on fewer slices...
  last = backend.merged[-1]
  assert [(c.learner, c.steps, c.tokens) for c in last] == [(0, 4, 256), (1, 4, 128)]
  steps, tokens = [c.steps for c in last], [c.tokens for c in last]
  share = {w: (lambda x: x[1] / x.sum())(merge.weights(steps, tokens, w))
           for w in merge.WEIGHTINGS}
  # ...on half the batch: tokens halves its share, tokens^2/steps quarters it.
  assert share["uniform"] == pytest.approx(1 / 2)
  assert share["tokens"] == pytest.approx(1 / 3)
  assert share["tokens2_per_step"] == pytest.approx(1 / 5)


def test_team_shrinks_the_batch_on_fewer_slices():
  team = make_team()
  team.inner_step(0, share=1.0)
  team.inner_step(1, share=0.5)
  assert team.units.tolist() == [8 * 32, 4 * 32]
  assert team.learners[1].c_tokens.tolist() == [4 * 32]


# --- 6. Grace inputs ------------------------------------------------------------------------------


def test_grace_window_uses_the_measured_xis():
  rules = RoundRules(quorum=1, grace_gamma=0.5, grace_max_s=100.0, overlap=4)
  r = Rounds(1, 2, rules, step_s=1.0, sync_s=0.0, first_rounds=[1])
  r.observe_sync(2.0)  # xi_sync = 0.1 * 2 = 0.2
  # Learner 0 reports a 3 s step; its round was sent at t = 10 and arrives at 10.5.
  r.arrive(0, 0, 1, sent_at=10.0, step_s=3.0)  # xi_step = 1 + 0.1 * 2 = 1.2
  d = r.decide(0, 10.5)  # xi_quorum = 0.1 * 0.5 = 0.05: upload included, not 0.
  xi_step, xi_quorum, xi_sync = 1.2, 0.05, 0.2
  assert (r.xi_step, r.xi_quorum, r.xi_sync) == pytest.approx((xi_step, xi_quorum, xi_sync))
  expected = 0.5 * (4 * xi_step - (xi_quorum + xi_sync))
  assert d.grace_s == pytest.approx(expected) and d.deadline == pytest.approx(10.5 + expected)
  assert expected == pytest.approx(grace_window(overlap=4, step_s=xi_step, quorum_s=xi_quorum,
                                                sync_s=xi_sync, gamma=0.5, grace_max_s=100.0))
  assert not r.decide(0, 10.5 + expected / 2).close
  assert r.decide(0, 10.5 + expected).close


def test_simulator_logs_the_window_and_its_inputs_each_round(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  log = str(tmp_path / "e.jsonl")
  sim = simulation([1.0, 1.3], quorum=1, grace_gamma=1.0, overlap=2, sync_every=3,
                   latency_s=0.25, log_path=log)
  sim.run(20)
  sim.close()
  graces = [e for e in map(json.loads, open(log)) if e["event"] == "grace"]
  merges = [e for e in map(json.loads, open(log)) if e["event"] == "merge"]
  assert len(graces) == len(merges) > 0
  for g in graces:
    assert g["xi_quorum"] > 0  # Measured from the round's send: the upload counts.
    assert g["seconds"] == pytest.approx(max(0.0, min(
        100.0, 2 * g["xi_step"] - (g["xi_quorum"] + g["xi_sync"]))), abs=1e-8)


# --- 7. Goodput accounting ---------------------------------------------------------------------------


def test_every_lost_chip_second_has_a_cause():
  sim, _, cfg = paper_run("chaos")
  r = sim.report()
  lost = r["lost_chip_s"]
  assert r["useful_chip_s"] + sum(lost.values()) == pytest.approx(r["allocated_chip_s"])
  assert r["goodput"] == pytest.approx(r["useful_chip_s"] / r["allocated_chip_s"])
  assert lost["slices_down"] > 0 and lost["reconfiguration"] > 0 and lost["unsent_work"] > 0
  assert lost["idle_spares"] == 0
  # What is still in progress at the end is at most one step per learner.
  chips = cfg.chaos.slices_per_learner * cfg.chaos.chips_per_slice
  for learner in r["learners"]:
    assert -1e-6 <= learner["lost_chip_s"]["in_progress"] <= 2 * chips * cfg.sim.step_seconds
  assert not math.isnan(r["goodput"])


@pytest.mark.parametrize("first_merged", [False, True])
def test_a_learner_that_sends_twice_before_aligning_is_not_counted_twice(first_merged):
  flat = {"a": np.array([1.0, 2.0], np.float32)}

  def fake_step(params, opt_state, batch):
    return jax.tree.map(lambda p: p - batch, params), opt_state, jnp.float32(0.0)

  learner = Learner(0, islands_lib.make_islands(2)[0], fake_step, fragments.unflatten(flat), {},
                    (("a",),), alpha=0.0, up=FP32, down=FP32, error_feedback=False,
                    units_per_step=1)
  sync = Syncer(flat, (("a",),), outer_tx=optax.sgd(1.0), merge_rule="mean",
                weighting="tokens2_per_step", up=FP32, down=FP32, num_learners=1,
                max_abs_delta=1e4)
  learner.inner_step(jnp.float32(0.5))
  sync.receive(learner.pseudo_gradient(0, 1), 1)  # Delta 0.5 over 1 step.
  if first_merged:
    sync.merge(0, 1)
    np.testing.assert_allclose(sync.theta[0][0], [0.5, 1.5])
  learner.inner_step(jnp.float32(0.25))
  learner.inner_step(jnp.float32(0.25))
  second = learner.pseudo_gradient(0, 2)  # Delta 1.0 over 3 steps: holds the first.
  assert second.steps == 3
  sync.receive(second, 2)
  if first_merged:  # Only the new 0.5 is applied, not 1.0 again.
    sync.merge(0, 2)
  else:  # The fresher delta takes the first one's place, in round 1.
    assert [len(sync.pending[0].get(r, [])) for r in (1, 2)] == [1, 0]
    sync.merge(0, 1)
  np.testing.assert_allclose(sync.theta[0][0], [0.0, 1.0], atol=1e-6)
