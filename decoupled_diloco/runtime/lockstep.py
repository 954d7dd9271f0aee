"""Lock-step DiLoCo and Streaming DiLoCo: M learners on island meshes + a syncer.

Every learner takes inner step t; fragments due at t are snapshotted by every
learner, merged by the syncer and applied by every learner after step t + tau
(tau = 0: before step t + 1). With P = 1, tau = 0 this is DiLoCo
(https://arxiv.org/abs/2311.08105); with P > 1, tau > 0, alpha > 0 it is
Streaming DiLoCo (https://arxiv.org/abs/2501.18512).
"""

import numpy as np

from decoupled_diloco.algorithm import codecs
from decoupled_diloco.algorithm.messages import Publication
from decoupled_diloco.config import Config
from decoupled_diloco.runtime import team as team_lib
from decoupled_diloco.runtime.team import Team
from decoupled_diloco.tasks.base import Task


class LockStep:
  """The lock-step schedule over a `Team`; the interface `train.py` drives."""

  def __init__(self, cfg: Config, task: Task):
    self.team = Team(cfg, task)
    self.eval_island = self.team.eval_island
    self.units_per_step = self.team.units_per_step
    self.schedule = team_lib.schedule(cfg, self.team.offsets)
    self.overlap = cfg.diloco.overlap
    self.step = 0
    self.peak_bytes_per_step = 0
    # At most one publication per fragment is in flight (tau < H): slot p holds
    # its delivery step (-1: empty) and payload.
    self.in_flight: list[tuple[int, Publication] | None] = [None] * len(self.team.fragments)
    # With tau >= 1, the merge of fragments sent at step t runs on the host while
    # step t + 1 computes (its result is needed only after step t + tau): the
    # overlap of communication with compute. The syncer's checks are dispatched
    # at send time so that reading them then never waits for a later step.
    # (send step, fragment, round, contributions, checks).
    self._unmerged: list[tuple[int, int, int, list, list]] = []

  def _merge_sent(self) -> None:
    syncer = self.team.syncer
    for sent, p, rnd, contributions, checks in self._unmerged:
      for c, checked in zip(contributions, checks):
        if (accepted := self.team.validate(c, checked)) is not None:
          syncer.admit(c, accepted, rnd)
      if (pub := self.team.merge(p, rnd)) is not None:
        self.in_flight[p] = (sent + self.overlap, pub)
    self._unmerged = []

  def train_step(self) -> dict:
    team = self.team
    losses = [team.inner_step(m) for m in range(team.num_learners)]
    self.step += 1
    self._merge_sent()  # Last step's fragments, while this step computes.
    step_bytes = 0
    for p, rnd in self.schedule.due(self.step):
      contributions = [team.send(m, p, rnd) for m in range(team.num_learners)]
      step_bytes += sum(c.nbytes for c in contributions)
      checks = [team.syncer.check(c) for c in contributions]
      self._unmerged.append((self.step, p, rnd, contributions, checks))
    if not self.overlap:
      self._merge_sent()  # tau = 0: needed before the next step.
    for p, slot in enumerate(self.in_flight):
      if slot is not None and slot[0] == self.step:
        for m in range(team.num_learners):
          team.deliver(m, slot[1])
          step_bytes += slot[1].nbytes
        self.in_flight[p] = None
    self.peak_bytes_per_step = max(self.peak_bytes_per_step, step_bytes)
    return {"loss": losses}  # One per learner; train.py averages the finite ones.

  def eval_params(self):
    self._merge_sent()
    return self.team.eval_params()

  def state(self) -> dict:
    self._merge_sent()
    in_flight = []
    for p, slot in enumerate(self.in_flight):
      due_step, pub = slot if slot is not None else (-1, self.team.syncer.publication(p))
      in_flight.append({"due_step": np.int64(due_step), "version": np.int64(pub.version),
                        "base_version": np.int64(pub.base_version),
                        "round": np.int64(pub.round), "payload": list(pub.payload)})
    return {**self.team.state(), "step": np.int64(self.step), "in_flight": in_flight,
            "peak_bytes_per_step": np.int64(self.peak_bytes_per_step)}

  def load_state(self, s: dict) -> None:
    self.team.load_state(s)
    self.step = int(s["step"])
    self.peak_bytes_per_step = int(s["peak_bytes_per_step"])
    for p, slot in enumerate(s["in_flight"]):
      payload = tuple(slot["payload"])
      self.in_flight[p] = None if int(slot["due_step"]) < 0 else (
          int(slot["due_step"]), Publication(p, int(slot["version"]), payload,
                                             codecs.payload_nbytes(payload),
                                             base_version=int(slot["base_version"]),
                                             round=int(slot["round"])))

  def extra_state(self) -> tuple[list, dict]:
    return [], {"data": self.team.data_state()}

  def load_extra_state(self, payloads: list, meta: dict) -> None:
    del payloads
    self.team.load_data_state(meta["data"])

  def eval_scalars(self) -> dict:
    return {**self.team.comm_metrics(self.step), **self.team.routing_metrics()}

  def summary(self) -> dict:
    self._merge_sent()
    return {**self.team.accounting(self.step), "peak_bytes_per_step": self.peak_bytes_per_step}
