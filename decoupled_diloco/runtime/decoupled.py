"""Decoupled DiLoCo with real JAX training, driven by the discrete-event simulator.

The same `Team` of learners and syncer as the lock-step runtime; the
simulator (runtime/simulated.py) decides, on a virtual clock, when each learner
steps, sends, receives, fails and rejoins, and when the syncer merges. Real
inner steps run in event order, so the trained model is real and a run is
deterministic for its seeds (`seed`, `chaos.seed`), and resumes exactly from a
checkpoint: the messages in flight and the simulator's state go with it.
"""

import collections
import math
import os
import time

import numpy as np
from absl import logging

from decoupled_diloco.config import Config
from decoupled_diloco.runtime import baselines, chaos, simulated, snapshots
from decoupled_diloco.runtime.lockstep import Team


class JaxBackend:
  """Real learners and syncer behind the simulator's protocol."""

  def __init__(self, team: Team):
    self.team = team

  def inner_step(self, m):
    return self.team.learners[m].inner_step(self.team.batch(m))

  def snapshot(self, m, p):
    c = self.team.learners[m].snapshot(p)
    self.team.bytes_up[p] += c.nbytes
    return c

  def receive(self, c) -> bool:
    return self.team.receive(c)

  def contributors(self, p) -> int:
    return self.team.syncer.contributors(p)

  def merge(self, p):
    return self.team.syncer.merge(p)

  def publication(self, p):
    return self.team.syncer.publication(p)

  def align(self, m, pub) -> None:
    self.team.learners[m].align(pub)
    self.team.bytes_down[pub.fragment] += pub.nbytes

  def rejoin(self, m) -> None:
    """A learner back from zero slices restarts from the current global fragments.

    What it had not yet sent, error-feedback residuals included, was lost with it.
    """
    self.team.restart(m)


def failure_model(cfg: Config) -> chaos.FailureModel:
  ch = cfg.chaos
  return chaos.FailureModel(
      mtbi_chip_hours=ch.mtbi_chip_hours, chips_per_slice=ch.chips_per_slice,
      repair_median_s=ch.repair_median_s, repair_sigma=ch.repair_sigma,
      reconfiguration_s=ch.reconfiguration_s, restart_s=ch.restart_s, spare_fraction=0.0)


def step_seconds(cfg: Config, measured: float | None = None) -> np.ndarray:
  """Per-learner step time at full strength: base x speed factor."""
  base = measured if measured is not None else cfg.sim.step_seconds
  factors = np.ones(cfg.diloco.num_learners)
  if cfg.sim.slow_learners:
    factors[-cfg.sim.slow_learners:] = cfg.sim.slow_factor
  return base * factors


def protocol(cfg: Config, offsets) -> simulated.Protocol:
  d = cfg.diloco
  return simulated.Protocol(offsets=offsets, sync_every=d.sync_every, overlap=d.overlap,
                            quorum=d.quorum or d.num_learners, grace_gamma=d.grace_gamma,
                            grace_max_s=d.grace_max_s, lockstep=cfg.sim.lockstep)


def machines(cfg: Config, seconds: np.ndarray, horizon_s: float) -> simulated.Machines:
  timelines = outages = None
  if cfg.chaos.enabled:
    model, per = failure_model(cfg), cfg.chaos.slices_per_learner
    outages = chaos.sample_outages(model, per * cfg.diloco.num_learners, horizon_s,
                                   cfg.chaos.seed)
    timelines = [chaos.elastic_timeline(outages, chaos.slices_of_learner(m, per), horizon_s,
                                        model) for m in range(cfg.diloco.num_learners)]
  bw = cfg.sim.bandwidth_gbps * 1e9 / 8 if cfg.sim.bandwidth_gbps else math.inf
  return simulated.Machines(
      step_seconds=seconds, noise=cfg.sim.noise, latency_s=cfg.sim.latency_s,
      bytes_per_s=bw, syncer_seconds=cfg.sim.syncer_seconds,
      slices_per_learner=cfg.chaos.slices_per_learner,
      chips_per_slice=cfg.chaos.chips_per_slice, timelines=timelines, outages=outages,
      seed=cfg.seed)


def chaos_horizon(cfg: Config, seconds: np.ndarray) -> float:
  """Failures are drawn over a generous multiple of the failure-free run time."""
  return 20.0 * cfg.train.steps * float(seconds.max()) + 100 * cfg.chaos.restart_s


