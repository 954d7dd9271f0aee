"""What every DiLoCo-family runtime builds: islands, learners, syncer, data.

The `Team` is the one owner of the exact byte counts (every message in
either direction goes through `send`, `deliver` or `restart`) and of the
restart policy (a learner whose contribution is non-finite, or that lost all
its slices, restarts from full copies of the global fragments).
"""

import time

import jax
import numpy as np

from decoupled_diloco import divergence
from decoupled_diloco import islands as islands_lib
from decoupled_diloco import optim, steps
from decoupled_diloco.algorithm import codecs
from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.algorithm import protocol, rounds
from decoupled_diloco.algorithm.learner import Learner
from decoupled_diloco.algorithm.messages import Contribution, Publication
from decoupled_diloco.algorithm.syncer import Syncer, all_finite
from decoupled_diloco.config import CodecConfig, Config
from decoupled_diloco.runtime.router_probe import RouterProbe
from decoupled_diloco.tasks import base as tasks_base
from decoupled_diloco.tasks.base import Task



class Team:
  """Learners on their islands, the syncer, each learner's data shard; see module docstring."""

  def __init__(self, cfg: Config, task: Task):
    d = cfg.diloco
    self.cfg, self.task, self.num_learners = cfg, task, d.num_learners
    self.islands = steps.make_islands(cfg, task, d.num_learners)
    self.per_learner_batch = per_learner = learner_batch(cfg)
    for island in self.islands:
      islands_lib.check_batch(island, per_learner)
    self.inner_tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
    params, self.fragments, self.offsets = global_model(cfg, task)
    flat = tasks_base.mergeable(task, fragments_lib.flatten(params))
    opt_state = self.inner_tx.init(params)
    self.learners, self.inner_steps = [], []
    compiled = {}  # One inner step per distinct island layout, shared by its learners.
    for m, island in enumerate(self.islands):
      layout = (tuple(d.id for d in island.mesh.devices.flat), island.layout)
      if layout not in compiled:
        compiled[layout] = steps.make_inner_step(task, self.inner_tx, island, params,
                                                 opt_state)
      inner = compiled[layout]
      self.inner_steps.append(inner)
      self.learners.append(make_learner(cfg, task, m, island, inner, params, opt_state,
                                        self.fragments))
    self.syncer = make_syncer(cfg, task, flat, self.fragments)
    self.eval_island = islands_lib.make_islands(1, devices=[self.syncer.device])[0]
    self.data = [task.train_source(m, d.num_learners, per_learner, cfg.seed)
                 for m in range(d.num_learners)]
    self.units_per_step = task.num_units(task.batch_spec(cfg.data.batch_size))
    self.param_bytes = 4 * sum(x.size for x in flat.values())
    self.bytes_up = np.zeros(len(self.fragments), np.int64)
    self.bytes_down = np.zeros(len(self.fragments), np.int64)
    self.probe = RouterProbe.make(task, params, d.num_learners)  # None: no routers.
    self.units = np.zeros(d.num_learners, np.int64)  # Units each learner has trained on.
    # Per learner: its latest loss (not read back until needed) and a spike detector,
    # whose running mean starts at chance (what a fresh model scores), so a
    # learner that diverged before its first send is caught too.
    self.last_loss = [None] * d.num_learners
    self.spikes = [divergence.SpikeDetector(cfg.train.spike_factor)
                   for _ in range(d.num_learners)]
    self.uniform_loss = task.chance_loss
    for detector in self.spikes:
      detector.load_state(divergence.SpikeState(self.uniform_loss))

  def batch_rows(self, m: int, share: float = 1.0) -> int:
    """Sequences in learner m's batch on `share` of its slices (elastic batches).

    The full batch times `share`, rounded down to a multiple of the island's
    devices, and at least one row per device.
    """
    size = self.islands[m].size
    rows = int(self.per_learner_batch * share) // size * size
    return max(rows, size)

  def inner_step(self, m: int, share: float = 1.0):
    """Learner m's next inner step on `share` of its batch; returns its loss."""
    batch = next(self.data[m])
    if share < 1:
      rows = self.batch_rows(m, share)
      batch = jax.tree.map(lambda x: x[:rows], batch)
    units = self.task.num_units(batch)
    self.units[m] += units
    learner = self.learners[m]
    self.last_loss[m] = learner.inner_step(jax.device_put(batch, learner.island.batch), units)
    if self.probe:
      self.probe.stepped(m, self.last_loss[m])
    return self.last_loss[m]

  def diverged(self, m: int) -> str | None:
    """Why learner m's latest loss is divergent (not finite, or a spike), or None."""
    if self.last_loss[m] is None:
      return None
    return self.spikes[m].check(float(self.last_loss[m]))

  def send(self, m: int, p: int, rnd: int) -> Contribution:
    """Learner m's pseudo-gradient of fragment p for round `rnd`, counted."""
    c = self.learners[m].pseudo_gradient(p, rnd)
    self.bytes_up[p] += c.nbytes
    return c

  def deliver(self, m: int, pub: Publication) -> str:
    """Learner m receives `pub`; an update it cannot apply is replaced by a full copy.

    Returns the learner's outcome ("applied", "stale") or "full_copy".
    """
    self.bytes_down[pub.fragment] += pub.nbytes
    outcome = self.learners[m].align(pub)
    if outcome == "gap":
      full = self.syncer.publication(pub.fragment)
      self.bytes_down[pub.fragment] += full.nbytes
      self.learners[m].align(full)
      outcome = "full_copy"
    if self.probe and outcome != "stale":
      self.probe.aligned(m, self.last_loss[m])
    return outcome

  def merge(self, p: int, rnd: int) -> Publication | None:
    """The syncer merges round `rnd` of fragment p (`Syncer.merge`); the routing probe looks."""
    pub = self.syncer.merge(p, rnd)
    if pub is not None and self.probe:
      self.probe.merged(self.eval_params())
    return pub

  def validate(self, c: Contribution, checked=None):
    """The syncer's verdict on `c` (`Accepted`, or None).

    A learner whose contribution was non-finite restarts from the global
    model, but only if its own parameters are not finite: a message that
    merely claims to be learner m (until messages are authenticated) cannot
    reset m.
    """
    accepted = self.syncer.validate(c, checked)
    if (accepted is None and self.syncer.last_rejection == "non-finite"
        and 0 <= c.learner < self.num_learners and not self._finite(c.learner)):
      self.restart(c.learner, schedule_step=self.learners[c.learner].step)
    return accepted

  def _finite(self, m: int) -> bool:
    return bool(all_finite(self.learners[m].params))

  def measure_step_seconds(self, repeats: int = 4) -> float:
    """Median wall time of learner 0's inner step, on a throwaway copy of its state."""
    learner, step = self.learners[0], self.inner_steps[0]
    params, opt_state = learner.island.put(learner.params), learner.island.put(learner.opt_state)
    batch = jax.device_put(tasks_base.zeros(self.task.batch_spec(self.per_learner_batch)),
                           learner.island.batch)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      params, opt_state, loss = step(params, opt_state, batch)
      loss.block_until_ready()
      times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))

  def eval_params(self):
    """The global model: the merged parameters, and learner 0's local state (if any)."""
    local = local_state(self.task, self.learners[0].params)  # On learner 0's island.
    return global_params(self.syncer.global_flat(),
                         jax.device_put(local, self.eval_island.replicated))

  def restart(self, m: int, *, fresh_optimizer: bool = True, schedule_step: int = 0) -> None:
    """Learner m starts again from full copies of the global fragments.

    With `fresh_optimizer`, its inner optimizer state is new (what a learner
    that lost its memory has), with the learning-rate schedule at
    `schedule_step` and re-warmed over `chaos.rewarmup_steps`; otherwise it is
    kept (`Learner.recover`).
    """
    pubs = [self.syncer.publication(p) for p in range(len(self.fragments))]
    learner = self.learners[m]
    opt_state = None
    if fresh_optimizer:
      opt_state = optim.restart_state(self.inner_tx, learner.params, schedule_step,
                                      self.cfg.chaos.rewarmup_steps)
    learner.recover(pubs, opt_state)
    self.bytes_down += np.array([pub.nbytes for pub in pubs])
    self.spikes[m].load_state(divergence.SpikeState(self.uniform_loss))
    self.last_loss[m] = None
    if self.probe:
      self.probe.forget(m)

  def state(self) -> dict:
    s = {"learners": [l.state() for l in self.learners], "syncer": self.syncer.state(),
         "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "units": self.units,
         "spike_means": np.array([np.nan if d.mean is None else d.mean for d in self.spikes])}
    return {**s, "router_probe": self.probe.state()} if self.probe else s

  def load_state(self, s: dict) -> None:
    for learner, ls in zip(self.learners, s["learners"]):
      learner.load_state(ls)
    self.syncer.load_state(s["syncer"])
    self.bytes_up = np.asarray(s["bytes_up"]).copy()
    self.bytes_down = np.asarray(s["bytes_down"]).copy()
    self.units = np.asarray(s["units"]).copy()
    for d, mean in zip(self.spikes, np.asarray(s["spike_means"]).tolist()):
      d.load_state(divergence.SpikeState(self.uniform_loss if np.isnan(mean) else mean))
    self.last_loss = [None] * self.num_learners
    if self.probe:
      self.probe.load_state(s["router_probe"])

  def data_state(self) -> list[dict]:
    """Each learner's data source state (JSON), for a runtime's `extra_state`."""
    return [source.get_state() for source in self.data]

  def load_data_state(self, states: list[dict]) -> None:
    for source, state in zip(self.data, states):
      source.set_state(state)

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
            f"{self.task.unit}_per_learner": self.units.tolist(),
            "rejected_contributions": dict(self.syncer.rejected)}

  def routing_metrics(self) -> dict:
    """`routing/*` (router_probe.py): the global model's routing, and how far apart the
    learners' routers are; {} for a task without routers."""
    if self.probe is None:
      return {}
    roles = self.task.roles(fragments_lib.flatten(self.learners[0].params))
    weights = []
    for learner in self.learners:
      flat = fragments_lib.flatten(learner.params)
      weights.append(np.concatenate([np.ravel(jax.device_get(flat[k]))
                                     for k in sorted(flat) if roles[k] == "router"]))
    return self.probe.metrics(self.eval_params(), [l.params for l in self.learners], weights)

  def comm_metrics(self, steps_done: int) -> dict:
    """The scalar part of `accounting`, for metrics.jsonl and TensorBoard."""
    dp = 4 * self.param_bytes * self.num_learners * steps_done
    sent = int(self.bytes_up.sum() + self.bytes_down.sum())
    return {"bytes_up": int(self.bytes_up.sum()), "bytes_down": int(self.bytes_down.sum()),
            "dp_allreduce_bytes": dp, "bytes_reduction_vs_dp": dp / max(sent, 1),
            "outer_steps": int(self.syncer.merges.sum()),
            "rejected": int(sum(self.syncer.rejected.values()))}


