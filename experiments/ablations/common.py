"""What the sweep files share: the experiment they vary, and its two sizes.

Training sweeps vary `experiments/decoupled_diloco.py` (the paper's main
setting scaled to a CPU: tiny model, M = 4, tau = 2, K = 1 + grace, RDA,
tokens^2/steps weights; 300 steps of 32 x 128 bytes = 1.2M tokens) with the
outer loop they were measured with, its `EARLIER` one (P = H = 10, Nesterov lr
0.7, momentum 0.5), so their committed sections stay reproducible.
`ACCELERATOR` turns any of its cells into the `small` run on an accelerator
host (the `small` model, 5000 steps, P = H = 24), as `config.use_small_run`.
"""

from decoupled_diloco.config import PRESETS
from experiments import decoupled_diloco
from experiments.sweep import cell

DECOUPLED = "experiments/decoupled_diloco.py"
# Evals every 50 steps give the loss-vs-tokens curves; checkpoints as often make an
# interrupted run lose at most 50 steps.
CPU = {**decoupled_diloco.EARLIER, "train.eval_every": 50, "train.checkpoint_every": 50}
ACCELERATOR = {
    **{f"model.{k}": v for k, v in PRESETS["small"].items()},
    "train.steps": 5000, "train.eval_every": 500, "train.checkpoint_every": 500,
    "data.batch_size": 64, "inner.lr": 1e-3, "outer.lr": 0.7, "outer.momentum": 0.9,
    "diloco.num_fragments": 24, "diloco.sync_every": 24,
}
TRAIN_SEEDS = (0, 1, 2, 3)


def size(arg: str | None) -> dict:
  """Overrides of the sweep's size: `cpu` (default) or `accelerator`."""
  if arg in (None, "", "cpu"):
    return CPU
  if arg == "accelerator":
    return ACCELERATOR
  raise ValueError(f"sweep size {arg!r} is unknown; choose cpu or accelerator.")


def train_cell(name: str, variant: str, arg: str | None, overrides: dict) -> dict:
  """A cell of `experiments/decoupled_diloco.py:<variant>`, sized by `arg`."""
  return cell(name, f"{DECOUPLED}:{variant}", {**size(arg), **overrides})
