"""Tests for runtime/dist/mailbox.py and wire.py: create-once, leases, fencing, rejection, GC."""

import hashlib
import hmac
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import ml_dtypes
import numpy as np
import pytest

from decoupled_diloco.algorithm.messages import FULL, Contribution, Publication
from decoupled_diloco.runtime.dist import keys as keys_lib
from decoupled_diloco.runtime.dist import mailbox as mailbox_lib
from decoupled_diloco.runtime.dist import wire
from decoupled_diloco.runtime.dist.keys import Keyring
from decoupled_diloco.runtime.dist.mailbox import Mailbox
from decoupled_diloco.runtime.dist.wire import MessageError

SECRET = b"run secret"
KEYS = Keyring.from_secret(SECRET)


def _raw(box, key):
  """The bytes stored at `key` (None if missing), past every check."""
  got = box._kv.read(key).result()  # pylint: disable=protected-access
  return got.value if got.state == "value" else None
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
  """Wall time that moves only when told; `hook` runs once, inside the next call."""

  def __init__(self, now=1000.0):
    self.now, self.hook = now, None

  def __call__(self):
    hook, self.hook = self.hook, None
    if hook:
      hook()
    return self.now


@pytest.fixture(params=["memory", "file", "s3"])
def url(request, tmp_path):
  """A fresh, empty mailbox URL on each store under test (s3: moto's server)."""
  if request.param == "memory":
    return f"memory://{uuid.uuid4().hex}"
  if request.param == "s3":
    return request.getfixturevalue("s3_url")
  return f"file://{tmp_path}/mailbox"


def _contribution(learner=1, fragment=2, rnd=3, seed=0):
  rng = np.random.default_rng(seed)
  payload = ({"values": rng.integers(0, 256, 9, dtype=np.uint8),  # int4: 18 nibbles.
              "scales": rng.standard_normal(1).astype(np.float32)},
             {"values": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16)})
  return Contribution(learner=learner, fragment=fragment, round=rnd, base_version=4,
                      steps=5, tokens=6144, payload=payload, nbytes=9 + 4 + 24,
                      sent_at=12.5, step_seconds=0.25)


def _publication(fragment=0, version=1, base_version=0, value=1.0):
  payload = ({"values": np.full(4, value, np.float32)},)
  return Publication(fragment, version, payload, 16, base_version=base_version, round=version,
                     started_at=3.5, step_seconds=0.5)


def _outer(value):
  return {"step": 7}, [np.full(4, value, np.float32)]


def _assert_same_message(got, want):
  """Scalar fields equal and of the same Python types; payload arrays equal."""
  for name in want._fields:
    if name != "payload":
      assert type(getattr(got, name)) is type(getattr(want, name)), name
      assert getattr(got, name) == getattr(want, name), name
  assert [list(d) for d in got.payload] == [list(d) for d in want.payload]
  for g, w in zip(got.payload, want.payload):
    for k in w:
      assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape
      np.testing.assert_array_equal(g[k], w[k])


def _frame(header, body=b"", keys=KEYS, role=keys_lib.SYNCER):
  """A message with `header` (dict or raw bytes) and `body`, with a valid tag for `role`."""
  header = header if isinstance(header, bytes) else json.dumps(header).encode()
  total = wire.PREFIX_BYTES + len(header) + len(body) + wire.TAG_BYTES
  data = struct.pack(">4sBQIH", b"DDLM", 2, total, len(header), 1) + header + body
  digest = hashlib.sha256(data).digest()
  return (data + hashlib.sha256(role.encode()).digest()[:8]
          + hmac.new(keys.key(role), digest, hashlib.sha256).digest())


# ----------------------------------------------------------------- raw


def test_create_once_keeps_the_first_value(url):
  box = Mailbox(url, SECRET)
  assert _raw(box, "a/b") is None
  assert box.create("a/b", b"first")
  assert not box.create("a/b", b"second")
  assert _raw(box, "a/b") == b"first"
  assert _raw(Mailbox(url, SECRET), "a/b") == b"first"  # Another handle, same store.
  box.create("a/a", b"x")
  box.create("ab", b"y")
  assert box.keys("a/") == ["a/a", "a/b"]
  box.delete(["a/a", "a/b"])
  assert box.keys("") == ["ab"]


