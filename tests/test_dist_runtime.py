"""The real runtime's failure paths, in one process under fake clocks.

Learners and the syncer are the `LearnerRuntime` and `SyncerService` that
processes run, on a `memory://` mailbox, driven by tests/dist_harness.py;
tests of the syncer alone write the learners' messages and leases by hand
through the same mailbox (one test starts a process: what it tests is how a
learner process exits). The tests share a few configs (fp32 or int8
downloads, two learners; the same number of steps) so that the session's
compilation cache serves their programs after the first compile.

Covered elsewhere: lock-step runs equal LockStep bitwise, and the simulator
and this runtime decide the same merges, late verdicts, re-phases and
rejoins (tests/test_dist_inprocess.py); the mailbox's primitives (create-once,
leases, fencing of a paused syncer, GC arithmetic, a throttled link in real
time) are tests/test_mailbox.py's.
"""

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import jax
import numpy as np
import pytest

from decoupled_diloco import config as config_lib, metrics
from decoupled_diloco.algorithm import codecs, protocol as protocol_lib
from decoupled_diloco.algorithm.messages import FULL, Contribution
from decoupled_diloco.algorithm.rounds import MAX_ROUNDS_AHEAD
from decoupled_diloco.runtime.dist.learner import LINK_FILE, SYNCER_LEASE, learner_lease
from decoupled_diloco.runtime.dist.mailbox import Mailbox
from decoupled_diloco.runtime.dist.syncer import Fenced, SyncerService
from tests import helpers
from tests.dist_harness import SECRET, Clock, InProcessRun

# P = 2, H = 2: offsets 0 and 1, so every step sends one fragment; the first
# rounds are fragment 0's round 1 (position 2) and fragment 1's round 0 (position 1).
_BASE = {"diloco.num_learners": 2, "diloco.num_fragments": 2, "diloco.sync_every": 2,
         "diloco.overlap": 1, "diloco.quorum": 1, "diloco.grace_gamma": 0.0}
_INT8 = {"codec.down": "int8"}


def _config(steps=24, **overrides):
  return helpers.tiny_config("decoupled", steps=steps, **{**_BASE, **overrides})


def _events(path, kind=None):
  return [e for e in metrics.read_jsonl(str(path)) if kind is None or e["event"] == kind]


def _host(tree):
  """Host copies of every array of `tree` (what a checkpoint or a snapshot holds)."""
  return jax.tree.map(np.array, jax.device_get(tree))


def _assert_holds(tensors, full_copy):
  """`tensors` are, bit for bit, the fragment that `full_copy` (a publication) carries."""
  assert full_copy.base_version == FULL and len(tensors) == len(full_copy.payload)
  for t, sent in zip(_host(tensors), full_copy.payload):
    np.testing.assert_array_equal(np.ravel(t), np.ravel(sent["values"]))


class Run(InProcessRun):
  """The harness, with learner checkpoints."""

  def checkpoint(self, m: int) -> dict:
    """Learner m's state now, as its checkpoint holds it (host copies; `extra`: its
    `extra_state()`, the schedule)."""
    rt = self.learners[m]
    return {**_host(rt.state()), "extra": rt.extra_state()}

  def restart(self, m: int, state=None):
    """As the harness's, with `state` put on the new learner's devices as orbax restores it."""
    rt = super().restart(m)
    if state is not None:
      state = dict(state)
      payloads, meta = state.pop("extra")
      target = rt.state()
      rt.load_state(jax.tree.map(
          lambda t, x: jax.device_put(x, t.sharding) if isinstance(t, jax.Array) else x,
          target, state))
      rt.load_extra_state(payloads, meta)
    return rt

  def events(self, name: str, kind=None) -> list[dict]:
    return _events(os.path.join(self.root, name, "events.jsonl"), kind)


