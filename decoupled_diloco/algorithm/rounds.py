"""When the syncer merges: numbered rounds, quorum by identity, grace window, late policy.

Round r of fragment p is the r-th scheduled sync of p: a learner at schedule
position s (its inner step plus its phase) sends p when
`(s - offset_p) mod H == 0`, for round `(s - offset_p) // H` (`round_of`).
Every contribution names its round, so rounds follow the schedule, not the
order of arrivals: one outer step per round, never one per straggler
(Decoupled DiLoCo, https://arxiv.org/abs/2604.21428).

Per fragment the syncer has one open round. A contribution for it is *on time*;
one for a later round is *early* (its sender is ahead); one for a round already
closed is *late*, and `late` decides: `next` joins the open round as a
passenger (its work is not lost; its staleness is recorded), `drop` discards
it, `reject` discards it and counts it as a rejection. Passengers never count
towards the quorum, so a late delta cannot close a round before its schedule.
A round's merge takes every contribution waiting, early ones included: work
held back for its own round would only grow staler. A round that every live
learner is past and nobody sent on time is skipped.

The round closes once at least `min(K, live)` learners that are live *now*
have sent it on time and a grace window has passed, or at once when every
live learner has reported (sent this round or a later one, accepted or not).
Learners are counted by identity: a contribution from a learner that has
since gone down is merged, but it never stands in for a live learner.

  grace = clip(gamma * (tau * xi_step - (xi_quorum + xi_sync)), 0, grace_max)

only waits inside the slack that the tau-step overlap already hides. The
inputs are running estimates (exponential moving averages): xi_step of the
step times learners report with their contributions, xi_quorum of the time
from a round's scheduled start (its earliest on-time send) to its quorum,
upload included, and xi_sync of the time from a round's close to its
publication landing at the learners.

This object is pure and clock-free: runtimes pass their own `now` (virtual
seconds in the simulator, wall seconds in the distributed runtime) and keep
the timers it asks for.
"""

import math
from typing import NamedTuple

import numpy as np

from decoupled_diloco.algorithm import fragments as fragments_lib

LATE_POLICIES = ("next", "drop", "reject")
MAX_ROUNDS_AHEAD = 64  # A contribution further ahead of the open round is implausible.


class RoundRules(NamedTuple):
  quorum: int  # K, already resolved to 1..M.
  grace_gamma: float  # 0: close as soon as the quorum is met.
  grace_max_s: float
  overlap: int  # tau.
  late: str = "next"
  smoothing: float = 0.1  # Weight of a new measurement in the running estimates.


class Verdict(NamedTuple):
  """Where a contribution goes: `status` in on_time, future, late, dropped, rejected."""
  status: str
  round: int  # The round it joins (-1 when dropped or rejected).
  rounds_late: int  # How many rounds after its own it is merged (0 unless late).


class Decision(NamedTuple):
  close: bool  # Close the open round now.
  deadline: float | None  # Otherwise: call `decide` again at this time (None: on arrivals).
  grace_s: float | None  # Set when this call opened the grace window.


def round_of(position: int, offset: int, sync_every: int) -> int:
  """The round of a fragment sent at schedule position `position`."""
  return (position - offset) // sync_every


def place(pending: dict[int, list], entry, contribution, rnd: int, of=lambda e: e) -> None:
  """Adds `entry` (made of `contribution`) to round `rnd` of a fragment's `pending`.

  A newer contribution from the same learner measured from the same base
  holds all of the older one's work: if the older one still waits in a
  round, the newer one takes its place there (the earliest round gets the
  freshest work, as a learner ahead of the others would want). `of(e)` is
  the contribution a pending entry was made of.
  """
  key = (contribution.learner, contribution.base_version)
  for r in sorted(pending):
    entries = pending[r]
    for i, e in enumerate(entries):
      if (of(e).learner, of(e).base_version) == key:
        entries[i] = entry
        return
  pending.setdefault(rnd, []).append(entry)


