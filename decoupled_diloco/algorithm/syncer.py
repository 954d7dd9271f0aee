"""The syncer: validates contributions, merges them per round, takes outer steps.

Per fragment p it holds the global tensors Theta_p, their version, an outer
optimizer state (any optax transformation: the merged pseudo-gradient is
treated as a gradient, as in DiLoCo, https://arxiv.org/abs/2311.08105) and
the contributions admitted to each of its rounds. Which round a contribution
joins, and when a round closes, is `algorithm/rounds.py`'s decision; the
syncer does what it says.

A learner that sends a fragment again before it aligns to a publication (a
fast learner a round ahead, or one re-phased) sends a delta that holds the one
it sent before. If that one still waits in a round, the new one replaces it
there; if it was merged already, the syncer merges only the difference (and
the difference of the counters). Either way no work counts twice.

Downloads. With a lossless down codec every publication is the fragment
itself. With a lossy one, publishing the fragment would quantize the
parameters themselves at every sync; instead the syncer keeps what the
learners hold, Theta_hat_p, and publishes the update against it:

  payload = encode(Theta_p - Theta_hat_p);  Theta_hat_p += decode(payload)

so the rounding error stays on the syncer and is sent with later updates
(error feedback on the download), and the learners' copy never drifts more
than one update's rounding from Theta_p. An update applies only to the
version it was made against; a learner that holds anything else (it rejoined,
or missed a publication) gets a full-precision copy of Theta_p instead.
"""

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from decoupled_diloco.algorithm import codecs, merge
from decoupled_diloco.algorithm.messages import FULL, Contribution, Publication

STALENESS_WEIGHTINGS = ("none", "inverse")


class Checked(NamedTuple):
  """A contribution decoded on the syncer's device (not yet read back)."""
  deltas: list
  finite: jax.Array  # All values finite.
  max_abs: jax.Array  # Largest |value|.


class Entry(NamedTuple):
  """A contribution admitted to a round, with its decoded deltas."""
  contribution: Contribution
  deltas: list
  staleness: int  # Versions between its base and the fragment when it was admitted.


