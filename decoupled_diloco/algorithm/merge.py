"""Merge rules for pseudo-gradients and per-learner weights.

`mean` is DiLoCo's weighted average (https://arxiv.org/abs/2311.08105).
`rda` (radial-directional averaging, Decoupled DiLoCo,
https://arxiv.org/abs/2604.21428) averages norms and directions separately:
  (sum_m w_m |d_m| / sum_m w_m) * unit(sum_m w_m unit(d_m) / sum_m w_m),
which keeps the update's norm when learners' deltas are nearly orthogonal,
where a plain mean shrinks it by about sqrt(M).
"""

import jax.numpy as jnp
import numpy as np

MERGE_RULES = ("mean", "rda", "rda_everywhere")  # `rda` keeps some tensors (embeddings) on `mean`.
WEIGHTINGS = ("uniform", "tokens", "tokens2_per_step")


def weights(steps, tokens, weighting: str) -> np.ndarray:
  """Per-contribution weights; `tokens2_per_step` = tokens * (tokens / steps).

  Computed on the host (numpy): they come from message metadata, and the
  syncer checks their sum without a device round trip.
  """
  steps = np.asarray(steps, np.float32)
  tokens = np.asarray(tokens, np.float32)
  if weighting == "uniform":
    return np.ones_like(steps)
  if weighting == "tokens":
    return tokens
  if weighting == "tokens2_per_step":
    return np.where(steps > 0, tokens * tokens / np.maximum(steps, 1.0), 0.0).astype(np.float32)
  raise ValueError(f"diloco.weighting={weighting!r} is unknown; choose from {WEIGHTINGS}.")


def _unit(x_N, norm_N):
  return x_N / jnp.where(norm_N > 0, norm_N, 1.0)


def merge_mean(deltas_NxT, w_N):
  """Weighted mean over the leading (contributor) axis."""
  w = w_N.reshape((-1,) + (1,) * (deltas_NxT.ndim - 1))
  return (w * deltas_NxT).sum(0) / w_N.sum()


def merge_rda(deltas_NxT, w_N):
  """Radial-directional average over the leading (contributor) axis; unit(0) = 0."""
  n = deltas_NxT.shape[0]
  flat_NxF = deltas_NxT.reshape(n, -1)
  norm_N = jnp.linalg.norm(flat_NxF, axis=1)
  radius = (w_N * norm_N).sum() / w_N.sum()
  direction_F = (w_N[:, None] * _unit(flat_NxF, norm_N[:, None])).sum(0) / w_N.sum()
  dir_norm = jnp.linalg.norm(direction_F)
  return (radius * _unit(direction_F, dir_norm)).reshape(deltas_NxT.shape[1:])


def rule_for(merge: str, on_mean: bool = False):
  """The merge function for one tensor; `rda` keeps the `on_mean` ones (embeddings) on the mean."""
  if merge not in MERGE_RULES:
    raise ValueError(f"diloco.merge={merge!r} is unknown; choose from {MERGE_RULES}.")
  if merge == "mean" or (merge == "rda" and on_mean):
    return merge_mean
  return merge_rda
