"""From a config to the simulator's world and protocol, and the data-parallel baselines.

The translations `runtime/decoupled.py` needs to build a `simulated.Simulation`
(failure model, step times, schedule and round rules, network), and how
data-parallel fares on the same chips under the same failure draws.
"""

import math

import numpy as np

from decoupled_diloco.config import Config
from decoupled_diloco.runtime import baselines, chaos, simulated, team


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
  return simulated.Protocol(team.schedule(cfg, offsets), team.round_rules(cfg))


def world(cfg: Config, seconds: np.ndarray, horizon_s: float) -> simulated.World:
  timelines = outages = None
  if cfg.chaos.enabled:
    model, per = failure_model(cfg), cfg.chaos.slices_per_learner
    outages = chaos.sample_outages(model, per * cfg.diloco.num_learners, horizon_s,
                                   cfg.chaos.seed)
    timelines = [chaos.elastic_timeline(outages, chaos.slices_of_learner(m, per), horizon_s,
                                        model) for m in range(cfg.diloco.num_learners)]
  bw = cfg.sim.bandwidth_gbps * 1e9 / 8 if cfg.sim.bandwidth_gbps else math.inf
  return simulated.World(
      step_seconds=seconds, noise=cfg.sim.noise, latency_s=cfg.sim.latency_s,
      bytes_per_s=bw, syncer_seconds=cfg.sim.syncer_seconds,
      slices_per_learner=cfg.chaos.slices_per_learner,
      chips_per_slice=cfg.chaos.chips_per_slice, timelines=timelines, outages=outages,
      seed=cfg.seed, shrink_batch=cfg.chaos.elastic_batch == "shrink")


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
  Each loses the step in flight at a failure, as the learners do. Returns,
  for each, the virtual seconds it needs for the same tokens (None if more
  than the sampled horizon) and the share of them done by `end_s`, when the
  decoupled run finished.
  """
  model = failure_model(cfg)
  num_slices = cfg.chaos.slices_per_learner * cfg.diloco.num_learners
  outages = chaos.sample_outages(model, num_slices, horizon_s, cfg.chaos.seed)
  # Its steps are those of the learners at full strength, and a failure cuts the
  # step in flight as it cuts a learner's (`baselines`, "lost_steps").
  step_s = ideal_s / cfg.train.steps
  work = {  # Useful seconds by `h` (the failure model holds no spares here).
      "non_elastic": lambda h: baselines.non_elastic(outages, model, num_slices, h,
                                                     step_seconds=step_s).goodput * h,
      "elastic": lambda h: baselines.elastic(outages, model, num_slices, h,
                                             step_seconds=step_s).goodput * h,
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
