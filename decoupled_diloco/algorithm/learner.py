"""A learner: local inner steps on its island, pseudo-gradients out, fragments in.

Per fragment p the learner keeps the base Theta_p it last aligned to (and that
base's version), counters of steps and tokens since then, and, with error
feedback, the residual its codec has not yet sent (Decoupled DiLoCo,
https://arxiv.org/abs/2604.21428; Streaming DiLoCo, https://arxiv.org/abs/2501.18512).
It knows nothing of time or transport: a runtime calls `inner_step`,
`snapshot` and `align` in whatever order its clock dictates.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from decoupled_diloco.algorithm import codecs
from decoupled_diloco.algorithm.fragments import flatten, unflatten
from decoupled_diloco.algorithm.messages import Contribution, Publication


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_delta(codec, base, theta, residual):
  """delta = base - theta, encoded; with a residual, error feedback."""
  delta = [b.astype(jnp.float32) - t.astype(jnp.float32) for b, t in zip(base, theta)]
  if residual is None:
    return codecs.encode_tree(codec, delta), None
  payload, state = codecs.encode_tree_with_feedback(
      codec, delta, codecs.ErrorFeedbackState(residual))
  return payload, state.residual


@functools.partial(jax.jit, static_argnums=(0, 3))
def _align(codec, theta, payload, alpha):
  """Returns (theta', base'): theta' = alpha*theta + (1-alpha)*Theta; base' = Theta."""
  glob = codecs.decode_tree(codec, list(payload), theta)
  new_theta = [(alpha * t + (1 - alpha) * g).astype(t.dtype) if alpha else g + jnp.zeros_like(t)
               for t, g in zip(theta, glob)]
  return new_theta, glob


class Learner:
  """One learner's state on its island; see module docstring."""

  def __init__(self, index: int, island, inner_step, params, opt_state,
               fragments: tuple[tuple[str, ...], ...], *, alpha: float,
               up: codecs.Codec, down: codecs.Codec, error_feedback: bool,
               tokens_per_step: int):
    self.index, self.island = index, island
    self._inner_step = inner_step
    self.params = island.put(params)
    self.opt_state = island.put(opt_state)
    self.fragments = fragments
    self.alpha, self.up, self.down = alpha, up, down
    self.tokens_per_step = tokens_per_step
    flat = flatten(params)
    num = len(fragments)
    self.base = [island.put([flat[k] for k in f]) for f in fragments]
    self.base_version = np.zeros(num, np.int64)
    self.c_steps = np.zeros(num, np.int64)
    self.c_tokens = np.zeros(num, np.int64)
    self.residual = ([island.put([jnp.zeros(np.shape(flat[k]), jnp.float32) for k in f])
                      for f in fragments] if error_feedback else None)
    self.step = 0

  def inner_step(self, batch):
    """One local optimizer step on `batch` (already on the island); returns the loss."""
    self.params, self.opt_state, loss = self._inner_step(self.params, self.opt_state, batch)
    self.step += 1
    self.c_steps += 1
    self.c_tokens += self.tokens_per_step
    return loss

  def fragment_tensors(self, p: int) -> list:
    flat = flatten(self.params)
    return [flat[k] for k in self.fragments[p]]

  def snapshot(self, p: int) -> Contribution:
    """The encoded pseudo-gradient `base_p - theta_p` with its metadata."""
    residual = None if self.residual is None else self.residual[p]
    payload, residual = _encode_delta(self.up, self.base[p], self.fragment_tensors(p), residual)
    if self.residual is not None:
      self.residual[p] = residual
    return Contribution(self.index, p, int(self.base_version[p]), int(self.c_steps[p]),
                        int(self.c_tokens[p]), tuple(payload), codecs.payload_nbytes(payload))

  def align(self, pub: Publication) -> None:
    """theta_p <- alpha*theta_p + (1-alpha)*Theta_p; rebase; reset p's counters.

    The inner optimizer state is kept (DiLoCo keeps it across outer steps).
    """
    payload = jax.device_put(pub.payload, self.island.replicated)
    theta, base = _align(self.down, self.fragment_tensors(pub.fragment), payload, self.alpha)
    theta = jax.device_put(theta, [self.island.param_sharding(t) for t in theta])
    flat = flatten(self.params)
    flat.update(zip(self.fragments[pub.fragment], theta))
    self.params = unflatten(flat)
    self.base[pub.fragment] = base
    self.base_version[pub.fragment] = pub.version
    self.c_steps[pub.fragment] = 0
    self.c_tokens[pub.fragment] = 0

  def recover(self, publications) -> None:
    """Restarts a diverged learner from the global model.

    Its parameters become the published fragments; non-finite entries of its
    inner optimizer state (Adam's moments, once a NaN got in) and of its
    error-feedback residuals become zeros, so the next step and send are
    finite again; step counts and the schedule are kept.
    """
    for pub in publications:
      self.align(pub)
    clean = lambda x: (jnp.where(jnp.isfinite(x), x, 0)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x)
    self.opt_state = jax.tree.map(clean, self.opt_state)
    if self.residual is not None:
      self.residual = jax.tree.map(clean, self.residual)

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
