"""Bring your own model: a flax MLP on the digits, registered as a task, trained by any method.

Simulator:     python -m decoupled_diloco.main --config=experiments/custom_model.py --workdir=/tmp/mlp
Real runtime:  python -m launch.local --config=experiments/custom_model.py --workdir=/tmp/mlp_real
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from decoupled_diloco import config as config_lib, tasks
from decoupled_diloco.data import digits


class Mlp(nn.Module):
  width: int

  @nn.compact
  def __call__(self, images_BxHxWxC):
    x_BxF = images_BxHxWxC.reshape(images_BxHxWxC.shape[0], -1)
    return nn.Dense(10, name="head")(nn.gelu(nn.Dense(self.width, name="hidden")(x_BxF)))


@tasks.register("digits_mlp")
class DigitsMlp:
  """What DiLoCo needs of a model and its data (decoupled_diloco/tasks/base.py)."""
  name, unit, chance_loss = "digits_mlp", "images", math.log(10)

  def __init__(self, cfg):
    self.model = Mlp(cfg.model.mlp_dim)

  def batch_spec(self, batch_size):
    return {"image": jax.ShapeDtypeStruct((batch_size, 8, 8, 1), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def init(self, rng):
    return jax.jit(lambda r: self.model.init(r, jnp.zeros((1, 8, 8, 1)))["params"])(rng)

  def loss(self, params, batch):
    logits = self.model.apply({"params": params}, batch["image"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return nll, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}

  def num_units(self, batch):
    return batch["label"].shape[0]

  def eval_metrics(self, means):
    return {}

  def roles(self, flat_params):  # `head` or `mlp`: RDA merges both by default.
    return {k: k.split("/")[0].replace("hidden", "mlp") for k in flat_params}

  def axes(self, flat_params):
    return {k: (None,) * len(x.shape) for k, x in flat_params.items()}

  def train_source(self, shard, num_shards, batch_size, seed):
    return digits.train_source(digits.load(), shard=shard, num_shards=num_shards,
                               batch_size=batch_size, seed=seed)

  def eval_batches(self, batch_size, num_batches):
    return digits.eval_batches(digits.load(), batch_size)


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.runtime = "decoupled"
  c.task.update(name="digits_mlp", module="experiments.custom_model")
  c.model.mlp_dim = 128
  c.data.batch_size = 64
  c.train.update(steps=200, eval_every=50, checkpoint_every=50)
  c.inner.update(lr=3e-3, warmup_steps=10)
  c.diloco.update(num_learners=4, sync_every=10, quorum=3, grace_gamma=1.0, merge="rda",
                  weighting="tokens2_per_step")
  return c
