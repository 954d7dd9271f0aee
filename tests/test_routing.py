"""The routing diagnostics against hand computations on tiny fixed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoupled_diloco import routing
from decoupled_diloco.runtime.router_probe import RouterProbe


def test_router_distance_is_the_mean_pairwise_distance_over_the_mean_norm():
  a, b, c = np.array([3.0, 4.0]), np.array([0.0, 0.0]), np.array([3.0, 0.0])
  # Pairs: |a-b| = 5, |a-c| = 4, |b-c| = 3; norms 5, 0, 3.
  assert routing.router_distance([a, b, c]) == pytest.approx(4.0 / (8.0 / 3))
  assert routing.router_distance([a, a]) == 0.0 and routing.router_distance([a]) == 0.0


def test_topk_overlap_is_the_mean_jaccard_index():
  a = np.array([[[0, 1], [2, 3], [0, 1]]])  # [layers 1, tokens 3, k 2].
  b = np.array([[[1, 0], [2, 0], [4, 5]]])
  # Token 0: same set (1); token 1: {2,3} vs {2,0}: 1 common of 3 (1/3); token 2: 0.
  assert routing.topk_overlap(a, b) == pytest.approx((1 + 1 / 3 + 0) / 3)
  assert routing.topk_overlap(a, a) == 1.0
  with pytest.raises(ValueError, match="one probe batch"):
    routing.topk_overlap(a, b[:, :2])


def test_js_divergence_in_bits():
  p = np.array([[[1.0, 0.0], [0.5, 0.5]]])
  q = np.array([[[0.0, 1.0], [0.5, 0.5]]])
  # Disjoint: 1 bit; equal: 0.
  assert routing.js_divergence(p, q) == pytest.approx(0.5)
  r, s = np.array([0.75, 0.25]), np.array([0.25, 0.75])
  m = (r + s) / 2
  hand = 0.5 * sum(r * np.log2(r / m)) + 0.5 * sum(s * np.log2(s / m))
  assert routing.js_divergence(r[None, None], s[None, None]) == pytest.approx(hand)


def test_utilisation_entropy_is_normalised_by_log_experts():
  # 4 experts; layer 0 uses each once (1.0), layer 1 sends all to expert 2 (0.0).
  choices = np.array([[[0], [1], [2], [3]], [[2], [2], [2], [2]]])
  assert routing.utilisation_entropy(choices, 4) == pytest.approx(0.5)
  # Shares 1/2, 1/4, 1/4 of 4 experts: H = 1.5 ln 2, over ln 4.
  assert routing.utilisation_entropy(np.array([[[0], [0], [1], [2]]]), 4) == pytest.approx(
      1.5 * math.log(2) / math.log(4))


def test_across_learners_averages_over_pairs():
  one = {"choices": np.array([[[0], [1]]]), "probs": np.array([[[1.0, 0.0], [0.0, 1.0]]])}
  two = {"choices": np.array([[[0], [0]]]), "probs": np.array([[[1.0, 0.0], [1.0, 0.0]]])}
  out = routing.across_learners([one, two], one, [np.ones(2), np.ones(2)], 2)
  assert out["topk_overlap_learners"] == pytest.approx(0.5)
  assert out["topk_overlap_global"] == pytest.approx(0.75)
  assert out["routing_js_learners"] == pytest.approx(0.5)
  assert out["utilisation_entropy_global"] == pytest.approx(1.0)
  assert out["utilisation_entropy_learners"] == pytest.approx(0.5)
  assert out["router_distance"] == 0.0


class _FixedRouter:
  """A task whose 'router' sends every token to the experts its params name."""

  def eval_batches(self, rows, num):
    return [{"x": np.zeros((rows, 1), np.float32)} for _ in range(num)]

  def routing(self, params, batch):
    del batch
    choices = params["choices"]  # [layers 1, tokens 2, k 2].
    probs = jax.nn.one_hot(choices[..., 0], 4)
    return {"probs": probs, "choices": choices}


def _router(*tokens):
  return {"choices": jnp.array([tokens], jnp.int32)}


def test_router_probe_follows_merges_alignments_and_evals_by_hand():
  init = _router([0, 1], [0, 1])
  probe = RouterProbe.make(_FixedRouter(), init, num_learners=2)
  # Two merges: all four experts used evenly (entropy 1), then only experts 0, 1 (0.5).
  probe.merged(_router([0, 1], [2, 3]))
  probe.merged(_router([0, 1], [0, 1]))
  # Learner 0 aligns after a step of loss 3.0 and then steps at 3.5: a jump of 0.5. A
  # second alignment before it stepped changes nothing; learner 1 restarted: no jump.
  probe.aligned(0, 3.0)
  probe.aligned(0, 9.0)
  probe.aligned(1, 2.0)
  probe.forget(1)
  probe.stepped(0, 3.5)
  probe.stepped(1, 7.0)
  probe.stepped(0, 1.0)  # Not the first step after an alignment.
  saved = probe.state()
  now = _router([0, 1], [0, 2])  # Token 1: {0, 2} vs the init's {0, 1}: Jaccard 1/3.
  got = probe.metrics(now)
  assert got == pytest.approx({
      "routing/utilisation_entropy_after_merge": (1.0 + 0.5) / 2,
      "routing/loss_jump_after_alignment": 0.5,
      "routing/topk_overlap_since_last_eval": (1 + 1 / 3) / 2,
      "routing/utilisation_entropy_global": routing.utilisation_entropy(
          np.array([[[0, 1], [0, 2]]]), 4)})
  # Reset after an eval: the next one compares with this eval and has no means to report.
  assert probe.metrics(now) == {"routing/topk_overlap_since_last_eval": 1.0,
                                "routing/utilisation_entropy_global": pytest.approx(
                                    got["routing/utilisation_entropy_global"])}
  probe.load_state(saved)  # A resumed run reports what the uninterrupted one did.
  assert probe.metrics(now) == pytest.approx(got)
  # With the learners' routers: routing.across_learners of them, beside the above.
  both = probe.metrics(now, [init, now], [np.ones(2), np.ones(2)])
  assert both["routing/topk_overlap_learners"] == pytest.approx((1 + 1 / 3) / 2)
  assert both["routing/topk_overlap_global"] == pytest.approx(((1 + 1 / 3) / 2 + 1) / 2)


def test_a_task_without_routers_has_no_probe():
  class Dense(_FixedRouter):
    def routing(self, params, batch):
      return None
  assert RouterProbe.make(Dense(), _router([0, 1], [0, 1]), 1) is None
  assert RouterProbe.make(object(), {}, 1) is None
