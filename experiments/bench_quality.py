r"""Quality vs bytes at equal tokens: data-parallel, DiLoCo and compressed DiLoCo.

Every row trains the `tiny` model for `--steps` steps of a global batch of
32 x 128 bytes (300 steps: 1.2M tokens), in its own temporary workdir, one row
after the other, and the table compares final eval loss with data-parallel's
and the bytes each learner moves with what data-parallel would all-reduce.

  python -m experiments.bench_quality                    # all rows, ~20 min on 2 CPU cores
  python -m experiments.bench_quality --rows=diloco_m4,int4
  python -m experiments.bench_quality --rows=sign,sign_ef,int2,int2_ef --seeds=0,1,2,3,4,5,6,7

With several seeds every row runs once per seed; the table shows the mean eval
loss (and each seed's), and the targets compare means. Within one seed, rows
that differ only slightly (int8 vs fp32, say) already land 0.2-0.3% apart, so
read single-seed differences of that size as ties.

Accounting (exact encoded payload sizes, both directions, never estimates):
  every byte over a participant's link, both directions, on both sides;
  data-parallel reference: a ring all-reduce of fp32 gradients sends 2(N-1)/N
    and receives as much of the gradient per replica per step, ~4x its bytes:
    4 * 4 * num_params * steps;
  DiLoCo bytes per learner: (bytes_up + bytes_down) / M;
  reduction = reference / DiLoCo bytes per learner (Team.accounting's
    `bytes_reduction_vs_dp`). With one fragment and tau = 0 it is
    16 * H / (up + down bytes per parameter), whatever the number of steps.
"""

import datetime
import math
import platform
import tempfile
import time

import jax
from absl import app, flags, logging

from decoupled_diloco import train
from experiments import data_parallel, diloco

# name -> (experiment module, dotted overrides).
ROWS = {
    "data_parallel": (data_parallel, {}),
    "diloco_m4": (diloco, {}),
    "diloco_m1": (diloco, {"diloco.num_learners": 1}),
    "int4": (diloco, {"codec.up": "int4"}),
    "int2": (diloco, {"codec.up": "int2"}),
    "int2_ef": (diloco, {"codec.up": "int2", "codec.error_feedback": True}),
    "sign": (diloco, {"codec.up": "sign"}),
    "sign_ef": (diloco, {"codec.up": "sign", "codec.error_feedback": True}),
    # 1% of each block of 256 (3 values, fp32, and their uint8 indices).
    "topk": (diloco, {"codec.up": "topk"}),
    "topk_ef": (diloco, {"codec.up": "topk", "codec.error_feedback": True}),
    # Ablations of error feedback: the whole residual carried (beta = 1), and the
    # SparseLoCo/MuLoCo form (restart at Theta, add e to the next send).
    "int2_ef_b1": (diloco, {"codec.up": "int2", "codec.error_feedback": True,
                            "codec.feedback_decay": 1.0}),
    "sign_ef_b1": (diloco, {"codec.up": "sign", "codec.error_feedback": True,
                            "codec.feedback_decay": 1.0}),
    "int2_ef_global": (diloco, {"codec.up": "int2", "codec.error_feedback": True,
                                "codec.feedback_restart": "global", "codec.feedback_decay": 1.0}),
    "sign_ef_global": (diloco, {"codec.up": "sign", "codec.error_feedback": True,
                                "codec.feedback_restart": "global", "codec.feedback_decay": 1.0}),
    "int4_h100": (diloco, {"codec.up": "int4", "diloco.sync_every": 100}),
    # Where 1000x is crossed: fp32 down alone costs 8H/4 = 2H, so it needs a
    # compressed publication as well (here the global parameters in int4).
    "int4_both_h100": (diloco, {"codec.up": "int4", "codec.down": "int4",
                                "diloco.sync_every": 100}),
    "int4_both_h150": (diloco, {"codec.up": "int4", "codec.down": "int4",
                                "diloco.sync_every": 150}),
}
TARGET_REDUCTION = 1000.0

