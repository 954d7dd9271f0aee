"""Tasks as plugins: the registry, the checks before training, roles and local state,
and every built-in task trained by every method, in the simulator and the real runtime."""

import dataclasses
import glob
import math
import os
import re

import jax
import numpy as np
import pytest

from decoupled_diloco import config as config_lib, metrics as metrics_lib, tasks, train
from decoupled_diloco.algorithm import fragments as fragments_lib, merge
from decoupled_diloco.runtime import team as team_lib
from decoupled_diloco.runtime.decoupled import Decoupled
from decoupled_diloco.tasks import base, lm
from experiments import custom_model
from tests import helpers
from tests.dist_harness import InProcessRun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small models of each built-in task, with the tests' corpus for text.
MODELS = {
    "gpt": {},
    "llama": {"model.name": "llama", "model.num_kv_heads": 1, "model.tie_embeddings": True},
    "moe": {"model.name": "moe", "model.num_experts": 4, "model.mlp_dim": 64},
    "digits_vit": {"task.name": "digits_vit", "model.name": "vit", "model.d_model": 32,
                   "model.mlp_dim": 64, "model.patch_size": 4, "inner.lr": 3e-3},
}
METHODS = {
    "data_parallel": ("data_parallel", {}),
    "diloco": ("lockstep", {"diloco.num_learners": 2, "diloco.sync_every": 3}),
    "streaming": ("lockstep", {"diloco.num_learners": 2, "diloco.sync_every": 4,
                               "diloco.num_fragments": 2, "diloco.overlap": 1,
                               "diloco.alpha": 0.5}),
    "decoupled": ("decoupled", {"diloco.num_learners": 2, "diloco.sync_every": 3,
                                "diloco.num_fragments": 2, "diloco.overlap": 1,
                                "diloco.quorum": 1, "diloco.grace_gamma": 1.0,
                                "diloco.merge": "rda", "diloco.weighting": "tokens2_per_step",
                                "sim.slow_learners": 1, "sim.slow_factor": 1.5}),
}


def config(model="gpt", method="data_parallel", steps=6, **overrides):
  runtime, fields = METHODS[method]
  return helpers.tiny_config(runtime, steps=steps, **{**MODELS[model], **fields, **overrides})


# --- the registry and the checks ---------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("task.name", "nope", r"task.name='nope' is not registered; registered tasks: .*digits_vit,"
                          r" lm_bytes"),
    ("model.name", "bert", r"model.name='bert' is not a model of task lm_bytes; choose from"
                           r" \['gpt', 'llama', 'moe'\]"),
    ("task.module", "no_such_module_anywhere", r"task.module='no_such_module_anywhere' does not"
                                               r" import \(ModuleNotFoundError"),
    ("task.module", "json", r"task.module='json' registers no task"),
])
def test_unknown_names_and_empty_modules_are_one_line_naming_them(field, value, message):
  cfg = config_lib.parse(helpers.tiny_config(**{field: value}))
  with pytest.raises(ValueError, match=message) as e:
    tasks.build(cfg)
  assert "\n" not in str(e.value)


def test_a_module_outside_the_package_registers_its_task_and_trains(tmp_path):
  c = custom_model.get_config()
  c.train.update(steps=60, eval_every=0, checkpoint_every=0)
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["task"] == "digits_mlp" and summary["images"] == 60 * 64
  assert summary["final_eval_loss"] < 0.6 * np.log(10)  # From chance (about 0.98 here).
  assert summary["final_eval_accuracy"] > 0.6  # About 0.73.
  assert "digits_mlp" in tasks.names()


@tasks.register("test_broken")
class Broken(custom_model.DigitsMlp):
  """`how` breaks one piece: the batch's shape, a role, the axes, or the loss at init."""
  name = "test_broken"
  how = "shape"

  def batch_spec(self, batch_size):
    spec = super().batch_spec(batch_size)
    if self.how == "shape":
      return {**spec, "image": jax.ShapeDtypeStruct((batch_size, 4, 4, 1), np.float32)}
    return spec

  def roles(self, flat_params):
    roles = super().roles(flat_params)
    return {**roles, "head/bias": "bias"} if self.how == "role" else roles

  def axes(self, flat_params):
    axes = super().axes(flat_params)
    return {**axes, "head/kernel": ("embed",)} if self.how == "axes" else axes

  def loss(self, params, batch):
    loss, aux = super().loss(params, batch)
    return (loss * np.nan if self.how == "nan" else loss), aux


