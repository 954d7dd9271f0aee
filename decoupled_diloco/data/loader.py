"""Deterministic, sharded, resumable batch iterators over a flat token array.

Each consumer (a learner, or the single data-parallel replica) owns a disjoint
contiguous shard of the training tokens. Batches are windows at positions drawn
from a per-shard PRNG keyed by (seed, shard, step), so the whole iterator state
is one integer: the number of batches taken. That integer goes in checkpoints.
"""

import numpy as np


class ShardIterator:
  """Yields [batch, seq_len + 1] token windows from one shard, reproducibly."""

  def __init__(self, tokens: np.ndarray, *, shard: int, num_shards: int,
               batch_size: int, seq_len: int, seed: int, position: int = 0):
    if not 0 <= shard < num_shards:
      raise ValueError(f"shard={shard} must be in [0, {num_shards}).")
    size = len(tokens) // num_shards
    if size < seq_len + 1:
      raise ValueError(
          f"model.seq_len={seq_len} is longer than a data shard ({size} tokens"
          f" = {len(tokens)} train tokens / {num_shards} shards); use a shorter"
          " sequence, fewer learners or more data.")
    self.tokens = tokens[shard * size:(shard + 1) * size]
    self.shard, self.batch_size, self.seq_len = shard, batch_size, seq_len
    self.seed = seed
    self.position = position  # Batches taken so far: the whole iterator state.

  def _starts(self, position: int) -> np.ndarray:
    rng = np.random.default_rng((self.seed, self.shard, position))
    return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    starts = self._starts(self.position)
    self.position += 1
    offsets = np.arange(self.seq_len + 1)
    return np.asarray(self.tokens[starts[:, None] + offsets[None, :]], dtype=np.int32)


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                 num_batches: int) -> list[np.ndarray]:
  """A fixed set of evenly spaced, non-overlapping windows from the eval split."""
  need = seq_len + 1
  total = min(batch_size * num_batches, len(tokens) // need)
  if total == 0:
    raise ValueError(f"model.seq_len={seq_len} is longer than the eval split"
                     f" ({len(tokens)} tokens).")
  stride = len(tokens) // total
  starts = np.arange(total) * stride
  windows = np.asarray(tokens[starts[:, None] + np.arange(need)[None, :]], dtype=np.int32)
  return [windows[i:i + batch_size] for i in range(0, total - batch_size + 1, batch_size)] \
      or [windows]
