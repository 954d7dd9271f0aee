"""The jitted per-island functions: one inner training step, and eval loss.

Each is compiled once per island with explicit shardings; parameters and
optimizer state are donated so an inner step updates them in place.
"""

import jax
import jax.numpy as jnp
import optax

from decoupled_diloco.islands import Island
from decoupled_diloco.models import transformer


def make_inner_step(model: transformer.Transformer, tx: optax.GradientTransformation,
                    island: Island, params, opt_state):
  """Returns `step(params, opt_state, batch) -> (params, opt_state, loss)` for `island`."""

  def step(params, opt_state, batch_BxL1):
    loss, grads = jax.value_and_grad(transformer.loss_fn)(params, model, batch_BxL1)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  p_sh, o_sh = island.shardings(params), island.shardings(opt_state)
  return jax.jit(step, in_shardings=(p_sh, o_sh, island.batch),
                 out_shardings=(p_sh, o_sh, island.replicated),
                 donate_argnums=(0, 1))


def make_eval_loss(model: transformer.Transformer, island: Island):
  """Returns `eval_loss(params, batch) -> mean nats/byte` on `island`."""
  def eval_loss(params, batch_BxL1):
    return transformer.loss_fn(params, model, batch_BxL1)

  return jax.jit(eval_loss, in_shardings=(None, island.batch), out_shardings=island.replicated)


def evaluate(eval_loss, island: Island, params, batches) -> float:
  """Mean loss over fixed held-out batches (equal sizes, so a plain mean)."""
  total = jnp.zeros(())
  for b in batches:
    total = total + eval_loss(params, jax.device_put(b, island.batch))
  return float(total) / len(batches)
