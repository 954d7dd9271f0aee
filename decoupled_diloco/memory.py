"""A lower bound on the memory a training step needs on each device, checked up front.

Parameter shapes come from `jax.eval_shape` of the model's init (nothing is
allocated). Each device holds its replica's parameters, gradients and the two
AdamW moments (divided over the island under FSDP), and the activations that
the backward pass keeps for its share of the batch, attention scores (which
grow with seq_len squared) included. XLA's temporaries come on top, so a
configuration refused here cannot fit; one accepted may still not.
"""

import math
import os

import jax

from decoupled_diloco import config as config_lib
from decoupled_diloco.models import transformer


def num_params(c: config_lib.ModelConfig) -> int:
  shapes = jax.eval_shape(lambda: transformer.init_params(c, jax.random.key(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def bytes_per_device(cfg: config_lib.Config, num_devices: int) -> dict[str, int]:
  """Estimated bytes on each device: `state` (parameters, gradients, AdamW) and `activations`."""
  m = cfg.model
  learners = 1 if cfg.runtime == "data_parallel" else cfg.diloco.num_learners
  island_size = max(num_devices // learners, 1)
  replicas = math.ceil(learners / num_devices)  # Fewer devices than learners: they share.
  state = 4 * 4 * num_params(m) * replicas  # float32 params, grads, mu, nu.
  if cfg.islands.fsdp:
    state //= island_size
  sequences = math.ceil(cfg.data.batch_size / (learners * island_size)) * replicas
  width = 2 if m.dtype == "bfloat16" else 4
  per_layer = m.seq_len * (8 * m.d_model + 2 * m.mlp_dim) + 2 * m.num_heads * m.seq_len ** 2
  logits = 2 * m.seq_len * m.vocab_size
  activations = sequences * width * (m.num_layers * per_layer + logits)
  return {"state": state, "activations": activations}


def device_capacity() -> tuple[int, str]:
  """(bytes one device can use, its description). CPU devices share the host's RAM."""
  devices = jax.local_devices()
  stats = devices[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]), f"{devices[0].device_kind} ({len(devices)} devices)"
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram // len(devices), f"host RAM shared by {len(devices)} CPU devices"


def check_fits(cfg: config_lib.Config) -> None:
  """Refuses a configuration whose estimate is more than a device has.

  Raises:
    ValueError: naming model.seq_len and data.batch_size, with the estimate.
  """
  capacity, where = device_capacity()
  need = bytes_per_device(cfg, len(jax.local_devices()))
  total = sum(need.values())
  if total > capacity:
    gb = lambda n: f"{n / 2**30:.1f} GB"
    raise ValueError(
        f"model.seq_len={cfg.model.seq_len} with data.batch_size={cfg.data.batch_size}"
        f" needs at least {gb(total)} per device ({gb(need['state'])} parameters and"
        f" optimizer state, {gb(need['activations'])} activations), more than the"
        f" {gb(capacity)} of {where}; lower them or the model size.")
