"""The syncer: validates contributions, merges them per fragment, takes outer steps.

Per fragment p it holds the global tensors Theta_p, their version, an outer
optimizer state (any optax transformation: the merged pseudo-gradient is
treated as a gradient, as in DiLoCo, https://arxiv.org/abs/2311.08105) and
the contributions of the current round. When to close a round is the
runtime's decision (lock-step: all learners; decoupled: quorum + grace).
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from decoupled_diloco.algorithm import codecs, merge
from decoupled_diloco.algorithm.messages import Contribution, Publication


@functools.partial(jax.jit, static_argnums=(0,))
def _check(codec, payload, like):
  """Decodes a contribution and returns (deltas, all finite, max |delta|)."""
  deltas = codecs.decode_tree(codec, list(payload), like)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(d)) for d in deltas]))
  max_abs = jnp.max(jnp.stack([jnp.max(jnp.abs(d)) for d in deltas]))
  return deltas, finite, max_abs


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _outer_step(tx, rules, down, theta, opt_state, deltas, w_N):
  """Merges deltas [contributor][tensor], takes the outer step, encodes Theta."""
  merged = [rule(jnp.stack(d), w_N) for rule, d in zip(rules, zip(*deltas))]
  updates, opt_state = tx.update(merged, opt_state, theta)
  theta = optax.apply_updates(theta, updates)
  return theta, opt_state, codecs.encode_tree(down, theta)


def _conforms(payload, spec) -> bool:
  """True if `payload` has exactly the structure, shapes and dtypes of `spec`."""
  try:
    leaves, tree = jax.tree.flatten(list(payload))
  except TypeError:
    return False
  want, want_tree = jax.tree.flatten(spec)
  return tree == want_tree and all(
      getattr(a, "shape", None) == w.shape and getattr(a, "dtype", None) == w.dtype
      for a, w in zip(leaves, want))


def grace_window(*, overlap: int, step_s: float, quorum_s: float, sync_s: float,
                 gamma: float, grace_max_s: float) -> float:
  """Seconds to wait for more learners once the quorum is reached.

  grace = clip(gamma * (tau * xi_step - (xi_quorum + xi_sync)), 0, grace_max):
  only wait inside the slack that the tau-step overlap already hides
  (Decoupled DiLoCo, https://arxiv.org/abs/2604.21428).
  """
  slack = gamma * (overlap * step_s - (quorum_s + sync_s))
  return min(max(slack, 0.0), grace_max_s)


class Syncer:
  """Global fragments, versions and outer optimizer states; see module docstring."""

  def __init__(self, flat_params: dict, fragments, *, outer_tx: optax.GradientTransformation,
               merge_rule: str, weighting: str, up: codecs.Codec, down: codecs.Codec,
               num_learners: int, max_abs_delta: float, max_staleness: int | None = None,
               device=None):
    self.fragments = fragments
    self.device = device or jax.devices()[0]
    # Copied through the host: the syncer's fragments never alias a learner's.
    self.theta = [jax.device_put([np.array(flat_params[k]) for k in f], self.device)
                  for f in fragments]
    self.version = np.zeros(len(fragments), np.int64)
    self.tx = outer_tx
    self.opt_state = [outer_tx.init(t) for t in self.theta]
    self.rules = [tuple(merge.rule_for(k, merge_rule) for k in f) for f in fragments]
    merge.weights([1], [1], weighting)  # Validates the name now, not at the first merge.
    self.weighting, self.up, self.down = weighting, up, down
    self.num_learners, self.max_abs_delta = num_learners, max_abs_delta
    self.max_staleness = max_staleness
    self.pending: list[dict[int, tuple]] = [{} for _ in fragments]  # learner -> (c, deltas)
    self.rejected = collections.Counter()
    self.last_rejection: str | None = None  # Reason of the latest rejection.
    self._encode_down = jax.jit(functools.partial(codecs.encode_tree, down))
    # What a well-formed contribution's payload is, per fragment: the up codec's
    # output for each tensor (learners encode float32 deltas).
    self._payload_specs = [
        jax.eval_shape(lambda ts: codecs.encode_tree(up, ts),
                       [jax.ShapeDtypeStruct(np.shape(t), jnp.float32) for t in theta])
        for theta in self.theta]
    self.merges = np.zeros(len(fragments), np.int64)

  def _reject(self, c: Contribution, reason: str) -> bool:
    self.last_rejection = reason
    self.rejected[reason] += 1
    logging.warning("syncer: rejected learner %s fragment %s (%s)", c.learner, c.fragment, reason)
    return False

  def check(self, c: Contribution):
    """Starts decoding and validating `c` on the syncer's device, without waiting.

    Returns what `receive(c, checked)` needs, or None if the payload is malformed:
    not exactly the arrays (keys, shapes, dtypes) the up codec makes for the
    fragment. A runtime that checks at send time and receives later never blocks.
    """
    if not 0 <= c.fragment < len(self.fragments):
      return None
    if not _conforms(c.payload, self._payload_specs[c.fragment]):
      return None
    try:
      return _check(self.up, jax.device_put(c.payload, self.device), self.theta[c.fragment])
    except (TypeError, ValueError, KeyError, IndexError):
      return None

  def receive(self, c: Contribution, checked=None) -> bool:
    """Admits a contribution to its fragment's round; returns False if rejected."""
    if not (0 <= c.fragment < len(self.fragments)) or not 0 <= c.learner < self.num_learners:
      return self._reject(c, "unknown learner or fragment")
    p = c.fragment
    if c.base_version > self.version[p] or c.steps < 0 or c.tokens < 0:
      return self._reject(c, "inconsistent metadata")
    if self.max_staleness is not None and self.version[p] - c.base_version > self.max_staleness:
      return self._reject(c, "stale")
    if (checked := checked or self.check(c)) is None:
      return self._reject(c, "malformed payload")
    deltas, finite, max_abs = checked
    finite, max_abs = jax.device_get((finite, max_abs))  # One host sync, not two.
    if not finite:
      return self._reject(c, "non-finite")
    if max_abs > self.max_abs_delta:
      return self._reject(c, "absurd magnitude")
    self.pending[p][c.learner] = (c, deltas)  # A newer one from the same learner replaces it.
    return True

  def readmit(self, c: Contribution) -> None:
    """Puts back into its round a contribution that `receive` admitted (on resume)."""
    deltas, _, _ = _check(self.up, jax.device_put(c.payload, self.device),
                          self.theta[c.fragment])
    self.pending[c.fragment][c.learner] = (c, deltas)

  def contributors(self, p: int) -> int:
    return len(self.pending[p])

  def merge(self, p: int) -> Publication | None:
    """Closes fragment p's round: merge, outer step, new version. None if empty."""
    entries = [self.pending[p][m] for m in sorted(self.pending[p])]
    self.pending[p] = {}
    if not entries:
      return None
    w_N = merge.weights([c.steps for c, _ in entries], [c.tokens for c, _ in entries],
                        self.weighting)
    if float(w_N.sum()) <= 0:
      return None
    self.theta[p], self.opt_state[p], payload = _outer_step(
        self.tx, self.rules[p], self.down, self.theta[p], self.opt_state[p],
        [list(d) for _, d in entries], w_N)
    self.version[p] += 1
    self.merges[p] += 1
    return Publication(p, int(self.version[p]), tuple(payload), codecs.payload_nbytes(payload))

  def publication(self, p: int) -> Publication:
    """The current global fragment p (e.g. for a learner that rejoins)."""
    payload = self._encode_down(self.theta[p])
    return Publication(p, int(self.version[p]), tuple(payload), codecs.payload_nbytes(payload))

  def global_flat(self) -> dict:
    """{path: tensor} of the whole global model."""
    return {k: t for f, ts in zip(self.fragments, self.theta) for k, t in zip(f, ts)}

  def state(self) -> dict:
    return {"theta": self.theta, "opt_state": self.opt_state, "version": self.version,
            "merges": self.merges}

  def load_state(self, s: dict) -> None:
    self.theta = [list(t) for t in s["theta"]]
    self.opt_state = list(s["opt_state"])
    self.version = np.asarray(s["version"]).copy()
    self.merges = np.asarray(s["merges"]).copy()
