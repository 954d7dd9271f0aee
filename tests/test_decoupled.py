"""Decoupled DiLoCo: quorum, grace, staleness, failures, determinism, reductions."""

import json
import math

import jax
import numpy as np
import pytest

from decoupled_diloco import config as config_lib
from decoupled_diloco import train
from decoupled_diloco.algorithm.rounds import grace_window
from decoupled_diloco.runtime import chaos, scenario
from decoupled_diloco.runtime.decoupled import Decoupled
from tests.helpers import (assert_trees_equal, chaos_overrides, compute_free, decoupled_config,
                           events, final_checkpoint, initial_eval_loss, make_runtime,
                           simulation)


def test_grace_window_formula():
  # gamma (tau xi_step - (xi_quorum + xi_sync)) = 0.5 (2*3 - (1 + 1)) = 2.
  assert grace_window(overlap=2, step_s=3.0, quorum_s=1.0, sync_s=1.0, gamma=0.5,
                      grace_max_s=10.0) == 2.0
  assert grace_window(overlap=2, step_s=3.0, quorum_s=1.0, sync_s=1.0, gamma=0.5,
                      grace_max_s=1.5) == 1.5
  assert grace_window(overlap=1, step_s=1.0, quorum_s=3.0, sync_s=1.0, gamma=1.0,
                      grace_max_s=10.0) == 0.0


def test_quorum_reached_at_k_and_not_before(tmp_path):
  # Learners step in 1, 2, 3, 4 s; H = 1: each sends after every step.
  log = str(tmp_path / "e.jsonl")
  sim = simulation([1.0, 2.0, 3.0, 4.0], quorum=3, log_path=log)
  sim.run(8)  # Through t = 4.
  sim.close()
  merges = events(log, "merge")
  # Round 1 reaches 3 distinct learners at t = 3 (learner 0 twice by then).
  assert merges[0]["t"] == 3.0 and merges[0]["contributors"] == 3
  assert all(e["t"] >= 3.0 for e in merges)


def test_grace_window_waits_and_closes_early_when_all_report(tmp_path):
  log = str(tmp_path / "e.jsonl")
  # K = 1, tau = 2, gamma = 1: grace = 2 * xi_step(= 2.0 initially) - (0 + 0) = 4.
  sim = simulation([1.0, 3.0], quorum=1, grace_gamma=1.0, overlap=2, sync_every=3,
                   log_path=log)
  sim.run(10)
  sim.close()
  grace = events(log, "grace")
  merges = events(log, "merge")
  # Learner 0 sends at t = 3 (step 3), opening a grace window of ~4 s; learner 1's
  # step 3 ends at t = 9, after it: the window closes on its timer, alone.
  assert grace[0]["t"] == 3.0 and grace[0]["seconds"] == pytest.approx(4.0, rel=0.2)
  assert merges[0]["contributors"] == 1
  assert merges[0]["t"] == pytest.approx(3.0 + grace[0]["seconds"])

  log2 = str(tmp_path / "e2.jsonl")
  sim = simulation([1.0, 1.5], quorum=1, grace_gamma=1.0, overlap=2, sync_every=3,
                   grace_max_s=10.0, log_path=log2)
  sim.run(12)
  sim.close()
  first = events(log2, "merge")[0]
  # Learner 1 reports at 4.5, inside the window: the round closes then, with both.
  assert first["t"] == 4.5 and first["contributors"] == 2


def test_k1_without_grace_takes_one_outer_step_per_scheduled_round(tmp_path):
  # H = 1: every step is a round. The fast learner (1 s) closes each round on
  # arrival; the slow one's (1.7 s) deltas come after their rounds closed.
  log = str(tmp_path / "e.jsonl")
  sim = simulation([1.0, 1.7], quorum=1, log_path=log)
  sim.run(16)
  sim.close()
  merges = events(log, "merge")
  assert [e["round"] for e in merges] == list(range(1, len(merges) + 1))
  assert [e["t"] for e in merges] == [float(r) for r in range(1, len(merges) + 1)]
  # Late deltas ride along in the next round (diloco.late=next) and never close one.
  assert all(e["contributors"] == 1 + e["late"] for e in merges)
  assert sum(e["late"] for e in merges) > 0
  assert events(log, "rephase")  # The slow learner is taken back to the schedule.
  assert sim.report()["uptime"] == pytest.approx(1.0)

  log = str(tmp_path / "drop.jsonl")
  sim = simulation([1.0, 1.7], quorum=1, late="drop", log_path=log)
  sim.run(16)
  sim.close()
  assert {e["contributors"] for e in events(log, "merge")} == {1}
  assert sim.report()["protocol"]["late_dropped"] > 0


