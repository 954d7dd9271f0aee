"""A learner: local inner steps on its island, pseudo-gradients out, fragments in.

Per fragment p the learner keeps the base Theta_p it last aligned to (and that
base's version), counters of steps and tokens since then, and, with error
feedback, the residual e_p its codec has not yet sent (Decoupled DiLoCo,
https://arxiv.org/abs/2604.21428; Streaming DiLoCo, https://arxiv.org/abs/2501.18512).
It knows nothing of time or transport: a runtime calls `inner_step`,
`pseudo_gradient` and `align` in whatever order its clock dictates.

Error feedback keeps e_p <- beta * (x - decode(encode(x))) for the x it sends
(beta = `feedback_decay`), in one of two ways (`feedback_restart`):
  "offset" (default): on align the learner restarts at Theta_p - e_p, the point
    it would hold had e_p been delivered, and sends x = Theta_p - theta_p, which
    then holds e_p by itself. Its inner steps do not redo the undelivered work.
  "global": it restarts at Theta_p and sends x = e_p + (Theta_p - theta_p), as in
    SparseLoCo and MuLoCo. After H inner steps from Theta_p the fresh delta has
    largely redone what Theta_p lacks, so adding e_p counts it twice.

Why beta < 1: a 1-bit codec under-sends the same large coordinates round after
round, so carried whole its residual makes later sends mostly old progress,
which the outer momentum extrapolates again, and restarting each learner at
its own Theta_p - e_m moves the learners apart. Measurements of both forms and
of beta: experiments/results/quality.md (`python -m experiments.feedback_residuals`
prints the residuals' make-up).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from decoupled_diloco.algorithm import codecs
from decoupled_diloco.algorithm.fragments import flatten, parse, put, take, unflatten
from decoupled_diloco.algorithm.messages import FULL, Contribution, Publication

FEEDBACK_RESTARTS = ("offset", "global")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _encode_delta(codec, feedback, decay, base, theta, residual):
  """delta = base - theta, encoded; returns (payload, new residual or None).

  feedback: None (no error feedback), "global" (send residual + delta) or
  "offset" (send delta: the learner restarted at base - residual, so delta
  already holds it; `residual` is not read). The new residual is scaled by `decay`.
  """
  delta = [b.astype(jnp.float32) - t.astype(jnp.float32) for b, t in zip(base, theta)]
  if feedback is None:
    return codecs.encode_tree(codec, delta), None
  carried = residual if feedback == "global" else [None] * len(delta)
  pairs = [codecs.encode_with_feedback(codec, d, r) for d, r in zip(delta, carried)]
  return [p for p, _ in pairs], [decay * r for _, r in pairs]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _align(codec, theta, payload, alpha, residual, base):
  """Returns (theta', base'): theta' = alpha*theta + (1-alpha)*(Theta - residual); base' = Theta.

  Theta is the decoded payload, plus `base` when the payload is an update
  (`base` is None for a full copy). `residual` is None where the learner
  restarts at Theta itself.
  """
  glob = codecs.decode_tree(codec, list(payload), theta)
  if base is not None:
    glob = [b + g for b, g in zip(base, glob)]
  start = glob if residual is None else [g - r for g, r in zip(glob, residual)]
  new_theta = [(alpha * t + (1 - alpha) * g).astype(t.dtype) if alpha
               else g.astype(t.dtype) + jnp.zeros_like(t) for t, g in zip(theta, start)]
  return new_theta, glob


class Learner:
  """One learner's state on its island; see module docstring."""

  def __init__(self, index: int, island, inner_step, params, opt_state,
               fragments: tuple[tuple[str, ...], ...], *, alpha: float,
               up: codecs.Codec, down: codecs.Codec, error_feedback: bool,
               units_per_step: int, feedback_restart: str = "offset",
               feedback_decay: float = 1.0):
    self.index, self.island = index, island
    self._inner_step = inner_step
    self.params = island.put(params)
    self.opt_state = island.put(opt_state)
    self.fragments = fragments
    self.alpha, self.up, self.down = alpha, up, down
    if feedback_restart not in FEEDBACK_RESTARTS:
      raise ValueError(f"feedback_restart={feedback_restart!r}; choose from {FEEDBACK_RESTARTS}.")
    self.feedback = feedback_restart if error_feedback else None
    # 1 here is the textbook form; the config's default is the measured one.
    if not 0 <= feedback_decay <= 1:
      raise ValueError(f"feedback_decay={feedback_decay!r} must be in [0, 1].")
    self.feedback_decay = float(feedback_decay)
    self.units_per_step = units_per_step
    flat = flatten(params)
    num = len(fragments)
    self.base = [island.put([take(flat, k) for k in f], paths=f) for f in fragments]
    self.base_version = np.zeros(num, np.int64)
    self.c_steps = np.zeros(num, np.int64)
    self.c_tokens = np.zeros(num, np.int64)
    self.residual = ([island.put([jnp.zeros(np.shape(take(flat, k)), jnp.float32) for k in f],
                                 paths=f) for f in fragments] if error_feedback else None)
    self.step = 0

  def inner_step(self, batch, tokens: int | None = None):
    """One local optimizer step on `batch` (already on the island); returns the loss.

    `tokens`: units (tokens, images) in `batch` (default: the full batch, `units_per_step`).
    """
    self.params, self.opt_state, loss = self._inner_step(self.params, self.opt_state, batch)
    self.step += 1
    self.c_steps += 1
    self.c_tokens += self.units_per_step if tokens is None else tokens
    return loss

  def fragment_tensors(self, p: int) -> list:
    flat = flatten(self.params)
    return [take(flat, k) for k in self.fragments[p]]

  def pseudo_gradient(self, p: int, rnd: int) -> Contribution:
    """The encoded pseudo-gradient `base_p - theta_p` for round `rnd`, with its metadata."""
    carried = self.residual[p] if self.feedback == "global" else None
    payload, residual = _encode_delta(self.up, self.feedback, self.feedback_decay, self.base[p],
                                      self.fragment_tensors(p), carried)
    if self.residual is not None:
      self.residual[p] = residual
    return Contribution(self.index, p, rnd, int(self.base_version[p]), int(self.c_steps[p]),
                        int(self.c_tokens[p]), tuple(payload), codecs.payload_nbytes(payload))

  def align(self, pub: Publication) -> str:
    """theta_p <- alpha*theta_p + (1-alpha)*Theta_p; rebase; reset p's counters.

    With "offset" error feedback, Theta_p - e_p stands in for Theta_p. The
    inner optimizer state is kept (DiLoCo keeps it across outer steps).

    Returns "applied"; "stale" (a version the learner already holds or has
    passed: ignored); or "gap" (an update made against a version the learner
    does not hold: not applied, the caller fetches a full copy instead).
    """
    p = pub.fragment
    if pub.version <= self.base_version[p]:
      return "stale"
    update = pub.base_version != FULL
    if update and pub.base_version != self.base_version[p]:
      return "gap"
    payload = jax.device_put(pub.payload, self.island.replicated)
    unsent = self.residual[p] if self.feedback == "offset" else None
    theta, base = _align(self.down if update else codecs.EXACT, self.fragment_tensors(p), payload,
                         self.alpha, unsent, self.base[p] if update else None)
    theta = jax.device_put(theta, self.island.fragment_shardings(self.fragments[p], theta))
    flat = put(flatten(self.params), self.fragments[p], theta)
    for path in {parse(k)[0] for k in self.fragments[p] if parse(k)[1] is not None}:
      # A tensor of which some experts were set: back to its own placement.
      flat[path] = jax.device_put(flat[path], self.island.sharding(path, np.shape(flat[path])))
    self.params = unflatten(flat)
    self.base[p] = base
    self.base_version[p] = pub.version
    self.c_steps[p] = 0
    self.c_tokens[p] = 0
    return "applied"

  def recover(self, publications, opt_state=None) -> None:
    """Restarts the learner from full copies of the global fragments.

    After a full outage (its memory is gone) or a divergence. Its unsent
    residuals are dropped, its parameters become the published fragments, and
    its inner optimizer state becomes `opt_state` (a fresh one, built by the
    caller) or, if None, is kept with its non-finite entries zeroed (the
    optimistic ablation: a learner that lost its slices has no moments left).
    """
    if self.residual is not None:
      self.residual = jax.tree.map(jnp.zeros_like, self.residual)
    self.base_version[:] = -1  # Whatever it held is gone: every copy applies.
    for pub in publications:
      assert pub.base_version == FULL, "a learner recovers from full copies only"
      self.align(pub)
    if opt_state is not None:
      self.opt_state = self.island.put(opt_state)
    else:
      clean = lambda x: (jnp.where(jnp.isfinite(x), x, 0)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x)
      self.opt_state = jax.tree.map(clean, self.opt_state)

  def state(self) -> dict:
    s = {"params": self.params, "opt_state": self.opt_state, "base": self.base,
         "base_version": self.base_version, "c_steps": self.c_steps,
         "c_tokens": self.c_tokens, "step": np.int64(self.step)}
    if self.residual is not None:
      s["residual"] = self.residual
    return s

  def load_state(self, s: dict) -> None:
    self.params, self.opt_state, self.base = s["params"], s["opt_state"], list(s["base"])
    self.base = [list(b) for b in self.base]
    self.base_version = np.asarray(s["base_version"]).copy()
    self.c_steps = np.asarray(s["c_steps"]).copy()
    self.c_tokens = np.asarray(s["c_tokens"]).copy()
    self.step = int(s["step"])
    if self.residual is not None:
      self.residual = [list(r) for r in s["residual"]]
