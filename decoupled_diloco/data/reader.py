"""Every task's training batches through grain, and its fixed held-out batches.

A task's examples are a random-access source (`__len__`, `__getitem__`): the
token windows of a corpus or of a prepared dataset (`TokenWindows`), or images
(tasks/digits.py). `train_source` deals them to M learners by `data.sharding`:

  random      (the default) each epoch is a permutation of all the examples,
              seeded by the run's seed, dealt round-robin: learner m takes the
              permutation's positions m, m + M, m + 2M, ... So the M shards are
              disjoint, their union is the training split, every epoch, and
              each shard is spread over the whole corpus.
  contiguous  learner m takes the m-th contiguous block of the examples (of the
              corpus, for text: the non-IID ablation), reshuffled every epoch.

A batch is `batch_size` consecutive examples of a learner's order. Its state is
grain's iterator state (`{"next_index": batches taken}`): checkpoints carry it,
so a resumed learner goes on from the exact next batch. Nothing is read ahead
(grain's prefetch threads are off): a batch is read when it is asked for.
"""

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

SHARDINGS = ("random", "contiguous")
_NO_READ_AHEAD = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class TokenWindows:
  """Training examples of `seq_len + 1` tokens from a list of flat token arrays (shards).

  Window i of a shard starts at token i * seq_len: consecutive windows share
  one token (the last target of one is the first input of the next), so every
  token of a shard but its first is predicted once per epoch. No window
  crosses from one shard into the next. Arrays may be memory-mapped: a window
  reads its own `seq_len + 1` tokens, nothing more.
  """

  def __init__(self, shards: Sequence[np.ndarray], seq_len: int):
    self.shards, self.seq_len = list(shards), seq_len
    counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
    self._first = np.cumsum([0] + counts)  # Index of each shard's first window.

  def __len__(self) -> int:
    return int(self._first[-1])

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < len(self):
      raise IndexError(f"window {i} of {len(self)}")
    s = int(np.searchsorted(self._first, i, side="right")) - 1
    start = (i - int(self._first[s])) * self.seq_len
    return {"tokens": np.asarray(self.shards[s][start:start + self.seq_len + 1], np.int32)}


def _order(num_examples: int, shard: int, num_shards: int, seed: int,
           sharding: str) -> grain.MapDataset:
  """Indices of shard `shard`'s examples in one epoch's order (repeated: one order per epoch)."""
  if sharding == "random":
    return grain.MapDataset.range(num_examples).shuffle(seed=seed).slice(
        slice(shard, None, num_shards))
  lo, hi = shard * num_examples // num_shards, (shard + 1) * num_examples // num_shards
  return grain.MapDataset.range(lo, hi).shuffle(seed=seed)


class Source:
  """A learner's endless batches (a grain iterator) and their JSON state (tasks/base.py)."""

  def __init__(self, dataset: grain.MapDataset):
    self._iter = iter(dataset.to_iter_dataset(_NO_READ_AHEAD))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iter)

  def get_state(self) -> dict:
    return {"next_index": int(self._iter.get_state()["next_index"])}

  def set_state(self, state: dict) -> None:
    taken = state.get("next_index", state.get("position"))  # `position`: before grain.
    if not isinstance(taken, int) or taken < 0 or len(state) != 1:
      raise ValueError(f"A data state is {{'next_index': batches taken >= 0}}, not {state}.")
    self._iter.set_state({"next_index": taken})


def train_source(examples, *, shard: int, num_shards: int, batch_size: int, seed: int,
                 sharding: str = "random", what: str = "data",
                 augment: Callable[[Any, np.random.Generator], Any] | None = None) -> Source:
  """Learner `shard` of `num_shards`' batches of `examples` (module docstring).

  Args:
    examples: random access to the training examples (dicts of arrays).
    shard: this learner's index, in [0, num_shards).
    num_shards: how many learners share the examples.
    batch_size: examples per batch.
    seed: the run's seed (the same on every learner: the permutation is shared).
    sharding: `random` or `contiguous`.
    what: names the examples in errors (e.g. "model.seq_len=256 windows of data.path=...").
    augment: `augment(example, rng)`, a random transform with an rng keyed by the
      seed and the example's position in the learner's order (the same on resume).

  Raises:
    ValueError: naming `what` when a shard holds fewer examples than a batch.
  """
  if sharding not in SHARDINGS:
    raise ValueError(f"data.sharding={sharding!r} must be one of {SHARDINGS}.")
  if not 0 <= shard < num_shards:
    raise ValueError(f"shard={shard} must be in [0, {num_shards}).")
  order = _order(len(examples), shard, num_shards, seed, sharding)
  if len(order) < batch_size:
    raise ValueError(
        f"{what}: a learner's shard holds {len(order)} examples ({len(examples)} in all /"
        f" {num_shards} shards), fewer than a batch of {batch_size}; use more data, fewer"
        " learners or a smaller batch.")
  dataset = order.repeat().map(examples.__getitem__)
  if augment is not None:
    dataset = dataset.random_map(augment, seed=seed + shard)
  return Source(dataset.batch(batch_size, drop_remainder=True))


def eval_batches(examples, *, batch_size: int, num_batches: int, what: str = "data") -> list:
  """Fixed held-out batches: `batch_size * num_batches` examples evenly spaced over
  `examples` (all of them if fewer; then as many full batches as they make, at least one)."""
  total = min(batch_size * num_batches, len(examples))
  if total == 0:
    raise ValueError(f"{what}: the held-out split has no examples.")
  picked = np.arange(total) * (len(examples) // total)
  stacked = grain.MapDataset.source([examples[int(i)] for i in picked]).batch(
      min(batch_size, total), drop_remainder=True)
  return [stacked[i] for i in range(len(stacked))]
