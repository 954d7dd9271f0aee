"""The real runtime: learners and a syncer as separate processes over a mailbox.

Same `Learner`, `Syncer` and round rules (`algorithm/rounds.py`) as the
simulator; only the clock (wall seconds) and the transport (a tensorstore key-
value store, runtime/mailbox.py) differ ("one algorithm, two clocks").

A learner process (`LearnerRuntime`, driven by train.py like any runtime)
steps its island and never waits for the network: a `Courier` uploads its
contributions and polls for publications in background threads; what landed
is aligned at the next step boundary. Its heartbeat is its lease, which also
carries its step time and schedule position. Checkpoints are its own (orbax,
in its workdir); restarted, it resumes from its checkpoint if no fragment
moved on more than `dist.resume_max_versions` versions meanwhile, else it
rejoins from the latest publications with a fresh inner optimizer (the
simulator's rule).

The syncer process (`SyncerService`) holds `lease/syncer`, reads new
contributions, validates them, applies the round rules on the wall clock
(live learners = unexpired leases, by identity), merges, and commits each
outer step as the fragment's outer state, then its publication, both
create-once under the new version: the version is the fencing token. A
restarted (or standby) syncer takes the lease once it expires, reloads each
fragment's newest committed version and re-reads the contributions after
the ones that version consumed, so no committed round is lost or applied
twice. With `sim.learners_wait` the learners wait for every publication
(lock-step), which reproduces `runtime/lockstep.py` bit for bit.
"""

import json
import os
import queue
import socket
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from decoupled_diloco import islands as islands_lib
from decoupled_diloco import metrics, optim, steps, workdir as workdir_lib
from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.algorithm import rounds as rounds_lib
from decoupled_diloco.algorithm import syncer as syncer_lib
from decoupled_diloco.algorithm.messages import Contribution, Publication
from decoupled_diloco.config import Config, make_codec
from decoupled_diloco.data import corpus as corpus_lib
from decoupled_diloco.data import loader
from decoupled_diloco.models import transformer
from decoupled_diloco.runtime import scenario, team as team_lib
from decoupled_diloco.runtime import mailbox as mailbox_lib
from decoupled_diloco.runtime.mailbox import Lease, Mailbox

SYNCER_LEASE = "syncer"  # Lease names (keys `lease/{name}`).
LEARNER_LEASES = "learner/"
LINK_FILE = "link.json"  # In a learner's workdir: {"bytes_per_s", "latency_s"} (chaos throttle).


def learner_lease(m: int) -> str:
  return f"{LEARNER_LEASES}{m}"


class Fenced(RuntimeError):
  """This syncer lost its lease, or another one published a version it was about to."""


