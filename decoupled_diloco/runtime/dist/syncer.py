"""The syncer as a process of the real runtime (DESIGN.md §5).

`SyncerService` holds `lease/syncer`, reads new contributions and feeds them
to the round protocol (`algorithm/protocol.py`: the same object the simulator
drives), with the learners' leases as liveness (by identity) and the wall
clock as time. It performs what the protocol returns: each merge is committed
as the fragment's outer state, then its publication, both create-once under
the new version (the version is the fencing token); a round that closes with
nothing merged while learners wait is answered by a notice.

A restarted (or standby) syncer takes the lease once it expires, reloads
each fragment's newest committed version (its `FragmentState` tree and the
protocol's state for it) and re-reads the contributions after the ones that
version consumed, so no committed round is lost or applied twice.

Clock and sleep are injected; `start(now)` and `step(now)` are the loop's
parts, so a test drives the service in-process under a fake clock
(`threaded=False` renews the lease in `step` instead of in a thread).
"""

import os
import socket
import threading
import time

import jax
import numpy as np
from absl import logging

from decoupled_diloco import islands as islands_lib
from decoupled_diloco import steps
from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.algorithm import protocol as protocol_lib
from decoupled_diloco.algorithm.messages import Notice, Publication
from decoupled_diloco.config import Config
from decoupled_diloco.runtime import team as team_lib
from decoupled_diloco.runtime.dist import mailbox as mb_lib
from decoupled_diloco.runtime.dist.courier import EventLog
from decoupled_diloco.runtime.dist.learner import (LEARNER_LEASES, SYNCER_LEASE, learner_index,
                                                   live)
from decoupled_diloco.runtime.dist.mailbox import Lease, Mailbox
from decoupled_diloco.tasks import base as tasks_base
from decoupled_diloco.tasks.base import Task

_SERVICE_COUNTS = ("recoveries", "rejected_mailbox")


class Fenced(RuntimeError):
  """This syncer lost its lease, or another one published a version it was about to."""