@pytest.mark.parametrize("how,message", [
    ("shape", r"task 'test_broken': its loss does not take a batch of its own batch_spec"
              r" \(image: float32\[16, 4, 4, 1\], label: int32\[16\]\)"),
    ("role", r"task 'test_broken': parameter head/bias has role 'bias'; roles are"),
    ("axes", r"task 'test_broken': parameter head/kernel of shape \(128, 10\) has axis names"),
    ("nan", r"task 'test_broken': the loss at init on the first training batch is nan"),
])
def test_a_task_whose_pieces_disagree_is_refused_before_training(tmp_path, monkeypatch, how,
                                                                  message):
  monkeypatch.setattr(Broken, "how", how)
  c = custom_model.get_config()
  c.task.name = "test_broken"
  c.data.batch_size = 16
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path))
  assert not glob.glob(str(tmp_path / "checkpoints" / "*"))


def test_the_runtime_names_no_model_token_or_vocabulary():
  """What crosses the task interface, and nothing else: a grep of the runtime's files."""
  files = [*glob.glob(os.path.join(REPO, "decoupled_diloco", "runtime", "**", "*.py"),
                      recursive=True),
           *(os.path.join(REPO, "decoupled_diloco", f) for f in
             ("steps.py", "train.py", "memory.py"))]
  words = re.compile(r"\b(transformer|Transformer|llama|vit|gpt|vocab\w*|seq_len|corpus"
                     r"|tokens?_per\w*|bits_per_byte|decoupled_diloco\.(models|data))\b")
  found = [f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}"
           for path in files for i, line in enumerate(open(path), 1) if words.search(line)]
  assert len(files) > 10 and not found, found


# --- roles and local state ---------------------------------------------------------

@pytest.mark.parametrize("model,embeddings", [
    ("gpt", {"embed/embedding", "pos_embed"}),
    ("llama", {"embed/embedding"}),
    ("digits_vit", {"embed/kernel", "embed/bias", "pos_embed"}),
])
def test_roles_send_embeddings_to_the_mean_and_everything_else_to_rda(model, embeddings):
  cfg = config_lib.parse(config(model, "diloco", **{"diloco.merge": "rda"}))
  task = helpers.task(cfg)
  flat = fragments_lib.flatten(task.init(jax.random.key(0)))
  assert team_lib.mean_paths(cfg, task, flat) == embeddings
  syncer = team_lib.make_syncer(cfg, task, flat, (tuple(sorted(flat)),))
  rules = dict(zip(syncer.fragments[0], syncer.rules[0]))
  assert {k for k, r in rules.items() if r is merge.merge_mean} == embeddings
  assert {k for k, r in rules.items() if r is merge.merge_rda} == set(flat) - embeddings
  norms = {k for k, role in task.roles(flat).items() if role == "norm"}
  assert norms  # The ablation below moves something.
  cfg = dataclasses.replace(cfg, diloco=dataclasses.replace(cfg.diloco,
                                                            mean_roles=("embed", "norm")))
  assert team_lib.mean_paths(cfg, task, flat) == embeddings | norms
  bad = dataclasses.replace(cfg, diloco=dataclasses.replace(cfg.diloco, mean_roles=("emb",)))
  with pytest.raises(ValueError, match=r"diloco.mean_roles=\('emb',\): \['emb'\] are not roles"):
    team_lib.mean_paths(bad, task, flat)


LOCAL = "final_norm/bias"


@tasks.register("test_local")
class WithLocalState(lm.LanguageModel):
  """The byte-level GPT with one tensor kept local to each learner."""
  name = "test_local"

  def roles(self, flat_params):
    return {**super().roles(flat_params), LOCAL: "local"}


def test_local_state_is_never_sent_or_merged():
  cfg = config_lib.parse(config("gpt", "diloco", steps=6, **{"task.name": "test_local"}))
  rt = train.make_runtime(cfg, helpers.task(cfg), "")
  team = rt.team
  assert all(LOCAL not in f for f in team.fragments)
  assert LOCAL not in team.syncer.global_flat()
  sent = []
  admit = team.syncer.admit
  team.syncer.admit = lambda c, *args: (sent.append(c), admit(c, *args))[1]
  for _ in range(cfg.diloco.sync_every):
    rt.train_step()
  assert len(sent) == 2  # One round: both learners sent every fragment but no local tensor.
  assert sum(len(c.payload) for c in sent) == 2 * sum(len(f) for f in team.fragments)
  a, b = (fragments_lib.flatten(jax.device_get(l.params)) for l in team.learners)
  merged = team.syncer.global_flat()
  for k in merged:  # After the merge both learners hold the global model...
    np.testing.assert_array_equal(a[k], np.asarray(merged[k]), err_msg=k)
    np.testing.assert_array_equal(b[k], np.asarray(merged[k]), err_msg=k)
  assert not np.array_equal(a[LOCAL], b[LOCAL])  # ...but each keeps its own local state,
  assert np.abs(a[LOCAL]).max() > 0  # trained (it starts at zero),
  evaluated = fragments_lib.flatten(jax.device_get(rt.eval_params()))
  np.testing.assert_array_equal(evaluated[LOCAL], a[LOCAL])  # and evaluated with learner 0's.