_ROWS = flags.DEFINE_list("rows", list(ROWS), f"Rows to run, from {list(ROWS)}.")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps of every row (global batch 32 x 128).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds of parameter init and data order; every"
                           " row runs once per seed and the table averages them.")


def row_config(name: str, seed: int):
  module, overrides = ROWS[name]
  c = module.get_config()
  c.seed = seed
  c.train.update(steps=_STEPS.value, eval_every=0, checkpoint_every=0)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def run_row(name: str, seed: int) -> dict:
  c = row_config(name, seed)
  if c.runtime != "data_parallel" and c.train.steps % c.diloco.sync_every:
    logging.warning("%s: steps=%d is not a multiple of H=%d; the last %d steps are never"
                    " merged into the global model.", name, c.train.steps, c.diloco.sync_every,
                    c.train.steps % c.diloco.sync_every)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    s = train.train_and_evaluate(c, workdir)
  s["bench_wall_seconds"] = time.perf_counter() - start
  if c.runtime == "data_parallel":
    s["num_learners"], s["per_learner_bytes"], s["reduction"] = 1, s["allreduce_bytes"], 1.0
    return s
  m = c.diloco.num_learners
  s["num_learners"] = m
  s["per_learner_bytes"] = (s["bytes_up"] + s["bytes_down"]) / m
  s["reduction"] = None  # Nothing sent (no sync yet): no ratio to report.
  if s["per_learner_bytes"]:
    s["reduction"] = s["bytes_reduction_vs_dp"]
    # Both sides divide by M, so this is the library's own figure.
    per_learner_dp = s["dp_allreduce_bytes"] / m
    assert math.isclose(per_learner_dp / s["per_learner_bytes"], s["reduction"], rel_tol=1e-9)
  return s


def _mb(x) -> str:
  return "-" if x is None else f"{x / 1e6:.2f}"


def _times(x) -> str:
  return "no sync" if x is None else f"{x:.1f}x"


def _loss(runs: list) -> float:
  """Mean final eval loss over a row's seeds."""
  return sum(s["final_eval_loss"] for s in runs) / len(runs)


def print_table(results: dict) -> None:
  """One line per row: mean eval loss over seeds; bytes do not depend on the seed."""
  dp = results.get("data_parallel")
  print(f"\n{'row':<16}{'M':>3}{'H':>5}{'up':>6}{'down':>6}{'EF':>6}{'eval loss':>11}"
        f"{'loss/DP':>8}{'up MB':>9}{'down MB':>9}{'MB/learner':>12}{'reduction':>10}{'wall s':>8}"
        f"  per seed")
  for name, runs in results.items():
    s, c = runs[0], runs[0]["config"]
    lockstep = c["runtime"] != "data_parallel"
    codec = c["codec"] if lockstep else {"error_feedback": False}
    ef = (f"{codec['feedback_restart'][0]}{codec['feedback_decay']:g}"
          if codec["error_feedback"] else "n" if lockstep else "-")
    ratio = f"{_loss(runs) / _loss(dp):.4f}" if dp else "-"
    wall = sum(r["bench_wall_seconds"] for r in runs) / len(runs)
    per_seed = " ".join(f"{r['final_eval_loss']:.4f}" for r in runs)
    print(f"{name:<16}{s['num_learners']:>3}"
          f"{c['diloco']['sync_every'] if lockstep else 1:>5}"
          f"{c['codec']['up'] if lockstep else '-':>6}{c['codec']['down'] if lockstep else '-':>6}"
          f"{ef:>6}{_loss(runs):>11.4f}{ratio:>8}"
          f"{_mb(s.get('bytes_up')):>9}{_mb(s.get('bytes_down')):>9}"
          f"{_mb(s['per_learner_bytes']):>12}{_times(s['reduction']):>10}{wall:>8.0f}"
          f"  {per_seed}")
  print("EF: n = none; o = offset restart (default), g = global restart (SparseLoCo/MuLoCo),"
        " then the residual decay beta (codec.feedback_decay).")


