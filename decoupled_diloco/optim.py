"""Inner and outer optimizers from config, as optax transformations.

Inner: AdamW with linear warmup and cosine decay, global-norm clipping.
Outer: applied by the syncer to the merged pseudo-gradient, treated as a
gradient (DiLoCo, arXiv 2311.08105: SGD with Nesterov momentum, lr 0.7, 0.9).
"""

import jax.numpy as jnp
import optax

from decoupled_diloco.config import InnerOptConfig, OuterOptConfig


def inner_schedule(c: InnerOptConfig, total_steps: int) -> optax.Schedule:
  warmup = min(c.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=c.lr * c.final_lr_fraction)


def inner_optimizer(c: InnerOptConfig, total_steps: int) -> optax.GradientTransformation:
  adamw = optax.adamw(inner_schedule(c, total_steps), b1=c.b1, b2=c.b2,
                      weight_decay=c.weight_decay)
  if c.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw)
  return adamw


OUTER_OPTIMIZERS = ("nesterov", "sgd", "adam")


def outer_optimizer(c: OuterOptConfig) -> optax.GradientTransformation:
  if c.name == "nesterov":
    return optax.sgd(c.lr, momentum=c.momentum or None, nesterov=True)
  if c.name == "sgd":
    return optax.sgd(c.lr, momentum=c.momentum or None)
  if c.name == "adam":
    return optax.adam(c.lr, b1=c.momentum)
  raise ValueError(f"outer.name={c.name!r} is unknown; choose from {OUTER_OPTIMIZERS}.")


def restart_state(tx: optax.GradientTransformation, params, schedule_step: int):
  """A fresh inner optimizer state whose learning-rate schedule is at `schedule_step`.

  For a learner that restarts without its memory: Adam's moments and bias
  correction start anew; the schedule does not (it goes on from the global
  step, so the learner does not warm up again).
  """
  return _set_schedule_count(tx.init(params), schedule_step)


def _set_schedule_count(state, step: int):
  """Sets the `count` of every `ScaleByScheduleState` in `state` to `step`."""
  if isinstance(state, optax.ScaleByScheduleState):
    return optax.ScaleByScheduleState(count=jnp.asarray(step, state.count.dtype))
  if isinstance(state, tuple):
    children = [_set_schedule_count(s, step) for s in state]
    return type(state)(*children) if hasattr(state, "_fields") else tuple(children)
  return state
