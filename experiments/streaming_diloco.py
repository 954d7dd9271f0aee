"""Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512) in lock-step.

Parameters are split into P = 5 balanced fragments, synced on a schedule
staggered over H = 25 steps; each merged fragment arrives tau = 2 steps after
it was sent (communication overlapped with compute) and is mixed in with
alpha = 0.5. Peak bytes per step fall by about P relative to DiLoCo.

Command (about 2 minutes on a 2-core CPU; eval loss 2.38 nats/byte vs 2.39 for
DiLoCo; peak bytes per step 1.6 MB vs 15.3 MB for DiLoCo, same total bytes):
  python -m decoupled_diloco.main --config=experiments/streaming_diloco.py \
      --workdir=/tmp/streaming

Variants: `tiny` (default), `small` (P = 4 with the 6-layer model, H = 100).
"""

from decoupled_diloco import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.runtime = "lockstep"
  c.diloco.update(num_learners=4, num_fragments=5, sync_every=25, overlap=2, alpha=0.5,
                  fragmentation="balanced", merge="mean", weighting="uniform")
  # Momentum 0.5, not DiLoCo's 0.9: a CPU run has only 12 outer steps, too few for
  # heavy momentum to build up (0.9 gave 2.51 vs 2.32-2.36 for 0.5 on `tiny`).
  c.outer.update(name="nesterov", lr=0.7, momentum=0.5)
  if arg == "small":
    config_lib.use_small_run(c)
    c.diloco.update(sync_every=100, num_fragments=4)
  elif arg not in (None, "tiny"):
    raise ValueError(f"unknown variant {arg!r}; choose tiny or small.")
  return c
