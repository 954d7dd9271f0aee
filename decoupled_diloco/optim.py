"""Inner and outer optimizers from config, as optax transformations.

Inner: AdamW with linear warmup and cosine decay, global-norm clipping.
Outer: applied by the syncer to the merged pseudo-gradient, treated as a
gradient (DiLoCo, arXiv 2311.08105: SGD with Nesterov momentum, lr 0.7, 0.9).
"""

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
