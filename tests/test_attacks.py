"""The real runtime under attack: objects written straight into the mailbox by
someone without the run's keys, or by a learner with only its own.

Each attack of issue 22 is replayed on an in-process run (tests/dist_harness.py:
the syncer and learners that processes run, one memory:// store, fake clocks).
The run must go on, lose nothing, count what it rejected, and end where a
clean run of the same seed ends.
"""

import json
import os

import numpy as np
import pytest

from decoupled_diloco import metrics
from decoupled_diloco.algorithm.messages import FULL, Contribution, Publication
from decoupled_diloco.runtime.dist import keys as keys_lib
from decoupled_diloco.runtime.dist import wire
from decoupled_diloco.runtime.dist.keys import Keyring, learner_credential
from decoupled_diloco.runtime.dist.mailbox import Limits, Mailbox
from tests import helpers
from tests.dist_harness import SECRET, Clock, InProcessRun

_CONFIG = {"diloco.num_learners": 2, "diloco.num_fragments": 2, "diloco.sync_every": 2,
           "diloco.overlap": 1, "diloco.quorum": 1, "diloco.grace_gamma": 0.0}


def _config(steps=16):
  return helpers.tiny_config("decoupled", steps=steps, **_CONFIG)


def _plant(run, key: str, value: bytes) -> None:
  """Writes `value` at `key`, over whatever is there (what bucket write access allows)."""
  box = Mailbox(run.url, Keyring("nobody", {}))
  box._kv.write(key, value).result()  # pylint: disable=protected-access


def _delete(run, key: str) -> None:
  Mailbox(run.url, Keyring("nobody", {}))._kv.write(key, None).result()  # pylint: disable=protected-access


def _huge_prefix(total: int) -> bytes:
  """A message's first bytes claiming `total` bytes (the rest never needs to exist)."""
  return wire._PREFIX.pack(b"DDLM", 2, total, 10, 1) + bytes(64)  # pylint: disable=protected-access


def _events(run, name: str, kind: str) -> list[dict]:
  return [e for e in metrics.read_jsonl(os.path.join(run.root, name, "events.jsonl"))
          if e["event"] == kind]


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _final(run) -> dict:
  summary = run.run()
  assert all(run.done), "a learner did not finish"
  return summary


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  return _final(InProcessRun(_config(), tmp_path_factory.mktemp("clean"), [1.0, 1.0]))


def test_every_attack_on_the_mailbox_leaves_the_run_as_a_clean_one(tmp_path, clean):
  run = InProcessRun(_config(), tmp_path, [1.0, 1.0])
  # Key squatting: junk at every future round of learner 0, and a real message of its own
  # under the wrong key (a replay).
  for p in range(2):
    for rnd in range(10):
      _plant(run, f"up/{p}/{rnd:010d}/00000", b"squatted" if rnd % 2 else bytes(40))
  honest = wire.contribution_bytes(
      Contribution(0, 1, 3, 0, 2, 1, ({"values": np.zeros(2, np.float32)},), 8), 0,
      Keyring.from_secret(SECRET))
  _plant(run, "up/1/0000000004/00000", honest)
  _plant(run, "up/0/0000000011/00001", _huge_prefix(2 << 30))
  # Publications: the syncer's next versions taken, a far future one, a learner's lease
  # saying "done" in plain JSON, the syncer's lease deleted, then garbage.
  _plant(run, "down/0/0000000001", b"7 bytes")
  _plant(run, "down/1/0000000002", b"7 bytes")
  _plant(run, "down/1/9999999999", b"x" * 100)
  _plant(run, "notice/0/0000009999", b"x" * 100)
  lease_json = json.dumps({"holder": "x", "epoch": 9, "expires_at": 1e12,
                           "info": {"status": "done"}}).encode()
  run.at(3.0, lambda: [_plant(run, f"lease/learner/{m}", lease_json) for m in range(2)])
  run.at(5.0, lambda: _delete(run, "lease/syncer"))
  run.at(9.0, lambda: _plant(run, "lease/syncer", b"garbage!"))
  run.at(11.0, lambda: _plant(run, "run/config", b"not a config"))
  summary = _final(run)

  assert summary["versions"] == clean["versions"]
  assert summary["merges_per_fragment"] == clean["merges_per_fragment"]
  assert summary["final_eval_loss"] == pytest.approx(clean["final_eval_loss"], abs=1e-6)
  rejected = summary["rejected_objects"]
  assert set(rejected) >= {"contribution", "publication", "lease"}, rejected
  assert rejected["contribution"].get("too large") == 1
  # Nothing of learner 0's was lost: every squatted round it sent was replaced and merged.
  replaced = [e for e in _events(run, "learner0", "send") if e.get("replaced")]
  assert len(replaced) >= 8
  assert not _events(run, "learner0", "send_failed")
  assert summary["learners"]["0"]["status"] == "done"


