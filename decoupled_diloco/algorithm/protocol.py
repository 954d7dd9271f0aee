"""The round protocol's driver: every rule of it, clock-free and transport-free.

Decoupled DiLoCo (https://arxiv.org/abs/2604.21428) is one algorithm run on
two clocks: the simulator's virtual clock and the real runtime's wall clock.
Both feed the objects here with timestamped events and perform the effects
they return; neither decides anything about rounds itself (DESIGN.md §4).
Shaped like MaxText's `build_diloco_train_step`, which hands any loop pure
functions over explicit state.

`SyncerProtocol` (the syncer's side) takes events

  arrive(c, now)          a contribution arrived (validated here, by the merger)
  unreadable(m, p, r)     a message for (fragment p, round r, learner m) did not parse
  tick(now)               time passed (a grace window may have ended)
  set_live(m, live, now)  a learner went down or came back without losing its place
  rejoined(m, position)   a learner restarted at a schedule position
  finish(now)             the run ends: what still waits is merged

and returns effects: `Publish` (a merge's publication, or a `Notice` that a
round closed with nothing to merge while learners wait), `Timer` (call
`tick` again at this time), `Log`. `LearnerSchedule` (one learner's side)
takes `stepped`, `sent`, `landed`, `noticed`, `rejoin` and returns `Send`,
`Align` and `Log` effects; `waiting()` says whether it may step.

The four rules the two runtimes once wrote differently are each here once:

- A waiting (lock-step) learner is released for fragment p by the first
  publication or notice of p for the round it waits for, or a later one,
  that lands at it; it does not wait at all for a round already answered.
- A round that closes with nothing to merge while learners wait is answered
  by a notice (no parameters: nothing was merged, and a republished copy
  would make learners drop their work since the last sync).
- The pace a publication carries (learners re-phase by it) is the median of
  the step times the live learners last reported with a valid contribution:
  one learner that lies about its pace cannot move it (with three or more).
- A rejoining learner takes the furthest of: the live learners' positions,
  the send positions of the latest publications' rounds, its own position.
"""

from typing import NamedTuple, Protocol as TypingProtocol

import numpy as np

from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.algorithm import rounds as rounds_lib
from decoupled_diloco.algorithm.messages import Contribution, Notice, Publication


class Schedule(NamedTuple):
  """When fragments are sent and applied (DESIGN.md §2)."""
  offsets: tuple[int, ...]  # Per-fragment sync offsets.
  sync_every: int  # H.
  overlap: int  # tau.
  learners_wait: bool = False  # Learners wait for fragment p at send step + tau.

  def due(self, position: int) -> list[tuple[int, int]]:
    """(fragment, round) of every send at schedule position `position`."""
    return [(p, rounds_lib.round_of(position, self.offsets[p], self.sync_every))
            for p in fragments_lib.due(position, self.offsets, self.sync_every)]

  def first_rounds(self) -> list[int]:
    """Each fragment's first round that a learner starting at position 0 sends."""
    H = self.sync_every
    return [rounds_lib.round_of(o if o > 0 else H, o, H) for o in self.offsets]

  def rounds_through(self, position: int) -> list[int]:
    """Per fragment, the round of its latest send at or before `position`."""
    return [rounds_lib.round_of(position, o, self.sync_every) for o in self.offsets]

  def send_position(self, fragment: int, rnd: int) -> int:
    return rnd * self.sync_every + self.offsets[fragment]


# --- effects ---------------------------------------------------------------------


class Publish(NamedTuple):
  """Send `message` (a `Publication`, or a `Notice`) to every learner."""
  message: Publication | Notice
  contributors: int  # Contributions the merge took (0 for a notice).


class Timer(NamedTuple):
  """Call `tick` at `at` (the grace window of `fragment`'s round `round` ends)."""
  fragment: int
  round: int
  at: float


class Log(NamedTuple):
  event: str
  fields: dict


class Send(NamedTuple):
  """The learner sends its pseudo-gradient of `fragment` for round `round`."""
  fragment: int
  round: int


class Align(NamedTuple):
  """The learner aligns to `publication`."""
  publication: Publication


# --- rules that need no state ----------------------------------------------------


def pace(step_seconds, fallback: float) -> float:
  """The step time a publication carries: the median of positive finite reports."""
  good = [float(x) for x in step_seconds if np.isfinite(x) and x > 0]
  return float(np.median(good)) if good else float(fallback)


def rejoin_position(own: int, live_positions, published: dict[int, int],
                    schedule: Schedule) -> int:
  """Where a rejoining learner goes (module docstring).

  Args:
    own: its own schedule position (it must never send a round twice).
    live_positions: the positions of the other learners that are live.
    published: {fragment: round} of the latest publication of each fragment.
  """
  sent = [schedule.send_position(p, r) for p, r in published.items() if r >= 0]
  return int(max([own, *live_positions, *sent]))


