r"""Goodput vs chip count: where every lost point goes, and how sure we are.

  python -m experiments.goodput_table            # < 60 s on this machine
  python -m experiments.goodput_table --fit      # refits the family, minutes

Prints three tables. Every system trains in steps of `--step_seconds`
(default `chaos.CALIBRATION_STEP_S`, the step time the failure model was
fitted at) and loses the part of a step that a stop cuts (`lost_steps`):
the baselines in tables 1 and 2 and the learners in tables 2 and 3 alike.
Tables 2 and 3 show the same M (`--learners`).

1. Calibration. The two data-parallel baselines (`runtime/baselines.py`)
   under failures drawn from the calibrated `chaos.FailureModel` (per-chip
   MTBI of one year) for 150k to 2.4M chips, next to the paper's numbers
   (PAPER.md), with the model's parameters.

2. Decomposition, on the same draws. For each chip count, the compute-free
   simulator (`runtime/goodput.py`) runs Decoupled DiLoCo with M learners
   (P = H = 24, tau = 2, K = 1 with grace; `--ddl_steps` inner steps per
   learner), each owning a contiguous block of slices and running
   elastically on the ones that are up; the two baselines run on the same
   slices, draws and virtual time. Each row gives goodput and the points of
   allocated chip-time lost to each cause (`baselines.LOSS_CAUSES`; they add
   up to 100). Under each Decoupled row, "elastic, learner-sized" is the
   elastic data-parallel job of one learner's size on that learner's slices
   and draws (summed over learners), and "protocol adds" the learners' loss
   minus that job's: a learner is an elastic group with the same steps, so
   it loses the same to slices down, reconfigurations, cut steps and the
   step running at the end, and loses more only by what the protocol adds
   (unsent work lost when every slice of a learner is down, waiting for the
   syncer).

   Hot spares: only the non-elastic baseline has them (`spare_fraction`,
   counted under idle_spares). The elastic baseline and the learners, both
   elastic groups, have none: they train on every healthy slice, and a
   repaired slice re-joins through the same reconfiguration a spare would.

3. Sensitivity. The data-parallel rows do not pin the failure model down:
   slower repairs (more slices down at a time) with cheaper reconfigurations
   fit the elastic row about as well as faster repairs with costlier ones.
   `--fit` sweeps the median repair time (`FIT_REPAIR_MEDIANS_S`), fits the
   other free parameters (reconfiguration, restart, spare share) to the
   paper's rows at each, keeps the fits within 3 points of all ten numbers,
   and runs Decoupled DiLoCo under each; the family is stored in `FAMILY`
   below (paste the printed block to update it). The default run prints the
   stored family and the band (min-max) of its Decoupled predictions; with
   another `--step_seconds`, `--learners`, `--ddl_steps` or `--seed` than
   the stored predictions', it recomputes them (the members stay those
   fitted at `FAMILY_STEP_SECONDS`; about 10 s per member and M). Which
   member is the calibration (`chaos.CALIBRATED_*`) is chosen by published
   repair and restart times (see `runtime/chaos.py`), not by its Decoupled
   rows.

The paper's non-elastic row falls more slowly at scale than any model in
which each failure costs a fixed restart (goodput ~ 1 / (1 + rate * cost)):
the cost per failure it implies, (1/goodput - 1) / failure rate, falls from
82 s at 150k chips to 60 s at 2.4M. Fits therefore miss some of its numbers
by 2.5 to 3 points.
"""

import dataclasses
import math
import time

from absl import app
from absl import flags
import numpy as np

from decoupled_diloco.runtime import baselines
from decoupled_diloco.runtime import chaos
from decoupled_diloco.runtime import goodput

_HORIZON_HOURS = flags.DEFINE_float(
    "horizon_hours", 1000.0, "Simulated time per chip count for table 1, in hours.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the failure draws.")
_FIT = flags.DEFINE_bool("fit", False, "Refit the family of failure models (minutes).")
_DDL_STEPS = flags.DEFINE_integer(
    "ddl_steps", 5_000, "Inner steps per learner for the Decoupled DiLoCo rows.")
