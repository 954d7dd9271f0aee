"""The data path at scale: loader speed, resident memory, and `prepare`'s throughput.

Three measurements, each a ratio or a difference of two runs made side by side:

1. The loader (data/reader.py) alone, in tokens per second, vs what the `llama`
   experiment's training step (experiments/llama.py, data-parallel, its batch)
   consumes on the same machine: jit(value_and_grad + AdamW) on the batches the
   loader gives, warmed up first, timed to a blocked result. Both read the same
   synthetic prepared dataset, with random sharding over 4 learners.
2. Peak resident memory (the kernel's VmHWM of the process) of the same short
   data-parallel `llama` run, from the command line, on a synthetic 2 GB token
   dataset and on a 20 MB one: token shards are memory-mapped, so the first
   must not hold more than the second (the target: within 100 MB).
3. `python -m decoupled_diloco.data.prepare`'s throughput in MB of text per
   second on one worker (one core), with the bytes tokenizer and with a BPE of
   4096 trained on the same 20 MB of generated text, training included.

  python -m experiments.bench_data                    # all three (a 2 GB dataset in --dir)
  python -m experiments.bench_data --big_gb=0.2       # a quicker check of 2.

Measured figures: BUILD.md, "Data".
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
import tokenizers
from absl import app, flags

from decoupled_diloco import config as config_lib, tasks
from decoupled_diloco.data import dataset, prepare
from experiments import llama

_DIR = flags.DEFINE_string("dir", None, "Where the synthetic datasets go (default: a temp dir).")
_BIG_GB = flags.DEFINE_float("big_gb", 2.0, "Size of the big synthetic token dataset, in GB.")
_STEPS = flags.DEFINE_integer("steps", 30, "Training steps of each resident-memory run.")
_TEXT_MB = flags.DEFINE_float("text_mb", 20.0, "MB of generated text for `prepare`.")
VOCAB = 4096
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_dataset(path: str, tokens: int, seed: int = 0) -> None:
  """A prepared dataset (data/dataset.py) of uniform random uint16 tokens, written in chunks."""
  os.makedirs(path, exist_ok=True)
  rng, chunk = np.random.default_rng(seed), 1 << 24
  splits = {}
  for split, n in (("train", tokens - tokens // 100), ("eval", tokens // 100)):
    file = f"{split}-00000.npy"
    out = np.lib.format.open_memmap(os.path.join(path, file), "w+", np.uint16, (n,))
    for i in range(0, n, chunk):
      out[i:i + chunk] = rng.integers(0, VOCAB, min(chunk, n - i), dtype=np.uint16)
    out.flush()
    del out
    shard = {"file": file, "tokens": n, "documents": 1, "bytes": 3 * n,
             "sha256": dataset.sha256_file(os.path.join(path, file))}
    splits[split] = {"shards": [shard], "tokens": n, "documents": 1, "bytes": 3 * n,
                     "bytes_per_token": 3.0}
  vocab = tokenizers.Tokenizer(tokenizers.models.WordLevel(  # A stand-in: one word a token.
      {f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
  vocab.save(os.path.join(path, "tokenizer.json"))
  dataset.write_manifest(path, {
      "format": dataset.FORMAT, "dtype": "uint16", "eval_percent": 1.0, "inputs": ["synthetic"],
      "tokenizer": {"kind": "file", "vocab_size": VOCAB, "file": "tokenizer.json", "eos_id": None,
                    "sha256": dataset.sha256_file(os.path.join(path, "tokenizer.json"))},
      "documents": "one synthetic document a split", "splits": splits,
      "invalid_utf8_documents": 0, "replaced_characters": 0})


def llama_config(path: str) -> config_lib.Config:
  c = llama.get_config("data_parallel")
  c.data.path, c.model.vocab_size = path, VOCAB
  return c


def loader_vs_step(path: str) -> None:
  cfg = config_lib.parse(llama_config(path))
  task = tasks.build(cfg)
  source = task.train_source(1, 4, cfg.data.batch_size, cfg.seed)
  units = task.num_units(next(source))
  n, t = 0, time.perf_counter()
  while time.perf_counter() - t < 3.0:
    next(source)
    n += 1
  loader = n * units / (time.perf_counter() - t)

  tx = optax.adamw(cfg.inner.lr)
  params = task.init(jax.random.key(0))
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: task.loss(p, batch)[0])(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  for _ in range(3):  # Compile and warm up.
    params, state, loss = step(params, state, next(source))
  loss.block_until_ready()
  n, t = 0, time.perf_counter()
  while time.perf_counter() - t < 10.0:
    params, state, loss = step(params, state, next(source))
    n += 1
  loss.block_until_ready()
  consumed = n * units / (time.perf_counter() - t)
  print(f"1. loader alone: {loader:,.0f} tokens/s; llama's training step consumes"
        f" {consumed:,.0f} tokens/s; loader / step = {loader / consumed:.1f}x (target >= 10x)")


def peak_rss_mb(path: str, workdir: str) -> float:
  """VmHWM of a short data-parallel llama run on `path`, from the command line."""
  script = ("import runpy, sys, atexit\n"
            "def hwm():\n"
            "  for line in open('/proc/self/status'):\n"
            "    if line.startswith('VmHWM'): print('VMHWM', line.split()[1], flush=True)\n"
            "atexit.register(hwm)\n"
            "sys.argv = ['main'] + sys.argv[1:]\n"
            "runpy.run_module('decoupled_diloco.main', run_name='__main__')\n")
  cmd = [sys.executable, "-c", script, "--config=experiments/llama.py:data_parallel",
         f"--config.data.path={path}", f"--config.model.vocab_size={VOCAB}",
         f"--config.train.steps={_STEPS.value}", "--config.train.eval_every=0",
         "--config.train.checkpoint_every=0", f"--workdir={workdir}"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=True)
  kb = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("VMHWM")]
  return int(kb[-1]) / 1024


def generated_text(path: str, mb: float, seed: int = 0) -> None:
  """Files of pseudo-words drawn from a skewed (Zipf) vocabulary: text-like statistics."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
  words = ["".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(20_000)]
  os.makedirs(path, exist_ok=True)
  written, i = 0, 0
  while written < mb * 1e6:
    ids = np.minimum(rng.zipf(1.3, 20_000), len(words)) - 1
    text = " ".join(words[k] for k in ids) + "\n"
    with open(os.path.join(path, f"doc{i:05d}.txt"), "w") as f:
      f.write(text)
    written, i = written + len(text), i + 1


