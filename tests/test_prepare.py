"""data/prepare.py turns raw text into a dataset directory; data/dataset.py reads it back."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from decoupled_diloco.data import corpus as corpus_lib
from decoupled_diloco.data import dataset
from decoupled_diloco.data import prepare as prepare_lib

_WORDS = "the quick brown fox jumps over a lazy dog while naïve cafés serve 日本 tea".split()


def _text(seed: int, words: int = 60) -> str:
  rng = np.random.default_rng(seed)
  return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), words)) + "\n"


def _folder(root, n=30):
  """n text files of a few hundred bytes, some in subfolders; {path: bytes}."""
  files = {}
  for i in range(n):
    path = root / (f"sub{i % 3}" if i % 2 else "") / f"doc{i:02d}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_text(i, 20 + 7 * i))
    files[str(path)] = path.read_bytes()
  return files


def _jsonl(path, n=60):
  """A JSON-lines file of n documents and a blank line; {line number: text}."""
  docs, lines = {}, []
  for i in range(n):
    if i == 5:
      lines.append("")
    text = _text(100 + i, 10 + i) + ("<|endoftext|> is text here" if i == 7 else "")
    lines.append(json.dumps({"id": i, "text": text}))
    docs[len(lines)] = text
  path.write_text("\n".join(lines) + "\n")
  return docs


def _prepare(inputs, out, **kwargs):
  kwargs = {"workers": 1, "progress": False, **kwargs}
  return prepare_lib.prepare([str(i) for i in inputs], str(out), **kwargs)


def _tokens(out, split):
  return np.concatenate(dataset.open_dataset(str(out)).shards(split))


def _files(out):
  """{name: (inode, mtime)} of the shards and tokenizer: what changes when one is rewritten."""
  return {name: (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns)
          for name in os.listdir(out) if name.endswith(".npy") or name == "tokenizer.json"}


def _one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=match) as e:
    fn(*args, **kwargs)
  assert "\n" not in str(e.value)


def test_a_folder_with_bytes_is_its_files_bytes_in_sorted_order(tmp_path):
  files = _folder(tmp_path / "in")
  manifest = _prepare([tmp_path / "in"], tmp_path / "out", eval_percent=20, shard_mb=0.002)
  ds = dataset.open_dataset(str(tmp_path / "out"), verify=True)
  assert ds.manifest == manifest and dataset.is_dataset(str(tmp_path / "out"))
  assert (ds.vocab_size, ds.dtype, ds.eos_id, ds.tokenizer()) == (256, np.uint8, None, None)
  assert ds.tokenizer_sha256 == dataset.BYTES_SHA256
  for split in dataset.SPLITS:
    mine = [files[p] for p in sorted(files)
            if corpus_lib.held_out(os.path.relpath(p, tmp_path / "in"), 20) == (split == "eval")]
    assert _tokens(tmp_path / "out", split).tobytes() == b"".join(mine)
    info = manifest["splits"][split]
    assert info["documents"] == len(mine) and info["tokens"] == info["bytes"] == len(b"".join(mine))
    assert ds.bytes_per_token(split) == 1.0
    assert len(info["shards"]) > 3  # Several units, each writing both splits.
  assert manifest["invalid_utf8_documents"] == manifest["replaced_characters"] == 0
  assert manifest["splits"]["eval"]["documents"] > 0


def test_json_lines_with_bpe_decode_back_and_end_with_eos(tmp_path):
  docs = _jsonl(tmp_path / "docs.jsonl")
  manifest = _prepare([tmp_path / "docs.jsonl"], tmp_path / "out", tokenizer="bpe",
                      vocab_size=300, eval_percent=20, shard_mb=0.003)
  ds = dataset.open_dataset(str(tmp_path / "out"), verify=True)
  tokenizer = ds.tokenizer()
  assert ds.eos_id == tokenizer.token_to_id("<|endoftext|>") is not None
  assert ds.dtype == np.uint16 and ds.vocab_size == tokenizer.get_vocab_size() <= 300
  assert (manifest["tokenizer"]["kind"], manifest["tokenizer"]["file"]) == ("bpe", "tokenizer.json")
  for split in dataset.SPLITS:
    mine = [text for line, text in docs.items()
            if corpus_lib.held_out(f"docs.jsonl:{line}", 20) == (split == "eval")]
    tokens = _tokens(tmp_path / "out", split)
    assert tokens[-1] == ds.eos_id
    got = np.split(tokens, np.flatnonzero(tokens == ds.eos_id) + 1)[:-1]
    assert [tokenizer.decode(list(ids[:-1])) for ids in got] == mine
    assert manifest["splits"][split]["documents"] == len(mine)
    assert ds.bytes_per_token(split) > 1.5
    assert manifest["splits"][split]["bytes"] == sum(len(t.encode()) for t in mine)

  # The trained tokenizer given as a file tokenizes the same.
  again = _prepare([tmp_path / "docs.jsonl"], tmp_path / "again",
                   tokenizer=str(tmp_path / "out" / "tokenizer.json"), eval_percent=20)
  assert again["tokenizer"] == dict(manifest["tokenizer"], kind="file")
  np.testing.assert_array_equal(_tokens(tmp_path / "again", "train"),
                                _tokens(tmp_path / "out", "train"))

  with open(tmp_path / "out" / "tokenizer.json", "a") as f:
    f.write(" ")
  _one_line_error("tokenizer.json: sha256 differs", dataset.open_dataset, str(tmp_path / "out"),
                  verify=True)


def test_embedded_splits_files_as_the_corpus_module_does(tmp_path, monkeypatch):
  paths, root = corpus_lib.stdlib_files()
  paths = [p for p in sorted(paths) if 500 < os.path.getsize(p) < 20_000]
  held_out = lambda p: corpus_lib.held_out(os.path.relpath(p, root), 5.0)
  few = [p for p in paths if held_out(p)][:3] + [p for p in paths if not held_out(p)][:5]
  monkeypatch.setattr(corpus_lib, "stdlib_files", lambda: (few, root))
  manifest = _prepare(["embedded"], tmp_path / "out")
  expected = corpus_lib._read_files(few, root, 5.0, "a few stdlib files")
  np.testing.assert_array_equal(_tokens(tmp_path / "out", "train"), expected.train[0])
  np.testing.assert_array_equal(_tokens(tmp_path / "out", "eval"), expected.eval[0])
  assert manifest["inputs"] == ["embedded"] and manifest["splits"]["eval"]["documents"] == 3


def test_one_or_two_workers_write_the_same_bytes(tmp_path):
  _folder(tmp_path / "in")
  _jsonl(tmp_path / "in" / "docs.jsonl")
  for workers in (1, 2):
    _prepare([tmp_path / "in"], tmp_path / f"w{workers}", tokenizer="bpe", vocab_size=300,
             eval_percent=20, shard_mb=0.004, workers=workers)
  names = sorted(os.listdir(tmp_path / "w1"))
  assert names == sorted(os.listdir(tmp_path / "w2")) and "train-00003.npy" in names
  for name in names:  # Shards, sidecars, tokenizer, manifest and plan.
    assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_a_rerun_redoes_only_what_is_missing_or_changed(tmp_path):
  _jsonl(tmp_path / "docs.jsonl")
  out = tmp_path / "out"
  run = lambda: _prepare([tmp_path / "docs.jsonl"], out, tokenizer="bpe", vocab_size=300,
                         eval_percent=20, shard_mb=0.002)
  manifest = run()
  before = _files(out)
  shard_bytes = {name: (out / name).read_bytes() for name in before}
  (out / "train-00001.npy").unlink()
  (out / ".unit-00002.json").unlink()
  (out / "eval-00003.npy").write_bytes(b"not a shard")
  assert run() == manifest
  after = _files(out)
  redone = {"train-00001.npy", "eval-00001.npy", "train-00002.npy", "eval-00002.npy",
            "train-00003.npy", "eval-00003.npy"}
  assert {name for name in before if after[name] != before[name]} == redone
  assert {name: (out / name).read_bytes() for name in after} == shard_bytes

  manifest_stat = os.stat(out / "manifest.json").st_mtime_ns
  assert run() == manifest  # A finished prepare again: verified, nothing rewritten.
  assert _files(out) == after and os.stat(out / "manifest.json").st_mtime_ns == manifest_stat


def test_a_different_plan_for_the_same_directory_is_refused(tmp_path):
  _folder(tmp_path / "in")
  _prepare([tmp_path / "in"], tmp_path / "out", eval_percent=20)
  _one_line_error(r"--output_dir=\S+out holds a different dataset \(plan.json differs in"
                  r" eval_percent\); choose another directory", _prepare,
                  [tmp_path / "in"], tmp_path / "out", eval_percent=10)
  (tmp_path / "in" / "sub0" / "new.txt").write_text("one more file")
  _one_line_error("differs in files", _prepare, [tmp_path / "in"], tmp_path / "out",
                  eval_percent=20)
  _one_line_error("holds a different dataset .files, but no plan.json", _prepare,
                  [tmp_path / "in"], tmp_path / "in" / "sub1", eval_percent=20)


def test_bad_inputs_are_one_line_naming_the_file(tmp_path, monkeypatch):
  files = sorted(_folder(tmp_path / "in"))
  out = tmp_path / "out"
  missing = tmp_path / "nope.txt"
  _one_line_error(f"--input={missing}: no files match", _prepare, [missing], out)
  _one_line_error(r"no files match", _prepare, [tmp_path / "in" / "*.md"], out)

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n\n{"text": "fine", \n')
  _one_line_error(f"{bad}:3: not JSON", _prepare, [bad], out, eval_percent=50)
  bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
  _one_line_error(f"{bad}:2: no string field 'text' .see --text_field", _prepare, [bad], out,
                  eval_percent=50, tokenizer="bpe", vocab_size=300)
  for path in [tmp_path / "in", tmp_path / "gone.py"]:  # A folder cannot be read as a file.
    monkeypatch.setattr(corpus_lib, "stdlib_files", lambda p=path: (files + [str(p)], tmp_path))
    _one_line_error(f"{path}: cannot read", _prepare, ["embedded"], out, eval_percent=20)

  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("")
  _one_line_error("no documents fall in the train split .0 train, 0 eval.; change --eval_percent",
                  _prepare, [tmp_path / "empty"], out)
  _one_line_error("no documents fall in the eval split .30 train, 0 eval.", _prepare,
                  [tmp_path / "in"], out, eval_percent=0.01)
  _one_line_error("--vocab_size=70000: a vocabulary of 70000 tokens does not fit --dtype=uint16",
                  _prepare, [tmp_path / "in"], out, tokenizer="bpe", vocab_size=70000,
                  dtype="uint16")
  _jsonl(tmp_path / "docs.jsonl")
  _prepare([tmp_path / "docs.jsonl"], tmp_path / "bpe", tokenizer="bpe", vocab_size=300)
  tokenizer = tmp_path / "bpe" / "tokenizer.json"
  _one_line_error(f"--tokenizer={tokenizer}: a vocabulary of 300 tokens does not fit"
                  " --dtype=uint8", _prepare, [tmp_path / "in"], out, tokenizer=str(tokenizer),
                  dtype="uint8")
  _one_line_error(f"--tokenizer={bad}: not a readable tokenizer.json", _prepare,
                  [tmp_path / "in"], out, tokenizer=str(bad))
  assert not out.exists()  # Nothing was written for any of them.


def test_a_bad_line_found_by_a_worker_process_is_the_same_one_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(40)) + "[1, 2]\n")
  _one_line_error(f"{bad}:41: no string field 'text'", _prepare, [bad], tmp_path / "out",
                  eval_percent=50, shard_mb=0.0001, workers=2)


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
  (tmp_path / "in").mkdir()
  raw = b"ok \xff\xfe then a real \xef\xbf\xbd and \xe2\x82 cut"
  for i in range(8):
    (tmp_path / "in" / f"{i}.txt").write_bytes(raw if i == 3 else b"fine text")
  (tmp_path / "in" / "docs.jsonl").write_bytes(
      b'{"text": "bad \xff byte"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "fine"}\n')
  manifest = _prepare([tmp_path / "in"], tmp_path / "out", eval_percent=30)
  assert manifest["invalid_utf8_documents"] == 3
  assert manifest["replaced_characters"] == 3 + 1 + 1  # \xff, \xfe, \xe2\x82; one each line.
  tokens = b"".join(_tokens(tmp_path / "out", split).tobytes() for split in dataset.SPLITS)
  assert raw in tokens  # The bytes tokenizer reads files as they are...
  assert "bad \ufffd byte".encode() in tokens  # ...JSON lines as decoded.
  assert "lone \ufffd surrogate".encode() in tokens

  manifest = _prepare([tmp_path / "in"], tmp_path / "bpe", tokenizer="bpe", vocab_size=300,
                      eval_percent=30)
  assert (manifest["invalid_utf8_documents"], manifest["replaced_characters"]) == (3, 5)


def test_a_corrupted_shard_is_caught(tmp_path):
  _folder(tmp_path / "in")
  _prepare([tmp_path / "in"], tmp_path / "out", eval_percent=20)
  shard = tmp_path / "out" / "train-00000.npy"
  data = bytearray(shard.read_bytes())
  data[-1] ^= 1
  shard.write_bytes(bytes(data))
  dataset.open_dataset(str(tmp_path / "out"))  # The header still matches.
  _one_line_error(f"{shard}: sha256 differs from manifest.json", dataset.open_dataset,
                  str(tmp_path / "out"), verify=True)
  shard.write_bytes(bytes(data[:-10]))
  _one_line_error(f"{shard}: not a readable .npy shard", dataset.open_dataset,
                  str(tmp_path / "out"))
  _one_line_error("manifest.json: missing", dataset.open_dataset, str(tmp_path / "in"))
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  del manifest["dtype"]
  dataset.write_manifest(str(tmp_path / "out"), manifest)
  _one_line_error("manifest.json: malformed .KeyError: 'dtype'", dataset.open_dataset,
                  str(tmp_path / "out"))


def test_the_command_line_prints_one_line_and_exits_1(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\nnot json\n')
  got = subprocess.run(
      [sys.executable, "-m", "decoupled_diloco.data.prepare", f"--input={bad}",
       f"--output_dir={tmp_path / 'out'}", "--eval_percent=50"],
      capture_output=True, text=True, timeout=120, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert got.returncode == 1, got.stderr
  assert got.stderr.splitlines()[-1] == f"{bad}:2: not JSON (Expecting value)."
  assert "Traceback" not in got.stderr  # Above the line: only the progress bar.
