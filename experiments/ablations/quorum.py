r"""Quorum and grace under heterogeneous learners: K = M, K = 1, K = 1 + grace, lock-step.

Learners 2 and 3 are 18% slower and every step has 10% lognormal noise
(`experiments/decoupled_diloco.py` hetero_* variants). `lockstep` is the
synchronous reference (K = M, fast learners wait for fragment p at send step
+ tau); the other cells never wait for the syncer and differ in when a round
closes: when all M reported, at the first report, or after the adaptive grace
window. Goodput is useful chip-time over allocated chip-time.

CPU (default; 4 cells x 4 seeds):
  python -m experiments.sweep --sweep=experiments/ablations/quorum.py --workdir=runs/quorum --jobs=2
Accelerator host:
  python -m experiments.sweep --sweep=experiments/ablations/quorum.py:accelerator --workdir=runs/quorum_acc
"""

from experiments import sweep
from experiments.ablations import common

VARIANTS = {"lockstep": "hetero_lockstep", "k_m": "hetero_km", "k1": "hetero_k1",
            "k1_grace": "hetero_k1_grace"}


def get_config(arg=None):
  cells = [common.train_cell(name, variant, arg, {}) for name, variant in VARIANTS.items()]
  return sweep.make_sweep(
      name="quorum", title="Quorum and grace under heterogeneous learners", cells=cells,
      reference="lockstep", seeds=common.TRAIN_SEEDS, timeout_s=3600,
      columns=("goodput", "virtual_seconds", "mean_contributors_per_merge", "outer_steps"),
      figures=("loss_curves", "timeline"), timeline_cell="k1_grace",
      checks=[
          dict(claim="K = 1 + grace ~ K = M lock-step in quality (within 1%)", kind="within",
               a="k1_grace", b="lockstep", tol=0.01),
          dict(claim="K = 1 + grace ~ K = M (no waits) in quality (within 1%)", kind="within",
               a="k1_grace", b="k_m", tol=0.01),
          dict(claim="K = 1 + grace at ~100% goodput (>= 99%)", kind="at_least",
               a="k1_grace", value=0.99, metric="goodput"),
          dict(claim="K = 1 + grace has higher goodput than lock-step", kind="not_worse",
               a="k1_grace", b="lockstep", tol=0.0, metric="goodput", higher_is_better=True),
      ],
      commands=__doc__)
