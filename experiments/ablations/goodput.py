r"""Goodput vs chip count and M, compute-free, with the data-parallel baselines.

Every cell is `experiments/ablations/analytic.py` (no JAX training): the
discrete-event simulator with the calibrated failure model (per-chip MTBI of
one year, runtime/chaos.py) for Decoupled DiLoCo with M learners (P = H = 24,
tau = 2, K = 1 + grace, 20k steps of 10 s per learner), and the non-elastic and
elastic data-parallel baselines over 1000 hours. Seeds seed the failure draws.

CPU (default; 35 cells x 2 seeds, seconds each):
  python -m experiments.sweep --sweep=experiments/ablations/goodput.py --workdir=runs/goodput --jobs=2
`long`: 100k steps per learner and 5000-hour baselines (the same machine will do, ~5x longer):
  python -m experiments.sweep --sweep=experiments/ablations/goodput.py:long --workdir=runs/goodput_long --jobs=2
"""

from experiments import sweep

CHIPS = (150_000, 300_000, 600_000, 1_200_000, 2_400_000)
LEARNERS = (1, 2, 4, 8, 16)
ANALYTIC = "experiments/ablations/analytic.py"
PROGRAM = "experiments.ablations.analytic"


def chip_label(chips: int) -> str:
  return f"{chips / 1e6:g}M" if chips >= 1_000_000 else f"{chips // 1000}k"


def get_config(arg=None):
  if arg not in (None, "", "long"):
    raise ValueError(f"variant {arg!r} is unknown; choose the default or long.")
  steps, hours = (100_000, 5000.0) if arg == "long" else (20_000, 1000.0)
  cells, checks = [], []
  for chips in CHIPS:
    names = []
    for m in LEARNERS:
      names.append(f"ddl_m{m}_{chip_label(chips)}")
      cells.append(sweep.cell(names[-1], ANALYTIC, {
          "method": "decoupled", "chaos": True, "num_chips": chips, "num_learners": m,
          "steps": steps}, program=PROGRAM))
    for method in ("dp_non_elastic", "dp_elastic"):
      cells.append(sweep.cell(f"{method}_{chip_label(chips)}", ANALYTIC, {
          "method": method, "chaos": True, "num_chips": chips, "horizon_hours": hours},
          program=PROGRAM))
    checks.append(dict(claim=f"goodput rises with M at {chip_label(chips)} chips",
                       kind="increasing", cells=names, metric="goodput"))
  return sweep.make_sweep(
      name="goodput", title="Goodput vs chip count and number of learners (compute-free)",
      cells=cells, reference="dp_elastic_150k", seeds=(0, 1), timeout_s=600,
      metric="goodput", higher_is_better=True, columns=("uptime", "failures"),
      figures=("goodput_vs_chips",), checks=checks, commands=__doc__)
