r"""Decoupled DiLoCo with and without failures: quality, goodput and a timeline.

Chaos: each of the 4 learners is 2 slices of 1 chip, each chip fails every 80
virtual seconds on average and is repaired after ~30 s, so every learner loses
all its slices at least once and rejoins (`experiments/decoupled_diloco.py`).
The timeline figure draws the chaos run's `events.jsonl`.

CPU (default; 2 cells x 4 seeds):
  python -m experiments.sweep --sweep=experiments/ablations/chaos.py --workdir=runs/chaos --jobs=2
Accelerator host:
  python -m experiments.sweep --sweep=experiments/ablations/chaos.py:accelerator --workdir=runs/chaos_acc
"""

from experiments import sweep
from experiments.ablations import common


def get_config(arg=None):
  cells = [common.train_cell(v, v, arg, {}) for v in ("nochaos", "chaos")]
  return sweep.make_sweep(
      name="chaos", title="Failures: Decoupled DiLoCo with and without chaos", cells=cells,
      reference="nochaos", seeds=common.TRAIN_SEEDS, timeout_s=3600,
      # Each seed draws its own failures (chaos.seed = 1 + seed, as bench_decoupled).
      seed_fields=("seed", ("chaos.seed", 1)),
      columns=("goodput", "uptime", "virtual_seconds", "dp_non_elastic_progress_at_end",
               "dp_elastic_progress_at_end"),
      figures=("loss_curves", "timeline"), timeline_cell="chaos",
      checks=[dict(claim="chaos costs little quality (within 3% of no chaos)", kind="within",
                   a="chaos", b="nochaos", tol=0.03)],
      commands=__doc__)
