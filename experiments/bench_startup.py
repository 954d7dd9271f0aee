"""Start-up of the simulator runtime with many learners: seconds to the first step.

  python -m experiments.bench_startup [--learners=32] [--cache=DIR]

From process start to the first `train_step` done (imports, data, building the
learners' islands and compiled steps, one inner step of every learner), for
`experiments/decoupled_diloco.py:nochaos` with M learners. With `--cache`, JAX's
persistent compilation cache (what `decoupled_diloco.main` uses in the workdir
by default): run twice to see a cold and a warm start.
"""

import time

_T0 = time.perf_counter()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from absl import app, flags

from decoupled_diloco import config as config_lib
from decoupled_diloco import tasks
from decoupled_diloco.runtime.decoupled import Decoupled
from experiments import decoupled_diloco as experiment

_LEARNERS = flags.DEFINE_integer("learners", 32, "M.")
_CACHE = flags.DEFINE_string("cache", "", "Persistent compilation cache directory ('' off).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_startup", "Where the event log goes.")


def main(argv):
  del argv
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  imported = time.perf_counter() - _T0
  c = experiment.get_config("nochaos")
  c.diloco.num_learners = _LEARNERS.value
  c.data.batch_size = 2 * _LEARNERS.value
  cfg = config_lib.parse(c)
  rt = Decoupled(cfg, tasks.build(cfg), _WORKDIR.value)
  built = time.perf_counter() - _T0
  jax.block_until_ready(rt.train_step()["loss"])
  print(f"M = {_LEARNERS.value}: imports {imported:.1f} s, built {built:.1f} s, first step"
        f" done {time.perf_counter() - _T0:.1f} s (compilation cache"
        f" {'at ' + _CACHE.value if _CACHE.value else 'off'})")


if __name__ == "__main__":
  app.run(main)
