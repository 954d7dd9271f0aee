"""A flax model's initializer and axis names, made once per configuration in a process.

The runtimes, the memory check and the task checks each ask a model for its
initial parameters or their shapes, often for the same configuration (a run
and its resume, an eval island beside the learners'). A `jax.jit` made afresh
each time is traced and compiled afresh each time; made once per (model,
configuration) here, later calls reuse its trace and executable. Configurations
are frozen dataclasses, so they key the cache.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax

BoxedInit = Callable[[Any, jax.Array], dict]  # (config, rng) -> params, maybe nn.Partitioned.


@functools.lru_cache(maxsize=64)
def _init_fn(boxed_init: BoxedInit, c: Any):
  return jax.jit(lambda key: nn.meta.unbox(boxed_init(c, key)))


def init(boxed_init: BoxedInit, c: Any, rng: jax.Array) -> dict:
  """Initial parameters as plain arrays (axis boxes removed), in one compiled program."""
  return _init_fn(boxed_init, c)(rng)


def shapes(boxed_init: BoxedInit, c: Any) -> dict:
  """The parameters' `jax.ShapeDtypeStruct`s (nothing is allocated)."""
  return jax.eval_shape(_init_fn(boxed_init, c), jax.random.key(0))


@functools.lru_cache(maxsize=64)
def axes(boxed_init: BoxedInit, c: Any) -> dict:
  """Logical axis names per parameter: a tree like `init`'s with a tuple per leaf (None for
  a dimension its initializer did not name). Shared: do not modify it."""
  boxed = jax.eval_shape(lambda: boxed_init(c, jax.random.key(0)))
  is_box = lambda x: isinstance(x, nn.Partitioned)
  names = lambda x: tuple(x.names) if is_box(x) else (None,) * len(x.shape)
  return jax.tree.map(names, boxed, is_leaf=is_box)