class SyncerService:
  """The syncer as a process; see module docstring. `run()` returns its summary."""

  def __init__(self, cfg: Config, task: Task, workdir: str, mailbox: Mailbox, *,
               clock=time.time, sleep=time.sleep, threaded: bool = True, step_s: float = 0.0):
    """`step_s`: a prior of the learners' step time (0: none), until they report theirs."""
    d = cfg.diloco
    self.cfg, self.workdir, self.mailbox, self.task = cfg, workdir, mailbox, task
    self.clock, self.sleep, self.threaded = clock, sleep, threaded
    params, self.fragments, self.offsets = team_lib.global_model(cfg, task)
    # Learners' local state (if the task has any) never reaches the syncer: its
    # eval takes the initial one.
    self.local_init = team_lib.local_state(task, params)
    flat = tasks_base.mergeable(task, fragments_lib.flatten(params))
    self.syncer = team_lib.make_syncer(cfg, task, flat, self.fragments)
    up, down = team_lib.payload_bytes(cfg, flat, self.fragments)
    outer = [sum(np.asarray(a).nbytes for a in jax.tree.leaves(self.syncer.fragment_state(p)))
             for p in range(len(self.fragments))]
    mailbox.limits = mb_lib.Limits.of(up, down, outer, d.num_learners)
    mailbox.audience = mb_lib.audience(d.num_learners)  # Who its publications are for.
    del params, flat
    self.num_fragments, self.num_learners = len(self.fragments), d.num_learners
    self.protocol = protocol_lib.SyncerProtocol(
        protocol_lib.SyncerMerger(self.syncer), team_lib.schedule(cfg, self.offsets),
        team_lib.round_rules(cfg), self.num_learners, step_s=step_s)
    # Per fragment and learner, the newest round read (consumed once merged).
    self.seen = np.full((self.num_fragments, self.num_learners), -1, np.int64)
    self.deferred: set[tuple[int, int, int]] = set()  # Keys too far ahead to read yet.
    self.leases: dict[int, Lease] = {}  # Each learner's newest lease that counted.
    self.incarnations = [None] * self.num_learners
    self.live = [None] * self.num_learners
    self.commits = np.zeros(self.num_fragments, np.int64)
    self._write_s = 0.0  # How long the latest commit's writes took.
    self.counts = dict.fromkeys(_SERVICE_COUNTS, 0)
    self.holder = f"{socket.gethostname()}:{os.path.abspath(workdir)}:{os.getpid()}:{id(self)}"
    self.lease: Lease | None = None
    self.lost = False  # Set when another syncer took the lease over.
    self._stop = threading.Event()
    self._lease_lock = threading.Lock()
    self._lease_thread: threading.Thread | None = None
    self._next_renew = -np.inf
    self._warm = False
    self.log = EventLog(os.path.join(workdir, "events.jsonl"), clock=clock, role="syncer")
    self.started = clock()

  # --- leading ----------------------------------------------------------------------

  def start(self) -> bool:
    """Takes the syncer lease if it is free and recovers; False while another leads."""
    if not self._warm:
      self.syncer.warm_up()
      self._warm = True
    lease = self.mailbox.acquire(SYNCER_LEASE, self.holder, self.cfg.dist.lease_s)
    if lease is None:
      return False
    self.lease = lease
    self._next_renew = self.clock() + self.cfg.dist.lease_s / 4
    self.log("lead", epoch=lease.epoch)
    logging.info("syncer: leading (epoch %d)", lease.epoch)
    self._recover()
    if self.threaded:
      self._lease_thread = threading.Thread(target=self._keep_lease, daemon=True,
                                            name="syncer-lease")
      self._lease_thread.start()
    return True

  def _renew(self) -> None:
    with self._lease_lock:
      try:
        lease = self.mailbox.renew(self.lease, self.cfg.dist.lease_s)
      except Exception as e:  # pylint: disable=broad-except  (retried; expiry decides)
        logging.warning("syncer: lease renewal failed: %s", e)
        return
      if lease is None:
        self.lost = True
      else:
        self.lease = lease

  def _keep_lease(self) -> None:
    """Renews the lease in the background: a long compile or merge must not lose it."""
    while not self._stop.wait(self.cfg.dist.lease_s / 4) and not self.lost:
      self._renew()

  def _stop_renewing(self) -> None:
    """Stops the renewal thread and waits for a renewal in flight (up to a lease's time).

    A renewal still in flight when the process exits comes back into a finalizing
    interpreter from tensorstore's C++, which aborts the process; and one that lands
    after `release` would hold the lease again until it expires.
    """
    self._stop.set()
    if self._lease_thread is not None and self._lease_thread.is_alive():
      self._lease_thread.join(self.cfg.dist.lease_s)
      if self._lease_thread.is_alive():
        logging.warning("syncer: a lease renewal is still in flight after %.1f s",
                        self.cfg.dist.lease_s)

  # --- durable state, one fragment at a time -------------------------------------------

  def _fragment_state(self, p: int) -> tuple[dict, list]:
    """(meta, arrays) of fragment p as committed with its version: the syncer's
    `FragmentState` tree as arrays, the protocol's state of the fragment as meta."""
    r, proto = self.protocol.rounds, self.protocol
    meta = {"open": r.open[p], "reported": r.reported[p].tolist(), "seen": self.seen[p].tolist(),
            "published": int(proto.published[p]), "clipped": self.syncer.clipped,
            "rejected": dict(self.syncer.rejected), "counts": {**proto.counts, **self.counts},
            "xi": [r.xi_step, r.xi_quorum, r.xi_sync], "step_s": proto.step_s.tolist(),
            "mailbox_rejected": self.mailbox.rejected_counts(),
            "bad_objects": self.mailbox.bad_objects()}
    leaves = jax.tree.leaves(self.syncer.fragment_state(p))
    return meta, [np.asarray(a) for a in jax.device_get(leaves)]

  def _load_fragment(self, p: int, meta: dict, arrays: list) -> bool:
    """Takes up what `_fragment_state(p)` wrote; False if it does not fit this run."""
    template = self.syncer.fragment_state(p)
    leaves, tree = jax.tree.flatten(template)
    if len(arrays) != len(leaves) or any(np.shape(a) != np.shape(l) or
                                         np.asarray(a).dtype != np.asarray(l).dtype
                                         for a, l in zip(arrays, leaves)):
      logging.error("syncer: the outer state of fragment %d does not fit this run's model", p)
      return False
    self.syncer.load_fragment_state(p, jax.tree.unflatten(tree, [np.array(a) for a in arrays]))
    r = self.protocol.rounds
    r.open[p], r.reported[p] = meta["open"], meta["reported"]
    self.protocol.published[p] = meta["published"]
    self.seen[p] = meta["seen"]
    return True

  def _recover(self) -> None:
    """Takes up each fragment's newest committed version (or publishes version 0)."""
    newest = None
    for p in range(self.num_fragments):
      for v in reversed(self.mailbox.versions(p)):
        if (state := self.mailbox.outer_state(p, v)) is not None and self._load_fragment(p, *state):
          if newest is None or v > newest[0]:
            newest = (v, state[0])
          break
      else:
        self._commit(self.syncer.publication(p))  # Version 0: what every learner starts from.
    if newest is not None:
      meta, proto = newest[1], self.protocol
      self.syncer.clipped = meta["clipped"]
      self.syncer.rejected.clear()
      self.syncer.rejected.update(meta["rejected"])
      for name, value in meta["counts"].items():
        (self.counts if name in _SERVICE_COUNTS else proto.counts)[name] = value
      proto.rounds.xi_step, proto.rounds.xi_quorum, proto.rounds.xi_sync = meta["xi"]
      proto.step_s = np.array(meta["step_s"], np.float64)
      self.mailbox.load_rejected(meta.get("mailbox_rejected", {}), meta.get("bad_objects", []))
      self.counts["recoveries"] += 1
      logging.info("syncer: recovered versions %s from the mailbox",
                   self.syncer.version.tolist())
    self.log("recovered", versions=self.syncer.version.tolist(),
             merges=self.syncer.merges.tolist(), open=list(self.protocol.rounds.open))

  def _commit(self, pub: Publication) -> None:
    """Writes the outer state, then the publication; raises `Fenced` if it lost the race.

    The sync time is observed before the write (with the previous write's duration), so
    the state committed with the version holds it: a syncer that recovers from it has
    the estimates of the one it replaces.
    """
    p = pub.fragment
    full = self.syncer.publication(p) if self.syncer.held is not None and pub.round >= 0 else None
    # The publication lands at the learners about one poll later, as they measure it.
    latencies = [l.info.get("latency_s", 0.0) for l in self.leases.values()]
    self.protocol.rounds.observe_sync(
        self._write_s + (float(np.median(latencies)) if latencies else 0.0))
    t0 = self.clock()
    if not self.mailbox.publish(pub, lease=self.lease, outer=self._fragment_state(p), full=full,
                                written_at=t0):
      raise Fenced(f"version {pub.version} of fragment {p} was published by another syncer")
    self._write_s = self.clock() - t0
    self.commits[p] += 1
    self.log("publish", fragment=p, version=pub.version, round=pub.round, bytes=pub.nbytes)
    if self.commits[p] % self.cfg.dist.gc_every == 0:
      self._collect(p)

  def _notify(self, notice: Notice) -> None:
    if not self.mailbox.notify(notice, lease=self.lease):
      raise Fenced(f"this syncer no longer holds the lease (notice of fragment {notice.fragment})")
    self.log("notice", fragment=notice.fragment, round=notice.round, version=notice.version)

  def _collect(self, p: int) -> None:
    """Deletes keys behind the slowest live learner (and old publications)."""
    alive = [m for m in range(self.num_learners) if self.live[m]]
    if not alive:
      return
    below_round = int(min(self.seen[p, m] for m in alive)) + 1
    infos = [self.leases[m].info if m in self.leases else {} for m in alive]
    bases = [i.get("base_versions", [0] * self.num_fragments)[p] for i in infos]
    below_version = min(int(min(bases)), int(self.syncer.version[p]) - self.cfg.dist.keep_versions)
    n = self.mailbox.collect(p, below_round=below_round, below_version=max(below_version, 0))
    self.log("collect", fragment=p, below_round=below_round, below_version=below_version,
             deleted=n)

  # --- the loop -------------------------------------------------------------------------

  def _perform(self, effects) -> None:
    for e in effects:
      if isinstance(e, protocol_lib.Publish):
        if isinstance(e.message, Notice):
          self._notify(e.message)
        else:
          self._commit(e.message)
      elif isinstance(e, protocol_lib.Log):
        self.log(e.event, **e.fields)
      # A `Timer` needs nothing: `step` ticks the protocol at every poll.

  def _update_live(self, now: float) -> bool:
    """Live learners from their leases; True when every learner is done."""
    for name, lease in self.mailbox.leases(LEARNER_LEASES).items():
      # A lease counts until it expires, even if an object that does not count
      # replaced it meanwhile (that object is absent for every decision).
      if (m := learner_index(name, self.num_learners)) is not None:
        self.leases[m] = lease
    done = 0
    for m in range(self.num_learners):
      lease = self.leases.get(m)
      if lease is not None:
        done += lease.info.get("status") == "done"
      up = live(lease, now) or (lease is None and now - self.started < self.cfg.dist.startup_s)
      incarnation = lease.info.get("incarnation") if lease else None
      if up and incarnation is not None and incarnation != self.incarnations[m]:
        if self.incarnations[m] is not None:  # A restart: it will not send what it skipped.
          self._perform(self.protocol.rejoined(m, int(lease.info.get("position", 0)), now))
        self.incarnations[m] = incarnation
        self.log("learner_up", learner=m, incarnation=incarnation)
      if up != self.live[m]:
        self._perform(self.protocol.set_live(m, up, now))
        if self.live[m] is not None:
          self.log("learner_up" if up else "learner_down", learner=m)
        self.live[m] = up
    return done == self.num_learners

  def _read(self, p: int, now: float) -> None:
    unread: dict[int, list[int]] = {}  # Per learner, rounds whose key holds no contribution.
    for rnd, m in self.mailbox.contributions(p):
      if not 0 <= m < self.num_learners or rnd <= self.seen[p, m]:
        continue
      if self.protocol.too_early(p, rnd):
        # Learners run ahead of a syncer that was down: read it once the open
        # round catches up (a lie about the round waits for ever, unread).
        if (p, rnd, m) not in self.deferred:
          self.deferred.add((p, rnd, m))
          self.log("defer", learner=m, fragment=p, round=rnd, open=self.protocol.rounds.open[p])
        break
      got = self.mailbox.receive(p, rnd, m)
      if got is None:  # Absent (an object that does not count): the learner may still send.
        unread.setdefault(m, []).append(rnd)
        continue
      # Learners send each fragment's rounds in order: one that sent this round
      # will not replace what did not count in an earlier one.
      for skipped in unread.pop(m, []):
        self.counts["rejected_mailbox"] += 1
        self._perform(self.protocol.unreadable(m, p, skipped, now, "message", decide=False))
      self.seen[p, m] = rnd
      self._perform(self.protocol.arrive(got[0], now, decide=False))
    self._perform(self.protocol.decide(p, now))  # What this poll read came together.

  def step(self, now: float) -> bool:
    """One poll: liveness, new contributions, timers; True once every learner is done
    (what still waits is then merged)."""
    if not self.threaded and now >= self._next_renew:
      self._renew()
      self._next_renew = now + self.cfg.dist.lease_s / 4
    if self.lost:
      raise Fenced("the syncer lease was taken over by another syncer")
    finished = self._update_live(now)
    for p in range(self.num_fragments):
      self._read(p, now)
    self._perform(self.protocol.tick(now))
    if finished:  # What still waits (late work of the last learners) is merged.
      self._perform(self.protocol.finish(now))
    return finished

  def next_deadline(self) -> float | None:
    """The earliest grace window's end, if any (when `step` has something to do)."""
    return min((d for d in self.protocol.rounds.deadline if d is not None), default=None)

  def run(self) -> dict:
    """Leads (or stands by), merges until every learner is done; returns the summary."""
    waiting = False
    while not self.start():
      if not waiting:
        other = self.mailbox.read_lease(SYNCER_LEASE)
        logging.info("syncer: %s leads; standing by until its lease expires",
                     other.holder if other else "another syncer")
        waiting = True
      self.sleep(self.cfg.dist.poll_s * 4)
    last_report = self.clock()
    try:
      while not self.step(self.clock()):
        if self.clock() - last_report > 10:
          last_report = self.clock()
          logging.info("syncer: versions %s, live learners %s, rejected %d",
                       self.syncer.version.tolist(),
                       [m for m in range(self.num_learners) if self.live[m]],
                       sum(self.syncer.rejected.values()))
        self.sleep(self.cfg.dist.poll_s)
      return self.finish()
    finally:
      self._stop_renewing()  # Also when `step` raises (`Fenced`, a store error).

  def finish(self) -> dict:
    """Evaluates the global model, releases the lease; returns the summary."""
    cfg = self.cfg
    island = islands_lib.make_islands(1, devices=[self.syncer.device])[0]
    batches = self.task.eval_batches(cfg.data.batch_size, cfg.train.eval_batches)
    params = team_lib.global_params(self.syncer.global_flat(), self.local_init)
    means = steps.evaluate(steps.make_eval(self.task, island), island, params, batches)
    loss = means["loss"]
    named = self.task.eval_metrics(means) if np.isfinite(loss) else {}
    rounds = self.protocol.rounds
    summary = {
        **{f"final_eval_{k}": v for k, v in {**means, **named}.items()},
        "versions": self.syncer.version.tolist(), "outer_steps": int(self.syncer.merges.sum()),
        "merges_per_fragment": self.syncer.merges.tolist(),
        "rejected_contributions": dict(self.syncer.rejected),
        "rejected_objects": self.mailbox.rejected_counts(), "clipped": self.syncer.clipped,
        "protocol": {**self.protocol.counts, **self.counts, "xi_step": rounds.xi_step,
                     "xi_quorum": rounds.xi_quorum, "xi_sync": rounds.xi_sync},
        "wall_seconds": self.clock() - self.started, "epoch": self.lease.epoch,
        "learners": {str(m): l.info for m, l in sorted(self.leases.items())},
    }
    self._stop_renewing()
    self.mailbox.release(self.lease)
    self.log("done", versions=self.syncer.version.tolist(), eval_loss=loss)
    self.log.close()
    logging.info("syncer: the global model's eval loss %.4f after versions %s", loss,
                 self.syncer.version.tolist())
    return summary
