"""Nothing a crash or a mistake does loses a record or poisons a checkpoint (issue 10).

One test (or table) per finding of the issue, each failing on the code before
it: finite divergence (3), the last good checkpoint (4), a kill -9 between a
checkpoint and the metrics flush (5), corrupt checkpoints (6), re-runs and two
runs in one workdir (7), resuming with another config (8), validation (9).
"""

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from decoupled_diloco import checkpointing, config as config_lib, divergence, optim, train
from decoupled_diloco import workdir as workdir_lib
from decoupled_diloco.algorithm import codecs, fragments, learner, merge, rounds, syncer
from decoupled_diloco.data import corpus as corpus_lib, reader
from decoupled_diloco.models import vit
from decoupled_diloco.runtime import simulated
from decoupled_diloco.tasks import lm
from tests.helpers import REPO, ArraysRuntime, tiny_config



def records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture
def no_data(monkeypatch):
  """Fails the test if the run gets as far as loading data."""
  def load(*args, **kwargs):
    raise AssertionError("the run loaded data before refusing")
  monkeypatch.setattr(corpus_lib, "load", load)
  monkeypatch.setattr(lm, "load_corpus", load)  # Not its cache of another test's read.


# Finding 3: finite divergence is caught; finding 4: the last good checkpoint is good.

def test_spike_detector():
  d = divergence.SpikeDetector(3.0)
  for loss in (5.5, 4.0, 3.0):
    assert d.check(loss) is None
  assert d.check(float("nan")) == "the loss is nan"
  assert "above 3 x its running mean" in d.check(30.0)
  mean = d.mean
  assert d.check(29.0) is not None and d.mean == mean  # Spikes never enter the mean.
  assert d.check(5.0) is None  # Below 3x: ordinary noise.
  d.load_state(divergence.SpikeState(0.01))
  assert d.check(0.2) is None  # The floor: 0.2 < 3 x 0.1.
  off = divergence.SpikeDetector(0)
  off.check(1.0)
  assert off.check(1e6) is None and off.check(float("inf")) is not None


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
  """Data-parallel with inner.lr = 30: finite, exploding losses; a checkpoint every step."""
  workdir = tmp_path_factory.mktemp("diverged")
  c = tiny_config(steps=20, **{"inner.lr": 30.0, "train.checkpoint_every": 1,
                               "train.keep_checkpoints": 1})
  with pytest.raises(divergence.DivergenceError) as error:
    train.train_and_evaluate(c, str(workdir))
  return workdir, error.value


def test_finite_divergence_stops_data_parallel(diverged):
  workdir, error = diverged
  assert isinstance(error, train.LossSpikeError)
  assert "loss spike" in str(error) and "running mean" in str(error)
  spiked = [r for r in records(workdir)]  # Steps before the spike only.
  assert all(np.isfinite(r["loss"]) and r["loss"] < 6 for r in spiked)
  assert not (workdir / "summary.json").exists()


def test_last_good_checkpoint_holds_parameters_whose_own_loss_passed(diverged):
  workdir, error = diverged
  spike_step = int(str(error).split(" at step ")[1].split(";")[0])
  # The checkpoint at step s holds the parameters after update s, whose loss is
  # step s + 1's: the newest that passed is s = spike_step - 2, kept although
  # keep_checkpoints = 1 (the one at spike_step - 1 was never written).
  assert checkpoint_steps(workdir) == [spike_step - 2]
  assert f"last good checkpoint (step {spike_step - 2})" in str(error)
  losses = {r["step"]: r["loss"] for r in records(workdir)}
  assert losses[spike_step - 1] < 3 * losses[1]  # The loss of the checkpointed parameters.


