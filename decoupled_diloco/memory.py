"""The memory a training step needs on each device, read from the compiled step, checked up front.

As MaxText does: the inner step of one island (a learner's, or the one
data-parallel replica's) is lowered for the task's batch and compiled from
shapes alone (nothing is allocated), and XLA's `memory_analysis()` gives its
arguments, outputs and temporaries per device. Islands sharing a device
(fewer devices than learners) multiply it. Whatever the model, the check is
the compiler's own count, so a configuration refused here cannot fit. A
process checks each configuration once (a run and its resume, or the runs of
a test, ask again with the same task, model, batch, islands and optimizer).
"""

import math
import os

import jax

from decoupled_diloco import config as config_lib
from decoupled_diloco import optim, steps
from decoupled_diloco.tasks.base import Task


_MEASURED: dict = {}  # What shapes the step (config sections, task class, devices) -> bytes.


def bytes_per_device(cfg: config_lib.Config, task: Task) -> dict[str, int] | None:
  """{"arguments", "outputs", "temporaries"} bytes of one inner step per device (None: unknown)."""
  learners = 1 if cfg.runtime == "data_parallel" else cfg.diloco.num_learners
  devices = jax.local_devices()
  key = (type(task), cfg.task, cfg.model, cfg.data, cfg.islands, cfg.inner, learners,
         tuple(d.id for d in devices))
  if key not in _MEASURED:
    _MEASURED[key] = _measure(cfg, task, learners, devices)
  return _MEASURED[key]


def _measure(cfg: config_lib.Config, task: Task, learners: int, devices) -> dict | None:
  island = steps.make_islands(cfg, task, learners, devices=devices)[0]
  tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
  params = jax.eval_shape(task.init, jax.random.key(0))
  opt_state = jax.eval_shape(tx.init, params)
  step = steps.make_inner_step(task, tx, island, params, opt_state)
  batch = task.batch_spec(cfg.data.batch_size // learners)
  stats = step.lower(params, opt_state, batch).compile().memory_analysis()
  if stats is None:
    return None
  replicas = math.ceil(learners / len(devices))  # Fewer devices than learners: they share.
  # Donated parameters and optimizer state alias their outputs: count them once.
  return {"arguments": replicas * stats.argument_size_in_bytes,
          "outputs": replicas * max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0),
          "temporaries": replicas * stats.temp_size_in_bytes}


def device_capacity() -> tuple[int, str]:
  """(bytes one device can use, its description). CPU devices share the host's RAM."""
  devices = jax.local_devices()
  stats = devices[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]), f"{devices[0].device_kind} ({len(devices)} devices)"
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram // len(devices), f"host RAM shared by {len(devices)} CPU devices"


def check_fits(cfg: config_lib.Config, task: Task) -> None:
  """Refuses a configuration whose compiled step needs more than a device has.

  Raises:
    ValueError: naming data.batch_size and the task, with the compiler's count.
  """
  need = bytes_per_device(cfg, task)
  if need is None:  # The backend does not say; the first step will.
    return
  capacity, where = device_capacity()
  total = sum(need.values())
  if total > capacity:
    gb = lambda n: f"{n / 2**30:.1f} GB"
    raise ValueError(
        f"task {task.name!r} with data.batch_size={cfg.data.batch_size} needs"
        f" {gb(total)} per device for one inner step ({gb(need['arguments'])} parameters,"
        f" optimizer state and batch, {gb(need['temporaries'])} activations and other"
        f" temporaries), more than the {gb(capacity)} of {where}; lower the batch or the"
        " model size.")