_STEP_SECONDS = flags.DEFINE_float(
    "step_seconds", chaos.CALIBRATION_STEP_S,
    "Virtual seconds per training step of every system (all three tables).")
_LEARNERS = flags.DEFINE_list("learners", ["4", "16"],
                              "M for the Decoupled DiLoCo rows (tables 2 and 3).")
_FIT_HORIZON_HOURS = flags.DEFINE_float(
    "fit_horizon_hours", 300.0, "Simulated time per chip count while fitting.")
_FIT_MEDIANS = flags.DEFINE_list(
    "fit_repair_medians", [], "With --fit: median repair times (s) to fit at; default"
    " FIT_REPAIR_MEDIANS_S (split them over several runs to keep each short).")

CHIP_COUNTS = (150_000, 300_000, 600_000, 1_200_000, 2_400_000)
# PAPER.md, goodput (%) by chip count with per-chip MTBI of one year.
PAPER_NON_ELASTIC = (72, 57, 38, 27, 18)
PAPER_ELASTIC = (88, 80, 69, 58, 40)
PAPER = np.array([PAPER_NON_ELASTIC, PAPER_ELASTIC])

FIT_REPAIR_MEDIANS_S = (300.0, 600.0, 1200.0, 2400.0, 3600.0, 4800.0)
"""Median repair times the family sweeps (5 to 80 min; sigma fixed)."""
FAMILY_MAX_GAP = 3.0

# The family of fits, from `python -m experiments.goodput_table --fit` with
# steps of 1 s in every system (seed 0, table horizon 1000 h, fit horizon
# 300 h, 5,000 steps of 1 s per learner), run as --fit_repair_medians=2400
# and =300,600,1200 (each fit starts from the one before it in its run, the
# first from the calibration before issue 18: 9.38 s, 70.7 s, 0.0924), about
# 8 min per median on the loaded 2-core machine. Each: free parameters, its
# data-parallel rows [non-elastic, elastic] (%), the largest gap to the
# paper, and Decoupled DiLoCo goodput (%) per M and chip count.
FAMILY = (
    {'repair_median_s': 600.0, 'reconfiguration_s': 9.62, 'restart_s': 70.2,
     'spare_fraction': 0.0981, 'largest_gap': 3.0,
     'rows': [[69.2, 56.1, 40.6, 26.0, 15.0], [90.1, 82.7, 71.1, 55.3, 37.5]],
     'decoupled': {4: [96.2, 93.7, 89.5, 82.8, 70.8], 16: [97.9, 96.8, 95.7, 93.9, 89.7]}},
    {'repair_median_s': 1200.0, 'reconfiguration_s': 9.29, 'restart_s': 69.7,
     'spare_fraction': 0.0997, 'largest_gap': 3.0,
     'rows': [[69.3, 56.1, 40.6, 26.1, 15.0], [89.2, 82.2, 71.0, 55.6, 38.1]],
     'decoupled': {4: [95.3, 92.4, 88.7, 82.1, 71.0], 16: [96.9, 95.5, 94.5, 92.9, 88.9]}},
    {'repair_median_s': 2400.0, 'reconfiguration_s': 8.62, 'restart_s': 68.8,
     'spare_fraction': 0.0975, 'largest_gap': 2.9,
     'rows': [[69.4, 56.3, 40.9, 26.3, 15.2], [87.0, 80.9, 70.8, 56.1, 39.1]],
     'decoupled': {4: [93.7, 91.4, 86.6, 80.6, 69.7], 16: [95.0, 93.9, 91.8, 90.6, 86.9]}},
)
"""Fitted at every median of FIT_REPAIR_MEDIANS_S; 300 s (largest gap 3.1),
3600 s (3.2) and 4800 s (4.1) miss the paper by more than 3 points and are
left out. Every member sits at 2.9-3.0, so the 3-point line is within the
optimizer's noise: a run of =2400,1200,600,300 fitted 1200 s at just over
3.0 and 600 s as here. Run on the simulator of the working tree of
2026-12-06 (issue 18: lost steps charged in every system)."""
FAMILY_STEP_SECONDS = 1.0  # The step time FAMILY was fitted with.
FAMILY_DDL_STEPS = 5_000  # Steps per learner of its Decoupled rows.
FAMILY_SEED = 0


