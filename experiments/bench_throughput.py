"""Tokens/s of the framework's training loop vs a minimal hand-written jitted loop.

Both train the same model on the same global batch and data on the same
devices; they are measured alternately, `--rounds` times, and the medians are
compared. Compilation is excluded from both where it can be (the framework's
summary reports tokens/s after its first step; the hand loop is warmed up
first); the framework's sync functions compile at their first use, inside the
timed loop, so runs are long enough (300 steps, 12 syncs at H = 25) for that to
amortise as it does in real training. DiLoCo rows are also compared with 4
hand-written replicas taking turns on a quarter of the batch each (no sync),
which isolates what syncing costs.

  python -m experiments.bench_throughput                 # tiny model, CPU
  python -m experiments.bench_throughput --preset=small  # on an accelerator
"""

import statistics
import tempfile
import time

import jax
import optax
from absl import app, flags, logging

from decoupled_diloco import config as config_lib
from decoupled_diloco import optim, train
from decoupled_diloco.data import corpus as corpus_lib
from decoupled_diloco.data.loader import ShardIterator
from decoupled_diloco.models import transformer

METHODS = {
    "data_parallel": {"runtime": "data_parallel"},
    "diloco": {"runtime": "lockstep", "diloco.num_learners": 4, "diloco.sync_every": 25},
    "streaming_diloco": {"runtime": "lockstep", "diloco.num_learners": 4,
                         "diloco.num_fragments": 5, "diloco.sync_every": 25,
                         "diloco.overlap": 2, "diloco.alpha": 0.5},
}

_STEPS = flags.DEFINE_integer("steps", 300, "Steps per measured run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds (framework, hand loop).")
_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch (sequences).")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Framework methods to measure.")


def framework_config(method: str):
  c = config_lib.base_config()
  config_lib.use_preset(c, _PRESET.value)
  c.data.batch_size = _BATCH.value
  c.train.update(steps=_STEPS.value, eval_every=0, checkpoint_every=0, eval_batches=1,
                 log_every=_STEPS.value)
  for key, value in METHODS[method].items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c


def framework_tokens_per_second(method: str) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    return train.train_and_evaluate(framework_config(method), workdir)["tokens_per_second"]


def hand_loop_tokens_per_second(corpus, num_replicas: int = 1) -> float:
  """The minimal loop: jit(value_and_grad + optax update), nothing else.

  With `num_replicas` > 1, that many independent replicas take turns, each on
  batch / num_replicas sequences: DiLoCo's inner work without any sync.
  """
  cfg = config_lib.parse(framework_config("data_parallel"))
  model = transformer.Transformer(cfg.model)
  tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
  params = transformer.init_params(cfg.model, jax.random.key(0))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(transformer.loss_fn)(params, model, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batch = cfg.data.batch_size // num_replicas
  data = [ShardIterator(corpus.train, shard=r, num_shards=num_replicas, batch_size=batch,
                        seq_len=cfg.model.seq_len, seed=0) for r in range(num_replicas)]
  states = [(params, opt_state)] * num_replicas
  for r in range(num_replicas):
    *states[r], loss = step(*states[r], next(data[r]))
  loss.block_until_ready()
  start = time.perf_counter()
  for _ in range(cfg.train.steps - 1):
    for r in range(num_replicas):
      *states[r], loss = step(*states[r], next(data[r]))
  loss.block_until_ready()
  return (cfg.train.steps - 1) * cfg.data.batch_size * cfg.model.seq_len / (
      time.perf_counter() - start)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  corpus = corpus_lib.load("embedded")
  results = {m: [] for m in _METHODS.value}
  hand, hand_m = [], []
  for r in range(_ROUNDS.value):
    for method in _METHODS.value:
      results[method].append(framework_tokens_per_second(method))
      print(f"round {r}: {method} {results[method][-1]:.0f} tok/s", flush=True)
    hand.append(hand_loop_tokens_per_second(corpus))
    hand_m.append(hand_loop_tokens_per_second(corpus, num_replicas=4))
    print(f"round {r}: hand loop {hand[-1]:.0f} tok/s, 4 hand replicas {hand_m[-1]:.0f}"
          " tok/s", flush=True)
  ref, ref_m = statistics.median(hand), statistics.median(hand_m)
  print(f"\ndevices: {jax.devices()}  preset={_PRESET.value}  batch={_BATCH.value}"
        f"x{config_lib.PRESETS[_PRESET.value]['seq_len']}  steps/run={_STEPS.value}"
        f"  rounds={_ROUNDS.value} (medians)")
  print(f"hand loop (1 replica, global batch): {ref:.0f} tok/s;"
        f" 4 hand replicas (batch/4 each, no sync): {ref_m:.0f} tok/s")
  print(f"{'method':<20}{'framework tok/s':>16}{'vs hand loop':>14}{'vs 4 replicas':>15}")
  for method, rates in results.items():
    median = statistics.median(rates)
    vs_m = f"{median / ref_m:>15.3f}" if method != "data_parallel" else f"{'':>15}"
    print(f"{method:<20}{median:>16.0f}{median / ref:>14.3f}{vs_m}")


if __name__ == "__main__":
  app.run(main)
