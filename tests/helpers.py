"""Small configs for fast end-to-end tests."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from decoupled_diloco import config as config_lib


def tiny_config(runtime="data_parallel", steps=20, **overrides):
  """A small, fast model and run; `overrides` are dotted field paths."""
  c = config_lib.base_config()
  c.runtime = runtime
  c.model.update(num_layers=1, d_model=64, num_heads=2, mlp_dim=128, seq_len=32)
  c.data.batch_size = 16
  c.train.update(steps=steps, log_every=5, eval_every=0, eval_batches=2,
                 checkpoint_every=0)
  c.inner.warmup_steps = 2
  for key, value in overrides.items():
    section, field = key.split(".") if "." in key else (None, key)
    (c[section] if section else c)[field] = value
  return c


def final_checkpoint(workdir):
  """The latest checkpoint in `workdir` as a tree of numpy arrays."""
  mgr = ocp.CheckpointManager(f"{workdir}/checkpoints")
  tree = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())
  mgr.close()
  return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def preempt(monkeypatch, runtime_cls, at_step: int, config, workdir) -> None:
  """Runs `config` in `workdir` until the runtime reaches `at_step`, then kills it.

  The run is interrupted the way a preemption would (mid-loop, after its
  latest checkpoint); re-running `train_and_evaluate` on `workdir` resumes it.
  """
  from decoupled_diloco import train  # pylint: disable=g-import-not-at-top
  original = runtime_cls.train_step

  def crash(self):
    if self.step == at_step:
      raise KeyboardInterrupt("simulated preemption")
    return original(self)

  with monkeypatch.context() as patch:
    patch.setattr(runtime_cls, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(workdir))
