"""scikit-learn's handwritten digits (1,797 8x8 images): split, examples, batches.

The split and every batch come from numpy's default generator (PCG64) keyed
by small integer tuples, so they are the same on every machine; nothing
depends on scikit-learn's own shuffling. The images ship inside scikit-learn,
so nothing is downloaded.
"""

import dataclasses
import functools

import numpy as np
from sklearn import datasets

from decoupled_diloco.data import reader


@dataclasses.dataclass(frozen=True, eq=False)
class Digits:
  """Images [N, 8, 8, 1] float32 in [0, 1] and labels [N] int32 in 0..9 (read-only)."""
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray


def _read_only(a: np.ndarray) -> np.ndarray:
  a.flags.writeable = False  # Shared by every caller of the cached `load`.
  return a


@functools.cache
def load(seed_split: int = 0, test_fraction: float = 0.2) -> Digits:
  """The digits, split by class: round(test_fraction * count) of each digit held out.

  Args:
    seed_split: seeds the one permutation that decides the split and the
      order of both splits.
    test_fraction: share of each class held out, in (0, 1).

  Returns:
    Both splits in the permuted order, so a contiguous slice of the train
    split is a fair sample of it (`contiguous` sharding deals slices).
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction={test_fraction} must be in (0, 1).")
  bunch = datasets.load_digits()
  x_NxHxWx1 = (bunch.images / 16.0).astype(np.float32)[..., None]
  y_N = bunch.target.astype(np.int32)
  perm_N = np.random.default_rng(seed_split).permutation(len(y_N))
  # Group the permuted examples by class (stably, so each class keeps its
  # permuted order) and hold out the first ones of each class.
  by_class_N = perm_N[np.argsort(y_N[perm_N], kind="stable")]
  counts_K = np.bincount(y_N, minlength=10)
  starts_K = np.cumsum(counts_K) - counts_K
  rank_N = np.arange(len(y_N)) - np.repeat(starts_K, counts_K)
  is_test_N = np.zeros(len(y_N), bool)
  is_test_N[by_class_N] = rank_N < np.repeat(np.round(counts_K * test_fraction), counts_K)
  train_N, test_N = perm_N[~is_test_N[perm_N]], perm_N[is_test_N[perm_N]]
  return Digits(train_x=_read_only(x_NxHxWx1[train_N]), train_y=_read_only(y_N[train_N]),
                test_x=_read_only(x_NxHxWx1[test_N]), test_y=_read_only(y_N[test_N]))


def shift(images_BxHxWx1: np.ndarray, shifts_Bx2: np.ndarray) -> np.ndarray:
  """Moves each image by (dy, dx) in {-1, 0, 1}^2 pixels, filling with zeros.

  Output pixel (i, j) is input pixel (i - dy, j - dx), zero where that falls
  outside the image.
  """
  _, h, w, _ = images_BxHxWx1.shape
  padded = np.pad(images_BxHxWx1, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return np.stack([padded[n, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
                   for n, (dy, dx) in enumerate(shifts_Bx2)])


class Images:
  """The train split's images as examples, {"image": [H, W, 1], "label": []} (random access)."""

  def __init__(self, digits: Digits):
    self.digits = digits

  def __len__(self) -> int:
    return len(self.digits.train_y)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.digits.train_x[i], "label": self.digits.train_y[i]}


def random_shift(example: dict, rng: np.random.Generator) -> dict:
  """The example with its image moved by up to one pixel each way (a grain random map)."""
  moved = shift(example["image"][None], rng.integers(-1, 2, size=(1, 2)))[0]
  return {**example, "image": moved}


def train_source(digits: Digits, *, shard: int, num_shards: int, batch_size: int, seed: int,
                 sharding: str = "random", augment: bool = True) -> reader.Source:
  """Learner `shard`'s batches of the train split (data/reader.py), randomly shifted
  (`augment`) with an rng keyed by the seed and the image's place in the learner's order."""
  return reader.train_source(
      Images(digits), shard=shard, num_shards=num_shards, batch_size=batch_size, seed=seed,
      sharding=sharding, what="the digits' train split",
      augment=random_shift if augment else None)


def eval_batches(digits: Digits, batch_size: int) -> list[dict]:
  """The test split as full batches in a fixed order, without augmentation.

  The len(test) % batch_size examples after the last full batch are dropped
  (never padded), so every batch has the same shape and each example counts once.
  """
  n = len(digits.test_y) // batch_size
  if n == 0:
    raise ValueError(f"batch_size={batch_size} is larger than the digits test split"
                     f" ({len(digits.test_y)} images).")
  return [{"image": digits.test_x[i * batch_size:(i + 1) * batch_size],
           "label": digits.test_y[i * batch_size:(i + 1) * batch_size]} for i in range(n)]
