"""A learner restarted with a fresh inner optimizer warms its learning rate up again."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decoupled_diloco import config as config_lib
from decoupled_diloco import optim
from tests.helpers import assert_trees_equal, make_team


def test_restart_rewarms_the_learning_rate_from_the_global_step_by_hand():
  # No weight decay and a gradient under the clip: a fresh Adam fed a constant
  # gradient g steps by exactly g / (|g| + eps) each step (its bias-corrected
  # moments are g and g^2), so the update is -lr * that, lr the schedule at the
  # global step times the re-warmup (k + 1) / R.
  c = config_lib.InnerOptConfig(lr=1e-2, warmup_steps=10, weight_decay=0.0)
  total, at, rewarmup = 100, 40, 4
  tx = optim.inner_optimizer(c, total)
  schedule = optim.inner_schedule(c, total)
  g = {"w": jnp.array([0.3, -0.02, 1e-4], jnp.float32)}
  state = optim.restart_state(tx, {"w": jnp.zeros(3)}, schedule_step=at, rewarmup_steps=rewarmup)
  direction = g["w"] / (jnp.abs(g["w"]) + 1e-8)
  for k in range(rewarmup + 2):
    updates, state = tx.update(g, state, {"w": jnp.zeros(3)})
    lr = schedule(at + k) * min(1.0, (k + 1) / rewarmup)
    np.testing.assert_allclose(updates["w"], -lr * direction, rtol=1e-6)


def test_without_a_restart_the_inner_optimizer_is_plain_adamw():
  # Bitwise, jitted: the factor scales the scalar learning rate (by exactly 1 here),
  # so the elementwise update is the same computation as optax.adamw's.
  c = config_lib.InnerOptConfig()
  schedule = optim.inner_schedule(c, 50)
  plain = optax.chain(optax.clip_by_global_norm(c.clip_norm),
                      optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))
  tx = optim.inner_optimizer(c, 50)

  def train(tx):
    params = {"w": jnp.linspace(-1, 1, 256), "b": jnp.zeros(3)}
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    for key in jax.random.split(jax.random.key(0), 40):
      grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape), params)
      params, state = step(params, state, grads)
    return params

  assert_trees_equal(train(plain), train(tx))


def test_a_rejoined_learners_first_inner_step_takes_the_rewarmup_learning_rate():
  team = make_team(steps=40, **{"chaos.rewarmup_steps": 4})
  for _ in range(12):
    team.inner_step(1)
  team.restart(1, fresh_optimizer=True, schedule_step=12)
  learner, step = team.learners[1], team.inner_steps[1]
  rewarmup = lambda s: (int(s[1][-1].since_restart), int(s[1][-1].rewarmup))
  assert rewarmup(learner.opt_state) == (0, 4)
  batch = jax.device_put(next(team.data[1]), learner.island.batch)
  put = lambda tree: learner.island.put(jax.tree.map(jnp.copy, tree))

  def first_update(opt_state):
    params, _, _ = step(put(learner.params), put(opt_state), batch)
    return jax.tree.map(lambda new, old: np.asarray(new - old), params, learner.params)

  # The same step at the full schedule value (the state as it was before the re-warmup)
  # must move every parameter 4x as far: up to float32 rounding of the update (1e-5) and
  # of the parameter it is added to (an ulp of its magnitude).
  clip, (adam, decay, schedule) = learner.opt_state
  warm = (clip, (adam, decay, schedule._replace(rewarmup=jnp.int32(0))))
  for a, b, theta in zip(jax.tree.leaves(first_update(learner.opt_state)),
                         jax.tree.leaves(first_update(warm)), jax.tree.leaves(learner.params)):
    ulp = np.spacing(np.abs(np.asarray(theta)) + np.abs(b))
    assert np.all(np.abs(a - b / 4) <= 1e-5 * np.abs(b) + ulp)
    assert np.abs(b).max() > 0
  team.inner_step(1)
  assert rewarmup(learner.opt_state) == (1, 4)
  # The optimistic ablation keeps a warm state: no re-warmup.
  team.inner_step(0)
  team.restart(0, fresh_optimizer=False)
  assert rewarmup(team.learners[0].opt_state) == (0, 0)
