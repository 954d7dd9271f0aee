"""Partition a parameter tree into P fragments and stagger their syncs.

Streaming DiLoCo (Douillard et al. 2025, https://arxiv.org/abs/2501.18512)
syncs one fragment at a time so the peak bandwidth per step falls by ~P.
Fragments are whole tensors, named by their `/`-joined paths; every tensor is
in exactly one fragment. Strategies:
  - `balanced`: largest-first bin packing, each tensor to the lightest fragment
    (minimises the largest fragment, hence the peak bandwidth);
  - `layer`: contiguous runs of top-level modules (embed, block_i, head, ...);
  - `strided`: tensor i (in path order) goes to fragment i mod P.

With `split`, the named tensors (stacked experts, [experts, ...]) enter the
partition as one piece per expert: `path#e` is slice e along the first axis,
so a fragment can hold some of a tensor's experts. `take`, `put` and
`assemble` read, write and rejoin pieces; a whole tensor's key is its path.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

STRATEGIES = ("balanced", "layer", "strided")


def flatten(tree) -> dict:
  """Nested params -> {"block_0/attn/query/kernel": array} (sorted keys)."""
  flat = traverse_util.flatten_dict(tree, sep="/")
  return {k: flat[k] for k in sorted(flat)}


def unflatten(flat: dict):
  return traverse_util.unflatten_dict(flat, sep="/")


PIECE = "#"  # `path#e`: slice e of the tensor at `path` along its first axis.


def parse(key: str) -> tuple[str, int | None]:
  """(path, piece index or None) of a fragment's key."""
  path, sep, e = key.partition(PIECE)
  return path, int(e) if sep else None


def take(flat: dict, key: str):
  """The tensor (or the piece) `key` names in `flat`."""
  path, e = parse(key)
  return flat[path] if e is None else flat[path][e]


def put(flat: dict, keys, values) -> dict:
  """`flat` with the tensors or pieces `keys` replaced by `values` (a new dict).

  A tensor whose every piece is given is stacked from them; one with some
  pieces given has those slices set.
  """
  whole, pieces = _group(zip(keys, values))
  flat = {**flat, **whole}
  for path, given in pieces.items():
    if len(given) == len(flat[path]):
      flat[path] = jnp.stack([given[e] for e in range(len(given))])
    else:
      for e, value in given.items():
        flat[path] = jnp.asarray(flat[path]).at[e].set(value)
  return flat


def _group(items) -> tuple[dict, dict]:
  """({path: tensor} of whole keys, {path: {e: piece}} of pieces) from (key, value) pairs."""
  whole, pieces = {}, collections.defaultdict(dict)
  for key, value in items:
    path, e = parse(key)
    if e is None:
      whole[path] = value
    else:
      pieces[path][e] = value
  return whole, pieces


def assemble(pieces: dict) -> dict:
  """Whole tensors from a dict of tensors and pieces (every piece of a split tensor present)."""
  whole, split = _group(pieces.items())
  for path, given in split.items():
    if sorted(given) != list(range(len(given))):
      raise ValueError(f"{path}: pieces {sorted(given)} do not cover its experts.")
    whole[path] = jnp.stack([given[e] for e in range(len(given))])
  return {k: whole[k] for k in sorted(whole)}


def expand(flat_params: dict, split=frozenset()) -> dict:
  """Shapes (ShapeDtypeStructs) of the fragments' keys: tensors, and pieces of those in `split`."""
  out = {}
  for path in sorted(flat_params):
    x = flat_params[path]
    shape, dtype = np.shape(x), getattr(x, "dtype", np.float32)
    if path in split:
      if len(shape) < 2:
        raise ValueError(f"{path} of shape {shape} has no expert axis to split along.")
      for e in range(shape[0]):
        out[f"{path}{PIECE}{e}"] = jax.ShapeDtypeStruct(shape[1:], dtype)
    else:
      out[path] = jax.ShapeDtypeStruct(shape, dtype)
  return out


def partition(flat_params: dict, num_fragments: int, strategy: str,
              split=frozenset()) -> tuple[tuple[str, ...], ...]:
  """Returns P tuples of keys (each sorted), covering every tensor (or piece) once.

  `split`: paths of stacked expert tensors to partition one expert at a time.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"diloco.fragmentation={strategy!r} is unknown; choose from {STRATEGIES}.")
  if split:
    flat_params = expand(flat_params, split)
  paths = sorted(flat_params)
  if not 1 <= num_fragments <= len(paths):
    raise ValueError(f"diloco.num_fragments={num_fragments} must be in [1, {len(paths)}]"
                     " (the model has that many tensors).")
  sizes = {k: int(np.prod(np.shape(flat_params[k]))) for k in paths}
  bins = [[] for _ in range(num_fragments)]
  if strategy == "balanced":
    load = np.zeros(num_fragments)
    for k in sorted(paths, key=lambda k: (-sizes[k], k)):
      p = int(np.argmin(load))
      bins[p].append(k)
      load[p] += sizes[k]
  elif strategy == "strided":
    for i, k in enumerate(paths):
      bins[i % num_fragments].append(k)
  else:  # layer: cut the module sequence into P contiguous, near-equal runs.
    modules = _module_order(paths)
    if len(modules) < num_fragments:
      raise ValueError(f"diloco.num_fragments={num_fragments} exceeds the model's"
                       f" {len(modules)} top-level modules for fragmentation=layer.")
    weight = [sum(sizes[k] for k in paths if k.split("/")[0] == m) for m in modules]
    cuts = np.cumsum(weight) / sum(weight)
    p = 0
    for i, m in enumerate(modules):
      bins[p].extend(k for k in paths if k.split("/")[0] == m)
      remaining_modules, remaining_bins = len(modules) - i - 1, num_fragments - p - 1
      if remaining_bins and (cuts[i] >= (p + 1) / num_fragments
                             or remaining_modules == remaining_bins):
        p += 1
  return tuple(tuple(sorted(b)) for b in bins)


def _module_order(paths) -> list[str]:
  """Top-level modules in network order: embeddings, blocks by index, the rest."""
  names = sorted({k.split("/")[0] for k in paths})
  def key(n):
    if "embed" in n:
      return (0, 0, n)
    if n.startswith("block_"):
      return (1, int(n.split("_")[1]), n)
    return (2, 0, n)
  return sorted(names, key=key)


def sync_offsets(num_fragments: int, sync_every: int) -> tuple[int, ...]:
  """offset_p = p*H/P (rounded down), staggered evenly over H."""
  return tuple(p * sync_every // num_fragments for p in range(num_fragments))


def due(step: int, offsets, sync_every: int) -> list[int]:
  """Fragments a learner sends after its inner step number `step` (>= 1)."""
  return [p for p, o in enumerate(offsets) if step > 0 and (step - o) % sync_every == 0]


def fragment_bytes(flat_params: dict, fragments, itemsize: int = 4) -> list[int]:
  def size(key):
    path, e = parse(key)
    shape = np.shape(flat_params[path])
    return int(np.prod(shape if e is None else shape[1:]))
  return [sum(size(k) * itemsize for k in f) for f in fragments]
