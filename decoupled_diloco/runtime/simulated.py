"""A discrete-event simulation of learners and a syncer on a virtual clock.

Each learner has its own clock, a step-time model (speed factor x lognormal
noise, slower on fewer slices), a failure timeline (`chaos.elastic_timeline`)
and a link with latency and bandwidth. The syncer closes a fragment's round
once `quorum` distinct live learners have contributed, after an adaptive grace
window, or at once when every live learner has reported (Decoupled DiLoCo,
https://arxiv.org/abs/2604.21428). What a step, a snapshot or a merge *does*
is the backend's business: `JaxBackend` (runtime/decoupled.py) trains a real
model, `AnalyticBackend` (runtime/goodput.py) only counts, so the same
protocol runs compute-free for millions of simulated chips.

Events at the same virtual time are processed in a fixed order (arrivals,
merges, step ends, step starts; then by insertion), so a run is deterministic.
Between two `run`s, `snapshot` and `restore` carry the whole state through a
checkpoint, event log included, so a resumed run goes on exactly.
"""

import heapq
import json
import math
import os
from typing import NamedTuple

import numpy as np

from decoupled_diloco.algorithm.messages import Contribution, Publication
from decoupled_diloco.algorithm.syncer import grace_window
from decoupled_diloco.runtime import snapshots

# Event kinds double as priorities at equal times.
ARRIVE_SYNCER, ARRIVE_LEARNER, MERGE, DONE, LOST, START, NOTE = range(7)
_MESSAGE_EVENTS = (ARRIVE_SYNCER, ARRIVE_LEARNER)  # Their data is a message.
_NOISE_CHUNK = 4096
# `Simulation` attributes that a snapshot holds as they are.
_FIELDS = ("now", "total_steps", "_seq", "xi_step", "xi_sync", "contributors_per_merge",
           "_computing", "_num_live", "_advancing_s", "_last_t", "_log_bytes")


class Protocol(NamedTuple):
  """The algorithm's schedule and round rules (see DESIGN.md section 2)."""
  offsets: tuple[int, ...]  # Per-fragment sync offsets.
  sync_every: int  # H.
  overlap: int  # tau.
  quorum: int  # K (already resolved: 1..M).
  grace_gamma: float
  grace_max_s: float
  lockstep: bool  # Learners wait for fragment p at send step + tau.


class Machines(NamedTuple):
  """Time, network and failure models."""
  step_seconds: np.ndarray  # [M] step time on all slices, speed factors applied.
  noise: float  # Lognormal sigma of per-step noise.
  latency_s: float
  bytes_per_s: float  # math.inf: unlimited.
  syncer_seconds: float
  slices_per_learner: int
  chips_per_slice: int
  timelines: list | None  # Per learner `chaos.Timeline`, or None without chaos.
  outages: object  # The `chaos.Outages` behind the timelines (for the event log), or None.
  seed: int


class _Learner:
  """The simulator's view of one learner (its algorithm state is the backend's)."""

  def __init__(self, num_fragments: int):
    self.step = 0
    self.phase = 0  # Added to `step` for the fragment schedule (set on rejoin).
    self.inbox: list[Publication] = []
    self.awaiting: dict[int, int] = {}  # fragment -> send step (lock-step waits).
    self.last_send = np.zeros(num_fragments, np.int64)
    self.waiting_since: float | None = None
    self.down = False
    self.segment = 0
    self.busy_s = self.waiting_s = self.down_s = self.stopped_s = self.lost_s = 0.0
    self.useful_chip_s = 0.0
    self.lost_chip_s = 0.0


class _Round:
  def __init__(self):
    self.opened: float | None = None  # First arrival of the round: xi_quorum counts from it.
    self.timer: float | None = None
    self.id = 0
    self.reported: set[int] = set()  # Accepted or rejected: they will not send again.


