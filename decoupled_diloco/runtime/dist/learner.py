"""One learner as a process of the real runtime (DESIGN.md §5).

The same `Learner` and round protocol (`algorithm/protocol.py`) as the
simulator; only the clock (wall seconds) and the transport (the mailbox)
differ ("one algorithm, two clocks"). The learner steps its island and never
waits for the network: a `Courier` uploads its contributions and polls for
publications; what landed is handed to its `LearnerSchedule` at the next
step boundary, which says what to align, send and re-phase. Its heartbeat is
its lease, which also carries its step time and schedule position.
Checkpoints are its own (orbax, in its workdir); restarted, it resumes from
its checkpoint if no fragment moved on more than `dist.resume_max_versions`
versions meanwhile, else it rejoins from the latest publications with a
fresh inner optimizer, at the position `protocol.rejoin_position` gives.

Clock and sleep are injected: `threaded=False` runs the courier's work on
the training thread (`upload`, and a poll at every step), so a test drives
learners and a syncer in one process under a fake clock.
"""

import os
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from decoupled_diloco import islands as islands_lib
from decoupled_diloco import optim, steps
from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.algorithm import protocol as protocol_lib
from decoupled_diloco.algorithm import syncer as syncer_lib
from decoupled_diloco.algorithm.messages import Notice, Publication
from decoupled_diloco.config import Config
from decoupled_diloco.runtime import serialization, team as team_lib
from decoupled_diloco.runtime.dist import mailbox as mb_lib, multihost, wire
from decoupled_diloco.runtime.dist.courier import Courier, EventLog
from decoupled_diloco.runtime.dist.mailbox import Lease, Mailbox
from decoupled_diloco.runtime.router_probe import RouterProbe
from decoupled_diloco.tasks.base import Task

SYNCER_LEASE = "syncer"  # Lease names (keys `lease/{name}`).
LEARNER_LEASES = "learner/"
LINK_FILE = "link.json"  # In a learner's workdir: {"bytes_per_s", "latency_s"} (chaos throttle).


def learner_lease(m: int) -> str:
  return f"{LEARNER_LEASES}{m}"


def learner_index(name: str, num_learners: int) -> int | None:
  """m of lease name `learner/m`, if it is one of this run's learners."""
  m = name.removeprefix(LEARNER_LEASES)
  return int(m) if m.isascii() and m.isdigit() and int(m) < num_learners else None


def live(lease: Lease | None, now: float) -> bool:
  return lease is not None and lease.expires_at > now and lease.info.get("status") != "done"