class SyncerAlone:
  """A `SyncerService` on a fresh mailbox; the learners are messages and leases by hand."""

  def __init__(self, config, root):
    self.cfg, self.root = config_lib.parse(config), str(root)
    self.task = helpers.task(self.cfg)
    self.url = f"memory://syncer_alone_{uuid.uuid4().hex}/"
    self.clock = Clock()
    self.box = Mailbox(self.url, SECRET, clock=self.clock)
    self.svc = self.service("syncer", self.clock)
    assert self.svc.start()
    self.tokens_per_step = self.svc.syncer.max_tokens_per_step

  def service(self, name: str, clock: Clock) -> SyncerService:
    workdir = os.path.join(self.root, name)
    os.makedirs(workdir, exist_ok=True)
    return SyncerService(self.cfg, self.task, workdir,
                         Mailbox(self.url, SECRET, clock=clock), clock=clock, sleep=clock.sleep,
                         threaded=False)

  def send(self, m, p, rnd, *, base_version=0, steps=2, step_s=1.0, seed=None) -> Contribution:
    """Learner m's contribution to round `rnd` of fragment p: a small random delta."""
    rng = np.random.default_rng(seed if seed is not None else 1000 * m + 10 * p + rnd)
    deltas = [1e-3 * rng.standard_normal(np.shape(t)).astype(np.float32)
              for t in self.svc.syncer.theta[p]]
    payload = tuple(jax.device_get(codecs.encode_tree(self.svc.syncer.up, deltas)))
    c = Contribution(m, p, rnd, base_version, steps, steps * self.tokens_per_step, payload,
                     codecs.payload_nbytes(payload), sent_at=self.clock(), step_seconds=step_s)
    assert self.box.send(c, incarnation=1) == "sent"
    return c

  def lease(self, m, *, incarnation=1, position=0):
    """Learner m's lease, taken or renewed now (its holder is always the same process)."""
    info = {"incarnation": incarnation, "position": position, "status": "running"}
    lease = self.box.acquire(learner_lease(m), f"learner {m}", self.cfg.dist.lease_s, info)
    assert lease is not None
    return lease

  def step(self, at=None, svc=None) -> None:
    svc = svc or self.svc
    if at is not None:
      svc.clock.now = at
    svc.step(svc.clock())

  def events(self, kind=None, name="syncer") -> list[dict]:
    return _events(os.path.join(self.root, name, "events.jsonl"), kind)


# --- learners: uploads, downloads, leases, links -------------------------------------


def test_failed_upload_is_logged_and_training_goes_on_and_a_resend_is_a_duplicate(tmp_path):
  """The mailbox raises on a send: logged `send_failed`, the learner steps on;
  restarted from a checkpoint, a learner's sends already in the mailbox are duplicates,
  counted, not re-sent, and merged once."""
  run = Run(_config(**{"dist.resume_max_versions": 1000}), tmp_path,
            [1.0, 1.0])
  box0 = run.learners[0].mailbox
  real_send, failed = box0.send, []

  def send(c, incarnation):
    if not failed:
      failed.append((c.fragment, c.round))
      raise OSError("link down")
    return real_send(c, incarnation)

  box0.send = send
  run.run_until(lambda: run.learners[1].step >= 2)
  saved = run.checkpoint(1)
  run.run_until(lambda: run.learners[1].step >= 5)
  sent_before = {(e["fragment"], e["round"]) for e in run.events("learner1", "send")}
  run.kill(1)
  run.restart(1, saved)  # Resumes (resume_max_versions is large): steps 3-5 again.
  run.run_until(lambda: run.learners[1].step >= 7)

  (p, rnd), = failed
  bad = run.events("learner0", "send_failed")
  assert [(e["fragment"], e["round"]) for e in bad] == [(p, rnd)] and "link down" in bad[0]["error"]
  assert len([e for e in run.events("learner0", "step") if e["t"] > bad[0]["t"]]) >= 4
  assert any(e["t"] > bad[0]["t"] for e in run.events("learner0", "send"))  # Not stuck.
  assert (rnd, 0) not in run.syncer.mailbox.contributions(p)

  assert run.events("learner1", "resume")
  duplicates = {(e["fragment"], e["round"]) for e in run.events("learner1", "send_duplicate")}
  # Steps 3, 4, 5 send (fragment, round) (1, 1), (0, 2), (1, 2); step 5's had not gone up.
  assert duplicates == {(1, 1), (0, 2), (1, 2)} & sent_before and len(duplicates) >= 2
  assert run.learners[1]._courier.duplicates == len(duplicates)  # pylint: disable=protected-access
  arrived = [(e["fragment"], e["round"]) for e in run.events("syncer", "arrive")
             if e["learner"] == 1]
  assert len(arrived) == len(set(arrived)) and duplicates <= set(arrived)


def test_a_learner_whose_lease_another_holder_took_stops_with_a_clear_error(tmp_path):
  """Another process took learner 0's lease (it had expired): at its next
  heartbeat the learner stops with an error that says so, and steps no further."""
  run = Run(_config(), tmp_path, [1.0, 1.0])
  run.run_until(lambda: run.learners[0].step >= 2)
  rt, lease_s = run.learners[0], run.cfg.dist.lease_s
  intruder = run.mailbox(Clock(run.now + lease_s + 1))  # Its clock is past the lease's expiry.
  assert intruder.acquire(learner_lease(0), "another host", lease_s) is not None
  step = rt.step
  with pytest.raises(RuntimeError, match="learner 0: lease learner/0 was taken over"):
    run.run_until(lambda: rt.step >= step + 10)
  assert rt.step <= step + 1 + lease_s / 4  # It stops at its next heartbeat.
  assert intruder.read_lease(learner_lease(0)).holder == "another host"


