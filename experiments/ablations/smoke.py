r"""A two-cell sweep in about a minute a seed: the runner's and the report's own test.

fp32 vs int4 pseudo-gradients on a one-layer model (d_model 64, 24 steps of
16 x 32 bytes, M = 2 decoupled learners, P = 2, H = 4). tests/test_sweep.py runs it,
interrupts it, resumes it and checks the report.

  python -m experiments.sweep --sweep=experiments/ablations/smoke.py --workdir=/tmp/smoke
  python -m experiments.report /tmp/smoke
"""

from experiments import sweep
from experiments.ablations import common

TINY = {
    "model.num_layers": 1, "model.d_model": 64, "model.num_heads": 2, "model.mlp_dim": 128,
    "model.seq_len": 32, "data.batch_size": 16, "train.steps": 24, "train.log_every": 4,
    "train.eval_every": 4, "train.checkpoint_every": 12, "train.eval_batches": 2,
    "inner.warmup_steps": 2, "diloco.num_learners": 2, "diloco.num_fragments": 2,
    "diloco.sync_every": 4, "diloco.overlap": 1,
}


def get_config(arg=None):
  del arg
  cells = [common.train_cell(name, "nochaos", None, {**TINY, "codec.up": up})
           for name, up in (("fp32", "fp32"), ("int4", "int4"))]
  return sweep.make_sweep(
      name="smoke", title="Smoke test: fp32 vs int4 on a one-layer model", cells=cells,
      reference="fp32", seeds=(0, 1), timeout_s=300,
      columns=("bytes_per_learner", "bytes_reduction_vs_dp", "peak_upload_bytes_per_step"),
      figures=("loss_curves", "bytes", "timeline"), timeline_cell="int4",
      checks=[dict(claim="int4 ~ fp32 (within 5% on this toy)", kind="within", a="int4",
                   b="fp32", tol=0.05)],
      commands="python -m experiments.sweep --sweep=experiments/ablations/smoke.py"
               " --workdir=DIR")
