"""A discrete-event simulation of learners and a syncer on a virtual clock.

Each learner has its own clock, a step-time model (speed factor x lognormal
noise), a failure timeline (`chaos.elastic_timeline`) and a link with latency
and bandwidth. Every rule of the round protocol (rounds, quorum, grace, late
verdicts, releases, re-phase, rejoin placement; Decoupled DiLoCo,
https://arxiv.org/abs/2604.21428) is `algorithm/protocol.py`'s: the simulator
feeds it events in virtual time and performs the effects it returns, as the
real runtime (runtime/dist/) does in wall time. What a step, a
pseudo-gradient or a merge *does* is the backend's business (`Backend`):
`JaxBackend` (runtime/decoupled.py) trains a real model, `AnalyticBackend`
(runtime/goodput.py) only counts, so the same protocol runs compute-free for
millions of simulated chips.

A run's budget (`run`) is global batches of data by default (`budget="tokens"`:
an inner step on `share` of a learner's batch is that share of its full-batch
step, so a run whose learners shrink their batches on fewer slices trains on
as much data as one without failures) or inner steps (`"inner_steps"`, the
rule before; such a run trains on less data). With full batches both stop at
the same event.

Events at the same virtual time are processed in a fixed order (arrivals,
merges, step ends, step starts; then by insertion), so a run is deterministic.
Between two `run`s, `state` and `load_state` carry the whole state through a
checkpoint, event log included, so a resumed run goes on exactly.
"""

import heapq
import json
import math
import os
import typing
from typing import NamedTuple

import numpy as np

from decoupled_diloco.algorithm import protocol as protocol_lib
from decoupled_diloco.algorithm import rounds as rounds_lib
from decoupled_diloco.algorithm.messages import Contribution, Notice, Publication
from decoupled_diloco.runtime import serialization

# Event kinds double as priorities at equal times.
ARRIVE_SYNCER, ARRIVE_LEARNER, MERGE, DONE, LOST, START, NOTE = range(7)
_MESSAGE_EVENTS = (ARRIVE_SYNCER, ARRIVE_LEARNER)  # Their data is a message.
_NOISE_CHUNK = 4096
# `Simulation` attributes that a checkpoint holds as they are.
_FIELDS = ("now", "total_steps", "batch_parts", "_seq", "contributors_per_merge", "_computing",
           "_advancing_s", "_last_t", "_log_bytes", "counts")
BUDGETS = ("tokens", "inner_steps")  # What `Simulation.run`'s step budget counts.
LOSS_CAUSES = ("slices_down", "reconfiguration", "lost_steps", "unsent_work", "waiting",
               "idle_spares", "in_progress")


class Protocol(NamedTuple):
  """The algorithm's schedule and round rules (see DESIGN.md section 2)."""
  schedule: protocol_lib.Schedule
  rules: rounds_lib.RoundRules


class World(NamedTuple):
  """Everything outside the algorithm: step times, network, failures."""
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
  shrink_batch: bool = True  # On fewer slices: smaller batch, same step time (else slower).


class Backend(protocol_lib.Merger, typing.Protocol):
  """What the simulator needs of whoever holds the learners' and syncer's state.

  The syncer's half is the protocol's `Merger`.
  """

  def inner_step(self, m: int, share: float):
    """Learner m's next inner step on `share` of its batch; returns its loss (or None)."""

  def send(self, m: int, p: int, rnd: int) -> Contribution | None:
    """Learner m's pseudo-gradient of fragment p for round `rnd`.

    None if the learner diverged and recovered from the global model instead.
    """

  def deliver(self, m: int, pub: Publication) -> str:
    """Learner m receives `pub` ("applied", "stale" or "full_copy")."""

  def rejoin(self, m: int, schedule_step: int) -> None:
    """Learner m, back from zero slices, restarts from the global fragments."""


class _Learner:
  """The simulator's view of one learner (its algorithm state is the backend's)."""

  def __init__(self, schedule: protocol_lib.Schedule):
    self.schedule = protocol_lib.LearnerSchedule(schedule)
    self.inbox: list[Publication | protocol_lib.Notice] = []
    self.last_send = np.zeros(len(schedule.offsets), np.int64)
    self.waiting_since: float | None = None
    self.down = False
    self.segment = 0
    self.step_ema = 0.0  # Running estimate of its step time, reported with its sends.
    self.busy_s = self.waiting_s = self.down_s = self.stopped_s = self.lost_s = 0.0
    self.useful_chip_s = 0.0
    self.lost_chip_s = {cause: 0.0 for cause in LOSS_CAUSES}
    # A down or stopped span already counted to its end: (end, chips idle, kind).
    self.span: tuple[float, float, str] | None = None


