"""The real runtime in one process: learners and a syncer on a `memory://` mailbox.

Each actor has its own fake clock; a discrete-event loop runs them in time
order, the way the simulator orders its events at one instant: a learner's
sends go up when its step ends (then the syncer polls), then learners that
may step start their next step (sends made then, a re-phase's, go up at once,
and the syncer polls again). A learner's step takes its own
`dist.min_step_s` of fake time (the runtime sleeps it on its clock). Nothing
sleeps in real time and no thread runs, so a run is deterministic.
"""

import dataclasses
import itertools
import math
import os

from decoupled_diloco import config as config_lib
from decoupled_diloco import steps, tasks
from decoupled_diloco.runtime.dist.keys import Keyring, learner_credential
from decoupled_diloco.runtime.dist.learner import LearnerRuntime
from decoupled_diloco.runtime.dist.mailbox import Mailbox
from decoupled_diloco.runtime.dist.syncer import SyncerService

SECRET = b"in-process run"
_RUNS = itertools.count()


class Clock:
  """Fake seconds that move only when set or slept."""

  def __init__(self, now: float = 0.0):
    self.now = now

  def __call__(self) -> float:
    return self.now

  def sleep(self, seconds: float) -> None:
    self.now += max(float(seconds), 0.0)


class InProcessRun:
  """See module docstring. `step_seconds[m]`: learner m's step time (fake seconds)."""

  def __init__(self, config, root, step_seconds, *, step_s_prior: float = 0.0):
    self.cfg = config_lib.parse(config)
    self.root, self.task = str(root), tasks.build(self.cfg)
    self.step_seconds = list(step_seconds)
    self.url = f"memory://in_process_{os.getpid()}_{next(_RUNS)}/"
    self.now = 0.0
    self.syncer_clock = Clock()
    self.syncer = self._syncer(step_s_prior)
    if not self.syncer.start():
      raise RuntimeError("a fresh mailbox has a syncer lease already")
    num = self.cfg.diloco.num_learners
    # The devices split between learners, as the in-process runtimes split them.
    self.islands = steps.make_islands(self.cfg, self.task, num)
    self.learners: list[LearnerRuntime | None] = [None] * num
    self.clocks = [Clock() for _ in range(num)]
    self.next_start = [math.inf] * num
    self.upload_at = [math.inf] * num
    self.polls: list[float] = []  # Extra syncer polls (a lease to expire).
    self.actions: list[tuple[float, object]] = []  # (time, callable) run at that instant.
    self.done = [False] * num
    self.waiting: set[int] = set()  # Learners that wait for a publication (lock-step).
    self.finished = False
    for m in range(num):
      self.restart(m)

  def mailbox(self, clock, m: int | None = None) -> Mailbox:
    """The syncer's mailbox (every key), or learner m's (its credential only)."""
    keys = SECRET if m is None else Keyring.from_credential(learner_credential(SECRET, m))
    return Mailbox(self.url, keys, clock=clock, sleep=clock.sleep)

  def _syncer(self, step_s_prior: float = 0.0) -> SyncerService:
    workdir = os.path.join(self.root, "syncer")
    os.makedirs(workdir, exist_ok=True)
    return SyncerService(self.cfg, self.task, workdir,
                         self.mailbox(self.syncer_clock), clock=self.syncer_clock,
                         sleep=self.syncer_clock.sleep, threaded=False, step_s=step_s_prior)

  def restart(self, m: int, state=None) -> LearnerRuntime:
    """Learner m starts now as a new process (from `state`, a checkpoint, if given)."""
    cfg = dataclasses.replace(self.cfg, dist=dataclasses.replace(
        self.cfg.dist, min_step_s=self.step_seconds[m]))
    clock = self.clocks[m] = Clock(self.now)
    workdir = os.path.join(self.root, f"learner{m}")
    os.makedirs(workdir, exist_ok=True)
    rt = LearnerRuntime(cfg, self.task, workdir, self.mailbox(clock, m), m, clock=clock,
                        sleep=clock.sleep, threaded=False, island=self.islands[m])
    if state is not None:
      rt.load_state(state)
    self.learners[m] = rt
    self.next_start[m], self.upload_at[m] = self.now, math.inf
    self.waiting.discard(m)
    return rt

  def at(self, t: float, action) -> None:
    """Runs `action()` at fake time `t`, before anything else of that instant."""
    self.actions.append((t, action))

  def kill(self, m: int, *, detected: bool = False) -> None:
    """Learner m dies now (kill -9): what it had not uploaded is lost.

    `detected`: its lease is expired at once, as an orchestrator that saw the
    host die would (the syncer then learns of it at its next poll, not after
    `dist.lease_s`: the simulator's failure detector).
    """
    rt = self.learners[m]
    if detected and rt is not None and rt._courier:  # pylint: disable=protected-access
      courier = rt._courier  # pylint: disable=protected-access
      courier.mailbox.release(courier.lease)
    self.learners[m] = None
    self.next_start[m] = self.upload_at[m] = math.inf
    self.waiting.discard(m)
    self.polls.append(self.now + self.cfg.dist.lease_s + 1e-3)  # When its lease expires.

  def _syncer_step(self) -> None:
    self.syncer_clock.now = self.now
    if self.syncer.step(self.now) and not self.finished:
      self.finished = True

  def advance(self) -> None:
    """Processes the next instant at which anything happens."""
    # A deadline already past is a round that lost its quorum (a sender went down after
    # it was met): the syncer stepped at it, and only a new contribution can close it.
    deadline = self.syncer.next_deadline()
    times = [*self.upload_at, *(t for t, rt in zip(self.next_start, self.learners) if rt),
             *self.polls, *(t for t, _ in self.actions),
             deadline if deadline is not None and deadline > self.now else math.inf]
    t = min(times)
    if t == math.inf:
      raise RuntimeError("nothing can happen: every learner waits and no round can close")
    self.now = max(self.now, t)
    self.polls = [p for p in self.polls if p > self.now]
    due = [a for a in self.actions if a[0] <= self.now]
    self.actions = [a for a in self.actions if a[0] > self.now]
    for _, action in sorted(due, key=lambda a: a[0]):
      action()
    for m, rt in enumerate(self.learners):
      if rt is not None and self.upload_at[m] <= self.now:
        self.clocks[m].now = self.now
        rt.upload()
        self.upload_at[m] = math.inf
        self._syncer_step()
    self._syncer_step()
    for m, rt in enumerate(self.learners):
      if rt is None or self.done[m] or (self.next_start[m] > self.now and m not in self.waiting):
        continue
      self.clocks[m].now = self.now
      if rt.step >= self.cfg.train.steps:
        rt.summary()
        self.done[m] = True
        self.next_start[m] = math.inf
        self._syncer_step()
        continue
      if not rt.ready():
        self.waiting.add(m)  # Tried again at the next instant.
        self.next_start[m] = math.inf
        continue
      self.waiting.discard(m)
      rt.train_step()
      rt.upload(until=self.now)  # Sends made before the step (a re-phase's) go up now.
      self._syncer_step()
      self.next_start[m] = self.upload_at[m] = self.clocks[m].now

  def run_until(self, condition, max_instants: int = 100_000) -> None:
    for _ in range(max_instants):
      if condition():
        return
      self.advance()
    raise RuntimeError(f"the condition did not hold within {max_instants} instants")

  def run(self) -> dict:
    """Until every learner trained `train.steps` and the syncer finished; its summary."""
    self.run_until(lambda: self.finished)
    return self.syncer.finish()
