"""Orbax checkpoints of a runtime's whole state, for exact resumption.

A runtime (`runtime/interface.py`) exposes `state()` (a pytree of arrays:
parameters, optimizer states, data-iterator positions, counters) and
`load_state(tree)`. The current state doubles as the restore target, so every
array comes back with its shape, dtype and island sharding. What varies in
length (the decoupled runtime's messages in flight) is `extra_state() ->
(payloads, meta)` and `load_extra_state(payloads, meta)`: a list of message
payloads (pytrees of arrays; they come back without a target, and their users
`device_put` them) and a JSON-able dict that refers to them by index.

A checkpoint holds three orbax items:
  default   `state()`; orbax's name for a single item, so that a plain
            `StandardRestore()` (e.g. in a notebook) reads it as the checkpoint.
  meta      JSON: {"runtime": name, "num_messages": n, "extra": meta or None,
            "fingerprint": the config fields that shape the state,
            "checksums": CRC32 of every array, "loop": the training loop's own
            state (its loss-spike detector)}.
  messages  the payload list, only when it is not empty (orbax saves no empty
            tree).

Saving is two steps, `snapshot` (a host copy of the state now) and `write`,
so that the training loop can hold a snapshot until the next step's loss has
vouched for it (see `train.py`). Restoring checks, in order: the runtime and
the config fingerprint (a mismatch is the user's to fix: it stops the run
before any array is read), then the arrays against their checksums. A
checkpoint that cannot be read or fails its checksums is a bad one:
`restore_latest` falls back to the one before it, with one warning, and moves
the bad one to `checkpoints_failed/` so that the run can write that step again.
"""

import copy
import dataclasses
import json
import os
import shutil
import zlib
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from decoupled_diloco import config as config_lib
from decoupled_diloco.data import dataset

_STATE = ocp.checkpoint_manager.DEFAULT_ITEM_NAME


class ConfigMismatchError(ValueError):
  """The checkpoints in a workdir were written by a config of another shape."""


class BadCheckpointError(RuntimeError):
  """A checkpoint that cannot be read back as it was written."""


class Snapshot(NamedTuple):
  step: int
  state: Any  # Host copy of `state()`.
  payloads: list  # Host copies of `extra_state()`'s payloads.
  meta: dict  # The `meta` item.


def fingerprint(cfg: config_lib.Config, data_id: str | None = None) -> dict:
  """The config fields that shape a checkpoint's arrays, by dotted name, and `data_id`
  (a task's: what tokenized its data, whose token ids the parameters are trained on).

  Other fields (learning rates, the schedule, the simulator) may change
  between a checkpoint and its resumption; these may not.
  """
  fields = {f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items() if k != "dtype"}
  fields["task.name"] = cfg.task.name
  if data_id is not None:
    fields["data_id"] = data_id
  fields["inner.clip_norm>0"] = cfg.inner.clip_norm > 0  # Adds a state to the chain.
  if cfg.runtime == "data_parallel":
    return fields
  d, codec = cfg.diloco, cfg.codec
  fields.update({
      "diloco.num_learners": d.num_learners, "diloco.num_fragments": d.num_fragments,
      "diloco.fragmentation": d.fragmentation, "outer.name": cfg.outer.name,
      "outer.momentum>0": cfg.outer.momentum > 0,  # 0 drops the momentum state.
      "codec.up": codec.up, "codec.down": codec.down,
      "codec.error_feedback": codec.error_feedback, "codec.block_size": codec.block_size,
      "codec.topk_fraction": codec.topk_fraction, "codec.topk_values": codec.topk_values})
  return fields


def run_record(config, task) -> str:
  """What every process of a run must agree on (the mailbox's run/config): its config
  (an ml_collections ConfigDict) and how its data was made (`task.data_id`)."""
  return json.dumps({"config": config.to_dict(), "data_id": getattr(task, "data_id", None)},
                    sort_keys=True)


# Every field a fingerprint can have, at its default (a non-data-parallel runtime has them
# all); checkpoints written before `data_id` were all of byte tokens.
_DEFAULT_FINGERPRINT = fingerprint(config_lib.Config(runtime="decoupled"),
                                   data_id=dataset.BYTES_SHA256)