def prepare_throughput(root: str) -> None:
  text = os.path.join(root, "text")
  generated_text(text, _TEXT_MB.value)
  mb = sum(os.path.getsize(os.path.join(text, f)) for f in os.listdir(text)) / 1e6
  for tokenizer in ("bytes", "bpe"):
    out = os.path.join(root, f"prepared_{tokenizer}")
    t = time.perf_counter()
    prepare.prepare([text], out, tokenizer=tokenizer, vocab_size=VOCAB, workers=1,
                    progress=False)
    seconds = time.perf_counter() - t
    print(f"3. prepare --tokenizer={tokenizer}: {mb:.1f} MB of text in {seconds:.1f} s on one"
          f" worker = {mb / seconds:.2f} MB/s per core"
          + (" (BPE training included)" if tokenizer == "bpe" else ""))
    shutil.rmtree(out)


def main(argv):
  del argv
  root = _DIR.value or tempfile.mkdtemp(prefix="bench_data_")
  small, big = os.path.join(root, "small"), os.path.join(root, "big")
  synthetic_dataset(small, 10_000_000)  # 20 MB of uint16 tokens.
  loader_vs_step(small)
  synthetic_dataset(big, int(_BIG_GB.value * 1e9 / 2))
  rss = {name: peak_rss_mb(path, os.path.join(root, f"run_{name}"))
         for name, path in (("20 MB", small), (f"{_BIG_GB.value:g} GB", big))}
  (a, ra), (b, rb) = rss.items()
  print(f"2. peak resident memory of {_STEPS.value} llama steps: {ra:.0f} MB on {a} of tokens,"
        f" {rb:.0f} MB on {b}: {rb - ra:+.0f} MB (target: within 100 MB)")
  shutil.rmtree(big)
  prepare_throughput(root)
  print(json.dumps({"root": root}))


if __name__ == "__main__":
  app.run(main)