_COURIER_THEN_ERROR = """
import sys, time
import numpy as np
from decoupled_diloco.runtime.dist.courier import Courier
from decoupled_diloco.runtime.dist.mailbox import Mailbox
box = Mailbox(sys.argv[1], b"secret")
lease = box.acquire("learner/0", "me", 10.0, {})
courier = Courier(box, 0, 2, lossless_down=True, notices=False, lease=lease, ttl_s=10.0,
                  poll_s=0.0, incarnation=1, info=dict, log=lambda *a, **k: None)
courier.start(np.zeros(2, np.int64))
time.sleep(0.5)
raise RuntimeError("the learner failed")
"""


def test_a_learner_process_that_fails_exits_with_its_error_not_an_abort(tmp_path):
  """The one process this module starts: its exit is what is tested. A learner that
  raises never closes its courier; the courier's threads, polling a file mailbox
  without pause, are stopped before the interpreter finalizes (else a store call in
  flight comes back into it and the process aborts, status -6, losing the error's
  exit status)."""
  out = subprocess.run([sys.executable, "-c", _COURIER_THEN_ERROR, f"file://{tmp_path}/box/"],
                       capture_output=True, text=True, timeout=120, cwd=helpers.REPO)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "RuntimeError: the learner failed" in out.stderr
  assert "terminate called" not in out.stderr


def test_the_link_throttle_in_the_workdir_is_taken_up_and_removed(tmp_path):
  """`link.json` in a learner's workdir throttles its mailbox from its next
  heartbeat (each transfer then takes latency + bytes / rate on its clock); removing the
  file lifts it. The other learner's link is untouched."""
  run = Run(_config(), tmp_path, [1.0, 1.0])
  rt, clock = run.learners[0], run.clocks[0]
  rt.train_step()  # Connects.
  link = {"bytes_per_s": 1e5, "latency_s": 0.25}
  with open(os.path.join(tmp_path, "learner0", LINK_FILE), "w") as f:
    json.dump(link, f)

  def io_seconds():
    """Fake seconds one step spent on the link (a step alone takes min_step_s = 1)."""
    box, t0 = rt.mailbox, clock()
    moved = box.bytes_read + box.bytes_written
    rt.train_step()
    rt.upload()
    return clock() - t0 - 1.0, box.bytes_read + box.bytes_written - moved

  for _ in range(5):  # A heartbeat comes at least every lease_s / 4 (2.5 steps).
    seconds, moved = io_seconds()
    if rt.mailbox.bytes_per_s != float("inf"):
      break
  assert (rt.mailbox.bytes_per_s, rt.mailbox.latency_s) == (1e5, 0.25)
  assert run.learners[1].mailbox.bytes_per_s == float("inf")
  assert run.learners[1].mailbox.latency_s == 0.0
  seconds, moved = io_seconds()
  assert moved > 0 and seconds >= moved / 1e5 + 0.25
  os.remove(os.path.join(tmp_path, "learner0", LINK_FILE))
  for _ in range(5):
    seconds, moved = io_seconds()
    if rt.mailbox.bytes_per_s == float("inf"):
      break
  assert (rt.mailbox.bytes_per_s, rt.mailbox.latency_s) == (float("inf"), 0.0)
  seconds, moved = io_seconds()
  assert moved > 0 and seconds == 0.0


def test_a_restarted_learner_resumes_within_the_threshold_and_rejoins_beyond_it(tmp_path):
  """`dist.resume_max_versions` (2): restarted from its checkpoint, a learner no
  fragment of which moved on more than 2 versions resumes with its state (its inner
  optimizer's included); further behind, it rejoins from full copies of the latest
  versions, with a fresh inner optimizer, at the position `protocol.rejoin_position` gives."""
  run = Run(_config(), tmp_path, [1.0, 1.0])
  box = run.syncer.mailbox
  run.run_until(lambda: run.learners[1].step >= 3)
  saved = run.checkpoint(1)
  base = saved["learner"]["base_version"]
  behind = lambda: int(np.max(np.array(box.latest_versions(2)) - base))
  run.kill(1)
  assert behind() <= run.cfg.dist.resume_max_versions
  rt = run.restart(1, saved)
  assert rt.ready()  # Connects: resumes.
  assert rt.counts["rejoins"] == 0 and not run.events("learner1", "rejoin")
  assert rt.step == 3 and rt.position == saved["extra"][1]["schedule"]["phase"] + 3
  helpers.assert_trees_equal(_host(rt.learner.opt_state), saved["learner"]["opt_state"])

  run.kill(1)
  run.run_until(lambda: behind() > run.cfg.dist.resume_max_versions)
  latest = box.latest_versions(2)
  others = [box.read_lease(learner_lease(0)).info["position"]]
  published = {p: box.publication(p, v)[0].round for p, v in enumerate(latest)}
  rt = run.restart(1, saved)
  position = protocol_lib.rejoin_position(rt.position, others, published, rt.schedule.schedule)
  assert position > rt.position
  assert rt.ready()  # Connects: rejoins.
  rejoin, = run.events("learner1", "rejoin")
  assert rejoin["position"] == position == rt.position and rejoin["versions_behind"] == behind()
  assert rt.counts["rejoins"] == 1 and rt.learner.base_version.tolist() == latest
  for p, v in enumerate(latest):
    _assert_holds(rt.learner.base[p], box.full_copy(p, v))
  mu = jax.tree.leaves(_host(rt.learner.opt_state))
  assert not all(np.array_equal(a, b) for a, b in zip(mu, jax.tree.leaves(
      saved["learner"]["opt_state"])))  # A fresh inner optimizer.
  run.run_until(lambda: rt.step >= 6)  # And it trains on.


