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
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from decoupled_diloco.algorithm import codecs, merge, rounds
from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.algorithm.messages import FULL, Contribution, Publication

STALENESS_WEIGHTINGS = ("none", "inverse")


class Checked(NamedTuple):
  """A contribution decoded on the syncer's device (not yet read back)."""
  deltas: list
  finite: jax.Array  # All values finite.
  max_abs: jax.Array  # Largest |value|.
  valid: jax.Array  # Its codec fields hold values the codec can make (scales >= 0).
  norm: jax.Array  # L2 norm of the whole delta.


NORM_BOUNDS = ("clip", "reject")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_time(x) -> bool:
  return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
          and math.isfinite(x) and x >= 0)


def cap_shares(w_N: np.ndarray, owners, cap: float) -> np.ndarray:
  """Weights rescaled so that no owner (learner) has more than `cap` of their sum.

  The cap is at least 1 / (number of owners), where every owner has an equal
  share; the excess of a capped owner goes to the others in proportion to
  their weights (water-filling).
  """
  owners = np.asarray(owners)
  ids = sorted(set(owners.tolist()))
  totals = np.array([w_N[owners == o].sum() for o in ids], np.float64)
  if totals.sum() <= 0 or len(ids) < 2:
    return w_N
  cap = max(cap, 1.0 / len(ids))
  share = totals / totals.sum()
  if np.all(share <= cap + 1e-12):
    return w_N  # Unchanged, bit for bit.
  capped = np.zeros(len(ids), bool)
  while True:
    over = (share > cap + 1e-12) & ~capped
    if not over.any():
      break
    capped |= over
    free = ~capped
    share[capped] = cap
    share[free] = totals[free] / totals[free].sum() * (1.0 - cap * capped.sum())
  scale = dict(zip(ids, np.where(totals > 0, share * totals.sum() / np.maximum(totals, 1e-30), 0)))
  return (w_N * np.array([scale[o] for o in owners.tolist()])).astype(np.float32)


class FragmentState(NamedTuple):
  """Everything the syncer holds for one fragment: the one definition its checkpoint,
  its durable copy in the mailbox and its recovery flatten and unflatten."""
  theta: list  # The global tensors Theta_p.
  opt_state: Any  # The outer optimizer's state.
  held: list | None  # What learners hold, Theta_hat_p (lossy downloads only; else None).
  last_deltas: list  # [learner][tensor]: each learner's last merged delta (see `merge`).
  version: np.ndarray  # int64 scalar.
  merges: np.ndarray  # int64 scalar: outer steps taken.
  last_base: np.ndarray  # [learners] int64: base version of the last merged delta (-1: none).
  last_steps: np.ndarray  # [learners] int64: its step counter.
  last_tokens: np.ndarray  # [learners] int64: its token counter.
  recent_norm: np.ndarray  # [learners] float64: latest admitted norm per step (0: none).


class Accepted(NamedTuple):
  """A contribution that passed `validate`: its deltas, as they will be merged."""
  deltas: list
  scale: float  # < 1 where its norm was clipped (the deltas are already scaled).


class Entry(NamedTuple):
  """A contribution admitted to a round, with its decoded deltas."""
  contribution: Contribution
  deltas: list
  staleness: int  # Versions between its base and the fragment when it was admitted.
  scale: float = 1.0  # Norm clipping applied to `deltas`.


@functools.partial(jax.jit, static_argnums=(0,))
def _check(codec, payload, like) -> Checked:
  deltas = codecs.decode_tree(codec, list(payload), like)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(d)) for d in deltas]))
  # Scales a codec makes are finite and >= 0; others decode to flipped or absurd values.
  scales = [jnp.all(jnp.isfinite(t["scales"]) & (t["scales"] >= 0))
            for t in payload if "scales" in t]
  valid = jnp.all(jnp.stack(scales)) if scales else jnp.bool_(True)
  max_abs = jnp.max(jnp.stack([jnp.max(jnp.abs(d)) for d in deltas]))
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(d.astype(jnp.float32))) for d in deltas))
  return Checked(deltas, finite, max_abs, valid, norm)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _outer_step(tx, rules, theta, opt_state, deltas, w_N):
  """Merges deltas [contributor][tensor] and takes the outer step."""
  merged = [rule(jnp.stack(d), w_N) for rule, d in zip(rules, zip(*deltas))]
  updates, opt_state = tx.update(merged, opt_state, theta)
  return optax.apply_updates(theta, updates), opt_state


