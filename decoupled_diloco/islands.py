"""Splits devices into per-learner island meshes and places arrays on them.

An island is one learner's mesh with a single `data` axis. With at least as
many devices as islands, each island gets its own contiguous block of
`len(devices) // M` devices; with fewer, islands share devices round-robin
(useful on one CPU, where islands are then run one after the other).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Island:
  index: int
  mesh: jax.sharding.Mesh
  fsdp: bool

  @property
  def size(self) -> int:
    return self.mesh.devices.size

  @property
  def batch(self) -> NamedSharding:
    """Batches are split over the island's devices along their first axis."""
    return NamedSharding(self.mesh, P("data"))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def param_sharding(self, x) -> NamedSharding:
    """FSDP: shard the largest axis divisible by the island size; else replicate."""
    shape = np.shape(x)
    if not self.fsdp or self.size == 1 or not shape:
      return self.replicated
    for axis in np.argsort(shape)[::-1]:
      if shape[axis] % self.size == 0:
        spec = [None] * len(shape)
        spec[axis] = "data"
        return NamedSharding(self.mesh, P(*spec))
    return self.replicated

  def shardings(self, tree):
    return jax.tree.map(self.param_sharding, tree)

  def put(self, tree):
    """Copies a tree of arrays (params, optimizer state) onto this island.

    Always a copy: inner steps donate their inputs, which must never delete
    the caller's arrays (e.g. one initialisation shared by every learner).
    `device_put(..., may_alias=False)` still aliases the shard already on the
    right device when replicating (jax 0.10), so copy first, then place.
    """
    return jax.device_put(jax.tree.map(jnp.copy, tree), self.shardings(tree))


def make_islands(num_islands: int, *, fsdp: bool = False, devices=None) -> list[Island]:
  """Builds `num_islands` island meshes over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  if num_islands <= 0:
    raise ValueError(f"num_islands={num_islands} must be positive.")
  per_island = max(len(devices) // num_islands, 1)
  islands = []
  for i in range(num_islands):
    if len(devices) >= num_islands:
      group = devices[i * per_island:(i + 1) * per_island]
    else:
      group = [devices[i % len(devices)]]
    mesh = jax.make_mesh((len(group),), ("data",), axis_types=(AxisType.Auto,),
                         devices=group)
    islands.append(Island(i, mesh, fsdp))
  return islands


def check_batch(island: Island, batch_size: int) -> None:
  if batch_size % island.size:
    raise ValueError(
        f"per-island batch {batch_size} is not divisible by the island's"
        f" {island.size} devices; change data.batch_size or diloco.num_learners.")
