r"""Quality vs bytes at equal tokens: data-parallel, DiLoCo and compressed DiLoCo.

Every row trains the `tiny` model for `--steps` steps of a global batch of
32 x 128 bytes (300 steps: 1.2M tokens), in its own temporary workdir, one row
after the other, and the table compares final eval loss with data-parallel's
and the bytes each learner moves with what data-parallel would all-reduce.

  python -m experiments.bench_quality                    # all rows, ~27 min on 2 shared CPU cores
  python -m experiments.bench_quality --rows=diloco_m4,int4

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
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameter init and data order.")


def row_config(name: str):
  module, overrides = ROWS[name]
  c = module.get_config()
  c.seed = _SEED.value
  c.train.update(steps=_STEPS.value, eval_every=0, checkpoint_every=0)
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def run_row(name: str) -> dict:
  c = row_config(name)
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


def print_table(results: dict) -> None:
  dp = results.get("data_parallel")
  print(f"\n{'row':<16}{'M':>3}{'H':>5}{'up':>6}{'down':>6}{'EF':>4}{'eval loss':>11}"
        f"{'loss/DP':>8}{'up MB':>9}{'down MB':>9}{'MB/learner':>12}{'reduction':>10}{'wall s':>8}")
  for name, s in results.items():
    c = s["config"]
    lockstep = c["runtime"] != "data_parallel"
    ratio = f"{s['final_eval_loss'] / dp['final_eval_loss']:.4f}" if dp else "-"
    print(f"{name:<16}{s['num_learners']:>3}"
          f"{c['diloco']['sync_every'] if lockstep else 1:>5}"
          f"{c['codec']['up'] if lockstep else '-':>6}{c['codec']['down'] if lockstep else '-':>6}"
          f"{('y' if c['codec']['error_feedback'] else 'n') if lockstep else '-':>4}"
          f"{s['final_eval_loss']:>11.4f}{ratio:>8}"
          f"{_mb(s.get('bytes_up')):>9}{_mb(s.get('bytes_down')):>9}"
          f"{_mb(s['per_learner_bytes']):>12}{_times(s['reduction']):>10}"
          f"{s['bench_wall_seconds']:>8.0f}")


def print_targets(results: dict) -> None:
  print("\ntargets:")
  def loss(name):
    return results[name]["final_eval_loss"]
  if "int4" in results and "diloco_m4" in results:
    gap = loss("int4") / loss("diloco_m4") - 1
    print(f"  int4 within 1% of fp32 DiLoCo (M=4): {100 * gap:+.2f}%"
          f" -> {'met' if abs(gap) <= 0.01 else 'MISSED'}")
  for codec in ("int2", "sign"):
    if codec in results and f"{codec}_ef" in results:
      ok = loss(f"{codec}_ef") <= loss(codec)
      print(f"  {codec} error feedback at least as good: {loss(f'{codec}_ef'):.4f} vs"
            f" {loss(codec):.4f} -> {'met' if ok else 'MISSED'}")
  for name in ("int4_h100", "int4_both_h100", "int4_both_h150"):
    if name not in results:
      continue
    s = results[name]
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
  logging.set_verbosity(logging.WARNING)
  print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}"
        f"  backend={jax.default_backend()} devices={jax.device_count()}"
        f"  steps={_STEPS.value} seed={_SEED.value}", flush=True)
  results = {}
  for name in _ROWS.value:
    results[name] = s = run_row(name)
    print(f"{name}: eval loss {s['final_eval_loss']:.4f}, bytes per learner vs data-parallel"
          f" {_times(s['reduction'])}, {s['bench_wall_seconds']:.0f} s", flush=True)
  print_table(results)
  print("\naccounting: link bytes, both directions, on both sides. Data-parallel reference ="
        " ring all-reduce of fp32 gradients, ~4x the\n  gradient bytes per replica per step"
        " (2(N-1)/N sent + as much received); DiLoCo bytes per learner = (bytes_up +\n"
        "  bytes_down) / M, exact encoded payload sizes; reduction = reference / bytes per"
        " learner\n  (1 fragment, tau = 0: 16 H / (up + down bytes per parameter)).")
  print_targets(results)


if __name__ == "__main__":
  app.run(main)