_RACER = """
import json, os, sys, time
from decoupled_diloco.runtime.dist.mailbox import Mailbox
url, me, keys, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
box = Mailbox(url, b"s")
open(go + "." + me, "w").close()
while not os.path.exists(go):
  time.sleep(0.001)
print(json.dumps([k for k in range(keys) if box.create(f"race/{k:03d}", me.encode())]))
"""


@pytest.mark.parametrize("store", ["file", "s3"])
def test_create_race_between_processes_each_key_won_once(tmp_path, request, store):
  url = request.getfixturevalue("s3_url") if store == "s3" else f"file://{tmp_path}/mailbox"
  go, racers, keys = str(tmp_path / "go"), 4, 50
  procs = []
  try:
    for me in range(racers):
      procs.append(subprocess.Popen([sys.executable, "-c", _RACER, url, str(me), str(keys), go],
                                    cwd=REPO, stdout=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120  # Imports are slow on a loaded machine.
    while not all(os.path.exists(f"{go}.{me}") for me in range(racers)):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.01)
    open(go, "w").close()  # All start creating together.
    won = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
  assert sorted(k for w in won for k in w) == list(range(keys))
  box = Mailbox(url, SECRET)
  for me, w in enumerate(won):
    assert all(_raw(box, f"race/{k:03d}") == str(me).encode() for k in w)


# -------------------------------------------------------------- leases


def test_a_lease_replaced_between_its_two_reads_is_read_whole_and_blames_nothing(url):
  """The prefix read sizes the learner's lease; its last renewal (longer: it says done)
  lands before the second read. That read starts again: before, the second read took the
  new object's first bytes, blamed it as truncated for good, and the syncer never saw the
  learner finish (it waited until the launcher stopped it)."""
  learner, syncer = Mailbox(url, SECRET), Mailbox(url, SECRET)
  lease = learner.acquire("learner/0", "L", ttl_s=60, info={"step": 1})
  real, fired = syncer._kv, []

  class RenewedBetweenReads:
    def __getattr__(self, name):
      return getattr(real, name)

    def read(self, key, byte_range=None, **kwargs):
      if (key == "lease/learner/0" and byte_range is not None and not fired
          and byte_range.stop not in (0, wire.PREFIX_BYTES)):
        fired.append(learner.renew(lease, 60, {"step": 12, "status": "done", "busy_s": 0.25}))
      return real.read(key, byte_range=byte_range, **kwargs)

  syncer._kv = RenewedBetweenReads()
  got = syncer.read_lease("learner/0")
  assert fired and fired[0] is not None
  assert got.info == {"step": 12, "status": "done", "busy_s": 0.25}
  assert not syncer.rejected
  assert syncer.leases("learner/")["learner/0"].info["status"] == "done"


def test_lease_is_taken_over_only_after_expiry(url):
  clock = FakeClock()
  box = Mailbox(url, SECRET, clock=clock)
  a = box.acquire("syncer", "A", ttl_s=10, info={"step": 1})
  assert (a.holder, a.epoch, a.expires_at, a.info) == ("A", 1, 1010.0, {"step": 1})
  assert box.acquire("syncer", "B", ttl_s=10) is None
  clock.now = 1009.0
  a = box.renew(a, ttl_s=10)
  assert a.expires_at == 1019.0 and a.info == {"step": 1}
  clock.now = 1018.0
  assert box.acquire("syncer", "B", ttl_s=10) is None
  clock.now = 1020.0
  b = box.acquire("syncer", "B", ttl_s=10)
  assert (b.holder, b.epoch) == ("B", 2)
  assert box.renew(a, ttl_s=10) is None  # A lost it.
  assert box.acquire("syncer", "A", ttl_s=10) is None
  assert box.read_lease("syncer") == b
  b = box.acquire("syncer", "B", ttl_s=10)  # Its holder may re-take it: same epoch.
  assert b.epoch == 2
  box.release(b)
  a = box.acquire("syncer", "A", ttl_s=10)  # No wait after a release.
  assert (a.holder, a.epoch) == ("A", 3)
  box.acquire("learner/0", "L0", ttl_s=5)
  box.acquire("learner/1", "L1", ttl_s=5)
  assert sorted(box.leases("learner/")) == ["learner/0", "learner/1"]


def test_lease_race_has_one_winner(url):
  clock = FakeClock()
  a, b = Mailbox(url, SECRET, clock=clock), Mailbox(url, SECRET, clock=clock)
  # A reads the (missing) lease, then B takes it before A's compare-and-swap.
  clock.hook = lambda: b.acquire("syncer", "B", ttl_s=10)
  assert a.acquire("syncer", "A", ttl_s=10) is None
  assert a.read_lease("syncer").holder == "B"
  # The same, racing in threads on twenty fresh leases.
  for i in range(20):
    start, won = threading.Barrier(2), []
    def take(box, holder, name=f"race/{i}"):
      start.wait()
      won.append(box.acquire(name, holder, ttl_s=10))
    threads = [threading.Thread(target=take, args=(box, h)) for box, h in ((a, "A"), (b, "B"))]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=30)
    assert sum(lease is not None for lease in won) == 1