def test_staleness_bound_drops_old_contributions():
  # Latency 2.5 s with 1 s steps: a contribution's base is several versions old.
  admit = simulation([1.0, 1.0], quorum=1, latency_s=2.5)
  admit.run(20)
  bounded = simulation([1.0, 1.0], quorum=1, latency_s=2.5, max_staleness=1)
  bounded.run(20)
  assert admit.merges.sum() > bounded.merges.sum() > 0
  assert admit.backend.version[0] > bounded.backend.version[0]


def test_failed_learner_rejoins_and_contributes_again(tmp_path):
  # Learner 1 loses both slices at t = 5.5 until 20 (then restarts for 2 s).
  line = chaos.Timeline(start=np.array([0.0, 5.5, 20.0, 22.0]),
                        end=np.array([5.5, 20.0, 22.0, 1e9]),
                        slices_up=np.array([2, 0, 2, 2]),
                        running=np.array([True, False, False, True]),
                        num_reconfigurations=2)
  full = chaos.Timeline(np.array([0.0]), np.array([1e9]), np.array([2]), np.array([True]), 0)
  log = str(tmp_path / "e.jsonl")
  sim = simulation([1.0, 1.0], quorum=1, timelines=[full, line], log_path=log)
  sim.run(60)
  sim.close()
  assert [e["t"] for e in events(log, "down") if e["learner"] == 1] == [5.5]
  assert [e["t"] for e in events(log, "rejoin") if e["learner"] == 1] == [22.0]
  arrivals = [e["t"] for e in events(log, "arrive") if e["learner"] == 1]
  assert max(a for a in arrivals if a < 5.5) == 5.0 and min(a for a in arrivals if a > 5.5) == 23.0
  assert [e["step"] for e in events(log, "lost_step") if e["learner"] == 1] == [6]
  r = sim.report()
  assert r["learners"][1]["down_s"] == pytest.approx(14.5)
  assert r["learners"][1]["stopped_s"] == pytest.approx(2.0)
  assert r["goodput"] < 1.0 and r["uptime"] == pytest.approx(1.0)


def test_lockstep_waits_for_fragment_at_send_step_plus_tau(tmp_path):
  log = str(tmp_path / "e.jsonl")
  # K = M, tau = 0: the fast learner waits for the slow one at every sync.
  sim = simulation([1.0, 2.0], quorum=2, sync_every=2, wait=True, log_path=log)
  sim.run(9)  # Just past t = 8, so the second wait has ended.
  sim.close()
  r = sim.report()
  assert r["learners"][0]["waiting_s"] == pytest.approx(2.0 * 2)  # Two syncs by t = 8.
  assert [e["t"] for e in events(log, "merge")] == [4.0, 8.0]


@pytest.mark.slow
def test_k_equals_m_without_grace_or_chaos_reproduces_lockstep():
  c = decoupled_config(**{"diloco.num_fragments": 3, "diloco.overlap": 0,
                          "sim.event_log": False})
  dec = make_runtime(c)
  c.runtime = "lockstep"
  lock = make_runtime(c)
  for _ in range(6):
    dec.train_step()
    lock.train_step()
  assert_trees_equal(dec.team.syncer.theta, lock.team.syncer.theta)
  assert_trees_equal([l.params for l in dec.team.learners],
                     [l.params for l in lock.team.learners])


@pytest.mark.slow
def test_same_seed_gives_identical_event_log_and_parameters(tmp_path):
  finals = []
  for run in ("a", "b"):
    c = decoupled_config(steps=8, **chaos_overrides())
    train.train_and_evaluate(c, str(tmp_path / run))
    finals.append((tmp_path / run / "events.jsonl").read_text())
  assert finals[0] == finals[1]
  # Bitwise: the global model and every learner's parameters and optimizer state.
  assert_trees_equal(final_checkpoint(tmp_path / "a"), final_checkpoint(tmp_path / "b"))
  kinds = {json.loads(l)["event"] for l in finals[0].splitlines()}
  assert {"step", "send", "arrive", "merge", "publish", "align", "fail", "repair", "down",
          "rejoin"} <= kinds
  c = decoupled_config(steps=8, **{**chaos_overrides(), "chaos.seed": 1})
  train.train_and_evaluate(c, str(tmp_path / "c"))
  assert (tmp_path / "c" / "events.jsonl").read_text() != finals[0]


