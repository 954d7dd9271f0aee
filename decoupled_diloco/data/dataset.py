"""A prepared token dataset: a directory of memory-mapped shards and a manifest.

`python -m decoupled_diloco.data.prepare` writes it; readers open it here:

  DIR/manifest.json     what is below, with counts and sha256s (written last)
  DIR/tokenizer.json    the HF `tokenizers` file; absent for the bytes tokenizer
  DIR/train-00000.npy   flat 1-D token arrays (`np.save`), read with mmap
  DIR/eval-00000.npy

Each split is its documents' tokens, each document followed by `eos_id` (when
not null), in input order; shard i of both splits comes from the same slice of
the input, so shards of one split may be empty but a split as a whole is not.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np

from decoupled_diloco import workdir

FORMAT = "decoupled_diloco.tokens/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
DTYPES = ("uint8", "uint16", "uint32")
BYTES_SHA256 = hashlib.sha256(b"bytes").hexdigest()  # The "tokenizer file" of raw bytes.


def sha256_file(path: str) -> str:
  """Hex sha256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def write_json(path: str, value: dict) -> None:
  """Writes JSON (sorted keys, indent 1) atomically (workdir.write_atomically)."""
  workdir.write_atomically(path, json.dumps(value, sort_keys=True, indent=1) + "\n")


def write_manifest(path: str, manifest: dict) -> None:
  """Writes DIR/manifest.json atomically."""
  write_json(os.path.join(path, MANIFEST), manifest)


def is_dataset(path: str) -> bool:
  """Whether `path` is a directory holding a manifest.json."""
  return os.path.isfile(os.path.join(path, MANIFEST))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An opened dataset directory; `manifest` is manifest.json as written."""
  path: str
  manifest: dict

  @property
  def vocab_size(self) -> int:
    return self.manifest["tokenizer"]["vocab_size"]

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.manifest["dtype"])

  @property
  def tokenizer_sha256(self) -> str:
    return self.manifest["tokenizer"]["sha256"]

  @property
  def eos_id(self) -> int | None:
    return self.manifest["tokenizer"]["eos_id"]

  def bytes_per_token(self, split: str) -> float:
    """UTF-8 bytes of text per token of `split` (tokens include eos)."""
    return self.manifest["splits"][split]["bytes_per_token"]

  def shards(self, split: str) -> list[np.ndarray]:
    """The shards of `split`, in order, memory-mapped read-only."""
    return [np.load(os.path.join(self.path, s["file"]), mmap_mode="r")
            for s in self.manifest["splits"][split]["shards"]]

  def tokenizer(self):
    """The HF `tokenizers.Tokenizer`, or None for the bytes tokenizer."""
    name = self.manifest["tokenizer"]["file"]
    if name is None:
      return None
    import tokenizers  # pylint: disable=g-import-not-at-top  # Only readers of text need it.
    return tokenizers.Tokenizer.from_file(os.path.join(self.path, name))


def _check_shard(path: str, shard: dict, dtype: str, verify: bool) -> None:
  """Raises ValueError unless the .npy at `path` is a 1-D `dtype` array of the recorded length."""
  file = os.path.join(path, shard["file"])
  try:
    tokens = np.load(file, mmap_mode="r")  # Reads the header and maps; no token is read.
  except FileNotFoundError:
    raise ValueError(f"{file}: missing (listed in {MANIFEST}).") from None
  except (ValueError, OSError, EOFError) as e:  # Not an .npy, or cut short.
    raise ValueError(f"{file}: not a readable .npy shard ({e}).") from None
  if tokens.ndim != 1 or tokens.dtype != np.dtype(dtype) or len(tokens) != shard["tokens"]:
    raise ValueError(f"{file}: holds {tokens.dtype} {tokens.shape}, but {MANIFEST} says"
                     f" {dtype} ({shard['tokens']},).")
  if verify and sha256_file(file) != shard["sha256"]:
    raise ValueError(f"{file}: sha256 differs from {MANIFEST} (the shard is corrupted).")


def open_dataset(path: str, verify: bool = False) -> Dataset:
  """Opens a dataset directory, checking every shard's header against the manifest.

  Args:
    path: the directory `prepare` wrote.
    verify: also check the sha256 of every shard and of the tokenizer (reads them all).

  Raises:
    ValueError: one line naming the file and what is wrong with it.
  """
  file = os.path.join(path, MANIFEST)
  try:
    with open(file) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{file}: missing; {path!r} is not a prepared dataset (run"
                     " `python -m decoupled_diloco.data.prepare`).") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{file}: not readable JSON ({e}).") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    got = manifest.get("format") if isinstance(manifest, dict) else manifest
    raise ValueError(f"{file}: format is {got!r}, expected {FORMAT!r}.")
  try:
    _check(path, manifest, verify)
  except (KeyError, TypeError) as e:  # A field missing, or of the wrong type.
    raise ValueError(f"{file}: malformed ({type(e).__name__}: {e}).") from None
  return Dataset(path, manifest)


def _check(path: str, manifest: dict, verify: bool) -> None:
  """Raises ValueError at the first file that contradicts `manifest`."""
  file = os.path.join(path, MANIFEST)
  if manifest["dtype"] not in DTYPES:
    raise ValueError(f"{file}: dtype {manifest['dtype']!r} is not one of {DTYPES}.")
  for split in SPLITS:
    info = manifest["splits"][split]
    if info["tokens"] <= 0 or info["tokens"] != sum(s["tokens"] for s in info["shards"]):
      raise ValueError(f"{file}: the {split} split's tokens ({info['tokens']}) are not the"
                       " positive sum of its shards' tokens.")
    for shard in info["shards"]:
      _check_shard(path, shard, manifest["dtype"], verify)
  tokenizer = manifest["tokenizer"]
  if tokenizer["file"] is None:
    if tokenizer["sha256"] != BYTES_SHA256:
      raise ValueError(f"{file}: a tokenizer without a file must be bytes (sha256 of 'bytes').")
  else:
    tokenizer_file = os.path.join(path, tokenizer["file"])
    if not os.path.isfile(tokenizer_file):
      raise ValueError(f"{tokenizer_file}: missing (listed in {MANIFEST}).")
    if verify and sha256_file(tokenizer_file) != tokenizer["sha256"]:
      raise ValueError(f"{tokenizer_file}: sha256 differs from {MANIFEST}.")
