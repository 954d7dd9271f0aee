"""The digits data (split, shards, resume, augmentation) and the small ViT."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decoupled_diloco.data import digits as digits_lib
from decoupled_diloco.models import vit


@dataclasses.dataclass(frozen=True)
class VitConfig:
  image_size: int = 8
  channels: int = 1
  patch_size: int = 4
  num_classes: int = 10
  num_layers: int = 1
  d_model: int = 16
  num_heads: int = 2
  mlp_dim: int = 32
  pool: str = "cls"
  posemb: str = "learned"
  dtype: str = "float32"


def _rows(images):
  return {x.tobytes() for x in images}


def _shifted(image_HxWx1, dy, dx):
  """The image moved down by dy and right by dx, zeros where nothing moved in."""
  out = np.roll(image_HxWx1, (dy, dx), axis=(0, 1))
  if dy == 1:
    out[0] = 0
  if dy == -1:
    out[-1] = 0
  if dx == 1:
    out[:, 0] = 0
  if dx == -1:
    out[:, -1] = 0
  return out


def test_load_is_deterministic_stratified_and_disjoint():
  d = digits_lib.load()
  digits_lib.load.cache_clear()
  again = digits_lib.load()
  assert again is not d
  for a, b in zip(dataclasses.astuple(d), dataclasses.astuple(again)):
    np.testing.assert_array_equal(a, b)
  # Per class round(0.2 * count) of the counts 178 182 177 183 181 182 181 179 174 180.
  assert np.bincount(d.test_y).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
  assert (len(d.train_y), len(d.test_y)) == (1438, 359)
  assert d.train_x.shape == (1438, 8, 8, 1) and d.test_x.shape == (359, 8, 8, 1)
  assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
  for x in (d.train_x, d.test_x):
    assert x.min() == 0.0 and x.max() == 1.0
  for y in (d.train_y, d.test_y):
    assert set(np.unique(y).tolist()) == set(range(10))
  assert not _rows(d.train_x) & _rows(d.test_x)  # The 1,797 images are all distinct.
  assert not d.train_x.flags.writeable  # Shared by every caller of the cache.
  other = digits_lib.load(seed_split=1)
  assert _rows(other.test_x) != _rows(d.test_x)
  with pytest.raises(ValueError, match="test_fraction=1.5"):
    digits_lib.load(test_fraction=1.5)


@pytest.mark.parametrize("sharding", ["random", "contiguous"])
def test_one_epoch_of_each_shard_visits_its_own_images_once(sharding):
  d = digits_lib.load()
  seen = []
  for shard in range(5):  # 1438 images: shards of 288 or 287 = 7 batches of 41 (and a rest).
    src = digits_lib.train_source(d, shard=shard, num_shards=5, batch_size=41, seed=3,
                                  sharding=sharding, augment=False)
    batches = [next(src) for _ in range(7)]
    images = np.concatenate([b["image"] for b in batches])
    assert set(np.concatenate([b["label"] for b in batches]).tolist()) == set(range(10))
    assert len(_rows(images)) == 287
    if sharding == "contiguous":
      lo = shard * 1438 // 5
      assert _rows(images) <= _rows(d.train_x[lo:lo + 288])
    seen.append(_rows(images))
  assert sum(len(s) for s in seen) == len(set().union(*seen))
  with pytest.raises(ValueError, match="digits' train split.*fewer than a batch of 64"):
    digits_lib.train_source(d, shard=0, num_shards=100, batch_size=64, seed=0)


def test_resume_from_state_continues_the_same_batches():
  d = digits_lib.load()
  src = digits_lib.train_source(d, shard=1, num_shards=2, batch_size=64, seed=7)
  for _ in range(9):  # 719 // 64 = 11 batches an epoch: the next six cross into epoch 1.
    next(src)
  state = json.loads(json.dumps(src.get_state()))
  expected = [next(src) for _ in range(6)]
  resumed = digits_lib.train_source(d, shard=1, num_shards=2, batch_size=64, seed=7)
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(6)]):
    np.testing.assert_array_equal(want["image"], got["image"])  # Shifts included.
    np.testing.assert_array_equal(want["label"], got["label"])
  other = digits_lib.train_source(d, shard=1, num_shards=2, batch_size=64, seed=8)
  other.set_state(state)
  assert not np.array_equal(next(other)["label"], expected[0]["label"])
  with pytest.raises(ValueError, match="next_index"):
    resumed.set_state({"step": 3})


def test_augmentation_only_shifts_by_at_most_one_pixel():
  d = digits_lib.load()
  make = lambda augment: digits_lib.train_source(d, shard=0, num_shards=1, batch_size=128,
                                                 seed=0, augment=augment)
  plain, augmented = next(make(False)), next(make(True))
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  assert augmented["image"].shape == (128, 8, 8, 1)
  assert augmented["image"].dtype == np.float32
  moves = []
  for original, moved in zip(plain["image"], augmented["image"]):
    matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
               if np.array_equal(_shifted(original, dy, dx), moved)]
    assert matches, "an augmented image is not a shift of its original"
    moves.append(matches[0])
  assert len(set(moves)) > 1  # Not all left in place.


def test_eval_batches_are_full_and_in_test_order():
  d = digits_lib.load()
  batches = digits_lib.eval_batches(d, 100)
  assert len(batches) == 3  # 359 // 100; the last 59 are dropped.
  for i, b in enumerate(batches):
    assert b["image"].shape == (100, 8, 8, 1)
    np.testing.assert_array_equal(b["label"], d.test_y[i * 100:(i + 1) * 100])
  with pytest.raises(ValueError, match="batch_size=400"):
    digits_lib.eval_batches(d, 400)


@pytest.mark.parametrize("pool,posemb,dtype", [("cls", "learned", "float32"),
                                               ("mean", "sincos", "bfloat16")])
def test_vit_shapes_axes_and_zero_head(pool, posemb, dtype):
  c = VitConfig(pool=pool, posemb=posemb, dtype=dtype)
  params = vit.init_params(c, jax.random.key(0))
  axes = vit.param_axes(c)
  is_tuple = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(axes, is_leaf=is_tuple) == jax.tree.structure(params)
  for p, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_tuple)):
    assert len(names) == p.ndim and p.dtype == jnp.float32
  assert ("pos_embed" in params) == (posemb == "learned")
  assert ("cls" in params) == (pool == "cls")
  assert set(params["block_0"]) == {"attn_norm", "attn", "mlp_norm", "mlp"}
  assert set(params["block_0"]["mlp"]) == {"mlp_in", "mlp_out"}
  assert axes["head"]["kernel"] == ("embed", "classes")
  images = jnp.asarray(digits_lib.load().test_x[:3])
  logits_BxK = jax.jit(vit.ViT(c).apply)({"params": params}, images)
  assert logits_BxK.shape == (3, 10) and logits_BxK.dtype == jnp.float32
  np.testing.assert_array_equal(logits_BxK, 0.0)  # The head starts at zero.


def test_vit_rejects_an_unknown_pool():
  with pytest.raises(ValueError, match="model.pool='max'"):
    vit.init_params(VitConfig(pool="max"), jax.random.key(0))


def test_tiny_vit_learns_digits():
  c = VitConfig(num_layers=2, d_model=64, num_heads=4, mlp_dim=128, pool="mean")
  d = digits_lib.load()
  model, tx = vit.ViT(c), optax.adam(1e-3)
  params = vit.init_params(c, jax.random.key(0))
  opt_state = tx.init(params)

  def loss_fn(params, batch):
    logits_BxK = model.apply({"params": params}, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, batch["label"]).mean()

  @jax.jit
  def train_step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  src = digits_lib.train_source(d, shard=0, num_shards=1, batch_size=64, seed=0, augment=False)
  for _ in range(150):
    params, opt_state = train_step(params, opt_state, next(src))
  predictions_N = jax.jit(model.apply)({"params": params}, d.test_x).argmax(-1)
  accuracy = float((predictions_N == d.test_y).mean())
  # Seeds 0 to 3 (of init and data) reach 94-97.5%: room for other CPUs' rounding.
  assert accuracy >= 0.9, accuracy
