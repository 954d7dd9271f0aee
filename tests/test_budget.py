"""`train.steps` counts global batches of data: chaos runs train on as much as clean ones.

With `chaos.elastic_batch=shrink` a learner on part of its slices steps on part
of its batch; a budget of inner steps then trains a chaos run on less data than
the run it is compared with (BUILD.md, "Decoupled DiLoCo").
"""

import pytest

from decoupled_diloco import config as config_lib
from decoupled_diloco.runtime import simulated
from tests.helpers import (busy_config, chaos_overrides, compute_free, make_runtime, restore,
                           snapshot, tiny_config)


def chaotic(tmp_path, name, budget, **overrides):
  """A chaotic 4-learner run, compute-free, logging to tmp_path/name.jsonl."""
  return compute_free(busy_config(**overrides), tmp_path / f"{name}.jsonl", budget=budget)


def test_full_batches_stop_at_the_same_event_under_either_budget(tmp_path):
  runs = {}
  for budget in simulated.BUDGETS:
    sim = chaotic(tmp_path, budget, budget, **{"chaos.elastic_batch": "keep"})
    sim.run(400)
    sim.close()
    runs[budget] = (sim.report(), (tmp_path / f"{budget}.jsonl").read_text())
  assert runs["tokens"][1].count('"event": "down"')  # Failures happened.
  assert runs["tokens"] == runs["inner_steps"]


def test_shrunken_steps_count_as_their_share_of_a_batch(tmp_path):
  tokens = chaotic(tmp_path, "tokens", "tokens")
  steps = chaotic(tmp_path, "steps", "inner_steps")
  tokens.run(400)
  steps.run(400)
  assert steps.total_steps == 400 and steps.batch_parts < 400 * 2  # Some steps on 1 of 2 slices.
  assert 400 * 2 <= tokens.batch_parts < 400 * 2 + 2  # Over by less than one step.
  assert tokens.total_steps > 400


def test_tokens_budget_resumes_exactly(tmp_path):
  straight = chaotic(tmp_path, "straight", "tokens")
  straight.run(150)
  snap = snapshot(straight, tmp_path / "straight.jsonl")
  straight.run(400)
  straight.close()
  (tmp_path / "resumed.jsonl").write_text(snap.log)
  resumed = chaotic(tmp_path, "resumed", "tokens")
  restore(resumed, snap)
  resumed.run(400)
  resumed.close()
  assert ((tmp_path / "resumed.jsonl").read_text()
          == (tmp_path / "straight.jsonl").read_text())
  assert resumed.batch_parts == straight.batch_parts


@pytest.mark.slow
def test_chaos_run_trains_on_steps_times_the_global_batch():
  """Real training, slices failing often: tokens budget vs the inner-steps one."""
  steps, batch_size, seq_len, num_learners = 12, 16, 32, 2
  budget_tokens = steps * batch_size * seq_len
  learner_batch = batch_size // num_learners * seq_len
  trained = {}
  for budget in simulated.BUDGETS:
    rt = make_runtime(tiny_config("decoupled", steps=steps, **{
        **chaos_overrides(), "chaos.mtbi_chip_hours": 0.002, "diloco.num_learners": 2,
        "diloco.sync_every": 3, "sim.event_log": False, "sim.budget": budget}))
    for _ in range(steps):
      rt.train_step()
    summary = rt.summary()
    trained[budget] = (sum(summary["tokens_per_learner"]),
                       sum(l["steps"] for l in summary["learners"]))
  tokens, inner_steps = trained["tokens"], trained["inner_steps"]
  assert budget_tokens <= tokens[0] < budget_tokens + learner_batch  # Past it by < 1 step.
  assert tokens[1] > steps * num_learners  # Some steps were on half a batch...
  assert inner_steps[1] == steps * num_learners and inner_steps[0] < budget_tokens  # ...so fewer.


def test_unknown_budget_is_a_clear_error():
  with pytest.raises(ValueError, match="sim.budget='steps' is unknown"):
    config_lib.parse(tiny_config("decoupled", **{"sim.budget": "steps"}))