def global_model(cfg: Config, task: Task):
  """(params, fragments, offsets): what every process derives from the config alone.

  Fragments cover the mergeable parameters (a task's `local` state is in none).
  """
  d = cfg.diloco
  params = task.init(jax.random.key(cfg.seed))
  flat = tasks_base.mergeable(task, fragments_lib.flatten(params))
  fragments = fragments_lib.partition(flat, d.num_fragments, d.fragmentation,
                                      split=expert_paths(task, flat) if d.split_experts else ())
  return params, fragments, fragments_lib.sync_offsets(d.num_fragments, d.sync_every)


def expert_paths(task: Task, flat: dict) -> frozenset[str]:
  """Stacked expert tensors: role `expert`, first axis `exp` (what `diloco.split_experts` splits)."""
  roles, axes = task.roles(flat), task.axes(flat)
  return frozenset(k for k in flat if roles[k] == "expert" and axes[k][:1] == ("exp",))


def local_state(task: Task, params) -> dict:
  """The task's local (never merged) tensors of `params`, by path; usually none."""
  flat = fragments_lib.flatten(params)
  merged = tasks_base.mergeable(task, flat)
  return {k: v for k, v in flat.items() if k not in merged}


def global_params(merged_flat: dict, local_flat: dict):
  """The global model as a tree: the merged tensors (or pieces) and the local state."""
  return fragments_lib.unflatten({**local_flat, **fragments_lib.assemble(merged_flat)})