# ------------------------------------------------------------- fencing


def test_stale_syncer_cannot_publish(url):
  clock_a, clock_b = FakeClock(), FakeClock()
  a, b = Mailbox(url, SECRET, clock=clock_a), Mailbox(url, SECRET, clock=clock_b)
  lease_a = a.acquire("syncer", "A", ttl_s=10)
  clock_b.now = 1011.0
  lease_b = b.acquire("syncer", "B", ttl_s=10)
  assert (lease_a.epoch, lease_b.epoch) == (1, 2)
  full_b = _publication(version=1, base_version=FULL, value=2.0)
  assert b.publish(_publication(value=2.0), lease=lease_b, outer=_outer(2.0), full=full_b)
  # A's clock is slow: it still thinks its lease is current.
  assert not a.publish(_publication(value=1.0), lease=lease_a, outer=_outer(1.0),
                       full=_publication(version=1, base_version=FULL, value=1.0))
  assert not a.publish(_publication(version=2, base_version=1, value=1.0), lease=lease_a,
                       outer=_outer(1.0))
  assert a.versions(0) == [1]
  pub, extra = a.publication(0, 1)
  assert pub.payload[0]["values"][0] == 2.0 and extra == {"epoch": 2}
  assert a.full_copy(0, 1).payload[0]["values"][0] == 2.0
  assert a.outer_state(0, 1)[1][0][0] == 2.0


@pytest.mark.parametrize("pause", ["after its lease check", "before its publication"])
def test_paused_syncer_loses_the_version(url, monkeypatch, pause):
  """A pauses mid-publish; B takes over and publishes; nothing of A's is visible."""
  clock_a, clock_b = FakeClock(), FakeClock(now=1011.0)
  a, b = Mailbox(url, SECRET, clock=clock_a), Mailbox(url, SECRET, clock=clock_b)
  lease_a = a.acquire("syncer", "A", ttl_s=10)
  took_over = []

  def b_takes_over():
    lease_b = b.acquire("syncer", "B", ttl_s=10)
    took_over.append(b.publish(_publication(value=2.0), lease=lease_b, outer=_outer(2.0),
                               full=_publication(base_version=FULL, value=2.5)))
  if pause == "after its lease check":
    clock_a.hook = b_takes_over  # A's check reads the lease, then asks the clock.
  else:
    create = a.create
    def create_after_takeover(key, value):
      if key.startswith("down/"):
        b_takes_over()
      return create(key, value)
    monkeypatch.setattr(a, "create", create_after_takeover)
  assert not a.publish(_publication(value=1.0), lease=lease_a, outer=_outer(1.0),
                       full=_publication(base_version=FULL, value=1.5))
  assert took_over == [True]
  pub, extra = a.publication(0, 1)
  assert pub.payload[0]["values"][0] == 2.0 and extra["epoch"] == 2
  assert a.full_copy(0, 1).payload[0]["values"][0] == 2.5  # B's, not A's staged copy.
  assert a.outer_state(0, 1)[1][0][0] == 2.0


