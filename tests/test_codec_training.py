"""Codecs inside lock-step DiLoCo training: exact bytes, error feedback, NaN guard."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoupled_diloco import config as config_lib
from decoupled_diloco import train
from decoupled_diloco.algorithm import fragments
from decoupled_diloco.algorithm.syncer import Syncer
from decoupled_diloco.models import transformer
from decoupled_diloco.runtime.lockstep import LockStep
from tests.helpers import (assert_trees_equal, diloco_config, final_checkpoint, make_runtime,
                           preempt)


def tensor_sizes(c) -> list[int]:
  params = transformer.init_params(config_lib.parse(c).model, jax.random.key(0))
  return [int(np.prod(np.shape(t))) for t in fragments.flatten(params).values()]


@pytest.mark.parametrize("overrides, tensor_bytes", [
    # int4: ceil(n/2) bytes of nibbles + one float32 scale per block of 256.
    ({"codec.up": "int4"}, lambda n: math.ceil(n / 2) + 4 * math.ceil(n / 256)),
    # topk, 5% of 256 = 13 kept per block: a uint8 index and an int8 value each,
    # plus one float32 scale per block.
    ({"codec.up": "topk", "codec.topk_fraction": 0.05, "codec.topk_values": "int8"},
     lambda n: math.ceil(n / 256) * (13 * 2 + 4)),
])
@pytest.mark.slow
def test_up_fp32_down_bytes_are_the_encoded_payloads(tmp_path, overrides, tensor_bytes):
  # vocab 257 gives head/bias 257 values: an odd count and a partial second block.
  c = diloco_config(**{"model.vocab_size": 257, "train.eval_every": 3, **overrides})
  s = train.train_and_evaluate(c, str(tmp_path))
  sizes = tensor_sizes(c)
  assert 257 in sizes
  num_learners, syncs = 2, 2
  assert s["bytes_up"] == num_learners * syncs * sum(tensor_bytes(n) for n in sizes)
  # metrics.jsonl carries the same counters at every eval: one sync by step 3.
  evals = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [3, 6]
  for record, syncs_done in zip(evals, [1, 2]):
    assert record["bytes_up"] == s["bytes_up"] * syncs_done // syncs
    assert record["bytes_down"] == s["bytes_down"] * syncs_done // syncs
    assert record["outer_steps"] == syncs_done and record["rejected"] == 0
  assert evals[-1]["bytes_reduction_vs_dp"] == s["bytes_reduction_vs_dp"]
  # fp32 down: the whole global model, 4 bytes per parameter, to each learner.
  assert s["bytes_down"] == num_learners * syncs * 4 * sum(sizes)
  assert s["dp_allreduce_bytes"] == 4 * 4 * sum(sizes) * num_learners * 6
  assert s["bytes_reduction_vs_dp"] == pytest.approx(
      s["dp_allreduce_bytes"] / (s["bytes_up"] + s["bytes_down"]), rel=1e-12)
  assert s["rejected_contributions"] == {}
  assert math.isfinite(s["final_eval_loss"])
  # Without error feedback a learner keeps (and checkpoints) no residual.
  assert all("residual" not in learner for learner in final_checkpoint(tmp_path)["learners"])


@pytest.mark.slow
def test_error_feedback_residual_is_checkpointed_and_resumes_bitwise(tmp_path, monkeypatch):
  # One learner keeps this fast: each learner compiles its own inner step.
  c = diloco_config(steps=8, **{"codec.up": "int2", "codec.error_feedback": True,
                                "diloco.num_learners": 1, "train.checkpoint_every": 4})
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  straight = final_checkpoint(tmp_path / "straight")
  for learner in straight["learners"]:
    residual = learner["residual"]
    # int2 has no zero level, so the send after step 6 must leave a residual.
    assert all(np.all(np.isfinite(r)) for r in residual[0])
    assert any(np.any(r != 0) for r in residual[0])
  # Preempted after the checkpoint at 4 (written once step 5's loss vouched for it),
  # which holds step 3's residual.
  preempt(monkeypatch, LockStep, 6, c, tmp_path / "resumed")
  ckpt4 = final_checkpoint(tmp_path / "resumed")
  assert int(ckpt4["step"]) == 4
  assert any(np.any(r != 0) for learner in ckpt4["learners"] for r in learner["residual"][0])
  train.train_and_evaluate(c, str(tmp_path / "resumed"))
  assert_trees_equal(straight, final_checkpoint(tmp_path / "resumed"))


def test_nan_learner_is_rejected_and_never_merged():
  # A lossy block codec with error feedback: NaN must survive encoding and the residual.
  rt = make_runtime(diloco_config(**{"codec.up": "int2", "codec.error_feedback": True}))
  syncer = rt.team.syncer
  # A shadow syncer that only ever sees the healthy learner 0.
  shadow = Syncer(syncer.global_flat(), rt.team.fragments, outer_tx=syncer.tx,
                  merge_rule="mean", weighting="uniform", up=syncer.up, down=syncer.down,
                  num_learners=2, max_abs_delta=1e4)
  admit, merge = syncer.admit, syncer.merge
  syncer.admit = lambda c, deltas, rnd: (c.learner == 0 and shadow.receive(c, rnd),
                                         admit(c, deltas, rnd))[1]
  syncer.merge = lambda p, rnd: (shadow.merge(p, rnd), merge(p, rnd))[1]
  sick = rt.team.learners[1]
  for step in range(6):
    if step == 1:  # Poison one value of learner 1 between steps 1 and 2.
      flat = fragments.flatten(sick.params)
      key = next(iter(flat))
      flat[key] = flat[key].at[(0,) * flat[key].ndim].set(jnp.nan)
      sick.params = fragments.unflatten(flat)
    rt.train_step()
    if step == 2:  # First sync: the sick send is rejected, never merged...
      assert dict(syncer.rejected) == {"non-finite": 1}
      for glob, alone in zip(syncer.theta[0], shadow.theta[0]):
        assert np.all(np.isfinite(glob))
        np.testing.assert_array_equal(glob, alone)
      # ...and the learner restarts from the global model, optimizer state cleaned.
      for t in jax.tree.leaves(sick.params) + jax.tree.leaves(sick.opt_state):
        assert np.all(np.isfinite(t))
      # Its unsent residual (NaN after the poisoned send) is dropped.
      assert all(np.all(r == 0) for r in jax.tree.leaves(sick.residual))
  # Second sync: the recovered learner's contribution is admitted again.
  assert dict(syncer.rejected) == {"non-finite": 1}
  assert syncer.merges.tolist() == [2]
  assert not all(np.array_equal(a, b) for a, b in zip(syncer.theta[0], shadow.theta[0]))
  assert all(np.all(np.isfinite(t)) for t in jax.tree.leaves(syncer.theta))


@pytest.mark.parametrize("field,value,message", [
    ("up", "int3", "codec.up='int3'"),
    ("down", "float16", "codec.down='float16'"),
    ("up", "", "codec.up=''"),
    ("feedback_restart", "virtual", "codec.feedback_restart='virtual'"),
    ("feedback_decay", 1.5, "codec.feedback_decay=1.5"),
    ("feedback_decay", -0.1, "codec.feedback_decay=-0.1"),
    ("block_size", 0, "codec.block_size=0"),
    ("block_size", -256, "codec.block_size=-256"),
    ("topk_fraction", 0.0, "codec.topk_fraction=0.0"),
    ("topk_fraction", 1.5, "codec.topk_fraction=1.5"),
    ("topk_values", "fp16", "codec.topk_values='fp16'"),
])
def test_invalid_codec_config_names_the_field(field, value, message):
  c = diloco_config()
  c.codec[field] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    config_lib.parse(c)


def test_topk_block_limit_names_the_field():
  c = diloco_config(**{"codec.down": "topk", "codec.block_size": 70000})
  with pytest.raises(ValueError, match=r"codec\.block_size=70000 .*topk.*codec\.down='topk'"):
    config_lib.parse(c)


def test_invalid_codec_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match=r"codec\.down"):
    train.train_and_evaluate(diloco_config(**{"codec.down": "int3"}), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
