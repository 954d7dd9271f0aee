"""Splits devices into per-learner island meshes and places arrays on them.

An island is one learner's mesh, with four axes (MaxText's names):

  data    the batch is split over it; parameters are replicated along it;
  fsdp    the batch is split over it too, and each parameter along its `embed`
          axis (FSDP, ZeRO-3): XLA gathers it for the step;
  tensor  each parameter along its `heads`, `kv_heads`, `mlp` or `vocab` axis
          (tensor parallelism); the batch is replicated along it;
  expert  the batch is split over it, and stacked experts along their `exp` axis.

Which logical axis goes to which mesh axis is `RULES`; the task names each
parameter's logical axes (`Task.axes`). A dimension that its mesh axis does
not divide, or a parameter without axes, stays whole along that mesh axis. So
only the sizes decide the layout, never the model's code, and every layout
computes the same step (XLA inserts the collectives).

With at least as many devices as islands, each island gets its own contiguous
block of `len(devices) // M` devices; with fewer, islands share devices
round-robin (useful on one CPU, where islands are then run one after the other).
"""

import dataclasses
import math
import types
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# Logical axis -> the mesh axis it is split over (the first match per mesh axis wins).
RULES = (("exp", "expert"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("mlp", "tensor"), ("vocab", "tensor"))
BATCH_AXES = ("data", "fsdp", "expert")  # A batch's first dimension is split over these.


@dataclasses.dataclass(frozen=True, eq=False)
class Island:
  index: int
  mesh: jax.sharding.Mesh
  # Parameter path ("block_0/mlp/wi") -> logical axis names, one per dimension.
  axes: Mapping[str, tuple] = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({}))

  @property
  def size(self) -> int:
    return self.mesh.devices.size

  @property
  def layout(self) -> tuple:
    """(axis, size) of each mesh axis: what a checkpoint of this island's arrays depends on."""
    return tuple(self.mesh.shape.items())

  @property
  def batch_ways(self) -> int:
    """How many ways a batch is split (a batch must be a multiple of it)."""
    return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

  @property
  def batch(self) -> NamedSharding:
    """Batches are split along their first axis over the data, fsdp and expert axes."""
    return NamedSharding(self.mesh, P(BATCH_AXES))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def spec(self, names, shape) -> P:
    """The partition of a tensor of `shape` whose dimensions have logical `names`."""
    spec, used = [None] * len(shape), set()
    for logical, mesh_axis in RULES:
      ways = self.mesh.shape[mesh_axis]
      if ways == 1 or mesh_axis in used or logical not in names:
        continue
      dim = list(names).index(logical)
      if spec[dim] is None and shape[dim] % ways == 0:
        spec[dim] = mesh_axis
        used.add(mesh_axis)
    return P(*spec)

  def sharding(self, path: str | None, shape) -> NamedSharding:
    """Where the parameter at `path` (or any tensor of its shape, e.g. its delta) lives.

    `path#e` (algorithm/fragments.py) is expert e of a stacked tensor: its axes less the first.
    """
    path, piece, _ = (path or "").partition("#")
    names = self.axes.get(path) if path else None
    names = names[1:] if piece and names else names
    if names is None or len(names) != len(shape):
      return self.replicated
    return NamedSharding(self.mesh, self.spec(names, shape))

  def shardings(self, tree):
    """Shardings for params, or any tree holding params-shaped subtrees (optimizer states).

    A leaf is matched to the parameter whose path ends its own dict keys (an
    optimizer state's `mu/block_0/mlp/wi` is `block_0/mlp/wi`'s moment); other
    leaves (step counts) are replicated.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, x: self.sharding(self._param_path(path), np.shape(x)), tree)

  def fragment_shardings(self, paths, tensors) -> list:
    """Shardings for a fragment's tensors (or their deltas, bases), given its parameter paths."""
    return [self.sharding(k, np.shape(t)) for k, t in zip(paths, tensors)]

  def put(self, tree, paths=None):
    """Copies a tree of arrays (params, optimizer state) onto this island.

    `paths`: for a list of one fragment's tensors, their parameter paths.
    Always a copy: inner steps donate their inputs, which must never delete
    the caller's arrays (e.g. one initialisation shared by every learner).
    `device_put(..., may_alias=False)` still aliases the shard already on the
    right device when replicating (jax 0.10), so copy first, then place.
    """
    shardings = (self.shardings(tree) if paths is None
                 else self.fragment_shardings(paths, tree))
    return jax.device_put(jax.tree.map(jnp.copy, tree), shardings)

  def _param_path(self, key_path) -> str | None:
    """The parameter path the longest suffix of a leaf's dict keys names, if any."""
    keys = [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
    for i in range(len(keys)):
      if (path := "/".join(keys[i:])) in self.axes:
        return path
    return None


def mesh_sizes(num_devices: int, *, fsdp: int = 1, tensor: int = 1,
               expert: int = 1) -> dict[str, int]:
  """Sizes of an island's mesh axes; `data` takes the devices the others leave.

  One of fsdp, tensor, expert may be -1: it then takes them instead.
  """
  sizes = {"fsdp": fsdp, "tensor": tensor, "expert": expert}
  for name, ways in sizes.items():
    if isinstance(ways, bool) or not isinstance(ways, (int, np.integer)) or (
        ways < 1 and ways != -1):
      raise ValueError(f"islands.{name}={ways!r}: a mesh axis size is a positive integer,"
                       " or -1 for all of an island's devices the other axes leave.")
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"islands: at most one axis may be -1, got {sizes}.")
  fixed = math.prod(w for w in sizes.values() if w != -1)
  if num_devices % fixed:
    raise ValueError(f"islands: fsdp x tensor x expert = {fixed} does not divide an island's"
                     f" {num_devices} device(s); change the sizes or diloco.num_learners.")
  sizes = {k: num_devices // fixed if w == -1 else w for k, w in sizes.items()}
  return {"data": num_devices // math.prod(sizes.values()), **sizes}


def make_islands(num_islands: int, *, fsdp: int = 1, tensor: int = 1, expert: int = 1,
                 axes: Mapping[str, tuple] | None = None, devices=None) -> list[Island]:
  """Builds `num_islands` island meshes over `devices` (default: all).

  `axes`: the task's logical axis names per parameter path (`Task.axes`);
  without them every parameter is replicated.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_islands <= 0:
    raise ValueError(f"num_islands={num_islands} must be positive.")
  per_island = max(len(devices) // num_islands, 1)
  sizes = mesh_sizes(per_island, fsdp=fsdp, tensor=tensor, expert=expert)
  axes = types.MappingProxyType(dict(axes or {}))
  islands = []
  for i in range(num_islands):
    if len(devices) >= num_islands:
      group = devices[i * per_island:(i + 1) * per_island]
    else:
      group = [devices[i % len(devices)]]
    mesh = jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=np.array(group).reshape(-1))
    islands.append(Island(i, mesh, axes))
  return islands


def from_config(num_islands: int, c, axes: Mapping[str, tuple] | None = None,
                devices=None) -> list[Island]:
  """`make_islands` with the sizes of `c` (an IslandsConfig)."""
  return make_islands(num_islands, fsdp=c.fsdp, tensor=c.tensor, expert=c.expert, axes=axes,
                      devices=devices)


def check_batch(island: Island, batch_size: int) -> None:
  if batch_size % island.batch_ways:
    raise ValueError(
        f"per-island batch {batch_size} is not divisible by the {island.batch_ways} ways the"
        f" island splits a batch (data x fsdp x expert of {dict(island.mesh.shape)});"
        " change data.batch_size, diloco.num_learners or the islands' sizes.")
