"""How far apart learners' mixture-of-experts routers are: diagnostics on a fixed probe batch.

Between merges each learner's router trains on its own shard, so its experts
may drift from the other learners' (an expert's identity is only its index).
These measure that, for the routers of M learners and of the global model, on
the same probe tokens. Arrays, per router:

  probs    [layers, tokens, experts]  the router's softmax over experts;
  choices  [layers, tokens, k]        the experts each token is sent to (top-k).

`router_distance`: mean pairwise ||W_i - W_j|| / mean ||W|| over router weights.
`topk_overlap`: mean Jaccard |A & B| / |A | B| of two routers' top-k sets per token.
`js_divergence`: mean Jensen-Shannon divergence (bits, in [0, 1]) of two routers'
distributions per token.
`utilisation_entropy`: the entropy of the experts' share of top-k assignments,
over log(experts): 1 when every expert gets the same share, 0 when one gets all.

Each takes plain arrays (numpy), so a test checks it against a hand computation.
"""

import itertools

import numpy as np


def router_distance(weights: list[np.ndarray]) -> float:
  """Mean pairwise L2 distance of M routers' weights, relative to their mean norm."""
  flat = [np.ravel(np.asarray(w, np.float64)) for w in weights]
  if len(flat) < 2:
    return 0.0
  pairs = [np.linalg.norm(a - b) for a, b in itertools.combinations(flat, 2)]
  scale = np.mean([np.linalg.norm(w) for w in flat])
  return float(np.mean(pairs) / scale) if scale > 0 else 0.0


def topk_overlap(choices_a: np.ndarray, choices_b: np.ndarray) -> float:
  """Mean over layers and tokens of the Jaccard index of the two top-k sets."""
  a, b = np.asarray(choices_a), np.asarray(choices_b)
  if a.shape != b.shape:
    raise ValueError(f"choices of shapes {a.shape} and {b.shape}: one probe batch, please.")
  # [..., k, 1] == [..., 1, k]: how many of a's experts are in b's set, per token.
  common = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)
  k = a.shape[-1]
  return float(np.mean(common / (2 * k - common)))


def js_divergence(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
  """Mean over layers and tokens of JS(p, q) in bits (0: identical, 1: disjoint)."""
  p, q = np.asarray(probs_a, np.float64), np.asarray(probs_b, np.float64)
  m = (p + q) / 2

  def kl(x, y):
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(x > 0, x * np.log2(x / y), 0.0).sum(-1)

  return float(np.mean((kl(p, m) + kl(q, m)) / 2))


def utilisation_entropy(choices: np.ndarray, num_experts: int) -> float:
  """Entropy of the experts' shares of top-k assignments over log(num_experts), mean over layers."""
  c = np.asarray(choices)
  c = c.reshape(c.shape[0] if c.ndim == 3 else 1, -1)  # [layers, tokens * k].
  out = []
  for layer in c:
    share = np.bincount(layer, minlength=num_experts) / layer.size
    nz = share[share > 0]
    out.append(-(nz * np.log(nz)).sum() / np.log(num_experts) if num_experts > 1 else 1.0)
  return float(np.mean(out))


def across_learners(routers: list[dict], global_router: dict, weights: list[np.ndarray],
                    num_experts: int) -> dict[str, float]:
  """The diagnostics of M learners' routers ({"probs", "choices"} each) and the global one's.

  Pairwise measures are means over the M (M - 1) / 2 pairs of learners.
  """
  pairs = list(itertools.combinations(routers, 2))
  mean = lambda values: float(np.mean(values)) if values else float("nan")
  return {
      "router_distance": router_distance(weights),
      "topk_overlap_learners": mean([topk_overlap(a["choices"], b["choices"]) for a, b in pairs]),
      "topk_overlap_global": mean([topk_overlap(r["choices"], global_router["choices"])
                                   for r in routers]),
      "routing_js_learners": mean([js_divergence(a["probs"], b["probs"]) for a, b in pairs]),
      "utilisation_entropy_global": utilisation_entropy(global_router["choices"], num_experts),
      "utilisation_entropy_learners": mean([utilisation_entropy(r["choices"], num_experts)
                                            for r in routers]),
  }
