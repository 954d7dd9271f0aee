"""`train_and_evaluate(config, workdir)`: the training loop shared by all runtimes.

A runtime advances every learner by one inner step per `train_step()` and
exposes its global model for eval; this loop adds logging, evals, checkpoints,
resumption and the final summary. Re-running with the same workdir resumes.
"""

import math
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from decoupled_diloco import checkpointing, config as config_lib, metrics, steps
from decoupled_diloco.data import corpus as corpus_lib
from decoupled_diloco.data import loader
from decoupled_diloco.runtime.data_parallel import DataParallel
from decoupled_diloco.runtime.decoupled import Decoupled
from decoupled_diloco.runtime.lockstep import LockStep

BITS_PER_NAT = 1 / math.log(2)


def make_runtime(cfg: config_lib.Config, corpus: corpus_lib.Corpus, workdir: str):
  if cfg.runtime == "data_parallel":
    return DataParallel(cfg, corpus.train)
  if cfg.runtime == "lockstep":
    return LockStep(cfg, corpus.train)
  return Decoupled(cfg, corpus.train, workdir)


class NonFiniteLossError(FloatingPointError):
  pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`; returns the summary also written there."""
  cfg = config_lib.parse(config)
  corpus = corpus_lib.load(cfg.data.path, cfg.data.eval_percent)
  if corpus.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the"
                     f" data's vocabulary ({corpus.vocab_size}).")
  logging.info("data: %s", corpus.description)
  rt = make_runtime(cfg, corpus, workdir)
  eval_island = rt.eval_island
  eval_loss = steps.make_eval_loss(rt.model, eval_island)
  eval_batches = loader.eval_batches(corpus.eval, batch_size=cfg.data.batch_size,
                                     seq_len=cfg.model.seq_len,
                                     num_batches=cfg.train.eval_batches)

  ckpt = checkpointing.Checkpointer(workdir, cfg.train.keep_checkpoints, cfg.runtime)
  if (latest := ckpt.latest_step()) is not None:
    ckpt.restore(latest, rt)
    logging.info("resumed from %s at step %d", workdir, rt.step)
  writer = metrics.MetricWriter(workdir)
  progress = metrics.Progress(rt.step, cfg.train.steps, rt.tokens_per_step)
  start_step, t0 = rt.step, time.perf_counter()

  def run_eval() -> dict:
    loss = steps.evaluate(eval_loss, eval_island, rt.eval_params(), eval_batches)
    scalars = {"eval_loss": loss, "eval_bits_per_byte": loss * BITS_PER_NAT}
    writer.write(rt.step, {**scalars, **rt.comm_metrics()})
    logging.info("step %d  eval loss %.4f  (%.3f bits/byte)", rt.step, loss,
                 scalars["eval_bits_per_byte"])
    return scalars

  def record(step: int, out: dict) -> None:
    """Reads step `step`'s metrics (called after the next step is dispatched)."""
    losses = np.atleast_1d(np.asarray(jax.device_get(out["loss"]), np.float64))
    finite = np.isfinite(losses)
    if not finite.any():
      raise NonFiniteLossError(
          f"training loss is {losses.tolist()} at step {step}; stopping. The last"
          f" good checkpoint (step {ckpt.latest_step()}) in {workdir} is intact:"
          " lower inner.lr or raise inner.warmup_steps, then resume.")
    scalars = {k: float(v) for k, v in out.items() if k != "loss"}
    scalars["loss"] = float(losses[finite].mean())
    if not finite.all():  # One learner diverged: the syncer rejects its deltas.
      scalars["nonfinite_losses"] = int((~finite).sum())
      logging.warning("step %d: %d of %d learner losses are not finite; their"
                      " contributions are rejected", step, (~finite).sum(), losses.size)
    writer.write(step, scalars)
    if step == start_step + 1:
      progress.restart_clock(step)
    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
      progress.log(step, scalars["loss"], progress.tokens_per_second(step))

  pending = None  # (step, metrics) of the last dispatched step, not read yet.
  eval_scalars = {}
  try:
    while rt.step < cfg.train.steps:
      out = rt.train_step()
      if pending is not None:
        record(*pending)
      pending = (rt.step, out)
      boundary = lambda every: every and rt.step % every == 0
      if boundary(cfg.train.eval_every) or boundary(cfg.train.checkpoint_every):
        record(*pending)  # A checkpoint is only written after its loss is checked.
        pending = None
        if boundary(cfg.train.eval_every):
          eval_scalars = run_eval()
        if boundary(cfg.train.checkpoint_every):
          ckpt.save(rt.step, rt)
        writer.flush()
    if pending is not None:
      record(*pending)
    tokens_per_second = progress.mean_tokens_per_second(rt.step)
    if ckpt.latest_step() != rt.step:
      ckpt.save(rt.step, rt)
    if not eval_scalars or cfg.train.eval_every == 0 or rt.step % cfg.train.eval_every:
      eval_scalars = run_eval()
  finally:
    writer.close()
    ckpt.close()

  wall = time.perf_counter() - t0
  summary = {
      "final_eval_loss": eval_scalars["eval_loss"],
      "final_eval_bits_per_byte": eval_scalars["eval_bits_per_byte"],
      "steps": rt.step,
      "tokens": rt.step * rt.tokens_per_step,
      "wall_seconds": wall,
      "tokens_per_second": tokens_per_second,  # Training loop after step 1, evals included.
      "resumed_from_step": start_step,
      "devices": [str(d) for d in jax.devices()],
      **rt.summary(),
      "config": config.to_dict(),
  }
  path = metrics.write_summary(workdir, summary)
  logging.info("final eval loss %.4f nats/byte (%.3f bits/byte) after %d tokens",
               summary["final_eval_loss"], summary["final_eval_bits_per_byte"],
               summary["tokens"])
  if "goodput" in summary:
    logging.info("goodput %.1f%%, uptime %.1f%% over %.0f virtual seconds; %d outer steps",
                 100 * summary["goodput"], 100 * summary["uptime"],
                 summary["virtual_seconds"], summary["outer_steps"])
  logging.info("results in %s (summary: %s)", workdir, path)
  return summary