# --- the syncer's side -----------------------------------------------------------


class Merger(TypingProtocol):
  """What the protocol needs of whoever holds the syncer's state."""

  last_rejection: str | None  # Why `validate` last returned None.

  def validate(self, c: Contribution):
    """A token for `admit`, or None if the syncer rejects `c` (counted there)."""

  def admit(self, token, rnd: int) -> None:
    """Adds a validated contribution to round `rnd` of its fragment."""

  def discard(self, c: Contribution, reason: str) -> None:
    """A valid contribution the late policy turned away (`dropped`, `rejected`)."""

  def contributors(self, p: int, rnd: int) -> int:
    """Contributions a merge of round `rnd` of fragment p would take."""

  def merge(self, p: int, rnd: int) -> Publication | None:
    """Closes round `rnd` of fragment p; None if nothing was merged."""

  def current_version(self, p: int) -> int:
    """Fragment p's current version."""


class SyncerMerger:
  """The `Merger` over an `algorithm.syncer.Syncer`.

  `validate` may be replaced (the in-process team restarts a learner whose
  contribution is not finite, if its own parameters are not).
  """

  def __init__(self, syncer, validate=None):
    self.syncer = syncer
    self._validate = validate or syncer.validate

  @property
  def last_rejection(self):
    return self.syncer.last_rejection

  def validate(self, c):
    accepted = self._validate(c)
    return None if accepted is None else (c, accepted)

  def admit(self, token, rnd):
    c, accepted = token
    self.syncer.admit(c, accepted, rnd)

  def discard(self, c, reason):
    if reason == "rejected":
      self.syncer.reject(c, "late")

  def contributors(self, p, rnd):
    return self.syncer.contributors(p, rnd)

  def merge(self, p, rnd):
    return self.syncer.merge(p, rnd)

  def current_version(self, p):
    return int(self.syncer.version[p])


LATE_COUNTS = ("late_joined", "late_dropped", "late_rejected")


