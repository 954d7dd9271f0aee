"""One learner over several processes (`jax.distributed`): what they share.

Process 0 of a learner alone touches the mailbox; what it reads is broadcast
to the others with one collective each way, so every process of the learner
takes the same decisions.
"""

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from decoupled_diloco.algorithm.messages import Notice
from decoupled_diloco.runtime.dist import wire
from decoupled_diloco.runtime.dist.keys import Keyring


def pack(parts: list[bytes], meta: dict) -> bytes:
  head = json.dumps({"meta": meta, "sizes": [len(p) for p in parts]}).encode()
  return len(head).to_bytes(8, "big") + head + b"".join(parts)


def unpack(blob: bytes) -> tuple[list[bytes], dict]:
  n = int.from_bytes(blob[:8], "big")
  head = json.loads(blob[8:8 + n])
  parts, at = [], 8 + n
  for size in head["sizes"]:
    parts.append(blob[at:at + size])
    at += size
  return parts, head["meta"]


def share(blob: bytes | None) -> bytes:
  """Process 0's `blob` on every process of this learner (one collective each way)."""
  if jax.process_count() == 1:
    return blob
  primary = jax.process_index() == 0
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(blob) if primary else 0)))
  if n == 0:
    return b""
  buf = np.frombuffer(blob, np.uint8) if primary else np.zeros(n, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


# Keys of messages between the processes of one learner (no network, nothing to guard).
LOCAL = Keyring("local", {"local": b"learner"})


def share_landed(landed: list | None) -> list:
  """Process 0's landed (publication or notice, landed at) on every process."""
  if jax.process_count() == 1:
    return landed
  blob = None
  if landed is not None:
    write = lambda m: (wire.notice_bytes if isinstance(m, Notice) else wire.publication_bytes)(
        m, LOCAL, [LOCAL.me])
    parts = [write(m) for m, _ in landed]
    blob = pack(parts, {"landed": [t for _, t in landed],
                        "notice": [isinstance(m, Notice) for m, _ in landed]})
  parts, meta = unpack(share(blob))
  return [((wire.parse_notice if notice else wire.parse_publication)(b, LOCAL)[0], t)
          for b, t, notice in zip(parts, meta["landed"], meta["notice"])]


def host_copies(tree):
  """Host copies of a learner's (replicated) arrays: every process holds them whole."""
  def copy(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise NotImplementedError("a learner over several processes checkpoints replicated"
                                  " state only; keep islands.fsdp, tensor and expert at 1.")
      return np.asarray(x.addressable_data(0))
    return x
  return jax.tree.map(copy, tree)


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """`jax.distributed` for a learner spanning several hosts (no arguments on a TPU slice)."""
  kwargs = {k: v for k, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes),
                              ("process_id", process_id)) if v is not None}
  jax.distributed.initialize(**kwargs)