def test_nan_learner_recovers_and_training_goes_on(tmp_path, monkeypatch):
  rt = make_runtime(decoupled_config(**{"diloco.quorum": 1, "sim.event_log": False}))
  learner = rt.team.learners[1]
  learner.params = jax.tree.map(lambda p: p * np.nan, learner.params)
  accepted = []
  admit = rt.team.syncer.admit
  rt.team.syncer.admit = lambda c, *args: (accepted.append(c.learner), admit(c, *args))
  for _ in range(6):
    rt.train_step()
  # Its loss is NaN: it restarts from the global model before it sends anything.
  assert rt.sim.counts["recoveries"] == 1 and not rt.team.syncer.rejected
  assert rt.team.syncer.merges.sum() >= 2
  for t in jax.tree.leaves(rt.team.syncer.theta) + jax.tree.leaves(learner.params):
    assert np.isfinite(np.asarray(t)).all()
  assert 1 in accepted  # Learner 1 contributes again.


def test_paper_chaos_config_never_stops_and_beats_non_elastic_data_parallel():
  """The chaos of experiments/decoupled_diloco.py, compute-free (same protocol)."""
  from experiments import decoupled_diloco
  c = decoupled_diloco.get_config("chaos")
  cfg = config_lib.parse(c)
  horizon = scenario.chaos_horizon(cfg, scenario.step_seconds(cfg))
  sim = compute_free(c, fragment_bytes=1000)
  merge_times = []
  publish = sim._publish

  def timed_publish(message, contributors):
    merge_times.append(sim.now)
    publish(message, contributors)

  sim._publish = timed_publish
  sim.run(cfg.train.steps * 4)
  report = sim.report()
  assert all(l["down_s"] > 0 for l in report["learners"])  # Everyone went down...
  gaps = np.diff([0.0] + merge_times + [sim.now])
  assert gaps.max() < 5 * cfg.sim.step_seconds  # ...and the syncer merged throughout.
  assert report["uptime"] > 0.95
  dp = scenario.data_parallel_baselines(cfg, cfg.train.steps * 1.0, sim.now, horizon)
  assert dp["dp_non_elastic_seconds"] is None or dp["dp_non_elastic_seconds"] >= 1.5 * sim.now
  assert dp["dp_non_elastic_progress_at_end"] < 1 / 1.5


@pytest.mark.parametrize("poison", ["nan", "finite"])
def test_a_diverged_learner_does_not_stop_the_run(tmp_path, monkeypatch, poison):
  c = decoupled_config(**{"diloco.quorum": 1, "sim.event_log": True})
  at_init = initial_eval_loss(c)
  init = Decoupled.__init__

  def poison_learner_1(self, *args, **kwargs):
    init(self, *args, **kwargs)
    learner = self.team.learners[1]
    # NaN, or a finite divergence: weights 300x too large (loss far above uniform).
    scale = np.nan if poison == "nan" else 300.0
    learner.params = jax.tree.map(lambda p: p * scale, learner.params)

  monkeypatch.setattr(Decoupled, "__init__", poison_learner_1)
  summary = train.train_and_evaluate(c, str(tmp_path))
  # The global model learned: half a nat below its init (5.58 -> 4.79 on the fixture
  # corpus; 4.89 without the poison). Had it never moved it would sit at its init,
  # had it merged the poison far above (uniform over 256 bytes is 5.55).
  assert math.isfinite(summary["final_eval_loss"])
  assert summary["final_eval_loss"] < at_init - 0.5, (summary["final_eval_loss"], at_init)
  assert summary["protocol"]["recoveries"] == 1  # Caught at its first send, never merged.
  assert [e["learner"] for e in events(tmp_path / "events.jsonl", "recover")] == [1]
  if poison == "nan":
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("nonfinite_losses") == 1 for r in records)