class SyncerProtocol:
  """The syncer's round protocol over a `Merger`; see module docstring."""

  def __init__(self, merger: Merger, schedule: Schedule, rules: rounds_lib.RoundRules,
               num_learners: int, *, step_s: float = 0.0, sync_s: float = 0.0):
    self.merger, self.schedule = merger, schedule
    self.num_fragments = len(schedule.offsets)
    self.rounds = rounds_lib.Rounds(self.num_fragments, num_learners, rules, step_s=step_s,
                                    sync_s=sync_s, first_rounds=schedule.first_rounds())
    self.counts = dict.fromkeys(LATE_COUNTS, 0)
    # Each learner's step time as it last reported it with a valid contribution (0: none).
    self.step_s = np.zeros(num_learners)
    self.published = np.full(self.num_fragments, -1, np.int64)  # Latest published round.

  def too_early(self, p: int, rnd: int) -> bool:
    """A contribution this far ahead of the open round is not read yet (or is rejected)."""
    return rnd > self.rounds.open[p] + rounds_lib.MAX_ROUNDS_AHEAD

  def unreadable(self, m: int, p: int, rnd: int, now: float, reason: str, *,
                 decide: bool = True) -> list:
    """A message that names (m, p, rnd) but cannot be used: m reported that round."""
    self.rounds.mark_reported(m, p, rnd)
    return [Log("reject", {"learner": m, "fragment": p, "round": rnd, "reason": reason}),
            *(self._decide(p, now) if decide else [])]

  def arrive(self, c: Contribution, now: float, *, decide: bool = True) -> list:
    """A contribution arrived: validate, place it in a round, close what the rules say.

    The fragment is decided after every batch of arrivals: messages that are
    there together are placed together (a real syncer's poll reads what came
    since the last one: `decide=False` for each, then `decide(p, now)`), so one
    read before another is not taken for one that came first.
    """
    p = c.fragment
    token = self.merger.validate(c)
    if token is None:  # It will not send this round again.
      self.rounds.mark_reported(c.learner, p, c.round)
      return [Log("reject", {"learner": c.learner, "fragment": p, "round": c.round,
                             "reason": self.merger.last_rejection}),
              *(self._decide(p, now) if decide else [])]
    verdict = self.rounds.arrive(c.learner, p, c.round, sent_at=c.sent_at,
                                 step_s=c.step_seconds)
    if np.isfinite(c.step_seconds) and c.step_seconds > 0:
      self.step_s[c.learner] = c.step_seconds
    if verdict.round < 0:
      self.counts["late_dropped" if verdict.status == "dropped" else "late_rejected"] += 1
      self.merger.discard(c, verdict.status)
      effects = [Log("late", {"learner": c.learner, "fragment": p, "round": c.round,
                              "outcome": verdict.status})]
    else:
      self.merger.admit(token, verdict.round)
      self.counts["late_joined"] += verdict.status == "late"
      effects = [Log("arrive", {"learner": c.learner, "fragment": p, "round": c.round,
                                "joins": verdict.round, "status": verdict.status,
                                "contributors": self.rounds.senders(p)})]
    return effects + (self._decide(p, now) if decide else [])

  def decide(self, p: int, now: float) -> list:
    """Closes what the rules say of fragment p's rounds now (after a batch of arrivals)."""
    return self._decide(p, now)

  def timer(self, p: int, rnd: int, now: float) -> list:
    """A `Timer` fired: decide fragment p if round `rnd` is still open in its window."""
    if self.rounds.open[p] != rnd or self.rounds.deadline[p] is None:
      return []
    return self._decide(p, now)

  def tick(self, now: float) -> list:
    """Closes every round whose grace window has ended by `now` (a polling runtime's timer)."""
    effects = []
    for p in range(self.num_fragments):
      if self.rounds.deadline[p] is not None and now >= self.rounds.deadline[p]:
        effects += self._decide(p, now)
    return effects

  def set_live(self, m: int, live: bool, now: float) -> list:
    """Learner m is down (or up again): rounds no longer wait for it (or do)."""
    if (m in self.rounds.live) == live:
      return []
    self.rounds.set_live(m, live)
    return self._decide_all(now)

  def rejoined(self, m: int, position: int, now: float) -> list:
    """Learner m restarted at `position`: it will never send the rounds behind it."""
    self.rounds.rejoin(m, self.schedule.rounds_through(position))
    return self._decide_all(now)

  def finish(self, now: float) -> list:
    """Merges what still waits (late work of the last learners) into each open round."""
    effects = []
    for p in range(self.num_fragments):
      if self.merger.contributors(p, self.rounds.open[p]):
        effects += self._close(p, now)
    return effects

  def pace(self) -> float:
    live = sorted(self.rounds.live)
    return pace(self.step_s[live], self.rounds.xi_step)

  def _decide_all(self, now: float) -> list:
    return [e for p in range(self.num_fragments) for e in self._decide(p, now)]

  def _decide(self, p: int, now: float) -> list:
    effects = []
    while True:
      d = self.rounds.decide(p, now)
      if d.grace_s is not None:
        r = self.rounds
        effects.append(Log("grace", {"fragment": p, "round": r.open[p],
                                     "seconds": round(d.grace_s, 9), "xi_step": round(r.xi_step, 9),
                                     "xi_quorum": round(r.xi_quorum, 9),
                                     "xi_sync": round(r.xi_sync, 9)}))
      if not d.close:
        if d.grace_s is not None and d.deadline is not None:
          effects.append(Timer(p, self.rounds.open[p], d.deadline))
        return effects
      effects += self._close(p, now)

  def _close(self, p: int, now: float) -> list:
    rnd = self.rounds.open[p]
    n = self.merger.contributors(p, rnd)
    passengers = self.rounds.passengers[p]
    started = min(self.rounds.on_time[p].get(rnd, {}).values(), default=now)
    pub = self.merger.merge(p, rnd)
    self.rounds.close(p)
    if pub is None:
      if not self.schedule.learners_wait:
        return []
      self.published[p] = rnd
      return [Publish(Notice(p, rnd, self.merger.current_version(p)), 0)]
    self.published[p] = rnd
    pub = pub._replace(started_at=started, step_seconds=self.pace())
    return [Log("merge", {"fragment": p, "round": rnd, "version": pub.version, "contributors": n,
                          "late": passengers, "bytes": pub.nbytes}),
            Publish(pub, n)]

  def state(self) -> dict:
    """JSON-able state for checkpoints."""
    return {"rounds": self.rounds.state(), "counts": dict(self.counts),
            "step_s": self.step_s.tolist(), "published": self.published.tolist()}

  def load_state(self, s: dict) -> None:
    self.rounds.load_state(s["rounds"])
    self.counts = dict(s["counts"])
    self.step_s = np.array(s["step_s"], np.float64)
    self.published = np.array(s["published"], np.int64)


# --- one learner's side ----------------------------------------------------------


