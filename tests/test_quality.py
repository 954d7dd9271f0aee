"""DiLoCo trains almost as well as data-parallel, and a broken outer step shows.

CI-sized (the experiments' configs with a one-layer, 64-wide model over
64-byte windows: 300 steps of 32 sequences, 0.6M tokens of the tests' corpus,
4 learners, H = 5 and experiments/diloco.py's outer loop): DiLoCo's eval loss
must be within 25% of data-parallel's at the same tokens and global batch, and
the same check must catch a deliberately broken outer step: a no-op leaves the
evaluated global model exactly at its init, a flipped pseudo-gradient sign
pushes it above its init, to at least twice DiLoCo's loss.
"""

import optax
import pytest

from decoupled_diloco import divergence, optim, train
from experiments import data_parallel, diloco
from tests.helpers import CORPUS, count_model_eval_loss, initial_eval_loss


def small(config):
  """`config` with the one-layer model (the experiments' `tiny` takes four times as long)."""
  config.data.path = CORPUS
  config.model.update(num_layers=1, d_model=64, num_heads=2, mlp_dim=256, seq_len=64)
  return config


def final_loss(config, workdir, steps=None) -> float:
  small(config)
  config.train.update(eval_every=0, checkpoint_every=0)
  if steps is not None:
    config.train.steps = steps
  try:
    return train.train_and_evaluate(config, str(workdir))["final_eval_loss"]
  except divergence.DivergenceError:
    return float("inf")  # Diverged (non-finite, or a loss spike stopped it).


@pytest.mark.slow
@pytest.mark.usefixtures("optimized")  # 600 steps: running them outweighs compiling.
def test_diloco_is_within_25_percent_of_data_parallel_and_catches_broken_outer_steps(
    tmp_path, monkeypatch):
  dp = final_loss(data_parallel.get_config(), tmp_path / "dp")
  ok = final_loss(diloco.get_config(), tmp_path / "diloco")
  # Data-parallel itself learned more than byte pairs: it beats the train split's
  # byte-pair frequencies on the same eval windows (2.88 nats).
  assert dp < count_model_eval_loss(small(data_parallel.get_config()), context=1), dp
  assert ok <= 1.25 * dp, (ok, dp)  # About 2.69 and 2.78.
  at_init = initial_eval_loss(small(diloco.get_config()))

  real = optim.outer_optimizer
  broken = {
      "no-op": lambda c: optax.set_to_zero(),
      "flipped": lambda c: optax.chain(optax.scale(-1.0), real(c)),
  }
  for name, factory in broken.items():
    monkeypatch.setattr(optim, "outer_optimizer", factory)
    c = diloco.get_config()
    # Two rounds show either break, at a thirtieth of the cost: a no-op outer step leaves
    # the global model (what is evaluated) at its init, so its loss after two rounds is
    # the one after sixty; a flipped one has already pushed it above the loss of its init.
    bad = final_loss(c, tmp_path / name, 2 * c.diloco.sync_every)
    if name == "no-op":
      assert bad == at_init, (bad, at_init)
    else:
      assert bad > at_init and bad >= 2 * ok, (bad, at_init, ok)  # About 6.1; init 5.6.
    assert bad > 1.25 * dp  # The same check would have failed it.