class Checkpointer:
  """Saves and restores the runtime named `runtime` in `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int, runtime: str, fingerprint: dict | None = None):
    self._runtime, self._fingerprint = runtime, fingerprint
    self._workdir = os.path.abspath(workdir)
    self._directory = os.path.join(self._workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self._directory, options=options,
                                          item_names=(_STATE, "meta", "messages"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def snapshot(self, step: int, rt, loop: dict | None = None) -> Snapshot:
    """A host copy of `rt`'s state now, to `write` later; `loop` goes into the meta."""
    payloads, extra = rt.extra_state()
    state, payloads = _host_copy(rt.state()), _host_copy(payloads)
    meta = {"runtime": self._runtime, "num_messages": len(payloads),
            "extra": copy.deepcopy(extra), "fingerprint": self._fingerprint,
            "checksums": {_STATE: _checksums(state), "messages": _checksums(payloads)},
            "loop": copy.deepcopy(loop)}
    return Snapshot(step, state, payloads, meta)

  def write(self, snapshot: Snapshot) -> None:
    """Commits `snapshot` as checkpoint `snapshot.step`."""
    items = {_STATE: ocp.args.StandardSave(snapshot.state),
             "meta": ocp.args.JsonSave(snapshot.meta)}
    if snapshot.payloads:
      items["messages"] = ocp.args.StandardSave(snapshot.payloads)
    self._manager.save(snapshot.step, args=ocp.args.Composite(**items))
    self._manager.wait_until_finished()

  def save(self, step: int, rt, loop: dict | None = None) -> None:
    self.write(self.snapshot(step, rt, loop))

  def check_config(self) -> None:
    """Compares the latest checkpoint's runtime and fingerprint with this run's.

    Only the small JSON item is read. A latest checkpoint whose meta cannot be
    read is left to `restore_latest`, which falls back past it.

    Raises:
      ConfigMismatchError: naming the fields that changed.
    """
    if (step := self.latest_step()) is not None:
      try:
        meta = self._read_meta(step)
      except BadCheckpointError:
        return
      self._check_meta(meta)

  def restore(self, step: int, rt) -> dict:
    """Loads checkpoint `step` into `rt`, with the structure and shardings of its state.

    Returns:
      The checkpoint's meta (its `loop` entry is the training loop's).
    Raises:
      ConfigMismatchError: the checkpoint is of another runtime or config shape.
      BadCheckpointError: it cannot be read, or its arrays fail their checksums;
        `rt` is untouched.
    """
    meta = self._read_meta(step)
    self._check_meta(meta)
    items = {_STATE: ocp.args.StandardRestore(jax.tree.map(_abstract, rt.state()))}
    if meta["num_messages"]:
      items["messages"] = ocp.args.StandardRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax and tensorstore raise many kinds for damaged files.
      raise BadCheckpointError(f"its arrays cannot be read ({_first_line(e)})") from e
    payloads = restored["messages"] if meta["num_messages"] else []
    if (sums := meta.get("checksums")) is not None:  # Older checkpoints have none.
      for item, tree in ((_STATE, restored[_STATE]), ("messages", payloads)):
        if (bad := _mismatches(sums[item], _checksums(tree))):
          raise BadCheckpointError(f"{len(bad)} array(s) fail their checksum, e.g."
                                   f" {item}{bad[0]}")
    rt.load_state(restored[_STATE])
    rt.load_extra_state(payloads, meta["extra"])
    return meta

  def restore_latest(self, rt) -> dict | None:
    """Restores the newest checkpoint that is intact; None if there is none.

    Bad checkpoints newer than it are moved to `checkpoints_failed/`, and one
    warning says what was wrong with each.

    Raises:
      ConfigMismatchError: as `restore`.
      BadCheckpointError: checkpoints exist, but none is intact.
    """
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta = self.restore(step, rt)
      except BadCheckpointError as e:
        failures.append(f"checkpoint {step}: {e}")
        self._move_aside(step)
        continue
      if failures:
        logging.warning("resuming from checkpoint %d in %s, as the newer ones are bad (%s);"
                        " they are moved to %s", step, self._directory, "; ".join(failures),
                        self._failed_directory)
      return meta
    if failures:
      raise BadCheckpointError(f"no checkpoint in {self._directory} is intact ("
                               f"{'; '.join(failures)}); they are moved to"
                               f" {self._failed_directory}. Re-run to start afresh.")
    return None

  def close(self) -> None:
    self._manager.close()

  @property
  def _failed_directory(self) -> str:
    return os.path.join(self._workdir, "checkpoints_failed")

  def _read_meta(self, step: int) -> dict:
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # A truncated or garbled JSON file, a missing item.
      raise BadCheckpointError(f"its meta cannot be read ({_first_line(e)})") from e
    meta = meta["meta"]
    if not isinstance(meta, dict) or not {"runtime", "num_messages"} <= set(meta):
      raise BadCheckpointError("its meta lacks the runtime or the message count")
    return meta

  def _check_meta(self, meta: dict) -> None:
    if meta["runtime"] != self._runtime:
      raise ConfigMismatchError(
          f"{self._directory} holds checkpoints of runtime={meta['runtime']!r},"
          f" not runtime={self._runtime!r}; use a fresh --workdir.")
    old, new = meta.get("fingerprint"), self._fingerprint
    if old is None or new is None:  # Written before fingerprints, or not asked to check.
      return
    # A field added since the checkpoint was written was, in effect, at its default then.
    old = {**{k: v for k, v in _DEFAULT_FINGERPRINT.items() if k in new}, **old}
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    if changed:
      raise ConfigMismatchError(
          f"{self._directory} holds checkpoints of another configuration ("
          f"{'; '.join(changed)}); resume with the values it was written with, or use a"
          " fresh --workdir.")

  def _move_aside(self, step: int) -> None:
    os.makedirs(self._failed_directory, exist_ok=True)
    target = os.path.join(self._failed_directory, str(step))
    n = 1
    while os.path.exists(target):
      target, n = os.path.join(self._failed_directory, f"{step}.{n}"), n + 1
    shutil.move(os.path.join(self._directory, str(step)), target)
    self._manager.reload()


def _host_copy(tree):
  """Copies every array to host memory: the runtime may go on and change or donate it."""
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _checksums(tree) -> dict:
  """CRC32 of each array's dtype, shape and bytes, by its path in `tree`.

  Paths are written `/a/0/b` whatever the containers (orbax gives back a
  tuple as a list, a NamedTuple as a dict), so saved and restored trees agree.
  """
  sums = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.asarray(x)
    header = f"{x.dtype.str}{x.shape}".encode()
    data = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    name = "".join(f"/{getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))}"
                   for k in path)
    sums[name] = zlib.crc32(data, zlib.crc32(header))
  return sums


def _mismatches(saved: dict, loaded: dict) -> list[str]:
  return [k for k in sorted(set(saved) | set(loaded)) if saved.get(k) != loaded.get(k)]


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _abstract(x):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)