def test_a_slow_learner_behind_a_closed_round_is_rephased_and_its_skipped_sends_go_late(
    tmp_path):
  """Learner 1 steps 3x slower; a publication for a round whose send it has not
  reached re-phases it (wall time since the round's start at the published pace), and the
  sends it skips go out at once, late (merged as passengers of the next round)."""
  run = Run(_config(), tmp_path, [1.0, 3.0])
  run.run_until(lambda: run.learners[1].step >= 6)
  rephases = run.events("learner1", "rephase")
  assert rephases and run.learners[1].schedule.rephases == len(rephases)
  sends = run.events("learner1", "send")
  arrivals = {(e["fragment"], e["round"]): e["status"] for e in run.events("syncer", "arrive")
              if e["learner"] == 1}
  schedule = run.learners[1].schedule.schedule
  for r in rephases:
    assert r["to"] > r["position"] and r["sent"]
    skipped = [e for e in sends  # The positions it jumped over: only these sends name them.
               if r["position"] < schedule.send_position(e["fragment"], e["round"]) <= r["to"]]
    assert sorted(e["fragment"] for e in skipped) == sorted(r["sent"])
    assert all(e["t"] <= r["t"] + 3.0 for e in skipped)  # Up within the step it is in.
    assert all(arrivals[(e["fragment"], e["round"])] == "late" for e in skipped)
  assert run.learners[1].position > run.learners[1].step  # Its phase moved on.


def _this_process(events):
  """The events a learner's latest process logged (its workdir's log spans restarts)."""
  starts = [i for i, e in enumerate(events) if e["event"] == "start"]
  return events[starts[-1]:]


def _aligned(events, p):
  """(versions, outcomes) of a learner's alignments of fragment p, in order."""
  mine = [e for e in events if e["fragment"] == p]
  return [e["version"] for e in mine], {e["outcome"] for e in mine}


def test_lossy_downloads_chain_a_missing_version_brings_a_full_copy_and_a_rejoin_rebases(
    tmp_path):
  """`codec.down` = int8: each publication is an update against the version before,
  applied in a chain (a learner that follows it holds the syncer's copy bit for bit); a
  version the learner cannot read leaves a gap: it asks for a full copy of the latest and
  holds it exactly; rejoined from full copies, it takes the updates after them in a chain."""
  run = Run(_config(**_INT8), tmp_path, [1.0, 2.0])
  box, syncer = run.syncer.mailbox, run.syncer.syncer
  rt0, rt1 = run.learners
  run.run_until(lambda: rt1.step >= 2)
  saved = run.checkpoint(1)
  run.run_until(lambda: rt0.step >= 6)
  for p in range(2):
    versions, outcomes = _aligned(run.events("learner0", "align"), p)
    assert outcomes == {"applied"} and versions == list(range(1, len(versions) + 1))
    assert box.publication(p, versions[-1])[0].base_version == versions[-1] - 1  # An update.
  same = [p for p in range(2) if rt0.learner.base_version[p] == syncer.version[p]]
  assert same
  for p in same:
    helpers.assert_trees_equal(_host(rt0.learner.base[p]), _host(syncer.held[p]))

  courier = rt1._courier  # pylint: disable=protected-access
  newer = lambda: [p for p, v in enumerate(box.latest_versions(2)) if v > courier.fetched[p]]
  run.run_until(newer)  # Published, not yet fetched by learner 1 (it polls every 2 s).
  p = newer()[0]
  lost = int(courier.fetched[p]) + 1
  box.delete([f"down/{p}/{lost:010d}"])
  run.run_until(lambda: rt1.counts["full_copies"] >= 1)
  v = int(rt1.learner.base_version[p])
  assert v >= lost and rt1.counts["full_copies"] == 1
  _assert_holds(rt1.learner.base[p], box.full_copy(p, v))
  assert lost not in [e["version"] for e in run.events("learner1", "landed") if e["fragment"] == p]

  run.kill(1)
  rt1 = run.restart(1, saved)
  assert rt1.ready()  # Connects: rejoins (more than 2 versions behind).
  rejoined = rt1.learner.base_version.tolist()
  assert rt1.counts["rejoins"] == 1
  assert rt1._courier.fetched.tolist() == rejoined  # pylint: disable=protected-access
  run.run_until(lambda: rt1.step >= saved["learner"]["step"] + 6)
  after = [e for e in _this_process(run.events("learner1")) if e["event"] == "align"]
  for p in range(2):
    versions, outcomes = _aligned(after, p)
    assert versions and outcomes == {"applied"}
    assert versions == list(range(rejoined[p] + 1, rejoined[p] + 1 + len(versions)))
  assert rt1.counts["full_copies"] == 0


