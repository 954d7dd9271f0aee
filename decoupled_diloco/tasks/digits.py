"""`digits_vit`: classify scikit-learn's 8x8 handwritten digits with a small ViT.

Batches are {"image": [B, 8, 8, 1] float32, "label": [B] int32}; the unit is
the image, the loss the mean softmax cross-entropy, and top-1 accuracy
(`accuracy`) is reported with every eval. Training batches are shifted by up
to a pixel (data/digits.py); the held-out split is fixed.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from decoupled_diloco.config import Config
from decoupled_diloco.data import digits as digits_lib
from decoupled_diloco.models import vit
from decoupled_diloco.tasks import base, register

MODELS = ("vit",)


@dataclasses.dataclass(frozen=True)
class VitConfig:
  """What models/vit.py takes: the image's shape from the data, the rest from `model`."""
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  pool: str
  posemb: str
  dtype: str
  image_size: int = 8
  channels: int = 1
  num_classes: int = 10


class Digits:
  """A ViT on the digits; see module docstring."""

  name, unit = "digits_vit", "images"
  chance_loss = math.log(10)
  description = "scikit-learn digits (8x8 images, 10 classes)"

  def __init__(self, cfg: Config):
    c = cfg.model
    if c.name not in MODELS:
      raise ValueError(f"model.name={c.name!r} is not a model of task digits_vit; choose from"
                       f" {list(MODELS)}.")
    self.c = VitConfig(**{f.name: getattr(c, f.name) for f in dataclasses.fields(VitConfig)
                          if hasattr(c, f.name) and f.name not in ("image_size", "channels",
                                                                   "num_classes")})
    vit.check(self.c)
    self.model = vit.ViT(self.c)
    self._sharding = cfg.data.sharding

  @property
  def data(self) -> digits_lib.Digits:
    return digits_lib.load()  # Cached: read once per process.

  def batch_spec(self, batch_size: int) -> dict:
    c = self.c
    return {"image": jax.ShapeDtypeStruct((batch_size, c.image_size, c.image_size, c.channels),
                                          jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def init(self, rng):
    return vit.init_params(self.c, rng)

  def loss(self, params, batch):
    """Mean cross-entropy (nats), and top-1 accuracy."""
    logits_BxK = self.model.apply({"params": params}, batch["image"])
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, batch["label"])
    accuracy = (jnp.argmax(logits_BxK, -1) == batch["label"]).mean()
    return nll_B.mean(), {"accuracy": accuracy}

  def num_units(self, batch) -> int:
    return batch["label"].shape[0]

  def eval_metrics(self, means: dict) -> dict:
    return {"error_percent": 100 * (1 - means["accuracy"])}

  def roles(self, flat_params: dict) -> dict:
    return {k: base.role_by_name(k) for k in flat_params}

  def axes(self, flat_params: dict) -> dict:
    return base.axes_by_path(vit.param_axes(self.c), flat_params)

  def train_source(self, shard: int, num_shards: int, batch_size: int, seed: int):
    return digits_lib.train_source(self.data, shard=shard, num_shards=num_shards,
                                   batch_size=batch_size, seed=seed, sharding=self._sharding)

  def eval_batches(self, batch_size: int, num_batches: int) -> list:
    """Every full batch of the held-out split (it is small: `num_batches` is not used)."""
    del num_batches
    return digits_lib.eval_batches(self.data, batch_size)


register("digits_vit")(Digits)
