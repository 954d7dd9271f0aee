"""Turns raw text into a token dataset directory (the format of data/dataset.py).

  python -m decoupled_diloco.data.prepare --input=corpus/ --input=more.jsonl \
      --output_dir=/data/mine --tokenizer=bpe --vocab_size=4096

A text file is one document, a line of a `.jsonl`/`.json` file is one (its
--text_field). A document goes to eval by a hash of its id (the path relative
to its input's root, plus `:LINE` for JSON lines), the rule of data/corpus.py.
The input is cut into units of about --shard_mb MB; unit i writes
`train-{i:05d}.npy` and `eval-{i:05d}.npy` on its own worker process, then a
sidecar `.unit-{i:05d}.json` with its counts and sha256s. DIR/plan.json records
what was asked, so a re-run resumes (a unit whose shards match its sidecar is
kept) and a different request for the same directory is refused. Bad input
(a file that cannot be read, a line that is not JSON) stops the run with one
line naming it, and removes what the run wrote: the mended input is a new plan.
"""

import contextlib
import dataclasses
import functools
import glob
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time

from absl import app, flags, logging
import numpy as np
import tqdm

from decoupled_diloco.data import corpus
from decoupled_diloco.data import dataset

EOS = "<|endoftext|>"  # The end-of-document token of a trained BPE.
EOS_NAMES = (EOS, "</s>", "<eos>")  # What counts as end-of-document in a given tokenizer file.
PLAN = "plan.json"
TOKENIZER = "tokenizer.json"
MB = 1e6
_BATCH_BYTES = 1e6  # Documents tokenized per call: few calls, and few encodings held at once.
_SURROGATE = re.compile("[\ud800-\udfff]")  # Lone ones: JSON can escape them, UTF-8 cannot.
_WORK_FILE = re.compile(
    r"(plan|manifest|tokenizer|\.unit-\d{5})\.json(\.tmp)?|(train|eval)-\d{5}\.npy(\.tmp)?")
_DOCUMENTS = ("each document's tokens, then eos_id if not null; documents concatenated in"
              " input order")


@dataclasses.dataclass(frozen=True)
class Piece:
  """A slice of one input file: a whole text file, or whole lines of a JSON-lines file."""
  path: str
  rel: str  # The path relative to its input's root: the document id (or its prefix).
  jsonl: bool
  start: int  # Byte range of the file.
  end: int
  first_line: int  # 1-based number of the line at `start` (JSON lines).


@dataclasses.dataclass(frozen=True)
class _Job:
  """What every unit needs besides its pieces (picklable: paths, not objects)."""
  output_dir: str
  tokenizer_file: str | None  # None: the bytes tokenizer.
  tokenizer_sha256: str
  eos_id: int | None
  dtype: str
  eval_percent: float
  text_field: str
  vocab_size: int = 256


def _fail_to_read(path: str, e: OSError) -> ValueError:
  return ValueError(f"{path}: cannot read ({e.strerror or e}).")


def _input_files(spec: str, output_dir: str) -> list[tuple[str, str]]:
  """(path, path relative to the input's root) of every file one --input names, sorted."""
  if spec == corpus.EMBEDDED:
    paths, root = corpus.stdlib_files()
  elif os.path.isfile(spec):
    paths, root = [spec], os.path.dirname(spec)
  else:  # A directory, or a glob whose ids are relative to its fixed prefix (data/corpus.py).
    pattern, root = ((os.path.join(spec, "**", "*"), spec) if os.path.isdir(spec) else
                     (spec, os.path.dirname(re.split(r"[*?[]", spec)[0])))
    inside_output = os.path.realpath(output_dir) + os.sep  # The output may sit in an input.
    paths = [p for p in glob.glob(pattern, recursive=True)
             if os.path.isfile(p) and not os.path.realpath(p).startswith(inside_output)]
  if not paths:
    raise ValueError(f"--input={spec}: no files match (give text or JSON-lines files, a"
                     " directory, a glob or `embedded`).")
  return [(p, os.path.relpath(p, root or ".")) for p in sorted(paths)]


def _stat(path: str) -> list:
  """[absolute path, size, mtime]: what plan.json records of an input file."""
  try:
    stat = os.stat(path)
  except OSError as e:
    raise _fail_to_read(path, e) from None
  return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _is_jsonl(path: str) -> bool:
  return path.endswith((".jsonl", ".json"))


