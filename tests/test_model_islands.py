"""Model shapes, presets, and island meshes on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from decoupled_diloco import config as config_lib
from decoupled_diloco import islands as islands_lib
from decoupled_diloco.tasks import base as tasks_base
from decoupled_diloco.models import transformer
from tests import helpers


def _task(**model):
  """The lm_bytes task on the fixture corpus with `model` fields."""
  c = helpers.tiny_config()
  c.model.update(**{**config_lib.PRESETS["tiny"], **model})
  return helpers.task(c)


def test_tiny_preset_shapes_and_size():
  c = config_lib.ModelConfig(**config_lib.PRESETS["tiny"])
  params = transformer.init_params(c, jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(params))
  v, l, d, f = c.vocab_size, c.seq_len, c.d_model, c.mlp_dim
  # A block: two LayerNorms (scale and bias), q, k, v and out projections without
  # bias (D x D each), and the MLP's two biased dense layers.
  block = 2 * 2 * d + 4 * d * d + (d * f + f) + (f * d + d)
  # Token and position embeddings, the blocks, the final LayerNorm, the biased head.
  assert n == v * d + l * d + c.num_layers * block + 2 * d + (d * v + v) == 477_952, n
  logits = transformer.Transformer(c).apply({"params": params}, jnp.zeros((3, 128), jnp.int32))
  assert logits.shape == (3, 128, 256) and logits.dtype == jnp.float32
  assert params["embed"]["embedding"].shape == (256, 128)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_loss_at_init_is_near_uniform(name):
  task = _task(name=name, seq_len=16)
  params = task.init(jax.random.key(0))
  batch = {"tokens": jax.random.randint(jax.random.key(1), (4, 17), 0, 256)}
  loss, _ = jax.jit(task.loss)(params, batch)
  assert abs(float(loss) - np.log(256)) < 0.2 and task.chance_loss == np.log(256)


def test_causal_masking():
  c = config_lib.ModelConfig(seq_len=8, num_layers=1, d_model=32, num_heads=2, mlp_dim=64)
  params = transformer.init_params(c, jax.random.key(0))
  m = transformer.Transformer(c)
  x = jnp.arange(8)[None] % 256
  y = x.at[0, 5].set(99)
  a, b = m.apply({"params": params}, x), m.apply({"params": params}, y)
  np.testing.assert_allclose(a[0, :5], b[0, :5], atol=1e-6)
  assert not np.allclose(a[0, 5:], b[0, 5:])


@pytest.mark.parametrize("field,value", [("d_model", 130), ("num_layers", 0), ("dtype", "fp16")])
def test_bad_model_config(field, value):
  with pytest.raises(ValueError, match=f"model.{field}"):
    config_lib.ModelConfig(**{field: value})


def test_two_islands_of_four_devices():
  isl = islands_lib.make_islands(2)
  assert [i.size for i in isl] == [4, 4]
  ids = [{d.id for d in i.mesh.devices.flat} for i in isl]
  assert ids[0].isdisjoint(ids[1]) and len(ids[0] | ids[1]) == 8
  batch = jax.device_put(np.zeros((8, 17), np.int32), isl[1].batch)
  assert {d.id for d in batch.devices()} == ids[1]
  shard_rows = {s.data.shape[0] for s in batch.addressable_shards}
  assert shard_rows == {2}  # 8 rows split over 4 devices.



def test_each_island_runs_the_shared_compiled_step_on_its_own_devices():
  """conftest keys compiled programs without their devices: island 1 loads island 0's
  executable, and must still compute on its own devices, and compute the same."""
  task = _task(name="gpt", seq_len=16, num_layers=1)
  params = task.init(jax.random.key(0))
  batch = np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, 256))
  isl = islands_lib.make_islands(2, axes=tasks_base.param_axes(task))
  loss = jax.jit(lambda p, b: task.loss(p, {"tokens": b})[0])
  outs = []
  for island in isl:
    p = jax.device_put(params, island.shardings(params))
    out = jax.jit(loss, in_shardings=(island.shardings(params), island.batch),
                  out_shardings=island.replicated)(p, jax.device_put(batch, island.batch))
    assert out.devices() == set(island.mesh.devices.flat)
    outs.append(float(out))
  assert outs[0] == outs[1]

def test_logical_axes_pick_the_mesh_axes():
  task = _task()
  params = task.init(jax.random.key(0))
  axes = tasks_base.param_axes(task)
  rep = islands_lib.make_islands(2, axes=axes)[0]
  assert dict(rep.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1}
  emb = rep.put(params)["embed"]["embedding"]
  assert emb.sharding.is_fully_replicated and len(emb.devices()) == 4
  # FSDP over all 4 devices: each kernel split along its `embed` axis.
  fsdp = islands_lib.make_islands(2, fsdp=-1, axes=axes)[0]
  assert dict(fsdp.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
  p = fsdp.put(params)
  shards = lambda x: {s.data.shape for s in x.addressable_shards}
  assert shards(p["block_0"]["mlp_in"]["kernel"]) == {(32, 512)}  # [embed 128, mlp 512].
  # 2-way FSDP x 2-way tensor: `embed` over fsdp, `mlp` and `heads` over tensor.
  both = islands_lib.make_islands(2, fsdp=2, tensor=2, axes=axes)[0]
  p = both.put(params)
  assert shards(p["block_0"]["mlp_in"]["kernel"]) == {(64, 256)}
  assert shards(p["block_0"]["mlp_in"]["bias"]) == {(256,)}
  q = params["block_0"]["attn"]["query"]["kernel"]  # [embed, heads, head_dim].
  assert shards(p["block_0"]["attn"]["query"]["kernel"]) == {(64, q.shape[1] // 2, q.shape[2])}
  assert shards(p["block_0"]["attn_norm"]["scale"]) == {(128,)}  # `norm`: whole.
  assert shards(p["embed"]["embedding"]) == {(128, 64)}  # [vocab 256, embed 128].
  # An optimizer state's moments follow their parameters; its step count is replicated.
  state = both.put(optax.adam(1e-3).init(params))
  assert state[0].mu["block_0"]["mlp_in"]["kernel"].sharding.spec == (
      p["block_0"]["mlp_in"]["kernel"].sharding.spec)
  assert state[0].count.sharding.is_fully_replicated
  # A fragment's tensors (bases, residuals) by their parameter paths.
  paths = ["block_0/mlp_in/kernel", "final_norm/scale"]
  frag = both.put([np.zeros((128, 512), np.float32), np.zeros((128,), np.float32)], paths=paths)
  assert [shards(t) for t in frag] == [{(64, 256)}, {(128,)}]
  # A dimension its mesh axis does not divide stays whole.
  three = islands_lib.make_islands(1, tensor=3, axes={"w": ("embed", "mlp")},
                                   devices=jax.devices()[:3])[0]
  assert three.sharding("w", (6, 4)).spec == P(None, None)
  assert three.sharding("w", (6, 9)).spec == P(None, "tensor")


@pytest.mark.parametrize("sizes", [dict(fsdp=3), dict(tensor=0), dict(fsdp=-1, tensor=-1),
                                   dict(expert=True)])
def test_bad_island_sizes_are_refused(sizes):
  with pytest.raises(ValueError, match="islands"):
    islands_lib.make_islands(2, **sizes)


@pytest.mark.parametrize("layout", ["fsdp", "tensor"])
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_a_four_device_island_matches_one_device(name, layout):
  """2-way data x 2-way FSDP or tensor parallelism (fake CPU devices) vs one device."""
  task = _task(name=name, seq_len=16, num_layers=1, num_kv_heads=2)
  params = task.init(jax.random.key(0))
  batch = {"tokens": np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, 256))}
  axes = tasks_base.param_axes(task)
  one = islands_lib.make_islands(1, axes=axes, devices=jax.devices()[:1])[0]
  four = islands_lib.make_islands(2, axes=axes, **{layout: 2})[0]
  assert four.mesh.shape["data"] == 2 and four.mesh.shape[layout] == 2
  out = [helpers.sgd_step_on(task, island, params, batch) for island in (one, four)]
  sharded = four.shardings(params)
  assert any(layout in str(s.spec) for s in jax.tree.leaves(sharded))
  assert abs(out[0][1] - out[1][1]) < 1e-5
  for path, a in out[0][0].items():
    np.testing.assert_allclose(a, out[1][0][path], atol=1e-5, err_msg=path)
    assert np.abs(a).max() > 0, path  # Every tensor has a gradient to compare.


def test_more_islands_than_devices_share_devices():
  isl = islands_lib.make_islands(3, devices=jax.devices()[:2])
  assert [next(iter(i.mesh.devices.flat)).id for i in isl] == [0, 1, 0]
  with pytest.raises(ValueError, match="not divisible"):
    islands_lib.check_batch(islands_lib.make_islands(2)[0], 6)
