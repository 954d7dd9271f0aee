r"""Codec throughput: jitted encode+decode of a fragment-sized array vs copy.

For every codec in `codecs.CODEC_NAMES` (top-k with each value format) this
measures a jitted `decode(encode(x))` over one float32 array of `--size`
elements, and, alternately in the same loop so both see the same machine
state, a jitted copy of the same array. Prints bytes on the wire (exact, from
the payload), compression vs fp32, throughput in GB/s of float32 input, and
the time relative to the copy.

  python experiments/bench_codecs.py --size=1048576 --repeats=50

Runs on whatever backend JAX picks (CPU, GPU or TPU).
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from decoupled_diloco.algorithm import codecs

_SIZE = flags.DEFINE_integer("size", 1 << 20,
                             "Elements in the float32 array (a fragment).")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed repeats; median kept.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 256, "Codec block size.")
_TOPK_FRACTION = flags.DEFINE_float("topk_fraction", 0.01,
                                    "Share of each block top-k keeps.")


def _seconds(fn, x) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(x))
  return time.perf_counter() - start


def main(argv):
  del argv
  n = _SIZE.value
  x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
  input_bytes = 4 * n
  copy = jax.jit(lambda x: x.copy())

  variants = [(name, "fp32") for name in codecs.CODEC_NAMES]
  variants += [("topk", "bf16"), ("topk", "int8")]
  print(f"backend={jax.default_backend()} device={jax.devices()[0]} "
        f"size={n} ({input_bytes / 2**20:.1f} MiB float32) "
        f"block_size={_BLOCK_SIZE.value} topk_fraction={_TOPK_FRACTION.value} "
        f"repeats={_REPEATS.value}")
  print(f"{'codec':<10} {'wire bytes':>11} {'vs fp32':>8} {'GB/s':>8} "
        f"{'copy GB/s':>10} {'time/copy':>10}")
  for name, values in variants:
    codec = codecs.make_codec(name, block_size=_BLOCK_SIZE.value,
                              topk_fraction=_TOPK_FRACTION.value,
                              topk_values=values)
    roundtrip = jax.jit(
        lambda x, c=codec: c.decode(c.encode(x), x.shape, x.dtype))
    wire = codecs.payload_nbytes(jax.eval_shape(codec.encode, x))
    for _ in range(3):  # Compile and warm up.
      _seconds(roundtrip, x)
      _seconds(copy, x)
    codec_times, copy_times = [], []
    for _ in range(_REPEATS.value):
      codec_times.append(_seconds(roundtrip, x))
      copy_times.append(_seconds(copy, x))
    t_codec = statistics.median(codec_times)
    t_copy = statistics.median(copy_times)
    label = name if values == "fp32" else f"{name}/{values}"
    print(f"{label:<10} {wire:>11d} {input_bytes / wire:>7.2f}x "
          f"{input_bytes / t_codec / 1e9:>8.2f} "
          f"{input_bytes / t_copy / 1e9:>10.2f} {t_codec / t_copy:>9.1f}x")


if __name__ == "__main__":
  app.run(main)