def test_a_learner_that_needs_a_collected_version_gets_a_full_copy(tmp_path):
  """Lossy downloads; learner 1 is down while the syncer collects the versions
  behind the live learners; resumed from its checkpoint, the updates it would apply are
  gone: it fetches full copies of the latest versions instead, and holds them exactly."""
  run = Run(_config(**_INT8, **{"dist.gc_every": 1, "dist.keep_versions": 1,
                                "dist.resume_max_versions": 1000}),
            tmp_path, [1.0, 1.0])
  box = run.syncer.mailbox
  run.run_until(lambda: run.learners[1].step >= 3)
  saved = run.checkpoint(1)
  base = saved["learner"]["base_version"]
  run.kill(1)
  run.run_until(lambda: all(box.publication(p, int(base[p]) + 1) is None and
                            box.latest_version(p) > base[p] + 2 for p in range(2)))
  rt = run.restart(1, saved)
  assert rt.ready()  # Resumes; its first poll misses the collected versions.
  assert not run.events("learner1", "rejoin") and rt.learner.base_version.tolist() == base.tolist()
  run.run_until(lambda: rt.counts["full_copies"] >= 2)
  assert rt.counts["full_copies"] == 2
  for p in range(2):
    v = int(rt.learner.base_version[p])
    assert v > base[p] + 2
    _assert_holds(rt.learner.base[p], box.full_copy(p, v))


def test_gc_collects_behind_the_slowest_live_learner_and_nothing_it_still_needs(tmp_path):
  """`dist.gc_every` = 1, `dist.keep_versions` = 1, lossy downloads: after each
  commit the syncer deletes contributions it has read from every live learner and the
  versions behind the slowest live learner's base; the slow learner (4x) still finds every
  update it applies (no full copy), though the syncer was further on than keep_versions."""
  run = Run(_config(**_INT8, **{"dist.gc_every": 1, "dist.keep_versions": 1}), tmp_path,
            [1.0, 4.0])
  box = run.syncer.mailbox
  run.run_until(lambda: run.learners[1].step >= 5)
  rt1 = run.learners[1]
  assert rt1.counts["full_copies"] == 0 and rt1.counts["rejoins"] == 0
  for p in range(2):
    versions, outcomes = _aligned(run.events("learner1", "align"), p)
    assert outcomes == {"applied"} and versions == list(range(1, len(versions) + 1))

  collects = run.events("syncer", "collect")
  published = run.events("syncer", "publish")
  held_back = 0
  for c in collects:
    latest = max(e["version"] for e in published
                 if e["fragment"] == c["fragment"] and e["t"] <= c["t"])
    held_back += c["below_version"] < latest - 1  # The slow learner's base held it back.
  assert held_back and sum(c["deleted"] for c in collects) > 0
  read = {(e["fragment"], e["round"], e["learner"]) for e in run.events("syncer", "arrive")}
  for p in range(2):
    last = [c for c in collects if c["fragment"] == p][-1]
    assert last["below_round"] > 1 and last["below_version"] > 0
    rounds = [r for r, _ in box.contributions(p)]
    assert min(rounds) >= last["below_round"]  # Below it, every key is gone ...
    for m in range(2):  # ... and each was read before it went.
      assert {(p, e["round"], m) for e in run.events(f"learner{m}", "send")
              if e["fragment"] == p and e["round"] < last["below_round"]} <= read
    assert min(box.versions(p)) <= rt1.learner.base_version[p] + 1


def _protocol_state(svc) -> dict:
  r, proto = svc.protocol.rounds, svc.protocol
  return {"open": list(r.open), "reported": r.reported.tolist(), "seen": svc.seen.tolist(),
          "published": proto.published.tolist(), "counts": dict(proto.counts),
          "xi": [r.xi_step, r.xi_quorum, r.xi_sync], "step_s": proto.step_s.tolist(),
          "versions": svc.syncer.version.tolist(), "clipped": svc.syncer.clipped,
          "rejected": dict(svc.syncer.rejected)}


