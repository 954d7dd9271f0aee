r"""What error feedback leaves behind: each learner's residual at every sync.

Runs lock-step DiLoCo (`experiments/diloco.py`, M = 4, H = 25, P = 1) with a
lossy up codec and error feedback, and at every sync prints, over the four
learners: |x_m| (the pseudo-gradient sent, residual included), |e_m| (the
residual kept), the share of the residual the learners have in common
(||mean_m e_m||^2 / mean_m ||e_m||^2), and the share of |e_m|^2 on coordinates
the codec over-sent (|decoded| > |x|). `algorithm/learner.py` explains why these
decide the residual decay.

  python -m experiments.feedback_residuals --codec=sign --decay=1   # ~1 min on 2 CPU cores
  python -m experiments.feedback_residuals --codec=int2 --decay=1
"""

import jax
import numpy as np
from absl import app, flags, logging

from decoupled_diloco import config as config_lib
from decoupled_diloco import tasks
from decoupled_diloco.runtime.lockstep import LockStep
from experiments import diloco

_CODEC = flags.DEFINE_string("codec", "sign", "Up codec (lossy: int2, sign, topk, ...).")
_DECAY = flags.DEFINE_float("decay", 1.0, "codec.feedback_decay.")
_SYNCS = flags.DEFINE_integer("syncs", 5, "Syncs to report.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameter init and data order.")


def _flat(tensors) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(t, np.float32)) for t in tensors])


def main(argv):
  del argv
  if not 0 < _DECAY.value <= 1:
    raise app.UsageError(f"--decay={_DECAY.value} must be in (0, 1]: with 0 nothing is kept.")
  logging.set_verbosity(logging.WARNING)
  c = diloco.get_config("h25")
  c.seed = _SEED.value
  c.codec.update(up=_CODEC.value, error_feedback=True, feedback_decay=_DECAY.value)
  cfg = config_lib.parse(c)
  rt = LockStep(cfg, tasks.build(cfg))
  learners, h = rt.team.learners, cfg.diloco.sync_every
  print(f"codec={_CODEC.value} decay={_DECAY.value} M={len(learners)} H={h} seed={_SEED.value}")
  print(f"{'sync':>4}{'|x_m|':>8}{'|e_m|':>8}{'|e|/|x|':>9}{'shared':>8}{'over-sent':>11}")
  for step in range(1, h * _SYNCS.value + 1):
    if step % h == 0:  # The pseudo-gradients this step's sync will send.
      xs = [_flat(l.base[0]) - _flat(l.fragment_tensors(0)) for l in learners]
    rt.train_step()
    if step % h:
      continue
    # After the send, e = beta * (x - decoded); the decay does not change the shares.
    es = [_flat(jax.device_get(l.residual[0])) / _DECAY.value for l in learners]
    decoded = [x - e for x, e in zip(xs, es)]
    x_norm = np.mean([np.linalg.norm(x) for x in xs])
    e_norm = np.mean([np.linalg.norm(e) for e in es])
    shared = np.linalg.norm(np.mean(es, 0))**2 / np.mean([np.sum(e**2) for e in es])
    over = np.mean([np.sum(e[np.abs(d) > np.abs(x)]**2) / np.sum(e**2)
                    for e, d, x in zip(es, decoded, xs)])
    print(f"{step // h:>4}{x_norm:>8.3f}{e_norm:>8.3f}{e_norm / x_norm:>9.2f}{shared:>8.2f}"
          f"{over:>11.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
