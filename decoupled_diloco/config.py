"""Every configuration field, declared once with its default and meaning.

`base_config()` turns these dataclasses into the `ml_collections.ConfigDict`
that experiment files start from; `parse()` turns a (possibly overridden)
ConfigDict back into the typed, frozen, validated dataclasses that the library
uses. Nothing below `train.py` ever sees a ConfigDict.

Fields are checked from their type hints: a `Literal` field against its
choices, a number against `RANGES`; `_validate` holds the rules between
fields. This module imports nothing of the project (it is the bottom layer,
.importlinter), so the modules that use a choice keep their own copy of its
names; tests/test_reliability.py checks that the two agree.
"""

import dataclasses
import json
import math
import typing
from typing import Literal

import ml_collections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's shape (models/), checked on construction too; the task reads what it uses."""
  # Which model the task builds: `gpt`, `llama` or `moe` for `lm_bytes`; `vit` for `digits_vit`.
  name: str = "gpt"
  vocab_size: int = 256  # Tokens in the vocabulary (256: bytes).
  seq_len: int = 128  # Tokens in one training sequence.
  num_layers: int = 2  # Transformer blocks.
  d_model: int = 128  # Width of the residual stream.
  num_heads: int = 4  # Attention heads; each is d_model / num_heads wide.
  mlp_dim: int = 512  # Hidden width of each block's MLP.
  dtype: Literal["float32", "bfloat16"] = "float32"  # Compute dtype; parameters stay float32.
  num_kv_heads: int = 0  # llama: key/value heads of grouped-query attention (0: num_heads).
  tie_embeddings: bool = False  # llama: the output layer is the embedding table, transposed.
  qk_norm: bool = False  # llama: RMS-normalise queries and keys per head.
  rope_theta: float = 10000.0  # llama: base of the rotary position embedding's frequencies.
  num_experts: int = 8  # moe: routed SwiGLU experts in each block, each mlp_dim wide.
  experts_per_token: int = 2  # moe: experts each token is sent to (top-k; gates sum to 1).
  capacity_factor: float = 1.25  # moe: ceil(factor * L * k / E) slots per expert and row.
  shared_expert: bool = False  # moe: a dense SwiGLU MLP every token also goes through.
  load_balance_weight: float = 0.01  # moe: weight of the Switch load-balance loss in the loss.
  router_z_weight: float = 0.001  # moe: weight of the router z-loss (mean logsumexp(logits)^2).
  # moe: after each inner step every router_bias moves this much toward the experts below
  # their share, by the sign of the gap (DeepSeek-V3's loss-free balancing; 0: off).
  router_bias_rate: float = 0.0
  patch_size: int = 4  # vit: side of a square image patch, in pixels.
  pool: Literal["cls", "mean"] = "mean"  # vit: classify from a class token or the mean token.
  posemb: Literal["learned", "sincos"] = "learned"  # vit: learned or fixed 2-D sin/cos positions.

  def __post_init__(self):
    for name, hint in typing.get_type_hints(ModelConfig).items():
      _check_field(f"model.{name}", hint, getattr(self, name))
    if self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} must be divisible by"
                       f" model.num_heads={self.num_heads}.")
    if self.num_kv_heads and self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide"
                       f" model.num_heads={self.num_heads}.")
    if self.experts_per_token > self.num_experts:
      raise ValueError(f"model.experts_per_token={self.experts_per_token} must be at most"
                       f" model.num_experts={self.num_experts}: a token picks distinct experts.")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """What is trained: a task (model, loss, data) by name; tasks/."""
  name: str = "lm_bytes"  # `lm_bytes` (a byte-level language model on data.path) or `digits_vit`.
  module: str = ""  # A dotted module outside the package to import first (it registers its task).