def test_a_restarted_syncer_recovers_its_state_bitwise(tmp_path):
  """The syncer is killed right after a commit; a new `SyncerService` on the
  mailbox recovers every fragment's state (global tensors, outer optimizer, the learners'
  held copy of lossy downloads, last deltas, counters) and the protocol's (rounds, counts,
  running estimates, reported step times) exactly as they were."""
  run = Run(_config(**_INT8, **{"diloco.quorum": 0}), tmp_path, [1.0, 1.0])
  run.syncer.mailbox.latency_s = 0.01  # Commits take (fake) time: xi_sync moves.
  svc = run.syncer
  junk = Mailbox(run.url, SECRET)
  junk._kv.write("lease/learner/7", b"junk").result()  # pylint: disable=protected-access
  run.run_until(lambda: all(svc.commits >= 3))
  rejected = svc.mailbox.rejected_counts()
  assert rejected == {"lease": {"truncated": 1}}
  before = {p: _host(svc.syncer.fragment_state(p)) for p in range(2)}
  state = _protocol_state(svc)
  assert all(before[p].held is not None for p in range(2))
  assert all(np.any(d) for p in range(2) for d in jax.tree.leaves(before[p].last_deltas))
  assert state["xi"][2] > 0 and min(state["step_s"]) > 0

  clock = Clock(run.now + run.cfg.dist.lease_s + 1)  # The dead syncer's lease has expired.
  os.makedirs(os.path.join(tmp_path, "syncer2"))
  recovered = SyncerService(run.cfg, run.task, os.path.join(tmp_path, "syncer2"),
                            run.mailbox(clock), clock=clock, sleep=clock.sleep, threaded=False)
  assert recovered.start() and recovered.counts["recoveries"] == 1
  for p in range(2):
    helpers.assert_trees_equal(_host(recovered.syncer.fragment_state(p)), before[p])
  assert _protocol_state(recovered) == state
  assert recovered.mailbox.rejected_counts() == rejected  # Carried over with the state,
  recovered.step(clock())  # and the same object, read again, is not counted twice.
  assert recovered.mailbox.rejected_counts() == rejected


# --- the syncer service --------------------------------------------------------------


def test_contributions_past_the_rounds_ahead_bound_are_read_once_the_round_catches_up(tmp_path):
  """A learner far ahead of the open round (`rounds.MAX_ROUNDS_AHEAD`) is deferred,
  unread, until the open round is within the bound; then it is read and merged."""
  s = SyncerAlone(_config(), tmp_path)
  open0 = s.svc.protocol.rounds.open[0]
  ahead = open0 + MAX_ROUNDS_AHEAD + 2
  s.send(1, 0, ahead)
  for t in (1.0, 2.0):
    s.step(t)
  assert s.svc.seen[0, 1] == -1 and not s.events("arrive")
  assert [(e["learner"], e["round"]) for e in s.events("defer")] == [(1, ahead)]  # Once.

  s.send(0, 0, open0)  # Closes round open0 (K = 1): one round behind the bound still.
  s.step(3.0)
  assert s.svc.syncer.version[0] == 1 and s.svc.seen[0, 1] == -1
  s.send(0, 0, open0 + 1, base_version=1)  # Closes the next: now within the bound.
  s.step(4.0)  # Read, then decided as one batch: the deferred key is read at the next poll.
  assert s.svc.seen[0, 1] == -1
  s.step(4.5)
  arrived = [(e["learner"], e["round"], e["status"]) for e in s.events("arrive")]
  assert arrived == [(0, open0, "on_time"), (0, open0 + 1, "on_time"), (1, ahead, "future")]
  assert s.svc.seen[0, 1] == ahead
  s.send(0, 0, open0 + 2, base_version=2)
  s.step(5.0)
  merges = [(e["round"], e["contributors"]) for e in s.events("merge") if e["fragment"] == 0]
  assert merges == [(open0, 1), (open0 + 1, 1), (open0 + 2, 2)]  # The early one joined.


@pytest.mark.parametrize("late", ["drop", "reject"])
def test_late_policies_drop_and_reject_count_and_never_merge(tmp_path, late):
  """`diloco.late` = drop / reject: a contribution for a closed round is counted
  in the protocol's counts (reject: also a rejection) and never merged."""
  s = SyncerAlone(_config(**{"diloco.late": late}), tmp_path)
  s.send(0, 1, 0)
  s.step(1.0)  # K = 1: round 0 of fragment 1 closes on learner 0 alone.
  assert s.svc.syncer.version[1] == 1
  s.send(1, 1, 0)  # Late.
  s.step(2.0)
  counts = s.svc.protocol.counts
  assert (counts["late_dropped"], counts["late_rejected"], counts["late_joined"]) == (
      late == "drop", late == "reject", 0)
  assert s.svc.syncer.rejected["late"] == (late == "reject")
  assert [e["outcome"] for e in s.events("late")] == ["dropped" if late == "drop" else "rejected"]
  s.send(0, 1, 1, base_version=1)
  s.step(3.0)
  merges = [(e["round"], e["contributors"]) for e in s.events("merge") if e["fragment"] == 1]
  assert merges == [(0, 1), (1, 1)]
  assert s.svc.syncer.last_base[1, 1] == -1 and s.svc.syncer.merges[1] == 2
  summary = s.svc.finish()
  assert summary["protocol"][f"late_{'dropped' if late == 'drop' else 'rejected'}"] == 1


