"""Data-parallel training: one replica over every device, all-reduce each step.

The baseline every DiLoCo variant is measured against, at the same global
batch. It has the same interface as the other runtimes (see `train.py`).
"""

import jax
import numpy as np

from decoupled_diloco import islands as islands_lib
from decoupled_diloco import optim, steps
from decoupled_diloco.config import Config
from decoupled_diloco.runtime.router_probe import RouterProbe
from decoupled_diloco.tasks.base import Task


class DataParallel:

  def __init__(self, cfg: Config, task: Task):
    self.island = steps.make_islands(cfg, task, 1)[0]
    islands_lib.check_batch(self.island, cfg.data.batch_size)
    self.task = task
    tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
    params = task.init(jax.random.key(cfg.seed))
    self.params = self.island.put(params)
    self.opt_state = self.island.put(tx.init(params))
    self._step_fn = steps.make_inner_step(task, tx, self.island, self.params, self.opt_state)
    self.data = task.train_source(0, 1, cfg.data.batch_size, cfg.seed)
    self.step = 0
    self.units_per_step = task.num_units(task.batch_spec(cfg.data.batch_size))
    self._grad_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
    self.probe = RouterProbe.make(task, params, 1)  # None: no routers.

  @property
  def eval_island(self) -> islands_lib.Island:
    return self.island

  def train_step(self) -> dict:
    batch = jax.device_put(next(self.data), self.island.batch)
    self.params, self.opt_state, loss = self._step_fn(self.params, self.opt_state, batch)
    self.step += 1
    return {"loss": loss}

  def eval_params(self):
    return self.params

  def state(self):
    s = {"params": self.params, "opt_state": self.opt_state, "step": np.int64(self.step)}
    return {**s, "router_probe": self.probe.state()} if self.probe else s

  def load_state(self, tree) -> None:
    self.params, self.opt_state = tree["params"], tree["opt_state"]
    self.step = int(tree["step"])
    if self.probe:
      self.probe.load_state(tree["router_probe"])

  def extra_state(self) -> tuple[list, dict]:
    return [], {"data": self.data.get_state()}

  def load_extra_state(self, payloads: list, meta: dict) -> None:
    del payloads
    self.data.set_state(meta["data"])

  def eval_scalars(self) -> dict:
    """Bytes over each replica's link for a ring all-reduce of fp32 gradients.

    A ring all-reduce over N replicas sends 2(N-1)/N and receives as much of
    the gradient per replica per step: about 4x its bytes, both directions.
    """
    routing = self.probe.metrics(self.params) if self.probe else {}
    return {"allreduce_bytes": 4 * self._grad_bytes * self.step, **routing}

  def summary(self) -> dict:
    return {"allreduce_bytes_per_step": 4 * self._grad_bytes,
            "allreduce_bytes": 4 * self._grad_bytes * self.step}