def test_moe_under_decoupled_diloco_splits_experts_and_measures_routing(tmp_path):
  c = config("moe", "decoupled", steps=6, **{"diloco.split_experts": True,
                                              "diloco.num_fragments": 3, "train.eval_every": 3})
  cfg = config_lib.parse(c)
  rt = train.make_runtime(cfg, helpers.task(cfg), str(tmp_path / "built"))
  pieces = [k for f in rt.team.fragments for k in f if "#" in k]
  # Every stacked expert tensor is split into its 4 experts, spread over fragments.
  assert len(pieces) == 4 * 3 * cfg.model.num_layers
  assert len({p for p, f in enumerate(rt.team.fragments) for k in f if "#" in k}) > 1
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["final_eval_loss"] < helpers.task(cfg).chance_loss
  evals = [r for r in metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl")) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [3, 6]
  for r in evals:  # Two learners' routers, compared on a fixed probe batch.
    assert 0 < r["routing/topk_overlap_learners"] <= 1
    assert 0 < r["routing/topk_overlap_global"] <= 1
    assert 0 <= r["routing/routing_js_learners"] < 1
    assert 0 < r["routing/utilisation_entropy_global"] <= 1
    assert r["routing/router_distance"] > 0  # Learners trained apart since the last merge.
    assert 0 < r["routing/utilisation_entropy_after_merge"] <= 1
    assert math.isfinite(r["routing/loss_jump_after_alignment"])
    assert 0 < r["routing/topk_overlap_since_last_eval"] <= 1


# --- every task, every method ------------------------------------------------------

@pytest.mark.slow
# The byte-level GPT is trained by every method, and resumed bitwise with messages in
# flight, in test_train, test_lockstep and test_decoupled_resume.
@pytest.mark.parametrize("model", ["llama", "moe", "digits_vit"])
def test_every_task_trains_with_every_method_and_resumes_bitwise(tmp_path, monkeypatch, model):
  chance = helpers.task(config(model)).chance_loss
  runs = {}
  for method in METHODS:  # Each saves at the end; the decoupled run, resumed below, at 4 too.
    c = config(model, method, steps=8,
               **{"train.checkpoint_every": 4 if method == "decoupled" else 0})
    runs[method] = train.train_and_evaluate(c, str(tmp_path / method))
    assert runs[method]["final_eval_loss"] < chance, (method, runs[method])
  # Decoupled, killed at step 7 with messages in flight (last checkpoint at 4), resumed.
  helpers.preempt(monkeypatch, Decoupled, 7, c, tmp_path / "resumed")
  resumed = train.train_and_evaluate(c, str(tmp_path / "resumed"))
  assert resumed["resumed_from_step"] == 4
  assert resumed["final_eval_loss"] == runs["decoupled"]["final_eval_loss"]
  last = lambda run: [r for r in metrics_lib.read_jsonl(str(tmp_path / run / "metrics.jsonl"))
                      if "eval_loss" in r][-1]
  routing = {k: v for k, v in last("decoupled").items() if k.startswith("routing/")}
  assert bool(routing) == (model == "moe")
  for k, v in routing.items():  # What the router probe accumulated came back with the
    assert last("resumed")[k] == v, k  # checkpoint.
  helpers.assert_trees_equal(helpers.final_checkpoint(tmp_path / "resumed"),
                             helpers.final_checkpoint(tmp_path / "decoupled"))


@pytest.mark.parametrize("model", ["llama", "digits_vit"])
@pytest.mark.slow
def test_the_real_runtime_trains_every_task(tmp_path, model):
  """Learner and syncer processes' code, in-process on a fake clock (tests/dist_harness.py)."""
  c = config(model, "decoupled", steps=9, **{"sim.slow_learners": 0})
  run = InProcessRun(c, tmp_path, [1.0, 1.3])
  summary = run.run()
  task = helpers.task(c)
  assert summary["final_eval_loss"] < task.chance_loss
  assert min(summary["versions"]) >= 2
  if model == "digits_vit":
    assert 0.1 < summary["final_eval_accuracy"] <= 1.0
