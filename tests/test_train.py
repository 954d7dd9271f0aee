"""End-to-end training: loss drops, exact resumption, NaN handling, config errors."""

import json
import os

import pytest

from decoupled_diloco import config as config_lib
from decoupled_diloco import train
from tests.helpers import assert_trees_equal, final_checkpoint, preempt, tiny_config


def test_short_run_learns_and_writes_outputs(tmp_path):
  c = tiny_config(steps=60, **{"train.eval_every": 30})
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["final_eval_loss"] < 3.3  # From about 5.5 at init.
  for key in ("final_eval_bits_per_byte", "tokens", "steps", "wall_seconds",
              "tokens_per_second", "config"):
    assert key in summary
  assert summary["tokens"] == 60 * 16 * 32
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["final_eval_loss"] == summary["final_eval_loss"]
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 61))
  assert [r["step"] for r in records if "eval_loss" in r] == [30, 60]
  assert os.listdir(tmp_path / "tb")


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
  c = tiny_config(steps=12, **{"train.checkpoint_every": 4})
  train.train_and_evaluate(c, str(tmp_path / "straight"))

  preempt(monkeypatch, train.DataParallel, 6, c, tmp_path / "resumed")
  summary = train.train_and_evaluate(c, str(tmp_path / "resumed"))
  assert summary["resumed_from_step"] == 4
  assert_trees_equal(final_checkpoint(tmp_path / "straight"),
                     final_checkpoint(tmp_path / "resumed"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  c = tiny_config(steps=12, **{"train.checkpoint_every": 4})
  original = train.DataParallel.train_step

  def poisoned(self):
    out = original(self)
    return {"loss": out["loss"] * float("nan")} if self.step >= 6 else out

  monkeypatch.setattr(train.DataParallel, "train_step", poisoned)
  with pytest.raises(train.NonFiniteLossError, match="step 6.*checkpoint \\(step 4\\)"):
    train.train_and_evaluate(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


@pytest.mark.parametrize("field,value,match", [
    ("runtime", "magic", "runtime='magic'"),
    ("data.batch_size", 0, "data.batch_size=0"),
    ("diloco.overlap", 30, "diloco.overlap=30"),
    ("train.eval_every", -1, "train.eval_every=-1"),
    ("model.num_heads", 3, "model.d_model"),
])
def test_bad_config_values_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    config_lib.parse(tiny_config(**{field: value}))


def test_missing_data_path_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="data.path"):
    train.train_and_evaluate(tiny_config(**{"data.path": "/nope/*.txt"}), str(tmp_path))