class LearnerSchedule:
  """One learner's place in the schedule: step, phase, what it waits for."""

  def __init__(self, schedule: Schedule):
    self.schedule = schedule
    self.step = 0  # Inner steps taken.
    self.phase = 0  # Added to `step` for the schedule position.
    self.awaiting: dict[int, tuple[int, int]] = {}  # Learners that wait: p -> (round, send step).
    self.held: list[Publication] = []  # Learners that wait: landed, not yet due.
    self.answered = np.full(len(schedule.offsets), -1, np.int64)  # Newest round landed, per p.
    self.aligned = np.full(len(schedule.offsets), -1, np.int64)  # Step of p's last alignment.
    self.rephases = 0

  @property
  def position(self) -> int:
    return self.step + self.phase

  def stepped(self) -> list[Send]:
    """One inner step done: the sends now due."""
    self.step += 1
    return [Send(p, rnd) for p, rnd in self.schedule.due(self.position)]

  def sent(self, p: int, rnd: int) -> None:
    """The send of (p, rnd) went out (a learner that recovered instead sends nothing)."""
    if self.schedule.learners_wait and self.answered[p] < rnd:
      self.awaiting[p] = (rnd, self.step)

  def waiting(self) -> bool:
    """Whether the learner must wait before its next step (learners that wait only)."""
    tau = self.schedule.overlap
    return any(sent <= self.step - tau for _, sent in self.awaiting.values())

  def landed(self, pub: Publication, now: float) -> list:
    """A publication landed: align it (after re-phasing), or hold it until it is due."""
    p = pub.fragment
    self.answered[p] = max(self.answered[p], pub.round)
    if self.schedule.learners_wait:
      self.held.append(pub)
      return self.due()
    effects = []
    if pub.round >= 0:
      effects += self._rephase_if_behind(pub, now)
    return effects + [self._align(pub)]

  def _align(self, pub: Publication) -> Align:
    self.aligned[pub.fragment] = self.step
    return Align(pub)

  def noticed(self, notice: Notice) -> list:
    """Round `notice.round` closed with nothing merged: it answers that round."""
    p = notice.fragment
    self.answered[p] = max(self.answered[p], notice.round)
    rnd, _ = self.awaiting.get(p, (None, None))
    if rnd is not None and notice.round >= rnd:
      del self.awaiting[p]
    return self.due()

  def due(self) -> list[Align]:
    """Held publications whose time has come (learners that wait apply a merge after
    step send + tau, as lock-step does)."""
    keep, effects = [], []
    for pub in sorted(self.held, key=lambda pub: (pub.fragment, pub.version)):
      rnd, sent = self.awaiting.get(pub.fragment, (None, None))
      if rnd is not None and pub.round >= rnd and self.step < sent + self.schedule.overlap:
        keep.append(pub)
        continue
      effects.append(self._align(pub))
      if rnd is not None and pub.round >= rnd:
        del self.awaiting[pub.fragment]
    self.held = keep
    return effects

  def _rephase_if_behind(self, pub: Publication, now: float) -> list:
    """If round `pub.round` closed before the learner reached its send: re-phase it."""
    s, position = self.schedule, self.position
    moved = rounds_lib.rephase(position, pub.fragment, pub.round, s.offsets, s.sync_every,
                               since_s=now - pub.started_at, step_s=pub.step_seconds)
    if moved is None:
      return []
    target, skipped = moved
    self.phase += target - position
    self.rephases += 1
    # Their work since the last alignment is not lost: they go out at once, late.
    # A fragment aligned at this very step has none (its next send carries what
    # comes).
    skipped = {q: r for q, r in skipped.items() if self.aligned[q] != self.step}
    return [*(Send(q, skipped[q]) for q in sorted(skipped)),
            Log("rephase", {"fragment": pub.fragment, "round": pub.round, "position": position,
                            "to": target, "sent": sorted(skipped)})]

  def rejoin(self, position: int) -> None:
    """The learner restarts at schedule position `position` (its step is kept)."""
    self.phase = position - self.step
    self.awaiting.clear()
    self.held.clear()

  def state(self) -> dict:
    """JSON-able state, publications held aside (they go through the runtime's table)."""
    return {"step": self.step, "phase": self.phase,
            "awaiting": sorted([p, r, s] for p, (r, s) in self.awaiting.items()),
            "answered": self.answered.tolist(), "aligned": self.aligned.tolist(),
            "rephases": self.rephases}

  def load_state(self, s: dict, held: list[Publication]) -> None:
    self.step, self.phase = int(s["step"]), int(s["phase"])
    self.awaiting = {int(p): (int(r), int(st)) for p, r, st in s["awaiting"]}
    self.answered = np.array(s["answered"], np.int64)
    self.aligned = np.array(s["aligned"], np.int64)
    self.rephases = int(s["rephases"])
    self.held = list(held)