def _pieces(files: list[tuple[str, str]], shard_bytes: float,
            eval_percent: float) -> tuple[list[Piece], dict]:
  """Pieces of at most about `shard_bytes`, and how many documents each split will get.

  The counts are exact for text files and count non-blank lines of JSON lines.
  """
  pieces, counts = [], {"train": 0, "eval": 0}
  for path, rel in files:
    try:
      size = os.path.getsize(path)
      if not _is_jsonl(path):
        if size:  # An empty file is no document (as in data/corpus.py).
          pieces.append(Piece(path, rel, False, 0, size, 0))
          counts[_split(rel, eval_percent)] += 1
        continue
      start, first, offset = 0, 1, 0
      with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
          offset += len(line)
          if line.strip():
            counts[_split(f"{rel}:{number}", eval_percent)] += 1
          if offset - start >= shard_bytes:
            pieces.append(Piece(path, rel, True, start, offset, first))
            start, first = offset, number + 1
      if offset > start:
        pieces.append(Piece(path, rel, True, start, offset, first))
    except OSError as e:
      raise _fail_to_read(path, e) from None
  return pieces, counts


def _groups(items, size_of, limit: float):
  """Yields consecutive items in lists of at least `limit` in total `size_of` (but the last)."""
  group, size = [], 0
  for item in items:
    group.append(item)
    size += size_of(item)
    if size >= limit:
      yield group
      group, size = [], 0
  if group:
    yield group


def _split(doc_id: str, eval_percent: float) -> str:
  return "eval" if corpus.held_out(doc_id, eval_percent) else "train"


