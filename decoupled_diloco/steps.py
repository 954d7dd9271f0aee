"""The jitted per-island functions: one inner training step, and eval metrics.

Each is compiled once per island with explicit shardings; parameters and
optimizer state are donated so an inner step updates them in place. A batch
is a dict of arrays split over the island's devices along their first axis.
"""

import jax
import jax.numpy as jnp
import optax

from decoupled_diloco import islands as islands_lib
from decoupled_diloco.config import Config
from decoupled_diloco.islands import Island
from decoupled_diloco.tasks import base as tasks_base
from decoupled_diloco.tasks.base import Task


def make_islands(cfg: Config, task: Task, num: int, devices=None) -> list[Island]:
  """`num` islands over `devices` with `cfg.islands`' mesh sizes, sharding by `task`'s axes."""
  return islands_lib.from_config(num, cfg.islands, tasks_base.param_axes(task), devices)


def make_inner_step(task: Task, tx: optax.GradientTransformation, island: Island, params,
                    opt_state):
  """Returns `step(params, opt_state, batch) -> (params, opt_state, loss)` for `island`."""

  update_local = getattr(task, "update_local", None)

  def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if update_local is not None:  # State that is not trained by its gradient (tasks/base.py).
      params = update_local(params, aux)
    return params, opt_state, loss

  p_sh, o_sh = island.shardings(params), island.shardings(opt_state)
  return jax.jit(step, in_shardings=(p_sh, o_sh, island.batch),
                 out_shardings=(p_sh, o_sh, island.replicated),
                 donate_argnums=(0, 1))


def make_eval(task: Task, island: Island):
  """Returns `evaluate(params, batch) -> {"loss": mean, **aux means}` on `island`."""
  def metrics(params, batch):
    loss, aux = task.loss(params, batch)
    return {"loss": loss, **{k: v for k, v in aux.items() if not k.startswith("_")}}

  return jax.jit(metrics, in_shardings=(None, island.batch), out_shardings=island.replicated)


def evaluate(eval_fn, island: Island, params, batches) -> dict[str, float]:
  """Mean loss and aux metrics over fixed held-out batches (equal sizes: a plain mean)."""
  total = None
  for b in batches:
    m = eval_fn(params, jax.device_put(b, island.batch))
    total = m if total is None else jax.tree.map(jnp.add, total, m)
  return {k: float(v) / len(batches) for k, v in total.items()}
