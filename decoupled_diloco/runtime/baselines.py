"""Goodput of the two data-parallel baselines under sampled failures.

Both baselines run one data-parallel job on a system of `num_slices` slices
for `horizon_s` seconds, under the outages from `chaos.sample_outages`, and
every chip counts as allocated all the time:

  goodput = useful chip-time / (num_slices * chips_per_slice * horizon_s).

Non-elastic: one SPMD job of fixed size. It cannot wait for repairs (a median
repair lasts tens of minutes), so, as large jobs do, it keeps
`spare_fraction` of the slices as hot spares and runs on the others. Any
failure of one of its slices stops it; it swaps in a healthy spare and
restarts, which takes `restart_s`. Failures during the restart are folded
into it (the restart picks replacements for them too). When too few healthy
slices are left, it waits for repairs, then restarts. Useful chip-time is the
time it runs times its (fixed) size.

Elastic: one elastic group holding every slice (`chaos.elastic_timeline`): it
trains on all up slices, and stops for `reconfiguration_s` each time a slice
fails or comes back. Useful chip-time is the running time times the slices up.
"""

import heapq
import math
from typing import NamedTuple

import numpy as np

from decoupled_diloco.runtime import chaos


class BaselineReport(NamedTuple):
  """What a baseline achieved over the horizon."""
  goodput: float  # useful chip-time / allocated chip-time
  uptime: float  # share of the time the model advances
  num_failures: int  # slice failures starting in [0, horizon)
  num_stops: int  # restarts (non-elastic) or reconfigurations (elastic)
  stopped_s: float  # seconds in which every chip of the job idles


def non_elastic(outages: chaos.Outages, model: chaos.FailureModel,
                num_slices: int, horizon_s: float) -> BaselineReport:
  """Goodput of fixed-size data-parallel with hot spares and restarts.

  Args:
    outages: sampled outages of the `num_slices` slices.
    model: supplies `restart_s` and `spare_fraction`.
    num_slices: slices allocated; the job runs on all but the spares.
    horizon_s: length of the run, in seconds.

  Returns:
    The report; `num_stops` counts restarts.

  Raises:
    ValueError: if the spares leave no slice to run on.
  """
  num_spares = round(model.spare_fraction * num_slices)
  job_size = num_slices - num_spares
  if job_size < 1:
    raise ValueError(
        f"spare_fraction={model.spare_fraction} leaves no slice of "
        f"num_slices={num_slices} for the job.")
  times, slices, is_repair = _events(outages, horizon_s)
  member = [i < job_size for i in range(num_slices)]
  healthy = [True] * num_slices
  spares = list(range(job_size, num_slices))  # A heap; stale entries skipped.
  missing = 0  # Job slots whose slice failed and that no spare has filled.
  running, run_start, resume_at = True, 0.0, math.inf
  uptime, num_stops = 0.0, 0

  def fill() -> int:
    nonlocal missing
    while missing and spares:
      s = heapq.heappop(spares)
      if healthy[s] and not member[s]:
        member[s] = True
        missing -= 1
    return missing

  for t, s, repaired in zip(times.tolist(), slices.tolist(), is_repair.tolist()):
    if not running and resume_at <= t:
      running, run_start, resume_at = True, resume_at, math.inf
    if repaired:
      healthy[s] = True
      heapq.heappush(spares, s)
      if missing and not fill():  # The job was waiting for this repair.
        resume_at = t + model.restart_s
      continue
    healthy[s] = False
    if not member[s]:
      continue  # A spare failed.
    member[s] = False
    missing += 1
    if running:
      uptime += t - run_start
      running = False
      num_stops += 1
    if fill():
      resume_at = math.inf  # Wait for repairs.
    elif resume_at == math.inf:
      resume_at = t + model.restart_s
  if running:
    uptime += horizon_s - run_start
  elif resume_at < horizon_s:
    uptime += horizon_s - resume_at
  return BaselineReport(
      goodput=job_size * uptime / (num_slices * horizon_s),
      uptime=uptime / horizon_s,
      num_failures=int(np.sum(outages.start < horizon_s)),
      num_stops=num_stops,
      stopped_s=horizon_s - uptime)


def elastic(outages: chaos.Outages, model: chaos.FailureModel,
            num_slices: int, horizon_s: float) -> BaselineReport:
  """Goodput of elastic data-parallel over every slice.

  Args:
    outages: sampled outages of the `num_slices` slices.
    model: supplies `reconfiguration_s` (and `restart_s` should every slice
      be down at once).
    num_slices: slices allocated, all used while up.
    horizon_s: length of the run, in seconds.

  Returns:
    The report; `num_stops` counts reconfigurations.
  """
  line = chaos.elastic_timeline(outages, range(num_slices), horizon_s, model)
  seconds = line.end - line.start
  advancing = line.running & (line.slices_up > 0)
  return BaselineReport(
      goodput=float(np.sum(seconds * line.slices_up * line.running)
                    / (num_slices * horizon_s)),
      uptime=float(np.sum(seconds * advancing) / horizon_s),
      num_failures=int(np.sum(outages.start < horizon_s)),
      num_stops=line.num_reconfigurations,
      stopped_s=float(np.sum(seconds * ~line.running)))


def _events(outages: chaos.Outages, horizon_s: float):
  """Failures and repairs before the horizon, in time order."""
  fail = outages.start < horizon_s
  fix = outages.end < horizon_s
  times = np.concatenate([outages.start[fail], outages.end[fix]])
  slices = np.concatenate([outages.slice[fail], outages.slice[fix]])
  is_repair = np.concatenate([np.zeros(fail.sum(), bool),
                              np.ones(fix.sum(), bool)])
  order = np.lexsort((~is_repair, times))  # Repairs first on ties.
  return times[order], slices[order], is_repair[order]