class Simulation:
  """Runs the protocol over a backend; see module docstring."""

  def __init__(self, backend: Backend, protocol: Protocol, world: World, num_fragments: int,
               log_path: str | None = None, *, budget: str):
    if budget not in BUDGETS:
      raise ValueError(f"budget={budget!r} is unknown; choose from {BUDGETS}.")
    self.protocol, self.world = protocol, world
    self.budget = budget
    self.num_learners = len(world.step_seconds)
    schedule = protocol.schedule
    self.learners = [_Learner(schedule) for _ in range(self.num_learners)]
    self.syncer = protocol_lib.SyncerProtocol(
        backend, schedule, protocol.rules, self.num_learners,
        step_s=float(np.mean(world.step_seconds)), sync_s=world.syncer_seconds)
    self.now = 0.0
    self.total_steps = 0
    # Inner steps' work in parts of a learner's full batch, one part per slice it
    # trained on: integers, so a tokens budget is exact.
    self.batch_parts = 0
    self._heap: list = []
    self._seq = 0
    self._noise_cache: dict[int, tuple[int, np.ndarray]] = {}
    # Appended to, and cut to `_log_bytes` when a run starts: a fresh
    # simulation drops a stale log, a restored one the lines past its checkpoint.
    self._log = open(log_path, "a") if log_path else None
    self._log_bytes = 0
    self.losses: list = []
    self.merges = np.zeros(num_fragments, np.int64)
    self.contributors_per_merge: list[int] = []
    self.counts = {"full_copies": 0, "recoveries": 0}
    self._computing = 0
    self._advancing_s = 0.0
    self._last_t = 0.0
    if world.outages is not None and self._log is not None:
      self._schedule_failure_notes(world.outages)
    for m in range(self.num_learners):
      self._push(0.0, START, m)

  @property
  def backend(self) -> Backend:
    return self.syncer.merger

  @backend.setter
  def backend(self, backend: Backend) -> None:
    """Swaps the backend (a test restoring a copied one); the protocol drives it too."""
    self.syncer.merger = backend

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
    if not self.world.noise:
      return 1.0
    chunk = step // _NOISE_CHUNK
    cached = self._noise_cache.get(m)
    if cached is None or cached[0] != chunk:
      z = np.random.default_rng((self.world.seed, m, chunk)).standard_normal(_NOISE_CHUNK)
      sigma = self.world.noise
      cached = (chunk, np.exp(sigma * z - sigma * sigma / 2))  # Mean 1.
      self._noise_cache[m] = cached
    return float(cached[1][step % _NOISE_CHUNK])

  def _transfer_s(self, nbytes: int) -> float:
    return self.world.latency_s + nbytes / self.world.bytes_per_s

  def _segment(self, m: int):
    """(slices up, running, segment end) of learner m's failure timeline at now."""
    timelines = self.world.timelines
    if timelines is None:
      return self.world.slices_per_learner, True, math.inf
    line, ln = timelines[m], self.learners[m]
    while ln.segment < len(line.end) and line.end[ln.segment] <= self.now:
      ln.segment += 1
    if ln.segment == len(line.end):  # Past the sampled horizon: all up.
      return self.world.slices_per_learner, True, math.inf
    i = ln.segment
    return int(line.slices_up[i]), bool(line.running[i]), float(line.end[i])

  def _up_chip_seconds(self, m: int, t0: float, t1: float) -> float:
    """Chip-seconds of learner m's slices that are up over [t0, t1)."""
    full = self.world.slices_per_learner
    line = None if self.world.timelines is None else self.world.timelines[m]
    if line is None or t1 <= t0:
      return max(t1 - t0, 0.0) * full * self.world.chips_per_slice
    start = np.clip(line.start, t0, t1)
    end = np.clip(line.end, t0, t1)
    covered = float(np.sum((end - start) * line.slices_up))
    beyond = max(t1 - max(float(line.end[-1]), t0), 0.0) * full  # Past the horizon: all up.
    return (covered + beyond) * self.world.chips_per_slice

  def _schedule_failure_notes(self, outages) -> None:
    """Slice failures and repairs go into the event log at their times."""
    per = self.world.slices_per_learner
    for s, start, end in zip(outages.slice.tolist(), outages.start.tolist(),
                             outages.end.tolist()):
      fields = {"learner": s // per, "slice": s % per}
      self._push(start, NOTE, ("fail", fields))
      self._push(end, NOTE, ("repair", fields))

  # --- the event loop ----------------------------------------------------------

  def run(self, total_steps: int) -> list:
    """Processes events until learners have taken `total_steps` inner steps in all.

    With `budget="tokens"`, steps on part of a batch count as that part of a
    step: the run goes on until the learners have trained on the data of
    `total_steps` full-batch inner steps. Events at the virtual time of the
    last of those steps are processed too (merges, alignments, other learners'
    steps), so the state is that of a whole instant. Returns the losses of the
    steps taken meanwhile (backend values).
    """
    self.losses = []
    if self._log is not None:
      self._log.truncate(self._log_bytes)
    heap = self._heap
    if self.budget == "tokens":
      done, target = "batch_parts", total_steps * self.world.slices_per_learner
    else:
      done, target = "total_steps", total_steps
    while getattr(self, done) < target or (heap and heap[0][0] <= self.now):
      if not heap:
        raise RuntimeError("the simulation has no events left: every learner is waiting"
                           " and no round can close; check diloco.quorum and"
                           " sim.learners_wait.")
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

  # --- learners ------------------------------------------------------------------

  def _start(self, m: int) -> None:
    ln = self.learners[m]
    world = self.world
    up, running, end = self._segment(m)
    if up == 0 or not running:
      if up == 0 and not ln.down:
        self._go_down(m)
      span = end - self.now
      chips = up * world.chips_per_slice
      if up == 0:
        ln.down_s += span
      else:
        ln.stopped_s += span
        ln.lost_chip_s["reconfiguration"] += span * chips
      ln.span = (end, chips, "down" if up == 0 else "stopped")
      self._push(end, START, m)
      return
    ln.span = None
    if ln.down:
      self._rejoin(m)
    if ln.inbox or ln.schedule.held:
      self._take_inbox(m)
    if ln.schedule.waiting():
      ln.waiting_since = self.now
      return
    full = world.slices_per_learner
    duration = world.step_seconds[m] * self._noise(m, ln.schedule.step)
    if not world.shrink_batch:
      duration = duration * full / up
    chips = up * world.chips_per_slice
    if self.now + duration > end:  # A failure will interrupt this step.
      self._push(end, LOST, (m, end - self.now, chips))
    else:
      self._computing += 1
      share = up / full if world.shrink_batch else 1.0
      self._push(self.now + duration, DONE, (m, duration, chips, share))

  def _done(self, m: int, duration: float, chips: int, share: float) -> None:
    ln = self.learners[m]
    self._computing -= 1
    sends = ln.schedule.stepped()
    step = ln.schedule.step
    self.total_steps += 1
    self.batch_parts += round(share * self.world.slices_per_learner)
    ln.busy_s += duration
    ln.useful_chip_s += duration * chips
    ln.step_ema = float(duration) if step == 1 else ln.step_ema + 0.1 * (duration - ln.step_ema)
    self.losses.append(self.backend.inner_step(m, share))
    if self._log:
      self.log("step", learner=m, step=step, seconds=round(duration, 9))
    self._perform_learner(m, sends)
    self._push(self.now, START, m)

  def _perform_learner(self, m: int, effects) -> None:
    """Performs learner m's protocol effects: sends, alignments, log lines."""
    for e in effects:
      if isinstance(e, protocol_lib.Send):
        self._send(m, e.fragment, e.round)
      elif isinstance(e, protocol_lib.Align):
        pub = e.publication
        outcome = self.backend.deliver(m, pub)
        if outcome == "full_copy":
          self.counts["full_copies"] += 1
        if self._log:
          self.log("align", learner=m, fragment=pub.fragment, version=pub.version,
                   outcome=outcome)
      else:
        self.log(e.event, learner=m, **e.fields)

  def _send(self, m: int, p: int, rnd: int) -> None:
    ln = self.learners[m]
    c = self.backend.send(m, p, rnd)
    if c is None:  # It diverged and restarted from the global model: nothing to send.
      self.counts["recoveries"] += 1
      self.log("recover", learner=m, fragment=p, round=rnd)
      return
    c = c._replace(sent_at=self.now, step_seconds=ln.step_ema)
    ln.last_send[p] = ln.schedule.step
    ln.schedule.sent(p, rnd)
    if self._log:
      self.log("send", learner=m, fragment=p, round=rnd, base_version=c.base_version,
               bytes=c.nbytes)
    self._push(self.now + self._transfer_s(c.nbytes), ARRIVE_SYNCER, c)

  def _lost(self, m: int, seconds: float, chips: int) -> None:
    ln = self.learners[m]
    ln.lost_s += seconds
    ln.lost_chip_s["lost_steps"] += seconds * chips
    self.log("lost_step", learner=m, step=ln.schedule.step + 1, seconds=round(seconds, 9))
    self._start(m)

  def _go_down(self, m: int) -> None:
    """All slices lost: the learner's parameters and unsent progress are gone."""
    ln = self.learners[m]
    step = ln.schedule.step
    ln.down = True
    ln.inbox.clear()
    if step:
      unsent_steps = float(np.mean(step - ln.last_send))
      unsent = unsent_steps * ln.useful_chip_s / step
      ln.lost_chip_s["unsent_work"] += unsent
      ln.useful_chip_s -= unsent
    self.log("down", learner=m, step=step)
    self._perform_syncer(self.syncer.set_live(m, False, self.now))

  def _rejoin(self, m: int) -> None:
    """Back from zero slices: restart from the global fragments at the live position."""
    ln = self.learners[m]
    ln.down = False
    live = [o.schedule for o in self.learners if not o.down and o is not ln]
    own = ln.schedule
    position = protocol_lib.rejoin_position(
        own.position, [o.position for o in live], dict(enumerate(self.syncer.published.tolist())),
        self.syncer.schedule)
    schedule_step = max([o.step for o in live] + [own.step])
    own.rejoin(position)
    self.log("rejoin", learner=m, step=own.step, phase=own.phase)
    self.backend.rejoin(m, schedule_step)
    self._perform_syncer(self.syncer.rejoined(m, position, self.now))

  def _take_inbox(self, m: int) -> None:
    """What landed at learner m since its last step: aligned, or held until due."""
    ln = self.learners[m]
    for message in ln.inbox:
      if isinstance(message, Notice):
        self._perform_learner(m, ln.schedule.noticed(message))
      else:
        self._perform_learner(m, ln.schedule.landed(message, self.now))
    ln.inbox.clear()
    if ln.schedule.held:
      self._perform_learner(m, ln.schedule.due())

  # --- the syncer --------------------------------------------------------------------

  def _arrive_syncer(self, c: Contribution) -> None:
    self._perform_syncer(self.syncer.arrive(c, self.now))

  def _merge_timer(self, p: int, rnd: int) -> None:
    self._perform_syncer(self.syncer.timer(p, rnd, self.now))

  def _perform_syncer(self, effects) -> None:
    """Performs the syncer's protocol effects: publications, timers, log lines."""
    for e in effects:
      if isinstance(e, protocol_lib.Publish):
        self._publish(e.message, e.contributors)
      elif isinstance(e, protocol_lib.Timer):
        self._push(e.at, MERGE, (e.fragment, e.round))
      else:
        self.log(e.event, **e.fields)

  def _publish(self, message: Publication | Notice, contributors: int) -> None:
    nbytes = 0
    if isinstance(message, Publication):
      self.merges[message.fragment] += 1
      self.contributors_per_merge.append(contributors)
      nbytes = message.nbytes
    sync_s = self.world.syncer_seconds + self._transfer_s(nbytes)
    self.syncer.rounds.observe_sync(sync_s)
    if self._log:
      self.log("publish", fragment=message.fragment, version=message.version,
               arrives=round(self.now + sync_s, 9))
    self._push(self.now + sync_s, ARRIVE_LEARNER, message)  # Every link alike: one event.

  def _arrive_learner(self, message: Publication | Notice) -> None:
    """The message lands at every learner that is up; a down one misses it."""
    for m, ln in enumerate(self.learners):
      if ln.down:
        continue
      ln.inbox.append(message)
      if ln.waiting_since is not None:
        ln.waiting_s += self.now - ln.waiting_since
        ln.lost_chip_s["waiting"] += self._up_chip_seconds(m, ln.waiting_since, self.now)
        ln.waiting_since = None
        self._start(m)

  # --- checkpoints -----------------------------------------------------------------

  def state(self, messages: serialization.MessageTable) -> dict:
    """The state between two `run`s as JSON; messages go into `messages`.

    Failure timelines and step-time noise are recomputed from the seeds, so
    they are not part of it.
    """
    if self._log is not None:
      self._log.flush()  # The checkpoint vouches for `_log_bytes` on disk.
    heap = [(t, kind, seq, messages.ref(data) if kind in _MESSAGE_EVENTS else data)
            for t, kind, seq, data in self._heap]
    learners = [{**vars(ln), "inbox": [messages.ref(pub) for pub in ln.inbox],
                 "schedule": ln.schedule.state(),
                 "held": [messages.ref(pub) for pub in ln.schedule.held],
                 "last_send": ln.last_send.tolist()}
                for ln in self.learners]
    return serialization.to_json({"heap": heap, "learners": learners,
                                  "syncer": self.syncer.state(),
                                  "fields": {name: getattr(self, name) for name in _FIELDS},
                                  "merges": self.merges.tolist()})

  def load_state(self, state: dict, messages: serialization.MessageTable) -> None:
    """Takes up the state `state` returned, on a simulation of the same config."""
    s = serialization.from_json(state)
    log_bytes = s["fields"]["_log_bytes"]
    if self._log is not None and os.fstat(self._log.fileno()).st_size < log_bytes:
      raise ValueError(f"{self._log.name} is shorter than the {log_bytes} bytes it had at"
                       " the checkpoint; resume in the workdir that wrote both.")
    self._heap = [(t, kind, seq, messages.message(data) if kind in _MESSAGE_EVENTS
                   else tuple(data) if isinstance(data, list) else data)
                  for t, kind, seq, data in s["heap"]]  # Same list, same heap order.
    for ln, saved in zip(self.learners, s["learners"]):
      saved = dict(saved)
      ln.schedule.load_state(saved.pop("schedule"),
                             [messages.message(ref) for ref in saved.pop("held")])
      vars(ln).update(saved, inbox=[messages.message(ref) for ref in saved["inbox"]],
                      schedule=ln.schedule, last_send=np.array(saved["last_send"], np.int64),
                      span=None if saved["span"] is None else tuple(saved["span"]))
    self.syncer.load_state(s["syncer"])
    vars(self).update(s["fields"])
    self.merges = np.array(s["merges"], np.int64)

  # --- accounting ----------------------------------------------------------------

  def _lost_chip_s(self, m: int) -> dict:
    """Learner m's allocated chip-time not spent on useful steps, by cause, up to now."""
    ln, world = self.learners[m], self.world
    lost = dict(ln.lost_chip_s)
    if ln.span is not None and ln.span[0] > self.now and ln.span[2] == "stopped":
      lost["reconfiguration"] -= (ln.span[0] - self.now) * ln.span[1]  # Not over yet.
    if ln.waiting_since is not None:
      lost["waiting"] += self._up_chip_seconds(m, ln.waiting_since, self.now)
    allocated = world.slices_per_learner * world.chips_per_slice * self.now
    lost["slices_down"] = allocated - self._up_chip_seconds(m, 0.0, self.now)
    lost["in_progress"] = allocated - ln.useful_chip_s - sum(
        v for k, v in lost.items() if k != "in_progress")
    return lost

  def report(self) -> dict:
    """Goodput (useful / allocated chip-time) with every lost chip-second's cause.

    useful + sum(lost) == allocated exactly; `in_progress` is the chip-time of
    steps (or waits) still under way when the run stopped. Learners are
    elastic groups, like the elastic data-parallel baseline: neither holds
    hot spares, so `idle_spares` is 0.
    """
    wall = max(self.now, 1e-12)
    world = self.world
    allocated = world.slices_per_learner * world.chips_per_slice * self.num_learners * wall
    useful = sum(ln.useful_chip_s for ln in self.learners)
    per_learner = [self._lost_chip_s(m) for m in range(self.num_learners)]
    return {
        "virtual_seconds": self.now,
        "goodput": useful / allocated,
        "uptime": self._advancing_s / wall,
        "allocated_chip_s": allocated,
        "useful_chip_s": useful,
        "lost_chip_s": {c: sum(l[c] for l in per_learner) for c in LOSS_CAUSES},
        "merges_per_fragment": self.merges.tolist(),
        "mean_contributors_per_merge": (float(np.mean(self.contributors_per_merge))
                                        if self.contributors_per_merge else 0.0),
        "protocol": {**self.syncer.counts, "rephases": sum(ln.schedule.rephases
                                                            for ln in self.learners),
                     **self.counts, "xi_step": self.syncer.rounds.xi_step,
                     "xi_quorum": self.syncer.rounds.xi_quorum,
                     "xi_sync": self.syncer.rounds.xi_sync},
        "learners": [{"steps": ln.schedule.step, "busy_s": ln.busy_s, "waiting_s": ln.waiting_s,
                      "down_s": ln.down_s - (max(ln.span[0] - self.now, 0.0)
                                             if ln.span and ln.span[2] == "down" else 0.0),
                      "stopped_s": ln.stopped_s - (max(ln.span[0] - self.now, 0.0)
                                                   if ln.span and ln.span[2] == "stopped"
                                                   else 0.0),
                      "lost_s": ln.lost_s, "useful_chip_s": ln.useful_chip_s,
                      "lost_chip_s": lost}
                     for ln, lost in zip(self.learners, per_learner)],
    }
