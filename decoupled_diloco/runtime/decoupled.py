"""Decoupled DiLoCo with real JAX training, driven by the discrete-event simulator.

The same `Team` of learners and syncer as the lock-step runtime; the
simulator (runtime/simulated.py) decides, on a virtual clock, when each learner
steps, sends, receives, fails and rejoins, and when the syncer merges. Real
inner steps run in event order, so the trained model is real and a run is
deterministic for its seeds (`seed`, `chaos.seed`), and resumes exactly from a
checkpoint: the messages in flight and the simulator's state go with it.
"""

import os

import numpy as np
from absl import logging

from decoupled_diloco.algorithm import protocol
from decoupled_diloco.config import Config
from decoupled_diloco.runtime import scenario, serialization, simulated
from decoupled_diloco.runtime.team import Team
from decoupled_diloco.tasks.base import Task


class JaxBackend(protocol.SyncerMerger):
  """Real learners and syncer behind the simulator (`simulated.Backend`)."""

  def __init__(self, team: Team, fresh_optimizer: bool):
    super().__init__(team.syncer, validate=team.validate)
    self.team = team
    self.fresh_optimizer = fresh_optimizer

  def inner_step(self, m, share):
    return self.team.inner_step(m, share)

  def send(self, m, p, rnd):
    """Learner m's pseudo-gradient; None if it diverged (it recovers from the global model)."""
    if (why := self.team.diverged(m)) is not None:
      logging.warning("learner %d diverged (%s): it restarts from the global model", m, why)
      self.team.restart(m, fresh_optimizer=True, schedule_step=self.team.learners[m].step)
      return None
    return self.team.send(m, p, rnd)

  def deliver(self, m, pub) -> str:
    return self.team.deliver(m, pub)

  def merge(self, p, rnd):
    return self.team.merge(p, rnd)

  def rejoin(self, m, schedule_step) -> None:
    """A learner back from zero slices restarts from the current global fragments.

    What it had not yet sent, error-feedback residuals included, was lost with
    it, and so was its inner optimizer state (unless `chaos.rejoin_optimizer=kept`).
    """
    self.team.restart(m, fresh_optimizer=self.fresh_optimizer, schedule_step=schedule_step)


class Decoupled:
  """The interface `train.py` drives; one `train_step` = one global batch of data.

  That is M full-batch inner steps in all; a learner on part of its slices
  steps on part of its batch (`chaos.elastic_batch=shrink`), and its step
  counts as that part of one (`sim.budget=tokens`), so a run trains on
  `train.steps` global batches whatever fails. `sim.budget=inner_steps`
  counts M inner steps whatever their batch (the rule of earlier figures).
  """

  def __init__(self, cfg: Config, task: Task, workdir: str):
    self.cfg = cfg
    self.team = Team(cfg, task)
    self.eval_island = self.team.eval_island
    self.units_per_step = self.team.units_per_step
    measured = None
    if cfg.sim.step_seconds == 0:
      measured = self.team.measure_step_seconds()
      logging.info("measured inner step: %.3f s", measured)
    seconds = scenario.step_seconds(cfg, measured)
    self.horizon_s = scenario.chaos_horizon(cfg, seconds)
    log = os.path.join(workdir, "events.jsonl") if cfg.sim.event_log else None
    if log:
      os.makedirs(workdir, exist_ok=True)
    backend = JaxBackend(self.team, fresh_optimizer=cfg.chaos.rejoin_optimizer == "fresh")
    self.sim = simulated.Simulation(backend, scenario.protocol(cfg, self.team.offsets),
                                    scenario.world(cfg, seconds, self.horizon_s),
                                    len(self.team.fragments), log, budget=cfg.sim.budget)
    self.step = 0

  def train_step(self) -> dict:
    losses = self.sim.run((self.step + 1) * self.team.num_learners)
    self.step += 1
    return {"loss": losses, "virtual_seconds": self.sim.now}

  def eval_params(self):
    return self.team.eval_params()

  def state(self) -> dict:
    return {**self.team.state(), "step": np.int64(self.step)}

  def load_state(self, s: dict) -> None:
    self.team.load_state(s)
    self.step = int(s["step"])

  def extra_state(self) -> tuple[list, dict]:
    """(payloads, JSON) of the messages in flight or pending and the simulator."""
    messages = serialization.MessageTable()
    pending = [[[rnd, [[messages.ref(e.contribution), e.staleness, e.scale] for e in entries]]
                for rnd, entries in sorted(rounds.items())]
               for rounds in self.team.syncer.pending]
    meta = {"simulation": self.sim.state(messages), "pending": pending,
            "rejected": dict(self.team.syncer.rejected), "data": self.team.data_state()}
    return messages.payloads, meta

  def load_extra_state(self, payloads: list, meta: dict) -> None:
    messages = serialization.MessageTable(payloads)
    self.sim.load_state(meta["simulation"], messages)
    for p, rounds in enumerate(meta["pending"]):
      for rnd, entries in rounds:
        for ref, staleness, scale in entries:
          self.team.syncer.readmit(messages.message(ref), rnd, staleness, scale)
    self.team.syncer.rejected.clear()
    self.team.syncer.rejected.update(meta["rejected"])
    self.team.load_data_state(meta["data"])

  def eval_scalars(self) -> dict:
    return {**self.team.comm_metrics(self.step), **self.team.routing_metrics()}

  def summary(self) -> dict:
    self.sim.close()
    report = self.sim.report()
    out = {**self.team.accounting(self.step), **report}
    if self.cfg.chaos.enabled:
      ideal = self.cfg.train.steps * float(scenario.step_seconds(self.cfg).min())
      out.update(scenario.data_parallel_baselines(self.cfg, ideal, self.sim.now, self.horizon_s))
    return out