def test_stale_syncer_whose_publication_lands_first_keeps_its_version(url, monkeypatch):
  """A and B both stage version 1 (A's lease expired meanwhile); A's create lands first.

  The version is then A's, and its full copy and outer state must be A's too,
  though B staged its own under the same version before losing.
  """
  clock_a, clock_b = FakeClock(), FakeClock(now=1011.0)
  a, b = Mailbox(url, SECRET, clock=clock_a), Mailbox(url, SECRET, clock=clock_b)
  lease_a = a.acquire("syncer", "A", ttl_s=10)
  staged = {"A": threading.Event(), "B": threading.Event()}
  go = {"A": threading.Event(), "B": threading.Event()}
  published = {}

  def publish(name, box, lease, value):
    create = box.create
    def pause_before_publication(key, data):
      if key.startswith("down/"):
        staged[name].set()
        assert go[name].wait(30)
      return create(key, data)
    monkeypatch.setattr(box, "create", pause_before_publication)
    published[name] = box.publish(_publication(value=value), lease=lease, outer=_outer(value),
                                  full=_publication(base_version=FULL, value=value + 0.5))

  thread_a = threading.Thread(target=publish, args=("A", a, lease_a, 1.0))
  thread_a.start()
  assert staged["A"].wait(30)
  lease_b = b.acquire("syncer", "B", ttl_s=10)
  thread_b = threading.Thread(target=publish, args=("B", b, lease_b, 2.0))
  thread_b.start()
  assert staged["B"].wait(30)
  go["A"].set()
  thread_a.join(30)
  go["B"].set()
  thread_b.join(30)
  assert published == {"A": True, "B": False}
  pub, extra = a.publication(0, 1)
  assert pub.payload[0]["values"][0] == 1.0 and extra["epoch"] == 1
  assert a.full_copy(0, 1).payload[0]["values"][0] == 1.5
  assert a.outer_state(0, 1)[1][0][0] == 1.0


def test_publish_after_an_interrupted_attempt_of_the_same_epoch(url, monkeypatch):
  box = Mailbox(url, SECRET, clock=FakeClock())
  lease = box.acquire("syncer", "A", ttl_s=10)
  create = Mailbox.create

  def crash_before_down(self, key, value):
    if key.startswith("down/"):
      raise RuntimeError("syncer died")
    return create(self, key, value)
  monkeypatch.setattr(Mailbox, "create", crash_before_down)
  with pytest.raises(RuntimeError):
    box.publish(_publication(base_version=FULL, value=1.0), lease=lease, outer=_outer(1.0))
  monkeypatch.setattr(Mailbox, "create", create)
  assert box.versions(0) == [] and box.outer_state(0, 1) is None
  assert box.publish(_publication(base_version=FULL, value=3.0), lease=lease, outer=_outer(3.0))
  assert box.outer_state(0, 1)[1][0][0] == 3.0  # The retry's state, not the crashed one's.


# -------------------------------------------------------- publications


