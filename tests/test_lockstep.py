"""DiLoCo and Streaming DiLoCo in lock-step: reductions, accounting, resumption."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax

from decoupled_diloco import config as config_lib
from decoupled_diloco import train
from decoupled_diloco.algorithm import codecs, fragments, merge
from decoupled_diloco.runtime.lockstep import LockStep
from tests.helpers import (assert_trees_equal, diloco_config, final_checkpoint,
                           make_runtime, preempt, tiny_config)


def test_diloco_m1_h1_unit_sgd_is_plain_training_round_by_round():
  """Each round is one plain step from the same parameters, optimizer state and batch.

  The learner's inner step gives plain training's theta; the syncer sends
  d = fl(g - theta) and sets the global model to r = fl(g - d) (the one
  learner's weight divides out exactly, outer SGD scales by exactly 1), and the
  learner restarts from r. Two roundings: |r - theta| <= u (|g - theta| + |r|),
  u = 2^-24. Compared round by round, each from DiLoCo's global model: over
  several steps that rounding, fed to Adam's g / sqrt(v) where gradients are
  tiny, grows by orders of magnitude in either run.
  """
  overrides = {"diloco.num_learners": 1, "diloco.sync_every": 1, "outer.name": "sgd",
               "outer.lr": 1.0, "outer.momentum": 0.0}
  dp = make_runtime(tiny_config(steps=6))
  dl = make_runtime(diloco_config(**overrides))
  flat = lambda tree: {k: np.asarray(v, np.float64)
                       for k, v in fragments.flatten(jax.device_get(tree)).items()}
  for _ in range(6):
    g = flat(dl.eval_params())
    dp.train_step()
    dl.train_step()
    theta, r = flat(dp.params), flat(dl.eval_params())
    local = flat(dl.team.learners[0].params)
    for k in theta:
      assert np.all(np.abs(r[k] - theta[k]) <= 2.0**-24 * (np.abs(g[k] - theta[k])
                                                           + np.abs(r[k]))), k
      np.testing.assert_array_equal(local[k], r[k])
    dp.params = dp.island.put(jax.device_get(dl.eval_params()))


def test_identical_data_merged_update_equals_one_learners():
  # Two learners: (d + d) / 2 == d exactly in floating point (three would round).
  rt = make_runtime(diloco_config())
  team = rt.team
  team.data = [team.task.train_source(0, 2, 8, seed=0) for _ in range(2)]
  sent = []
  admit = team.syncer.admit
  team.syncer.admit = lambda c, *args: (sent.append(c), admit(c, *args))[1]
  for _ in range(6):  # Two outer steps with Nesterov momentum.
    rt.train_step()
  assert team.syncer.merges.tolist() == [2] and len(sent) == 4
  like = team.syncer.theta[0]
  for first, second in (sent[0:2], sent[2:4]):
    d0, d1 = (codecs.decode_tree(team.syncer.up, jax.device_get(list(c.payload)), like)
              for c in (first, second))
    assert_trees_equal(d0, d1)  # The learners sent the same pseudo-gradient...
    for a, b in zip(d0, d1):  # ...so the merged update is that one learner's.
      merged = merge.merge_mean(jnp.stack([a, b]), merge.weights([1, 1], [1, 1], "uniform"))
      np.testing.assert_array_equal(merged, a)
  assert_trees_equal(team.learners[0].params, team.learners[1].params)


@pytest.mark.slow
def test_streaming_with_one_fragment_no_overlap_equals_diloco():
  """Streaming DiLoCo at P = 1, tau = 0, alpha = 0 against DiLoCo written out by hand.

  The hand loop: each learner takes H inner AdamW steps on its shard, the mean
  of (global - local) is the outer gradient of Nesterov SGD, every learner
  restarts from the new global model with its inner optimizer state kept.
  """
  from experiments import streaming_diloco  # pylint: disable=g-import-not-at-top
  c = streaming_diloco.get_config()
  small = tiny_config("lockstep", steps=6)
  for section in ("model", "data", "train", "inner"):
    c[section].update(small[section])
  c.diloco.update(num_learners=2, sync_every=3, num_fragments=1, overlap=0, alpha=0.0)
  cfg = config_lib.parse(c)
  rt = make_runtime(c)
  for _ in range(6):
    rt.train_step()

  hand = make_runtime(c).team  # Only for its initial state, data and step.
  outer = optax.sgd(0.7, momentum=0.5, nesterov=True)
  glob = jax.device_get(hand.learners[0].params)
  outer_state = outer.init(glob)
  states = [(l.params, l.opt_state) for l in hand.learners]
  for _ in range(2):  # Two outer steps of H = 3.
    deltas = []
    for m, (params, opt_state) in enumerate(states):
      for _ in range(3):
        batch = jax.device_put(next(hand.data[m]), hand.learners[m].island.batch)
        params, opt_state, _ = hand.inner_steps[m](params, opt_state, batch)
      deltas.append(jax.tree.map(lambda g, l: g - np.asarray(l), glob, params))
      states[m] = (params, opt_state)
    mean = jax.tree.map(lambda *d: sum(d) / len(d), *deltas)
    updates, outer_state = outer.update(mean, outer_state, glob)
    glob = jax.device_get(optax.apply_updates(glob, updates))
    states = [(hand.learners[m].island.put(glob), o) for m, (_, o) in enumerate(states)]
  got = fragments.flatten(jax.device_get(rt.eval_params()))
  # The two are compiled differently (the syncer fuses its outer step), so the
  # global models may differ in the last bit; Adam turns that into at most a
  # small share of one step of size inner.lr on a parameter whose gradient is
  # near zero. A wrong outer step (sign, momentum, averaging) moves them by
  # O(outer.lr * delta), orders of magnitude more.
  for k, want in fragments.flatten(glob).items():
    np.testing.assert_allclose(got[k], want, rtol=0, atol=0.01 * cfg.inner.lr)
  assert rt.team.syncer.merges.tolist() == [2]


def test_streaming_accounting_counts_exact_bytes(tmp_path):
  c = diloco_config(steps=12, **{"diloco.num_fragments": 3, "diloco.sync_every": 6,
                                 "diloco.overlap": 2, "diloco.alpha": 0.5})
  s = train.train_and_evaluate(c, str(tmp_path))
  rt = make_runtime(c)
  frag_bytes = fragments.fragment_bytes(fragments.flatten(rt.eval_params()), rt.team.fragments)
  # Offsets (0, 2, 4): fragment 0 sent at 6, 12; 1 at 2, 8; 2 at 4, 10. Two learners.
  assert s["bytes_up_per_fragment"] == [2 * 2 * b for b in frag_bytes]
  # Fragment 0's second merge (sent at 12) would land at 14: after the run.
  assert s["bytes_down_per_fragment"] == [2 * frag_bytes[0], 4 * frag_bytes[1],
                                          4 * frag_bytes[2]]
  assert s["outer_steps"] == 6
  # Busiest step: 8, when fragment 1 goes up and fragment 0 (sent at 6) comes down.
  assert s["peak_bytes_per_step"] == 2 * frag_bytes[1] + 2 * frag_bytes[0]
  assert s["dp_allreduce_bytes"] == 4 * sum(frag_bytes) * 2 * 12  # 4x, 2 learners, 12 steps.


@pytest.mark.slow
def test_streaming_resumes_exactly_with_fragments_in_flight(tmp_path, monkeypatch):
  c = diloco_config(steps=12, **{"diloco.num_fragments": 3, "diloco.sync_every": 6,
                                 "diloco.overlap": 2, "diloco.alpha": 0.5,
                                 "train.checkpoint_every": 5})
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  preempt(monkeypatch, LockStep, 8, c, tmp_path / "resumed")
  ckpt5 = final_checkpoint(tmp_path / "resumed")
  assert int(ckpt5["step"]) == 5
  assert [int(s["due_step"]) for s in ckpt5["in_flight"]] == [-1, -1, 6]  # Sent at 4.
  train.train_and_evaluate(c, str(tmp_path / "resumed"))
  assert_trees_equal(final_checkpoint(tmp_path / "straight"),
                     final_checkpoint(tmp_path / "resumed"))
