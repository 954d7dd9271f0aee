"""A Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) on bytes.

The `lm_bytes` task with `model.name=llama`: 2 layers, width 128, 4 query
heads sharing 2 key/value heads, the same 1.2M training tokens as the GPT
quickstart. The variant picks the method (experiments/methods.py):

  python -m decoupled_diloco.main --config=experiments/llama.py:decoupled --workdir=/tmp/llama
  python -m launch.local --config=experiments/llama.py:decoupled --workdir=/tmp/llama_real

Variants: `data_parallel`, `diloco`, `streaming`, `decoupled` (default).
"""

from decoupled_diloco import config as config_lib
from experiments import methods


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.model.update(name="llama", num_layers=2, d_model=128, num_heads=4, num_kv_heads=2,
                 mlp_dim=384, seq_len=128, tie_embeddings=False, qk_norm=False)
  methods.use_method(c, arg or "decoupled")
  return c
