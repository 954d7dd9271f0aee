"""A small vision transformer on scikit-learn's 8x8 digits (1,797 images, no download).

The `digits_vit` task: 2 layers, width 64, 4x4 patches (4 tokens), mean pool,
learned positions; batches of 64 images shifted by up to a pixel; top-1
accuracy on a fixed held-out fifth (359 images). The variant picks the
method (experiments/methods.py):

  python -m decoupled_diloco.main --config=experiments/digits_vit.py:data_parallel --workdir=/tmp/vit
  python -m launch.local --config=experiments/digits_vit.py:decoupled --workdir=/tmp/vit_real

Variants: `data_parallel`, `diloco`, `streaming`, `decoupled` (default).
"""

from decoupled_diloco import config as config_lib
from experiments import methods


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.task.name = "digits_vit"
  c.model.update(name="vit", num_layers=2, d_model=64, num_heads=4, mlp_dim=128, patch_size=4,
                 pool="mean", posemb="learned")
  c.data.batch_size = 64
  c.train.update(steps=300, eval_every=100, checkpoint_every=100)
  c.inner.update(lr=3e-3, warmup_steps=10)
  methods.use_method(c, arg or "decoupled")
  return c