class LearnerRuntime:
  """One learner as a process: the `Runtime` train.py drives (runtime/interface.py)."""

  def __init__(self, cfg: Config, task: Task, workdir: str, mailbox: Mailbox,
               m: int, *, clock=time.time, sleep=time.sleep, threaded: bool = True,
               island: islands_lib.Island | None = None):
    """`island`: the devices it trains on (default: every local device)."""
    d = cfg.diloco
    if not 0 <= m < d.num_learners:
      raise ValueError(f"--learner={m} must be in [0, diloco.num_learners={d.num_learners}).")
    self.cfg, self.m, self.mailbox, self.workdir = cfg, m, mailbox, workdir
    self.clock, self.sleep, self.threaded = clock, sleep, threaded
    self.island = island or steps.make_islands(cfg, task, 1)[0]
    self.per_learner_batch = team_lib.learner_batch(cfg)
    islands_lib.check_batch(self.island, self.per_learner_batch)
    self.task, self.eval_island = task, self.island
    self.inner_tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
    params, self.fragments, self.offsets = team_lib.global_model(cfg, task)
    up, down = team_lib.payload_bytes(cfg, fragments_lib.flatten(params), self.fragments)
    mailbox.limits = mb_lib.Limits.of(up, down, [0] * len(up), d.num_learners)
    opt_state = self.inner_tx.init(params)
    inner = steps.make_inner_step(task, self.inner_tx, self.island, params, opt_state)
    self.learner = team_lib.make_learner(cfg, task, m, self.island, inner, params, opt_state,
                                         self.fragments)
    self.data = task.train_source(m, d.num_learners, self.per_learner_batch, cfg.seed)
    # Its own routing (router_probe.py); the learners are compared by the simulator only.
    self.probe = RouterProbe.make(task, params, 1) if jax.process_count() == 1 else None
    self._loss = None  # The latest step's loss (the probe's loss before an alignment).
    self.units_per_step = team_lib.units_per_learner_step(cfg, task)
    self.schedule = protocol_lib.LearnerSchedule(team_lib.schedule(cfg, self.offsets))
    self.busy_s = 0.0  # Wall time of the steps this state holds (a restore rolls it back).
    self.waiting_s = 0.0
    self.step_ema = 0.0
    self.counts = {"rejoins": 0, "full_copies": 0, "aligned": 0}
    self._courier: Courier | None = None
    self._last_t: float | None = None
    self._stepped = 0  # Steps taken by this process.
    self.incarnation = int.from_bytes(os.urandom(6), "big")
    # Over several processes (jax.distributed), process 0 alone touches the
    # mailbox and logs; what it reads is broadcast to the others.
    self.primary = jax.process_index() == 0
    self.log = EventLog(os.path.join(workdir, "events.jsonl") if self.primary else None,
                        clock=clock, learner=m)
    self.log("start", incarnation=self.incarnation)

  @property
  def step(self) -> int:
    return self.learner.step

  @property
  def position(self) -> int:
    return self.schedule.position

  # --- the step ------------------------------------------------------------------

  def train_step(self) -> dict:
    if self._courier is None:  # After a restore, before the first step.
      self._connect()
    if self._last_t is not None:  # Start to start: the step's pace, device queue included.
      seconds = self.clock() - self._last_t
      self.busy_s += seconds
      self.step_ema = seconds if not self.step_ema else self.step_ema + 0.1 * (seconds - self.step_ema)
    self._take_landed()
    if self.schedule.waiting():
      self._wait()
    start = self.clock()  # Waiting is not busy time.
    # The first step of a process compiles: its pace is measured from the second.
    self._last_t = start if self._stepped else None
    self._stepped += 1
    batch = next(self.data)
    loss = self.learner.inner_step(jax.device_put(batch, self.island.batch),
                                   self.units_per_step)
    if self.probe:
      self.probe.stepped(0, loss)
    self._loss = loss
    if self.cfg.dist.min_step_s:
      loss.block_until_ready()
      self.sleep(max(start + self.cfg.dist.min_step_s - self.clock(), 0.0))
    self.log("step", step=self.learner.step)
    self._perform(self.schedule.stepped())
    return {"loss": loss}

  def ready(self) -> bool:
    """Takes what landed; True unless the learner must wait (lock-step) before stepping."""
    if self._courier is None:
      self._connect()
    self._take_landed()
    return not self.schedule.waiting()

  def upload(self, until: float | None = None) -> None:
    """Uploads the queued sends (sent by `until`) now (threaded=False; a thread does it
    otherwise)."""
    if self.primary and self._courier:
      self._courier.pump_uploads(until)

  def _wait(self) -> None:
    dist = self.cfg.dist
    t0 = self.clock()
    while self.schedule.waiting():
      if self.clock() - t0 > dist.startup_s:
        raise TimeoutError(f"learner {self.m} waited {dist.startup_s:.0f} s for fragments"
                           f" {sorted(self.schedule.awaiting)}: is the syncer running?")
      self.sleep(dist.poll_s / 4)
      self._take_landed()
    self.waiting_s += self.clock() - t0

  def _take_landed(self) -> None:
    """Hands what landed since the last call to the schedule (the same on every process).

    Raises:
      RuntimeError: if another process took this learner's lease: it must not train on.
    """
    if self.primary and not self.threaded:
      self._courier.pump()
    if self.primary and self._courier.lost:
      raise RuntimeError(f"learner {self.m}: {self._courier.lost}; another process runs"
                         " this learner, so this one stops")
    landed = multihost.share_landed(self._courier.take() if self.primary else None)
    for message, landed_at in landed:
      if isinstance(message, Notice):
        self._perform(self.schedule.noticed(message))
      else:
        self._perform(self.schedule.landed(message, landed_at))
    if self.schedule.held:
      self._perform(self.schedule.due())

  def _perform(self, effects) -> None:
    for e in effects:
      if isinstance(e, protocol_lib.Send):
        self._send(e.fragment, e.round)
      elif isinstance(e, protocol_lib.Align):
        self._align(e.publication)
      else:
        self.log(e.event, **e.fields)

  def _send(self, p: int, rnd: int) -> None:
    c = self.learner.pseudo_gradient(p, rnd)
    if jax.process_count() > 1:  # A collective: every process gathers the payload.
      c = c._replace(payload=tuple(multihost_utils.process_allgather(list(c.payload), tiled=True)))
    if self.primary:
      self._courier.send(c._replace(sent_at=self.clock(), step_seconds=self.step_ema))
    self.schedule.sent(p, rnd)

  def _align(self, pub: Publication) -> None:
    outcome = self.learner.align(pub)
    if outcome == "gap" and self.primary:
      self._courier.want_full(pub.fragment)
    elif outcome == "applied":
      if self.probe:
        self.probe.aligned(0, self._loss)
      self.counts["aligned"] += 1
      self.counts["full_copies"] += pub.base_version < 0 and pub.round < 0
    self.log("align", fragment=pub.fragment, version=pub.version, outcome=outcome)

  # --- joining the run -------------------------------------------------------------

  def _connect(self) -> None:
    """Takes this learner's lease, rejoins if its state is too old, starts the courier."""
    dist = self.cfg.dist
    if self.primary:
      lease = self._take_lease()
      plan = self._plan_rejoin()
    rejoin = multihost.share(plan if self.primary else None)
    if rejoin:
      self._rejoin(*multihost.unpack(rejoin))
    if self.primary:
      lossless = syncer_lib.lossless(team_lib.make_codec(self.cfg.codec, "down"))
      self._courier = Courier(self.mailbox, self.m, len(self.fragments), lossless_down=lossless,
                              notices=self.cfg.sim.learners_wait, lease=lease,
                              ttl_s=dist.lease_s, poll_s=dist.poll_s,
                              incarnation=self.incarnation, info=self._info, log=self.log,
                              link_file=os.path.join(self.workdir, LINK_FILE), clock=self.clock)
      self._courier.start(self.learner.base_version, threaded=self.threaded)
    else:
      self._courier = False  # Connected; process 0 holds the courier.

  def _take_lease(self) -> Lease:
    dist = self.cfg.dist
    holder = f"{socket.gethostname()}:{os.path.abspath(self.workdir)}"
    deadline = self.clock() + dist.lease_s + 1
    while (lease := self.mailbox.acquire(learner_lease(self.m), holder, dist.lease_s,
                                         self._info())) is None:
      if self.clock() > deadline:
        other = self.mailbox.read_lease(learner_lease(self.m))
        raise RuntimeError(f"learner {self.m} is already running ({other.holder if other else '?'}"
                           f" holds {learner_lease(self.m)}); stop it, or give this one its"
                           " own --learner.")
      self.sleep(dist.poll_s)
    return lease

  def _plan_rejoin(self) -> bytes:
    """b"" if this learner's state is recent enough; else what `_rejoin` needs.

    Rejoining takes full copies of the latest versions, at the position
    `protocol.rejoin_position` gives from the live learners' leases and the
    latest publications.
    """
    latest = [v or 0 for v in self.mailbox.latest_versions(len(self.fragments))]
    behind = int(np.max(np.array(latest) - self.learner.base_version))
    if behind <= self.cfg.dist.resume_max_versions:
      return b""
    pubs = [self.mailbox.full_copy(p, v) for p, v in enumerate(latest)]
    if any(pub is None for pub in pubs):
      raise RuntimeError(f"learner {self.m}: the mailbox has no full copy of versions"
                         f" {latest}; is {self.mailbox} this run's mailbox?")
    now = self.clock()
    others = [l.info for l in self.mailbox.leases(LEARNER_LEASES).values()
              if live(l, now) and l.name != learner_lease(self.m)]
    published = {p: got[0].round for p, v in enumerate(latest)
                 if (got := self.mailbox.publication(p, v)) is not None}
    position = protocol_lib.rejoin_position(
        self.position, [int(i.get("position", 0)) for i in others], published,
        self.schedule.schedule)
    schedule_step = max([int(i.get("step", 0)) for i in others] + [self.learner.step])
    return multihost.pack([wire.publication_bytes(pub, multihost.LOCAL, [multihost.LOCAL.me])
                           for pub in pubs],
                          {"behind": behind, "position": position, "schedule_step": schedule_step})

  def _rejoin(self, parts: list[bytes], plan: dict) -> None:
    """Restarts from full copies of the global fragments (see `_plan_rejoin`)."""
    pubs = [wire.parse_publication(b, multihost.LOCAL)[0] for b in parts]
    opt_state = None
    if self.cfg.chaos.rejoin_optimizer == "fresh":
      opt_state = optim.restart_state(self.inner_tx, self.learner.params, plan["schedule_step"],
                                      self.cfg.chaos.rewarmup_steps)
    self.learner.recover(pubs, opt_state)
    self.schedule.rejoin(plan["position"])
    self.counts["rejoins"] += 1
    self.log("rejoin", versions_behind=plan["behind"], position=plan["position"],
             schedule_step=plan["schedule_step"])
    logging.info("learner %d: %d versions behind the global model; rejoined from it at"
                 " position %d", self.m, plan["behind"], plan["position"])

  def _info(self) -> dict:
    return {"step": self.learner.step, "position": self.position,
            "step_seconds": self.step_ema, "busy_s": self.busy_s,
            "base_versions": self.learner.base_version.tolist()}

  # --- Runtime ------------------------------------------------------------------

  def eval_params(self):
    """The global model as this learner holds it (its bases, and its local state)."""
    bases = fragments_lib.assemble(
        {k: t for f, ts in zip(self.fragments, self.learner.base) for k, t in zip(f, ts)})
    return team_lib.global_params(bases, team_lib.local_state(self.task, self.learner.params))

  def state(self) -> dict:
    learner = self.learner.state()
    if jax.process_count() > 1:
      learner = multihost.host_copies(learner)
    s = {"learner": learner, "busy_s": np.float64(self.busy_s)}
    return {**s, "router_probe": self.probe.state()} if self.probe else s

  def load_state(self, s: dict) -> None:
    learner = s["learner"]
    if jax.process_count() > 1:  # Host copies back onto the island spanning the processes.
      put = lambda tree: jax.tree.map(
          lambda x: jax.device_put(np.asarray(x), self.island.replicated), tree)
      learner = {**learner, **{k: put(learner[k]) for k in
                               ("params", "opt_state", "base", "residual") if k in learner}}
    self.learner.load_state(learner)
    self.busy_s = float(s["busy_s"])
    if self.probe:
      self.probe.load_state(s["router_probe"])
    self.log("resume", step=self.learner.step)

  def extra_state(self):
    """Its place in the schedule, and the publications a lock-step learner holds.

    Queued uploads are not kept: they are work a crash loses (counted as such).
    """
    messages = serialization.MessageTable()
    return messages.payloads, {"schedule": self.schedule.state(),
                               "held": [messages.ref(pub) for pub in self.schedule.held],
                               "data": self.data.get_state()}

  def load_extra_state(self, payloads, meta) -> None:
    messages = serialization.MessageTable(payloads)
    self.data.set_state(meta["data"])
    self.schedule.load_state(meta["schedule"], [messages.message(r) for r in meta["held"]])

  def _bytes(self) -> dict:
    c = self._courier  # None before the first step; False off process 0.
    return {"bytes_up": c.bytes_up if c else 0, "bytes_down": c.bytes_down if c else 0}

  def eval_scalars(self) -> dict:
    routing = self.probe.metrics(self.eval_params()) if self.probe else {}
    return {**self._bytes(), **routing}

  def summary(self) -> dict:
    c = self._courier
    flushed = c.close(timeout_s=self.cfg.dist.lease_s) if c else True
    if c and not c.lost:
      c.beat("done")
    self.log("done", step=self.learner.step, flushed=flushed)
    self.log.close()
    return {**self._bytes(), "learner": self.m, "busy_s": self.busy_s,
            "waiting_s": self.waiting_s, "step_seconds": self.step_ema,
            "duplicate_sends": c.duplicates if c else 0, "uploads_flushed": flushed,
            "rephases": self.schedule.rephases, **self.counts}
