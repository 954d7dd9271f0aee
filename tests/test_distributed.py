"""The real runtime: learner and syncer processes over a file:// mailbox.

Every process a test starts has a timeout, a mailbox of its own (under
tmp_path), and is stopped by its pid when the test ends, pass or fail.
"""

import json
import os
import signal
import socket
import time

import jax
import numpy as np
import pytest

from decoupled_diloco import config as config_lib, metrics
from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.data import corpus as corpus_lib
from decoupled_diloco.runtime.lockstep import LockStep
from launch import local
from tests import helpers

pytestmark = pytest.mark.slow


def _events(path):
  return metrics.read_jsonl(path)


@pytest.fixture
def start_run(tmp_path):
  """Starts a LocalRun of a config; stops every process it started at the end."""
  runs = []

  def start(config, **kwargs):
    path = tmp_path / "config.json"
    path.write_text(config.to_json(sort_keys=True))
    run = local.LocalRun(str(tmp_path / "run"), str(path), config.diloco.num_learners,
                         echo=False, **kwargs)
    runs.append(run)
    run.start()
    return run

  yield start
  for run in runs:
    run.stop()


def _wait(run, done, timeout_s: float, what: str, killed=()):
  """Polls `done()` until true; fails (with the processes' log tails) after `timeout_s`.

  A process that fails meanwhile fails the test, unless the test `killed` it.
  """
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if (got := done()):
      return got
    for p in run.processes:
      if p.popen.poll() not in (None, 0) and p not in killed:
        tail = open(p.log_path).read()[-3000:]
        pytest.fail(f"{p.name} exited with {p.popen.poll()} while waiting for {what}:\n{tail}")
    time.sleep(0.2)
  tails = "\n".join(f"--- {p.name}\n{open(p.log_path).read()[-2000:]}" for p in run.processes)
  pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{tails}")


def _finish(run, timeout_s: float = 240):
  """Waits for every process to exit 0; fails at the first that does not."""
  _wait(run, lambda: all(p.popen.poll() == 0 for p in run.processes), timeout_s,
        "every process to finish")


def _step(box, m: int) -> int:
  lease = box.read_lease(f"learner/{m}")
  return lease.info.get("step", 0) if lease else 0


def test_lockstep_mode_matches_the_in_process_lockstep_runtime_bitwise(start_run):
  """K = M, no grace, learners wait: the two clocks drive one algorithm, to the bit."""
  overrides = {"diloco.num_learners": 2, "diloco.num_fragments": 2, "diloco.sync_every": 3,
               "diloco.quorum": 0, "diloco.grace_gamma": 0.0, "sim.learners_wait": True}
  # Islands of 4 fake devices each, in both runtimes (8 devices split in two here).
  config = helpers.tiny_config("decoupled", steps=9, **overrides)
  run = start_run(config, devices_per_learner=4)

  cfg = config_lib.parse(helpers.tiny_config("lockstep", steps=9, **overrides))
  corpus = corpus_lib.load(cfg.data.path, cfg.data.eval_percent)
  ref = LockStep(cfg, corpus.train)
  for _ in range(cfg.train.steps):
    ref.train_step()
  expected = jax.device_get(ref.eval_params())
  _finish(run)

  box = run.mailbox()
  got = {}
  for p, keys in enumerate(ref.team.fragments):
    v = box.latest_version(p)
    assert v == ref.team.syncer.version[p]
    pub = box.full_copy(p, v)
    got.update({k: t["values"] for k, t in zip(keys, pub.payload)})
  flat = fragments_lib.flatten(expected)
  for key, value in flat.items():
    np.testing.assert_array_equal(np.ravel(got[key]), np.ravel(value), err_msg=key)
  summary = json.load(open(os.path.join(run.workdir, "syncer", "summary.json")))
  assert summary["versions"] == ref.team.syncer.version.tolist()


def _chaos_config(steps):
  return helpers.tiny_config(
      "decoupled", steps=steps, **{"diloco.num_learners": 2, "diloco.num_fragments": 2,
                                   "diloco.sync_every": 4, "diloco.quorum": 1,
                                   "train.checkpoint_every": 25, "dist.lease_s": 3.0,
                                   "dist.min_step_s": 0.04})


