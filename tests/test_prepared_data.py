"""Training on a prepared dataset (data/prepare.py): resumable, refused with another
tokenizer, and measured in bits per byte of text whatever the tokenizer."""

import filecmp
import json
import math
import os

import pytest

from decoupled_diloco import checkpointing, train
from decoupled_diloco.data import prepare
from decoupled_diloco.runtime.data_parallel import DataParallel
from decoupled_diloco.runtime.decoupled import Decoupled
from decoupled_diloco.runtime.dist import mailbox as mailbox_lib
from tests import helpers

VOCAB = 512


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
  """The tests' corpus, BPE-tokenized (512 tokens, trained on its training split)."""
  out = str(tmp_path_factory.mktemp("bpe"))
  prepare.prepare([helpers.CORPUS], out, tokenizer="bpe", vocab_size=VOCAB, workers=1,
                  progress=False)
  return out


def _config(path, runtime="data_parallel", steps=8, **overrides):
  decoupled = {"diloco.num_learners": 2, "diloco.sync_every": 3, "diloco.num_fragments": 2,
               "diloco.overlap": 1, "diloco.quorum": 1, "sim.slow_learners": 1,
               "sim.slow_factor": 1.5} if runtime == "decoupled" else {}
  return helpers.tiny_config(runtime, steps=steps, **{
      "data.path": path, "model.vocab_size": VOCAB, "model.name": "llama",
      "model.num_kv_heads": 1, **decoupled, **overrides})


@pytest.mark.parametrize("runtime,cls", [("data_parallel", DataParallel),
                                         ("decoupled", Decoupled)])
def test_an_interrupted_run_on_a_prepared_dataset_resumes_bitwise(bpe, tmp_path, monkeypatch,
                                                                  runtime, cls):
  c = _config(bpe, runtime, **{"train.checkpoint_every": 4})
  whole = train.train_and_evaluate(c, str(tmp_path / "whole"))
  helpers.preempt(monkeypatch, cls, 7, c, tmp_path / "resumed")
  resumed = train.train_and_evaluate(c, str(tmp_path / "resumed"))
  assert resumed["resumed_from_step"] == 4
  assert resumed["final_eval_loss"] == whole["final_eval_loss"] < math.log(VOCAB)
  helpers.assert_trees_equal(helpers.final_checkpoint(tmp_path / "resumed"),
                             helpers.final_checkpoint(tmp_path / "whole"))
  assert filecmp.cmp(os.path.join(bpe, "tokenizer.json"), tmp_path / "whole" / "tokenizer.json",
                     shallow=False)  # What decodes the run's outputs, beside them.


def test_bits_per_byte_are_nats_per_token_over_ln2_times_bytes_per_token(bpe, tmp_path):
  run = train.train_and_evaluate(_config(bpe, steps=2), str(tmp_path))
  per_token = json.load(open(os.path.join(bpe, "manifest.json")))["splits"]["eval"]
  per_token = per_token["bytes"] / per_token["tokens"]
  assert 1.5 < per_token < 4  # Subwords: a few bytes each.
  assert run["final_eval_bits_per_byte"] == pytest.approx(
      run["final_eval_loss"] / (math.log(2) * per_token), rel=1e-6)


def test_a_byte_level_and_a_bpe_run_of_the_same_text_report_comparable_bits_per_byte(
    bpe, tmp_path):
  """Both models see the same 0.26M windows of text... in their own tokens: bits per
  byte puts them on one scale (per token, they differ by the bytes per token, 2x)."""
  runs = {name: train.train_and_evaluate(
      _config(path, steps=60, **{"model.vocab_size": vocab, "inner.lr": 3e-3}),
      str(tmp_path / name)) for name, path, vocab in (("bytes", helpers.CORPUS, 256),
                                                      ("bpe", bpe, VOCAB))}
  bits = {k: r["final_eval_bits_per_byte"] for k, r in runs.items()}
  per_token = {k: r["final_eval_loss"] / math.log(2) for k, r in runs.items()}
  assert bits["bytes"] == pytest.approx(per_token["bytes"])  # One byte a token.
  assert per_token["bpe"] > 1.5 * per_token["bytes"]  # Not the same in bits per token...
  assert abs(bits["bpe"] - bits["bytes"]) < 0.25 * bits["bytes"], bits  # ...but per byte.
  assert max(bits.values()) < 6.0  # Both learned: 8 bits is a uniform byte.


def test_a_checkpoint_or_a_mailbox_of_another_tokenizer_is_refused_naming_it(bpe, tmp_path):
  other = str(tmp_path / "other")  # The same text, another BPE (another vocabulary).
  prepare.prepare([helpers.CORPUS], other, tokenizer="bpe", vocab_size=VOCAB - 12, workers=1,
                  progress=False)
  train.train_and_evaluate(_config(bpe, steps=2), str(tmp_path / "run"))
  with pytest.raises(checkpointing.ConfigMismatchError, match="data_id: '[0-9a-f]{64}' -> "):
    train.train_and_evaluate(_config(other, steps=4), str(tmp_path / "run"))

  # One config, whose data.path holds another dataset on another machine.
  box = mailbox_lib.Mailbox(f"memory://{tmp_path}/box", b"s" * 32)
  record = lambda path: checkpointing.run_record(_config(bpe), helpers.task(_config(path)))
  box.put_config(record(bpe))
  box.put_config(record(bpe))  # The same run: fine.
  with pytest.raises(ValueError, match=r"differs in data_id: '[0-9a-f]{64}' there, '[0-9a-f]{64}'"
                                       r" here\. Use the same config"):
    box.put_config(record(other))
