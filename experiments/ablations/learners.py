r"""Number of learners M: Decoupled DiLoCo with 1, 2, 4 and 8 learners at equal tokens.

The global batch (32 sequences) is split between the learners, so every cell
trains on the same tokens; more learners means smaller per-learner batches and
more independent drift between syncs. No failures (`nochaos`).

CPU (default; 4 cells x 4 seeds, see experiments/results/ablations/ for timings):
  python -m experiments.sweep --sweep=experiments/ablations/learners.py --workdir=runs/learners --jobs=2
Accelerator host (`small` model, 5000 steps, P = H = 24; one island per device group):
  python -m experiments.sweep --sweep=experiments/ablations/learners.py:accelerator --workdir=runs/learners_acc
"""

from experiments import sweep
from experiments.ablations import common

LEARNERS = (1, 2, 4, 8)


def get_config(arg=None):
  cells = [common.train_cell(f"m{m}", "nochaos", arg, {"diloco.num_learners": m})
           for m in LEARNERS]
  return sweep.make_sweep(
      name="learners", title="Number of learners M (Decoupled DiLoCo, no failures)",
      cells=cells, reference="m4", seeds=common.TRAIN_SEEDS, timeout_s=3600,
      columns=("bytes_per_learner", "outer_steps", "mean_contributors_per_merge"),
      figures=("loss_curves",),
      notes="Same global batch and tokens in every cell; the per-learner batch is 32/M.",
      commands=__doc__)
