"""What `train.py` needs of a runtime: the contract every runtime is written against.

A runtime advances training by one step per `train_step()` (data-parallel:
one optimizer step; DiLoCo family: one inner step of every learner) and
exposes a global model to evaluate. Its whole state is `state()`, a pytree of
arrays restored into the same structure, plus `extra_state()`, what varies
in length between checkpoints (messages in flight): a list of payloads and a
JSON-able dict that refers to them by index. Runtimes with nothing of the
kind return `([], None)`.
"""

import typing

from decoupled_diloco.islands import Island


class Runtime(typing.Protocol):
  """The interface of `DataParallel`, `LockStep` and `Decoupled`."""

  step: int  # Steps taken (what `train.steps` counts).
  eval_island: Island  # Where the global model is evaluated.
  units_per_step: int  # Units (the task's: tokens, images) one `train_step` trains on, over every learner.

  def train_step(self) -> dict:
    """One step; returns {"loss": scalar or per-learner losses, ...other scalars}."""

  def eval_params(self):
    """The global model's parameters."""

  def state(self) -> dict:
    """Every array needed to resume exactly."""

  def load_state(self, tree: dict) -> None:
    """Takes up a tree `state()` returned (restored with its structure and shardings)."""

  def extra_state(self) -> tuple[list, dict | None]:
    """(payloads, JSON) of variable-length state, e.g. messages in flight."""

  def load_extra_state(self, payloads: list, meta: dict | None) -> None:
    """Takes up what `extra_state()` returned."""

  def eval_scalars(self) -> dict:
    """Scalars for metrics.jsonl at each eval: byte counters, routing diagnostics
    (router_probe.py). Called once per eval: the routing means since the last one reset."""

  def summary(self) -> dict:
    """Everything summary.json reports of this runtime (bytes, goodput, ...)."""