def test_final_checkpoint_is_vouched_for_by_the_final_eval(tmp_path, straight, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  summary = (workdir / "summary.json").read_text()
  monkeypatch.setattr(train.steps, "evaluate", lambda *args: {"loss": float("nan")})
  with pytest.raises(train.NonFiniteLossError, match="final eval.* at step 12.*checkpoint"
                     r" \(step 8\)"):
    train.train_and_evaluate(_config(steps=12), str(workdir))  # Raised: trains on.
  assert checkpoint_steps(workdir) == [4, 8]  # Nor the one at 12: its eval failed.
  assert (workdir / "summary.json").read_text() == summary


# Finding 5: a kill -9 right after a checkpoint loses no record.

def _config(steps=8):
  return tiny_config(steps=steps, **{"train.checkpoint_every": 4})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One uninterrupted run: 8 steps, checkpoints at 4 and 8."""
  workdir = tmp_path_factory.mktemp("straight")
  summary = train.train_and_evaluate(_config(), str(workdir))
  return workdir, summary


_KILL_AFTER_CHECKPOINT = """
import os, runpy, signal
import orbax.checkpoint as ocp
save = ocp.CheckpointManager.save
def save_then_die(self, *args, **kwargs):
  save(self, *args, **kwargs)
  self.wait_until_finished()
  os.kill(os.getpid(), signal.SIGKILL)  # The checkpoint is committed; nothing else runs.
ocp.CheckpointManager.save = save_then_die
runpy.run_module("decoupled_diloco.main", run_name="__main__")
"""


@pytest.mark.slow
def test_kill_after_checkpoint_keeps_every_metrics_record(tmp_path, straight):
  config_file = tmp_path / "config.py"
  config_file.write_text("from tests.helpers import tiny_config\n\n\ndef get_config(arg=None):\n"
                         "  return tiny_config(steps=8, **{'train.checkpoint_every': 4})\n")
  workdir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_NUM_CPU_DEVICES": "8"}  # As conftest.py.
  proc = subprocess.Popen(
      [sys.executable, "-c", _KILL_AFTER_CHECKPOINT, f"--config={config_file}",
       f"--workdir={workdir}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  try:
    _, stderr = proc.communicate(timeout=240)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
  assert checkpoint_steps(workdir) == [4]

  summary = train.train_and_evaluate(_config(), str(workdir))
  assert summary["resumed_from_step"] == 4
  assert ((workdir / "metrics.jsonl").read_text()
          == (straight[0] / "metrics.jsonl").read_text())


# Finding 6: a bad checkpoint falls back to the one before it.

def _two_checkpoints(workdir) -> checkpointing.Checkpointer:
  ckpt = checkpointing.Checkpointer(str(workdir), keep=2, runtime="data_parallel")
  ckpt.save(1, ArraysRuntime(1))
  ckpt.save(2, ArraysRuntime(2))
  return ckpt


def _largest_file(directory) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_bit(path):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x10
    f.seek(0)
    f.write(data)


def _rewrite_one_value(step_dir):
  """A flipped bit that decodes fine: the stored `w` differs in one bit, the meta not."""
  tree = ArraysRuntime(2).tree
  tree["w"] = tree["w"].copy()
  tree["w"].view(np.uint32)[3, 5] ^= 1 << 7
  shutil.rmtree(os.path.join(step_dir, "default"))
  writer = ocp.StandardCheckpointer()
  writer.save(os.path.join(step_dir, "default"), tree)
  writer.wait_until_finished()
  writer.close()


@pytest.mark.parametrize("damage", ["truncate", "flip_bit", "silent_bit", "meta"])
def test_bad_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
  _two_checkpoints(tmp_path).close()
  step_dir = str(tmp_path / "checkpoints" / "2")
  if damage == "truncate":
    _truncate(_largest_file(os.path.join(step_dir, "default")))
  elif damage == "flip_bit":
    _flip_bit(_largest_file(os.path.join(step_dir, "default")))
  elif damage == "silent_bit":
    _rewrite_one_value(step_dir)
  else:
    _truncate(_largest_file(os.path.join(step_dir, "meta")))

  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2, runtime="data_parallel")
  rt = ArraysRuntime(0)
  with caplog.at_level(logging.WARNING):
    ckpt.restore_latest(rt)
  np.testing.assert_array_equal(rt.tree["w"], ArraysRuntime(1).tree["w"])
  assert int(rt.tree["step"]) == 1
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "checkpoint 2:" in warnings[0], warnings
  if damage == "silent_bit":
    assert "fail their checksum" in warnings[0] and "/w" in warnings[0]
  assert ckpt.latest_step() == 1  # The bad one is moved aside: step 2 can be written again.
  assert os.listdir(tmp_path / "checkpoints_failed") == ["2"]
  ckpt.save(2, ArraysRuntime(2))
  ckpt.close()


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
  _two_checkpoints(tmp_path).close()
  for step in ("1", "2"):
    _truncate(_largest_file(str(tmp_path / "checkpoints" / step / "default")))
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2, runtime="data_parallel")
  with pytest.raises(checkpointing.BadCheckpointError, match="no checkpoint .* is intact"):
    ckpt.restore_latest(ArraysRuntime(0))
  ckpt.close()


def test_training_resumes_from_the_previous_checkpoint_when_the_latest_is_bad(
    tmp_path, straight, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  _truncate(_largest_file(str(workdir / "checkpoints" / "8" / "default")))
  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(_config(steps=12), str(workdir))  # Raised: goes on.
  assert summary["resumed_from_step"] == 4 and summary["steps"] == 12
  assert any("checkpoint 8:" in r.getMessage() for r in caplog.records)
  steps = [r["step"] for r in records(workdir) if "loss" in r]
  assert steps == list(range(1, 13))  # The records past step 4 were trimmed, then rewritten.
  assert [r["step"] for r in records(workdir) if "eval_loss" in r] == [12]


# Finding 7: a finished run is left alone; one run at a time in a workdir.

def test_rerunning_a_finished_run_changes_nothing(tmp_path, straight, no_data):
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  before = {name: (workdir / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
  summary = train.train_and_evaluate(_config(), str(workdir))
  assert summary == json.loads(before["summary.json"])
  assert summary["resumed_from_step"] == 0 and summary["tokens_per_second"] > 0
  for name, content in before.items():
    assert (workdir / name).read_bytes() == content, name


def test_second_run_in_the_same_workdir_stops(tmp_path, no_data):
  with workdir_lib.Lock(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
      train.train_and_evaluate(_config(), str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize("has_flock", [True, False])
def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch, has_flock):
  if not has_flock:
    monkeypatch.setattr(workdir_lib, "_try_flock", lambda fd: False)
  lock_file = tmp_path / workdir_lib.LOCK_NAME
  lock_file.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
  with workdir_lib.Lock(str(tmp_path)):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert not lock_file.exists()


def test_lock_of_a_live_process_is_respected_without_flock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, "_try_flock", lambda fd: False)
  lock_file = tmp_path / workdir_lib.LOCK_NAME
  for holder in ({"pid": os.getppid(), "host": socket.gethostname()},
                 {"pid": 1, "host": "another-host"}):
    lock_file.write_text(json.dumps(holder))
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {holder['pid']}"):
      workdir_lib.Lock(str(tmp_path))
    assert json.loads(lock_file.read_text()) == holder


# Finding 8: resuming with a config of another shape names the fields.

class Unloadable(ArraysRuntime):
  def __init__(self):
    super().__init__(0)

  def state(self):
    return {"x": np.zeros(3, np.float32)}

  def load_state(self, tree):
    raise AssertionError("loaded")


@pytest.mark.parametrize("runtime,field,old,new", [
    ("data_parallel", "model.d_model", 64, 32),
    ("decoupled", "diloco.num_learners", 2, 4),
    ("decoupled", "diloco.num_fragments", 2, 3),
    ("decoupled", "codec.up", "int4", "e3m0"),
    ("lockstep", "codec.up", "fp32", "int8"),
])
def test_resuming_with_another_config_shape_names_the_fields(tmp_path, no_data, runtime,
                                                             field, old, new):
  base = {"diloco.num_learners": 2} if runtime != "data_parallel" else {}
  first = config_lib.parse(tiny_config(runtime, steps=8, **{**base, field: old}))
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1, runtime=runtime,
                                    fingerprint=checkpointing.fingerprint(first))
  ckpt.save(4, Unloadable())
  ckpt.close()
  with pytest.raises(checkpointing.ConfigMismatchError,
                     match=f"{field}: {old!r} -> {new!r}"):
    train.train_and_evaluate(tiny_config(runtime, steps=8, **{**base, field: new}),
                             str(tmp_path))


def test_a_checkpoint_written_before_a_field_existed_resumes_at_its_default(tmp_path, no_data):
  """A model field added later (the checkpoint's fingerprint lacks it) is its default."""
  cfg = config_lib.parse(tiny_config("decoupled", steps=8, **{"diloco.num_learners": 2}))
  older = checkpointing.fingerprint(cfg)
  del older["model.num_experts"]  # As written before mixtures of experts.
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1, runtime="decoupled",
                                    fingerprint=older)
  ckpt.save(4, Unloadable())
  now = checkpointing.Checkpointer(str(tmp_path), keep=1, runtime="decoupled",
                                   fingerprint=checkpointing.fingerprint(cfg))
  now.check_config()  # At its default: no mismatch.
  other = checkpointing.fingerprint(dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, num_experts=4)))
  with pytest.raises(checkpointing.ConfigMismatchError, match="model.num_experts: 8 -> 4"):
    checkpointing.Checkpointer(str(tmp_path), keep=1, runtime="decoupled",
                               fingerprint=other).check_config()
  for c in (ckpt, now):
    c.close()


