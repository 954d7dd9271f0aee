"""A runtime's routing diagnostics over training (`routing/*`), for a task with routers.

Routers are compared on a fixed probe batch of held-out rows (routing.py has
the measures). Besides what `routing.across_learners` gives at each eval, the
probe follows two moments of the DiLoCo cycle and one of plain training:

  utilisation_entropy_after_merge   the global model's expert-utilisation
      entropy right after each merge (a collapse onto few experts would show
      here first), mean over the merges since the last eval;
  loss_jump_after_alignment   a learner's loss on its first inner step after it
      took a publication minus its loss on the step before (the spike a merge
      causes, on two different batches: average it), mean over the alignments
      since the last eval;
  topk_overlap_since_last_eval   the evaluated model's top-k routing now
      against its routing at the previous eval (the first: its init). In
      data-parallel training this is how far a router moves by itself over
      `train.eval_every` steps, the yardstick for learners' overlap.

Everything it accumulates is in `state()`, so a resumed run reports what an
uninterrupted one does. What it measures between evals stays on the device
until an eval or a checkpoint reads it: a merge or a step never waits for the host.
"""

import jax
import numpy as np

from decoupled_diloco import routing
from decoupled_diloco.tasks.base import Task

PROBE_ROWS = 8  # Held-out rows the routing diagnostics compare routers on.


class RouterProbe:
  """Routing diagnostics of one run; `make` gives None for a task without routers."""

  def __init__(self, route, batch, first: dict, num_learners: int):
    """`route`: the task's jitted `routing`; `first`: its routing of `batch` at init."""
    self._route, self.batch, self.num_learners = route, batch, num_learners
    self.num_experts = first["probs"].shape[-1]
    self.previous = first["choices"]  # At the last eval (at first, the init's).
    self.sums = np.zeros(4)  # Entropy after merges, their count; jumps, their count.
    self.before = [None] * num_learners  # Loss before an alignment not yet stepped.
    self._choices, self._jumps = [], []  # Not yet read back: after merges, after alignments.

  @classmethod
  def make(cls, task: Task, init_params, num_learners: int) -> "RouterProbe | None":
    if getattr(task, "routing", None) is None:
      return None
    batch = task.eval_batches(PROBE_ROWS, 1)[0]
    route = jax.jit(task.routing)
    first = route(init_params, batch)
    return None if first is None else cls(route, batch, jax.device_get(first), num_learners)

  def route(self, params) -> dict | None:
    out = self._route(params, self.batch)
    return None if out is None else jax.device_get(out)

  def merged(self, global_params) -> None:
    """Right after a merge: the global model's routing (its entropy is read at the eval)."""
    self._choices.append(self._route(global_params, self.batch)["choices"])

  def aligned(self, m: int, last_loss) -> None:
    """Learner m took a publication after a step of loss `last_loss` (None: no step yet)."""
    if last_loss is not None and self.before[m] is None:
      self.before[m] = last_loss

  def stepped(self, m: int, loss) -> None:
    """Learner m's inner step of loss `loss`; the first after an alignment counts."""
    if self.before[m] is not None:
      self._jumps.append(loss - self.before[m])
      self.before[m] = None

  def forget(self, m: int) -> None:
    """Learner m restarted from full copies: no jump to measure."""
    self.before[m] = None

  def _read_back(self) -> None:
    """Adds what was measured since the last read to the sums."""
    for choices in jax.device_get(self._choices):
      self.sums[:2] += (routing.utilisation_entropy(choices, self.num_experts), 1)
    jumps = np.asarray(jax.device_get(self._jumps), np.float64)
    self.sums[2:] += (jumps.sum(), jumps.size)
    self._choices, self._jumps = [], []

  def metrics(self, eval_params, learner_params=(), router_weights=()) -> dict:
    """`routing/*` at an eval; the means since the last eval are then reset."""
    self._read_back()
    now = self.route(eval_params)
    out = {"topk_overlap_since_last_eval": routing.topk_overlap(now["choices"], self.previous),
           "utilisation_entropy_global": routing.utilisation_entropy(now["choices"],
                                                                     self.num_experts)}
    self.previous = now["choices"]
    if len(learner_params) > 1:
      routers = [self.route(p) for p in learner_params]
      out.update(routing.across_learners(routers, now, list(router_weights), self.num_experts))
    if self.sums[1]:
      out["utilisation_entropy_after_merge"] = self.sums[0] / self.sums[1]
    if self.sums[3]:
      out["loss_jump_after_alignment"] = self.sums[2] / self.sums[3]
    self.sums[:] = 0
    return {f"routing/{k}": float(v) for k, v in out.items()}

  def state(self) -> dict:
    self._read_back()
    before = [np.nan if b is None else float(b) for b in self.before]
    return {"previous": np.asarray(self.previous), "sums": self.sums.copy(),
            "before": np.array(before, np.float64)}

  def load_state(self, s: dict) -> None:
    self.previous = np.asarray(s["previous"]).copy()
    self.sums = np.asarray(s["sums"], np.float64).copy()
    self._choices, self._jumps = [], []
    self.before = [None if np.isnan(b) else b for b in np.asarray(s["before"]).tolist()]