def grace_window(*, overlap: int, step_s: float, quorum_s: float, sync_s: float,
                 gamma: float, grace_max_s: float) -> float:
  """Seconds to wait for more learners once the quorum is reached (module docstring)."""
  slack = gamma * (overlap * step_s - (quorum_s + sync_s))
  return min(max(slack, 0.0), grace_max_s)


def rephase(position: int, fragment: int, rnd: int, offsets, sync_every: int, *,
            since_s: float, step_s: float) -> tuple[int, dict[int, int]] | None:
  """Where a learner that fell behind round `rnd` of `fragment` re-phases to.

  None if the learner at `position` had reached that round's send. Otherwise
  (new position, {fragment: round} of the sends it skips, which it sends at
  once, late, so its work since its last alignment is not lost). The new
  position is the round's send position plus the steps the live learners
  took since its first send (`since_s` ago, at `step_s` each): never past
  the leader's, so re-phasing cannot push the schedule ahead of the learners
  that set it.
  """
  send_at = rnd * sync_every + offsets[fragment]
  if position >= send_at:
    return None
  since = int(since_s / step_s) if step_s > 0 else 0
  target = send_at + max(since, 0)
  skipped = {}
  for s in range(max(position + 1, target - sync_every + 1), target + 1):
    for q in fragments_lib.due(s, offsets, sync_every):
      skipped[q] = round_of(s, offsets[q], sync_every)
  return target, skipped


