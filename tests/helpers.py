"""Small configs, simulations and checks shared by the tests."""

import copy
import functools
import json
import math
import os
import tempfile
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from decoupled_diloco import config as config_lib
from decoupled_diloco import tasks
from decoupled_diloco.algorithm import fragments, protocol as protocol_lib, rounds
from decoupled_diloco.data import corpus as corpus_lib
from decoupled_diloco.runtime import goodput, scenario, serialization, simulated
from decoupled_diloco.runtime.team import Team

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root: the working directory of the processes tests start."""
CORPUS = os.path.join(REPO, "tests", "fixtures", "corpus")
"""The tests' own text (tests/fixtures/README.md): the same bytes on every Python."""


@functools.cache
def corpus() -> corpus_lib.Corpus:
  """The fixture corpus, read once per test session (its arrays are read-only)."""
  return corpus_lib.load(CORPUS)


def tiny_config(runtime="data_parallel", steps=20, **overrides):
  """A small, fast model and run on the fixture corpus; `overrides` are dotted field paths."""
  c = config_lib.base_config()
  c.runtime = runtime
  c.data.path = CORPUS
  c.model.update(num_layers=1, d_model=64, num_heads=2, mlp_dim=128, seq_len=32)
  c.data.batch_size = 16
  c.train.update(steps=steps, log_every=5, eval_every=0, eval_batches=2,
                 checkpoint_every=0)
  c.inner.warmup_steps = 2
  for key, value in overrides.items():
    section, field = key.split(".") if "." in key else (None, key)
    (c[section] if section else c)[field] = value
  return c


def final_checkpoint(workdir):
  """The latest checkpoint in `workdir` as a tree of numpy arrays."""
  mgr = ocp.CheckpointManager(f"{workdir}/checkpoints")
  tree = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())
  mgr.close()
  return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def preempt(monkeypatch, runtime_cls, at_step: int, config, workdir) -> None:
  """Runs `config` in `workdir` until the runtime reaches `at_step`, then kills it.

  The run is interrupted the way a preemption would (mid-loop, after its
  latest checkpoint); re-running `train_and_evaluate` on `workdir` resumes it.
  """
  from decoupled_diloco import train  # pylint: disable=g-import-not-at-top
  original = runtime_cls.train_step

  def crash(self):
    if self.step == at_step:
      raise KeyboardInterrupt("simulated preemption")
    return original(self)

  with monkeypatch.context() as patch:
    patch.setattr(runtime_cls, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(workdir))


def make_runtime(config, workdir=None):
  """`config`'s runtime on the fixture corpus, to drive step by step outside train.py.

  `workdir` (default: a fresh folder in the test session's scratch folder, which
  tests/conftest.py removes) is where a decoupled runtime writes its event log when
  `sim.event_log` is on.
  """
  from decoupled_diloco import train  # pylint: disable=g-import-not-at-top
  cfg = config_lib.parse(config)
  return train.make_runtime(cfg, tasks.build(cfg),
                            str(workdir or tempfile.mkdtemp(prefix="runtime_",
                                                     dir=os.environ["DD_TESTS_SCRATCH"])))


def sgd_step_on(task, island, params, batch) -> tuple[dict, float]:
  """({path: gradient}, loss) of one inner step of plain SGD with lr 1 on `island`.

  With lr 1 the step's change is the gradient itself, so islands of any layout
  can be compared with one device.
  """
  from decoupled_diloco import steps  # pylint: disable=g-import-not-at-top
  tx = optax.sgd(1.0)
  p, o = island.put(params), island.put(tx.init(params))
  step = steps.make_inner_step(task, tx, island, p, o)
  p, _, loss = step(p, o, jax.device_put(batch, island.batch))
  grads = jax.tree.map(lambda before, after: np.asarray(before) - np.asarray(after),
                       params, jax.device_get(p))
  return fragments.flatten(grads), float(loss)