def _decode(raw: bytes) -> tuple[str, int]:
  """UTF-8 text with invalid bytes replaced by U+FFFD, and how many were replaced."""
  try:
    return raw.decode(), 0
  except UnicodeDecodeError:
    text = raw.decode(errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def _documents(piece: Piece, text_field: str, eval_percent: float):
  """Yields (split, utf8_bytes, text, replaced_characters) for each document of a piece.

  `utf8_bytes` is the file's raw bytes for a text file (what the bytes tokenizer
  reads) and the text's UTF-8 encoding for JSON lines.
  """
  try:
    with open(piece.path, "rb") as f:
      f.seek(piece.start)
      data = f.read(piece.end - piece.start)
  except OSError as e:
    raise _fail_to_read(piece.path, e) from None
  if not piece.jsonl:
    yield (_split(piece.rel, eval_percent), data) + _decode(data)
    return
  for number, line in enumerate(data.split(b"\n"), piece.first_line):
    if not line.strip():
      continue
    where = f"{piece.path}:{number}"
    line, replaced = _decode(line)
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not JSON ({e.msg}).") from None
    if not isinstance(value, dict) or not isinstance(value.get(text_field), str):
      raise ValueError(f"{where}: no string field {text_field!r} (see --text_field).")
    text, surrogates = _SURROGATE.subn("\ufffd", value[text_field])
    if text:
      yield (_split(f"{piece.rel}:{number}", eval_percent), text.encode(), text,
             replaced + surrogates)


@functools.cache
def _load_tokenizer(path: str, sha256: str):
  """The tokenizer.json at `path`, loaded once per process and content (`sha256`)."""
  del sha256  # Part of the cache key only: a re-trained file is a different tokenizer.
  import tokenizers  # pylint: disable=g-import-not-at-top  # Not needed for bytes.
  tokenizer = tokenizers.Tokenizer.from_file(path)
  tokenizer.encode_special_tokens = True  # A literal "<|endoftext|>" in a text is text.
  return tokenizer


def _encode(tokenizer, documents: list[tuple], dtype: str) -> list[np.ndarray]:
  """The tokens of each (split, utf8_bytes, text, ...): its bytes, or its tokenizer's ids."""
  if tokenizer is None:
    return [np.frombuffer(data, np.uint8).astype(dtype, copy=False) for _, data, *_ in documents]
  texts = [text for _, _, text, _ in documents]
  return [np.array(e.ids, dtype)  # Without offsets ("fast"): 1.4x the documents per second.
          for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def _one_thread() -> None:
  """Each worker process is one core (tokenizers would start a thread per core in each)."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _sha256_or_none(path: str) -> str | None:
  return dataset.sha256_file(path) if os.path.isfile(path) else None


def _save(path: str, tokens: np.ndarray) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    np.save(f, tokens)
  os.replace(tmp, path)


def _sidecar(output_dir: str, index: int) -> str:
  return os.path.join(output_dir, f".unit-{index:05d}.json")


def _finished(index: int, job: _Job) -> dict | None:
  """The sidecar of a unit whose shards are written and unchanged, else None."""
  sidecar = _read_json(_sidecar(job.output_dir, index))
  if not sidecar or sidecar["tokenizer_sha256"] != job.tokenizer_sha256:
    return None
  for split in dataset.SPLITS:
    shard = sidecar[split]
    if _sha256_or_none(os.path.join(job.output_dir, shard["file"])) != shard["sha256"]:
      return None
  return sidecar


def _run_unit(args: tuple[int, list[Piece], _Job]) -> tuple[int, dict, bool]:
  """Writes one unit's two shards and its sidecar, unless already done; (index, sidecar, redone)."""
  index, pieces, job = args
  if (sidecar := _finished(index, job)) is not None:
    return index, sidecar, False
  tokenizer = job.tokenizer_file and _load_tokenizer(job.tokenizer_file, job.tokenizer_sha256)
  eos = [] if job.eos_id is None else [np.array([job.eos_id], job.dtype)]
  parts = {split: [] for split in dataset.SPLITS}
  stats = {split: {"tokens": 0, "documents": 0, "bytes": 0} for split in dataset.SPLITS}
  sidecar = {"invalid_utf8_documents": 0, "replaced_characters": 0,
             "input_bytes": sum(p.end - p.start for p in pieces),
             "tokenizer_sha256": job.tokenizer_sha256}
  documents = (d for p in pieces for d in _documents(p, job.text_field, job.eval_percent))
  for batch in _groups(documents, lambda d: len(d[1]), _BATCH_BYTES):
    for (split, data, _, replaced), ids in zip(batch, _encode(tokenizer, batch, job.dtype)):
      parts[split] += [ids] + eos
      stats[split]["documents"] += 1
      stats[split]["bytes"] += len(data)
      sidecar["invalid_utf8_documents"] += replaced > 0
      sidecar["replaced_characters"] += replaced
  for split in dataset.SPLITS:
    file = f"{split}-{index:05d}.npy"
    tokens = np.concatenate(parts[split]) if parts[split] else np.zeros(0, job.dtype)
    _save(os.path.join(job.output_dir, file), tokens)
    sidecar[split] = dict(stats[split], file=file, tokens=len(tokens),
                          sha256=dataset.sha256_file(os.path.join(job.output_dir, file)))
  dataset.write_json(_sidecar(job.output_dir, index), sidecar)
  return index, sidecar, True


def _train_bpe(pieces: list[Piece], path: str, *, vocab_size: int, text_field: str,
               eval_percent: float, max_docs: int, progress: bool) -> None:
  """Trains a byte-level BPE on the training split's documents and saves it to `path`."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=progress)
  texts = (text for piece in pieces
           for split, _, text, _ in _documents(piece, text_field, eval_percent)
           if split == "train")
  tokenizer.train_from_iterator(itertools.islice(texts, max_docs or None), trainer)
  tokenizer.save(f"{path}.tmp")
  os.replace(f"{path}.tmp", path)


def _tokenizer_info(path: str, sha256: str) -> tuple[int, int | None]:
  """(vocab_size, eos_id) of a tokenizer.json; raises ValueError naming it if unusable."""
  try:
    vocab = _load_tokenizer(path, sha256).get_vocab(with_added_tokens=True)
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises bare Exceptions.
    raise ValueError(f"--tokenizer={path}: not a readable tokenizer.json ({e}).") from None
  eos = next((vocab[name] for name in EOS_NAMES if name in vocab), None)
  return max(vocab.values()) + 1, eos


def _check_output_dir(output_dir: str, plan: dict) -> dict:
  """plan.json's state if `output_dir` holds this same plan ({} if new); else raises."""
  refuse = lambda why: ValueError(f"--output_dir={output_dir} holds a different dataset"
                                  f" ({why}); choose another directory.")
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise refuse("it is a file")
  try:
    with open(os.path.join(output_dir, PLAN)) as f:
      state = json.load(f)
  except FileNotFoundError:
    if os.path.isdir(output_dir) and os.listdir(output_dir):
      raise refuse(f"files, but no {PLAN}") from None
    return {}
  except (OSError, ValueError) as e:
    raise refuse(f"an unreadable {PLAN}: {e}") from None
  old = state.get("plan", {})
  if old != plan:
    differ = sorted(k for k in plan.keys() | old.keys() if old.get(k) != plan.get(k))
    raise refuse(f"{PLAN} differs in {', '.join(differ)}")
  return state


def _resolve_dtype(dtype: str, vocab_size: int, what: str) -> str:
  if dtype == "auto":
    dtype = "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 65536 else "uint32"
  if dtype not in dataset.DTYPES:
    raise ValueError(f"--dtype={dtype} must be auto or one of {', '.join(dataset.DTYPES)}.")
  if vocab_size > np.iinfo(dtype).max + 1:
    raise ValueError(f"{what}: a vocabulary of {vocab_size} tokens does not fit --dtype={dtype}"
                     f" (at most {np.iinfo(dtype).max + 1}); use --dtype=auto.")
  return dtype


def _manifest(sidecars: list[dict], plan: dict, job: _Job) -> dict:
  splits = {}
  for split in dataset.SPLITS:
    shards = [{k: s[split][k] for k in ("file", "tokens", "documents", "bytes", "sha256")}
              for s in sidecars]
    total = {k: sum(s[k] for s in shards) for k in ("tokens", "documents", "bytes")}
    if not total["tokens"]:
      raise ValueError(f"--input={','.join(plan['inputs'])}: no tokens in the {split} split;"
                       " change --eval_percent or give more files.")
    splits[split] = dict(total, shards=shards, bytes_per_token=total["bytes"] / total["tokens"])
  kind = plan["tokenizer"] if plan["tokenizer"] in ("bytes", "bpe") else "file"
  return {"format": dataset.FORMAT, "dtype": job.dtype, "documents": _DOCUMENTS,
          "tokenizer": {"kind": kind, "vocab_size": job.vocab_size, "sha256": job.tokenizer_sha256,
                        "file": job.tokenizer_file and TOKENIZER, "eos_id": job.eos_id},
          "eval_percent": plan["eval_percent"], "inputs": plan["inputs"], "splits": splits,
          "invalid_utf8_documents": sum(s["invalid_utf8_documents"] for s in sidecars),
          "replaced_characters": sum(s["replaced_characters"] for s in sidecars)}


def prepare(inputs: list[str], output_dir: str, *, tokenizer: str = "bytes",
            vocab_size: int = 4096, text_field: str = "text", eval_percent: float = 5.0,
            shard_mb: float = 64.0, workers: int = 0, dtype: str = "auto",
            max_train_docs_for_bpe: int = 0, progress: bool = True) -> dict:
  """Tokenizes `inputs` into the dataset directory `output_dir`, resuming work already there.

  Args:
    inputs: text files, directories (every file below), globs, `.jsonl`/`.json`
      JSON-lines files, or `embedded` (the Python standard library).
    output_dir: the dataset directory (data/dataset.py); created if missing.
    tokenizer: `bytes`, `bpe` (trained here on the train split) or a tokenizer.json.
    vocab_size: the BPE's vocabulary (with `bpe`).
    text_field: the field of a JSON line that holds its text.
    eval_percent: share of documents held out, by a hash of each one's id.
    shard_mb: about how many MB of input text make one unit (two shards).
    workers: processes tokenizing units (0: one per CPU).
    dtype: the token dtype, or `auto` (the smallest that holds the vocabulary).
    max_train_docs_for_bpe: train the BPE on the first this many train documents (0: all).
    progress: show progress bars on stderr.

  Returns:
    The manifest written to `output_dir`/manifest.json.

  Raises:
    ValueError: one line naming the flag or file (and line) that is wrong.
  """
  if not inputs:
    raise ValueError("--input: give at least one text file, directory, glob or `embedded`.")
  if not 0 < eval_percent < 100:
    raise ValueError(f"--eval_percent={eval_percent} must be in (0, 100).")
  if shard_mb <= 0:
    raise ValueError(f"--shard_mb={shard_mb} must be positive.")
  files = [f for spec in inputs for f in _input_files(spec, output_dir)]
  plan = {"format": dataset.FORMAT, "inputs": list(inputs), "text_field": text_field,
          "eval_percent": eval_percent, "shard_mb": shard_mb, "tokenizer": tokenizer,
          "files": [_stat(path) for path, _ in files]}
  if tokenizer == "bytes":
    vocab, what = 256, "--tokenizer=bytes"
  elif tokenizer == "bpe":
    if vocab_size <= 257:
      raise ValueError(f"--vocab_size={vocab_size} must exceed 257 (256 bytes and {EOS}).")
    vocab, what = vocab_size, f"--vocab_size={vocab_size}"
    plan.update(vocab_size=vocab_size, max_train_docs_for_bpe=max_train_docs_for_bpe)
  else:
    if not os.path.isfile(tokenizer):
      raise ValueError(f"--tokenizer={tokenizer}: no such file (give bytes, bpe or a"
                       " tokenizer.json).")
    plan.update(tokenizer=os.path.abspath(tokenizer),
                tokenizer_file_sha256=dataset.sha256_file(tokenizer))
    vocab = _tokenizer_info(tokenizer, plan["tokenizer_file_sha256"])[0]
    what = f"--tokenizer={tokenizer}"
  plan["dtype"] = dtype = _resolve_dtype(dtype, vocab, what)
  state = _check_output_dir(output_dir, plan)
  pieces, counts = _pieces(files, shard_mb * MB, eval_percent)
  for split, n in counts.items():
    if not n:
      raise ValueError(f"--input={','.join(inputs)}: no documents fall in the {split} split"
                       f" ({counts['train']} train, {counts['eval']} eval); change"
                       " --eval_percent or give more files.")

  created = not os.path.isdir(output_dir)
  if not state:  # Else the same plan is there already.
    os.makedirs(output_dir, exist_ok=True)
    state["plan"] = plan
    dataset.write_json(os.path.join(output_dir, PLAN), state)
  try:
    job = _tokenizer_job(output_dir, state, pieces, progress=progress)
    started = time.perf_counter()
    units = list(_groups(pieces, lambda p: p.end - p.start, shard_mb * MB))
    workers = min(workers or os.cpu_count() or 1, len(units))
    sidecars, redone_bytes = _run_units(units, job, workers, progress)
    seconds = time.perf_counter() - started
    manifest = _manifest(sidecars, plan, job)
  except ValueError:  # Bad input: nothing to resume, and the mended input is another plan.
    _remove_work(output_dir, created)
    raise
  if _read_json(os.path.join(output_dir, dataset.MANIFEST)) != manifest:  # Else a no-op re-run.
    dataset.write_manifest(output_dir, manifest)
  dataset.open_dataset(output_dir)  # Every shard's header against the manifest.
  _log_summary(manifest, output_dir, seconds, workers, redone_bytes)
  return manifest


def _tokenizer_job(output_dir: str, state: dict, pieces: list[Piece], progress: bool) -> _Job:
  """The units' job; puts the plan's tokenizer in `output_dir` first (a BPE is trained once)."""
  plan = state["plan"]
  file = os.path.join(output_dir, TOKENIZER)
  if plan["tokenizer"] == "bytes":
    return _Job(output_dir, None, dataset.BYTES_SHA256, None, **_job_fields(plan))
  if plan["tokenizer"] != "bpe":
    sha256 = plan["tokenizer_file_sha256"]
    if _sha256_or_none(file) != sha256:
      shutil.copyfile(plan["tokenizer"], f"{file}.tmp")
      os.replace(f"{file}.tmp", file)
  else:
    sha256 = _sha256_or_none(file)
    if sha256 is None or sha256 != state.get("tokenizer_sha256"):
      started = time.perf_counter()
      _train_bpe(pieces, file, vocab_size=plan["vocab_size"], text_field=plan["text_field"],
                 eval_percent=plan["eval_percent"], max_docs=plan["max_train_docs_for_bpe"],
                 progress=progress)
      state["tokenizer_sha256"] = sha256 = dataset.sha256_file(file)
      dataset.write_json(os.path.join(output_dir, PLAN), state)
      logging.info("trained a BPE in %.1f s", time.perf_counter() - started)
  vocab, eos_id = _tokenizer_info(file, sha256)
  return _Job(output_dir, file, sha256, eos_id, vocab_size=vocab, **_job_fields(plan))


def _job_fields(plan: dict) -> dict:
  return {k: plan[k] for k in ("dtype", "eval_percent", "text_field")}


def _run_units(units: list[list[Piece]], job: _Job, workers: int,
               progress: bool) -> tuple[list[dict], int]:
  """Runs (or keeps) every unit; their sidecars in order, and the input bytes of those run."""
  jobs = [(i, unit, job) for i, unit in enumerate(units)]
  results = {}
  with contextlib.ExitStack() as stack:
    if workers == 1:  # In this process: no start-up, and a debugger sees it.
      done = map(_run_unit, jobs)
    else:  # Spawned, not forked: no copy of a parent's threads or tokenizer state.
      pool = stack.enter_context(
          multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread))
      done = pool.imap_unordered(_run_unit, jobs)
    bar = tqdm.tqdm(done, total=len(jobs), unit="unit", file=sys.stderr, disable=not progress,
                    desc="tokenizing")
    for index, sidecar, redone in bar:
      results[index] = sidecar, redone
  return ([results[i][0] for i in range(len(units))],
          sum(sidecar["input_bytes"] for sidecar, redone in results.values() if redone))


def _remove_work(output_dir: str, created: bool) -> None:
  """Removes every file prepare writes (and the directory if this run made it)."""
  for name in os.listdir(output_dir):
    if _WORK_FILE.fullmatch(name):
      os.remove(os.path.join(output_dir, name))
  if created and not os.listdir(output_dir):
    os.rmdir(output_dir)


def _log_summary(manifest: dict, output_dir: str, seconds: float, workers: int,
                 input_bytes: int) -> None:
  splits = manifest["splits"]
  logging.info(
      "%s: %s; %d documents with invalid UTF-8 (%d characters replaced by U+FFFD)",
      output_dir, "; ".join(
          f"{split} {s['tokens']:,} tokens, {s['documents']:,} documents,"
          f" {s['bytes_per_token']:.3f} bytes/token" for split, s in splits.items()),
      manifest["invalid_utf8_documents"], manifest["replaced_characters"])
  if input_bytes:
    logging.info("tokenized %.1f MB of text in %.1f s on %d worker(s): %.2f MB/s per worker core",
                 input_bytes / MB, seconds, workers, input_bytes / MB / seconds / workers)
  else:
    logging.info("every unit was already done; verified their sha256s in %.1f s", seconds)


_INPUT = flags.DEFINE_multi_string("input", None, "Text files, directories (every file below),"
                                   " globs, .jsonl/.json JSON-lines files, or `embedded`.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "The dataset directory to write.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "bytes", "bytes, bpe (trained on the train"
                                 " split) or the path of a tokenizer.json.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "With --tokenizer=bpe: its vocabulary.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "The text field of a JSON line.")
_EVAL_PERCENT = flags.DEFINE_float("eval_percent", 5.0, "Share of documents held out for eval.")
_SHARD_MB = flags.DEFINE_float("shard_mb", 64.0, "About how many MB of input text per shard.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Tokenizing processes (0: one per CPU).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", *dataset.DTYPES], "Token dtype (auto:"
                           " uint8 for bytes, uint16 up to 65536 tokens, else uint32).")
_MAX_TRAIN_DOCS = flags.DEFINE_integer("max_train_docs_for_bpe", 0, "Train the BPE on the"
                                       " first this many train documents (0: all).")


def main(argv):
  del argv
  try:
    prepare(_INPUT.value, _OUTPUT_DIR.value, tokenizer=_TOKENIZER.value,
            vocab_size=_VOCAB_SIZE.value, text_field=_TEXT_FIELD.value,
            eval_percent=_EVAL_PERCENT.value, shard_mb=_SHARD_MB.value,
            workers=_WORKERS.value, dtype=_DTYPE.value,
            max_train_docs_for_bpe=_MAX_TRAIN_DOCS.value)
  except ValueError as e:
    print(e, file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["input", "output_dir"])  # Here: importers keep their own flags.
  app.run(main)