def simulate(model: chaos.FailureModel, horizon_s: float, seed: int, step_seconds: float,
             which=("non_elastic", "elastic")) -> np.ndarray:
  """Goodput (%) of the baselines per chip count, shape [2, len(CHIP_COUNTS)].

  Steps of `step_seconds` (a stop loses the step it cuts). Rows not in
  `which` are NaN.
  """
  rows = np.full((2, len(CHIP_COUNTS)), np.nan)
  for j, chips in enumerate(CHIP_COUNTS):
    n = model.num_slices(chips)
    outages = chaos.sample_outages(model, n, horizon_s, seed)
    if "non_elastic" in which:
      rows[0, j] = 100 * baselines.non_elastic(outages, model, n, horizon_s,
                                               step_seconds=step_seconds).goodput
    if "elastic" in which:
      rows[1, j] = 100 * baselines.elastic(outages, model, n, horizon_s,
                                           step_seconds=step_seconds).goodput
  return rows


def largest_error(rows: np.ndarray) -> float:
  return float(np.nanmax(np.abs(rows - PAPER)))


def nelder_mead(fn, x0: np.ndarray, step: float = 0.2, iters: int = 150):
  """Minimizes fn from x0 with the standard Nelder-Mead simplex moves."""
  simplex = [x0] + [x0 + step * e for e in np.eye(x0.size)]
  values = [fn(x) for x in simplex]
  for _ in range(iters):
    order = np.argsort(values)
    simplex, values = [simplex[i] for i in order], [values[i] for i in order]
    centroid = np.mean(simplex[:-1], axis=0)
    reflected = centroid + (centroid - simplex[-1])
    fr = fn(reflected)
    if fr < values[0]:
      expanded = centroid + 2 * (centroid - simplex[-1])
      fe = fn(expanded)
      simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
    elif fr < values[-2]:
      simplex[-1], values[-1] = reflected, fr
    else:
      contracted = centroid + 0.5 * (simplex[-1] - centroid)
      fc = fn(contracted)
      if fc < values[-1]:
        simplex[-1], values[-1] = contracted, fc
      else:  # Shrink towards the best point.
        simplex = [simplex[0]] + [simplex[0] + 0.5 * (x - simplex[0])
                                  for x in simplex[1:]]
        values = [values[0]] + [fn(x) for x in simplex[1:]]
  best = int(np.argmin(values))
  return simplex[best], values[best]


def _row_loss(rows: np.ndarray, i: int) -> float:
  """Largest gap of row i to the paper, plus a little of the rest."""
  errors = np.abs(rows[i] - PAPER[i])
  return float(errors.max() + 0.1 * np.sqrt(np.mean(errors**2)))


