r"""One compute-free cell: goodput under failures, or utilisation on a slow link.

Run by `experiments/sweep.py` for the `goodput` and `bandwidth` sweeps, like
`decoupled_diloco.main` is for training cells, and writes `summary.json`
(`goodput`, `utilisation`, `steps`, the resolved config) in its workdir:

  python -m experiments.ablations.analytic --config=experiments/ablations/analytic.py \
      --workdir=DIR --config.method=decoupled --config.num_chips=600000

Methods:
  decoupled: the discrete-event simulator of runtime/simulated.py with its
    compute-free backend (runtime/goodput.py): M learners, P fragments synced
    every H steps, overlap tau, quorum K = 1 + grace. With `chaos`, failures
    from the calibrated `chaos.FailureModel` (runtime/goodput.simulate_decoupled).
  diloco, streaming: the same simulator in lock-step (learners wait for their
    fragment at send step + tau): DiLoCo is P = 1, tau = 0; Streaming P, tau.
  data_parallel: all-reduce every step over the M islands' links, not
    overlapped with compute (a ring: each island sends and receives
    2(M-1)/M of the gradient): utilisation = step / (step + all-reduce).
  dp_non_elastic, dp_elastic: the calibrated data-parallel baselines under
    the same failure model (runtime/baselines.py), over `horizon_hours`.

Utilisation is the learners' busy share of the wall time (chaos off). The
simulator's links do not queue (two messages in flight each get the whole
bandwidth), so it is capped by what a link can carry: a learner that must move
B bytes per direction over a run of T seconds at bandwidth W runs at most at
W*T/B of its speed.
"""

import math
import os

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from decoupled_diloco import metrics
from decoupled_diloco.algorithm import protocol as protocol_lib, rounds
from decoupled_diloco.runtime import baselines, chaos, goodput, simulated

METHODS = ("decoupled", "diloco", "streaming", "data_parallel", "dp_non_elastic",
           "dp_elastic")


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      method="decoupled",  # One of METHODS.
      seed=0,  # Seeds failure draws.
      chaos=True,  # Failures from the calibrated model (goodput); off: utilisation on a link.
      num_chips=150_000,  # Chips of the whole system (chaos).
      num_learners=4,  # M (data-parallel: islands the all-reduce spans).
      steps=20_000,  # Inner steps per learner (simulated methods).
      step_seconds=10.0,  # Virtual seconds of one inner step.
      horizon_hours=1000.0,  # Simulated time of the data-parallel baselines under chaos.
      num_fragments=24,  # P (decoupled, streaming).
      sync_every=24,  # H.
      overlap=2,  # tau (decoupled, streaming).
      quorum=1,  # K (decoupled; lock-step methods wait for all).
      grace_gamma=1.0,  # Grace-window safety factor (decoupled).
      params=1e9,  # Model parameters (message sizes when chaos is off).
      up_bits=32.0,  # Bits per parameter learner -> syncer (int4 with scales: ~4.1).
      down_bits=32.0,  # Bits per parameter syncer -> learner.
      grad_bits=32.0,  # Bits per gradient value all-reduced by data-parallel.
      bandwidth_gbps=0.0,  # Per-learner link, each direction, Gbit/s (0: unlimited).
      latency_s=0.0,  # One-way message latency.
  ))