class Rounds:
  """The open round of every fragment and the running estimates; see module docstring."""

  def __init__(self, num_fragments: int, num_learners: int, rules: RoundRules, *,
               step_s: float, sync_s: float, first_rounds: list[int] | None = None):
    if rules.late not in LATE_POLICIES:
      raise ValueError(f"diloco.late={rules.late!r} is unknown; choose from {LATE_POLICIES}.")
    self.rules, self.num_learners = rules, num_learners
    self.open = list(first_rounds) if first_rounds is not None else [0] * num_fragments
    # Per fragment: round -> {learner: send time} of on-time contributions.
    self.on_time: list[dict[int, dict[int, float]]] = [{} for _ in range(num_fragments)]
    self.passengers = [0] * num_fragments  # Late contributions riding in the open round.
    # Highest round each learner has reported per fragment (-1: none).
    self.reported = np.full((num_fragments, num_learners), -1, np.int64)
    self.quorum_at: list[float | None] = [None] * num_fragments
    self.deadline: list[float | None] = [None] * num_fragments
    self.live = set(range(num_learners))
    self.xi_step, self.xi_quorum, self.xi_sync = float(step_s), 0.0, float(sync_s)

  def _smooth(self, old: float, new: float) -> float:
    return old + self.rules.smoothing * (new - old)

  def set_live(self, learner: int, live: bool) -> None:
    """Marks a learner up or down; call `decide` on every fragment afterwards."""
    (self.live.add if live else self.live.discard)(learner)

  def rejoin(self, learner: int, through: list[int]) -> None:
    """A learner is back, at a schedule position past rounds `through[p]` of each fragment.

    It will never send those rounds (they are behind its new position), so
    no round waits for them. Call `decide` on every fragment afterwards.
    """
    self.live.add(learner)
    for p, rnd in enumerate(through):
      self.mark_reported(learner, p, rnd)

  def mark_reported(self, learner: int, fragment: int, rnd: int) -> None:
    """A learner reported round `rnd` without joining it (e.g. its message was rejected)."""
    if 0 <= rnd < 2**62:
      self.reported[fragment, learner] = max(self.reported[fragment, learner], rnd)

  def arrive(self, learner: int, fragment: int, rnd: int, *, sent_at: float,
             step_s: float) -> Verdict:
    """Places a contribution that passed validation; see module docstring."""
    p, open_ = fragment, self.open[fragment]
    if math.isfinite(step_s) and step_s > 0:
      self.xi_step = self._smooth(self.xi_step, step_s)
    if rnd > open_ + MAX_ROUNDS_AHEAD:
      return Verdict("rejected", -1, 0)
    self.mark_reported(learner, p, rnd)
    if rnd >= open_:
      self.on_time[p].setdefault(rnd, {})[learner] = sent_at
      return Verdict("on_time" if rnd == open_ else "future", rnd, 0)
    if self.rules.late == "next":
      self.passengers[p] += 1
      return Verdict("late", open_, open_ - rnd)
    return Verdict("dropped" if self.rules.late == "drop" else "rejected", -1, 0)

  def decide(self, fragment: int, now: float) -> Decision:
    """Whether fragment `fragment`'s open round closes now, or when to ask again."""
    p = fragment
    while (not self.on_time[p].get(self.open[p])
           and all(self.reported[p, m] > self.open[p] for m in self.live)
           and (self.reported[p] > self.open[p]).any()):
      # No live learner will send it (all are past it, or none is live while
      # some learner was past it): skip it.
      self.open[p] += 1
    open_ = self.open[p]
    senders = self.on_time[p].get(open_, {})
    if not senders:
      return Decision(False, None, None)
    everyone = all(self.reported[p, m] >= open_ for m in self.live)
    if everyone:
      return Decision(True, None, None)
    if len(senders.keys() & self.live) < min(self.rules.quorum, len(self.live)):
      return Decision(False, None, None)
    if self.quorum_at[p] is None:
      self.quorum_at[p] = now
      self.xi_quorum = self._smooth(self.xi_quorum, max(now - min(senders.values()), 0.0))
      r = self.rules
      grace = 0.0
      if r.grace_gamma > 0:
        grace = grace_window(overlap=r.overlap, step_s=self.xi_step, quorum_s=self.xi_quorum,
                             sync_s=self.xi_sync, gamma=r.grace_gamma,
                             grace_max_s=r.grace_max_s)
      if grace <= 0:
        return Decision(True, None, 0.0)
      self.deadline[p] = now + grace
      return Decision(False, self.deadline[p], grace)
    if now >= self.deadline[p]:
      return Decision(True, None, None)
    return Decision(False, self.deadline[p], None)

  def close(self, fragment: int) -> int:
    """Closes the open round (after its merge); returns its number.

    Its merge took the early contributions of later rounds too (the syncer
    merges everything waiting), so those rounds forget them: they close on
    their own on-time senders, or once every live learner is past them.
    """
    p = fragment
    closed = self.open[p]
    self.on_time[p] = {}
    self.open[p] = closed + 1
    self.passengers[p] = 0
    self.quorum_at[p] = self.deadline[p] = None
    return closed

  def observe_sync(self, seconds: float) -> None:
    """Time from a round's close to its publication landing at the learners."""
    self.xi_sync = self._smooth(self.xi_sync, seconds)

  def senders(self, fragment: int) -> int:
    """On-time contributors of the open round."""
    return len(self.on_time[fragment].get(self.open[fragment], {}))

  def state(self) -> dict:
    """JSON-able state for checkpoints."""
    return {"open": list(self.open), "passengers": list(self.passengers),
            "on_time": [[[r, sorted(d.items())] for r, d in sorted(f.items())]
                        for f in self.on_time],
            "reported": self.reported.tolist(), "quorum_at": list(self.quorum_at),
            "deadline": list(self.deadline), "live": sorted(self.live),
            "xi": [self.xi_step, self.xi_quorum, self.xi_sync]}

  def load_state(self, s: dict) -> None:
    self.open, self.passengers = list(s["open"]), list(s["passengers"])
    self.on_time = [{int(r): {int(m): t for m, t in d} for r, d in f} for f in s["on_time"]]
    self.reported = np.array(s["reported"], np.int64)
    self.quorum_at, self.deadline = list(s["quorum_at"]), list(s["deadline"])
    self.live = set(s["live"])
    self.xi_step, self.xi_quorum, self.xi_sync = s["xi"]