def fit_at_repair(model: chaos.FailureModel, horizon_s: float, seed: int, step_seconds: float,
                  iters: int = 40) -> chaos.FailureModel:
  """Fits the free parameters but the repair time of `model` to the paper.

  The rows share only the repair time, so each is fitted alone: the
  reconfiguration delay to the elastic row (a 1-D search in log space), then
  the restart cost and spare share to the non-elastic row (Nelder-Mead from
  `model`'s values). Seeds `seed` and `seed + 1`; steps of `step_seconds`.
  """
  def rows_of(m, which):
    return np.mean([simulate(m, horizon_s, s, step_seconds, which) for s in (seed, seed + 1)],
                   axis=0)

  def elastic_loss(log_c):
    return _row_loss(rows_of(dataclasses.replace(model, reconfiguration_s=math.exp(log_c)),
                             ("elastic",)), 1)

  lo, hi = math.log(1.0), math.log(60.0)  # Golden-section search.
  g = (math.sqrt(5) - 1) / 2
  a, b = hi - g * (hi - lo), lo + g * (hi - lo)
  fa, fb = elastic_loss(a), elastic_loss(b)
  for _ in range(14):
    if fa < fb:
      hi, b, fb = b, a, fa
      a = hi - g * (hi - lo)
      fa = elastic_loss(a)
    else:
      lo, a, fa = a, b, fb
      b = lo + g * (hi - lo)
      fb = elastic_loss(b)
  model = dataclasses.replace(model, reconfiguration_s=math.exp((lo + hi) / 2))

  def to_model(x):
    return dataclasses.replace(model, restart_s=float(np.exp(x[0])),
                               spare_fraction=float(1 / (1 + np.exp(-x[1]))))

  f = model.spare_fraction
  x0 = np.array([math.log(model.restart_s), math.log(f / (1 - f))])
  x, _ = nelder_mead(lambda x: _row_loss(rows_of(to_model(x), ("non_elastic",)), 0), x0,
                     iters=iters)
  return to_model(x)


def decoupled_rows(model: chaos.FailureModel, learners, steps: int, step_seconds: float,
                   seed: int) -> dict:
  """Decoupled DiLoCo goodput (%) per M and chip count."""
  return {m: [round(100 * float(goodput.simulate_decoupled(
      model, num_chips=chips, num_learners=m, steps_per_learner=steps,
      step_seconds=step_seconds, seed=seed)["goodput"]), 1) for chips in CHIP_COUNTS]
          for m in learners}


def fit_family(horizon_s: float, fit_horizon_s: float, seed: int, learners, steps: int,
               step_seconds: float, medians=FIT_REPAIR_MEDIANS_S) -> list:
  """The fits within FAMILY_MAX_GAP at each median repair time of `medians`.

  Fitted with steps of `step_seconds`; each member's Decoupled DiLoCo rows
  are for M in `learners`, `steps` steps per learner.
  """
  family = []
  model = chaos.FailureModel()
  for median in medians:
    start = time.perf_counter()
    model = fit_at_repair(dataclasses.replace(model, repair_median_s=median),
                          fit_horizon_s, seed, step_seconds)
    rows = simulate(model, horizon_s, seed, step_seconds)
    gap = largest_error(rows)
    print(f"repair_median_s {median:>6.0f}: reconfiguration_s {model.reconfiguration_s:.1f}"
          f" restart_s {model.restart_s:.1f} spare_fraction {model.spare_fraction:.3f}"
          f" largest gap {gap:.1f} ({time.perf_counter() - start:.0f} s)", flush=True)
    if gap > FAMILY_MAX_GAP:
      continue
    family.append(dict(
        repair_median_s=median, reconfiguration_s=round(model.reconfiguration_s, 2),
        restart_s=round(model.restart_s, 1), spare_fraction=round(model.spare_fraction, 4),
        largest_gap=round(gap, 1), rows=np.round(rows, 1).tolist(),
        decoupled=decoupled_rows(model, learners, steps, step_seconds, seed)))
  return family


def family_predictions(family, learners, steps: int, step_seconds: float, seed: int,
                       stored: bool) -> list:
  """Each member's Decoupled DiLoCo goodput (%) per M in `learners` and chip count.

  The members' stored rows where `stored` (they were computed with these
  steps, step time and seed) and hold M; the others are simulated now.
  """
  return [{m: f["decoupled"][m] if stored and m in f["decoupled"] else
           decoupled_rows(member_model(f), [m], steps, step_seconds, seed)[m]
           for m in learners} for f in family]


def member_model(member: dict) -> chaos.FailureModel:
  return chaos.FailureModel(
      repair_median_s=member["repair_median_s"],
      reconfiguration_s=member["reconfiguration_s"], restart_s=member["restart_s"],
      spare_fraction=member["spare_fraction"])


