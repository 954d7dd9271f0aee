"""The decoupled runtime resumes exactly: messages in flight, open rounds, event log."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from decoupled_diloco import checkpointing, train
from decoupled_diloco.runtime import serialization, simulated
from decoupled_diloco.runtime.decoupled import Decoupled
from tests.helpers import (ArraysRuntime, assert_trees_equal, busy_config, chaos_overrides,
                           compute_free, final_checkpoint, preempt, restore, snapshot,
                           tiny_config)


def checkpoint_meta(workdir, step):
  mgr = ocp.CheckpointManager(f"{workdir}/checkpoints", item_names=("meta",))
  meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mgr.close()
  return meta


def test_snapshot_keeps_numpy_floats_apart_from_python_floats():
  # Their round() differs (numpy's scales by 10**9 first, Python's is exact), and the
  # event log rounds times: a resumed run must log what the original would.
  x = 14.3851361025
  assert round(x, 9) != round(np.float64(x), 9)
  json_text = json.dumps(serialization.to_json({"a": [x, (np.float64(x), None)]}))
  back = serialization.from_json(json.loads(json_text))
  assert back == {"a": [x, [x, None]]}
  assert type(back["a"][0]) is float and type(back["a"][1][0]) is np.float64


@pytest.mark.parametrize("wait", [False, True])
def test_simulation_resumes_exactly_from_a_snapshot(tmp_path, wait):
  """Compute-free, over many events: snapshot after 600 steps in all, go on to 2000."""
  config = busy_config(steps=500, **{"sim.learners_wait": wait})
  simulation = lambda log: compute_free(config, log)

  straight = simulation(tmp_path / "straight.jsonl")
  straight.run(600)
  snap = snapshot(straight, tmp_path / "straight.jsonl")
  assert snap.payloads  # In flight or in inboxes.
  straight.run(2000)
  straight.close()

  with pytest.raises(ValueError, match="lost.jsonl is shorter than the"):
    simulation(tmp_path / "lost.jsonl").load_state(snap.state, serialization.MessageTable())

  (tmp_path / "resumed.jsonl").write_text(snap.log + snap.log[:1000])  # Lines past the snapshot.
  resumed = simulation(tmp_path / "resumed.jsonl")
  restore(resumed, snap)
  resumed.run(2000)
  resumed.close()
  assert ((tmp_path / "resumed.jsonl").read_text()
          == (tmp_path / "straight.jsonl").read_text())
  assert resumed.report() == straight.report()


@pytest.mark.slow
def test_interrupted_run_resumes_exactly_with_messages_in_flight(tmp_path, monkeypatch):
  # K = 1 with a grace window, tau = 1, P = 3, slice failures; latency and
  # syncer time keep messages in flight across train_step boundaries; int2
  # pseudo-gradients with error feedback put residuals in the learners' state.
  c = tiny_config("decoupled", steps=12, **{
      **chaos_overrides(), "chaos.mtbi_chip_hours": 0.002, "diloco.num_learners": 2,
      "diloco.num_fragments": 3, "diloco.sync_every": 3, "sim.latency_s": 0.4,
      "sim.syncer_seconds": 0.3, "codec.up": "int2", "codec.error_feedback": True,
      "chaos.seed": 2})
  straight = train.train_and_evaluate(c, str(tmp_path / "straight"))  # Saves only at the end.
  c.train.checkpoint_every = 4

  # The step-8 checkpoint falls where a grace window is open (sim.budget=tokens).
  preempt(monkeypatch, Decoupled, 10, c, tmp_path / "resumed")
  meta = checkpoint_meta(tmp_path / "resumed", 8)
  sim = meta["extra"]["simulation"]
  in_flight = {simulated.ARRIVE_SYNCER, simulated.ARRIVE_LEARNER}
  assert in_flight <= {kind for _, kind, _, _ in sim["heap"]}
  assert any(meta["extra"]["pending"])  # A grace window is open.
  residuals = [r for learner in final_checkpoint(tmp_path / "resumed")["learners"]
               for r in jax.tree.leaves(learner["residual"])]
  assert residuals and any(np.any(r != 0) for r in residuals)

  resumed = train.train_and_evaluate(c, str(tmp_path / "resumed"))
  assert resumed["resumed_from_step"] == 8
  assert_trees_equal(final_checkpoint(tmp_path / "straight"),
                     final_checkpoint(tmp_path / "resumed"))
  assert ((tmp_path / "resumed" / "events.jsonl").read_text()
          == (tmp_path / "straight" / "events.jsonl").read_text())
  for key in ("virtual_seconds", "goodput", "uptime", "learners", "merges_per_fragment",
              "bytes_up", "bytes_down", "rejected_contributions"):
    assert resumed[key] == straight[key], key


def test_checkpoint_of_another_runtime_is_a_clear_error(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1, runtime="lockstep")
  ckpt.save(1, ArraysRuntime())
  ckpt.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1, runtime="decoupled")
  with pytest.raises(ValueError, match="runtime='lockstep', not runtime='decoupled'"):
    ckpt.restore(1, ArraysRuntime())
  ckpt.close()