class EventLog:
  """JSON lines with wall-clock times, flushed as written (a killed process keeps them)."""

  def __init__(self, path: str | None, **fields):
    self._file = open(path, "a") if path else None  # None: log nothing.
    self._fields = fields

  def __call__(self, event: str, **fields) -> None:
    if self._file is None:
      return
    line = {"t": round(time.time(), 6), "event": event, **self._fields, **fields}
    self._file.write(json.dumps(line) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def _model(cfg: Config):
  """(params, fragments, offsets): what every process derives from the config alone."""
  d = cfg.diloco
  params = transformer.init_params(cfg.model, jax.random.key(cfg.seed))
  flat = fragments_lib.flatten(params)
  fragments = fragments_lib.partition(flat, d.num_fragments, d.fragmentation)
  return params, fragments, fragments_lib.sync_offsets(d.num_fragments, d.sync_every)


def _live(lease: Lease | None, now: float) -> bool:
  return lease is not None and lease.expires_at > now and lease.info.get("status") != "done"


# --- one learner over several processes (jax.distributed) ----------------------------


def _pack(parts: list[bytes], meta: dict) -> bytes:
  head = json.dumps({"meta": meta, "sizes": [len(p) for p in parts]}).encode()
  return len(head).to_bytes(8, "big") + head + b"".join(parts)


def _unpack(blob: bytes) -> tuple[list[bytes], dict]:
  n = int.from_bytes(blob[:8], "big")
  head = json.loads(blob[8:8 + n])
  parts, at = [], 8 + n
  for size in head["sizes"]:
    parts.append(blob[at:at + size])
    at += size
  return parts, head["meta"]


def _share(blob: bytes | None) -> bytes:
  """Process 0's `blob` on every process of this learner (one collective each way)."""
  if jax.process_count() == 1:
    return blob
  primary = jax.process_index() == 0
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(blob) if primary else 0)))
  if n == 0:
    return b""
  buf = np.frombuffer(blob, np.uint8) if primary else np.zeros(n, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


_LOCAL = b"learner"  # Key of messages between the processes of one learner (no network).


def _share_publications(pubs: list[tuple[Publication, float]]) -> list[tuple[Publication, float]]:
  if jax.process_count() == 1:
    return pubs
  blob = _share(_pack([mailbox_lib.publication_bytes(p, _LOCAL) for p, _ in pubs],
                      {"landed": [t for _, t in pubs]}) if pubs is not None else None)
  parts, meta = _unpack(blob)
  return [(mailbox_lib.parse_publication(b, _LOCAL)[0], t)
          for b, t in zip(parts, meta["landed"])]


def _local(tree):
  """Host copies of a learner's (replicated) arrays: every process holds them whole."""
  def copy(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise NotImplementedError("a learner over several processes checkpoints replicated"
                                  " state only; turn islands.fsdp off.")
      return np.asarray(x.addressable_data(0))
    return x
  return jax.tree.map(copy, tree)


# --- learners ----------------------------------------------------------------------


class Courier:
  """A learner's network side, in two threads: uploads, and polls + heartbeat.

  The training thread hands it contributions (`send`) and takes what landed
  (`take`); neither call waits for the network.
  """

  def __init__(self, mailbox: Mailbox, m: int, num_fragments: int, *, lossless_down: bool,
               lease: Lease, ttl_s: float, poll_s: float, incarnation: int, info, log,
               link_file: str | None = None):
    self.mailbox, self.m, self.lease = mailbox, m, lease
    self.lossless_down = lossless_down
    self.ttl_s, self.poll_s, self.incarnation = ttl_s, poll_s, incarnation
    self.info, self.log, self.link_file = info, log, link_file
    self._outbox: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._landed: list[tuple[Publication, float]] = []
    self.fetched = np.full(num_fragments, -1, np.int64)  # Newest version taken per fragment.
    self._want_full: set[int] = set()
    self._stop = threading.Event()
    self.bytes_up = self.bytes_down = 0
    self.duplicates = 0  # Sends a previous incarnation had made already.
    self.latency_s = 0.0  # Running mean: publication written -> landed here (seconds).
    self.lost: str | None = None  # Why the lease was lost, if it was.
    self._threads = [threading.Thread(target=self._upload, daemon=True, name=f"upload{m}"),
                     threading.Thread(target=self._poll, daemon=True, name=f"poll{m}")]

  def start(self, base_versions) -> None:
    self.fetched[:] = base_versions
    for t in self._threads:
      t.start()

  def send(self, c: Contribution) -> None:
    self._outbox.put(c)

  def take(self) -> list[tuple[Publication, float]]:
    with self._lock:
      landed, self._landed = self._landed, []
    return landed

  def want_full(self, p: int) -> None:
    """The learner holds a version an update cannot apply to: fetch a full copy."""
    with self._lock:
      self._want_full.add(p)

  def rebase(self, versions) -> None:
    """The learner now holds `versions` (it rejoined from full copies)."""
    with self._lock:
      self.fetched[:] = versions
      self._landed = [(pub, t) for pub, t in self._landed if pub.version > versions[pub.fragment]]

  def close(self, timeout_s: float) -> bool:
    """Uploads what is queued (up to `timeout_s`), then stops; True if all went out."""
    deadline = time.time() + timeout_s
    while self._outbox.unfinished_tasks and time.time() < deadline:
      time.sleep(0.01)
    self._stop.set()
    for t in self._threads:
      t.join(timeout=max(deadline - time.time(), 1.0))
    return not self._outbox.unfinished_tasks

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

  def _upload(self) -> None:
    while not self._stop.is_set():
      try:
        c = self._outbox.get(timeout=0.1)
      except queue.Empty:
        continue
      try:
        c = c._replace(payload=tuple(jax.device_get(list(c.payload))))
        if self.mailbox.send(c, self.incarnation):
          self.bytes_up += c.nbytes
          self.log("send", fragment=c.fragment, round=c.round, base_version=c.base_version,
                   steps=c.steps, bytes=c.nbytes)
        else:
          self.duplicates += 1
          self.log("send_duplicate", fragment=c.fragment, round=c.round)
      except Exception as e:  # pylint: disable=broad-except  (a send is lost work, not a crash)
        logging.error("learner %d: send of fragment %d round %d failed: %s", self.m,
                      c.fragment, c.round, e)
        self.log("send_failed", fragment=c.fragment, round=c.round, error=str(e)[:200])
      finally:
        self._outbox.task_done()

  def _poll(self) -> None:
    next_beat = 0.0
    while not self._stop.is_set():
      now = time.time()
      try:
        if now >= next_beat:
          self._apply_link()
          self.beat()
          next_beat = now + self.ttl_s / 4
        self._fetch()
      except Exception as e:  # pylint: disable=broad-except  (retried at the next poll)
        logging.warning("learner %d: mailbox poll failed: %s", self.m, e)
      self._stop.wait(self.poll_s)

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
        now = time.time()
        with self._lock:
          self._landed.append((pub, now))
          self.fetched[p] = max(self.fetched[p], pub.version)
        self.bytes_down += pub.nbytes
        written = extra.get("written_at")
        if isinstance(written, (int, float)):  # The syncer's xi_sync: written -> landed here.
          self.latency_s += 0.1 * (max(now - written, 0.0) - self.latency_s)
        self.log("landed", fragment=p, version=pub.version, round=pub.round)

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


class LearnerRuntime:
  """One learner as a process: the `Runtime` train.py drives (runtime/interface.py)."""

  def __init__(self, cfg: Config, train_tokens: np.ndarray, workdir: str, mailbox: Mailbox,
               m: int):
    d = cfg.diloco
    if not 0 <= m < d.num_learners:
      raise ValueError(f"--learner={m} must be in [0, diloco.num_learners={d.num_learners}).")
    self.cfg, self.m, self.mailbox, self.workdir = cfg, m, mailbox, workdir
    self.island = islands_lib.make_islands(1, fsdp=cfg.islands.fsdp)[0]
    self.per_learner_batch = team_lib.learner_batch(cfg)
    islands_lib.check_batch(self.island, self.per_learner_batch)
    self.model, self.eval_island = transformer.Transformer(cfg.model), self.island
    self.inner_tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
    params, self.fragments, self.offsets = _model(cfg)
    opt_state = self.inner_tx.init(params)
    inner = steps.make_inner_step(self.model, self.inner_tx, self.island, params, opt_state)
    self.learner = team_lib.make_learner(cfg, m, self.island, inner, params, opt_state,
                                         self.fragments)
    self.data = team_lib.make_shard(cfg, train_tokens, m)
    self.tokens_per_step = self.per_learner_batch * cfg.model.seq_len
    self.phase = 0
    self.busy_s = 0.0  # Wall time of the steps this state holds (a restore rolls it back).
    self.waiting_s = 0.0
    self.step_ema = 0.0
    self.counts = {"rejoins": 0, "rephases": 0, "full_copies": 0, "aligned": 0}
    self._held: list[Publication] = []  # Learners that wait: publications not yet due.
    self._awaiting: dict[int, tuple[int, int]] = {}  # fragment -> (round, send step).
    self._courier: Courier | None = None
    self._last_t: float | None = None
    self._stepped = 0  # Steps taken by this process.
    self.incarnation = int.from_bytes(os.urandom(6), "big")
    # Over several processes (jax.distributed), process 0 alone touches the
    # mailbox and logs; what it reads is broadcast to the others.
    self.primary = jax.process_index() == 0
    self.log = EventLog(os.path.join(workdir, "events.jsonl") if self.primary else None,
                        learner=m)
    self.log("start", incarnation=self.incarnation)

  @property
  def step(self) -> int:
    return self.learner.step

  @property
  def position(self) -> int:
    return self.learner.step + self.phase

  # --- the step ------------------------------------------------------------------

  def train_step(self) -> dict:
    if self._courier is None:  # After a restore, before the first step.
      self._connect()
    if self._last_t is not None:  # Start to start: the step's pace, device queue included.
      seconds = time.time() - self._last_t
      self.busy_s += seconds
      self.step_ema = seconds if not self.step_ema else self.step_ema + 0.1 * (seconds - self.step_ema)
    self._align_landed()
    if self.cfg.sim.learners_wait:
      self._wait_for_publications()
    start = time.time()  # Waiting is not busy time.
    # The first step of a process compiles: its pace is measured from the second.
    self._last_t = start if self._stepped else None
    self._stepped += 1
    batch = next(self.data)
    loss = self.learner.inner_step(jax.device_put(batch, self.island.batch),
                                   self.tokens_per_step)
    if self.cfg.dist.min_step_s:
      loss.block_until_ready()
      time.sleep(max(start + self.cfg.dist.min_step_s - time.time(), 0.0))
    self.log("step", step=self.learner.step)
    position, H = self.position, self.cfg.diloco.sync_every
    for p in fragments_lib.due(position, self.offsets, H):
      self._send(p, rounds_lib.round_of(position, self.offsets[p], H))
    return {"loss": loss}

  def _send(self, p: int, rnd: int) -> None:
    c = self.learner.pseudo_gradient(p, rnd)
    if jax.process_count() > 1:  # A collective: every process gathers the payload.
      c = c._replace(payload=tuple(multihost_utils.process_allgather(list(c.payload), tiled=True)))
    if self.primary:
      self._courier.send(c._replace(sent_at=time.time(), step_seconds=self.step_ema))
    if self.cfg.sim.learners_wait:
      self._awaiting[p] = (rnd, self.learner.step)

  def _landed(self) -> list[tuple[Publication, float]]:
    """Publications that landed since the last call (the same on every process)."""
    return _share_publications(self._courier.take() if self.primary else None)

  def _align_landed(self) -> None:
    for pub, landed_at in self._landed():
      if self.cfg.sim.learners_wait:
        self._held.append(pub)
        continue
      if pub.round >= 0:
        self._rephase_if_behind(pub, landed_at)
      self._align(pub)
    if self._held:
      self._align_due()

  def _align_due(self) -> None:
    """Learners that wait apply a merge after step send + tau, as lock-step does."""
    keep = []
    for pub in sorted(self._held, key=lambda pub: (pub.fragment, pub.version)):
      rnd, sent = self._awaiting.get(pub.fragment, (None, None))
      if rnd is not None and pub.round >= rnd and self.learner.step < sent + self.cfg.diloco.overlap:
        keep.append(pub)
        continue
      self._align(pub)
      if rnd is not None and pub.round >= rnd:
        del self._awaiting[pub.fragment]
    self._held = keep

  def _wait_for_publications(self) -> None:
    tau = self.cfg.diloco.overlap
    t0 = time.time()
    while any(sent <= self.learner.step - tau for _, sent in self._awaiting.values()):
      if self.primary and self._courier.lost:
        raise RuntimeError(f"learner {self.m}: {self._courier.lost}")
      if time.time() - t0 > self.cfg.dist.startup_s:
        raise TimeoutError(f"learner {self.m} waited {self.cfg.dist.startup_s:.0f} s for"
                           f" fragments {sorted(self._awaiting)}: is the syncer running?")
      time.sleep(self.cfg.dist.poll_s / 4)
      for pub, _ in self._landed():
        self._held.append(pub)
      self._align_due()
    self.waiting_s += time.time() - t0

  def _align(self, pub: Publication) -> None:
    outcome = self.learner.align(pub)
    if outcome == "gap" and self.primary:
      self._courier.want_full(pub.fragment)
    elif outcome == "applied":
      self.counts["aligned"] += 1
      self.counts["full_copies"] += pub.base_version < 0 and pub.round < 0
    self.log("align", fragment=pub.fragment, version=pub.version, outcome=outcome)

  def _rephase_if_behind(self, pub: Publication, now: float) -> None:
    moved = rounds_lib.rephase(self.position, pub.fragment, pub.round, self.offsets,
                               self.cfg.diloco.sync_every, since_s=now - pub.started_at,
                               step_s=pub.step_seconds)
    if moved is None:
      return
    target, skipped = moved
    for q in sorted(skipped):  # Their work since the last alignment is not lost.
      self._send(q, skipped[q])
    self.log("rephase", fragment=pub.fragment, round=pub.round, position=self.position,
             to=target, sent=sorted(skipped))
    self.phase += target - self.position
    self.counts["rephases"] += 1

  # --- joining the run -------------------------------------------------------------

  def _connect(self) -> None:
    """Takes this learner's lease, rejoins if its state is too old, starts the courier."""
    dist = self.cfg.dist
    if self.primary:
      lease = self._take_lease()
      plan = self._plan_rejoin()
    rejoin = _share(plan if self.primary else None)
    if rejoin:
      self._rejoin(*_unpack(rejoin))
    if self.primary:
      lossless = syncer_lib.lossless(make_codec(self.cfg.codec, "down"))
      self._courier = Courier(self.mailbox, self.m, len(self.fragments), lossless_down=lossless,
                              lease=lease, ttl_s=dist.lease_s, poll_s=dist.poll_s,
                              incarnation=self.incarnation, info=self._info, log=self.log,
                              link_file=os.path.join(self.workdir, LINK_FILE))
      self._courier.start(self.learner.base_version)
    else:
      self._courier = False  # Connected; process 0 holds the courier.

  def _take_lease(self) -> Lease:
    dist = self.cfg.dist
    holder = f"{socket.gethostname()}:{os.path.abspath(self.workdir)}"
    deadline = time.time() + dist.lease_s + 1
    while (lease := self.mailbox.acquire(learner_lease(self.m), holder, dist.lease_s,
                                         self._info())) is None:
      if time.time() > deadline:
        other = self.mailbox.read_lease(learner_lease(self.m))
        raise RuntimeError(f"learner {self.m} is already running ({other.holder if other else '?'}"
                           f" holds {learner_lease(self.m)}); stop it, or give this one its"
                           " own --learner.")
      time.sleep(dist.poll_s)
    return lease

  def _plan_rejoin(self) -> bytes:
    """b"" if this learner's state is recent enough; else what `_rejoin` needs.

    Rejoining takes full copies of the latest versions, at the schedule
    position of the live learners (or, with none live, of the rounds the
    latest publications closed).
    """
    latest = [v or 0 for v in self.mailbox.latest_versions(len(self.fragments))]
    behind = int(np.max(np.array(latest) - self.learner.base_version))
    if behind <= self.cfg.dist.resume_max_versions:
      return b""
    pubs = [self.mailbox.full_copy(p, v) for p, v in enumerate(latest)]
    if any(pub is None for pub in pubs):
      raise RuntimeError(f"learner {self.m}: the mailbox has no full copy of versions"
                         f" {latest}; is {self.mailbox} this run's mailbox?")
    now = time.time()
    live = [l.info for l in self.mailbox.leases(LEARNER_LEASES).values()
            if _live(l, now) and l.name != learner_lease(self.m)]
    H = self.cfg.diloco.sync_every
    sent = [got[0].round * H + self.offsets[p] for p, v in enumerate(latest)
            if (got := self.mailbox.publication(p, v)) is not None and got[0].round >= 0]
    position = max([int(i.get("position", 0)) for i in live] + sent + [self.position])
    schedule_step = max([int(i.get("step", 0)) for i in live] + [self.learner.step])
    return _pack([mailbox_lib.publication_bytes(pub, _LOCAL) for pub in pubs],
                 {"behind": behind, "position": position, "schedule_step": schedule_step})

  def _rejoin(self, parts: list[bytes], plan: dict) -> None:
    """Restarts from full copies of the global fragments (see `_plan_rejoin`)."""
    pubs = [mailbox_lib.parse_publication(b, _LOCAL)[0] for b in parts]
    opt_state = None
    if self.cfg.chaos.rejoin_optimizer == "fresh":
      opt_state = optim.restart_state(self.inner_tx, self.learner.params, plan["schedule_step"],
                                      self.cfg.chaos.rewarmup_steps)
    self.learner.recover(pubs, opt_state)
    self.phase = plan["position"] - self.learner.step
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
    """The global model as this learner holds it (its bases)."""
    return fragments_lib.unflatten({k: t for f, ts in zip(self.fragments, self.learner.base)
                                    for k, t in zip(f, ts)})

  def state(self) -> dict:
    learner = self.learner.state()
    if jax.process_count() > 1:
      learner = _local(learner)
    return {"learner": learner, "data_position": np.int64(self.data.position),
            "phase": np.int64(self.phase), "busy_s": np.float64(self.busy_s)}

  def load_state(self, s: dict) -> None:
    learner = s["learner"]
    if jax.process_count() > 1:  # Host copies back onto the island spanning the processes.
      put = lambda tree: jax.tree.map(
          lambda x: jax.device_put(np.asarray(x), self.island.param_sharding(x)), tree)
      learner = {**learner, **{k: put(learner[k]) for k in
                               ("params", "opt_state", "base", "residual") if k in learner}}
    self.learner.load_state(learner)
    self.data.position = int(s["data_position"])
    self.phase = int(s["phase"])
    self.busy_s = float(s["busy_s"])
    self.log("resume", step=self.learner.step)

  def extra_state(self):
    return [], None  # Queued uploads are work a crash loses (counted as such).

  def load_extra_state(self, payloads, meta) -> None:
    del payloads, meta

  def comm_metrics(self) -> dict:
    c = self._courier  # None before the first step; False off process 0.
    return {"bytes_up": c.bytes_up if c else 0, "bytes_down": c.bytes_down if c else 0}

  def summary(self) -> dict:
    c = self._courier
    flushed = c.close(timeout_s=self.cfg.dist.lease_s) if c else True
    if c and not c.lost:
      c.beat("done")
    self.log("done", step=self.learner.step, flushed=flushed)
    self.log.close()
    return {**self.comm_metrics(), "learner": self.m, "busy_s": self.busy_s,
            "waiting_s": self.waiting_s, "step_seconds": self.step_ema,
            "duplicate_sends": c.duplicates if c else 0, "uploads_flushed": flushed,
            **self.counts}


# --- the syncer ----------------------------------------------------------------------


class SyncerService:
  """The syncer as a process; see module docstring. `run()` returns its summary."""

  def __init__(self, cfg: Config, corpus: corpus_lib.Corpus, workdir: str, mailbox: Mailbox):
    d = cfg.diloco
    self.cfg, self.workdir, self.mailbox, self.corpus = cfg, workdir, mailbox, corpus
    params, self.fragments, self.offsets = _model(cfg)
    self.model = transformer.Transformer(cfg.model)
    self.syncer = team_lib.make_syncer(cfg, fragments_lib.flatten(params), self.fragments)
    del params
    self.num_fragments, self.num_learners = len(self.fragments), d.num_learners
    rules = scenario.protocol(cfg, self.offsets).rules
    H = d.sync_every
    first = [rounds_lib.round_of(o if o > 0 else H, o, H) for o in self.offsets]
    self.rounds = rounds_lib.Rounds(self.num_fragments, self.num_learners, rules, step_s=0.0,
                                    sync_s=0.0, first_rounds=first)
    # Per fragment and learner, the newest round read (consumed once merged).
    self.seen = np.full((self.num_fragments, self.num_learners), -1, np.int64)
    self.deferred: set[tuple[int, int, int]] = set()  # Keys too far ahead to read yet.
    self.incarnations = [None] * self.num_learners
    self.live = [None] * self.num_learners
    self.commits = np.zeros(self.num_fragments, np.int64)
    self.counts = {"late_joined": 0, "late_dropped": 0, "late_rejected": 0, "recoveries": 0,
                   "rejected_mailbox": 0}
    self.holder = f"{socket.gethostname()}:{os.path.abspath(workdir)}:{os.getpid()}"
    self.lease: Lease | None = None
    self.lost = False  # Set by the lease thread when another syncer took over.
    self._stop = threading.Event()
    self.log = EventLog(os.path.join(workdir, "events.jsonl"), role="syncer")
    self.started = time.time()
    self.learners_info: dict[int, dict] = {}

  # --- leading ----------------------------------------------------------------------

  def _lead(self) -> None:
    """Waits (as a standby) until this process holds the syncer lease."""
    dist = self.cfg.dist
    waiting = False
    while (lease := self.mailbox.acquire(SYNCER_LEASE, self.holder, dist.lease_s)) is None:
      if not waiting:
        other = self.mailbox.read_lease(SYNCER_LEASE)
        logging.info("syncer: %s leads; standing by until its lease expires",
                     other.holder if other else "another syncer")
        waiting = True
      time.sleep(dist.poll_s * 4)
    self.lease = lease
    self.log("lead", epoch=lease.epoch)
    logging.info("syncer: leading (epoch %d)", lease.epoch)
    threading.Thread(target=self._keep_lease, daemon=True, name="syncer-lease").start()

  def _keep_lease(self) -> None:
    """Renews the lease in the background: a long compile or merge must not lose it."""
    while not self._stop.wait(self.cfg.dist.lease_s / 4):
      try:
        lease = self.mailbox.renew(self.lease, self.cfg.dist.lease_s)
      except Exception as e:  # pylint: disable=broad-except  (retried; expiry decides)
        logging.warning("syncer: lease renewal failed: %s", e)
        continue
      if lease is None:
        self.lost = True
        return
      self.lease = lease

  # --- durable state, one fragment at a time -------------------------------------------

  def _fragment_state(self, p: int) -> tuple[dict, list]:
    s, r = self.syncer, self.rounds
    meta = {"version": int(s.version[p]), "merges": int(s.merges[p]), "open": r.open[p],
            "reported": r.reported[p].tolist(), "seen": self.seen[p].tolist(),
            "last_base": s.last_base[p].tolist(), "last_steps": s.last_steps[p].tolist(),
            "last_tokens": s.last_tokens[p].tolist(), "recent_norm": s.recent_norm[p].tolist(),
            "clipped": s.clipped, "rejected": dict(s.rejected), "counts": self.counts,
            "xi": [r.xi_step, r.xi_quorum, r.xi_sync], "held": s.held is not None}
    arrays = [*s.theta[p], *jax.tree.leaves(s.opt_state[p])]
    if s.held is not None:
      arrays += s.held[p]
    for deltas in s.last_deltas[p]:
      arrays += deltas
    return meta, [np.asarray(a) for a in jax.device_get(arrays)]

  def _load_fragment(self, p: int, meta: dict, arrays: list) -> None:
    s, r = self.syncer, self.rounds
    n = len(s.theta[p])
    put = lambda xs: jax.device_put(list(xs), s.device)
    s.theta[p] = put(arrays[:n])
    leaves, tree = jax.tree.flatten(s.opt_state[p])
    s.opt_state[p] = jax.tree.unflatten(tree, put(arrays[n:n + len(leaves)]))
    at = n + len(leaves)
    if s.held is not None:
      s.held[p] = put(arrays[at:at + n])
      at += n
    for m in range(self.num_learners):
      s.last_deltas[p][m] = put(arrays[at:at + n])
      at += n
    s.version[p], s.merges[p] = meta["version"], meta["merges"]
    s.last_base[p], s.last_steps[p] = meta["last_base"], meta["last_steps"]
    s.last_tokens[p], s.recent_norm[p] = meta["last_tokens"], meta["recent_norm"]
    r.open[p], r.reported[p] = meta["open"], meta["reported"]
    self.seen[p] = meta["seen"]

  def _recover(self) -> None:
    """Takes up each fragment's newest committed version (or publishes version 0)."""
    newest = None
    for p in range(self.num_fragments):
      for v in reversed(self.mailbox.versions(p)):
        if (state := self.mailbox.outer_state(p, v)) is not None:
          meta, arrays = state
          self._load_fragment(p, meta, arrays)
          if newest is None or v > newest[0]:
            newest = (v, meta)
          break
      else:
        self._commit(p, self.syncer.publication(p))  # Version 0: what every learner starts from.
    if newest is not None:
      meta = newest[1]
      self.syncer.clipped = meta["clipped"]
      self.syncer.rejected.update(meta["rejected"])
      self.counts.update(meta["counts"])
      self.rounds.xi_step, self.rounds.xi_quorum, self.rounds.xi_sync = meta["xi"]
      self.counts["recoveries"] += 1
      logging.info("syncer: recovered versions %s from the mailbox",
                   self.syncer.version.tolist())
    self.log("recovered", versions=self.syncer.version.tolist())

  def _commit(self, p: int, pub: Publication) -> None:
    """Writes the outer state, then the publication; raises `Fenced` if it lost the race."""
    full = self.syncer.publication(p) if self.syncer.held is not None and pub.round >= 0 else None
    t0 = time.time()
    if not self.mailbox.publish(pub, lease=self.lease, outer=self._fragment_state(p), full=full,
                                written_at=t0):
      raise Fenced(f"version {pub.version} of fragment {p} was published by another syncer")
    self.commits[p] += 1
    # The publication lands at the learners about one poll later, as they measure it.
    latencies = [i.get("latency_s", 0.0) for i in self.learners_info.values()]
    self.rounds.observe_sync(time.time() - t0 + (float(np.median(latencies)) if latencies else 0.0))
    self.log("publish", fragment=p, version=pub.version, round=pub.round, bytes=pub.nbytes)
    if self.commits[p] % self.cfg.dist.gc_every == 0:
      self._collect(p)

  def _collect(self, p: int) -> None:
    """Deletes keys behind the slowest live learner (and old publications)."""
    live = [m for m in range(self.num_learners) if self.live[m]]
    if not live:
      return
    below_round = int(min(self.seen[p, m] for m in live)) + 1
    bases = [self.learners_info.get(m, {}).get("base_versions", [0] * self.num_fragments)[p]
             for m in live]
    below_version = min(int(min(bases)), int(self.syncer.version[p]) - self.cfg.dist.keep_versions)
    n = self.mailbox.collect(p, below_round=below_round, below_version=max(below_version, 0))
    self.log("collect", fragment=p, below_round=below_round, below_version=below_version,
             deleted=n)

  # --- the loop -------------------------------------------------------------------------

  def _update_live(self, now: float) -> bool:
    """Live learners from their leases; True when every learner is done."""
    leases = self.mailbox.leases(LEARNER_LEASES)
    done = 0
    for m in range(self.num_learners):
      lease = leases.get(learner_lease(m))
      if lease is not None:
        self.learners_info[m] = lease.info
        done += lease.info.get("status") == "done"
      live = _live(lease, now) or (lease is None and now - self.started < self.cfg.dist.startup_s)
      incarnation = lease.info.get("incarnation") if lease else None
      if live and incarnation is not None and incarnation != self.incarnations[m]:
        if self.incarnations[m] is not None:  # A restart: it will not send what it skipped.
          position = int(lease.info.get("position", 0))
          H = self.cfg.diloco.sync_every
          self.rounds.rejoin(m, [rounds_lib.round_of(position, o, H) for o in self.offsets])
        self.incarnations[m] = incarnation
        self.log("learner_up", learner=m, incarnation=incarnation)
      if live != self.live[m]:
        self.rounds.set_live(m, live)
        if self.live[m] is not None:
          self.log("learner_up" if live else "learner_down", learner=m)
        self.live[m] = live
    return done == self.num_learners

  def _read(self, p: int) -> None:
    for rnd, m in self.mailbox.contributions(p):
      if not 0 <= m < self.num_learners or rnd <= self.seen[p, m]:
        continue
      if rnd > self.rounds.open[p] + rounds_lib.MAX_ROUNDS_AHEAD:
        # Learners run ahead of a syncer that was down: read it once the open
        # round catches up (a lie about the round waits for ever, unread).
        if (p, rnd, m) not in self.deferred:
          self.deferred.add((p, rnd, m))
          self.log("defer", learner=m, fragment=p, round=rnd, open=self.rounds.open[p])
        break
      self.seen[p, m] = rnd
      got = self.mailbox.receive(p, rnd, m)
      if got is None:
        self.counts["rejected_mailbox"] += 1
        self.rounds.mark_reported(m, p, rnd)
        self.log("reject", learner=m, fragment=p, round=rnd, reason="message")
        continue
      c, _ = got
      accepted = self.syncer.validate(c)
      if accepted is None:
        self.rounds.mark_reported(m, p, rnd)
        self.log("reject", learner=m, fragment=p, round=rnd, reason=self.syncer.last_rejection)
        continue
      verdict = self.rounds.arrive(m, p, rnd, sent_at=c.sent_at, step_s=c.step_seconds)
      if verdict.round < 0:
        self.counts["late_dropped" if verdict.status == "dropped" else "late_rejected"] += 1
        if verdict.status == "rejected":
          self.syncer.reject(c, "late")
        self.log("late", learner=m, fragment=p, round=rnd, outcome=verdict.status)
        continue
      self.syncer.admit(c, accepted, verdict.round)
      self.counts["late_joined"] += verdict.status == "late"
      self.log("arrive", learner=m, fragment=p, round=rnd, joins=verdict.round,
               status=verdict.status)

  def _decide(self, p: int, now: float) -> float | None:
    """Closes fragment p's open round if the rules say so; returns a deadline, if any."""
    while True:
      d = self.rounds.decide(p, now)
      if d.grace_s is not None:
        self.log("grace", fragment=p, round=self.rounds.open[p], seconds=round(d.grace_s, 6),
                 xi_step=self.rounds.xi_step, xi_quorum=self.rounds.xi_quorum,
                 xi_sync=self.rounds.xi_sync)
      if not d.close:
        return d.deadline
      self._close(p, now)

  def _close(self, p: int, now: float) -> None:
    """Merges what waits for fragment p into its open round, and commits the result."""
    rnd = self.rounds.open[p]
    n = self.syncer.contributors(p, rnd)
    started = min(self.rounds.on_time[p].get(rnd, {}).values(), default=now)
    pub = self.syncer.merge(p, rnd)
    self.rounds.close(p)
    if pub is not None:
      self.log("merge", fragment=p, round=rnd, version=pub.version, contributors=n)
      self._commit(p, pub._replace(started_at=started, step_seconds=self._step_seconds()))

  def _step_seconds(self) -> float:
    """The live learners' step time that publications carry (learners re-phase by it).

    The median of what each live learner last reported: one learner that lies
    about its pace cannot move it (with three or more), so it cannot send the
    others' schedules far ahead.
    """
    reported = [i.get("step_seconds", 0.0) for m, i in self.learners_info.items() if self.live[m]]
    reported = [x for x in reported if isinstance(x, (int, float)) and x > 0 and np.isfinite(x)]
    return float(np.median(reported)) if reported else self.rounds.xi_step

  def run(self) -> dict:
    """Leads, recovers, and merges until every learner is done; returns the summary."""
    self.syncer.warm_up()
    self._lead()
    self._recover()
    last_report = time.time()
    while True:
      now = time.time()
      if self.lost:
        raise Fenced("the syncer lease was taken over by another syncer")
      finished = self._update_live(now)
      for p in range(self.num_fragments):
        self._read(p)
        self._decide(p, time.time())
      if finished:  # What still waits (late work of the last learners) is merged.
        for p in range(self.num_fragments):
          if self.syncer.pending[p]:
            self._close(p, time.time())
        break
      if time.time() - last_report > 10:
        last_report = time.time()
        logging.info("syncer: versions %s, live learners %s, rejected %d",
                     self.syncer.version.tolist(),
                     [m for m in range(self.num_learners) if self.live[m]],
                     sum(self.syncer.rejected.values()))
      time.sleep(self.cfg.dist.poll_s)
    return self._finish()

  def _finish(self) -> dict:
    cfg = self.cfg
    island = islands_lib.make_islands(1, devices=[self.syncer.device])[0]
    batches = loader.eval_batches(self.corpus.eval, batch_size=cfg.data.batch_size,
                                  seq_len=cfg.model.seq_len, num_batches=cfg.train.eval_batches)
    loss = steps.evaluate(steps.make_eval_loss(self.model, island), island,
                          fragments_lib.unflatten(self.syncer.global_flat()), batches)
    wall = time.time() - self.started
    summary = {
        "final_eval_loss": loss, "final_eval_bits_per_byte": loss / np.log(2),
        "versions": self.syncer.version.tolist(), "outer_steps": int(self.syncer.merges.sum()),
        "merges_per_fragment": self.syncer.merges.tolist(),
        "rejected_contributions": dict(self.syncer.rejected),
        "rejected_messages": dict(self.mailbox.rejected), "clipped": self.syncer.clipped,
        "protocol": {**self.counts, "xi_step": self.rounds.xi_step,
                     "xi_quorum": self.rounds.xi_quorum, "xi_sync": self.rounds.xi_sync},
        "wall_seconds": wall, "epoch": self.lease.epoch,
        "learners": {str(m): i for m, i in sorted(self.learners_info.items())},
    }
    self._stop.set()
    self.mailbox.release(self.lease)
    self.log("done", versions=self.syncer.version.tolist(), eval_loss=loss)
    self.log.close()
    logging.info("syncer: final eval loss %.4f after versions %s", loss,
                 self.syncer.version.tolist())
    return summary


def run_syncer(config, workdir: str, mailbox: Mailbox) -> dict:
  """`--role=syncer`: leads (or stands by), merges until the learners are done."""
  from decoupled_diloco import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.parse(config)
  workdir_lib.check_writable(workdir)
  with workdir_lib.Lock(workdir):
    mailbox.put_config(config.to_json(sort_keys=True))
    corpus = corpus_lib.load(cfg.data.path, cfg.data.eval_percent)
    summary = SyncerService(cfg, corpus, workdir, mailbox).run()
    path = metrics.write_summary(workdir, {**summary, "config": config.to_dict()})
    logging.info("syncer: results in %s", path)
    return summary


def run_learner(config, workdir: str, mailbox: Mailbox, m: int) -> dict:
  """`--role=learner`: learner m trains (or resumes) in `workdir`, the train.py loop."""
  from decoupled_diloco import train  # pylint: disable=g-import-not-at-top  (train imports runtimes)
  mailbox.put_config(config.to_json(sort_keys=True))
  make = lambda cfg, corpus, wd: LearnerRuntime(cfg, corpus.train, wd, mailbox, m)
  return train.train_and_evaluate(config, workdir, runtime_factory=make, kind="learner")


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """`jax.distributed` for a learner spanning several hosts (no arguments on a TPU slice)."""
  kwargs = {k: v for k, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes),
                              ("process_id", process_id)) if v is not None}
  jax.distributed.initialize(**kwargs)
