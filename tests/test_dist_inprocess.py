"""The real runtime (runtime/dist/) in one process, under fake clocks (tests/dist_harness.py).

Everything the runtime does is reached here without subprocesses: the same
`LearnerRuntime` and `SyncerService` a process runs, on a `memory://`
mailbox, driven in time order by a discrete-event loop.
"""

import jax
import numpy as np
import pytest

from decoupled_diloco import config as config_lib
from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.runtime.lockstep import LockStep
from tests import helpers
from tests.dist_harness import InProcessRun


def _global(run):
  return fragments_lib.flatten(fragments_lib.unflatten(run.syncer.syncer.global_flat()))


def _lockstep_reference(steps, **overrides):
  cfg = config_lib.parse(helpers.tiny_config("lockstep", steps=steps, **overrides))
  ref = LockStep(cfg, helpers.corpus().train)
  for _ in range(cfg.train.steps):
    ref.train_step()
  return ref


_LOCKSTEP = {"diloco.num_learners": 2, "diloco.num_fragments": 2, "diloco.sync_every": 3,
             "diloco.quorum": 0, "diloco.grace_gamma": 0.0, "sim.learners_wait": True}


@pytest.mark.parametrize("overlap", [0, 2])
def test_lockstep_mode_equals_the_lockstep_runtime_bitwise(tmp_path, overlap):
  """K = M, learners wait: the real runtime in-process is lock-step DiLoCo, to the bit."""
  overrides = {**_LOCKSTEP, "diloco.overlap": overlap}
  run = InProcessRun(helpers.tiny_config("decoupled", steps=9, **overrides), tmp_path,
                     helpers.corpus(), [1.0, 1.37])
  run.run()
  ref = _lockstep_reference(9, **overrides)
  expected = fragments_lib.flatten(jax.device_get(ref.eval_params()))  # Merges what was sent.
  assert run.syncer.syncer.version.tolist() == ref.team.syncer.version.tolist()
  got = _global(run)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)
