"""Corpora, splits, and every learner's batches (data/reader.py)."""

import json
import os

import numpy as np
import pytest

from decoupled_diloco.data import corpus as corpus_lib
from decoupled_diloco.data import reader
from tests.helpers import CORPUS, corpus


def _write(tmp_path, files):
  for name, text in files.items():
    (tmp_path / name).write_text(text)


def test_embedded_split_is_deterministic_and_by_file():
  a, b = corpus_lib.load("embedded"), corpus_lib.load("embedded")
  (train,), (held,) = a.train, a.eval
  np.testing.assert_array_equal(train, b.train[0])
  np.testing.assert_array_equal(held, b.eval[0])
  share = len(held) / (len(train) + len(held))
  assert 0.02 < share < 0.10, share  # About 5% of the files.
  paths, root = corpus_lib.stdlib_files()
  held_out = [p for p in paths if corpus_lib.held_out(os.path.relpath(p, root), 5.0)]
  with open(sorted(held_out)[0], "rb") as f:
    first = f.read()
  assert held[:len(first)].tobytes() == first  # Whole files, in sorted order.


def test_the_tests_corpus_is_what_its_readme_says():
  c = corpus()  # tests/fixtures/README.md
  assert c.description == f"{CORPUS}: 65 train / 6 eval files"
  (train,), (held,) = c.train, c.eval
  assert len(train) + len(held) == 707_263 and c.vocab_size == 256
  assert not train.flags.writeable  # Shared by every test of the session.


def test_text_directory_and_glob(tmp_path):
  _write(tmp_path, {f"f{i}.txt": f"file {i} " * 50 for i in range(60)})
  c = corpus_lib.load(str(tmp_path), eval_percent=10)
  assert c.vocab_size == 256 and len(c.eval[0]) > 0 and len(c.train[0]) > len(c.eval[0])
  g = corpus_lib.load(str(tmp_path / "*.txt"), eval_percent=10)
  assert len(g.train[0]) + len(g.eval[0]) == len(c.train[0]) + len(c.eval[0])


def test_single_file_holds_out_its_tail(tmp_path):
  (tmp_path / "one.txt").write_bytes(bytes(range(256)) * 4)
  c = corpus_lib.load(str(tmp_path / "one.txt"), eval_percent=25)
  assert len(c.train[0]) == 768 and c.eval[0].tobytes() == bytes(range(256))


def test_npy_tokens_memory_mapped(tmp_path):
  tokens = np.arange(10_000, dtype=np.uint16) % 1000
  np.save(tmp_path / "t.npy", tokens)
  c = corpus_lib.load(str(tmp_path / "t.npy"), eval_percent=10)
  assert isinstance(c.train[0], np.memmap) and c.vocab_size == 65536
  assert c.bytes_per_token is None  # Bits per token, then: its bytes are unknown.
  np.testing.assert_array_equal(np.concatenate(c.train + c.eval), tokens)


@pytest.mark.parametrize("path", ["/no/such/dir/*.txt", "/no/such/file.npy"])
def test_missing_path_names_the_setting(path):
  with pytest.raises(ValueError, match="data.path"):
    corpus_lib.load(path)


def test_empty_corpus_is_an_error(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="data.path.*empty"):
    corpus_lib.load(str(tmp_path / "empty.txt"))


def test_bad_npy_dtype(tmp_path):
  np.save(tmp_path / "f.npy", np.zeros(100, np.float32))
  with pytest.raises(ValueError, match="uint8 or uint16"):
    corpus_lib.load(str(tmp_path / "f.npy"))


def _windows(n, seq_len=16, shards=1):
  """Windows over `shards` arrays of n tokens each, token t of shard s = s * n + t."""
  return reader.TokenWindows([np.arange(s * n, (s + 1) * n) for s in range(shards)], seq_len)


def _first_tokens(source, batches):
  return [int(t) for _ in range(batches) for t in next(source)["tokens"][:, 0]]


