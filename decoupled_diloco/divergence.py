"""Divergence: a training loss that is not finite, or that spikes above its running mean.

NaN and Inf are the loud failures; a run whose learning rate is far too high
usually diverges while staying finite (its loss climbs past uniform guessing
and keeps going). `SpikeDetector` catches that: it keeps an exponential moving
average of the losses that passed, and calls a loss a spike when it exceeds
`factor` times that average. Spikes never enter the average, so a sustained
divergence keeps failing instead of becoming the new normal.

The training loop uses one detector on the run's loss and stops; a runtime
may keep one per learner and recover that learner instead.
"""

import math
from typing import NamedTuple


class DivergenceError(FloatingPointError):
  """The training loss is not finite or spiked; raised by the training loop."""


class SpikeState(NamedTuple):
  mean: float | None  # EMA of the losses that passed; None before the first one.


class SpikeDetector:
  """Flags losses that are not finite or above `factor` times their running mean.

  Args:
    factor: a loss above `factor * mean` is a spike (0: only NaN/Inf fail).
    decay: EMA decay of the running mean (0.9: about the last 10 losses).
    floor: the mean is taken to be at least this (nats), so a run that reaches
      a near-zero loss is not stopped by ordinary noise around it.
  """

  def __init__(self, factor: float, *, decay: float = 0.9, floor: float = 0.1):
    if not (factor == 0 or (math.isfinite(factor) and factor > 1)):
      raise ValueError(f"spike factor {factor} must be 0 (off) or a finite number > 1.")
    self.factor, self.decay, self.floor = factor, decay, floor
    self.mean: float | None = None

  def reason(self, loss: float) -> str | None:
    """Why `loss` is divergent, or None if it passes; does not change the mean."""
    if not math.isfinite(loss):
      return f"the loss is {loss}"
    if self.factor and self.mean is not None:
      limit = self.factor * max(self.mean, self.floor)
      if loss > limit:
        return (f"the loss {loss:.4g} is above {self.factor:g} x its running mean"
                f" {self.mean:.4g}")
    return None

  def check(self, loss: float) -> str | None:
    """Like `reason`; a loss that passes also updates the running mean."""
    why = self.reason(loss)
    if why is None:
      loss = float(loss)
      self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
    return why

  def reset(self) -> None:
    """Forgets the running mean (e.g. after a learner recovers from the global model)."""
    self.mean = None

  def state(self) -> SpikeState:
    return SpikeState(self.mean)

  def load_state(self, s: SpikeState) -> None:
    self.mean = None if s.mean is None else float(s.mean)