def describe(m: chaos.FailureModel) -> str:
  return "\n".join([
      f"mtbi_chip_hours   {m.mtbi_chip_hours:.0f} (fixed)",
      f"chips_per_slice   {m.chips_per_slice} (fixed; slice MTBI "
      f"{1 / m.slice_failure_rate / chaos.HOUR_S:.1f} h)",
      f"repair_sigma      {m.repair_sigma:.2f} (fixed)",
      f"repair_median_s   {m.repair_median_s:.0f} (mean {m.mean_repair_s:.0f} s, "
      f"{100 * m.down_fraction:.1f}% of slices down)",
      f"reconfiguration_s {m.reconfiguration_s:.1f}",
      f"restart_s         {m.restart_s:.1f}",
      f"spare_fraction    {m.spare_fraction:.3f}",
  ])


_SHORT = {"slices_down": "down", "reconfiguration": "reconf", "lost_steps": "lost_st",
          "unsent_work": "unsent", "waiting": "waiting", "idle_spares": "spares",
          "in_progress": "in_prog"}


def _points(lost: dict, allocated: float) -> list:
  return [100 * lost[c] / allocated for c in baselines.LOSS_CAUSES]


def decomposition_rows(model: chaos.FailureModel, chips: int, learners, steps: int,
                       step_seconds: float, seed: int) -> list:
  """(label, goodput %, points lost per cause) rows for one chip count."""
  rows = []
  for i, m in enumerate(learners):
    r = goodput.simulate_decoupled(model, num_chips=chips, num_learners=m,
                                   steps_per_learner=steps, step_seconds=step_seconds,
                                   seed=seed)
    base = r["baselines"]
    if i == 0:  # Every slice of the system, the same draws for every M.
      for name, label in (("non_elastic", "data-parallel"),
                          ("elastic", "elastic data-parallel")):
        b = base[name]
        rows.append((label, 100 * b["goodput"],
                     _points(b["lost_chip_s"], b["allocated_chip_s"])))
    allocated = r["allocated_chip_s"]
    mine = _points(r["lost_chip_s"], allocated)
    own = {c: sum(b["lost_chip_s"][c] for b in base["elastic_per_learner"])
           for c in baselines.LOSS_CAUSES}
    own_useful = sum(b["useful_chip_s"] for b in base["elastic_per_learner"])
    own_points = _points(own, allocated)
    rows.append((f"Decoupled DiLoCo M={m}", 100 * r["goodput"], mine))
    rows.append(("  elastic, learner-sized", 100 * own_useful / allocated, own_points))
    rows.append(("  protocol adds", 100 * (r["useful_chip_s"] - own_useful) / allocated,
                 [a - b for a, b in zip(mine, own_points)]))
  return rows


def print_decomposition(model, learners, steps, step_seconds, seed) -> None:
  print(f"Lost points by cause, same draws (Decoupled DiLoCo: P = H = 24, tau = 2,"
        f" K = 1 + grace; {steps:,} steps of {step_seconds:g} s per learner; baselines"
        f" over the same slices and virtual time)")
  header = (f"{'':<26}{'goodput':>8}" + "".join(f"{_SHORT[c]:>8}" for c in baselines.LOSS_CAUSES))
  for chips in CHIP_COUNTS:
    print(f"{chips:,} chips")
    print(header)
    for label, good, points in decomposition_rows(model, chips, learners, steps,
                                                  step_seconds, seed):
      print(f"{label:<26}{good:>8.1f}" + "".join(f"{p:>8.1f}" for p in points), flush=True)


