r"""Compute utilisation vs link bandwidth (0.1 to 100 Gbit/s), compute-free.

How slow can each learner's link get before the learners' utilisation drops?
A 1B-parameter model at 1 s per inner step (the `params` and `step_seconds`
fields of experiments/ablations/analytic.py), M = 4 islands, 2400 steps each:
  data_parallel  all-reduce of fp32 gradients every step, not overlapped;
  diloco         lock-step DiLoCo, H = 24, P = 1, tau = 0 (learners wait for the merge);
  streaming      lock-step Streaming DiLoCo, P = H = 24, tau = 2;
  decoupled      Decoupled DiLoCo, P = H = 24, tau = 2, K = 1 + grace (never waits);
  decoupled_int4 the same with int4 pseudo-gradients (4 bits + one fp32 scale per 256).
A learner runs at most as fast as its link carries its bytes (see analytic.py).

CPU (default; 50 cells x 1 seed, seconds each; no noise, so one seed says it all):
  python -m experiments.sweep --sweep=experiments/ablations/bandwidth.py --workdir=runs/bandwidth --jobs=2
`large`: a 12B-parameter model at 10 s per step (the paper's cross-region run, 2-5 Gbit/s):
  python -m experiments.sweep --sweep=experiments/ablations/bandwidth.py:large --workdir=runs/bandwidth_large --jobs=2
"""

from experiments import sweep

BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
METHODS = {
    "data_parallel": {"method": "data_parallel"},
    "diloco": {"method": "diloco"},
    "streaming": {"method": "streaming"},
    "decoupled": {"method": "decoupled"},
    "decoupled_int4": {"method": "decoupled", "up_bits": 4.125},
}


def get_config(arg=None):
  if arg not in (None, "", "large"):
    raise ValueError(f"variant {arg!r} is unknown; choose the default or large.")
  params, step_s = (12e9, 10.0) if arg == "large" else (1e9, 1.0)
  cells = []
  for name, o in METHODS.items():
    for bw in BANDWIDTHS:
      cells.append(sweep.cell(f"{name}_{bw:g}gbps", "experiments/ablations/analytic.py", {
          **o, "chaos": False, "bandwidth_gbps": bw, "params": params,
          "step_seconds": step_s, "steps": 2400}, program="experiments.ablations.analytic"))
  names = lambda method: [f"{method}_{bw:g}gbps" for bw in BANDWIDTHS]
  checks = [dict(claim=f"Decoupled DiLoCo's utilisation >= {other}'s at every bandwidth",
                 kind="dominates", a=names("decoupled"), b=names(other),
                 metric="utilisation", tol=0.0)
            for other in ("data_parallel", "diloco", "streaming")]
  return sweep.make_sweep(
      name="bandwidth", title="Compute utilisation vs link bandwidth (compute-free)",
      cells=cells, reference="data_parallel_100gbps", seeds=(0,), timeout_s=600,
      metric="utilisation", higher_is_better=True,
      columns=("link_load", "bytes_up_per_learner"), figures=("utilisation_vs_bandwidth",),
      checks=checks, commands=__doc__)
