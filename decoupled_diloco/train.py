"""`train_and_evaluate(config, workdir)`: the training loop shared by all runtimes.

A runtime advances every learner by one inner step per `train_step()` and
exposes its global model for eval; this loop adds logging, evals, checkpoints,
resumption and the final summary. Re-running with the same workdir resumes.
"""

import contextlib
import math
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from decoupled_diloco import checkpointing, config as config_lib, divergence, memory, metrics
from decoupled_diloco import steps, tasks, workdir as workdir_lib
from decoupled_diloco.runtime import interface
from decoupled_diloco.runtime.data_parallel import DataParallel
from decoupled_diloco.runtime.decoupled import Decoupled
from decoupled_diloco.runtime.lockstep import LockStep
from decoupled_diloco.tasks import base as tasks_base


def make_runtime(cfg: config_lib.Config, task: tasks_base.Task,
                 workdir: str) -> interface.Runtime:
  if cfg.runtime == "data_parallel":
    return DataParallel(cfg, task)
  if cfg.runtime == "lockstep":
    return LockStep(cfg, task)
  return Decoupled(cfg, task, workdir)


class NonFiniteLossError(divergence.DivergenceError):
  pass


class LossSpikeError(divergence.DivergenceError):
  pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       runtime_factory=None, kind: str | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns the summary also written there.

  Before any data or device work: the config is validated, the workdir checked
  writable and locked (a second run there stops), a finished run is reported
  as such (its summary returned, nothing written), a config whose state shape
  differs from the checkpoints' is refused, and so is a model that cannot fit.

  `runtime_factory(cfg, task, workdir)` replaces the config's runtime (a
  learner process of the real runtime); `kind` names its checkpoints.
  """
  cfg = config_lib.parse(config)
  workdir_lib.check_writable(workdir)
  # A learner over several processes shares one workdir: process 0 owns it
  # (lock, metrics, summary); orbax writes checkpoints from every process.
  primary = jax.process_index() == 0
  with workdir_lib.Lock(workdir) if primary else contextlib.nullcontext():
    return _train(config, cfg, workdir, runtime_factory or make_runtime, kind or cfg.runtime)


def _train(config: ml_collections.ConfigDict, cfg: config_lib.Config, workdir: str,
           factory, kind: str) -> dict:
  task = tasks.build(cfg)
  ckpt = checkpointing.Checkpointer(
      workdir, cfg.train.keep_checkpoints, kind,
      fingerprint=checkpointing.fingerprint(cfg, getattr(task, "data_id", None)))
  try:
    ckpt.check_config()
    latest = ckpt.latest_step()
    done = metrics.read_summary(workdir)
    if latest == cfg.train.steps and done is not None and done.get("steps") == latest:
      logging.info("the run in %s is finished (%d steps); its summary.json is left as it"
                   " is. Raise train.steps to train on.", workdir, latest)
      return done
    if latest is not None and latest > cfg.train.steps:
      raise ValueError(f"train.steps={cfg.train.steps} is below the step of the latest"
                       f" checkpoint in {workdir} ({latest}); raise it or use another --workdir.")
    tasks_base.check(task, cfg.data.batch_size, jax.random.key(cfg.seed))
    memory.check_fits(cfg, task)
    return _train_with(config, cfg, workdir, ckpt, factory, task, kind)
  finally:
    ckpt.close()


def _train_with(config, cfg: config_lib.Config, workdir: str,
                ckpt: checkpointing.Checkpointer, factory, task: tasks_base.Task,
                kind: str) -> dict:
  """The loop.

  Checkpoints vouched for by a loss: the loss of step t is measured on the
  parameters before update t, so the parameters of a checkpoint at step t
  (after update t) are vouched for by step t+1's loss. At a checkpoint
  boundary the loop takes a host copy of the state (`ckpt.snapshot`; a save
  copies to host anyway) and writes it only once step t+1's loss has passed
  the divergence check; if that loss fails, the copy is dropped, and every
  checkpoint on disk holds parameters whose own loss passed. The last
  checkpoint (at the final step, which no training loss follows) is vouched
  for by the final eval loss instead: finite, and no spike over earlier evals. Metrics are flushed before each
  checkpoint is written, and a resumed run trims the records past its
  checkpoint, so `metrics.jsonl` is what one uninterrupted run writes.
  """
  logging.info("task %s: %s", task.name, getattr(task, "description", ""))
  rt = factory(cfg, task, workdir)
  eval_island = rt.eval_island
  eval_fn = steps.make_eval(task, eval_island)
  eval_batches = task.eval_batches(cfg.data.batch_size, cfg.train.eval_batches)
  unit = task.unit

  detector = divergence.SpikeDetector(cfg.train.spike_factor)  # Training losses.
  eval_detector = divergence.SpikeDetector(cfg.train.spike_factor)  # Eval losses.
  if (meta := ckpt.restore_latest(rt)) is not None:
    if (loop := meta.get("loop")) is not None:
      detector.load_state(divergence.SpikeState(**loop["spike"]))
      eval_detector.load_state(divergence.SpikeState(**loop.get("eval_spike", {"mean": None})))
    logging.info("resumed from %s at step %d", workdir, rt.step)
  if rt.step == 0:  # A fresh run: its loss at init must be a finite number.
    first = next(task.train_source(0, 1, cfg.data.batch_size, cfg.seed))
    if not math.isfinite(loss := steps.evaluate(eval_fn, eval_island, rt.eval_params(),
                                                [first])["loss"]):
      raise ValueError(f"task {task.name!r}: the loss at init on the first training batch is"
                       f" {loss}; check the model's initialisation and loss.")
  primary = jax.process_index() == 0
  if primary:
    metrics.trim(workdir, rt.step)
    if tokenizer := getattr(task, "tokenizer_file", None):  # What decodes its outputs.
      shutil.copyfile(tokenizer, os.path.join(workdir, "tokenizer.json"))
  writer = metrics.MetricWriter(workdir) if primary else metrics.NullWriter()
  progress = metrics.Progress(rt.step, cfg.train.steps, rt.units_per_step, unit)
  start_step, t0 = rt.step, time.perf_counter()
  held = None  # A checkpoint's snapshot, written once the next step's loss passes.

  def loop_state() -> dict:
    return {"spike": detector.state()._asdict(), "eval_spike": eval_detector.state()._asdict()}

  def stop(error, why: str, step: int):
    good = ckpt.latest_step()
    where = (f"The last good checkpoint (step {good}) in {workdir} holds parameters whose"
             " own loss passed" if good is not None else f"No checkpoint was written in {workdir}")
    return error(f"{why} at step {step}; stopping. {where}: lower inner.lr or raise"
                 " inner.warmup_steps, then resume.")

  def run_eval() -> dict:
    means = steps.evaluate(eval_fn, eval_island, rt.eval_params(), eval_batches)
    loss = means["loss"]
    if rt.step < cfg.train.steps:  # The final eval is checked, not averaged in, below.
      eval_detector.check(loss)  # A spike here is the training losses' to stop.
    named = task.eval_metrics(means) if math.isfinite(loss) else {}
    scalars = {f"eval_{k}": v for k, v in {**means, **named}.items()}
    writer.write(rt.step, {**scalars, **rt.eval_scalars()})
    logging.info("step %d  eval loss %.4f  (%s)", rt.step, loss,
                 ", ".join(f"{k} {v:.4g}" for k, v in named.items()))
    return scalars

  def record(step: int, out: dict) -> None:
    """Reads and checks step `step`'s metrics (called after the next step is dispatched)."""
    nonlocal held
    losses = np.atleast_1d(np.asarray(jax.device_get(out["loss"]), np.float64))
    finite = np.isfinite(losses)
    if not finite.any():
      raise stop(NonFiniteLossError, f"training loss is {losses.tolist()}", step)
    # Decoupled learners recover one by one (their runtime's detectors); the run
    # stops when the median spikes. Elsewhere any learner's spike stops it.
    typical = np.median if cfg.runtime == "decoupled" else np.max
    if (why := detector.check(float(typical(losses[finite])))) is not None:
      raise stop(LossSpikeError, f"loss spike: {why}", step)
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
      progress.log(step, scalars["loss"], progress.units_per_second(step))
    if held is not None and step > held.step:  # This loss vouches for the held state.
      writer.flush()
      ckpt.write(held)
      held = None

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
        record(*pending)
        pending = None
        if boundary(cfg.train.eval_every):
          eval_scalars = run_eval()
        if boundary(cfg.train.checkpoint_every) and rt.step < cfg.train.steps:
          held = ckpt.snapshot(rt.step, rt, loop_state())
        writer.flush()
    if pending is not None:
      record(*pending)
    units_per_second = progress.mean_units_per_second(rt.step)
    steady = progress.steady_units_per_second(rt.step), progress.compile_seconds()
    if not eval_scalars or cfg.train.eval_every == 0 or rt.step % cfg.train.eval_every:
      eval_scalars = run_eval()
    # The final parameters are vouched for by their eval loss, against earlier
    # evals' (an eval loss may sit well above the training loss on a small dataset).
    if (why := eval_detector.reason(eval_scalars["eval_loss"])) is not None:
      finite = math.isfinite(eval_scalars["eval_loss"])
      raise stop(LossSpikeError if finite else NonFiniteLossError, f"final eval: {why}", rt.step)
    writer.flush()
  finally:
    writer.close()

  # The last state is copied before `rt.summary()`, which ends the runtime's logs.
  final = ckpt.snapshot(rt.step, rt, loop_state()) if ckpt.latest_step() != rt.step else None
  wall = time.perf_counter() - t0
  summary = {
      **{f"final_{k}": v for k, v in eval_scalars.items()},
      "task": task.name,
      "steps": rt.step,
      unit: rt.step * rt.units_per_step,  # "tokens", "images": the task's unit.
      "wall_seconds": wall,
      f"{unit}_per_second": units_per_second,  # Training loop after step 1, evals included.
      # The same, less the compilations of functions first used after step 1.
      f"steady_{unit}_per_second": steady[0],
      "compile_seconds_after_step_1": steady[1],
      "resumed_from_step": start_step,
      "devices": [str(d) for d in jax.devices()],
      **rt.summary(),
      "config": config.to_dict(),
  }
  # The summary goes first: a run whose final checkpoint is on disk is finished.
  path = metrics.write_summary(workdir, summary) if primary else None
  if final is not None:
    ckpt.write(final)
  # A learner process evaluates its own copy; the run's final eval loss is the syncer's.
  own = "learner's own " if kind == "learner" else ""
  logging.info("%sfinal eval loss %.4f after %d %s (%s)", own, summary["final_eval_loss"],
               summary[unit], unit, ", ".join(f"{k} {v:.4g}" for k, v in eval_scalars.items()
                                               if k != "eval_loss"))
  if "goodput" in summary:
    logging.info("goodput %.1f%%, uptime %.1f%% over %.0f virtual seconds; %d outer steps",
                 100 * summary["goodput"], 100 * summary["uptime"],
                 summary["virtual_seconds"], summary["outer_steps"])
  logging.info("results in %s (summary: %s)", workdir, path)
  return summary