def test_kill_9_of_a_learner_then_of_the_syncer_never_stops_the_run(start_run):
  """One run, two real faults: each is survived, and nothing is lost or applied twice."""
  steps = 500
  run = start_run(_chaos_config(steps=steps))
  box = run.mailbox()
  versions = lambda: [box.latest_version(p) for p in range(2)]

  # A learner: the other steps on and the syncer merges without it (quorum 1).
  _wait(run, lambda: _step(box, 1) >= 40, 180, "learner 1 to reach step 40")
  run.learners[1].signal(signal.SIGKILL)
  learner_killed_at = time.time()
  run.learners[1].wait(10)
  before, step0 = versions(), _step(box, 0)
  # Both must move on; the heartbeat carrying learner 0's step lags by up to lease_s / 4,
  # which can be longer than two merges take.
  _wait(run, lambda: (all(v >= b + 2 for v, b in zip(versions(), before))
                      and _step(box, 0) > step0), 120,
        "versions and learner 0 to advance without learner 1", killed=[run.learners[1]])
  run.learners[1].start()

  # The syncer: learners keep stepping; a restarted syncer goes on from the last commit.
  _wait(run, lambda: _step(box, 1) >= 60, 180, "learner 1 to step again after its restart")
  run.syncer.signal(signal.SIGKILL)
  syncer_killed_at = time.time()
  run.syncer.wait(10)
  committed, progress = versions(), [_step(box, m) for m in range(2)]
  time.sleep(3)  # At most one heartbeat (lease_s / 4) behind the learners' steps.
  assert any(_step(box, m) > s and s < steps for m, s in enumerate(progress))
  assert versions() == committed
  run.syncer.start()
  _finish(run)

  events = _events(os.path.join(run.workdir, "syncer", "events.jsonl"))
  after = [e for e in events if e["event"] == "arrive" and e["learner"] == 1
           and e["t"] > learner_killed_at]
  assert after, "learner 1 never contributed after its restart"
  starts = [e for e in _events(os.path.join(run.workdir, "learner1", "events.jsonl"))
            if e["event"] == "start"]
  assert len(starts) == 2 and starts[0]["incarnation"] != starts[1]["incarnation"]
  for m in range(2):
    summary = json.load(open(os.path.join(run.workdir, f"learner{m}", "summary.json")))
    assert summary["steps"] == steps
  published = [(e["fragment"], e["version"]) for e in events if e["event"] == "publish"]
  assert len(published) == len(set(published)), "a version was published twice"
  for p in range(2):
    mine = sorted(v for q, v in published if q == p)
    assert mine == list(range(mine[0], mine[-1] + 1)), f"fragment {p} skipped a version"
    assert mine[-1] > committed[p]
  recovered = [e for e in events if e["event"] == "recovered" and e["t"] > syncer_killed_at]
  assert recovered and recovered[0]["versions"] == committed
  summary = json.load(open(os.path.join(run.workdir, "syncer", "summary.json")))
  assert summary["epoch"] == 2 and summary["protocol"]["recoveries"] == 1


def test_a_learner_spanning_two_processes_trains_and_contributes(start_run, tmp_path):
  """jax.distributed on CPU: one island over 2 processes; process 0 alone uses the mailbox."""
  config = helpers.tiny_config("decoupled", steps=12, **{
      "diloco.num_learners": 1, "diloco.sync_every": 3, "train.checkpoint_every": 6})
  path = tmp_path / "config.json"
  path.write_text(config.to_json(sort_keys=True))
  run = local.LocalRun(str(tmp_path / "run"), str(path), 1, echo=False)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  base = run.learners[0]
  run.learners = [
      local.Process(f"learner 0.{i}", [*base.args, "--distributed",
                                       f"--coordinator_address=localhost:{port}",
                                       "--num_processes=2", f"--process_id={i}"],
                    base.env, f"{run.workdir}/logs/learner0.{i}.log", echo=False)
      for i in range(2)]
  try:
    run.start()
    _finish(run)
  finally:
    run.stop()
  summary = json.load(open(os.path.join(run.workdir, "learner0", "summary.json")))
  assert summary["steps"] == 12 and len(summary["devices"]) == 2
  events = _events(os.path.join(run.workdir, "syncer", "events.jsonl"))
  arrived = [e for e in events if e["event"] == "arrive" and e["learner"] == 0]
  assert len(arrived) == 4  # Rounds at steps 3, 6, 9, 12.
  assert run.mailbox().latest_version(0) >= 1
  aligned = [e for e in _events(os.path.join(run.workdir, "learner0", "events.jsonl"))
             if e["event"] == "align" and e["outcome"] == "applied"]
  assert aligned, "the two-process learner never aligned to a publication"