def test_seq_len_longer_than_a_shard_names_the_setting():
  with pytest.raises(ValueError, match="model.seq_len=128.*fewer than a batch of 2"):
    reader.train_source(reader.TokenWindows([np.zeros(500, np.uint8)], 128), shard=0,
                        num_shards=4, batch_size=2, seed=0, what="model.seq_len=128 windows")
  with pytest.raises(ValueError, match="held-out split has no examples"):
    reader.eval_batches(reader.TokenWindows([np.zeros(100, np.uint8)], 128), batch_size=2,
                        num_batches=1)
  with pytest.raises(ValueError, match="data.sharding='by_file'"):
    reader.train_source(_windows(1000), shard=0, num_shards=1, batch_size=2, seed=0,
                        sharding="by_file")


def test_windows_are_seq_len_plus_one_tokens_and_never_cross_a_shard():
  w = _windows(100, seq_len=16, shards=3)  # (100 - 1) // 16 = 6 windows a shard.
  assert len(w) == 18
  np.testing.assert_array_equal(w[0]["tokens"], np.arange(17))
  np.testing.assert_array_equal(w[1]["tokens"], np.arange(16, 33))  # Shares one token.
  np.testing.assert_array_equal(w[6]["tokens"], np.arange(100, 117))  # Shard 1 begins.
  assert w[17]["tokens"].dtype == np.int32 and w[17]["tokens"][-1] == 296
  with pytest.raises(IndexError):
    w[18]  # pylint: disable=pointless-statement


@pytest.mark.parametrize("sharding", ["random", "contiguous"])
def test_each_epoch_the_shards_are_disjoint_and_make_up_the_training_split(sharding):
  w = _windows(16 * 240 + 1)  # 240 windows, 60 a learner, 15 batches of 4.
  sources = [reader.train_source(w, shard=m, num_shards=4, batch_size=4, seed=3,
                                 sharding=sharding) for m in range(4)]
  for _ in range(2):  # Two epochs: each a partition of the windows.
    epoch = [_first_tokens(s, 15) for s in sources]
    assert sorted(sum(epoch, [])) == list(range(0, 16 * 240, 16))
  spread = [max(e) - min(e) for e in epoch]
  if sharding == "random":  # Every learner reads all over the corpus...
    assert min(spread) > 0.9 * 16 * 240
  else:  # ...or its own quarter of it, in a new order each epoch.
    assert max(spread) < 16 * 60
    assert [min(e) // (16 * 60) for e in epoch] == [0, 1, 2, 3]


def test_batches_are_deterministic_and_resume_from_their_state():
  w = _windows(5000, seq_len=32)
  make = lambda seed=7: reader.train_source(w, shard=1, num_shards=2, batch_size=4, seed=seed)
  it = make()
  full = [next(it)["tokens"] for _ in range(30)]  # 78 windows a learner: crosses two epochs.
  np.testing.assert_array_equal(next(make())["tokens"], full[0])
  resumed = make()
  it = make()
  for _ in range(13):
    next(it)
  resumed.set_state(json.loads(json.dumps(it.get_state())))
  for want in full[13:]:
    np.testing.assert_array_equal(next(resumed)["tokens"], want)
  assert full[0].shape == (4, 33) and full[0].dtype == np.int32
  assert not np.array_equal(next(make(seed=8))["tokens"], full[0])
  with pytest.raises(ValueError, match="next_index"):
    resumed.set_state({"step": 3})


def test_eval_batches_are_fixed_evenly_spaced_windows():
  w = _windows(10_000)
  b1 = reader.eval_batches(w, batch_size=4, num_batches=3)
  b2 = reader.eval_batches(w, batch_size=4, num_batches=3)
  assert len(b1) == 3 and all(b["tokens"].shape == (4, 17) for b in b1)
  for x, y in zip(b1, b2):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  starts = np.concatenate([b["tokens"][:, 0] for b in b1])
  assert len(set(np.diff(starts))) == 1 and starts[-1] > 0.85 * 16 * len(w)  # All over it.
