"""Speed of the compute-free simulator: 2.4M chips, 16 learners, 10^5 steps each.

The same discrete-event simulator that drives real training, with analytic
step times and no JAX (runtime/goodput.py). Target: at most 60 s on a 2-core CPU.

  python -m experiments.bench_simulator
  python -m experiments.bench_simulator --steps=20000 --learners=4
"""

import time

from absl import app, flags

from decoupled_diloco.runtime import chaos, goodput

_CHIPS = flags.DEFINE_integer("chips", 2_400_000, "Simulated chips.")
_LEARNERS = flags.DEFINE_integer("learners", 16, "Learners (islands).")
_STEPS = flags.DEFINE_integer("steps", 100_000, "Inner steps per learner.")
_STEP_SECONDS = flags.DEFINE_float("step_seconds", 1.0, "Virtual seconds per step.")


def main(argv):
  del argv
  model = chaos.FailureModel()
  start = time.perf_counter()
  r = goodput.simulate_decoupled(model, num_chips=_CHIPS.value, num_learners=_LEARNERS.value,
                                 steps_per_learner=_STEPS.value,
                                 step_seconds=_STEP_SECONDS.value)
  elapsed = time.perf_counter() - start
  steps = _STEPS.value * _LEARNERS.value
  print(f"{_CHIPS.value:,} chips, {_LEARNERS.value} learners, {_STEPS.value:,} steps each"
        f" ({steps:,} learner-steps, {r['failures']:,} slice failures,"
        f" {r['virtual_seconds'] / 3600:.1f} virtual hours)")
  print(f"goodput {100 * r['goodput']:.1f}%  uptime {100 * r['uptime']:.1f}%  "
        f"merges {sum(r['merges_per_fragment']):,}  "
        f"contributors/merge {r['mean_contributors_per_merge']:.2f}")
  print(f"wall {elapsed:.1f} s ({steps / elapsed:,.0f} learner-steps/s); target <= 60 s:"
        f" {'met' if elapsed <= 60 else 'MISSED'}")


if __name__ == "__main__":
  app.run(main)