class _CountingBackend(goodput.AnalyticBackend):
  """Counts bytes up and down separately (links are full duplex)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.up = self.down = 0

  def send(self, m, p, rnd):
    self.up += self.bytes_up[p]
    return super().send(m, p, rnd)

  def deliver(self, m, pub):
    self.down += pub.nbytes
    return super().deliver(m, pub)


def on_link(c) -> dict:
  """Utilisation of one method on a link of `bandwidth_gbps`, no failures."""
  m = c.num_learners
  bytes_per_s = c.bandwidth_gbps * 1e9 / 8 if c.bandwidth_gbps else math.inf
  if c.method == "data_parallel":
    grad = c.params * c.grad_bits / 8
    ring = 2 * (m - 1) / m
    allreduce_s = ring * grad / bytes_per_s + 2 * (m - 1) * c.latency_s
    return {"utilisation": c.step_seconds / (c.step_seconds + allreduce_s),
            "allreduce_s_per_step": allreduce_s, "virtual_seconds":
            c.steps * (c.step_seconds + allreduce_s)}
  lockstep = c.method != "decoupled"
  p, overlap = (1, 0) if c.method == "diloco" else (c.num_fragments, c.overlap)
  rules = rounds.RoundRules(quorum=c.quorum if c.method == "decoupled" else m,
                            grace_gamma=c.grace_gamma if c.method == "decoupled" else 0.0,
                            grace_max_s=10 * c.step_seconds, overlap=overlap)
  protocol = simulated.Protocol(protocol_lib.Schedule(
      tuple(i * c.sync_every // p for i in range(p)), c.sync_every, overlap, lockstep), rules)
  world = simulated.World(
      step_seconds=np.full(m, c.step_seconds), noise=0.0, latency_s=c.latency_s,
      bytes_per_s=bytes_per_s, syncer_seconds=0.0, slices_per_learner=1, chips_per_slice=1,
      timelines=None, outages=None, seed=c.seed)
  up, down = c.params * c.up_bits / 8 / p, c.params * c.down_bits / 8 / p
  backend = _CountingBackend(m, [int(up)] * p, [int(down)] * p)
  sim = simulated.Simulation(backend, protocol, world, p, budget="inner_steps")
  sim.run(c.steps * m)
  report = sim.report()
  busy = sum(lr["busy_s"] for lr in report["learners"]) / (m * report["virtual_seconds"])
  load = max(backend.up, backend.down) / m / (bytes_per_s * report["virtual_seconds"])
  return {"utilisation": busy / max(load, 1.0), "simulated_busy_share": busy,
          "link_load": load, "bytes_up_per_learner": backend.up / m,
          "bytes_down_per_learner": backend.down / m,
          "virtual_seconds": report["virtual_seconds"] * max(load, 1.0)}


def under_failures(c) -> dict:
  """Goodput of one method at `num_chips` under the calibrated failure model."""
  model = chaos.FailureModel()
  if c.method == "decoupled":
    r = goodput.simulate_decoupled(
        model, num_chips=c.num_chips, num_learners=c.num_learners, steps_per_learner=c.steps,
        step_seconds=c.step_seconds, num_fragments=c.num_fragments, sync_every=c.sync_every,
        overlap=c.overlap, quorum=c.quorum, grace_gamma=c.grace_gamma, seed=c.seed)
    return {"goodput": r["goodput"], "uptime": r["uptime"],
            "virtual_seconds": r["virtual_seconds"], "failures": r["failures"]}
  n = model.num_slices(c.num_chips)
  horizon = c.horizon_hours * chaos.HOUR_S
  outages = chaos.sample_outages(model, n, horizon, c.seed)
  run = {"dp_non_elastic": baselines.non_elastic, "dp_elastic": baselines.elastic}[c.method]
  r = run(outages, model, n, horizon, step_seconds=c.step_seconds)  # Cut steps lost, as above.
  return {"goodput": r.goodput, "uptime": r.uptime, "virtual_seconds": horizon,
          "failures": r.num_failures}


def evaluate(c) -> dict:
  if c.method not in METHODS:
    raise ValueError(f"method={c.method!r} is unknown; choose from {METHODS}.")
  if c.chaos and c.method in ("diloco", "streaming", "data_parallel"):
    raise ValueError(f"method={c.method!r} has no failure model here; with chaos use"
                     " decoupled, dp_non_elastic or dp_elastic.")
  out = under_failures(c) if c.chaos else on_link(c)
  return {**out, "steps": c.steps, "config": c.to_dict()}


def main(argv):
  del argv
  summary = evaluate(flags.FLAGS.config)
  workdir = flags.FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  metrics.write_summary(workdir, summary)  # Atomic: a killed run leaves none, never half.
  print({k: v for k, v in summary.items() if k != "config"})


if __name__ == "__main__":
  # Defined here, not at import: config_flags imports this file again for get_config.
  config_flags.DEFINE_config_file("config", None, "This file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where summary.json goes.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