def print_family(family, fitted_step_s: float, chosen: chaos.FailureModel, predictions,
                 step_seconds: float) -> None:
  if not family:
    print("No stored family: run with --fit.")
    return
  print(f"Fits within {FAMILY_MAX_GAP:g} points of the paper's data-parallel rows, with"
        f" steps of {fitted_step_s:g} s (* = the calibration)")
  print(f"{'repair median':>14}{'mean':>7}{'down%':>7}{'reconf s':>9}{'restart s':>10}"
        f"{'spares':>8}{'gap':>6}")
  for f in family:
    m = member_model(f)
    star = "*" if math.isclose(m.repair_median_s, chosen.repair_median_s) else " "
    print(f"{star}{f['repair_median_s'] / 60:>10.0f} min{m.mean_repair_s / 60:>5.0f}m"
          f"{100 * m.down_fraction:>7.1f}{f['reconfiguration_s']:>9.1f}{f['restart_s']:>10.1f}"
          f"{f['spare_fraction']:>8.3f}{f['largest_gap']:>6.1f}")
  print()
  print(f"Decoupled DiLoCo goodput (%) predicted by the family, steps of {step_seconds:g} s:"
        f" min - max (calibration)")
  learners = list(predictions[0])
  print(f"{'chips':>9}   " + "".join(f"{f'M={m}':>20}" for m in learners))
  chosen_i = next((i for i, f in enumerate(family)
                   if math.isclose(f["repair_median_s"], chosen.repair_median_s)), None)
  for j, chips in enumerate(CHIP_COUNTS):
    cells = []
    for m in learners:
      values = [p[m][j] for p in predictions]
      mark = f"({predictions[chosen_i][m][j]:.1f})" if chosen_i is not None else ""
      cells.append(f"{min(values):>7.1f} -{max(values):>5.1f} {mark:>6}")
    print(f"{chips:>9,}   " + "".join(f"{c:>20}" for c in cells))


def main(argv):
  del argv
  start = time.perf_counter()
  step_s, steps, seed = _STEP_SECONDS.value, _DDL_STEPS.value, _SEED.value
  learners = [int(m) for m in _LEARNERS.value]
  family, family_step_s = list(FAMILY), FAMILY_STEP_SECONDS
  stored = (math.isclose(step_s, FAMILY_STEP_SECONDS) and steps == FAMILY_DDL_STEPS
            and seed == FAMILY_SEED)
  if _FIT.value:
    family = fit_family(_HORIZON_HOURS.value * chaos.HOUR_S,
                        _FIT_HORIZON_HOURS.value * chaos.HOUR_S, seed, learners, steps,
                        step_s, [float(x) for x in _FIT_MEDIANS.value] or FIT_REPAIR_MEDIANS_S)
    family_step_s, stored = step_s, True
    print(f"family fitted in {time.perf_counter() - start:.0f} s; paste into FAMILY"
          f" (FAMILY_STEP_SECONDS = {step_s!r}, FAMILY_DDL_STEPS = {steps},"
          f" FAMILY_SEED = {seed}):")
    print("FAMILY = (")
    for f in family:
      print(f"    {f!r},")
    print(")")
    print()
  model = chaos.FailureModel()
  horizon_s = _HORIZON_HOURS.value * chaos.HOUR_S
  rows = simulate(model, horizon_s, seed, step_s)
  print(describe(model))
  print(f"horizon {_HORIZON_HOURS.value:.0f} h per chip count, seed {seed}; steps of"
        f" {step_s:g} s in every system (calibrated at {chaos.CALIBRATION_STEP_S:g} s)")
  print()
  print("goodput (%)   data-parallel      elastic data-parallel")
  print(f"{'chips':>9}   {'paper':>6} {'ours':>6}   {'paper':>6} {'ours':>6}")
  for j, chips in enumerate(CHIP_COUNTS):
    print(f"{chips:>9,}   {PAPER_NON_ELASTIC[j]:>6} {rows[0, j]:>6.1f}   "
          f"{PAPER_ELASTIC[j]:>6} {rows[1, j]:>6.1f}")
  print(f"largest gap to the paper: {largest_error(rows):.1f} points")
  print()
  print_decomposition(model, learners, steps, step_s, seed)
  print()
  predictions = family_predictions(family, learners, steps, step_s, seed, stored) if family else []
  print_family(family, family_step_s, model, predictions, step_s)
  print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