def round_rules(cfg: Config) -> rounds.RoundRules:
  d = cfg.diloco
  return rounds.RoundRules(quorum=d.quorum or d.num_learners, grace_gamma=d.grace_gamma,
                           grace_max_s=d.grace_max_s, overlap=d.overlap, late=d.late)


def schedule(cfg: Config, offsets) -> protocol.Schedule:
  d = cfg.diloco
  return protocol.Schedule(tuple(offsets), d.sync_every, d.overlap, cfg.sim.learners_wait)


def learner_batch(cfg: Config) -> int:
  """Sequences in one learner's full batch: the global batch split over the learners."""
  return cfg.data.batch_size // cfg.diloco.num_learners


def make_codec(c: CodecConfig, direction: str) -> codecs.Codec:
  """The codec of one direction (`up` or `down`) with the section's options."""
  return codecs.make_codec(getattr(c, direction), block_size=c.block_size,
                           topk_fraction=c.topk_fraction, topk_values=c.topk_values)


def make_learner(cfg: Config, task: Task, m: int, island, inner_step, params, opt_state,
                 fragments) -> Learner:
  """Learner m on `island`, starting from `params` (the same in every runtime)."""
  d = cfg.diloco
  return Learner(
      m, island, inner_step, params, opt_state, fragments, alpha=d.alpha,
      up=make_codec(cfg.codec, "up"), down=make_codec(cfg.codec, "down"),
      error_feedback=cfg.codec.error_feedback, feedback_restart=cfg.codec.feedback_restart,
      feedback_decay=cfg.codec.feedback_decay,
      units_per_step=units_per_learner_step(cfg, task))


