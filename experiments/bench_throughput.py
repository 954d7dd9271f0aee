"""Tokens/s of the framework's training loop vs a minimal hand-written jitted loop.

Both train the same model on the same global batch and data on the same
devices; they are measured alternately, `--rounds` times, and the medians are
compared. Compilation is excluded from both (the framework's summary reports
tokens/s after its first step; the hand loop is warmed up first).

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

_STEPS = flags.DEFINE_integer("steps", 150, "Steps per measured run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds (framework, hand loop).")
_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch (sequences).")
_METHODS = flags.DEFINE_list("methods", ["data_parallel"], "Framework methods to measure.")

METHODS = {
    "data_parallel": dict(runtime="data_parallel"),
}


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


def hand_loop_tokens_per_second(corpus) -> float:
  """The minimal loop: jit(value_and_grad + optax update), nothing else."""
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

  data = ShardIterator(corpus.train, shard=0, num_shards=1, batch_size=cfg.data.batch_size,
                       seq_len=cfg.model.seq_len, seed=0)
  params, opt_state, loss = step(params, opt_state, next(data))
  loss.block_until_ready()
  start = time.perf_counter()
  for _ in range(cfg.train.steps - 1):
    params, opt_state, loss = step(params, opt_state, next(data))
  loss.block_until_ready()
  return (cfg.train.steps - 1) * cfg.data.batch_size * cfg.model.seq_len / (
      time.perf_counter() - start)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  corpus = corpus_lib.load("embedded")
  results = {m: [] for m in _METHODS.value}
  hand = []
  for r in range(_ROUNDS.value):
    for method in _METHODS.value:
      results[method].append(framework_tokens_per_second(method))
      hand.append(hand_loop_tokens_per_second(corpus))
      print(f"round {r}: {method} {results[method][-1]:.0f} tok/s, "
            f"hand loop {hand[-1]:.0f} tok/s", flush=True)
  hand_median = statistics.median(hand)
  print(f"\ndevices: {jax.devices()}  preset={_PRESET.value}  batch={_BATCH.value}"
        f"x{transformer.PRESETS[_PRESET.value]['seq_len']}  steps/run={_STEPS.value}")
  print(f"{'method':<20}{'framework tok/s':>18}{'hand loop tok/s':>18}{'ratio':>8}")
  for method, rates in results.items():
    median = statistics.median(rates)
    print(f"{method:<20}{median:>18.0f}{hand_median:>18.0f}{median / hand_median:>8.3f}")


if __name__ == "__main__":
  app.run(main)
