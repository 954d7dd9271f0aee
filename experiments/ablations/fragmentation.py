r"""Fragmentation: balanced bin-packing vs by layer vs strided tensors, P = 5.

The tiny model has 6 top-level modules (embeddings, 2 blocks, final norm,
head), so P = 5 fragments (H = 10: one fragment every other step) is the most
`layer` allows. `strided` deals tensors out one by one (tensor i to fragment
i mod P): the per-tensor split. Quality, and the peak bytes a learner uploads
in one step (from `events.jsonl`: the largest fragment, encoded), which
balancing minimises. Decoupled DiLoCo, no failures.

CPU (default; 3 cells x 4 seeds):
  python -m experiments.sweep --sweep=experiments/ablations/fragmentation.py --workdir=runs/fragmentation --jobs=2
Accelerator host (`layer` needs P <= modules; `small` has 10, so P = 8 there):
  python -m experiments.sweep --sweep=experiments/ablations/fragmentation.py:accelerator --workdir=runs/fragmentation_acc
"""

from experiments import sweep
from experiments.ablations import common


def get_config(arg=None):
  p = 8 if arg == "accelerator" else 5
  cells = [common.train_cell(name, "nochaos", arg,
                             {"diloco.fragmentation": name, "diloco.num_fragments": p})
           for name in ("balanced", "layer", "strided")]
  checks = [dict(claim=f"balanced ~ {other} in quality (within 1%)", kind="within",
                 a="balanced", b=other, tol=0.01) for other in ("layer", "strided")]
  checks.append(dict(claim="balanced has the lowest peak upload bytes per step",
                     kind="lowest", a="balanced", among=["balanced", "layer", "strided"],
                     metric="peak_upload_bytes_per_step"))
  return sweep.make_sweep(
      name="fragmentation", title=f"Fragmentation (P = {p}): balanced, layer, strided",
      cells=cells, reference="balanced", seeds=common.TRAIN_SEEDS, timeout_s=3600,
      columns=("peak_upload_bytes_per_step", "bytes_per_learner"),
      figures=("loss_curves", "bytes"), checks=checks, commands=__doc__)
