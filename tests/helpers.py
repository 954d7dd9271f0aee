"""Small configs, simulations and checks shared by the tests."""

import copy
import json
import math
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from decoupled_diloco import config as config_lib
from decoupled_diloco.algorithm import rounds
from decoupled_diloco.runtime import goodput, serialization, simulated


def tiny_config(runtime="data_parallel", steps=20, **overrides):
  """A small, fast model and run; `overrides` are dotted field paths."""
  c = config_lib.base_config()
  c.runtime = runtime
  c.model.update(num_layers=1, d_model=64, num_heads=2, mlp_dim=128, seq_len=32)
  c.data.batch_size = 16
  c.train.update(steps=steps, log_every=5, eval_every=0, eval_batches=2,
                 checkpoint_every=0)
  c.inner.warmup_steps = 2
  for key, value in overrides.items():
    section, field = key.split(".") if "." in key else (None, key)
    (c[section] if section else c)[field] = value
  return c


def final_checkpoint(workdir):
  """The latest checkpoint in `workdir` as a tree of numpy arrays."""
  mgr = ocp.CheckpointManager(f"{workdir}/checkpoints")
  tree = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())
  mgr.close()
  return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def preempt(monkeypatch, runtime_cls, at_step: int, config, workdir) -> None:
  """Runs `config` in `workdir` until the runtime reaches `at_step`, then kills it.

  The run is interrupted the way a preemption would (mid-loop, after its
  latest checkpoint); re-running `train_and_evaluate` on `workdir` resumes it.
  """
  from decoupled_diloco import train  # pylint: disable=g-import-not-at-top
  original = runtime_cls.train_step

  def crash(self):
    if self.step == at_step:
      raise KeyboardInterrupt("simulated preemption")
    return original(self)

  with monkeypatch.context() as patch:
    patch.setattr(runtime_cls, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(workdir))


# --- Decoupled DiLoCo -----------------------------------------------------------


def simulation(seconds, *, quorum, grace_gamma=0.0, grace_max_s=100.0, overlap=0,
               num_fragments=1, sync_every=1, timelines=None, latency_s=0.0, wait=False,
               max_staleness=-1, late="next", log_path=None, backend=None):
  m = len(seconds)
  backend = backend or goodput.AnalyticBackend(m, [100] * num_fragments, [100] * num_fragments,
                                               max_staleness)
  rules = rounds.RoundRules(quorum=quorum, grace_gamma=grace_gamma, grace_max_s=grace_max_s,
                            overlap=overlap, late=late)
  protocol = simulated.Protocol(
      offsets=tuple(p * sync_every // num_fragments for p in range(num_fragments)),
      sync_every=sync_every, overlap=overlap, rules=rules, learners_wait=wait)
  world = simulated.World(
      step_seconds=np.asarray(seconds, float), noise=0.0, latency_s=latency_s,
      bytes_per_s=math.inf, syncer_seconds=0.0, slices_per_learner=2, chips_per_slice=1,
      timelines=timelines, outages=None, seed=0)
  return simulated.Simulation(backend, protocol, world, num_fragments, log_path)


def events(path, kind):
  return [e for e in map(json.loads, open(path)) if e["event"] == kind]


def decoupled_config(steps=6, **overrides):
  base = {"diloco.num_learners": 2, "diloco.sync_every": 3,
          "diloco.num_fragments": 1, "sim.event_log": True}
  return tiny_config("decoupled", steps=steps, **{**base, **overrides})


def chaos_overrides():
  return {"chaos.enabled": True, "chaos.slices_per_learner": 2, "chaos.chips_per_slice": 1,
          "chaos.mtbi_chip_hours": 4 / 3600, "chaos.repair_median_s": 3.0,
          "chaos.reconfiguration_s": 0.5, "chaos.restart_s": 1.0, "sim.noise": 0.1,
          "diloco.quorum": 1, "diloco.overlap": 1, "diloco.grace_gamma": 1.0,
          "chaos.seed": 3}  # Both learners lose every slice within the run.


class Snapshot(NamedTuple):
  """What a checkpoint holds of a compute-free simulation."""
  state: dict  # After a JSON round trip, as orbax's JsonSave.
  payloads: Any  # Messages in flight or in inboxes.
  backend: Any
  log: str  # The event log so far.


def snapshot(sim, log_path) -> Snapshot:
  """A `Snapshot` of `sim` taken now."""
  messages = serialization.MessageTable()
  state = json.loads(json.dumps(sim.state(messages)))
  return Snapshot(state, messages.payloads, copy.deepcopy(sim.backend), log_path.read_text())


def restore(sim, snap: Snapshot) -> None:
  """Loads `snap` into a fresh simulation (whose log already holds `snap.log`)."""
  sim.load_state(snap.state, serialization.MessageTable(snap.payloads))
  sim.backend = snap.backend
