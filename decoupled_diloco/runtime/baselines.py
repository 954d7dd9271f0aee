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
It holds no spares: an elastic job trains on every healthy slice it has, so
a healthy slice held back idle would only lose chip-time (a repaired slice
re-joins through the same reconfiguration a swapped-in spare would need).

Lost chip-time, by cause (`LOSS_CAUSES`, the names the simulator's report
uses for learners; useful + the sum of the causes = allocated, exactly):

  slices_down      chips of slices that are down (failed, not yet repaired).
  reconfiguration  healthy chips of the job idle while it stops: elastic
                   reconfigurations (and restarts from zero slices), or the
                   non-elastic job's restarts, the one after a wait included.
  lost_steps       work in flight when a stop interrupts a step: the
                   all-reduce of the step never completes, so its compute is
                   redone. Steps of `step_seconds` run back to back from
                   the start of each running span (as a learner's do in the
                   simulator); the part of a step that a stop cuts off, on
                   every chip of the job, is lost.
  unsent_work      0: a data-parallel job has no unsent local progress (the
                   learners' cost of losing every slice before sending).
  waiting          non-elastic: healthy chips of the job idle while it waits
                   for repairs because the spares ran dry.
  idle_spares      non-elastic: healthy hot spares, allocated and idle.
  in_progress      the part of a step still running at the horizon, when
                   the run stops (as the simulator's learners).

With `step_seconds=0` there is no step model: every running second counts as
useful, and lost_steps and in_progress are 0.
"""

import heapq
import math
from typing import NamedTuple

import numpy as np

from decoupled_diloco.runtime import chaos

LOSS_CAUSES = ("slices_down", "reconfiguration", "lost_steps", "unsent_work",
               "waiting", "idle_spares", "in_progress")
"""Causes of lost chip-time, shared with the simulator's report."""


class BaselineReport(NamedTuple):
  """What a baseline achieved over the horizon."""
  goodput: float  # useful chip-time / allocated chip-time
  uptime: float  # share of the time the model advances
  num_failures: int  # slice failures starting in [0, horizon)
  num_stops: int  # restarts (non-elastic) or reconfigurations (elastic)
  stopped_s: float  # seconds in which every chip of the job idles
  allocated_chip_s: float  # num_slices * chips_per_slice * horizon_s
  useful_chip_s: float
  lost_chip_s: dict  # cause (LOSS_CAUSES) -> chip-seconds; sums to allocated - useful


def non_elastic(outages: chaos.Outages, model: chaos.FailureModel,
                num_slices: int, horizon_s: float, *,
                step_seconds: float = 0.0) -> BaselineReport:
  """Goodput of fixed-size data-parallel with hot spares and restarts.

  Args:
    outages: sampled outages of the `num_slices` slices.
    model: supplies `restart_s` and `spare_fraction`.
    num_slices: slices allocated; the job runs on all but the spares.
    horizon_s: length of the run, in seconds.
    step_seconds: time of one training step; a failure loses the step it
      cuts (`lost_steps`). 0: no step model.

  Returns:
    The report; `num_stops` counts restarts.

  Raises:
    ValueError: if the spares leave no slice to run on.
  """
  _check_step(step_seconds)
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
  num_down = 0
  # State: running; restarting until resume_at; or waiting (resume_at = inf).
  running, resume_at = True, math.inf
  run_start = 0.0  # Where the running span (and its step grid) began.
  num_stops = 0
  # Slice-seconds by state of the slice (multiplied by chips at the end);
  # "running" includes the cut steps, moved to "cut"/"tail" at the end.
  slice_s = dict.fromkeys(("running", "restart", "wait", "down", "spare", "cut", "tail"),
                          0.0)
  last = 0.0

  def advance(t: float) -> None:
    """Integrates the slice states from `last` to t (resuming on the way)."""
    nonlocal running, resume_at, run_start
    if not running and resume_at <= t:  # The restart ends before t.
      _integrate(resume_at)
      running, resume_at, run_start = True, math.inf, resume_at
    _integrate(t)

  def _integrate(t: float) -> None:
    nonlocal last
    dt = t - last
    if dt <= 0:
      return
    members = job_size - missing  # Healthy by construction.
    state = ("running" if running else "restart" if resume_at < math.inf
             else "wait")
    slice_s[state] += members * dt
    slice_s["down"] += num_down * dt
    slice_s["spare"] += (num_slices - members - num_down) * dt
    last = t

  def fill() -> int:
    nonlocal missing
    while missing and spares:
      s = heapq.heappop(spares)
      if healthy[s] and not member[s]:
        member[s] = True
        missing -= 1
    return missing

  for t, s, repaired in zip(times.tolist(), slices.tolist(), is_repair.tolist()):
    advance(t)
    if repaired:
      healthy[s] = True
      num_down -= 1
      heapq.heappush(spares, s)
      if missing and not fill():  # The job was waiting for this repair.
        resume_at = t + model.restart_s
      continue
    healthy[s] = False
    num_down += 1
    if not member[s]:
      continue  # A spare failed.
    member[s] = False
    missing += 1
    if running:
      running = False
      num_stops += 1
      slice_s["cut"] += job_size * float(_cut_short(t - run_start, step_seconds))
    if fill():
      resume_at = math.inf  # Wait for repairs.
    elif resume_at == math.inf:
      resume_at = t + model.restart_s
  advance(horizon_s)
  if running:
    slice_s["tail"] = job_size * float(_cut_short(horizon_s - run_start, step_seconds))
  chips = model.chips_per_slice
  lost = dict.fromkeys(LOSS_CAUSES, 0.0)
  lost["slices_down"] = chips * slice_s["down"]
  lost["reconfiguration"] = chips * slice_s["restart"]
  lost["lost_steps"] = chips * slice_s["cut"]
  lost["waiting"] = chips * slice_s["wait"]
  lost["idle_spares"] = chips * slice_s["spare"]
  lost["in_progress"] = chips * slice_s["tail"]
  allocated = chips * num_slices * horizon_s
  useful = chips * (slice_s["running"] - slice_s["cut"] - slice_s["tail"])
  running_s = slice_s["running"] / job_size
  return BaselineReport(
      goodput=useful / allocated,
      uptime=(slice_s["running"] - slice_s["cut"]) / job_size / horizon_s,
      num_failures=int(np.sum(outages.start < horizon_s)),
      num_stops=num_stops,
      stopped_s=horizon_s - running_s,
      allocated_chip_s=allocated, useful_chip_s=useful, lost_chip_s=lost)


def elastic(outages: chaos.Outages, model: chaos.FailureModel,
            num_slices: int, horizon_s: float,
            slices: range | None = None, *, step_seconds: float = 0.0) -> BaselineReport:
  """Goodput of elastic data-parallel over every slice.

  Args:
    outages: sampled outages (of the whole system: only those of `slices`
      count).
    model: supplies `reconfiguration_s` (and `restart_s` should every slice
      be down at once).
    num_slices: slices allocated, all used while up.
    horizon_s: length of the run, in seconds.
    slices: the job's slices, `range(num_slices)` by default; a learner's
      block (`chaos.slices_of_learner`) gives the elastic job of that
      learner's size on the same draws.
    step_seconds: time of one training step; a reconfiguration loses the
      step it cuts (`lost_steps`). 0: no step model.

  Returns:
    The report; `num_stops` counts reconfigurations.
  """
  _check_step(step_seconds)
  if slices is None:
    slices = range(num_slices)
  if len(slices) != num_slices:
    raise ValueError(f"slices={slices!r} does not hold num_slices={num_slices} slices.")
  line = chaos.elastic_timeline(outages, slices, horizon_s, model)
  seconds = line.end - line.start
  advancing = line.running & (line.slices_up > 0)
  # Each running segment ends in a stop (or at the horizon) and has a step grid
  # of its own, as a learner's in the simulator.
  cut = np.where(advancing, _cut_short(seconds, step_seconds), 0.0)
  stopped = line.end < horizon_s
  chips = model.chips_per_slice
  lost = dict.fromkeys(LOSS_CAUSES, 0.0)
  lost["slices_down"] = chips * float(np.sum(seconds * (num_slices - line.slices_up)))
  lost["reconfiguration"] = chips * float(np.sum(seconds * line.slices_up * ~line.running))
  lost["lost_steps"] = chips * float(np.sum(cut * line.slices_up * stopped))
  lost["in_progress"] = chips * float(np.sum(cut * line.slices_up * ~stopped))
  useful = chips * float(np.sum((seconds * line.running - cut) * line.slices_up))
  allocated = chips * num_slices * horizon_s
  return BaselineReport(
      goodput=useful / allocated,
      uptime=float(np.sum((seconds - cut * stopped) * advancing) / horizon_s),
      num_failures=int(np.sum((outages.start < horizon_s)
                              & (outages.slice >= slices.start)
                              & (outages.slice < slices.stop))),
      num_stops=line.num_reconfigurations,
      stopped_s=float(np.sum(seconds * ~line.running)),
      allocated_chip_s=allocated, useful_chip_s=useful, lost_chip_s=lost)


def _check_step(step_seconds) -> None:
  if (isinstance(step_seconds, bool)
      or not isinstance(step_seconds, (int, float, np.number))
      or not math.isfinite(step_seconds) or step_seconds < 0):
    raise ValueError(f"step_seconds={step_seconds!r} must be a finite number >= 0.")


def _cut_short(seconds, step_seconds: float):
  """Seconds of the step still running `seconds` into a span of back-to-back steps.

  A step that ends within a millionth of a step of the span's end completes
  (the simulator adds step times one by one, so its clock drifts from
  span start + k * step by round-off).
  """
  seconds = np.asarray(seconds, float)
  if not step_seconds:
    return np.zeros_like(seconds)
  done = np.floor(seconds / step_seconds + 1e-6)
  return np.maximum(seconds - done * step_seconds, 0.0)


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