def test_publications_full_copies_and_outer_state(url):
  box = Mailbox(url, SECRET, clock=FakeClock())
  lease = box.acquire("syncer", "S", ttl_s=10)
  full1 = _publication(version=1, base_version=FULL, value=1.0)
  assert box.publish(full1, lease=lease, outer=_outer(1.0), written_at=5.0)
  update2 = _publication(version=2, base_version=1, value=0.5)
  full2 = _publication(version=2, base_version=FULL, value=1.5)
  assert box.publish(update2, lease=lease, outer=_outer(1.5), full=full2)
  assert box.publish(_publication(version=3, base_version=2), lease=lease, outer=_outer(2.0))
  assert box.versions(0) == [1, 2, 3] and box.latest_version(0) == 3
  assert box.latest_version(1) is None
  pub, extra = box.publication(0, 1)
  _assert_same_message(pub, full1)
  assert extra == {"epoch": 1, "written_at": 5.0}
  _assert_same_message(box.publication(0, 2)[0], update2)
  _assert_same_message(box.full_copy(0, 1), full1)  # The publication is itself full.
  _assert_same_message(box.full_copy(0, 2), full2)
  assert box.full_copy(0, 3) is None  # An update with no full copy.
  meta, arrays = box.outer_state(0, 2)
  assert meta == {"step": 7}
  np.testing.assert_array_equal(arrays[0], np.full(4, 1.5, np.float32))
  assert box.publication(0, 4) is None and box.outer_state(0, 4) is None
  assert not box.rejected  # Missing is not rejected.
  with pytest.raises(ValueError, match="full copy"):
    box.publish(_publication(version=4, base_version=3), lease=lease, outer=_outer(0.0),
                full=_publication(version=4, base_version=3))


# ------------------------------------------------------------ messages


def test_contribution_round_trip_keeps_arrays_and_types(url):
  c = _contribution()
  got, incarnation = wire.parse_contribution(wire.contribution_bytes(c, 3, KEYS), KEYS, 1)
  _assert_same_message(got, c)
  assert type(incarnation) is int and incarnation == 3
  box = Mailbox(url, SECRET)
  assert box.send(c, incarnation=3) == "sent"
  # Once per learner and round: a later incarnation's send finds its own.
  assert box.send(_contribution(seed=1), incarnation=4) == "duplicate"
  box.send(_contribution(learner=0, rnd=3), 0)
  box.send(_contribution(learner=1, rnd=10), 0)
  box.create("up/2/junk", b"x")
  assert box.contributions(2) == [(3, 0), (3, 1), (10, 1)]
  got, incarnation = box.receive(2, 3, 1)
  _assert_same_message(got, c)
  assert incarnation == 3 and not box.rejected


