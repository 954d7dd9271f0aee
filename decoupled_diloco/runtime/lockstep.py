"""Lock-step DiLoCo and Streaming DiLoCo: M learners on island meshes + a syncer.

Every learner takes inner step t; fragments due at t are snapshotted by every
learner, merged by the syncer and applied by every learner after step t + tau
(tau = 0: before step t + 1). With P = 1, tau = 0 this is DiLoCo
(https://arxiv.org/abs/2311.08105); with P > 1, tau > 0, alpha > 0 it is
Streaming DiLoCo (https://arxiv.org/abs/2501.18512).
"""

import jax
import numpy as np

from decoupled_diloco import islands as islands_lib
from decoupled_diloco import optim, steps
from decoupled_diloco.algorithm import codecs, fragments as fragments_lib
from decoupled_diloco.algorithm.learner import Learner
from decoupled_diloco.algorithm.messages import Publication
from decoupled_diloco.algorithm.syncer import Syncer
from decoupled_diloco.config import Config, make_codec
from decoupled_diloco.data.loader import ShardIterator
from decoupled_diloco.models import transformer


class Team:
  """What every DiLoCo-family runtime builds: islands, learners, syncer, data."""

  def __init__(self, cfg: Config, train_tokens: np.ndarray):
    d = cfg.diloco
    self.cfg, self.num_learners = cfg, d.num_learners
    self.islands = islands_lib.make_islands(d.num_learners, fsdp=cfg.islands.fsdp)
    per_learner = cfg.data.batch_size // d.num_learners
    for island in self.islands:
      islands_lib.check_batch(island, per_learner)
    self.model = transformer.Transformer(cfg.model)
    tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
    params = transformer.init_params(cfg.model, jax.random.key(cfg.seed))
    flat = fragments_lib.flatten(params)
    self.fragments = fragments_lib.partition(flat, d.num_fragments, d.fragmentation)
    self.offsets = fragments_lib.sync_offsets(d.num_fragments, d.sync_every)
    up, down = make_codec(cfg.codec, "up"), make_codec(cfg.codec, "down")
    opt_state = tx.init(params)
    self.learners = []
    for m, island in enumerate(self.islands):
      inner = steps.make_inner_step(self.model, tx, island, params, opt_state)
      self.learners.append(Learner(
          m, island, inner, params, opt_state, self.fragments, alpha=d.alpha, up=up,
          down=down, error_feedback=cfg.codec.error_feedback,
          feedback_restart=cfg.codec.feedback_restart, feedback_decay=cfg.codec.feedback_decay,
          tokens_per_step=per_learner * cfg.model.seq_len))
    self.syncer = Syncer(flat, self.fragments, outer_tx=optim.outer_optimizer(cfg.outer),
                         merge_rule=d.merge, weighting=d.weighting, up=up, down=down,
                         num_learners=d.num_learners, max_abs_delta=d.max_abs_delta,
                         max_staleness=None if d.max_staleness < 0 else d.max_staleness)
    self.eval_island = islands_lib.make_islands(1, devices=[self.syncer.device])[0]
    self.data = [ShardIterator(train_tokens, shard=m, num_shards=d.num_learners,
                               batch_size=per_learner, seq_len=cfg.model.seq_len,
                               seed=cfg.seed) for m in range(d.num_learners)]
    self.tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    self.param_bytes = 4 * transformer.num_params(params)
    self.bytes_up = np.zeros(len(self.fragments), np.int64)
    self.bytes_down = np.zeros(len(self.fragments), np.int64)

  def batch(self, m: int):
    return jax.device_put(next(self.data[m]), self.islands[m].batch)

  def eval_params(self):
    return fragments_lib.unflatten(self.syncer.global_flat())

  def receive(self, c, checked=None) -> bool:
    """Hands a contribution to the syncer; a learner that sent NaN/Inf recovers."""
    if self.syncer.receive(c, checked):
      return True
    if self.syncer.last_rejection == "non-finite":
      self.restart(c.learner)
    return False

  def restart(self, m: int) -> None:
    """Learner m starts again from the global fragments (`Learner.recover`)."""
    pubs = [self.syncer.publication(p) for p in range(len(self.fragments))]
    self.learners[m].recover(pubs)
    self.bytes_down += np.array([pub.nbytes for pub in pubs])

  def state(self) -> dict:
    return {"learners": [l.state() for l in self.learners], "syncer": self.syncer.state(),
            "data_position": np.array([it.position for it in self.data], np.int64),
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

  def load_state(self, s: dict) -> None:
    for learner, ls in zip(self.learners, s["learners"]):
      learner.load_state(ls)
    self.syncer.load_state(s["syncer"])
    for it, pos in zip(self.data, np.asarray(s["data_position"])):
      it.position = int(pos)
    self.bytes_up = np.asarray(s["bytes_up"]).copy()
    self.bytes_down = np.asarray(s["bytes_down"]).copy()

  def accounting(self, steps_done: int) -> dict:
    """Exact bytes exchanged, and what data-parallel would all-reduce meanwhile.

    Both sides count every byte over a participant's link, both directions.
    Data-parallel: a ring all-reduce of fp32 gradients sends 2(N-1)/N and
    receives as much of the gradient per replica per step, about 4x its bytes;
    M replicas, same steps. DiLoCo: each learner's encoded uploads + downloads.
    """
    return {**self.comm_metrics(steps_done),
            "bytes_up_per_fragment": self.bytes_up.tolist(),
            "bytes_down_per_fragment": self.bytes_down.tolist(),
            "rejected_contributions": dict(self.syncer.rejected)}

  def comm_metrics(self, steps_done: int) -> dict:
    """The scalar part of `accounting`, for metrics.jsonl and TensorBoard."""
    dp = 4 * self.param_bytes * self.num_learners * steps_done
    sent = int(self.bytes_up.sum() + self.bytes_down.sum())
    return {"bytes_up": int(self.bytes_up.sum()), "bytes_down": int(self.bytes_down.sum()),
            "dp_allreduce_bytes": dp, "bytes_reduction_vs_dp": dp / max(sent, 1),
            "outer_steps": int(self.syncer.merges.sum()),
            "rejected": int(sum(self.syncer.rejected.values()))}


class LockStep:
  """The lock-step schedule over a `Team`; the interface `train.py` drives."""

  def __init__(self, cfg: Config, train_tokens: np.ndarray):
    self.team = Team(cfg, train_tokens)
    self.model, self.eval_island = self.team.model, self.team.eval_island
    self.tokens_per_step = self.team.tokens_per_step
    self.sync_every, self.overlap = cfg.diloco.sync_every, cfg.diloco.overlap
    self.step = 0
    self.peak_bytes_per_step = 0
    # At most one publication per fragment is in flight (tau < H): slot p holds
    # its delivery step (-1: empty) and payload.
    self.in_flight: list[tuple[int, Publication] | None] = [None] * len(self.team.fragments)
    # With tau >= 1, the merge of fragments sent at step t runs on the host while
    # step t + 1 computes (its result is needed only after step t + tau): the
    # overlap of communication with compute. The syncer's checks are dispatched
    # at send time so that reading them then never waits for a later step.
    # (send step, fragment, contributions, checks).
    self._unmerged: list[tuple[int, int, list, list]] = []

  def _merge_sent(self) -> None:
    for sent, p, contributions, checks in self._unmerged:
      for c, checked in zip(contributions, checks):
        self.team.receive(c, checked)
      if (pub := self.team.syncer.merge(p)) is not None:
        self.in_flight[p] = (sent + self.overlap, pub)
    self._unmerged = []

  def train_step(self) -> dict:
    team = self.team
    losses = [l.inner_step(team.batch(m)) for m, l in enumerate(team.learners)]
    self.step += 1
    self._merge_sent()  # Last step's fragments, while this step computes.
    step_bytes = 0
    for p in fragments_lib.due(self.step, team.offsets, self.sync_every):
      contributions = [learner.snapshot(p) for learner in team.learners]
      for c in contributions:
        team.bytes_up[p] += c.nbytes
        step_bytes += c.nbytes
      checks = [team.syncer.check(c) for c in contributions]
      self._unmerged.append((self.step, p, contributions, checks))
    if not self.overlap:
      self._merge_sent()  # tau = 0: needed before the next step.
    for p, slot in enumerate(self.in_flight):
      if slot is not None and slot[0] == self.step:
        for learner in team.learners:
          learner.align(slot[1])
          team.bytes_down[p] += slot[1].nbytes
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
                        "payload": list(pub.payload)})
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
                                             codecs.payload_nbytes(payload)))

  def comm_metrics(self) -> dict:
    return self.team.comm_metrics(self.step)

  def summary(self) -> dict:
    self._merge_sent()
    return {**self.team.accounting(self.step), "peak_bytes_per_step": self.peak_bytes_per_step}
