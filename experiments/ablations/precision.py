r"""Outer-gradient precision: fp32, bf16, int4, int2 and 1-bit, with and without error feedback.

Pseudo-gradients (learner -> syncer) pass through the codec; publications stay
fp32. Error feedback (`codec.error_feedback`) carries what the codec dropped
into later sends (half of it, `codec.feedback_decay` = 0.5). Decoupled DiLoCo,
no failures. Bytes are the exact encoded payloads.

CPU (default; 7 cells x 4 seeds):
  python -m experiments.sweep --sweep=experiments/ablations/precision.py --workdir=runs/precision --jobs=2
Accelerator host:
  python -m experiments.sweep --sweep=experiments/ablations/precision.py:accelerator --workdir=runs/precision_acc
"""

from experiments import sweep
from experiments.ablations import common

CELLS = {
    "fp32": {"codec.up": "fp32"},
    "bf16": {"codec.up": "bf16"},
    "int4": {"codec.up": "int4"},
    "int2": {"codec.up": "int2"},
    "int2_ef": {"codec.up": "int2", "codec.error_feedback": True},
    "sign": {"codec.up": "sign"},
    "sign_ef": {"codec.up": "sign", "codec.error_feedback": True},
}


def get_config(arg=None):
  cells = [common.train_cell(name, "nochaos", arg, o) for name, o in CELLS.items()]
  checks = [dict(claim="int4 ~ fp32 (within 1%)", kind="within", a="int4", b="fp32",
                 tol=0.01)]
  for low in ("int2", "sign"):
    bits = {"int2": "2-bit", "sign": "1-bit"}[low]
    checks += [
        dict(claim=f"{bits} ({low}) without error feedback clearly worse than fp32 (> 1%)",
             kind="worse", a=low, b="fp32", tol=0.01),
        dict(claim=f"error feedback recovers most (> 50%) of {bits}'s gap to fp32",
             kind="recovers", bad=low, fixed=f"{low}_ef", good="fp32", share=0.5)]
  return sweep.make_sweep(
      name="precision", title="Outer-gradient precision (learner -> syncer codec)",
      cells=cells, reference="fp32", seeds=common.TRAIN_SEEDS, timeout_s=3600,
      columns=("bytes_per_learner", "bytes_reduction_vs_dp", "peak_upload_bytes_per_step"),
      figures=("loss_curves", "bytes"), checks=checks, commands=__doc__)