def test_message_checks_reject_with_their_reason():
  data = wire.contribution_bytes(_contribution(), 0, KEYS)
  header_end = wire.PREFIX_BYTES + struct.unpack_from(">I", data, 13)[0]
  me = keys_lib.learner(1)

  def reason(d, keys=KEYS, kind="contribution", role=me):
    with pytest.raises(MessageError) as e:
      wire.decode_message(d, keys, kind, role)
    return e.value.reason

  assert reason(data, keys=Keyring.from_secret(b"other")) == "bad hmac"
  assert reason(data, role=keys_lib.learner(2)) == "bad hmac"  # No tag for learner 2.
  assert reason(data, kind="publication") == "wrong kind"
  for i in range(len(data)):
    flipped = bytearray(data)
    flipped[i] ^= 0x10
    expected = (("bad magic",) if i < 4 else ("unsupported format",) if i == 4
                else ("truncated", "trailing bytes") if i < 13 else ("bad hmac", "truncated"))
    assert reason(bytes(flipped)) in expected, i
  assert header_end < len(data) - wire.TAG_BYTES  # The flips above did cover header and body.
  for n in range(0, len(data), 7):
    assert reason(data[:n]) == "truncated", n
  rng = np.random.default_rng(0)
  for n in (0, 10, 48, 49, 1000):
    assert reason(rng.bytes(n)) in ("truncated", "bad magic")

  ok = {"kind": "outer", "meta": {}, "arrays": [
      {"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}]}
  meta, arrays = wire.decode_message(_frame(ok, bytes(8)), KEYS, "outer", keys_lib.SYNCER)
  assert meta == {} and arrays[0].tolist() == [0.0, 0.0]

  def with_array(**changes):
    return {**ok, "arrays": [{**ok["arrays"][0], **changes}]}
  bad = {
      "bad header": [b"{not json", b"[" * 100000, b"\xff", json.dumps([1]).encode(),
                     {"kind": "outer", "meta": [], "arrays": []},
                     with_array(shape=[-2]), with_array(shape=[1] * 33),
                     with_array(shape=[2.0]), with_array(offset=True)],
      "unknown dtype": [with_array(dtype="object"), with_array(dtype="<f4"),
                        with_array(dtype=["float32"])],
      "arrays do not match header": [
          with_array(shape=[3]), with_array(nbytes=4), with_array(offset=4),
          with_array(shape=[2**40, 2**40], nbytes=2**82),  # Huge: never allocated.
          {**ok, "arrays": []}],  # Body bytes no array claims.
  }
  for want, headers in bad.items():
    for header in headers:
      assert reason(_frame(header, bytes(8)), kind="outer", role=keys_lib.SYNCER) == want, header
  assert reason(_frame(ok, bytes(12)), kind="outer",
                role=keys_lib.SYNCER) == "arrays do not match header"
  with pytest.raises(ValueError, match="dtype"):
    wire.encode_message("outer", {}, [np.array(["text"])], KEYS, [keys_lib.SYNCER])

  meta, arrays = wire.decode_message(data, KEYS, "contribution", me)
  for fields in ({**meta["fields"], "round": 3.0}, {**meta["fields"], "sent_at": 12},
                 {k: v for k, v in meta["fields"].items() if k != "tokens"}):
    forged = wire.encode_message("contribution", {**meta, "fields": fields}, arrays, KEYS, [me])
    with pytest.raises(MessageError, match="bad header"):
      wire.parse_contribution(forged, KEYS, 1)


def test_mailbox_treats_what_does_not_authenticate_as_absent(url, caplog):
  box = Mailbox(url, SECRET)
  good = wire.contribution_bytes(_contribution(learner=1), 0, KEYS)
  assert box.send(_contribution(learner=1), 0) == "sent"
  box.create("up/2/0000000003/00002", good)  # Learner 1's message under learner 2's key.
  box.create("up/2/0000000003/00003", good[:-1])
  box.create("up/2/0000000003/00004",
             wire.contribution_bytes(_contribution(learner=4), 0, Keyring.from_secret(b"other")))
  box.create("up/2/0000000003/00005", os.urandom(300))
  box.create("up/2/0000000003/00007", b"7 bytes")
  with caplog.at_level("WARNING"):
    for _ in range(3):  # Each object is logged and counted once, however often it is read.
      assert [box.receive(2, 3, m) for m in (2, 3, 4, 5, 6, 7)] == [None] * 6
  assert box.rejected_counts() == {"contribution": {
      "bad hmac": 2, "bad magic": 1, "truncated": 2}}
  assert caplog.text.count("up/2/0000000003/00002 does not count (bad hmac)") == 1
  assert box.receive(2, 3, 1) is not None
  box.create("down/0/0000000001", good)
  assert box.publication(0, 1) is None and box.latest_version(0) is None
  assert box.rejected_counts()["publication"] == {"bad hmac": 1}
  box.create("up/2/0000000003/00002", b"replaced")  # A new object at the same key: counted.
  box._write("up/2/0000000003/00002", os.urandom(64))  # pylint: disable=protected-access
  assert box.receive(2, 3, 2) is None
  assert box.rejected_counts()["contribution"]["bad magic"] == 2


# ------------------------------------------------------- config, GC, link


def test_put_config_refuses_another_runs_config_naming_what_differs(url):
  Mailbox(url, SECRET).put_config('{"lr": 0.7, "seed": 0}')
  Mailbox(url, SECRET).put_config('{"lr": 0.7, "seed": 0}')  # The same run, restarted.
  with pytest.raises(ValueError, match="lr: 0.7 there, 0.5 here"):
    Mailbox(url, SECRET).put_config('{"lr": 0.5, "seed": 0}')
  assert Mailbox(url, SECRET).run_config() == '{"lr": 0.7, "seed": 0}'


def test_collect_deletes_old_keys_but_keeps_the_latest_version(url):
  box = Mailbox(url, SECRET, clock=FakeClock())
  lease = box.acquire("syncer", "S", ttl_s=10)
  for v in (1, 2, 3):
    full = _publication(version=v, base_version=FULL) if v == 2 else None
    assert box.publish(_publication(version=v), lease=lease, outer=_outer(v), full=full)
  for rnd in range(4):
    for m in range(2):
      box.send(_contribution(learner=m, fragment=0, rnd=rnd), 0)
  box.send(_contribution(learner=0, fragment=1, rnd=0), 0)  # Another fragment's.
  # Rounds 0 and 1 of two learners; versions 1 and 2: two publications,
  # two outer states, one full copy.
  assert box.collect(0, below_round=2, below_version=3) == 4 + 5
  assert box.contributions(0) == [(2, 0), (2, 1), (3, 0), (3, 1)]
  assert box.contributions(1) == [(0, 0)]
  assert box.versions(0) == [3] and box.outer_state(0, 3) is not None
  assert box.full_copy(0, 2) is None and box.publication(0, 2) is None
  # Past the latest version: it stays, with its outer state.
  assert box.collect(0, below_round=0, below_version=10) == 0
  assert box.versions(0) == [3] and box.outer_state(0, 3)[1][0][0] == 3.0


def test_throttled_link_takes_its_time(tmp_path):
  value = bytes(1_000_000)
  box = Mailbox(f"file://{tmp_path}/mailbox", SECRET, bytes_per_s=10e6)
  start = time.perf_counter()
  message = wire.encode_message("config", {}, [np.frombuffer(value, np.uint8)], KEYS,
                                [keys_lib.SYNCER])
  assert box.create("big", message)
  assert time.perf_counter() - start >= 0.1
  start = time.perf_counter()
  assert box.read("big") == message
  assert time.perf_counter() - start >= 0.1
  assert box.bytes_written == box.bytes_read == len(message)
  box.bytes_per_s, box.latency_s = float("inf"), 0.2  # Re-throttled while running.
  start = time.perf_counter()
  assert box.keys("") == ["big"]
  assert time.perf_counter() - start >= 0.2


def test_urls_map_to_tensorstore_drivers(tmp_path):
  spec = mailbox_lib.kvstore_spec
  assert spec("gs://bucket/runs/a") == {"driver": "gcs", "bucket": "bucket", "path": "runs/a/"}
  assert spec("s3://bucket") == {"driver": "s3", "bucket": "bucket", "path": "",
                                 "use_conditional_write": True}
  assert spec("s3://b/run?endpoint=http://127.0.0.1:9000") == {
      "driver": "s3", "bucket": "b", "path": "run/", "use_conditional_write": True,
      "endpoint": "http://127.0.0.1:9000", "aws_region": "us-east-1",
      "aws_credentials": {"type": "environment"}}
  assert spec("file:///tmp/box/") == {"driver": "file", "path": "/tmp/box/"}
  assert spec(str(tmp_path)) == {"driver": "file", "path": f"{tmp_path}/"}
  assert spec("memory://t") == {"driver": "memory", "path": "t/"}
  for bad in ("http://host/x", "file://relative", "gs://", "", "gs://b?endpoint=x"):
    with pytest.raises(ValueError):
      spec(bad)
  with pytest.raises(ValueError, match="two slashes"):
    spec("file:/tmp/box")


def test_latest_versions_skip_what_does_not_count(tmp_path):
  box = Mailbox(f"file://{tmp_path}/box", SECRET, clock=FakeClock())
  lease = box.acquire("syncer", "S", ttl_s=10)
  for v in (3, 11):
    assert box.publish(_publication(version=v), lease=lease, outer=_outer(v))
  assert box.publish(_publication(fragment=2, version=1), lease=lease, outer=_outer(1))
  box.create("down/0/9999999999", b"x")  # Planted: absent, whatever its number.
  box.create("down/2/garbage", b"x")
  assert box.latest_versions(3) == [11, None, 1]
  assert box.latest_versions(3) == [box.latest_version(p) for p in range(3)]
  assert box.rejected_counts() == {"publication": {"truncated": 1}}


@pytest.mark.parametrize("where", ["s3 endpoint", "gs"])
def test_an_unreachable_store_fails_at_open_in_seconds_with_one_line(where):
  if where == "gs":  # No credentials here (and no network in CI).
    url = "gs://dd-no-such-bucket/run"
  else:
    with socket.socket() as s:  # A port nothing listens on.
      s.bind(("127.0.0.1", 0))
      url = f"s3://dd-no-such-bucket/run?endpoint=http://127.0.0.1:{s.getsockname()[1]}"
  start = time.monotonic()
  with pytest.raises(mailbox_lib.StoreError, match=f"cannot reach the mailbox {re.escape(url)}"
                                                   " within 2 s: "):
    Mailbox(url, SECRET, timeout_s=2)
  assert time.monotonic() - start < 10


def test_store_errors_that_may_pass_are_retried_then_reported_in_one_line(url):
  clock = FakeClock()
  sleeps = []
  box = Mailbox(url, SECRET, clock=clock, retry_s=30,
                sleep=lambda s: (sleeps.append(s), setattr(clock, "now", clock.now + s)))
  kv, failures = box._kv, [3]  # pylint: disable=protected-access

  class Flaky:
    def write(self, *args, **kwargs):
      if failures[0]:
        failures[0] -= 1
        raise ValueError("UNAVAILABLE: the store is restarting")
      return kv.write(*args, **kwargs)
    def __getattr__(self, name):
      return getattr(kv, name)
  box._kv = Flaky()  # pylint: disable=protected-access
  assert box.create("a", b"1") and len(sleeps) == 3  # Three refusals, then it went through.
  failures[0] = 10**6
  with pytest.raises(mailbox_lib.StoreError, match="write b failed for 30 s: UNAVAILABLE"):
    box.create("b", b"2")
  assert clock.now - 1000.0 <= 30 + 10

  class AnswerLost:  # The write lands; its answer does not.
    def write(self, *args, **kwargs):
      kv.write(*args, **kwargs).result()
      box._kv = kv  # pylint: disable=protected-access
      raise ValueError("UNAVAILABLE: connection reset")
    def __getattr__(self, name):
      return getattr(kv, name)
  box._kv = AnswerLost()  # pylint: disable=protected-access
  assert box.create("c", b"3")  # The retry finds its own bytes there: created.
  assert not box.create("c", b"3")  # ...which a create without an error would not say.


def test_a_learner_joins_only_a_run_that_exists_and_agrees(url):
  clock = FakeClock()
  learner = Mailbox(url, Keyring.from_credential(keys_lib.learner_credential(SECRET, 0)),
                    clock=clock, sleep=lambda s: setattr(clock, "now", clock.now + s))
  with pytest.raises(TimeoutError, match=f"no run at mailbox {re.escape(url)}: waited 30 s"
                                         r" \(dist.startup_s\) for run/config"):
    learner.join('{"lr": 0.7}', startup_s=30, num_fragments=1)
  assert clock.now - 1000.0 <= 31
  syncer = Mailbox(url, SECRET, num_learners=1, clock=clock)
  syncer.put_config('{"lr": 0.7}')
  with pytest.raises(TimeoutError, match="for the first publications"):
    learner.join('{"lr": 0.7}', startup_s=5, num_fragments=1)
  with pytest.raises(ValueError, match="lr: 0.7 there, 0.5 here"):  # At once, not after 5 s.
    learner.join('{"lr": 0.5}', startup_s=5, num_fragments=1)
  lease = syncer.acquire("syncer", "S", ttl_s=10)
  assert syncer.publish(_publication(version=0, base_version=FULL), lease=lease, outer=_outer(0))
  learner.join('{"lr": 0.7}', startup_s=5, num_fragments=1)
  # Learners never create a run: they cannot even sign a config.
  with pytest.raises(ValueError, match="cannot tag"):
    Mailbox(url, Keyring.from_credential(keys_lib.learner_credential(SECRET, 1))).put_config("x")
