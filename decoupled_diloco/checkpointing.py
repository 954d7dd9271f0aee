"""Orbax checkpoints of a runtime's whole state, for exact resumption.

A runtime exposes `state()` (a pytree of arrays: parameters, optimizer states,
data-iterator positions, counters) and `load_state(tree)`. The current state
doubles as the restore target, so every array comes back with its shape, dtype
and island sharding. A runtime whose state also varies in length (the
decoupled one: messages in flight) adds `extra_state() -> (payloads, meta)` and
`load_extra_state(payloads, meta)`: a list of message payloads (pytrees of
arrays; they come back without a target, and their users `device_put` them)
and a JSON-able dict that refers to them by index.

A checkpoint holds three orbax items:
  default   `state()`; orbax's name for a single item, so that a plain
            `StandardRestore()` (e.g. in a notebook) reads it as the checkpoint.
  meta      JSON: {"runtime": name, "num_messages": n, "extra": meta or None}.
  messages  the payload list, only when it is not empty (orbax saves no empty
            tree).
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = ocp.checkpoint_manager.DEFAULT_ITEM_NAME


class Checkpointer:
  """Saves and restores the runtime named `runtime` in `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int, runtime: str):
    self._runtime = runtime
    self._directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self._directory, options=options,
                                          item_names=(_STATE, "meta", "messages"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, rt) -> None:
    payloads, extra = rt.extra_state() if hasattr(rt, "extra_state") else ([], None)
    meta = {"runtime": self._runtime, "num_messages": len(payloads), "extra": extra}
    items = {_STATE: ocp.args.StandardSave(rt.state()), "meta": ocp.args.JsonSave(meta)}
    if payloads:
      items["messages"] = ocp.args.StandardSave(payloads)
    self._manager.save(step, args=ocp.args.Composite(**items))
    self._manager.wait_until_finished()

  def restore(self, step: int, rt) -> None:
    """Loads checkpoint `step` into `rt`, with the structure and shardings of its state.

    Raises:
      ValueError: the checkpoint is of another runtime than `rt`.
    """
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = meta["meta"]
    if meta["runtime"] != self._runtime:
      raise ValueError(f"{self._directory} holds checkpoints of runtime={meta['runtime']!r},"
                       f" not runtime={self._runtime!r}; use a fresh --workdir.")
    items = {_STATE: ocp.args.StandardRestore(jax.tree.map(_abstract, rt.state()))}
    if meta["num_messages"]:
      items["messages"] = ocp.args.StandardRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    rt.load_state(restored[_STATE])
    if hasattr(rt, "load_extra_state"):
      payloads = restored["messages"] if meta["num_messages"] else []
      rt.load_extra_state(payloads, meta["extra"])

  def close(self) -> None:
    self._manager.close()


def _abstract(x):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)