class Simulation:
  """Runs the protocol over a backend; see module docstring."""

  def __init__(self, backend, protocol: Protocol, machines: Machines, num_fragments: int,
               log_path: str | None = None):
    self.backend, self.protocol, self.machines = backend, protocol, machines
    self.num_learners = len(machines.step_seconds)
    self.learners = [_Learner(num_fragments) for _ in range(self.num_learners)]
    self._due = [[] for _ in range(protocol.sync_every)]  # step mod H -> fragments due.
    for p, offset in enumerate(protocol.offsets):
      self._due[offset % protocol.sync_every].append(p)
    self.rounds = [_Round() for _ in range(num_fragments)]
    self.now = 0.0
    self.total_steps = 0
    self._heap: list = []
    self._seq = 0
    self._noise_cache: dict[int, tuple[int, np.ndarray]] = {}
    # Appended to, and cut to `_log_bytes` when a run starts: a fresh
    # simulation drops a stale log, a restored one the lines past its checkpoint.
    self._log = open(log_path, "a") if log_path else None
    self._log_bytes = 0
    self.xi_step = float(np.mean(machines.step_seconds))
    self.xi_sync = machines.syncer_seconds
    self.losses: list = []
    self.merges = np.zeros(num_fragments, np.int64)
    self.contributors_per_merge: list[int] = []
    self._computing = 0
    self._num_live = self.num_learners
    self._advancing_s = 0.0
    self._last_t = 0.0
    if machines.outages is not None and self._log is not None:
      self._schedule_failure_notes(machines.outages)
    for m in range(self.num_learners):
      self._push(0.0, START, m)

  # --- plumbing --------------------------------------------------------------

  def _push(self, t: float, kind: int, data) -> None:
    heapq.heappush(self._heap, (t, kind, self._seq, data))
    self._seq += 1

  def log(self, event: str, **fields) -> None:
    if self._log is not None:
      line = json.dumps({"t": round(self.now, 9), "event": event, **fields}) + "\n"
      self._log_bytes += self._log.write(line)  # ASCII: characters are bytes.

  def close(self) -> None:
    if self._log is not None:
      self._log.close()
      self._log = None

  def _noise(self, m: int, step: int) -> float:
    if not self.machines.noise:
      return 1.0
    chunk = step // _NOISE_CHUNK
    cached = self._noise_cache.get(m)
    if cached is None or cached[0] != chunk:
      z = np.random.default_rng((self.machines.seed, m, chunk)).standard_normal(_NOISE_CHUNK)
      sigma = self.machines.noise
      cached = (chunk, np.exp(sigma * z - sigma * sigma / 2))  # Mean 1.
      self._noise_cache[m] = cached
    return float(cached[1][step % _NOISE_CHUNK])

  def _transfer_s(self, nbytes: int) -> float:
    return self.machines.latency_s + nbytes / self.machines.bytes_per_s

  def _segment(self, m: int):
    """(slices up, running, segment end) of learner m's failure timeline at now."""
    timelines = self.machines.timelines
    if timelines is None:
      return self.machines.slices_per_learner, True, math.inf
    line, lr = timelines[m], self.learners[m]
    while lr.segment < len(line.end) and line.end[lr.segment] <= self.now:
      lr.segment += 1
    if lr.segment == len(line.end):  # Past the sampled horizon: all up.
      return self.machines.slices_per_learner, True, math.inf
    i = lr.segment
    return int(line.slices_up[i]), bool(line.running[i]), float(line.end[i])

  def _schedule_failure_notes(self, outages) -> None:
    """Slice failures and repairs go into the event log at their times."""
    per = self.machines.slices_per_learner
    for s, start, end in zip(outages.slice.tolist(), outages.start.tolist(),
                             outages.end.tolist()):
      fields = {"learner": s // per, "slice": s % per}
      self._push(start, NOTE, ("fail", fields))
      self._push(end, NOTE, ("repair", fields))

  # --- the event loop ----------------------------------------------------------

  def run(self, total_steps: int) -> list:
    """Processes events until learners have taken `total_steps` inner steps in all.

    Events at the virtual time of the last of those steps are processed too
    (merges, alignments), so the state is that of a whole instant. Returns the
    losses of the steps taken meanwhile (backend values).
    """
    self.losses = []
    if self._log is not None:
      self._log.truncate(self._log_bytes)
    heap = self._heap
    while self.total_steps < total_steps or (heap and heap[0][0] <= self.now):
      if not heap:
        raise RuntimeError("the simulation has no events left: every learner is waiting"
                           " and no round can close; check diloco.quorum and sim.lockstep.")
      t, kind, _, data = heapq.heappop(heap)
      if self._computing:
        self._advancing_s += t - self._last_t
      self._last_t = self.now = t
      if kind == START:
        self._start(data)
      elif kind == DONE:
        self._done(*data)
      elif kind == ARRIVE_SYNCER:
        self._arrive_syncer(data)
      elif kind == ARRIVE_LEARNER:
        self._arrive_learner(data)
      elif kind == MERGE:
        self._merge_timer(*data)
      elif kind == LOST:
        self._lost(*data)
      else:
        self.log(data[0], **data[1])
    return self.losses

  def _start(self, m: int) -> None:
    lr = self.learners[m]
    up, running, end = self._segment(m)
    if up == 0 or not running:
      if up == 0 and not lr.down:
        self._go_down(m)
      span = end - self.now
      if up == 0:
        lr.down_s += span
      else:
        lr.stopped_s += span
      self._push(end, START, m)
      return
    if lr.down:
      lr.down = False
      self._num_live += 1
      # Restarting from the global fragments, the learner also takes up the
      # live learners' place in the fragment schedule, so its sends fall in
      # the same rounds as theirs instead of forming rounds of their own.
      live = [o.step + o.phase for o in self.learners if not o.down and o is not lr]
      if live:
        lr.phase = max(live) - lr.step
      self.log("rejoin", learner=m, step=lr.step, phase=lr.phase)
      self.backend.rejoin(m)
      lr.awaiting.clear()
    if lr.inbox:
      align = self.backend.align
      for pub in lr.inbox:
        align(m, pub)
        if lr.awaiting:
          lr.awaiting.pop(pub.fragment, None)
        if self._log:
          self.log("align", learner=m, fragment=pub.fragment, version=pub.version)
      lr.inbox.clear()
    if self.protocol.lockstep and any(s <= lr.step - self.protocol.overlap
                                      for s in lr.awaiting.values()):
      lr.waiting_since = self.now
      return
    full = self.machines.slices_per_learner
    duration = self.machines.step_seconds[m] * self._noise(m, lr.step) * full / up
    chips = up * self.machines.chips_per_slice
    if self.now + duration > end:  # A failure will interrupt this step.
      self._push(end, LOST, (m, end - self.now, chips))
    else:
      self._computing += 1
      self._push(self.now + duration, DONE, (m, duration, chips))

  def _done(self, m: int, duration: float, chips: int) -> None:
    lr = self.learners[m]
    self._computing -= 1
    lr.step += 1
    self.total_steps += 1
    lr.busy_s += duration
    lr.useful_chip_s += duration * chips
    self.xi_step += 0.1 * (duration - self.xi_step)
    self.losses.append(self.backend.inner_step(m))
    if self._log:
      self.log("step", learner=m, step=lr.step, seconds=round(duration, 9))
    for p in self._due[(lr.step + lr.phase) % self.protocol.sync_every]:
      c = self.backend.snapshot(m, p)
      lr.last_send[p] = lr.step
      if self.protocol.lockstep:
        lr.awaiting[p] = lr.step
      if self._log:
        self.log("send", learner=m, fragment=p, base_version=c.base_version, bytes=c.nbytes)
      self._push(self.now + self._transfer_s(c.nbytes), ARRIVE_SYNCER, c)
    self._push(self.now, START, m)

  def _lost(self, m: int, seconds: float, chips: int) -> None:
    lr = self.learners[m]
    lr.lost_s += seconds
    lr.lost_chip_s += seconds * chips
    self.log("lost_step", learner=m, step=lr.step + 1, seconds=round(seconds, 9))
    self._start(m)

  def _go_down(self, m: int) -> None:
    """All slices lost: the learner's parameters and unsent progress are gone."""
    lr = self.learners[m]
    lr.down = True
    self._num_live -= 1
    lr.inbox.clear()
    if lr.step:
      unsent_steps = float(np.mean(lr.step - lr.last_send))
      per_step = lr.useful_chip_s / lr.step
      lr.lost_chip_s += unsent_steps * per_step
      lr.useful_chip_s -= unsent_steps * per_step
    self.log("down", learner=m, step=lr.step)

  def _arrive_syncer(self, c: Contribution) -> None:
    p = c.fragment
    rnd = self.rounds[p]
    rnd.reported.add(c.learner)
    if rnd.opened is None:
      rnd.opened = self.now
    live = max(self._num_live, 1)
    if not self.backend.receive(c):
      self.log("reject", learner=c.learner, fragment=p)
      if len(rnd.reported) >= live:
        self._merge(p)  # Nobody else will report this round: close it.
      return
    n = self.backend.contributors(p)
    if self._log:
      self.log("arrive", learner=c.learner, fragment=p, contributors=n)
    if rnd.timer is None and n >= min(self.protocol.quorum, live):
      grace = 0.0
      if self.protocol.grace_gamma > 0 and len(rnd.reported) < live:
        grace = grace_window(overlap=self.protocol.overlap, step_s=self.xi_step,
                             quorum_s=self.now - rnd.opened, sync_s=self.xi_sync,
                             gamma=self.protocol.grace_gamma,
                             grace_max_s=self.protocol.grace_max_s)
      if grace <= 0:
        self._merge(p)
      else:
        rnd.timer = self.now + grace
        if self._log:
          self.log("grace", fragment=p, seconds=round(grace, 9))
        self._push(rnd.timer, MERGE, (p, rnd.id))
    elif len(rnd.reported) >= live:
      self._merge(p)  # Everyone live has reported: close the round (grace ends early).

  def _merge_timer(self, p: int, round_id: int) -> None:
    if self.rounds[p].id == round_id and self.rounds[p].timer is not None:
      self._merge(p)

  def _merge(self, p: int) -> None:
    rnd = self.rounds[p]
    n = self.backend.contributors(p)
    pub = self.backend.merge(p)
    rnd.id += 1
    rnd.timer = None
    rnd.opened = None
    rnd.reported = set()
    if pub is None:
      if not self.protocol.lockstep:
        return
      pub = self.backend.publication(p)  # Waiting learners must not wait forever.
    else:
      self.merges[p] += 1
      self.contributors_per_merge.append(n)
      if self._log:
        self.log("merge", fragment=p, version=pub.version, contributors=n, bytes=pub.nbytes)
    sync_s = self.machines.syncer_seconds + self._transfer_s(pub.nbytes)
    self.xi_sync += 0.1 * (sync_s - self.xi_sync)
    if self._log:
      self.log("publish", fragment=p, version=pub.version,
               arrives=round(self.now + sync_s, 9))
    self._push(self.now + sync_s, ARRIVE_LEARNER, pub)  # Every link alike: one event.

  def _arrive_learner(self, pub: Publication) -> None:
    """The publication lands at every learner that is up; a down one misses it."""
    for m, lr in enumerate(self.learners):
      if lr.down:
        continue
      lr.inbox.append(pub)
      if lr.waiting_since is not None:
        lr.waiting_s += self.now - lr.waiting_since
        lr.waiting_since = None
        self._start(m)

  # --- checkpoints -----------------------------------------------------------------

  def snapshot(self, messages: snapshots.MessageTable) -> dict:
    """The state between two `run`s as JSON; messages go into `messages`.

    Failure timelines and step-time noise are recomputed from the seeds, so
    they are not part of it.
    """
    if self._log is not None:
      self._log.flush()  # The checkpoint vouches for `_log_bytes` on disk.
    heap = [(t, kind, seq, messages.ref(data) if kind in _MESSAGE_EVENTS else data)
            for t, kind, seq, data in self._heap]
    learners = [{**vars(lr), "inbox": [messages.ref(pub) for pub in lr.inbox],
                 "awaiting": list(lr.awaiting.items()), "last_send": lr.last_send.tolist()}
                for lr in self.learners]
    rounds = [{**vars(rnd), "reported": sorted(rnd.reported)} for rnd in self.rounds]
    return snapshots.to_json({"heap": heap, "learners": learners, "rounds": rounds,
                              "fields": {name: getattr(self, name) for name in _FIELDS},
                              "merges": self.merges.tolist()})

  def restore(self, snapshot: dict, messages: snapshots.MessageTable) -> None:
    """Takes up the state `snapshot` returned, on a simulation of the same config."""
    s = snapshots.from_json(snapshot)
    log_bytes = s["fields"]["_log_bytes"]
    if self._log is not None and os.fstat(self._log.fileno()).st_size < log_bytes:
      raise ValueError(f"{self._log.name} is shorter than the {log_bytes} bytes it had at"
                       " the checkpoint; resume in the workdir that wrote both.")
    self._heap = [(t, kind, seq, messages.message(data) if kind in _MESSAGE_EVENTS
                   else tuple(data) if isinstance(data, list) else data)
                  for t, kind, seq, data in s["heap"]]  # Same list, same heap order.
    for lr, saved in zip(self.learners, s["learners"]):
      vars(lr).update(saved, inbox=[messages.message(ref) for ref in saved["inbox"]],
                      awaiting=dict(saved["awaiting"]),
                      last_send=np.array(saved["last_send"], np.int64))
    for rnd, saved in zip(self.rounds, s["rounds"]):
      vars(rnd).update(saved, reported=set(saved["reported"]))
    vars(self).update(s["fields"])
    self.merges = np.array(s["merges"], np.int64)

  # --- accounting ----------------------------------------------------------------

  def report(self) -> dict:
    """Goodput (useful / allocated chip-time), uptime and per-learner times."""
    wall = max(self.now, 1e-12)
    chips = self.machines.slices_per_learner * self.machines.chips_per_slice
    useful = sum(lr.useful_chip_s for lr in self.learners)
    return {
        "virtual_seconds": self.now,
        "goodput": useful / (chips * self.num_learners * wall),
        "uptime": self._advancing_s / wall,
        "merges_per_fragment": self.merges.tolist(),
        "mean_contributors_per_merge": (float(np.mean(self.contributors_per_merge))
                                        if self.contributors_per_merge else 0.0),
        "learners": [{"steps": lr.step, "busy_s": lr.busy_s, "waiting_s": lr.waiting_s,
                      "down_s": lr.down_s, "stopped_s": lr.stopped_s, "lost_s": lr.lost_s}
                     for lr in self.learners],
    }
