"""Compile and run time of one inner training step under XLA's CPU settings, side by side.

  python -m experiments.bench_compile [--model=gpt|llama|moe] [--steps=200] [--repeats=3]

Why the tests compile the way they do (tests/conftest.py). For the tests' tiny
model (helpers.tiny_config), each setting runs in a fresh process with no
compilation cache: it compiles the jitted inner step (AdamW, one device) and
runs it `--steps` times. The settings: XLA's defaults; most optimizing passes
off (`jax_disable_most_optimizations`); and each of those with fusions emitted
by XLA's older CPU emitters, in one piece (the tests' `XLA_FLAGS`). Each
setting is measured `--repeats` times, alternating; the table gives medians and
ratios to the defaults.

Measured figures: BUILD.md, "Test".
"""

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

_MODEL = flags.DEFINE_enum("model", "gpt", ["gpt", "llama", "moe"], "The tests' tiny model.")
_STEPS = flags.DEFINE_integer("steps", 200, "Steps run after compiling.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Fresh processes per setting.")

FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
SETTINGS = {  # name: (jax_disable_most_optimizations, XLA_FLAGS)
    "defaults": ("0", ""),
    "older emitters": ("0", FAST_COMPILE),
    "passes off": ("1", ""),
    "passes off, older emitters (tests)": ("1", FAST_COMPILE),
}
MODELS = {
    "gpt": {},
    "llama": {"model.name": "llama", "model.num_kv_heads": 1},
    "moe": {"model.name": "moe", "model.num_experts": 4, "model.mlp_dim": 64},
}

# One measurement, in a fresh process: prints {"compile": s, "run": s}.
_CHILD = """
import json, sys, time
import jax, numpy as np, optax
from decoupled_diloco import config as config_lib, steps, tasks
from tests import helpers
cfg = config_lib.parse(helpers.tiny_config("data_parallel", **json.loads(sys.argv[1])))
task = tasks.build(cfg)
island = steps.make_islands(cfg, task, 1, jax.devices()[:1])[0]
params = task.init(jax.random.key(0))
tx = optax.adamw(1e-3)
opt_state = tx.init(params)
step = steps.make_inner_step(task, tx, island, params, opt_state)
spec = task.batch_spec(cfg.data.batch_size)
batch = {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}
lowered = step.lower(params, opt_state, spec)
t = time.perf_counter()
compiled = lowered.compile()
compile_s = time.perf_counter() - t
params, opt_state, loss = compiled(params, opt_state, batch)
loss.block_until_ready()
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
  params, opt_state, loss = compiled(params, opt_state, batch)
loss.block_until_ready()
print(json.dumps({"compile": compile_s, "run": time.perf_counter() - t}))
"""


def _measure(setting: str) -> dict[str, float]:
  disable, xla_flags = SETTINGS[setting]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_DISABLE_MOST_OPTIMIZATIONS=disable, XLA_FLAGS=xla_flags,
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(MODELS[_MODEL.value]),
                        str(_STEPS.value)], env=env, capture_output=True, text=True,
                       check=True, timeout=600)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  got = {s: [] for s in SETTINGS}
  for _ in range(_REPEATS.value):
    for setting in SETTINGS:
      got[setting].append(_measure(setting))
  med = {s: {k: statistics.median(r[k] for r in runs) for k in ("compile", "run")}
         for s, runs in got.items()}
  base = med["defaults"]
  print(f"model {_MODEL.value}, {_STEPS.value} steps, medians of {_REPEATS.value}")
  print(f"| setting | compile s | x defaults | {_STEPS.value} steps s | x defaults |")
  print("|---|---|---|---|---|")
  for s, m in med.items():
    print(f"| {s} | {m['compile']:.3f} | {m['compile'] / base['compile']:.2f} |"
          f" {m['run']:.3f} | {m['run'] / base['run']:.2f} |")


if __name__ == "__main__":
  app.run(main)
