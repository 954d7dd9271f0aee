"""The real runtime: learner and syncer processes over a mailbox (S3 or file://).

What a process adds to the in-process runs (tests/test_dist_inprocess.py,
tests/test_dist_runtime.py): real kill -9s, wall time, threads, orbax
checkpoints, and one learner spanning two processes. Every process a test
starts has a timeout, a mailbox of its own (a fresh bucket on the test session's
S3 server, or under tmp_path), and is stopped by its pid when the test ends,
pass or fail.
"""

import json
import os
import signal
import socket
import time

import pytest

from decoupled_diloco import config as config_lib, metrics
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


def _chaos_config(steps):
  return helpers.tiny_config(
      "decoupled", steps=steps, **{"diloco.num_learners": 2, "diloco.num_fragments": 2,
                                   "diloco.sync_every": 4, "diloco.quorum": 1,
                                   "train.checkpoint_every": 25, "dist.lease_s": 3.0,
                                   "dist.min_step_s": 0.02})


@pytest.mark.slow
def test_kill_9_of_a_learner_then_of_the_syncer_never_stops_the_run(start_run, s3_url):
  """One run over S3 (moto), two real faults: each is survived, and nothing is lost or
  applied twice.

  The learner comes back from its checkpoint (step 25 or a later multiple), more than
  `dist.resume_max_versions` behind: it resumes, then rejoins. The syncer comes back with
  the state it had committed: the versions, merge counts and open rounds the mailbox
  holds, which are its last publications'.
  """
  steps = 500
  config = _chaos_config(steps=steps)
  cfg = config_lib.parse(config)
  run = start_run(config, mailbox_url=s3_url)
  box = run.mailbox()
  versions = lambda: [box.latest_version(p) for p in range(2)]

  # A learner: the other steps on and the syncer merges without it (quorum 1).
  _wait(run, lambda: _step(box, 1) >= 40, 180, "learner 1 to reach step 40")
  run.learners[1].signal(signal.SIGKILL)
  learner_killed_at = time.time()
  run.learners[1].wait(10)
  before, step0 = versions(), _step(box, 0)
  # Both must move on; the heartbeat carrying learner 0's step lags by up to lease_s / 4,
  # which can be longer than two merges take. Past `resume_max_versions` more versions
  # the restarted learner rejoins however late in its last checkpoint interval it died.
  _wait(run, lambda: (all(v > b + cfg.dist.resume_max_versions
                          for v, b in zip(versions(), before))
                      and _step(box, 0) > step0), 120,
        "versions and learner 0 to advance without learner 1", killed=[run.learners[1]])
  run.learners[1].start()

  # The syncer: learners keep stepping; a restarted syncer goes on from the last commit.
  _wait(run, lambda: _step(box, 1) >= 60, 180, "learner 1 to step again after its restart")
  run.syncer.signal(signal.SIGKILL)
  syncer_killed_at = time.time()
  run.syncer.wait(10)
  committed, progress = versions(), [_step(box, m) for m in range(2)]
  outer = [box.outer_state(p, v)[0] for p, v in enumerate(committed)]
  rounds = [box.publication(p, v)[0].round for p, v in enumerate(committed)]
  time.sleep(3)  # At most one heartbeat (lease_s / 4) behind the learners' steps.
  assert any(_step(box, m) > s and s < steps for m, s in enumerate(progress))
  assert versions() == committed
  run.syncer.start()
  _finish(run)

  events = _events(os.path.join(run.workdir, "syncer", "events.jsonl"))
  after = [e for e in events if e["event"] == "arrive" and e["learner"] == 1
           and e["t"] > learner_killed_at]
  assert after, "learner 1 never contributed after its restart"
  learner1 = _events(os.path.join(run.workdir, "learner1", "events.jsonl"))
  starts = [i for i, e in enumerate(learner1) if e["event"] == "start"]
  assert len(starts) == 2 and learner1[starts[0]]["incarnation"] != learner1[starts[1]]["incarnation"]
  killed_at_step = max(e["step"] for e in learner1[:starts[1]] if e["event"] == "step")
  resumed = [e for e in learner1[starts[1]:] if e["event"] == "resume"]
  rejoined = [e for e in learner1[starts[1]:] if e["event"] == "rejoin"]
  assert [e["step"] % 25 for e in resumed] == [0] and 0 < resumed[0]["step"] < killed_at_step
  assert len(rejoined) == 1 and rejoined[0]["versions_behind"] > cfg.dist.resume_max_versions
  assert not [e for e in learner1[:starts[1]] if e["event"] in ("resume", "rejoin")]
  for m in range(2):
    summary = json.load(open(os.path.join(run.workdir, f"learner{m}", "summary.json")))
    assert summary["steps"] == steps
  published = [(e["fragment"], e["version"]) for e in events if e["event"] == "publish"]
  assert len(published) == len(set(published)), "a version was published twice"
  for p in range(2):
    mine = sorted(v for q, v in published if q == p)
    # A syncer killed between writing a publication and logging it leaves that one
    # version (the commit the restarted syncer recovered) out of the log, not the mailbox.
    missing = sorted(set(range(mine[0], mine[-1] + 1)) - set(mine))
    assert missing in ([], [committed[p]]), f"fragment {p} skipped versions {missing}"
    assert mine[-1] > committed[p]
  recovered = [e for e in events if e["event"] == "recovered" and e["t"] > syncer_killed_at]
  assert len(recovered) == 1 and recovered[0]["versions"] == committed
  assert recovered[0]["merges"] == committed  # One merge per version, none lost or redone.
  assert recovered[0]["open"] == [o["open"] for o in outer]
  for p in range(2):
    # The commit the mailbox holds is the killed syncer's last publication (or, killed
    # between writing it and logging it, the one after its last logged).
    last = [e for e in events if e["event"] == "publish" and e["fragment"] == p
            and e["t"] < syncer_killed_at][-1]
    assert last["version"] in (committed[p], committed[p] - 1)
    assert outer[p]["published"] == rounds[p] and outer[p]["open"] > rounds[p]
    if last["version"] == committed[p]:
      assert last["round"] == rounds[p]
    first = [e for e in events if e["event"] == "publish" and e["fragment"] == p
             and e["t"] > syncer_killed_at and e["round"] >= 0][0]
    assert first["version"] == committed[p] + 1 and first["round"] >= outer[p]["open"]
  summary = json.load(open(os.path.join(run.workdir, "syncer", "summary.json")))
  assert summary["epoch"] == 2 and summary["protocol"]["recoveries"] == 1
  assert summary["merges_per_fragment"] == summary["versions"]


@pytest.mark.slow
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
