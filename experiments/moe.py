"""A mixture-of-experts Llama decoder on bytes, at experiments/llama.py's active parameters.

The `lm_bytes` task with `model.name=moe`: llama.py's model (2 layers, width
128, 4 query heads sharing 2 key/value heads, untied embeddings) whose MLPs
are 8 SwiGLU experts 192 wide, 2 per token: a token meets 2 x 192 = 384 MLP
units, as in llama.py's dense MLP, so only the router (128 x 8 per block) is
active on top. Capacity factor 1.25, load-balance weight 0.01, router z-loss
weight 0.001 (models/moe.py). The variant picks the method (experiments/methods.py):

  python -m decoupled_diloco.main --config=experiments/moe.py:decoupled --workdir=/tmp/moe
  python -m launch.local --config=experiments/moe.py:decoupled --workdir=/tmp/moe_real

Variants: `data_parallel`, `diloco`, `streaming`, `decoupled` (default).
"""

from experiments import llama


def get_config(arg: str | None = None):
  c = llama.get_config(arg)
  c.model.update(name="moe", mlp_dim=192, num_experts=8, experts_per_token=2,
                 capacity_factor=1.25, shared_expert=False, load_balance_weight=0.01,
                 router_z_weight=0.001)
  return c