def test_a_learner_holding_its_own_key_cannot_sign_as_another_or_as_the_syncer(tmp_path):
  url = f"file://{tmp_path}/box"
  syncer = Mailbox(url, SECRET, num_learners=3)
  learner = {m: Mailbox(url, Keyring.from_credential(learner_credential(SECRET, m)))
             for m in range(3)}
  theirs = Keyring.from_credential(learner_credential(SECRET, 1))
  c = Contribution(0, 0, 0, 0, 1, 1, ({"values": np.ones(2, np.float32)},), 8)
  # Learner 1 cannot tag for learner 0: it does not hold the key.
  with pytest.raises(ValueError, match="cannot tag"):
    wire.contribution_bytes(c, 0, theirs)
  # What it can sign, its own contribution relabelled, the syncer rejects at 0's key.
  data = wire.encode_message("contribution", {
      "fields": {**wire._fields(c)}, "payload": [["values"]], "incarnation": 0},  # pylint: disable=protected-access
      [np.ones(2, np.float32)], theirs, [keys_lib.learner(1), keys_lib.PEERS])
  assert learner[1].create("up/0/0000000000/00000", data)
  assert syncer.receive(0, 0, 0) is None
  assert syncer.rejected_counts() == {"contribution": {"bad hmac": 1}}
  # Nor a publication that learner 0 or the syncer accepts.
  pub = Publication(0, 1, ({"values": np.ones(2, np.float32)},), 8, base_version=FULL)
  with pytest.raises(ValueError, match="cannot tag"):
    wire.publication_bytes(pub, theirs, [keys_lib.learner(0)], epoch=1)
  forged = wire.publication_bytes(pub, theirs, [keys_lib.learner(1), keys_lib.PEERS], epoch=1)
  assert learner[1].create("down/0/0000000001", forged)
  assert learner[0].publication(0, 1) is None and learner[0].latest_version(0) is None
  assert syncer.publication(0, 1) is None
  assert learner[2].latest_versions(1) == [None]
  # Nor a lease the syncer takes for another learner's (or its own lease).
  lease = learner[1].acquire("learner/1", "l1", 10.0, {"status": "running"})
  assert syncer.read_lease("learner/1") == lease  # Its own, checked under its key.
  _copy = learner[1]._kv.read("lease/learner/1").result().value  # pylint: disable=protected-access
  learner[1].create("lease/learner/0", _copy)
  assert syncer.read_lease("learner/0") is None  # Key mismatch: its name is learner/1.
  with pytest.raises(ValueError, match="cannot tag"):
    learner[1].acquire("syncer", "l1", 10.0)
  # What the syncer writes, every learner reads; and peers read each other's leases.
  lease_s = syncer.acquire("syncer", "s", 10.0)
  assert syncer.publish(Publication(0, 2, ({"values": np.ones(2, np.float32)},), 8,
                                    base_version=FULL), lease=lease_s, outer=({}, []))
  assert [learner[m].latest_version(0) for m in range(3)] == [2, 2, 2]
  assert learner[2].read_lease("learner/1").holder == "l1"


