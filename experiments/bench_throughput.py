"""Units/s of the framework's training loop vs a minimal hand-written jitted loop, any task.

Both train the same task (model, loss, data) on the same global batch on the
same devices. They are measured alternately, `--rounds` times; each round's
framework runs are divided by that round's hand loop (runs minutes apart
share the machine's drift), and the table gives the median of those per-round
ratios with their range. Compilation is excluded from both: the hand loop is
warmed up first, and the framework's rate is its summary's
`steady_<unit>_per_second` (after step 1, less the time jax reports compiling
the functions first used later: the syncs, at their first use). The wall-clock
rate, compilation included, is printed beside it. DiLoCo rows are also
compared with 4 hand-written replicas taking turns on a quarter of the batch
each (no sync), which isolates what syncing costs. The hand loop is
jit(value_and_grad(task.loss) + the config's inner optax optimizer) on
batches from `task.train_source`, nothing else.

  python -m experiments.bench_throughput                             # gpt, tiny, CPU
  python -m experiments.bench_throughput --task=llama                # experiments/llama.py's model
  python -m experiments.bench_throughput --task=moe                  # experiments/moe.py's
  python -m experiments.bench_throughput --task=digits_vit           # experiments/digits_vit.py's
  python -m experiments.bench_throughput --preset=small              # gpt, on an accelerator

Measured figures: BUILD.md, "Throughput".
"""

import statistics
import tempfile
import time

import jax
import optax
from absl import app, flags, logging

from decoupled_diloco import config as config_lib
from decoupled_diloco import optim, tasks, train
from experiments import digits_vit, llama, moe

METHODS = {
    "data_parallel": {"runtime": "data_parallel"},
    "diloco": {"runtime": "lockstep", "diloco.num_learners": 4, "diloco.sync_every": 25},
    "streaming_diloco": {"runtime": "lockstep", "diloco.num_learners": 4,
                         "diloco.num_fragments": 5, "diloco.sync_every": 25,
                         "diloco.overlap": 2, "diloco.alpha": 0.5},
}
# Task flag -> the config sections taken from its experiment file (gpt: `--preset`).
TASKS = {
    "gpt": (None, ()),
    "llama": (llama.get_config, ("task", "model")),
    "moe": (moe.get_config, ("task", "model")),
    "digits_vit": (digits_vit.get_config, ("task", "model", "data")),
}

_TASK = flags.DEFINE_enum("task", "gpt", list(TASKS), "Task (and model) to train.")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps per measured run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds (framework, hand loop).")
_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset (gpt only).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch in rows (default: the task's).")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Framework methods to measure.")


def framework_config(method: str):
  c = config_lib.base_config()
  experiment, sections = TASKS[_TASK.value]
  if experiment is None:
    config_lib.use_preset(c, _PRESET.value)
  if sections:
    source = experiment()
    for section in sections:
      c[section].update(source[section])
  if _BATCH.value is not None:
    c.data.batch_size = _BATCH.value
  c.train.update(steps=_STEPS.value, eval_every=0, checkpoint_every=0, eval_batches=1,
                 log_every=_STEPS.value)
  for key, value in METHODS[method].items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c


def framework_units_per_second(method: str, unit: str) -> tuple[float, float]:
  """(steady units/s, wall-clock units/s) of one framework run."""
  with tempfile.TemporaryDirectory() as workdir:
    summary = train.train_and_evaluate(framework_config(method), workdir)
  return summary[f"steady_{unit}_per_second"], summary[f"{unit}_per_second"]


def hand_loop_units_per_second(num_replicas: int = 1) -> float:
  """The minimal loop: jit(value_and_grad + optax update), nothing else.

  With `num_replicas` > 1, that many independent replicas take turns, each on
  batch / num_replicas rows: DiLoCo's inner work without any sync.
  """
  cfg = config_lib.parse(framework_config("data_parallel"))
  task = tasks.build(cfg)
  tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
  params = task.init(jax.random.key(cfg.seed))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batch = cfg.data.batch_size // num_replicas
  data = [task.train_source(r, num_replicas, batch, cfg.seed) for r in range(num_replicas)]
  states = [(params, opt_state)] * num_replicas
  for r in range(num_replicas):
    *states[r], loss = step(*states[r], next(data[r]))
  loss.block_until_ready()
  start = time.perf_counter()
  for _ in range(cfg.train.steps - 1):
    for r in range(num_replicas):
      *states[r], loss = step(*states[r], next(data[r]))
  loss.block_until_ready()
  units_per_step = task.num_units(task.batch_spec(cfg.data.batch_size))
  return (cfg.train.steps - 1) * units_per_step / (time.perf_counter() - start)


def main(argv):
  del argv
  if _TASK.value != "gpt" and _PRESET.value != "tiny":
    raise app.UsageError(f"--preset is for --task=gpt; {_TASK.value} takes its experiment's model.")
  logging.set_verbosity(logging.WARNING)
  cfg = config_lib.parse(framework_config("data_parallel"))
  task = tasks.build(cfg)
  unit = task.unit
  results = {m: [] for m in _METHODS.value}  # Per round: (steady, wall) units/s.
  hand, hand_m = [], []
  for r in range(_ROUNDS.value):
    for method in _METHODS.value:
      results[method].append(framework_units_per_second(method, unit))
      steady, wall = results[method][-1]
      print(f"round {r}: {method} {steady:.0f} {unit}/s ({wall:.0f} with compilation)",
            flush=True)
    hand.append(hand_loop_units_per_second())
    hand_m.append(hand_loop_units_per_second(num_replicas=4))
    print(f"round {r}: hand loop {hand[-1]:.0f} {unit}/s, 4 hand replicas {hand_m[-1]:.0f}"
          f" {unit}/s", flush=True)
  spec = task.batch_spec(cfg.data.batch_size)
  batch = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in spec.items())
  print(f"\ndevices: {jax.devices()}  jax {jax.__version__}  task={_TASK.value}"
        f" ({task.name}, model {cfg.model.name})  batch: {batch} = {task.num_units(spec)}"
        f" {unit}  steps/run={_STEPS.value}  rounds={_ROUNDS.value}")
  print(f"hand loop (1 replica, global batch): median {statistics.median(hand):.0f} {unit}/s;"
        f" 4 hand replicas (batch/4 each, no sync): {statistics.median(hand_m):.0f} {unit}/s")
  print("ratios: median of the rounds' ratios [min, max]; steady = compilation excluded")
  print(f"{'method':<18}{'steady ' + unit + '/s':>18}{'vs hand loop':>24}"
        f"{'vs 4 replicas':>24}{'wall vs hand loop':>24}")
  for method, runs in results.items():
    steady = [s for s, _ in runs]
    vs_m = _ratios(steady, hand_m) if method != "data_parallel" else ""
    print(f"{method:<18}{statistics.median(steady):>18.0f}{_ratios(steady, hand):>24}"
          f"{vs_m:>24}{_ratios([w for _, w in runs], hand):>24}")


def _ratios(rates: list[float], reference: list[float]) -> str:
  """'median [min, max]' of the per-round ratios rates[r] / reference[r]."""
  ratios = [a / b for a, b in zip(rates, reference)]
  return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"

if __name__ == "__main__":
  app.run(main)