@functools.partial(jax.jit, static_argnums=(0,))
def _check(codec, payload, like) -> Checked:
  deltas = codecs.decode_tree(codec, list(payload), like)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(d)) for d in deltas]))
  max_abs = jnp.max(jnp.stack([jnp.max(jnp.abs(d)) for d in deltas]))
  return Checked(deltas, finite, max_abs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _outer_step(tx, rules, theta, opt_state, deltas, w_N):
  """Merges deltas [contributor][tensor] and takes the outer step."""
  merged = [rule(jnp.stack(d), w_N) for rule, d in zip(rules, zip(*deltas))]
  updates, opt_state = tx.update(merged, opt_state, theta)
  return optax.apply_updates(theta, updates), opt_state


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_update(codec, theta, held):
  """(payload of theta - held, held + what the payload delivers)."""
  update = [t - h for t, h in zip(theta, held)]
  payload = codecs.encode_tree(codec, update)
  delivered = codecs.decode_tree(codec, payload, update)
  return payload, [h + d for h, d in zip(held, delivered)]


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


def _lossless(codec: codecs.Codec) -> bool:
  return codec.name == "fp32"


class Syncer:
  """Global fragments, versions and outer optimizer states; see module docstring."""

  def __init__(self, flat_params: dict, fragments, *, outer_tx: optax.GradientTransformation,
               merge_rule: str, weighting: str, up: codecs.Codec, down: codecs.Codec,
               num_learners: int, max_abs_delta: float, max_staleness: int | None = None,
               staleness_weighting: str = "none", device=None):
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
    if staleness_weighting not in STALENESS_WEIGHTINGS:
      raise ValueError(f"diloco.staleness_weighting={staleness_weighting!r} is unknown;"
                       f" choose from {STALENESS_WEIGHTINGS}.")
    self.weighting, self.staleness_weighting = weighting, staleness_weighting
    self.up, self.down = up, down
    self.num_learners, self.max_abs_delta = num_learners, max_abs_delta
    self.max_staleness = max_staleness
    # Per fragment: round -> admitted entries.
    self.pending: list[dict[int, list[Entry]]] = [{} for _ in fragments]
    # What learners hold, per fragment (lossy downloads only; see module docstring).
    self.held = None if _lossless(down) else [list(t) for t in self.theta]
    self.rejected = collections.Counter()
    self.last_rejection: str | None = None  # Reason of the latest rejection.
    self._encode_down = jax.jit(functools.partial(codecs.encode_tree, down))
    self._encode_exact = jax.jit(functools.partial(codecs.encode_tree, codecs.EXACT))
    # What a well-formed contribution's payload is, per fragment: the up codec's
    # output for each tensor (learners encode float32 deltas).
    self._payload_specs = [
        jax.eval_shape(lambda ts: codecs.encode_tree(up, ts),
                       [jax.ShapeDtypeStruct(np.shape(t), jnp.float32) for t in theta])
        for theta in self.theta]
    self.merges = np.zeros(len(fragments), np.int64)
    # Per fragment and learner, the last merged contribution's base version (-1:
    # none), counters and deltas (see `merge`).
    self.last_base = np.full((len(fragments), num_learners), -1, np.int64)
    self.last_steps = np.zeros((len(fragments), num_learners), np.int64)
    self.last_tokens = np.zeros((len(fragments), num_learners), np.int64)
    self.last_deltas = [[[jnp.zeros_like(t) for t in theta] for _ in range(num_learners)]
                        for theta in self.theta]

  def reject(self, c: Contribution, reason: str) -> None:
    """Counts and logs a contribution that will not be merged."""
    self.last_rejection = reason
    self.rejected[reason] += 1
    logging.warning("syncer: rejected learner %s fragment %s round %s (%s)", c.learner,
                    c.fragment, c.round, reason)

  def check(self, c: Contribution) -> Checked | None:
    """Starts decoding `c` on the syncer's device, without waiting.

    None if the payload is malformed: not exactly the arrays (keys, shapes,
    dtypes) the up codec makes for the fragment. A runtime that checks at send
    time and validates later never blocks.
    """
    if not 0 <= c.fragment < len(self.fragments):
      return None
    if not _conforms(c.payload, self._payload_specs[c.fragment]):
      return None
    try:
      return _check(self.up, jax.device_put(c.payload, self.device), self.theta[c.fragment])
    except (TypeError, ValueError, KeyError, IndexError):
      return None

  def validate(self, c: Contribution, checked: Checked | None = None) -> list | None:
    """The contribution's decoded deltas, or None (counted and logged) if it is rejected."""
    if not (0 <= c.fragment < len(self.fragments)) or not 0 <= c.learner < self.num_learners:
      self.reject(c, "unknown learner or fragment")
      return None
    p = c.fragment
    if c.base_version > self.version[p] or c.steps < 0 or c.tokens < 0 or c.round < 0:
      self.reject(c, "inconsistent metadata")
      return None
    if self.max_staleness is not None and self.version[p] - c.base_version > self.max_staleness:
      self.reject(c, "stale")
      return None
    if (checked := checked or self.check(c)) is None:
      self.reject(c, "malformed payload")
      return None
    finite, max_abs = jax.device_get((checked.finite, checked.max_abs))  # One host sync.
    if not finite:
      self.reject(c, "non-finite")
      return None
    if max_abs > self.max_abs_delta:
      self.reject(c, "absurd magnitude")
      return None
    return checked.deltas

  def admit(self, c: Contribution, deltas: list, rnd: int) -> None:
    """Adds a validated contribution to round `rnd` of its fragment.

    A newer contribution from the same learner measured from the same base
    holds all of the older one's work: if the older one still waits in a
    round, the newer one takes its place there (the earliest round gets the
    freshest work, as a learner ahead of the others would want).
    """
    pending, key = self.pending[c.fragment], (c.learner, c.base_version)
    entry = Entry(c, deltas, int(self.version[c.fragment] - c.base_version))
    for r in sorted(pending):
      entries = pending[r]
      for i, e in enumerate(entries):
        if (e.contribution.learner, e.contribution.base_version) == key:
          entries[i] = entry
          return
    pending.setdefault(rnd, []).append(entry)

  def receive(self, c: Contribution, rnd: int, checked: Checked | None = None) -> bool:
    """`validate` then `admit` to round `rnd`; False if rejected."""
    deltas = self.validate(c, checked)
    if deltas is None:
      return False
    self.admit(c, deltas, rnd)
    return True

  def readmit(self, c: Contribution, rnd: int, staleness: int) -> None:
    """Puts back a contribution that was admitted before a checkpoint (on resume)."""
    checked = _check(self.up, jax.device_put(c.payload, self.device), self.theta[c.fragment])
    self.pending[c.fragment].setdefault(rnd, []).append(Entry(c, checked.deltas, staleness))

  def contributors(self, p: int, rnd: int) -> int:
    return len(self.pending[p].get(rnd, ()))

  def merge(self, p: int, rnd: int) -> Publication | None:
    """Closes round `rnd` of fragment p: merge, outer step, new version. None if empty."""
    entries = sorted(self.pending[p].pop(rnd, []),
                     key=lambda e: (e.contribution.learner, e.contribution.base_version))
    deltas, steps, tokens, staleness = [], [], [], []
    for e in entries:
      c, d = e.contribution, list(e.deltas)
      m, st, tk = c.learner, c.steps, c.tokens
      if self.last_base[p, m] == c.base_version:
        # The learner sent again before aligning: this delta holds the one
        # already merged too. Merge only what is new.
        d = [a - b for a, b in zip(d, self.last_deltas[p][m])]
        st, tk = st - self.last_steps[p, m], tk - self.last_tokens[p, m]
      self.last_base[p, m], self.last_steps[p, m], self.last_tokens[p, m] = (
          c.base_version, c.steps, c.tokens)
      self.last_deltas[p][m] = list(e.deltas)
      if st > 0:
        deltas.append(d)
        steps.append(st)
        tokens.append(tk)
        staleness.append(e.staleness)
    if not deltas:
      return None
    w_N = merge.weights(steps, tokens, self.weighting)
    if self.staleness_weighting == "inverse":
      w_N = (w_N / (1.0 + np.array(staleness, np.float32))).astype(np.float32)
    if float(w_N.sum()) <= 0:
      return None
    self.theta[p], self.opt_state[p] = _outer_step(
        self.tx, self.rules[p], self.theta[p], self.opt_state[p], deltas, w_N)
    self.version[p] += 1
    self.merges[p] += 1
    version = int(self.version[p])
    if self.held is None:
      payload, base = self._encode_down(self.theta[p]), FULL
    else:
      payload, self.held[p] = _encode_update(self.down, self.theta[p], self.held[p])
      base = version - 1
    return Publication(p, version, tuple(payload), codecs.payload_nbytes(payload),
                       base_version=base, round=rnd)

  def publication(self, p: int) -> Publication:
    """A full copy of the current global fragment p, exact (e.g. for a rejoining learner)."""
    encode = self._encode_down if self.held is None else self._encode_exact
    payload = encode(self.theta[p])
    return Publication(p, int(self.version[p]), tuple(payload), codecs.payload_nbytes(payload))

  def global_flat(self) -> dict:
    """{path: tensor} of the whole global model."""
    return {k: t for f, ts in zip(self.fragments, self.theta) for k, t in zip(f, ts)}

  def state(self) -> dict:
    s = {"theta": self.theta, "opt_state": self.opt_state, "version": self.version,
         "merges": self.merges, "last_base": self.last_base, "last_steps": self.last_steps,
         "last_tokens": self.last_tokens, "last_deltas": self.last_deltas}
    if self.held is not None:
      s["held"] = self.held
    return s

  def load_state(self, s: dict) -> None:
    self.theta = [list(t) for t in s["theta"]]
    self.opt_state = list(s["opt_state"])
    self.version = np.asarray(s["version"]).copy()
    self.merges = np.asarray(s["merges"]).copy()
    self.last_base = np.asarray(s["last_base"]).copy()
    self.last_steps = np.asarray(s["last_steps"]).copy()
    self.last_tokens = np.asarray(s["last_tokens"]).copy()
    self.last_deltas = [[list(d) for d in f] for f in s["last_deltas"]]
    if self.held is not None:
      self.held = [list(h) for h in s["held"]]
