"""Data-parallel training: one replica over every device, all-reduce each step.

The baseline every DiLoCo variant is measured against, at the same global
batch. It has the same interface as the other runtimes (see `train.py`).
"""

import jax
import numpy as np

from decoupled_diloco import islands as islands_lib
from decoupled_diloco import optim, steps
from decoupled_diloco.config import Config
from decoupled_diloco.data.loader import ShardIterator
from decoupled_diloco.models import transformer


class DataParallel:

  def __init__(self, cfg: Config, train_tokens: np.ndarray):
    self.island = islands_lib.make_islands(1, fsdp=cfg.islands.fsdp)[0]
    islands_lib.check_batch(self.island, cfg.data.batch_size)
    self.model = transformer.Transformer(cfg.model)
    tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
    params = transformer.init_params(cfg.model, jax.random.key(cfg.seed))
    self.params = self.island.put(params)
    self.opt_state = self.island.put(tx.init(params))
    self._step_fn = steps.make_inner_step(self.model, tx, self.island, self.params,
                                          self.opt_state)
    self.data = ShardIterator(train_tokens, shard=0, num_shards=1,
                              batch_size=cfg.data.batch_size, seq_len=cfg.model.seq_len,
                              seed=cfg.seed)
    self.step = 0
    self.tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    self._grad_bytes = 4 * transformer.num_params(params)

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
    return {"params": self.params, "opt_state": self.opt_state,
            "step": np.int64(self.step), "data_position": np.int64(self.data.position)}

  def load_state(self, tree) -> None:
    self.params, self.opt_state = tree["params"], tree["opt_state"]
    self.step = int(tree["step"])
    self.data.position = int(tree["data_position"])

  def extra_state(self) -> tuple[list, None]:
    return [], None  # Everything is in `state()`.

  def load_extra_state(self, payloads: list, meta: None) -> None:
    del payloads, meta

  def comm_metrics(self) -> dict:
    """Bytes over each replica's link for a ring all-reduce of fp32 gradients.

    A ring all-reduce over N replicas sends 2(N-1)/N and receives as much of
    the gradient per replica per step: about 4x its bytes, both directions.
    """
    return {"allreduce_bytes": 4 * self._grad_bytes * self.step}

  def summary(self) -> dict:
    return {"allreduce_bytes_per_step": 4 * self._grad_bytes, **self.comm_metrics()}