# Finding 9: validation at parse time, before any data or device work.

@pytest.mark.parametrize("field,value,match", [
    ("outer.lr", 0.0, r"outer.lr=0.0 must be in \(0, inf\)"),
    ("outer.lr", -0.5, "outer.lr=-0.5"),
    ("outer.momentum", 5.0, r"outer.momentum=5.0 must be in \[0, 1\)"),
    ("inner.b1", 1.5, "inner.b1=1.5"),
    ("inner.b2", -0.1, "inner.b2=-0.1"),
    ("inner.warmup_steps", -5, "inner.warmup_steps=-5"),
    ("inner.weight_decay", -1.0, "inner.weight_decay=-1.0"),
    ("inner.lr", float("nan"), "inner.lr=nan must be a finite number"),
    ("inner.lr", float("inf"), "inner.lr=inf must be a finite number"),
    ("diloco.max_abs_delta", float("nan"), "diloco.max_abs_delta=nan"),
    ("seed", -1, "seed=-1"),
    ("chaos.seed", -3, "chaos.seed=-3"),
    ("train.spike_factor", 0.5, "train.spike_factor=0.5"),
    ("outer.name", "nesterof", "outer.name='nesterof' is unknown"),
    ("diloco.merge", "rdaa", "diloco.merge='rdaa' is unknown"),
    ("diloco.weighting", "token", "diloco.weighting='token' is unknown"),
    ("diloco.fragmentation", "layers", "diloco.fragmentation='layers' is unknown"),
])
def test_bad_values_are_refused_at_parse_time(field, value, match):
  with pytest.raises(ValueError, match=match):
    config_lib.parse(tiny_config(**{field: value}))