def task(config):
  """The task of `config` (a ConfigDict or a parsed Config)."""
  return tasks.build(config if isinstance(config, config_lib.Config) else config_lib.parse(config))


def initial_eval_loss(config) -> float:
  """The eval loss of `config`'s model before its first step, as train.py evaluates it."""
  from decoupled_diloco import steps  # pylint: disable=g-import-not-at-top
  cfg, rt = config_lib.parse(config), make_runtime(config)
  t = task(cfg)
  batches = t.eval_batches(cfg.data.batch_size, cfg.train.eval_batches)
  return steps.evaluate(steps.make_eval(t, rt.eval_island), rt.eval_island,
                        rt.eval_params(), batches)["loss"]


def count_model_eval_loss(config, context: int) -> float:
  """The eval loss of byte counts: what a model that learned only byte frequencies scores.

  Counts of the fixture's train split, each byte given the `context` (0 or 1)
  bytes before it, add-one smoothed, scored on the windows train.py evaluates
  `config` on. A model below the context-0 loss uses the bytes before; below
  the context-1 loss, more than the one before.
  """
  cfg = config_lib.parse(config)
  windows = np.concatenate([b["tokens"] for b in task(cfg).eval_batches(
      cfg.data.batch_size, cfg.train.eval_batches)])
  train = np.asarray(np.concatenate(corpus().train), np.int64)
  if context == 0:
    counts = np.bincount(train, minlength=256) + 1.0
    return float(-np.log(counts[windows[:, 1:]] / counts.sum()).mean())
  if context != 1:
    raise ValueError(f"context={context}: 0 or 1.")
  counts = np.ones((256, 256))
  np.add.at(counts, (train[:-1], train[1:]), 1.0)
  p = counts / counts.sum(axis=1, keepdims=True)
  return float(-np.log(p[windows[:, :-1], windows[:, 1:]]).mean())


def make_team(steps=20, **overrides) -> Team:
  """A `Team` of two decoupled learners on the fixture corpus; `overrides` as tiny_config's."""
  c = tiny_config("decoupled", steps=steps, **{"diloco.num_learners": 2, **overrides})
  cfg = config_lib.parse(c)
  return Team(cfg, task(cfg))


class ArraysRuntime:
  """The smallest runtime a `Checkpointer` saves: a few arrays drawn from `seed`."""

  def __init__(self, seed=0):
    rng = np.random.default_rng(seed)
    self.tree = {"w": rng.normal(size=(64, 64)).astype(np.float32),
                 "b": rng.normal(size=(64,)).astype(np.float32), "step": np.int64(seed)}

  def state(self):
    return self.tree

  def load_state(self, tree):
    self.tree = {k: np.asarray(v) for k, v in tree.items()}

  def extra_state(self):
    return [], None

  def load_extra_state(self, payloads, meta):
    del payloads, meta


# --- Decoupled DiLoCo -----------------------------------------------------------


