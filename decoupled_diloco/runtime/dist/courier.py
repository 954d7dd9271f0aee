"""A learner's network side: uploads, polls for publications, heartbeats.

The training thread hands the courier contributions (`send`) and takes what
landed (`take`); neither call waits for the network. In a process the work
runs in two background threads (`start`); in-process tests call `pump(now)`
instead, which does one round of the same work on the caller's thread, under
the caller's clock.
"""

import atexit
import json
import queue
import threading
import time

import jax
import numpy as np
from absl import logging

from decoupled_diloco.algorithm.messages import Contribution, Notice, Publication
from decoupled_diloco.runtime.dist.mailbox import Lease, Mailbox


class EventLog:
  """JSON lines with times from `clock`, flushed as written (a killed process keeps them)."""

  def __init__(self, path: str | None, clock=time.time, **fields):
    self._file = open(path, "a") if path else None  # None: log nothing.
    self._clock, self._fields = clock, fields

  def __call__(self, event: str, **fields) -> None:
    if self._file is None:
      return
    line = {"t": round(self._clock(), 6), "event": event, **self._fields, **fields}
    self._file.write(json.dumps(line) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class Courier:
  """See module docstring."""

  def __init__(self, mailbox: Mailbox, m: int, num_fragments: int, *, lossless_down: bool,
               notices: bool, lease: Lease, ttl_s: float, poll_s: float, incarnation: int,
               info, log, link_file: str | None = None, clock=time.time):
    self.mailbox, self.m, self.lease = mailbox, m, lease
    self.lossless_down, self.notices = lossless_down, notices
    self.ttl_s, self.poll_s, self.incarnation = ttl_s, poll_s, incarnation
    self.info, self.log, self.link_file, self.clock = info, log, link_file, clock
    self._outbox: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._landed: list[tuple[Publication | Notice, float]] = []
    self.fetched = np.full(num_fragments, -1, np.int64)  # Newest version taken per fragment.
    self.noticed = np.full(num_fragments, -1, np.int64)  # Newest notice round taken.
    self._want_full: set[int] = set()
    self._stop = threading.Event()
    self._next_beat = -np.inf
    self.bytes_up = self.bytes_down = 0
    self.duplicates = 0  # Sends a previous incarnation had made already.
    self.latency_s = 0.0  # Running mean: publication written -> landed here (seconds).
    self.lost: str | None = None  # Why the lease was lost, if it was.
    self._threads = [threading.Thread(target=self._upload_loop, daemon=True, name=f"upload{m}"),
                     threading.Thread(target=self._poll_loop, daemon=True, name=f"poll{m}")]

  def start(self, base_versions, *, threaded: bool = True) -> None:
    self.fetched[:] = base_versions
    if threaded:
      for t in self._threads:
        t.start()
      # A process leaving on an error never reaches `close`: stop the threads before
      # the interpreter finalizes, or a store call still in flight aborts the process.
      atexit.register(self._halt)

  def send(self, c: Contribution) -> None:
    self._outbox.put(c)

  def take(self) -> list[tuple[Publication | Notice, float]]:
    with self._lock:
      landed, self._landed = self._landed, []
    return landed

  def want_full(self, p: int) -> None:
    """The learner holds a version an update cannot apply to: fetch a full copy."""
    with self._lock:
      self._want_full.add(p)

  def pump_uploads(self, until: float | None = None) -> None:
    """Uploads what is queued, on this thread (in-process use; see module docstring):
    everything, or the contributions sent by `until` (the rest was sent later)."""
    while True:
      with self._outbox.mutex:
        head = self._outbox.queue[0] if self._outbox.queue else None
      if head is None or (until is not None and head.sent_at > until):
        return
      self._upload_one(timeout_s=None)

  def pump(self) -> None:
    """Uploads everything queued, then polls and beats, on this thread."""
    self.pump_uploads()
    self._poll_once(beat=True)

  def close(self, timeout_s: float) -> bool:
    """Uploads what is queued (up to `timeout_s` of wall time), then stops; True if all went out."""
    deadline = time.time() + timeout_s
    if not any(t.is_alive() for t in self._threads):
      self.pump_uploads()
    while self._outbox.unfinished_tasks and time.time() < deadline:
      time.sleep(0.01)
    self._halt(max(deadline - time.time(), 1.0))
    atexit.unregister(self._halt)
    return not self._outbox.unfinished_tasks

  def _halt(self, timeout_s: float = 5.0) -> None:
    """Stops the threads, waiting up to `timeout_s` for the store calls they are in."""
    self._stop.set()
    for t in self._threads:
      if t.is_alive():
        t.join(timeout=timeout_s)

  def beat(self, status: str = "running") -> None:
    """Renews the lease with the learner's latest figures."""
    lease = self.mailbox.renew(self.lease, self.ttl_s, {**self.info(), "status": status,
                                                        "incarnation": self.incarnation,
                                                        "latency_s": self.latency_s})
    if lease is None:
      self.lost = f"lease {self.lease.name} was taken over"
      logging.error("learner %d: %s; another process runs this learner", self.m, self.lost)
      self._stop.set()
    else:
      self.lease = lease

  # --- the work ---------------------------------------------------------------------

  def _upload_loop(self) -> None:
    while not self._stop.is_set():
      self._upload_one(timeout_s=0.1)

  def _poll_loop(self) -> None:
    while not self._stop.is_set():
      self._poll_once()
      self._stop.wait(self.poll_s)

  def _upload_one(self, timeout_s: float | None) -> bool:
    """Uploads one queued contribution; False if none was queued (within `timeout_s`)."""
    try:
      c = self._outbox.get(timeout=timeout_s) if timeout_s else self._outbox.get_nowait()
    except queue.Empty:
      return False
    try:
      c = c._replace(payload=tuple(jax.device_get(list(c.payload))))
      outcome = self.mailbox.send(c, self.incarnation)
      if outcome in ("sent", "replaced"):
        self.bytes_up += c.nbytes
        self.log("send", fragment=c.fragment, round=c.round, base_version=c.base_version,
                 steps=c.steps, bytes=c.nbytes, replaced=outcome == "replaced")
        if outcome == "replaced":
          logging.warning("learner %d: fragment %d round %d: an object that did not"
                          " authenticate held its key; replaced it", self.m, c.fragment,
                          c.round)
      elif outcome == "duplicate":
        self.duplicates += 1
        self.log("send_duplicate", fragment=c.fragment, round=c.round)
      else:
        logging.error("learner %d: fragment %d round %d: its key kept being overwritten;"
                      " the contribution is lost", self.m, c.fragment, c.round)
        self.log("send_failed", fragment=c.fragment, round=c.round, error=outcome)
    except Exception as e:  # pylint: disable=broad-except  (a send is lost work, not a crash)
      logging.error("learner %d: send of fragment %d round %d failed: %s", self.m,
                    c.fragment, c.round, e)
      self.log("send_failed", fragment=c.fragment, round=c.round, error=str(e)[:200])
    finally:
      self._outbox.task_done()
    return True

  def _poll_once(self, beat: bool = False) -> None:
    now = self.clock()
    try:
      if beat or now >= self._next_beat:
        self._apply_link()
        self.beat()
        self._next_beat = now + self.ttl_s / 4
      self._fetch()
    except Exception as e:  # pylint: disable=broad-except  (retried at the next poll)
      logging.warning("learner %d: mailbox poll failed: %s", self.m, e)

  def _land(self, message, extra: dict | None = None) -> None:
    now = self.clock()
    with self._lock:
      self._landed.append((message, now))
    if isinstance(message, Notice):
      self.log("noticed", fragment=message.fragment, round=message.round)
      return
    self.bytes_down += message.nbytes
    written = (extra or {}).get("written_at")
    if isinstance(written, (int, float)):  # The syncer's xi_sync: written -> landed here.
      self.latency_s += 0.1 * (max(now - written, 0.0) - self.latency_s)
    self.log("landed", fragment=message.fragment, version=message.version, round=message.round)

  def _fetch(self) -> None:
    for p, latest in enumerate(self.mailbox.latest_versions(len(self.fetched))):
      with self._lock:
        full = p in self._want_full
        self._want_full.discard(p)
      if latest is None or (latest <= self.fetched[p] and not full):
        continue
      if full:
        pubs = [(self.mailbox.full_copy(p, latest), {})]
      elif self.lossless_down:  # Every publication is a full copy: the newest will do.
        pubs = [self.mailbox.publication(p, latest)]
      else:  # Updates apply in order, each to the version before it.
        pubs = []
        for v in range(int(self.fetched[p]) + 1, latest + 1):
          pubs.append(self.mailbox.publication(p, v))
          if pubs[-1] is None:
            break
      for got in pubs:
        if got is None or got[0] is None:  # Collected or corrupt: a full copy replaces it.
          self.want_full(p)
          break
        pub, extra = got
        with self._lock:
          self.fetched[p] = max(self.fetched[p], pub.version)
        self._land(pub, extra)
    if self.notices:
      for p, notice in enumerate(self.mailbox.latest_notices(len(self.noticed), self.noticed)):
        if notice is not None:
          self.noticed[p] = notice.round
          self._land(notice)

  def _apply_link(self) -> None:
    """Takes up a chaos throttle written into the learner's workdir (or its removal)."""
    if self.link_file is None:
      return
    try:
      with open(self.link_file) as f:
        link = json.load(f)
    except (OSError, ValueError):
      link = {}
    self.mailbox.bytes_per_s = float(link.get("bytes_per_s", float("inf")))
    self.mailbox.latency_s = float(link.get("latency_s", 0.0))
