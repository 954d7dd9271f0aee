"""The real runtime (runtime/dist/) in one process, under fake clocks (tests/dist_harness.py).

Everything the runtime does is reached here without subprocesses: the same
`LearnerRuntime` and `SyncerService` a process runs, on a `memory://`
mailbox, driven in time order by a discrete-event loop.
"""

import math

import jax
import numpy as np
import pytest

from decoupled_diloco import config as config_lib, metrics
from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.runtime.lockstep import LockStep
from tests import helpers
from tests.dist_harness import InProcessRun


def _global(run):
  return fragments_lib.flatten(fragments_lib.unflatten(run.syncer.syncer.global_flat()))


def _lockstep_reference(steps, **overrides):
  cfg = config_lib.parse(helpers.tiny_config("lockstep", steps=steps, **overrides))
  ref = LockStep(cfg, helpers.task(cfg))
  for _ in range(cfg.train.steps):
    ref.train_step()
  return ref


_LOCKSTEP = {"diloco.num_learners": 2, "diloco.num_fragments": 2, "diloco.sync_every": 3,
             "diloco.quorum": 0, "diloco.grace_gamma": 0.0, "sim.learners_wait": True}


@pytest.mark.parametrize("overlap", [0, 2])
def test_lockstep_mode_equals_the_lockstep_runtime_bitwise(tmp_path, overlap):
  """K = M, learners wait: the real runtime in-process is lock-step DiLoCo, to the bit."""
  overrides = {**_LOCKSTEP, "diloco.overlap": overlap}
  run = InProcessRun(helpers.tiny_config("decoupled", steps=9, **overrides), tmp_path,
                     [1.0, 1.37])
  run.run()
  ref = _lockstep_reference(9, **overrides)
  expected = fragments_lib.flatten(jax.device_get(ref.eval_params()))  # Merges what was sent.
  assert run.syncer.syncer.version.tolist() == ref.team.syncer.version.tolist()
  got = _global(run)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)


# --- two clocks, one algorithm ------------------------------------------------------

_STEP_S = (1.0, 1.07, 1.6)  # Learner 2 is slow: it sends late and is re-phased.
_KILLED, _DIES_AT, _BACK_AT, _UNTIL = 1, 7.5, 12.3, 30.0


def _decoupled_overrides():
  return {"diloco.num_learners": 3, "diloco.num_fragments": 4, "diloco.sync_every": 4,
          "diloco.overlap": 2, "diloco.quorum": 1, "diloco.grace_gamma": 1.0,
          "diloco.grace_max_s": 0.3, "data.batch_size": 12, "sim.latency_s": 0.0,
          "sim.syncer_seconds": 0.0, "dist.lease_s": 5.0}


def _decisions(events, until):
  """What the protocol decided, from event logs: merges per fragment, late verdicts,
  re-phases and rejoin positions, each in order, up to time `until`."""
  out = {"merges": {}, "late": [], "rephases": [], "rejoins": []}
  for e in sorted(events, key=lambda e: e["t"]):
    if e["t"] > until:
      continue
    kind = e["event"]
    if kind == "merge":
      out["merges"].setdefault(e["fragment"], []).append(
          (e["round"], e["contributors"], e["version"]))
    elif kind == "arrive" and e["status"] == "late" or kind == "late":
      out["late"].append((e["learner"], e["fragment"], e["round"], e.get("joins", e.get("outcome"))))
    elif kind == "rephase":
      out["rephases"].append((e["learner"], e["fragment"], e["round"], e["position"], e["to"],
                              tuple(e["sent"])))
    elif kind == "rejoin":
      out["rejoins"].append((e["learner"], e.get("position", e.get("step", 0) + e.get("phase", 0))))
  out["late"].sort()
  out["rephases"].sort()
  return out


def _simulated_decisions(config, log_path):
  """The simulator (real JAX learners) on the same step times and the same outage."""
  from decoupled_diloco.runtime import chaos, scenario, simulated  # pylint: disable=g-import-not-at-top
  from decoupled_diloco.runtime.decoupled import JaxBackend  # pylint: disable=g-import-not-at-top
  from decoupled_diloco.runtime.team import Team  # pylint: disable=g-import-not-at-top
  cfg = config_lib.parse(config)
  team = Team(cfg, helpers.task(cfg))
  horizon = 10 * _UNTIL

  def timeline(outage):
    cuts = [0.0, *outage, horizon]
    up = [1, 0, 1][:len(cuts) - 1]
    return chaos.Timeline(np.array(cuts[:-1]), np.array(cuts[1:]), np.array(up, np.int64),
                          np.ones(len(up), bool), len(outage))

  world = simulated.World(
      step_seconds=np.array(_STEP_S), noise=0.0, latency_s=0.0, bytes_per_s=math.inf,
      syncer_seconds=0.0, slices_per_learner=1, chips_per_slice=1,
      timelines=[timeline((_DIES_AT, _BACK_AT) if m == _KILLED else ()) for m in range(3)],
      outages=None, seed=0)
  sim = simulated.Simulation(JaxBackend(team, fresh_optimizer=True),
                             scenario.protocol(cfg, team.offsets), world,
                             len(team.fragments), str(log_path), budget="inner_steps")
  sim.run(int(_UNTIL * sum(1 / s for s in _STEP_S)) + 6)  # Past `_UNTIL`.
  sim.close()
  return _decisions(metrics.read_jsonl(log_path), _UNTIL)


@pytest.mark.slow
def test_the_simulator_and_the_real_runtime_make_the_same_decisions(tmp_path):
  """K = 1 + grace, tau = 2, fixed step times, a slow learner, one killed and rejoining:
  the same protocol driven by the virtual clock and by the real runtime's (fake) wall
  clock decides the same merges, late verdicts, re-phases and rejoin positions."""
  config = helpers.tiny_config("decoupled", steps=1000, **_decoupled_overrides())
  expected = _simulated_decisions(config, tmp_path / "sim.jsonl")

  run = InProcessRun(config, tmp_path / "real", _STEP_S,
                     step_s_prior=float(np.mean(_STEP_S)))  # The simulator's prior.
  run.at(_DIES_AT, lambda: run.kill(_KILLED, detected=True))
  run.at(_BACK_AT, lambda: run.restart(_KILLED))
  run.run_until(lambda: run.now > _UNTIL)
  events = []
  for name in ("syncer", "learner0", "learner1", "learner2"):
    events += metrics.read_jsonl(tmp_path / "real" / name / "events.jsonl")
  got = _decisions(events, _UNTIL)

  assert expected["rejoins"] and expected["rephases"] and expected["late"]  # It is tested.
  assert len(expected["merges"]) == 4 and all(len(v) > 4 for v in expected["merges"].values())
  assert got == expected
