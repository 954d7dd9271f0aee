"""Token corpora: a prepared dataset, the embedded default, text files, or a token array.

A corpus is two lists of flat token arrays (shards of the train and eval
splits). A prepared dataset's shards (data/prepare.py, data/dataset.py) are
memory-mapped, never read whole; the other kinds are small, read into memory
as bytes. The embedded default is the running Python's own standard-library
source: real text every machine has.
"""

import dataclasses
import glob
import json
import os
import sysconfig
import zlib

import numpy as np

from decoupled_diloco.data import dataset as dataset_lib

EMBEDDED = "embedded"  # `data.path` value that selects the standard-library corpus.


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: tuple[np.ndarray, ...]  # Shards of flat uint8/16/32 tokens.
  eval: tuple[np.ndarray, ...]  # The held-out split's shards (held out by file or document).
  vocab_size: int
  description: str
  bytes_per_token: float | None = 1.0  # Of text, on the held-out split (None: unknown).
  tokenizer_id: str = dataset_lib.BYTES_SHA256  # The sha256 of what turned text into tokens.
  tokenizer_file: str | None = None  # A prepared dataset's tokenizer.json, if any.


def held_out(name: str, eval_percent: float) -> bool:
  """Whether document `name` (a relative path, or `path:line`) is held out: a stable hash."""
  return zlib.crc32(name.encode()) % 10_000 < eval_percent * 100


def _read_files(paths: list[str], root: str, eval_percent: float, what: str) -> Corpus:
  train, evals = [], []
  for path in sorted(paths):
    with open(path, "rb") as f:
      data = f.read()
    if not data:
      continue
    rel = os.path.relpath(path, root)
    (evals if held_out(rel, eval_percent) else train).append(data)
  if not train or not evals:
    raise ValueError(
        f"data.path={what!r}: needs at least one non-empty file in each of the"
        f" train and eval splits (found {len(train)} train, {len(evals)} eval"
        f" files); give more files or change data.eval_percent."
    )
  as_array = lambda chunks: (np.frombuffer(b"".join(chunks), dtype=np.uint8),)
  return Corpus(as_array(train), as_array(evals), 256,
                f"{what}: {len(train)} train / {len(evals)} eval files")


def stdlib_files() -> tuple[list[str], str]:
  """The running interpreter's standard-library `.py` files (no site-packages)."""
  root = sysconfig.get_paths()["stdlib"]
  paths = [
      p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
      if "site-packages" not in p and "dist-packages" not in p
  ]
  return paths, root


def load(path: str, eval_percent: float = 5.0) -> Corpus:
  """Loads a corpus.

  Args:
    path: a prepared dataset's directory (its manifest decides the split);
      `embedded`; a text file, directory or glob; or a `.npy` file of
      uint8/uint16 tokens (memory-mapped, the last `eval_percent` held out).
    eval_percent: share of files (or of tokens, for `.npy`) held out for eval.

  Raises:
    ValueError: naming `data.path` when nothing usable is found.
  """
  if not 0 < eval_percent < 100:
    raise ValueError(f"data.eval_percent={eval_percent} must be in (0, 100).")
  if dataset_lib.is_dataset(path):
    return _prepared(path)
  if path == EMBEDDED:
    paths, root = stdlib_files()
    return _read_files(paths, root, eval_percent, "embedded Python stdlib")
  if path.endswith(".npy"):
    if not os.path.isfile(path):
      raise ValueError(f"data.path={path!r}: no such file.")
    try:
      tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # Not an .npy file, or a damaged one.
      raise ValueError(f"data.path={path!r}: not a readable .npy token file ({e}).") from None
    if tokens.ndim != 1 or tokens.dtype not in (np.uint8, np.uint16):
      raise ValueError(
          f"data.path={path!r}: a pre-tokenized file must be a flat uint8 or"
          f" uint16 array, got shape {tokens.shape} dtype {tokens.dtype}.")
    split = int(len(tokens) * (1 - eval_percent / 100))
    if tokens.dtype == np.uint8:  # Bytes.
      vocab, per_token, tokenizer = 256, 1.0, dataset_lib.BYTES_SHA256
    else:  # Made by a tokenizer we know nothing of: its path is its name.
      vocab, per_token, tokenizer = 65536, None, f"unknown tokenizer of {path}"
    return Corpus((tokens[:split],), (tokens[split:],), vocab, f"{path}: {len(tokens)} tokens",
                  per_token, tokenizer)
  if os.path.isdir(path):
    pattern, root = os.path.join(path, "**", "*"), path
  else:  # A file or a glob: split by path relative to the glob's fixed prefix.
    pattern, root = path, os.path.dirname(path.split("*")[0]) or "."
  paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not paths:
    raise ValueError(f"data.path={path!r}: no files match (give `embedded`, a"
                     " file, a directory, a glob or a .npy token file).")
  if len(paths) == 1:  # One file: hold out its tail instead of splitting by file.
    with open(paths[0], "rb") as f:
      tokens = np.frombuffer(f.read(), dtype=np.uint8)
    if len(tokens) == 0:
      raise ValueError(f"data.path={path!r}: the file is empty.")
    split = int(len(tokens) * (1 - eval_percent / 100))
    return Corpus((tokens[:split],), (tokens[split:],), 256, f"{path}: {len(tokens)} bytes")
  return _read_files(paths, root, eval_percent, path)


def tokenizer_id(path: str) -> str:
  """`load(path).tokenizer_id`, from a manifest or a header only: nothing else is read."""
  if dataset_lib.is_dataset(path):
    with open(os.path.join(path, dataset_lib.MANIFEST)) as f:
      return json.load(f)["tokenizer"]["sha256"]
  if path.endswith(".npy") and os.path.isfile(path):
    return load(path).tokenizer_id  # Memory-mapped: a header read.
  return dataset_lib.BYTES_SHA256


def _prepared(path: str) -> Corpus:
  """A prepared dataset's shards, memory-mapped (its manifest and shard headers checked)."""
  ds = dataset_lib.open_dataset(path)
  tok = ds.manifest["tokenizer"]
  name = "bytes" if tok["kind"] == "bytes" else f"{tok['kind']} tokenizer of {tok['vocab_size']}"
  tokens = lambda split: ds.manifest["splits"][split]["tokens"]
  return Corpus(
      tuple(ds.shards("train")), tuple(ds.shards("eval")), ds.vocab_size,
      f"{path}: prepared, {name}, {tokens('train')} train / {tokens('eval')} eval tokens",
      ds.bytes_per_token("eval"), ds.tokenizer_sha256,
      os.path.join(path, tok["file"]) if tok["file"] else None)
