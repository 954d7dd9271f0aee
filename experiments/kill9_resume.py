r"""Each method, killed with SIGKILL mid-run and started again, ends where an uninterrupted run ends.

For each variant of a config (`experiments/methods.py`'s four by default), as a
user would run them: `python -m decoupled_diloco.main` once through; then again
in another workdir, killed with SIGKILL (its whole process group) as soon as
its metrics reach `--kill_at`, and started again with the same command, which
resumes from the last checkpoint. Prints, per variant, the step it resumed
from and whether every eval record (loss, metrics, bytes, routing/*) and the
final checkpoint's arrays are bitwise those of the uninterrupted run. Exits 1
if one is not.

  python -m experiments.kill9_resume --config=experiments/moe.py \
      --set=train.steps=30 --set=train.checkpoint_every=10 --set=train.eval_every=10 \
      --set=train.log_every=1 --kill_at=25 --workdir=/tmp/kill9
  python -m experiments.kill9_resume --variants=experiments/data_parallel.py,\
experiments/diloco.py,experiments/streaming_diloco.py,experiments/decoupled_diloco.py:nochaos ...

(`train.log_every=1`: the log shows every step, so the kill lands at 25.)
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

from decoupled_diloco import metrics

_CONFIG = flags.DEFINE_string("config", "experiments/moe.py", "A config file with variants.")
_VARIANTS = flags.DEFINE_list("variants", ["data_parallel", "diloco", "streaming", "decoupled"],
                              "Its variants to check (an entry with '.py' is a whole config:"
                              " file[:arg]).")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE overrides for every run.")
_KILL_AT = flags.DEFINE_integer("kill_at", 25, "Kill once the metrics reach this step.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/kill9_resume", "Where the runs go (replaced).")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 900, "The most one run may take.")


def _command(variant: str, workdir: str) -> list[str]:
  sets = [f"--config.{s}" for s in _SET.value]
  config = variant if ".py" in variant else f"{_CONFIG.value}:{variant}"
  return [sys.executable, "-m", "decoupled_diloco.main", f"--config={config}",
          f"--workdir={workdir}", *sets]


def _last_step(log_path: str) -> int:
  """The last step the run's progress lines report (`step N/TOTAL`; see train.log_every)."""
  with open(log_path, errors="replace") as f:
    return max((int(n) for n in re.findall(r"\bstep (\d+)/", f.read())), default=0)


def _run(variant: str, workdir: str, kill_at: int | None = None) -> int:
  """Runs to the end, or kills at `kill_at`; returns the last step its log reported."""
  log_path = os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.log")
  with open(log_path, "a") as log:
    proc = subprocess.Popen(_command(variant, workdir), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
      deadline = time.time() + _TIMEOUT.value
      while proc.poll() is None and time.time() < deadline:
        if kill_at is not None and _last_step(log_path) >= kill_at:
          os.killpg(proc.pid, signal.SIGKILL)
          break
        time.sleep(0.05)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  if kill_at is None and proc.returncode != 0:
    raise RuntimeError(f"{variant}: exit {proc.returncode}; see {log_path}")
  return _last_step(log_path)


def _evals(workdir: str) -> dict:
  """Eval records by step (a resumed run rewrites later steps: the last wins), no clocks."""
  out = {}
  for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    if "eval_loss" in r:
      out[r["step"]] = {k: v for k, v in r.items() if "second" not in k and k != "time"}
  return out


def _final_checkpoint(workdir: str):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  tree = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())
  mgr.close()
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _bitwise(x: np.ndarray, y: np.ndarray) -> bool:
  """Same dtype, shape and bytes (NaN where NaN: a learner with no jump pending)."""
  return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def main(argv):
  del argv
  shutil.rmtree(_WORKDIR.value, ignore_errors=True)
  os.makedirs(_WORKDIR.value)
  failed = False
  for variant in _VARIANTS.value:
    name = os.path.basename(variant).replace(".py", "").replace(":", "_")
    whole, killed = (os.path.join(_WORKDIR.value, f"{name}_{k}") for k in ("whole", "killed"))
    _run(variant, whole)
    done = _run(variant, killed, kill_at=_KILL_AT.value)
    _run(variant, killed)
    with open(os.path.join(killed, "summary.json")) as f:
      resumed_from = json.load(f)["resumed_from_step"]
    same_evals = _evals(whole) == _evals(killed)
    a, b = _final_checkpoint(whole), _final_checkpoint(killed)
    same_state = len(a) == len(b) and all(_bitwise(x, y) for x, y in zip(a, b))
    ok = same_evals and same_state and 0 < resumed_from < done
    failed |= not ok
    print(f"{name:14s} killed at step {done}, resumed from {resumed_from}: eval records"
          f" {'identical' if same_evals else 'DIFFER'}, final checkpoint ({len(a)} arrays)"
          f" {'identical' if same_state else 'DIFFERS'}", flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main)