def data_parallel_baselines(cfg: Config, ideal_s: float, end_s: float,
                            horizon_s: float) -> dict:
  """How data-parallel fares on the same chips under the same failure draws.

  Data-parallel runs one job over all M x S slices at the same global batch,
  so failure-free it needs `ideal_s`. Non-elastic: any failure stalls it until
  the slice is repaired, then it restarts; elastic: it goes on with the slices
  that are up after a reconfiguration, at a speed proportional to them.
  Returns, for each, the virtual seconds it needs for the same tokens (None if
  more than the sampled horizon) and the share of them done by `end_s`, when
  the decoupled run finished.
  """
  model = failure_model(cfg)
  num_slices = cfg.chaos.slices_per_learner * cfg.diloco.num_learners
  outages = chaos.sample_outages(model, num_slices, horizon_s, cfg.chaos.seed)
  work = {
      "non_elastic": lambda h: baselines.non_elastic(outages, model, num_slices, h).uptime * h,
      "elastic": lambda h: baselines.elastic(outages, model, num_slices, h).goodput * h,
  }
  out = {}
  for name, done in work.items():
    seconds = None
    if done(horizon_s) >= ideal_s:  # Bisect the first time the work is done.
      lo, hi = ideal_s, horizon_s
      for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if done(mid) >= ideal_s else (mid, hi)
      seconds = hi
    out[f"dp_{name}_seconds"] = seconds
    out[f"dp_{name}_progress_at_end"] = min(done(end_s) / ideal_s, 1.0)
  return out


class Decoupled:
  """The interface `train.py` drives; one `train_step` = M inner steps in all."""

  def __init__(self, cfg: Config, train_tokens: np.ndarray, workdir: str):
    self.cfg = cfg
    self.team = Team(cfg, train_tokens)
    self.model, self.eval_island = self.team.model, self.team.eval_island
    self.tokens_per_step = self.team.tokens_per_step
    measured = self._measure_step() if cfg.sim.step_seconds == 0 else None
    seconds = step_seconds(cfg, measured)
    self.horizon_s = chaos_horizon(cfg, seconds)
    log = os.path.join(workdir, "events.jsonl") if cfg.sim.event_log else None
    if log:
      os.makedirs(workdir, exist_ok=True)
    self.sim = simulated.Simulation(JaxBackend(self.team), protocol(cfg, self.team.offsets),
                                    machines(cfg, seconds, self.horizon_s),
                                    len(self.team.fragments), log)
    self.step = 0

  def _measure_step(self) -> float:
    """Median wall time of a few real inner steps on a throwaway copy of learner 0."""
    learner = self.team.learners[0]
    params, opt_state = learner.island.put(learner.params), learner.island.put(learner.opt_state)
    batch = self.team.batch(0)
    times = []
    for _ in range(4):
      t = time.perf_counter()
      params, opt_state, loss = learner._inner_step(params, opt_state, batch)  # pylint: disable=protected-access
      loss.block_until_ready()
      times.append(time.perf_counter() - t)
    self.team.data[0].position -= 1  # The throwaway batch is not consumed.
    logging.info("measured inner step: %.3f s", float(np.median(times[1:])))
    return float(np.median(times[1:]))

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
    messages = snapshots.MessageTable()
    meta = {"simulation": self.sim.snapshot(messages),
            "pending": [[messages.ref(c) for c, _ in pending.values()]
                        for pending in self.team.syncer.pending],
            "rejected": dict(self.team.syncer.rejected)}
    return messages.payloads, meta

  def load_extra_state(self, payloads: list, meta: dict) -> None:
    messages = snapshots.MessageTable(payloads)
    self.sim.restore(meta["simulation"], messages)
    for refs in meta["pending"]:
      for ref in refs:
        self.team.syncer.readmit(messages.message(ref))
    self.team.syncer.rejected = collections.Counter(meta["rejected"])

  def comm_metrics(self) -> dict:
    return self.team.comm_metrics(self.step)

  def summary(self) -> dict:
    self.sim.close()
    report = self.sim.report()
    out = {**self.team.accounting(self.step), **report}
    if self.cfg.chaos.enabled:
      ideal = self.cfg.train.steps * float(step_seconds(self.cfg).min())
      out.update(data_parallel_baselines(self.cfg, ideal, self.sim.now, self.horizon_s))
    return out