def units_per_learner_step(cfg: Config, task: Task) -> int:
  return task.num_units(task.batch_spec(learner_batch(cfg)))


def mean_paths(cfg: Config, task: Task, flat: dict) -> frozenset[str]:
  """The tensors whose role `diloco.mean_roles` keeps on the weighted mean under `rda`."""
  unknown = set(cfg.diloco.mean_roles) - set(tasks_base.ROLES)
  if unknown:
    raise ValueError(f"diloco.mean_roles={cfg.diloco.mean_roles}: {sorted(unknown)} are not"
                     f" roles; roles are {tasks_base.ROLES}.")
  return frozenset(k for k, role in task.roles(flat).items() if role in cfg.diloco.mean_roles)


def payload_bytes(cfg: Config, flat: dict, fragments) -> tuple[list[int], list[int]]:
  """Per fragment, the array bytes of a contribution and of a publication (the larger
  of an update under the down codec and a full copy): what the mailbox bounds reads by."""
  up, down = make_codec(cfg.codec, "up"), make_codec(cfg.codec, "down")
  def nbytes(codec, names, dtype=None):
    spec = [jax.ShapeDtypeStruct(np.shape(flat[k]), dtype or flat[k].dtype) for k in names]
    return codecs.payload_nbytes(jax.eval_shape(lambda ts: codecs.encode_tree(codec, ts), spec))
  return ([nbytes(up, names, np.float32) for names in fragments],
          [max(nbytes(down, names, np.float32), nbytes(codecs.EXACT, names, np.float32),
               nbytes(codecs.EXACT, names)) for names in fragments])


def make_syncer(cfg: Config, task: Task, flat: dict, fragments, device=None) -> Syncer:
  """The syncer over the global model `flat`, with the config's admission bounds."""
  d = cfg.diloco
  return Syncer(flat, fragments, outer_tx=optim.outer_optimizer(cfg.outer),
                merge_rule=d.merge, mean_paths=mean_paths(cfg, task, flat), weighting=d.weighting,
                up=make_codec(cfg.codec, "up"),
                down=make_codec(cfg.codec, "down"), num_learners=d.num_learners,
                max_abs_delta=d.max_abs_delta,
                max_staleness=None if d.max_staleness < 0 else d.max_staleness,
                staleness_weighting=d.staleness_weighting,
                max_tokens_per_step=units_per_learner_step(cfg, task),
                max_weight_share=d.max_weight_share, max_norm_ratio=d.max_norm_ratio,
                norm_bound=d.norm_bound,
                norm_bound_from=-(-cfg.inner.warmup_steps // d.sync_every) + 1,
                sync_every=d.sync_every, device=device)
