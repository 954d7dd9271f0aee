"""Inner and outer optimizers from config, as optax transformations.

Inner: AdamW with linear warmup and cosine decay, global-norm clipping, and a
re-warmup after a restart with a fresh state (`restart_state`).
Outer: applied by the syncer to the merged pseudo-gradient, treated as a
gradient (DiLoCo, arXiv 2311.08105: SGD with Nesterov momentum, lr 0.7, 0.9).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from decoupled_diloco.config import InnerOptConfig, OuterOptConfig


def inner_schedule(c: InnerOptConfig, total_steps: int) -> optax.Schedule:
  warmup = min(c.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=c.lr * c.final_lr_fraction)


def inner_optimizer(c: InnerOptConfig, total_steps: int) -> optax.GradientTransformation:
  """`optax.adamw` whose schedule can be re-warmed after a restart (`restart_state`)."""
  adamw = optax.chain(optax.scale_by_adam(b1=c.b1, b2=c.b2),
                      optax.add_decayed_weights(c.weight_decay),
                      scale_by_rewarmed_schedule(inner_schedule(c, total_steps)))
  if c.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw)
  return adamw


class RewarmedScheduleState(NamedTuple):
  count: jax.Array  # Position in the learning-rate schedule.
  since_restart: jax.Array  # Steps since a fresh restart, up to `rewarmup`.
  rewarmup: jax.Array  # Length of the re-warmup after that restart (0: none).


def scale_by_rewarmed_schedule(schedule: optax.Schedule) -> optax.GradientTransformation:
  """optax.scale_by_learning_rate(schedule), times min(1, (k + 1) / rewarmup) after a restart.

  A restarted Adam has no moments: its first updates are about sign(g) at the
  full learning rate, and its second-moment estimate rests on a few samples
  (why training warms up at all: Liu et al., "On the Variance of the Adaptive
  Learning Rate and Beyond", arXiv 1908.03265). k counts the steps since the
  restart; `restart_state` sets the re-warmup's length, `init` sets none. The
  factor multiplies the scalar learning rate, never the updates, so without a
  re-warmup every update is bitwise that of `optax.adamw`.
  """

  def init_fn(params):
    del params
    zero = jnp.zeros([], jnp.int32)
    return RewarmedScheduleState(count=zero, since_restart=zero, rewarmup=zero)

  def update_fn(updates, state, params=None):
    del params
    k, length = state.since_restart, state.rewarmup
    factor = jnp.where(k < length, (k + 1) / jnp.maximum(length, 1), 1.0)
    step_size = -schedule(state.count) * factor
    updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
    return updates, RewarmedScheduleState(count=optax.safe_increment(state.count),
                                          since_restart=jnp.minimum(k + 1, length),
                                          rewarmup=length)

  return optax.GradientTransformation(init_fn, update_fn)


OUTER_OPTIMIZERS = ("nesterov", "sgd", "adam")


def outer_optimizer(c: OuterOptConfig) -> optax.GradientTransformation:
  if c.name == "nesterov":
    return optax.sgd(c.lr, momentum=c.momentum or None, nesterov=True)
  if c.name == "sgd":
    return optax.sgd(c.lr, momentum=c.momentum or None)
  if c.name == "adam":
    return optax.adam(c.lr, b1=c.momentum)
  raise ValueError(f"outer.name={c.name!r} is unknown; choose from {OUTER_OPTIMIZERS}.")


def restart_state(tx: optax.GradientTransformation, params, schedule_step: int,
                  rewarmup_steps: int = 0):
  """A fresh inner optimizer state whose learning-rate schedule is at `schedule_step`.

  For a learner that restarts without its memory: Adam's moments and bias
  correction start anew; the schedule goes on from the global step (the
  learner's place in training), scaled by a linear re-warmup over
  `rewarmup_steps` (`scale_by_rewarmed_schedule`), since its moments are as
  empty as at step 0.
  """
  return _restart_counts(tx.init(params), schedule_step, rewarmup_steps)


def _restart_counts(state, step: int, rewarmup_steps: int):
  """Every schedule at `step`, re-warmed over `rewarmup_steps` from now."""
  if isinstance(state, RewarmedScheduleState):
    as_count = lambda x: jnp.asarray(x, state.count.dtype)
    return RewarmedScheduleState(count=as_count(step), since_restart=as_count(0),
                                 rewarmup=as_count(rewarmup_steps))
  if isinstance(state, tuple):
    children = [_restart_counts(s, step, rewarmup_steps) for s in state]
    return type(state)(*children) if hasattr(state, "_fields") else tuple(children)
  return state