def test_every_choice_is_a_literal_with_the_names_its_module_knows():
  """config.py imports none of these modules, so their names are compared here."""
  assert config_lib.choice_fields() == {
      "runtime": ("data_parallel", "lockstep", "decoupled"),
      "model.dtype": ("float32", "bfloat16"),
      "outer.name": optim.OUTER_OPTIMIZERS,
      "diloco.fragmentation": fragments.STRATEGIES,
      "diloco.merge": merge.MERGE_RULES,
      "diloco.weighting": merge.WEIGHTINGS,
      "diloco.late": rounds.LATE_POLICIES,
      "diloco.staleness_weighting": syncer.STALENESS_WEIGHTINGS,
      "diloco.norm_bound": syncer.NORM_BOUNDS,
      "codec.up": codecs.CODEC_NAMES,
      "codec.down": codecs.CODEC_NAMES,
      "codec.feedback_restart": learner.FEEDBACK_RESTARTS,
      "codec.topk_values": codecs.TOPK_VALUE_DTYPES,
      "sim.budget": simulated.BUDGETS,
      "chaos.rejoin_optimizer": ("fresh", "kept"),
      "chaos.elastic_batch": ("shrink", "keep"),
      "model.pool": vit.POOLS,
      "model.posemb": vit.POSEMBS,
      "data.sharding": reader.SHARDINGS,
  }

  def strings(tree, prefix=""):
    for name, value in tree.items():
      if isinstance(value, dict):
        yield from strings(value, f"{prefix}{name}.")
      elif isinstance(value, str):
        yield prefix + name
  free_text = set(strings(config_lib.base_config().to_dict())) - set(config_lib.choice_fields())
  # Any other string would be a choice nobody checks. Tasks and models are open
  # (plugins): the registry refuses unknown names (tests/test_tasks.py).
  assert free_text == {"data.path", "task.name", "task.module", "model.name"}


def test_every_numeric_field_has_a_range_and_refuses_nan():
  fields = config_lib.numeric_fields()
  assert set(fields) <= set(config_lib.RANGES), set(fields) - set(config_lib.RANGES)
  for name, kind in fields.items():
    if kind is float:
      with pytest.raises(ValueError, match=f"{name}=nan"):
        config_lib.parse(tiny_config(**{name: float("nan")}))


def test_unknown_field_on_the_command_line_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "decoupled_diloco.main", "--config=experiments/data_parallel.py",
       f"--workdir={tmp_path}", "--config.train.bogus=1"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "train has no field 'bogus'" in proc.stderr


def test_unwritable_workdir_is_refused_before_data(tmp_path, no_data):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match="--workdir=.* is not writable"):
    train.train_and_evaluate(_config(), str(tmp_path / "a_file" / "run"))


def test_sequence_that_cannot_fit_is_refused_with_the_estimate(tmp_path, no_data):
  with pytest.raises(ValueError, match=r"task 'lm_bytes' with data.batch_size=16 needs"
                     r" [\d.]+ GB per device for one inner step"):
    train.train_and_evaluate(tiny_config(**{"model.seq_len": 100_000_000}), str(tmp_path))


def test_garbage_npy_names_data_path(tmp_path):
  path = tmp_path / "tokens.npy"
  path.write_bytes(b"not an array at all" * 10)
  with pytest.raises(ValueError, match="data.path=.*tokens.npy.*not a readable .npy"):
    corpus_lib.load(str(path))
