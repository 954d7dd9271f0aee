"""Compute-free goodput of Decoupled DiLoCo at scale.

The discrete-event simulator of runtime/simulated.py with `AnalyticBackend`
(no JAX): analytic step times, message sizes and versions only. Learners own
contiguous blocks of slices and share one system's failure draws
(`chaos.sample_outages`), each running elastically on its slices that are up.
"""

import math

import numpy as np

from decoupled_diloco.algorithm.messages import Contribution, Publication
from decoupled_diloco.algorithm import protocol as protocol_lib, rounds
from decoupled_diloco.runtime import baselines, chaos, simulated


def simulate_decoupled(model: chaos.FailureModel, *, num_chips: int, num_learners: int,
                       steps_per_learner: int, step_seconds: float = 1.0,
                       num_fragments: int = 24, sync_every: int = 24, overlap: int = 2,
                       quorum: int = 1, grace_gamma: float = 1.0, grace_max_s: float = 10.0,
                       fragment_bytes: int = 1 << 20, seed: int = 0) -> dict:
  """Runs the protocol compute-free and returns the simulator's report.

  The system's slices are split evenly between learners (a remainder of fewer
  than `num_learners` slices is left out). Failures are drawn for every slice
  of the system, so the draws do not depend on `num_learners`, from the
  long-run state (`stationary=True`: a run of hours is shorter than the
  repair tail, and starting with every slice up would flatter it), over
  twice the failure-free run time; past that horizon every slice is up.

  Learners hold no hot spares: each is an elastic group of slices, like the
  elastic data-parallel baseline, which trains on every healthy slice it has
  (a spare would idle where a member trains, and swapping one in costs the
  same reconfiguration as a repaired slice coming back).

  Besides the simulator's report, `report["baselines"]` holds, on the same
  draws, over the same virtual time and with steps of the same
  `step_seconds` (`baselines.BaselineReport._asdict()`): `non_elastic` and
  `elastic`, the data-parallel baselines on every slice of the system, and
  `elastic_per_learner`, for each learner the elastic data-parallel job of
  its own size (its own block of slices). A learner runs on its block
  exactly as that job does (`chaos.elastic_timeline`, steps back to back
  from the start of each running span), so it loses the same chip-time to
  slices down, reconfigurations, steps a stop cuts and the step running at
  the end; what it loses beyond is what the protocol adds (unsent work when
  it loses every slice, waiting for the syncer).
  """
  slices = model.num_slices(num_chips) // num_learners
  if slices < 1:
    raise ValueError(f"num_chips={num_chips} gives fewer slices than num_learners={num_learners}.")
  horizon = 2.0 * steps_per_learner * step_seconds + 10 * model.restart_s
  outages = chaos.sample_outages(model, model.num_slices(num_chips), horizon, seed,
                                 stationary=True)
  timelines = [chaos.elastic_timeline(outages, chaos.slices_of_learner(m, slices), horizon,
                                      model) for m in range(num_learners)]
  rules = rounds.RoundRules(quorum=quorum, grace_gamma=grace_gamma, grace_max_s=grace_max_s,
                            overlap=overlap)
  protocol = simulated.Protocol(protocol_lib.Schedule(
      tuple(p * sync_every // num_fragments for p in range(num_fragments)), sync_every,
      overlap), rules)
  machines = simulated.World(
      step_seconds=np.full(num_learners, step_seconds), noise=0.0, latency_s=0.0,
      bytes_per_s=math.inf, syncer_seconds=0.0, slices_per_learner=slices,
      chips_per_slice=model.chips_per_slice, timelines=timelines, outages=None, seed=seed)
  backend = AnalyticBackend(num_learners, [fragment_bytes] * num_fragments,
                            [fragment_bytes] * num_fragments)
  sim = simulated.Simulation(backend, protocol, machines, num_fragments,
                             budget="inner_steps")
  sim.run(steps_per_learner * num_learners)
  report = sim.report()
  report["failures"] = int(np.sum((outages.start < sim.now)
                                  & (outages.slice < slices * num_learners)))
  now = max(sim.now, 1e-12)
  total = model.num_slices(num_chips)
  report["baselines"] = {
      "non_elastic": baselines.non_elastic(outages, model, total, now,
                                           step_seconds=step_seconds)._asdict(),
      "elastic": baselines.elastic(outages, model, total, now,
                                   step_seconds=step_seconds)._asdict(),
      "elastic_per_learner": [
          baselines.elastic(outages, model, slices, now,
                            slices=chaos.slices_of_learner(m, slices),
                            step_seconds=step_seconds)._asdict()
          for m in range(num_learners)],
  }
  return report


class AnalyticBackend:
  """Compute-free backend (`simulated.Backend`): message sizes, versions and counters only."""

  def __init__(self, num_learners: int, bytes_up, bytes_down, max_staleness: int = -1,
               units_per_step: int = 1):
    self.bytes_up, self.bytes_down = list(bytes_up), list(bytes_down)
    num = len(self.bytes_up)
    self.version = [0] * num
    self.base_version = [[0] * num for _ in range(num_learners)]
    self.c_steps = np.zeros((num_learners, num), np.int64)
    self.c_tokens = np.zeros((num_learners, num), np.int64)
    self.units_per_step = units_per_step
    self.pending: list[dict[int, list[Contribution]]] = [{} for _ in range(num)]
    self.merged: list[list[Contribution]] = []  # Every merge's contributions, in order.
    self.max_staleness = max_staleness
    self.sent = 0

  def inner_step(self, m, share):
    self.c_steps[m] += 1
    self.c_tokens[m] += int(self.units_per_step * share)
    return None

  def send(self, m, p, rnd) -> Contribution:
    self.sent += self.bytes_up[p]
    return Contribution(m, p, rnd, self.base_version[m][p], int(self.c_steps[m, p]),
                        int(self.c_tokens[m, p]), (), self.bytes_up[p])

  def validate(self, c):
    if 0 <= self.max_staleness < self.version[c.fragment] - c.base_version:
      return None
    return c

  last_rejection = "stale"  # The only reason `validate` rejects.

  def admit(self, c, rnd) -> None:
    """As `Syncer.admit`: a fresher delta from the same base takes the older one's place."""
    rounds.place(self.pending[c.fragment], c, c, rnd)

  def discard(self, c, reason) -> None:
    del c, reason

  def contributors(self, p, rnd) -> int:
    del rnd
    return sum(len(entries) for entries in self.pending[p].values())

  def merge(self, p, rnd):
    entries = [c for r in sorted(self.pending[p]) for c in self.pending[p][r]]
    self.pending[p] = {}
    if not entries:
      return None
    self.merged.append(entries)
    self.version[p] += 1
    return Publication(p, self.version[p], (), self.bytes_down[p], round=rnd)

  def current_version(self, p) -> int:
    return self.version[p]

  def deliver(self, m, pub) -> str:
    self.sent += pub.nbytes
    if pub.version <= self.base_version[m][pub.fragment]:
      return "stale"
    self.base_version[m][pub.fragment] = pub.version
    self.c_steps[m, pub.fragment] = self.c_tokens[m, pub.fragment] = 0
    return "applied"

  def rejoin(self, m, schedule_step) -> None:
    del schedule_step
    for p, v in enumerate(self.version):
      self.base_version[m][p] = v
      self.c_steps[m, p] = self.c_tokens[m, p] = 0
      self.sent += self.bytes_down[p]