@jax.jit
def all_finite(tree):
  """True (on device) if every leaf of `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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


def lossless(codec: codecs.Codec) -> bool:
  """True if `codec` delivers values exactly (publications are then full copies)."""
  return codec.name == "fp32"


class Syncer:
  """Global fragments, versions and outer optimizer states; see module docstring."""

  def __init__(self, flat_params: dict, fragments, *, outer_tx: optax.GradientTransformation,
               merge_rule: str, weighting: str, up: codecs.Codec, down: codecs.Codec,
               mean_paths: frozenset[str] = frozenset(),
               num_learners: int, max_abs_delta: float, max_staleness: int | None = None,
               staleness_weighting: str = "none", max_tokens_per_step: int | None = None,
               max_weight_share: float = 1.0, max_norm_ratio: float = 0.0,
               norm_bound: str = "clip", norm_bound_from: int = 0, sync_every: int = 1,
               device=None):
    self.fragments = fragments
    self.device = device or jax.devices()[0]
    # Copied through the host: the syncer's fragments never alias a learner's.
    self.theta = [jax.device_put([np.array(fragments_lib.take(flat_params, k)) for k in f],
                                 self.device)
                  for f in fragments]
    self.version = np.zeros(len(fragments), np.int64)
    self.tx = outer_tx
    self.opt_state = [outer_tx.init(t) for t in self.theta]
    # `merge_rule=rda` merges the tensors of `mean_paths` (embeddings) by the weighted mean.
    self.rules = [tuple(merge.rule_for(merge_rule, fragments_lib.parse(k)[0] in mean_paths)
                        for k in f)
                  for f in fragments]
    merge.weights([1], [1], weighting)  # Validates the name now, not at the first merge.
    if staleness_weighting not in STALENESS_WEIGHTINGS:
      raise ValueError(f"diloco.staleness_weighting={staleness_weighting!r} is unknown;"
                       f" choose from {STALENESS_WEIGHTINGS}.")
    self.weighting, self.staleness_weighting = weighting, staleness_weighting
    self.up, self.down = up, down
    self.num_learners, self.max_abs_delta = num_learners, max_abs_delta
    self.max_staleness = max_staleness
    self.max_tokens_per_step = max_tokens_per_step
    if norm_bound not in NORM_BOUNDS:
      raise ValueError(f"diloco.norm_bound={norm_bound!r} is unknown; choose from {NORM_BOUNDS}.")
    self.max_weight_share, self.max_norm_ratio = max_weight_share, max_norm_ratio
    # Norms grow by orders of magnitude while the inner learning rate warms up:
    # the bound applies from this round on.
    self.norm_bound, self.norm_bound_from = norm_bound, norm_bound_from
    self.sync_every = sync_every
    # Per fragment and learner, its latest admitted delta's norm per step (0: none yet).
    self.recent_norm = np.zeros((len(fragments), num_learners))
    self.clipped = 0
    # Per fragment: round -> admitted entries.
    self.pending: list[dict[int, list[Entry]]] = [{} for _ in fragments]
    # What learners hold, per fragment (lossy downloads only; see module docstring).
    self.held = None if lossless(down) else [list(t) for t in self.theta]
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

  def validate(self, c: Contribution, checked: Checked | None = None) -> Accepted | None:
    """The contribution's deltas to merge, or None (counted and logged) if it is rejected.

    Assumes nothing of the sender: every field is checked for type and range
    (learner and fragment known, base version not ahead of the fragment, at
    least one step, no more tokens than its steps can hold, `nbytes` the
    payload's size), the payload must be exactly what the up codec makes and
    decode to finite values within `max_abs_delta`, and its norm is bounded
    by `max_norm_ratio` times the median of the other learners' latest norms
    per step for the fragment, times its steps (at most 2 H; clipped to it,
    or rejected).
    """
    if not (_is_int(c.learner) and _is_int(c.fragment) and 0 <= c.fragment < len(self.fragments)
            and 0 <= c.learner < self.num_learners):
      self.reject(c, "unknown learner or fragment")
      return None
    p = c.fragment
    ints = (c.round, c.base_version, c.steps, c.tokens, c.nbytes)
    if (not all(_is_int(x) for x in ints) or not 0 <= c.base_version <= self.version[p]
        or c.round < 0 or c.steps < 1 or c.tokens < 0
        or (self.max_tokens_per_step is not None
            and c.tokens > c.steps * self.max_tokens_per_step)
        or not _is_time(c.sent_at) or not _is_time(c.step_seconds)):
      self.reject(c, "inconsistent metadata")
      return None
    if self.max_staleness is not None and self.version[p] - c.base_version > self.max_staleness:
      self.reject(c, "stale")
      return None
    if (checked := checked or self.check(c)) is None:
      self.reject(c, "malformed payload")
      return None
    if c.nbytes != codecs.payload_nbytes(c.payload):
      self.reject(c, "wrong byte count")
      return None
    finite, max_abs, valid, norm = jax.device_get(
        (checked.finite, checked.max_abs, checked.valid, checked.norm))  # One host sync.
    if not finite:
      self.reject(c, "non-finite")
      return None
    if not valid:
      self.reject(c, "invalid codec values")
      return None
    if max_abs > self.max_abs_delta:
      self.reject(c, "absurd magnitude")
      return None
    deltas, norm, scale = checked.deltas, float(norm), 1.0
    # A delta is credited with at most 2 H steps, whatever it claims.
    steps = min(c.steps, 2 * self.sync_every)
    others = np.delete(self.recent_norm[p], c.learner)
    others = others[others > 0]
    if self.max_norm_ratio and others.size and c.round >= self.norm_bound_from:
      # Per inner step, against the other learners' latest: learners share a
      # schedule, so these move together, and one learner cannot move their median.
      bound = self.max_norm_ratio * float(np.median(others)) * steps
      if norm > bound:
        if self.norm_bound == "reject":
          self.reject(c, "norm above bound")
          return None
        scale = bound / norm
        deltas = [d * scale for d in deltas]
        self.clipped += 1
        logging.warning("syncer: clipped learner %s fragment %s from norm %.3g to %.3g",
                        c.learner, p, norm, bound)
    # Only an unclipped delta says what learners' norms are: recording clipped
    # ones would let the bounds of two learners ratchet each other down to 0.
    if norm > 0 and scale == 1.0:  # A zero delta (learning rate 0) says nothing.
      self.recent_norm[p, c.learner] = norm / steps
    return Accepted(deltas, scale)

  def admit(self, c: Contribution, accepted: Accepted, rnd: int) -> None:
    """Adds a validated contribution to round `rnd` of its fragment (`rounds.place`)."""
    entry = Entry(c, accepted.deltas, int(self.version[c.fragment] - c.base_version),
                  accepted.scale)
    rounds.place(self.pending[c.fragment], entry, c, rnd, of=lambda e: e.contribution)

  def receive(self, c: Contribution, rnd: int, checked: Checked | None = None) -> bool:
    """`validate` then `admit` to round `rnd`; False if rejected."""
    accepted = self.validate(c, checked)
    if accepted is None:
      return False
    self.admit(c, accepted, rnd)
    return True

  def readmit(self, c: Contribution, rnd: int, staleness: int, scale: float) -> None:
    """Puts back a contribution that was admitted before a checkpoint (on resume)."""
    checked = _check(self.up, jax.device_put(c.payload, self.device), self.theta[c.fragment])
    deltas = checked.deltas if scale == 1.0 else [d * scale for d in checked.deltas]
    self.pending[c.fragment].setdefault(rnd, []).append(Entry(c, deltas, staleness, scale))

  def contributors(self, p: int, rnd: int) -> int:
    """Contributions a merge of round `rnd` would take (every one waiting)."""
    del rnd
    return sum(len(entries) for entries in self.pending[p].values())

  def merge(self, p: int, rnd: int) -> Publication | None:
    """Closes round `rnd` of fragment p: merge, outer step, new version. None if empty.

    Merges every contribution waiting for the fragment: the round's own, late
    ones that joined it, and early ones sent for later rounds by learners
    ahead of the others (algorithm/rounds.py).
    """
    waiting = [e for r in sorted(self.pending[p]) for e in self.pending[p][r]]
    self.pending[p] = {}
    entries = sorted(waiting, key=lambda e: (e.contribution.learner, e.contribution.base_version))
    deltas, steps, tokens, staleness, owners = [], [], [], [], []
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
        owners.append(m)
    if not deltas:
      return None
    w_N = merge.weights(steps, tokens, self.weighting)
    if self.staleness_weighting == "inverse":
      w_N = (w_N / (1.0 + np.array(staleness, np.float32))).astype(np.float32)
    w_N = cap_shares(w_N, owners, self.max_weight_share)
    if not np.all(np.isfinite(w_N)) or float(w_N.sum()) <= 0:
      return None
    theta, opt_state = _outer_step(self.tx, self.rules[p], self.theta[p], self.opt_state[p],
                                   deltas, w_N)
    if not bool(all_finite(theta)):  # Never commit a poisoned fragment.
      self.rejected["non-finite merge"] += 1
      logging.warning("syncer: merge of fragment %s round %s is not finite; not committed", p, rnd)
      return None
    self.theta[p], self.opt_state[p] = theta, opt_state
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

  def warm_up(self) -> None:
    """Compiles what a merge runs (decoding, the outer step of 1 and M contributors,
    the checks, the download), on copies: a real-time syncer is then ready when
    the first contributions arrive, instead of falling behind while it compiles."""
    for p, theta in enumerate(self.theta):
      zeros = [jnp.zeros_like(t, jnp.float32) for t in theta]
      payload = jax.device_put(codecs.encode_tree(self.up, zeros), self.device)
      deltas = _check(self.up, payload, theta).deltas
      for n in sorted({1, self.num_learners}):
        w_N = np.full(n, 1.0 / n, np.float32)
        theta2, _ = _outer_step(self.tx, self.rules[p], theta, self.opt_state[p], [deltas] * n,
                                w_N)
        jax.block_until_ready(all_finite(theta2))
      if self.held is not None:
        jax.block_until_ready(_encode_update(self.down, theta, self.held[p]))
      jax.block_until_ready(self.publication(p).payload)

  def publication(self, p: int) -> Publication:
    """A full copy of the current global fragment p, exact (e.g. for a rejoining learner)."""
    encode = self._encode_down if self.held is None else self._encode_exact
    payload = encode(self.theta[p])
    return Publication(p, int(self.version[p]), tuple(payload), codecs.payload_nbytes(payload))

  def global_flat(self) -> dict:
    """{path: tensor} of the whole global model (split experts rejoined)."""
    return fragments_lib.assemble(
        {k: t for f, ts in zip(self.fragments, self.theta) for k, t in zip(f, ts)})

  def fragment_state(self, p: int) -> FragmentState:
    """Fragment p's state (a tree: arrays, and None where downloads are lossless)."""
    return FragmentState(
        theta=list(self.theta[p]), opt_state=self.opt_state[p],
        held=None if self.held is None else list(self.held[p]),
        last_deltas=[list(d) for d in self.last_deltas[p]],
        version=np.int64(self.version[p]), merges=np.int64(self.merges[p]),
        last_base=self.last_base[p].copy(), last_steps=self.last_steps[p].copy(),
        last_tokens=self.last_tokens[p].copy(), recent_norm=self.recent_norm[p].copy())

  def load_fragment_state(self, p: int, s: FragmentState) -> None:
    """Takes up a `fragment_state(p)`; arrays go to the syncer's device."""
    put = lambda xs: jax.device_put(list(xs), self.device)
    self.theta[p] = put(s.theta)
    self.opt_state[p] = jax.device_put(s.opt_state, self.device)
    if self.held is not None:
      self.held[p] = put(s.held)
    self.last_deltas[p] = [put(d) for d in s.last_deltas]
    self.version[p], self.merges[p] = int(s.version), int(s.merges)
    self.last_base[p], self.last_steps[p] = s.last_base, s.last_steps
    self.last_tokens[p], self.recent_norm[p] = s.last_tokens, s.recent_norm

  def state(self) -> dict:
    """A checkpointable tree: every fragment's `FragmentState` (as a dict) and counters."""
    fragments = [{k: v for k, v in self.fragment_state(p)._asdict().items() if v is not None}
                 for p in range(len(self.fragments))]  # Lossless downloads hold no `held`.
    return {"fragments": fragments, "clipped": np.int64(self.clipped)}

  def load_state(self, s: dict) -> None:
    for p, fs in enumerate(s["fragments"]):
      self.load_fragment_state(p, FragmentState(**{"held": None, **fs}))
    self.clipped = int(s["clipped"])
