"""What DiLoCo needs of a model and its data, and nothing else: the task interface.

A task is a model, its loss and its data. Runtimes see batches as dicts of
arrays whose first axis is rows (split over an island's devices), parameters
as a tree of arrays, and counts in the task's `unit` (tokens, images): what
throughput, the token weights of a merge and the progress lines count.

Every parameter has a *role* (`ROLES`), which picks its merge rule
(`diloco.merge`: `rda` keeps `embed` on the weighted mean) and its place in
`layer` fragmentation, and *logical axis names*, one per dimension. Parameters
whose role is `local` are state a learner keeps but never sends: the syncer
never sees or merges them (e.g. a router's load-balancing bias).
"""

import math
from typing import Any, Protocol

import jax
import numpy as np

ROLES = ("embed", "head", "norm", "attention", "mlp", "router", "expert", "local", "other")
Batch = dict[str, Any]  # Arrays whose first axis is rows.


class Source(Protocol):
  """A learner's training batches: an iterator with a JSON-able state (grain's shape)."""

  def __next__(self) -> Batch: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


class Task(Protocol):
  """A model, its loss and its data, as every runtime and method uses them."""

  name: str
  unit: str  # What `num_units` counts: "tokens", "images", ...
  chance_loss: float  # The loss of a uniform guess: the divergence detector's prior.

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of a batch of `batch_size` rows."""

  def init(self, rng: jax.Array) -> dict:
    """Initial parameters (a nested dict of arrays), built for `batch_spec`'s shapes."""

  def loss(self, params, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss, auxiliary metrics as means over the batch); traced under jit.

    Aux keys that start with `_` are private: any shape, never reported, handed
    to `update_local` (an optional method, `update_local(params, aux) -> params`,
    which the inner step applies after the optimizer's update: state that is
    not trained by its gradient, e.g. a router's load-balancing bias).
    """

  def num_units(self, batch: Batch) -> int:
    """Units (`unit`) in `batch`, from its shapes (a spec works too)."""

  def eval_metrics(self, means: dict[str, float]) -> dict[str, float]:
    """Named eval metrics from the eval means of `loss` and its aux metrics."""

  def roles(self, flat_params: dict) -> dict[str, str]:
    """The role (`ROLES`) of each parameter, by its `/`-joined path."""

  def axes(self, flat_params: dict) -> dict[str, tuple]:
    """Logical axis names of each parameter's dimensions, by path."""

  def train_source(self, shard: int, num_shards: int, batch_size: int, seed: int) -> Source:
    """Batches of shard `shard` of `num_shards` (disjoint), in a seeded order."""

  def eval_batches(self, batch_size: int, num_batches: int) -> list[Batch]:
    """Fixed held-out batches (the same every time)."""

  # Optional: `data_id`, a string naming how the data was made (a tokenizer's sha256). A
  # checkpoint or a mailbox written with another `data_id` is refused (a run's fingerprint).

  def routing(self, params, batch: Batch) -> dict | None:
    """Optional: a mixture of experts' routers on `batch`, {"probs": [layers, tokens,
    experts], "choices": [layers, tokens, k]} (routing.py); None (or absent): none."""


def role_by_name(path: str) -> str:
  """The role a conventionally named parameter has (the models of this package).

  Top-level `embed`/`pos_embed`/`cls` are embeddings, `head` the output layer,
  any `*norm*` a norm; inside a block, `attn*` is attention and `mlp*` the MLP,
  but a `router` module's weights are the router, an `experts` module's
  stacked tensors are experts, and a `router_bias` is `local` (a learner's own).
  """
  top, leaf = path.split("/")[0], path.split("/")[-2] if "/" in path else path
  if top in ("embed", "pos_embed", "cls"):
    return "embed"
  if top == "head":
    return "head"
  if "norm" in leaf:
    return "norm"
  parts = path.split("/")
  if parts[-1] == "router_bias":
    return "local"
  if leaf == "router":
    return "router"
  if leaf == "experts":
    return "expert"
  if len(parts) > 1 and parts[1].startswith("attn"):
    return "attention"
  if len(parts) > 1 and parts[1].startswith("mlp"):
    return "mlp"
  return "other"


def axes_by_path(tree, flat_params: dict) -> dict:
  """{path: axis names} of `flat_params` from a tree of name tuples (a model's `param_axes`)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
  named = {"/".join(str(getattr(k, "key", k)) for k in path): names for path, names in flat}
  return {k: named[k] for k in flat_params}


def param_axes(task: Task) -> dict[str, tuple]:
  """{path: logical axis names} of every parameter (from shapes only: nothing is computed)."""
  return task.axes(_flat(jax.eval_shape(task.init, jax.random.key(0))))


def _flat(params) -> dict:
  return {"/".join(str(getattr(k, "key", k)) for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def mergeable(task: Task, flat_params: dict) -> dict:
  """The parameters the syncer merges: all but the `local` ones."""
  roles = task.roles(flat_params)
  return {k: v for k, v in flat_params.items() if roles[k] != "local"}


def check(task: Task, batch_size: int, rng: jax.Array) -> None:
  """Refuses a task whose pieces disagree, before any training.

  Checks that every parameter has a known role and one axis name per
  dimension, that `loss` takes a batch of `batch_spec`'s shapes (traced only,
  nothing is computed) and returns a scalar, and that `num_units` is positive.

  Raises:
    ValueError: naming the task and what is wrong.
  """
  name = f"task {task.name!r}"
  spec = task.batch_spec(batch_size)
  params = jax.eval_shape(task.init, rng)
  flat = _flat(params)
  roles, axes = task.roles(flat), task.axes(flat)
  for path, x in flat.items():
    if roles.get(path) not in ROLES:
      raise ValueError(f"{name}: parameter {path} has role {roles.get(path)!r}; roles are {ROLES}.")
    if len(axes.get(path, ())) != len(x.shape):
      raise ValueError(f"{name}: parameter {path} of shape {x.shape} has axis names"
                       f" {axes.get(path)!r}: one per dimension, please.")
  try:
    loss, aux = jax.eval_shape(task.loss, params, spec)
  except Exception as e:  # pylint: disable=broad-exception-caught
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{name}: its loss does not take a batch of its own batch_spec"
                     f" ({_describe(spec)}): {first}") from None
  if loss.shape != () or not np.issubdtype(loss.dtype, np.floating):
    raise ValueError(f"{name}: its loss must be a float scalar, got {loss.shape} {loss.dtype}.")
  for key, value in aux.items():
    if value.shape != () and not key.startswith("_"):
      raise ValueError(f"{name}: aux metric {key!r} must be a scalar, got shape {value.shape}.")
  if task.num_units(spec) <= 0:
    raise ValueError(f"{name}: num_units of a {batch_size}-row batch is {task.num_units(spec)}.")
  if not (math.isfinite(task.chance_loss) and task.chance_loss > 0):
    raise ValueError(f"{name}: chance_loss={task.chance_loss} must be finite and positive.")


def zeros(spec: dict) -> Batch:
  """A batch of zeros with `spec`'s shapes (a step-time probe)."""
  return {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}


def _describe(spec) -> str:
  return ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in spec.items())