def test_never_seen_learners_are_live_until_startup_then_liveness_is_their_lease(tmp_path):
  """A learner with no lease counts as live for `dist.startup_s` after the syncer
  starts (rounds wait for it), then not; a learner with a lease is live while it holds it."""
  s = SyncerAlone(_config(**{"diloco.quorum": 0, "dist.startup_s": 5.0, "dist.lease_s": 10.0}),
                  tmp_path)
  s.clock.now = 1.0
  s.lease(0)  # Until t = 11.
  s.send(0, 1, 0)
  s.step(1.0)
  assert s.svc.live == [True, True] and s.svc.protocol.rounds.live == {0, 1}
  s.step(4.9)
  assert s.svc.syncer.version[1] == 0  # K = M: it waits for learner 1, never seen.
  s.step(5.1)
  assert s.svc.live == [True, False] and s.svc.protocol.rounds.live == {0}
  assert s.svc.syncer.version[1] == 1  # Every live learner reported.
  s.step(10.9)
  assert s.svc.live == [True, False]
  s.step(11.1)  # Learner 0's lease expired.
  assert s.svc.live == [False, False] and s.svc.protocol.rounds.live == set()
  s.lease(1)
  s.step(12.0)
  assert s.svc.live == [False, True] and s.svc.protocol.rounds.live == {1}
  assert [e["learner"] for e in s.events("learner_down")] == [1, 0]


def test_a_new_incarnation_rejoins_and_rounds_behind_its_position_stop_waiting(tmp_path):
  """A learner whose lease names a new incarnation restarted: the syncer calls the
  protocol's `rejoined` at its position, so rounds behind it no longer wait for it."""
  s = SyncerAlone(_config(**{"diloco.quorum": 0}), tmp_path)
  s.lease(0)
  s.lease(1, incarnation=1, position=0)
  s.send(0, 1, 0)
  s.step(1.0)
  assert s.svc.syncer.version[1] == 0  # K = M = 2: waits for learner 1.
  s.lease(1, incarnation=1, position=5)  # The same process, further on: still waited for.
  s.step(2.0)
  assert s.svc.syncer.version[1] == 0
  s.lease(1, incarnation=2, position=5)  # Restarted at position 5: rounds through 2, 2.
  s.step(3.0)
  assert s.svc.syncer.version[1] == 1
  through = s.svc.protocol.schedule.rounds_through(5)
  assert s.svc.protocol.rounds.reported[:, 1].tolist() == through == [2, 2]
  ups = [(e["learner"], e["incarnation"]) for e in s.events("learner_up") if "incarnation" in e]
  assert ups == [(0, 1), (1, 1), (1, 2)]


def test_fenced_when_another_syncer_published_the_version_first(tmp_path):
  """A syncer that lost the race for a version (the other took the lease while it
  was paused and published first) raises `Fenced`; the mailbox keeps the winner's."""
  s = SyncerAlone(_config(), tmp_path)
  s.send(0, 1, 0)
  s.step(1.0)
  assert s.svc.syncer.version[1] == 1
  lease_s = s.cfg.dist.lease_s
  other = s.service("other", Clock(1.0 + lease_s + 1))  # The first one's lease has expired.
  assert other.start() and other.lease.epoch == 2 and other.syncer.version.tolist() == [0, 1]
  s.send(0, 1, 1, base_version=1)
  s.step(svc=other)
  assert other.syncer.version[1] == 2
  # The first one paused after checking its lease (its clock says it still holds it).
  s.svc.mailbox._holds = lambda lease: True  # pylint: disable=protected-access
  with pytest.raises(Fenced, match="version 2 of fragment 1 was published by another syncer"):
    s.step(2.0)
  pub, extra = s.box.publication(1, 2)
  assert extra["epoch"] == 2 and pub.version == 2
  assert s.box.outer_state(1, 2)[0]["open"] == other.protocol.rounds.open[1]


