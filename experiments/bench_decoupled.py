"""Decoupled DiLoCo under chaos, on heterogeneous hardware and with compressed sends.

Runs variants of experiments/decoupled_diloco.py (tiny model, 4 learners,
1.2M tokens each) over several seeds (`seed` and `chaos.seed` both move) and
prints eval loss and goodput as mean +- standard error, the protocol's
counters, and the paired comparisons the paper's claims are about:

  python -m experiments.bench_decoupled --seeds=0,1,2,3        # every row, ~2 h on 2 cores
  python -m experiments.bench_decoupled --rows=chaos,nochaos --seeds=0
  python -m experiments.bench_decoupled --rows=nochaos,nochaos:int4:int4

A row is `variant[:up[:down]]` (codecs default to fp32). Results go to
--out (JSON, one entry per run) as they finish, so an interrupted sweep
keeps what it measured and a rerun skips the runs already there.
"""

import json
import math
import os
import tempfile

import numpy as np
from absl import app, flags, logging

from decoupled_diloco import train
from experiments import decoupled_diloco, methods

_ROWS = flags.DEFINE_list(
    "rows", ["nochaos", "chaos", "nochaos:int4:int4", "hetero_lockstep", "hetero_km",
             "hetero_k1", "hetero_k1_grace"], "Rows: variant[:up[:down]].")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds; each moves `seed` and `chaos.seed`.")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps (x4 learners) per run.")
_FEEDBACK = flags.DEFINE_bool("error_feedback", False, "codec.error_feedback of every row.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_decoupled.json",
                           "Where each run's figures are kept (and read back on a rerun).")

# The paper's claims, as (label, row, reference row, largest relative change allowed).
_CLAIMS = [
    ("K = 1 + grace vs K = M (heterogeneous)", "hetero_k1_grace", "hetero_km", 0.02),
    ("chaos vs no chaos", "chaos", "nochaos", 0.02),
    ("int4 both ways vs fp32", "nochaos:int4:int4", "nochaos", 0.005),
]


def run(row: str, seed: int) -> dict:
  variant, up, down = (row.split(":") + ["fp32", "fp32"])[:3]
  c = methods.earlier(decoupled_diloco, variant)  # What results/ was measured at.
  c.seed = seed
  c.chaos.seed = c.chaos.seed + seed
  c.train.update(steps=_STEPS.value, eval_every=0, checkpoint_every=0)
  c.codec.update(up=up, down=down, error_feedback=_FEEDBACK.value)
  c.sim.event_log = False
  with tempfile.TemporaryDirectory() as workdir:
    s = train.train_and_evaluate(c, workdir)
  return {"row": row, "seed": seed, "steps": _STEPS.value, "error_feedback": _FEEDBACK.value,
          "eval_loss": s["final_eval_loss"], "goodput": s["goodput"], "uptime": s["uptime"],
          "virtual_seconds": s["virtual_seconds"], "outer_steps": s["outer_steps"],
          "merges_per_fragment": float(np.mean(s["merges_per_fragment"])),
          "contributors_per_merge": s["mean_contributors_per_merge"],
          "mb_per_learner": (s["bytes_up"] + s["bytes_down"]) / len(s["learners"]) / 1e6,
          "reduction_vs_dp": s["bytes_reduction_vs_dp"], **s["protocol"]}


def mean_se(xs) -> tuple[float, float]:
  xs = np.asarray(xs, float)
  return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(xs.size)) if xs.size > 1 else 0.0


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  seeds = [int(s) for s in _SEEDS.value]
  done = json.load(open(_OUT.value)) if os.path.exists(_OUT.value) else []
  key = lambda r: (r["row"], r["seed"], r["steps"], r["error_feedback"])
  have = {key(r) for r in done}
  for row in _ROWS.value:
    for seed in seeds:
      if (row, seed, _STEPS.value, _FEEDBACK.value) in have:
        continue
      r = run(row, seed)
      done.append(r)
      os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
      with open(_OUT.value + ".tmp", "w") as f:
        json.dump(done, f, indent=1)
      os.replace(_OUT.value + ".tmp", _OUT.value)
      print(f"{row} seed {seed}: eval loss {r['eval_loss']:.4f}, goodput"
            f" {100 * r['goodput']:.1f}%", flush=True)
  runs = {row: [r for r in done if r["row"] == row and r["seed"] in seeds
                and r["steps"] == _STEPS.value and r["error_feedback"] == _FEEDBACK.value]
          for row in _ROWS.value}
  print(f"\n{len(seeds)} seed(s), {_STEPS.value} steps per learner; mean +- standard error")
  print(f"{'row':<20}{'eval loss':>18}{'goodput %':>14}{'outer/frag':>11}{'contrib':>8}"
        f"{'late':>7}{'rephase':>8}{'MB/learner':>11}{'vs DP':>8}")
  for row, rs in runs.items():
    if not rs:
      continue
    loss, goodput = mean_se([r["eval_loss"] for r in rs]), mean_se([r["goodput"] for r in rs])
    avg = lambda k: float(np.mean([r[k] for r in rs]))
    print(f"{row:<20}{loss[0]:>10.4f} +-{loss[1]:.4f}{100 * goodput[0]:>8.1f} +-{100 * goodput[1]:.1f}"
          f"{avg('merges_per_fragment'):>11.1f}{avg('contributors_per_merge'):>8.2f}"
          f"{avg('late_joined'):>7.0f}{avg('rephases'):>8.0f}{avg('mb_per_learner'):>11.2f}"
          f"{avg('reduction_vs_dp'):>7.0f}x")
  print()
  for label, row, ref, bound in _CLAIMS:
    a = {r["seed"]: r["eval_loss"] for r in runs.get(row, [])}
    b = {r["seed"]: r["eval_loss"] for r in runs.get(ref, [])}
    paired = [a[s] / b[s] - 1 for s in seeds if s in a and s in b]
    if not paired:
      continue
    m, se = mean_se(paired)
    verdict = "met" if m <= bound else "MISSED"
    print(f"{label}: {100 * m:+.2f}% +- {100 * se:.2f}% over {len(paired)} seed(s)"
          f" (target <= {100 * bound:.1f}%: {verdict})")
  if runs.get("hetero_k1_grace"):
    g = mean_se([r["goodput"] for r in runs["hetero_k1_grace"]])
    print(f"K = 1 + grace goodput: {100 * g[0]:.1f}% (target >= 99%:"
          f" {'met' if g[0] >= 0.99 else 'MISSED'})")


if __name__ == "__main__":
  app.run(main)