PRESETS = {  # Model sizes for `use_preset`.
    "tiny": dict(num_layers=2, d_model=128, num_heads=4, mlp_dim=512, seq_len=128),
    "small": dict(num_layers=6, d_model=384, num_heads=6, mlp_dim=1536, seq_len=256),
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = "embedded"  # A prepared dataset's directory (python -m decoupled_diloco.data.prepare), `embedded` (this Python's stdlib source), a text file/dir/glob, or a .npy of uint8/uint16 tokens.
  eval_percent: float = 5.0  # Share of files (of tokens for .npy / single files) held out for eval; a prepared dataset has its own split.
  batch_size: int = 32  # Global batch in sequences per inner step, summed over all learners.
  # How the training examples are dealt to learners (data/reader.py): `random` (each epoch a seeded permutation of all, dealt round-robin) or `contiguous` (learner m takes the m-th block: the non-IID ablation).
  sharding: Literal["random", "contiguous"] = "random"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300  # Global batches (data.batch_size sequences) to train on: an inner step of every learner, an optimizer step in data-parallel; a learner on part of its slices takes that part of a step (sim.budget).
  log_every: int = 25  # Steps between progress lines.
  eval_every: int = 100  # Steps between evals of the global model (0: only at the end).
  eval_batches: int = 16  # Held-out batches per eval (fixed windows, same every time).
  checkpoint_every: int = 100  # Steps between checkpoints (0: only at the end).
  keep_checkpoints: int = 2  # Most recent checkpoints kept.
  spike_factor: float = 3.0  # A loss above this multiple of its running mean is divergence (0: only NaN/Inf): the run stops; a decoupled learner restarts from the global model (divergence.py).


@dataclasses.dataclass(frozen=True)
class InnerOptConfig:
  lr: float = 3e-3  # Peak AdamW learning rate.
  warmup_steps: int = 30  # Linear warmup from 0.
  final_lr_fraction: float = 0.1  # Cosine decays to this fraction of `lr` at the last step.
  b1: float = 0.9  # Adam beta1.
  b2: float = 0.95  # Adam beta2.
  weight_decay: float = 0.1  # Decoupled weight decay.
  clip_norm: float = 1.0  # Global gradient-norm clip (0: off).


@dataclasses.dataclass(frozen=True)
class OuterOptConfig:
  name: Literal["nesterov", "sgd", "adam"] = "nesterov"  # `nesterov` (SGD + Nesterov momentum), `sgd` (plain or heavy-ball) or `adam`.
  lr: float = 0.7  # Outer learning rate applied to the merged pseudo-gradient.
  momentum: float = 0.9  # Momentum for `nesterov` / `sgd` (0: none); beta1 for `adam`.


@dataclasses.dataclass(frozen=True)
class DilocoConfig:
  num_learners: int = 4  # M: independent learners, one island each.
  num_fragments: int = 1  # P: parameter fragments synced on a staggered schedule.
  sync_every: int = 25  # H: inner steps between two syncs of one fragment.
  overlap: int = 0  # tau: steps between sending a fragment and applying the merged result.
  alpha: float = 0.0  # Mixing on alignment: theta <- alpha*theta_local + (1-alpha)*global.
  fragmentation: Literal["balanced", "layer", "strided"] = "balanced"  # `balanced` (bin-packing), `layer` or `strided`.
  merge: Literal["mean", "rda", "rda_everywhere"] = "mean"  # `mean`, `rda` (radial-directional; embeddings on mean) or `rda_everywhere`.
  weighting: Literal["uniform", "tokens", "tokens2_per_step"] = "uniform"  # Merge weights: `uniform`, `tokens` or `tokens2_per_step`.
  max_abs_delta: float = 1e4  # Contributions with any |value| above this are rejected as absurd.
  quorum: int = 0  # K: distinct live learners a round needs before it may close (0: all, i.e. M).
  grace_gamma: float = 0.0  # gamma: grace-window safety factor (0: merge as soon as the quorum is met).
  grace_max_s: float = 60.0  # Upper bound of the grace window, virtual seconds.
  max_staleness: int = -1  # Reject contributions whose base is more versions old than this (-1: admit all).
  late: Literal["next", "drop", "reject"] = "next"  # A contribution for a round already closed: `next` (joins the open round), `drop` or `reject`.
  staleness_weighting: Literal["none", "inverse"] = "none"  # `inverse`: weight / (1 + versions stale) (Zhang et al. 2016, arXiv 1511.05950).
  # Largest share of a round's merge weight one learner may have (at least 1 / contributors).
  # 0.5: no single learner outweighs all the others together, whatever it claims.
  max_weight_share: float = 0.5
  max_norm_ratio: float = 10.0  # A delta's norm may be this many times the median of the other learners' latest ones (0: off).
  norm_bound: Literal["clip", "reject"] = "clip"  # Past `max_norm_ratio`: `clip` the delta to it, or `reject` it.
  # Parameter roles (tasks/base.py ROLES) that `merge=rda` keeps on the weighted mean.
  mean_roles: tuple[str, ...] = ("embed",)
  # Stacked experts ([exp, ...], role `expert`) enter the fragmentation one expert at a
  # time, so a fragment can hold some of a layer's experts (algorithm/fragments.py).
  split_experts: bool = False


# Codecs of algorithm/codecs.py (its CODEC_NAMES).
CodecName = Literal["fp32", "bf16", "fp8", "int8", "int4", "e3m0", "int2", "sign", "topk"]


@dataclasses.dataclass(frozen=True)
class CodecConfig:
  up: CodecName = "fp32"  # Pseudo-gradient codec, learner -> syncer (see algorithm/codecs.py).
  down: CodecName = "fp32"  # Published-fragment codec, syncer -> learner.
  error_feedback: bool = False  # Learners carry what the up codec dropped into later sends.
  # With error feedback, where a learner restarts after a sync: `offset` (the global
  # fragment minus its unsent residual, so its next delta holds the residual) or
  # `global` (the global fragment; the residual is added to the next send, as in
  # SparseLoCo/MuLoCo). See algorithm/learner.py and experiments/results/quality.md.
  feedback_restart: Literal["offset", "global"] = "offset"
  # beta: share of its residual a learner carries into the next round (1: all of it).
  # Default measured best over codecs (experiments/results/quality.md).
  feedback_decay: float = 0.5
  block_size: int = 256  # Values per scale for block codecs (int8/int4/e3m0/int2/sign/topk).
  topk_fraction: float = 0.01  # Share of each block that `topk` keeps.
  topk_values: Literal["fp32", "bf16", "int8"] = "fp32"  # How `topk` sends the values it keeps: `fp32`, `bf16` or `int8`.


@dataclasses.dataclass(frozen=True)
class SimConfig:
  step_seconds: float = 1.0  # Virtual seconds of one inner step on a whole learner (0: measure the real step).
  slow_learners: int = 0  # How many learners (the last ones) run on slower hardware.
  slow_factor: float = 1.0  # Step-time multiplier of the slow learners (1.18: 18% slower).
  noise: float = 0.0  # Lognormal sigma of per-step time noise (0.1: about 10%).
  latency_s: float = 0.0  # One-way message latency, virtual seconds.
  bandwidth_gbps: float = 0.0  # Per-learner link bandwidth, gigabits/s (0: unlimited).
  syncer_seconds: float = 0.0  # Virtual time of one merge + outer step.
  learners_wait: bool = False  # Learners wait for fragment p at send step + tau (synchronous semantics).
  event_log: bool = True  # Write every event to `events.jsonl` in the workdir.
  # What `train.steps` counts in the simulator: `tokens`, global batches of data (a
  # learner's step on part of its batch, `chaos.elastic_batch=shrink`, counts as that
  # part), or `inner_steps`, M inner steps whatever their batch (the earlier rule).
  budget: Literal["tokens", "inner_steps"] = "tokens"


@dataclasses.dataclass(frozen=True)
class ChaosConfig:
  enabled: bool = False  # Inject slice failures (decoupled runtime).
  slices_per_learner: int = 4  # Each learner is this many slices; it runs on the ones that are up.
  chips_per_slice: int = 256  # Chips per slice (goodput is in chip-time).
  mtbi_chip_hours: float = 8766.0  # Mean time between interruptions of one chip (1 year).
  repair_median_s: float = 2400.0  # Median repair time of a failed slice (lognormal).
  repair_sigma: float = 1.5  # Lognormal sigma of repair times (heavy tail).
  reconfiguration_s: float = 9.4  # Pause when a learner loses or regains a slice.
  restart_s: float = 71.1  # Pause when a learner restarts from zero slices.
  seed: int = 0  # Seeds the failure draws (independent of `seed`).
  # A learner back from losing every slice has lost its memory: `fresh` inner optimizer
  # state (schedule at the global step), or `kept` (optimistic; for the ablation only).
  rejoin_optimizer: Literal["fresh", "kept"] = "fresh"
  # A learner restarted with a fresh inner optimizer (rejoin, or divergence in any runtime)
  # scales its learning rate by a linear re-warmup over this many steps (0: none; BUILD.md,
  # "Decoupled DiLoCo", measures it).
  rewarmup_steps: int = 0
  # A learner on fewer slices: `shrink` its batch in proportion and keep its step time
  # (what an elastic job does), or `keep` the batch and step proportionally slower.
  elastic_batch: Literal["shrink", "keep"] = "shrink"


@dataclasses.dataclass(frozen=True)
class IslandsConfig:
  """Each island's mesh (islands.py): `data` takes the devices these leave; one may be -1."""
  fsdp: int = 1  # Ways each parameter is split along its `embed` axis (FSDP; the batch too).
  tensor: int = 1  # Ways split along `heads`, `kv_heads`, `mlp`, `vocab` (tensor parallelism).
  expert: int = 1  # Ways stacked experts are split along `exp` (the batch too).


@dataclasses.dataclass(frozen=True)
class DistConfig:
  """The real runtime: learner and syncer processes over a mailbox (runtime/dist/)."""
  lease_s: float = 10.0  # Lease lifetime: a process silent this long is taken as down.
  poll_s: float = 0.05  # Seconds between two polls of the mailbox (learners' courier, syncer).
  startup_s: float = 120.0  # A learner never seen counts as live this long after the syncer starts.
  resume_max_versions: int = 2  # A restarted learner resumes from its checkpoint if no fragment moved on more versions than this since; else it rejoins from the global model.
  gc_every: int = 10  # Commits of a fragment between two garbage collections of its old keys.
  keep_versions: int = 4  # Publications kept behind the newest (for learners catching up).
  min_step_s: float = 0.0  # A learner's step takes at least this long (emulates slower islands for tiny demo models; 0: off).
  store_timeout_s: float = 10.0  # Deadline of one mailbox operation: an unreachable store (no credentials, a wrong endpoint) fails this fast.
  store_retry_s: float = 300.0  # Store errors that may pass (permissions, unavailable, timeouts) are retried this long before the process stops.


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0  # Seeds parameter init and data order.
  # `data_parallel`, `lockstep` (DiLoCo family) or `decoupled` (event-driven).
  runtime: Literal["data_parallel", "lockstep", "decoupled"] = "data_parallel"
  task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  inner: InnerOptConfig = dataclasses.field(default_factory=InnerOptConfig)
  outer: OuterOptConfig = dataclasses.field(default_factory=OuterOptConfig)
  diloco: DilocoConfig = dataclasses.field(default_factory=DilocoConfig)
  codec: CodecConfig = dataclasses.field(default_factory=CodecConfig)
  sim: SimConfig = dataclasses.field(default_factory=SimConfig)
  chaos: ChaosConfig = dataclasses.field(default_factory=ChaosConfig)
  islands: IslandsConfig = dataclasses.field(default_factory=IslandsConfig)
  dist: DistConfig = dataclasses.field(default_factory=DistConfig)


def base_config() -> ml_collections.ConfigDict:
  """All fields at their defaults (the `tiny` model), as a locked ConfigDict."""
  c = ml_collections.ConfigDict(dataclasses.asdict(Config()))
  c.lock()
  return c


def use_preset(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets `c.model` to a named size preset (`tiny`, `small`)."""
  if name not in PRESETS:
    raise ValueError(f"model preset {name!r} is unknown; choose from {sorted(PRESETS)}.")
  c.model.update(PRESETS[name])


def use_small_run(c: ml_collections.ConfigDict) -> None:
  """The `small` variant every experiment offers: the `small` model, 5000 steps.

  Sized for one accelerator host (islands = device groups); the outer momentum
  goes back to DiLoCo's 0.9, which needs more outer steps than a CPU run has.
  """
  use_preset(c, "small")
  c.train.update(steps=5000, eval_every=500, checkpoint_every=500)
  c.data.batch_size = 64
  c.inner.lr = 1e-3
  c.outer.momentum = 0.9


def parse(c: ml_collections.ConfigDict) -> Config:
  """Validates a ConfigDict and returns the typed Config."""
  cfg = _build(Config, c.to_dict(), "")
  _validate(cfg)
  return cfg


def _build(cls, values, prefix: str):
  """`cls` from a dict, each field checked against its type hint as it is read."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - fields
  if unknown:
    raise ValueError(f"{prefix.rstrip('.') or 'config'}: unknown field(s) {sorted(unknown)};"
                     f" allowed: {sorted(fields)}.")
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    if dataclasses.is_dataclass(hints[name]):
      kwargs[name] = _build(hints[name], value, f"{prefix}{name}.")
    else:
      _check_field(f"{prefix}{name}", hints[name], value)
      kwargs[name] = value
  return cls(**kwargs)


# The range of every numeric field, as an interval; floats must also be finite.
# tests/test_reliability.py checks that every int and float field is listed.
_AT_LEAST_0, _AT_LEAST_1, _POSITIVE = "[0, inf)", "[1, inf)", "(0, inf)"
RANGES = {
    "seed": _AT_LEAST_0,
    **{f"model.{name}": _AT_LEAST_1 for name in ("vocab_size", "seq_len", "num_layers",
                                                 "d_model", "num_heads", "mlp_dim",
                                                 "patch_size")},
    "model.num_kv_heads": _AT_LEAST_0, "model.rope_theta": _POSITIVE,
    "model.num_experts": _AT_LEAST_1, "model.experts_per_token": _AT_LEAST_1,
    "model.capacity_factor": _POSITIVE, "model.load_balance_weight": _AT_LEAST_0,
    "model.router_z_weight": _AT_LEAST_0, "model.router_bias_rate": _AT_LEAST_0,
    "data.eval_percent": "(0, 100)", "data.batch_size": _AT_LEAST_1,
    "train.steps": _AT_LEAST_1, "train.log_every": _AT_LEAST_1,
    "train.eval_every": _AT_LEAST_0, "train.eval_batches": _AT_LEAST_1,
    "train.checkpoint_every": _AT_LEAST_0, "train.keep_checkpoints": _AT_LEAST_1,
    "train.spike_factor": _AT_LEAST_0,  # And not in (0, 1]: _OFF_OR_ABOVE_1.
    "inner.lr": _POSITIVE, "inner.warmup_steps": _AT_LEAST_0,
    "inner.final_lr_fraction": "[0, 1]", "inner.b1": "[0, 1)", "inner.b2": "[0, 1)",
    "inner.weight_decay": _AT_LEAST_0, "inner.clip_norm": _AT_LEAST_0,
    "outer.lr": _POSITIVE, "outer.momentum": "[0, 1)",
    "diloco.num_learners": _AT_LEAST_1, "diloco.num_fragments": _AT_LEAST_1,
    "diloco.sync_every": _AT_LEAST_1, "diloco.overlap": _AT_LEAST_0, "diloco.alpha": "[0, 1)",
    "diloco.max_abs_delta": _POSITIVE, "diloco.quorum": _AT_LEAST_0,
    "diloco.grace_gamma": _AT_LEAST_0, "diloco.grace_max_s": _AT_LEAST_0,
    "diloco.max_staleness": "[-1, inf)", "diloco.max_weight_share": "(0, 1]",
    "diloco.max_norm_ratio": _AT_LEAST_0,  # And not in (0, 1]: _OFF_OR_ABOVE_1.
    "codec.feedback_decay": "[0, 1]", "codec.block_size": _AT_LEAST_1,
    "codec.topk_fraction": "(0, 1]",
    "sim.step_seconds": _AT_LEAST_0, "sim.slow_learners": _AT_LEAST_0,
    "sim.slow_factor": _POSITIVE, "sim.noise": _AT_LEAST_0, "sim.latency_s": _AT_LEAST_0,
    "sim.bandwidth_gbps": _AT_LEAST_0, "sim.syncer_seconds": _AT_LEAST_0,
    "chaos.slices_per_learner": _AT_LEAST_1, "chaos.chips_per_slice": _AT_LEAST_1,
    "chaos.mtbi_chip_hours": _POSITIVE, "chaos.repair_median_s": _POSITIVE,
    "chaos.repair_sigma": _AT_LEAST_0, "chaos.reconfiguration_s": _AT_LEAST_0,
    "chaos.restart_s": _AT_LEAST_0, "chaos.seed": _AT_LEAST_0,
    "chaos.rewarmup_steps": _AT_LEAST_0,
    "dist.lease_s": _POSITIVE, "dist.poll_s": _POSITIVE, "dist.startup_s": _AT_LEAST_0,
    "dist.resume_max_versions": _AT_LEAST_0, "dist.gc_every": _AT_LEAST_1,
    "dist.keep_versions": _AT_LEAST_1, "dist.min_step_s": _AT_LEAST_0,
    "dist.store_timeout_s": _POSITIVE, "dist.store_retry_s": _AT_LEAST_0,
    # And not 0, and at most one -1 (all of an island's devices the others leave): _validate.
    "islands.fsdp": "[-1, inf)", "islands.tensor": "[-1, inf)", "islands.expert": "[-1, inf)",
}
# Multiples of a running value, or 0 for off: below 1 every ordinary value would trip them.
_OFF_OR_ABOVE_1 = {"train.spike_factor": "a multiple of the running mean loss",
                   "diloco.max_norm_ratio": "a multiple of the running norm"}


def numeric_fields(cls=None, prefix: str = "") -> dict[str, type]:
  """Every int and float field of `cls` (default `Config`), by dotted name."""
  out = {}
  for name, hint in typing.get_type_hints(cls or Config).items():
    if dataclasses.is_dataclass(hint):
      out.update(numeric_fields(hint, f"{prefix}{name}."))
    elif hint in (int, float):
      out[f"{prefix}{name}"] = hint
  return out


def choice_fields(cls=None, prefix: str = "") -> dict[str, tuple[str, ...]]:
  """Every `Literal` field of `cls` (default `Config`), by dotted name, with its choices."""
  out = {}
  for name, hint in typing.get_type_hints(cls or Config).items():
    if dataclasses.is_dataclass(hint):
      out.update(choice_fields(hint, f"{prefix}{name}."))
    elif typing.get_origin(hint) is Literal:
      out[f"{prefix}{name}"] = typing.get_args(hint)
  return out


def _in_interval(value, interval: str) -> bool:
  lo, hi = (float(x) for x in interval[1:-1].split(","))
  return ((lo <= value if interval[0] == "[" else lo < value)
          and (value <= hi if interval[-1] == "]" else value < hi))


def _check_field(name: str, hint, value) -> None:
  """One field against its type hint: a choice of its `Literal`, a number in `RANGES`."""
  if typing.get_origin(hint) is Literal:
    if value not in typing.get_args(hint):
      raise ValueError(f"{name}={value!r} is unknown; choose from {typing.get_args(hint)}.")
  elif hint in (int, float):
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (hint is int and not isinstance(value, int)):
      raise ValueError(f"{name}={value!r} must be {'an integer' if hint is int else 'a number'}.")
    if not math.isfinite(value):
      raise ValueError(f"{name}={value} must be a finite number.")
    if name in RANGES and not _in_interval(value, RANGES[name]):
      raise ValueError(f"{name}={value} must be in {RANGES[name]}.")
    if name in _OFF_OR_ABOVE_1 and 0 < value <= 1:
      raise ValueError(f"{name}={value} must be 0 (off) or above 1 ({_OFF_OR_ABOVE_1[name]}).")


# What algorithm/codecs.py allows a top-k block: its indices are uint16.
_TOPK_MAX_BLOCK = 65536


def _validate(cfg: Config) -> None:
  """The rules between fields (each field alone was checked by `_build`)."""
  d, codec = cfg.diloco, cfg.codec
  if d.overlap >= d.sync_every:
    raise ValueError(f"diloco.overlap={d.overlap} must be in [0, diloco.sync_every={d.sync_every}).")
  if d.quorum > d.num_learners:
    raise ValueError(f"diloco.quorum={d.quorum} must be in [0, diloco.num_learners={d.num_learners}].")
  if cfg.sim.slow_learners > d.num_learners:
    raise ValueError(f"sim.slow_learners={cfg.sim.slow_learners} must be in"
                     f" [0, diloco.num_learners={d.num_learners}].")
  topk = [f"codec.{field}='topk'" for field in ("up", "down") if getattr(codec, field) == "topk"]
  if topk and codec.block_size > _TOPK_MAX_BLOCK:
    raise ValueError(f"codec.block_size={codec.block_size} must be at most {_TOPK_MAX_BLOCK} for"
                     f" topk, whose indices are uint16 ({' and '.join(topk)}).")
  sizes = {f"islands.{f}": getattr(cfg.islands, f) for f in ("fsdp", "tensor", "expert")}
  if 0 in sizes.values() or list(sizes.values()).count(-1) > 1:
    raise ValueError(f"{sizes}: each is a number of devices, at least 1, or -1 (all those the"
                     " others leave) for at most one of them.")
  if cfg.chaos.enabled and cfg.runtime != "decoupled":
    raise ValueError(f"chaos.enabled=True needs runtime='decoupled' (got {cfg.runtime!r}).")
  if cfg.runtime != "data_parallel" and cfg.data.batch_size % d.num_learners:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by"
                     f" diloco.num_learners={d.num_learners} (the global batch is split).")


def differences(stored, text: str, most: int = 4) -> str:
  """What differs between two JSON run records (`checkpointing.run_record`), by dotted key,
  with both values (the first `most`): "differs in a.b: 1 there, 2 here; ..."."""
  def flat(value, prefix=""):
    if not isinstance(value, dict):
      return {prefix: value}
    return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
  try:
    old, new = flat(json.loads(stored)), flat(json.loads(text))
  except (TypeError, ValueError):
    return "is another config"
  keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  shown = "; ".join(f"{k.rstrip('.')}: {old.get(k)!r} there, {new.get(k)!r} here"
                    for k in keys[:most])
  return f"differs in {shown}" + (f" and {len(keys) - most} more" if len(keys) > most else "")