def simulation(seconds, *, quorum, grace_gamma=0.0, grace_max_s=100.0, overlap=0,
               num_fragments=1, sync_every=1, timelines=None, latency_s=0.0, wait=False,
               max_staleness=-1, late="next", log_path=None, backend=None):
  """A compute-free simulation of a world given by hand: learner m steps in `seconds[m]`.

  `compute_free` builds one from a config instead.
  """
  m = len(seconds)
  backend = backend or goodput.AnalyticBackend(m, [100] * num_fragments, [100] * num_fragments,
                                               max_staleness)
  rules = rounds.RoundRules(quorum=quorum, grace_gamma=grace_gamma, grace_max_s=grace_max_s,
                            overlap=overlap, late=late)
  protocol = simulated.Protocol(protocol_lib.Schedule(
      tuple(p * sync_every // num_fragments for p in range(num_fragments)), sync_every,
      overlap, wait), rules)
  world = simulated.World(
      step_seconds=np.asarray(seconds, float), noise=0.0, latency_s=latency_s,
      bytes_per_s=math.inf, syncer_seconds=0.0, slices_per_learner=2, chips_per_slice=1,
      timelines=timelines, outages=None, seed=0)
  return simulated.Simulation(backend, protocol, world, num_fragments, log_path,
                              budget="inner_steps")


def compute_free(config, log_path=None, *, budget="inner_steps", fragment_bytes=100):
  """`config`'s decoupled run in the simulator, compute-free, as `runtime.Decoupled` builds it.

  The world (step times, failure draws, network) and the protocol follow from
  the ConfigDict `config`; the `budget` is explicit (`sim.budget` is not read);
  an `AnalyticBackend` stands in for the model, every fragment `fragment_bytes`
  each way.
  """
  cfg = config_lib.parse(config)
  d = cfg.diloco
  seconds = scenario.step_seconds(cfg)
  sizes = [fragment_bytes] * d.num_fragments
  return simulated.Simulation(
      goodput.AnalyticBackend(d.num_learners, sizes, sizes),
      scenario.protocol(cfg, fragments.sync_offsets(d.num_fragments, d.sync_every)),
      scenario.world(cfg, seconds, scenario.chaos_horizon(cfg, seconds)), d.num_fragments,
      None if log_path is None else str(log_path), budget=budget)


def events(path, kind):
  return [e for e in map(json.loads, open(path)) if e["event"] == kind]


def diloco_config(steps=6, **overrides):
  """Lock-step DiLoCo: M = 2 learners, P = 1, H = 3, tau = 0: syncs after steps 3 and 6."""
  base = {"diloco.num_learners": 2, "diloco.num_fragments": 1, "diloco.sync_every": 3,
          "diloco.overlap": 0, "diloco.alpha": 0.0}
  return tiny_config("lockstep", steps=steps, **{**base, **overrides})


def decoupled_config(steps=6, **overrides):
  base = {"diloco.num_learners": 2, "diloco.sync_every": 3,
          "diloco.num_fragments": 1, "sim.event_log": True}
  return tiny_config("decoupled", steps=steps, **{**base, **overrides})


def chaos_overrides():
  return {"chaos.enabled": True, "chaos.slices_per_learner": 2, "chaos.chips_per_slice": 1,
          "chaos.mtbi_chip_hours": 4 / 3600, "chaos.repair_median_s": 3.0,
          "chaos.reconfiguration_s": 0.5, "chaos.restart_s": 1.0, "sim.noise": 0.1,
          "diloco.quorum": 1, "diloco.overlap": 1, "diloco.grace_gamma": 1.0,
          "chaos.seed": 3}  # Both learners lose every slice within the run.


def busy_config(steps=100, **overrides):
  """Four learners, P = 3, H = 6, failing slices, latency and syncer time: many events."""
  return tiny_config("decoupled", steps=steps, **{
      **chaos_overrides(), "diloco.num_learners": 4, "diloco.num_fragments": 3,
      "diloco.sync_every": 6, "sim.latency_s": 0.4, "sim.syncer_seconds": 0.3, **overrides})


class Snapshot(NamedTuple):
  """What a checkpoint holds of a compute-free simulation."""
  state: dict  # After a JSON round trip, as orbax's JsonSave.
  payloads: Any  # Messages in flight or in inboxes.
  backend: Any
  log: str  # The event log so far.


def snapshot(sim, log_path) -> Snapshot:
  """A `Snapshot` of `sim` taken now."""
  messages = serialization.MessageTable()
  state = json.loads(json.dumps(sim.state(messages)))
  return Snapshot(state, messages.payloads, copy.deepcopy(sim.backend), log_path.read_text())


def restore(sim, snap: Snapshot) -> None:
  """Loads `snap` into a fresh simulation (whose log already holds `snap.log`)."""
  sim.load_state(snap.state, serialization.MessageTable(snap.payloads))
  sim.backend = snap.backend
