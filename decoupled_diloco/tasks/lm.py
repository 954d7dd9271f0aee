"""`lm_bytes`: next-token prediction on a token corpus (data/corpus.py): `gpt`, `llama`, `moe`.

Batches are {"tokens": [B, L+1] int32} windows (data/reader.py); the unit is
the token (L per row), the loss the mean next-token cross-entropy in nats, and
the eval metrics add bits per byte of text (nats per token / (ln 2 x the
held-out split's bytes per token): the same scale for a byte-level and a
subword tokenizer; bits per token where the bytes are unknown) and perplexity.
A model that returns (logits, aux losses) (`moe`) adds its weighted
load-balance and z-losses to the loss and reports the cross-entropy apart
(`cross_entropy`, which the eval metrics are computed from).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoupled_diloco.config import Config, ModelConfig
from decoupled_diloco.data import corpus as corpus_lib
from decoupled_diloco.data import reader
from decoupled_diloco.models import llama, moe, transformer
from decoupled_diloco.tasks import base, register

# Model name -> (module class, init_params(c, rng), param_axes(c)). A module maps tokens to
# logits, or to (logits, {name: scalar}) with `load_balance_loss` and `router_z_loss` (moe).
MODELS = {
    "gpt": (transformer.Transformer, transformer.init_params, transformer.param_axes),
    "llama": (llama.Llama, llama.init_params, llama.param_axes),
    "moe": (moe.Moe, moe.init_params, moe.param_axes),
}


def model_config(c: ModelConfig) -> ModelConfig:
  """`c` with `num_kv_heads` resolved for llama (0 means one per query head)."""
  return dataclasses.replace(c, num_kv_heads=c.num_kv_heads or c.num_heads)


@functools.cache
def load_corpus(path: str, eval_percent: float) -> corpus_lib.Corpus:
  """One read per process of a corpus (its arrays are never written)."""
  return corpus_lib.load(path, eval_percent)


class LanguageModel:
  """A byte-level (or pre-tokenized) language model; see module docstring."""

  name, unit = "lm_bytes", "tokens"

  def __init__(self, cfg: Config, corpus: corpus_lib.Corpus | None = None):
    c = cfg.model
    if c.name not in MODELS:
      raise ValueError(f"model.name={c.name!r} is not a model of task lm_bytes; choose from"
                       f" {sorted(MODELS)}.")
    self._corpus, self._data = corpus, cfg.data
    module, self._init, self._axes = MODELS[c.name]
    self.c = model_config(c)
    self.model: nn.Module = module(self.c)
    self.seq_len = c.seq_len
    self.chance_loss = math.log(c.vocab_size)

  @property
  def corpus(self) -> corpus_lib.Corpus:
    """The data, read on first use (a config is checked, and its memory, before any data)."""
    if self._corpus is None:
      corpus = load_corpus(self._data.path, self._data.eval_percent)
      if corpus.vocab_size > self.c.vocab_size:
        raise ValueError(f"model.vocab_size={self.c.vocab_size} is smaller than the"
                         f" data's vocabulary ({corpus.vocab_size}).")
      self._corpus = corpus
    return self._corpus

  @property
  def data_id(self) -> str:
    """The sha256 of the tokenizer that made the tokens (base.Task's optional `data_id`),
    read before the data (a run is refused before any data is loaded)."""
    if self._corpus is not None:
      return self._corpus.tokenizer_id
    return corpus_lib.tokenizer_id(self._data.path)

  @property
  def tokenizer_file(self) -> str | None:
    """A prepared dataset's tokenizer.json (train.py copies it into the workdir), or None."""
    return self.corpus.tokenizer_file

  @property
  def description(self) -> str:
    return f"{self.c.name} on {self.corpus.description}"

  def batch_spec(self, batch_size: int) -> dict:
    return {"tokens": jax.ShapeDtypeStruct((batch_size, self.seq_len + 1), jnp.int32)}

  def init(self, rng):
    return self._init(self.c, rng)

  def loss(self, params, batch):
    """Mean next-token cross-entropy (nats) of [B, L+1] token windows, plus any aux losses.

    For a model with aux losses (moe): cross-entropy + load_balance_weight *
    load_balance_loss + router_z_weight * router_z_loss, with the cross-entropy
    and the model's aux scalars as metrics.
    """
    tokens_BxL1 = batch["tokens"]
    x_BxL, y_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    out = self.model.apply({"params": params}, x_BxL)
    logits_BxLxV, aux = out if isinstance(out, tuple) else (out, None)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV)
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, y_BxL[..., None], axis=-1)[..., 0]
    cross_entropy = nll_BxL.mean()
    if aux is None:
      return cross_entropy, {}
    loss = (cross_entropy + self.c.load_balance_weight * aux["load_balance_loss"]
            + self.c.router_z_weight * aux["router_z_loss"])
    return loss, {"cross_entropy": cross_entropy, **aux}

  def update_local(self, params, aux):
    """moe with `model.router_bias_rate`: each block's router_bias (a learner's own, never
    merged) moves by the rate toward the experts below 1/E of the assignments, away from
    those above (the sign of the gap), after every inner step; others: unchanged."""
    rate = self.c.router_bias_rate if self.c.name == "moe" else 0.0
    if not rate:
      return params
    params = dict(params)
    for i, load_E in enumerate(aux["_expert_load"]):
      block = dict(params[f"block_{i}"])
      mlp = dict(block["mlp"])
      mlp["router_bias"] = mlp["router_bias"] + rate * jnp.sign(1 / load_E.shape[0] - load_E)
      block["mlp"], params[f"block_{i}"] = mlp, block
    return params

  def routing(self, params, batch) -> dict | None:
    """The routers' {"probs", "choices"} on `batch` (routing.py's shapes); None: no routers."""
    if self.c.name != "moe":
      return None
    return moe.routing(self.c, params, batch["tokens"][:, :-1])

  def num_units(self, batch) -> int:
    rows, width = batch["tokens"].shape
    return rows * (width - 1)

  def eval_metrics(self, means: dict) -> dict:
    # Bits and perplexity measure the prediction alone: the cross-entropy, not the aux losses.
    loss = means["cross_entropy"] if "cross_entropy" in means else means["loss"]
    per_token = self.corpus.bytes_per_token
    bits = ({"bits_per_byte": loss / (math.log(2) * per_token)} if per_token
            else {"bits_per_token": loss / math.log(2)})
    return {**bits, "perplexity": math.exp(min(loss, 700.0))}

  def roles(self, flat_params: dict) -> dict:
    return {k: base.role_by_name(k) for k in flat_params}

  def axes(self, flat_params: dict) -> dict:
    return base.axes_by_path(self._axes(self.c), flat_params)

  def _windows(self, split: str) -> tuple[reader.TokenWindows, str]:
    what = f"model.seq_len={self.seq_len} windows of data.path={self._data.path!r} ({split})"
    return reader.TokenWindows(getattr(self.corpus, split), self.seq_len), what

  def train_source(self, shard: int, num_shards: int, batch_size: int, seed: int):
    windows, what = self._windows("train")
    return reader.train_source(windows, shard=shard, num_shards=num_shards,
                               batch_size=batch_size, seed=seed,
                               sharding=self._data.sharding, what=what)

  def eval_batches(self, batch_size: int, num_batches: int) -> list:
    windows, what = self._windows("eval")
    return reader.eval_batches(windows, batch_size=batch_size, num_batches=num_batches,
                               what=what)


register("lm_bytes")(LanguageModel)
