"""Metrics to JSON lines and TensorBoard, and a human progress line.

Files in the workdir: `metrics.jsonl` (one object per record, appended across
resumes), `tb/` (TensorBoard event files) and `summary.json` at the end.
Records are flushed to disk before each checkpoint is committed, and a resumed
run first trims the records past its checkpoint (`trim`), so `metrics.jsonl`
holds exactly what one uninterrupted run writes. TensorBoard files are not
trimmed, so there the steps a resumed run repeated appear twice.
"""

import json
import os
import time

from absl import logging

from decoupled_diloco import workdir as workdir_lib

# Tracing, lowering and XLA compilation, as jax reports them (seconds, summed over the process).
_COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})
_compile_seconds = 0.0
_listening = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  global _compile_seconds
  if event in _COMPILE_EVENTS:
    _compile_seconds += duration


def compile_seconds() -> float:
  """Seconds this process has spent tracing and compiling jitted functions since it first asked.

  Callers take differences. jax is imported here, not with the module, so that what only
  reads a workdir (the launchers) starts without it.
  """
  global _listening
  if not _listening:
    import jax  # pylint: disable=g-import-not-at-top
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True
  return _compile_seconds


class MetricWriter:
  """Writes scalar records keyed by step to JSONL and TensorBoard."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def flush(self) -> None:
    """Puts every record so far on disk (called before a checkpoint is committed)."""
    self._jsonl.flush()
    os.fsync(self._jsonl.fileno())
    self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    self._tb.close()


class NullWriter:
  """What processes other than process 0 of a multi-process learner write: nothing."""

  def write(self, step: int, scalars: dict[str, float]) -> None:
    del step, scalars

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class Progress:
  """Tracks throughput and prints `step, loss, units/s, ETA` lines (units: tokens, images)."""

  def __init__(self, start_step: int, total_steps: int, units_per_step: int,
               unit: str = "tokens"):
    self.start_step, self.total_steps = start_step, total_steps
    self.units_per_step, self.unit = units_per_step, unit
    self._t0 = time.perf_counter()
    self._last_step, self._last_t = start_step, self._t0
    self._compile0 = compile_seconds()

  def restart_clock(self, step: int) -> None:
    """Called after the first step, so compilation does not count as training time."""
    self._t0 = self._last_t = time.perf_counter()
    self.start_step = self._last_step = step
    self._compile0 = compile_seconds()

  def units_per_second(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self._last_step) * self.units_per_step / max(now - self._last_t, 1e-9)
    self._last_step, self._last_t = step, now
    return rate

  def log(self, step: int, loss: float, rate: float) -> None:
    done = step - self.start_step
    elapsed = time.perf_counter() - self._t0
    eta = elapsed / max(done, 1) * (self.total_steps - step)
    logging.info("step %d/%d  loss %.4f  %.0f %s/s  ETA %s", step, self.total_steps,
                 loss, rate, self.unit, _clock(eta))

  def mean_units_per_second(self, step: int) -> float:
    """Throughput since `restart_clock` (the first step's compilation excluded)."""
    elapsed = time.perf_counter() - self._t0
    return (step - self.start_step) * self.units_per_step / max(elapsed, 1e-9)

  def compile_seconds(self) -> float:
    """Seconds spent compiling since `restart_clock`: functions first used later (syncs, evals)."""
    return compile_seconds() - self._compile0

  def steady_units_per_second(self, step: int) -> float:
    """Throughput since `restart_clock`, with every later compilation excluded too."""
    elapsed = time.perf_counter() - self._t0 - self.compile_seconds()
    return (step - self.start_step) * self.units_per_step / max(elapsed, 1e-9)


def _clock(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def trim(workdir: str, last_step: int) -> int:
  """Drops the records of `metrics.jsonl` past `last_step`; returns how many went.

  A resumed run calls this with its checkpoint's step: the records after it
  are written again as the run repeats those steps. A line cut short by a
  crash goes too.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if line.endswith("\n") and record.get("step", 0) <= last_step:
      kept.append(line)
  if len(kept) < len(lines):
    workdir_lib.write_atomically(path, "".join(kept))
  return len(lines) - len(kept)


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file (metrics, events); [] if it does not exist.

  A line that does not parse (cut by a kill mid-write) is skipped.
  """
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          out.append(json.loads(line))
        except ValueError:
          continue
  return out


def write_summary(workdir: str, summary: dict) -> str:
  path = os.path.join(workdir, "summary.json")
  workdir_lib.write_atomically(path, json.dumps(summary, indent=2, sort_keys=True))
  return path


def read_summary(workdir: str) -> dict | None:
  """The summary a finished run wrote, or None."""
  path = os.path.join(workdir, "summary.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
