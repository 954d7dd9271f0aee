"""Corpora, splits, shards and iterators."""

import os

import numpy as np
import pytest

from decoupled_diloco.data import corpus as corpus_lib
from decoupled_diloco.data import loader
from tests.helpers import CORPUS, corpus


def _write(tmp_path, files):
  for name, text in files.items():
    (tmp_path / name).write_text(text)


def test_embedded_split_is_deterministic_and_by_file():
  a, b = corpus_lib.load("embedded"), corpus_lib.load("embedded")
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.eval, b.eval)
  share = len(a.eval) / (len(a.train) + len(a.eval))
  assert 0.02 < share < 0.10, share  # About 5% of the files.
  paths, root = corpus_lib.stdlib_files()
  held_out = [p for p in paths if corpus_lib._eval_file(os.path.relpath(p, root), 5.0)]
  with open(sorted(held_out)[0], "rb") as f:
    first = f.read()
  assert a.eval[:len(first)].tobytes() == first  # Whole files, in sorted order.


def test_the_tests_corpus_is_what_its_readme_says():
  c = corpus()  # tests/fixtures/README.md
  assert c.description == f"{CORPUS}: 65 train / 6 eval files"
  assert len(c.train) + len(c.eval) == 707_263 and c.vocab_size == 256
  assert not c.train.flags.writeable  # Shared by every test of the session.


def test_text_directory_and_glob(tmp_path):
  _write(tmp_path, {f"f{i}.txt": f"file {i} " * 50 for i in range(60)})
  c = corpus_lib.load(str(tmp_path), eval_percent=10)
  assert c.vocab_size == 256 and len(c.eval) > 0 and len(c.train) > len(c.eval)
  g = corpus_lib.load(str(tmp_path / "*.txt"), eval_percent=10)
  assert len(g.train) + len(g.eval) == len(c.train) + len(c.eval)


def test_single_file_holds_out_its_tail(tmp_path):
  (tmp_path / "one.txt").write_bytes(bytes(range(256)) * 4)
  c = corpus_lib.load(str(tmp_path / "one.txt"), eval_percent=25)
  assert len(c.train) == 768 and c.eval.tobytes() == bytes(range(256))


def test_npy_tokens_memory_mapped(tmp_path):
  tokens = np.arange(10_000, dtype=np.uint16) % 1000
  np.save(tmp_path / "t.npy", tokens)
  c = corpus_lib.load(str(tmp_path / "t.npy"), eval_percent=10)
  assert isinstance(c.train, np.memmap) and c.vocab_size == 65536
  np.testing.assert_array_equal(np.concatenate([c.train, c.eval]), tokens)


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


def test_seq_len_longer_than_shard_is_an_error():
  with pytest.raises(ValueError, match="model.seq_len=128"):
    loader.ShardIterator(np.zeros(500, np.uint8), shard=0, num_shards=4, batch_size=2,
                         seq_len=128, seed=0)
  with pytest.raises(ValueError, match="eval split"):
    loader.eval_batches(np.zeros(100, np.uint8), batch_size=2, seq_len=128, num_batches=1)


def test_shards_are_disjoint_and_stay_in_their_range():
  its = [loader.ShardIterator(np.arange(4000), shard=s, num_shards=4, batch_size=8,
                              seq_len=16, seed=0) for s in range(4)]
  seen = [set(np.concatenate([next(it).ravel() for _ in range(20)])) for it in its]
  for s in range(4):
    assert seen[s] <= set(range(s * 1000, (s + 1) * 1000))


def test_iterator_is_deterministic_and_resumable():
  data = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
  make = lambda pos=0: loader.ShardIterator(data, shard=1, num_shards=2, batch_size=4,
                                            seq_len=32, seed=7, position=pos)
  first = next(make())
  it = make()
  full = [next(it) for _ in range(6)]
  np.testing.assert_array_equal(first, full[0])
  resumed = make(pos=3)
  for want in full[3:]:
    np.testing.assert_array_equal(next(resumed), want)
  assert full[0].shape == (4, 33) and full[0].dtype == np.int32
  other_seed = loader.ShardIterator(data, shard=1, num_shards=2, batch_size=4, seq_len=32,
                                    seed=8)
  assert not np.array_equal(next(other_seed), full[0])


def test_eval_batches_are_fixed_windows():
  data = np.arange(10_000) % 256
  b1 = loader.eval_batches(data, batch_size=4, seq_len=16, num_batches=3)
  b2 = loader.eval_batches(data, batch_size=4, seq_len=16, num_batches=3)
  assert len(b1) == 3 and all(b.shape == (4, 17) for b in b1)
  for x, y in zip(b1, b2):
    np.testing.assert_array_equal(x, y)
