"""Orbax checkpoints of a runtime's whole state, for exact resumption.

A runtime exposes `state()` (a pytree of arrays: parameters, optimizer states,
data-iterator positions, counters) and `load_state(tree)`. The current state
doubles as the restore target, so every array comes back with its shape, dtype
and island sharding.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state))
    self._manager.wait_until_finished()

  def restore(self, step: int, like):
    """Restores checkpoint `step` with the structure and shardings of `like`."""
    target = jax.tree.map(_abstract, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def close(self) -> None:
    self._manager.close()


def _abstract(x):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)