def test_an_oversized_object_is_refused_after_reading_its_prefix(tmp_path):
  """A sparse 2 GiB file at an `up/` key costs the syncer a few bytes of memory."""
  url = f"file://{tmp_path}/box"
  box = Mailbox(url, SECRET, num_learners=2)
  box.limits = Limits.of([4096], [4096], [4096], 2)  # What a syncer of a small model sets.
  path = tmp_path / "box" / "up" / "0" / "0000000000" / "00000"
  path.parent.mkdir(parents=True)
  with open(path, "wb") as f:
    f.write(_huge_prefix(2 << 30))
    f.truncate(2 << 30)  # Sparse: the disk holds a page.
  rss_before = _rss_bytes()
  assert box.receive(0, 0, 0) is None
  assert box.bytes_read == 0  # Only the prefix was read; nothing was kept.
  assert _rss_bytes() - rss_before < 50 << 20
  assert box.rejected_counts() == {"contribution": {"too large": 1}}
  with open(path, "r+b") as f:  # A prefix that tells the truth about its size.
    f.write(wire._PREFIX.pack(b"DDLM", 2, 2 << 30, 10, 1))  # pylint: disable=protected-access
  assert box.receive(0, 0, 0) is None  # Still far above any contribution's size.


def test_a_deleted_or_garbage_lease_is_written_back_by_its_holder(tmp_path):
  clock = Clock(1000.0)
  box = Mailbox(f"memory://attacks_lease_{tmp_path.name}", SECRET, clock=clock)
  lease = box.acquire("syncer", "A", ttl_s=10)
  _delete_key = lambda: box._kv.write("lease/syncer", None).result()  # pylint: disable=protected-access
  _delete_key()
  renewed = box.renew(lease, ttl_s=10)
  assert renewed is not None and (renewed.holder, renewed.epoch) == ("A", 1)
  box._kv.write("lease/syncer", b"8 bytes!").result()  # pylint: disable=protected-access
  renewed = box.renew(renewed, ttl_s=10)
  assert renewed is not None and box.read_lease("syncer").holder == "A"
  # Another syncer finds garbage where a lease should be: it is free, at a new epoch.
  box._kv.write("lease/syncer", b"8 bytes!").result()  # pylint: disable=protected-access
  clock.now += 11
  b = box.acquire("syncer", "B", ttl_s=10)
  assert b is not None and b.holder == "B"
  # Renewals always change the bytes (S3's generations are MD5s of the content).
  again = box.renew(b, ttl_s=10)
  assert again.serial == b.serial + 1 and again.generation != b.generation


class _Outage:
  """A store that refuses writes (PERMISSION_DENIED) until `until` on the caller's clock."""

  def __init__(self, kv, clock, until: float):
    self._kv, self._clock, self.until, self.refused = kv, clock, until, 0

  def write(self, *args, **kwargs):
    if self._clock() < self.until:
      self.refused += 1
      return _Failed(ValueError("PERMISSION_DENIED: Error writing: read-only (test outage)"))
    return self._kv.write(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._kv, name)


class _Failed:
  def __init__(self, error):
    self.error = error

  def result(self, timeout=None):
    raise self.error


def test_a_mailbox_unwritable_for_20_s_loses_no_contribution_and_crashes_nothing(tmp_path):
  run = InProcessRun(_config(), tmp_path, [1.0, 1.0])
  outages = []

  def break_the_store():
    for box, clock in [(run.syncer.mailbox, run.syncer_clock),
                       *[(rt.mailbox, run.clocks[m]) for m, rt in enumerate(run.learners)]]:
      box._kv = _Outage(box._kv, clock, run.now + 20.0)  # pylint: disable=protected-access
      outages.append(box._kv)  # pylint: disable=protected-access
  run.at(4.0, break_the_store)
  summary = _final(run)
  assert sum(o.refused for o in outages) > 10  # Uploads, publications and leases were refused.
  sent = {(e["fragment"], e["round"], e["learner"]) for m in range(2)
          for e in _events(run, f"learner{m}", "send")}
  received = {(e["fragment"], e["round"], e["learner"])
              for kind in ("arrive", "late", "reject") for e in _events(run, "syncer", kind)}
  assert sent and sent <= received, sorted(sent - received)
  assert not any(_events(run, f"learner{m}", "send_failed") for m in range(2))
  assert sum(summary["merges_per_fragment"]) > 0
