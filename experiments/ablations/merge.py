r"""Merge rule at M = 8: weighted mean vs RDA (embeddings on the mean) vs RDA everywhere.

Radial-directional averaging keeps the norm of the merged update when the
learners' pseudo-gradients are nearly orthogonal, where a mean shrinks it by
about sqrt(M); the paper finds RDA >= mean at M >= 8. Decoupled DiLoCo, no
failures, 8 learners of 4 sequences each.

CPU (default; 3 cells x 4 seeds):
  python -m experiments.sweep --sweep=experiments/ablations/merge.py --workdir=runs/merge --jobs=2
Accelerator host:
  python -m experiments.sweep --sweep=experiments/ablations/merge.py:accelerator --workdir=runs/merge_acc
"""

from experiments import sweep
from experiments.ablations import common


def get_config(arg=None):
  cells = [common.train_cell(rule, "nochaos", arg,
                             {"diloco.num_learners": 8, "diloco.merge": rule})
           for rule in ("mean", "rda", "rda_everywhere")]
  return sweep.make_sweep(
      name="merge", title="Merge rule at M = 8 (mean, RDA, RDA everywhere)", cells=cells,
      reference="mean", seeds=common.TRAIN_SEEDS, timeout_s=3600,
      columns=("outer_steps", "mean_contributors_per_merge"), figures=("loss_curves",),
      checks=[dict(claim="RDA >= mean at M >= 8 (lower or equal eval loss)",
                   kind="not_worse", a="rda", b="mean", tol=0.0),
              dict(claim="RDA everywhere >= mean at M >= 8", kind="not_worse",
                   a="rda_everywhere", b="mean", tol=0.0)],
      commands=__doc__)
