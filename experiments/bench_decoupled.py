"""Decoupled DiLoCo under chaos and on heterogeneous hardware: quality and goodput.

Runs variants of experiments/decoupled_diloco.py (tiny model, 4 learners,
1.2M tokens each) one after the other and prints eval loss, goodput, uptime,
virtual time and outer steps side by side, plus how far data-parallel on the
same chips under the same failure draws had got when each run finished.

  python -m experiments.bench_decoupled                       # all rows, ~15 min
  python -m experiments.bench_decoupled --rows=chaos,nochaos
  python -m experiments.bench_decoupled --rows=chaos,nochaos --up=int4   # compressed sends
"""

import tempfile

from absl import app, flags, logging

from decoupled_diloco import train
from experiments import decoupled_diloco

_ROWS = flags.DEFINE_list("rows", ["chaos", "nochaos", "hetero_lockstep", "hetero_km",
                                   "hetero_k1", "hetero_k1_grace"], "Variants to run.")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps (x4 learners) per run.")
_UP = flags.DEFINE_string("up", "fp32", "codec.up of every row (algorithm/codecs.py).")
_DOWN = flags.DEFINE_string("down", "fp32", "codec.down of every row.")
_FEEDBACK = flags.DEFINE_bool("error_feedback", False, "codec.error_feedback of every row.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  results = {}
  for row in _ROWS.value:
    c = decoupled_diloco.get_config(row)
    c.train.update(steps=_STEPS.value, eval_every=0)
    c.codec.update(up=_UP.value, down=_DOWN.value, error_feedback=_FEEDBACK.value)
    c.sim.event_log = row == "chaos"
    with tempfile.TemporaryDirectory() as workdir:
      results[row] = s = train.train_and_evaluate(c, workdir)
    print(f"{row}: eval loss {s['final_eval_loss']:.4f}, goodput {100 * s['goodput']:.1f}%",
          flush=True)
  print(f"\ncodecs: up {_UP.value}, down {_DOWN.value}, error feedback {_FEEDBACK.value}")
  print(f"{'variant':<17}{'eval loss':>10}{'goodput':>9}{'uptime':>8}{'virtual s':>11}"
        f"{'outer steps':>12}{'contrib/merge':>14}{'min learner steps':>18}"
        f"{'MB/learner':>11}{'vs DP':>8}")
  for row, s in results.items():
    per_learner = (s["bytes_up"] + s["bytes_down"]) / len(s["learners"])
    print(f"{row:<17}{s['final_eval_loss']:>10.4f}{100 * s['goodput']:>8.1f}%"
          f"{100 * s['uptime']:>7.1f}%{s['virtual_seconds']:>11.1f}{s['outer_steps']:>12}"
          f"{s['mean_contributors_per_merge']:>14.2f}"
          f"{min(l['steps'] for l in s['learners']):>18}"
          f"{per_learner / 1e6:>11.2f}{s['bytes_reduction_vs_dp']:>7.1f}x")
  if "chaos" in results and "nochaos" in results:
    a, b = results["chaos"], results["nochaos"]
    print(f"\nchaos vs no chaos: eval loss ratio {a['final_eval_loss'] / b['final_eval_loss']:.4f}"
          f" (target within 3%); learners down at least once:"
          f" {sum(l['down_s'] > 0 for l in a['learners'])}/{len(a['learners'])}")
    ne, el = a["dp_non_elastic_seconds"], a["dp_elastic_seconds"]
    print("data-parallel on the same chips and failure draws, for the same tokens:")
    print(f"  non-elastic: {'more than the horizon' if ne is None else f'{ne:.0f} s'}"
          f" ({100 * a['dp_non_elastic_progress_at_end']:.0f}% done when the decoupled run"
          f" finished at {a['virtual_seconds']:.0f} s; target: >= 1.5x its time)")
    print(f"  elastic: {'more than the horizon' if el is None else f'{el:.0f} s'}"
          f" ({100 * a['dp_elastic_progress_at_end']:.0f}% done by then)")


if __name__ == "__main__":
  app.run(main)