def test_a_standby_syncer_takes_over_once_the_leaders_lease_expires(tmp_path):
  """A second `SyncerService` on the mailbox stands by while the leader renews its
  lease, leads once it expires, recovers the committed versions and goes on."""
  s = SyncerAlone(_config(), tmp_path)
  standby_clock = Clock(0.0)
  standby = s.service("standby", standby_clock)
  assert not standby.start()
  s.send(0, 1, 0)
  s.send(0, 0, 1)
  s.step(1.0)
  for t in (3.0, 6.0, 9.0, 12.0):  # The leader renews every lease_s / 4.
    s.step(t)
    standby_clock.now = t
    assert not standby.start()
  versions = s.svc.syncer.version.tolist()
  assert versions == [1, 1]
  # The leader dies; its lease (renewed at 12 at the latest) runs out.
  standby_clock.now = 12.0 + s.cfg.dist.lease_s + 0.1
  assert standby.start() and standby.lease.epoch == 2
  assert standby.syncer.version.tolist() == versions
  assert standby.protocol.rounds.open == s.svc.protocol.rounds.open
  for p in range(2):
    helpers.assert_trees_equal(_host(standby.syncer.fragment_state(p)),
                               _host(s.svc.syncer.fragment_state(p)))
  s.send(1, 1, 1, base_version=1)
  s.step(svc=standby)
  assert standby.syncer.version.tolist() == [1, 2]
  assert s.box.publication(1, 2)[1]["epoch"] == 2
  assert [e["versions"] for e in s.events("recovered", name="standby")] == [versions]


def test_a_finishing_syncer_waits_for_a_renewal_in_flight_then_frees_its_lease(tmp_path):
  """The lease thread (wall clock) is mid-renewal when the syncer finishes: `finish`
  waits for it, so no renewal outlives the service (one that returns into a finalizing
  interpreter aborts the process) and the release is of the renewed lease, not of a
  stale one (which would leave the lease held until it expires)."""
  cfg = config_lib.parse(_config(**{"dist.lease_s": 2.0}))  # Renewed every 0.5 s.
  url = f"memory://finishing_{uuid.uuid4().hex}/"
  box = Mailbox(url, SECRET)
  svc = SyncerService(cfg, helpers.task(cfg), str(tmp_path), box)
  renewed, real_renew = threading.Event(), box.renew

  def slow_renew(lease, ttl_s, info=None):  # The store answers, the answer comes back late.
    out = real_renew(lease, ttl_s, info)
    renewed.set()
    time.sleep(0.5)
    return out

  box.renew = slow_renew
  assert svc.start()
  assert renewed.wait(10)
  svc.finish()
  assert "syncer-lease" not in [t.name for t in threading.enumerate()]
  lease = Mailbox(url, SECRET).read_lease(SYNCER_LEASE)
  assert lease.expires_at <= time.time(), "the lease is still held after finish"


def test_a_learner_lying_about_its_step_time_cannot_move_the_pace(tmp_path):
  """The pace a publication carries is the median of the live learners' reported
  step times: one learner of three reporting an absurd one cannot move it."""
  config = _config(**{"diloco.num_learners": 3, "diloco.quorum": 0, "data.batch_size": 12})
  s = SyncerAlone(config, tmp_path)
  for m, step_s in enumerate([1.0, 1.5, 1e6]):
    s.send(m, 1, 0, step_s=step_s)
  s.step(1.0)
  for m, step_s in enumerate([1.2, 1.5, 1e-6]):
    s.send(m, 1, 1, base_version=1, step_s=step_s)
  s.step(2.0)
  paces = [s.box.publication(1, v)[0].step_seconds for v in (1, 2)]
  assert paces == [1.5, 1.2]  # The honest learners' values bound it.


def test_lockstep_with_overlap_and_a_learner_resumed_from_its_checkpoint_completes(tmp_path):
  """Learners wait (K = M, tau = 2); learner 1 is killed and restarted from an
  older checkpoint, so it re-sends rounds already merged (duplicates) and waits for their
  publications: every round is answered and the run completes (this used to hang)."""
  config = helpers.tiny_config("decoupled", steps=24, **{
      "diloco.num_learners": 2, "diloco.num_fragments": 2, "diloco.sync_every": 3,
      "diloco.quorum": 0, "diloco.grace_gamma": 0.0, "sim.learners_wait": True,
      "diloco.overlap": 2})
  run = Run(config, tmp_path, [1.0, 1.37])
  run.run_until(lambda: run.learners[1].step >= 4)
  saved = run.checkpoint(1)
  run.run_until(lambda: run.learners[1].step >= 8)
  run.kill(1)
  run.restart(1, saved)
  summary = run.run()
  assert run.done == [True, True] and run.learners[1].step == 24
  assert run.events("learner1", "resume") and not run.events("learner1", "rejoin")
  assert run.events("learner1", "send_duplicate")
  # Fragment 0 syncs at positions 3, 6, ..., 24 and fragment 1 at 1, 4, ..., 22: a merge each.
  assert summary["versions"] == [8, 8]