def print_targets(results: dict) -> None:
  print("\ntargets (means over seeds):")
  def loss(name):
    return _loss(results[name])
  if "int4" in results and "diloco_m4" in results:
    gap = loss("int4") / loss("diloco_m4") - 1
    print(f"  int4 within 1% of fp32 DiLoCo (M=4): {100 * gap:+.2f}%"
          f" -> {'met' if abs(gap) <= 0.01 else 'MISSED'}")
  for codec in ("int2", "sign", "topk"):
    for ef in (f"{codec}_ef", f"{codec}_ef_b1", f"{codec}_ef_global"):
      if codec in results and ef in results:
        per_seed = " ".join(f"{100 * (a['final_eval_loss'] / b['final_eval_loss'] - 1):+.2f}%"
                            for a, b in zip(results[ef], results[codec]))
        print(f"  {ef} at least as good as {codec}: {loss(ef):.4f} vs {loss(codec):.4f}"
              f" ({100 * (loss(ef) / loss(codec) - 1):+.2f}%; per seed {per_seed})"
              f" -> {'met' if loss(ef) <= loss(codec) else 'MISSED'}")
  for name in ("int4_h100", "int4_both_h100", "int4_both_h150"):
    if name not in results:
      continue
    s = results[name][0]
    if s["reduction"] is None:
      print(f"  {name}: no sync within {s['steps']} steps; no reduction to report")
      continue
    h = s["config"]["diloco"]["sync_every"]
    print(f"  {name}: {s['dp_allreduce_bytes'] / s['num_learners']:.0f} B data-parallel"
          f" all-reduce per replica / {s['per_learner_bytes']:.0f} B per learner ="
          f" {s['reduction']:.1f}x -> {'meets' if s['reduction'] >= TARGET_REDUCTION else 'MISSES'}"
          f" >= {TARGET_REDUCTION:.0f}x; the ratio grows as H (not with steps): these codecs"
          f" need H >= {math.ceil(h * TARGET_REDUCTION / s['reduction'])}")


def main(argv):
  del argv
  unknown = [r for r in _ROWS.value if r not in ROWS]
  if unknown:
    raise app.UsageError(f"--rows: unknown row(s) {unknown}; choose from {list(ROWS)}.")
  try:
    seeds = [int(x) for x in _SEEDS.value]
  except ValueError:
    raise app.UsageError(f"--seeds: integers, e.g. 0,1; got {_SEEDS.value}.") from None
  if not seeds:
    raise app.UsageError("--seeds: at least one seed.")
  logging.set_verbosity(logging.WARNING)
  print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}"
        f"  backend={jax.default_backend()} devices={jax.device_count()}"
        f"  steps={_STEPS.value} seeds={','.join(map(str, seeds))}", flush=True)
  results = {}
  for name in _ROWS.value:
    results[name] = []
    for seed in seeds:
      results[name].append(s := run_row(name, seed))
      print(f"{name} seed {seed}: eval loss {s['final_eval_loss']:.4f}, bytes per learner vs"
            f" data-parallel {_times(s['reduction'])}, {s['bench_wall_seconds']:.0f} s", flush=True)
  print_table(results)
  print("\naccounting: link bytes, both directions, on both sides. Data-parallel reference ="
        " ring all-reduce of fp32 gradients, ~4x the\n  gradient bytes per replica per step"
        " (2(N-1)/N sent + as much received); DiLoCo bytes per learner = (bytes_up +\n"
        "  bytes_down) / M, exact encoded payload sizes; reduction = reference / bytes per"
        " learner\n  (1 fragment, tau = 0: 16 H / (up + down bytes per parameter)).")
  print_targets(results)


if __name__ == "__main__":
  app.run(main)
