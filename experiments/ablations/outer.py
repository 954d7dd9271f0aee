r"""The outer loop tuned for small per-learner batches: DiLoCo (M = 4) against data-parallel.

At the quickstart's scale (tiny model, global batch 32 x 128 bytes, 300 steps,
1.2M tokens) DiLoCo with M = 4 trails data-parallel by about 12%. Each
learner's inner AdamW sees 8 sequences a step; with H = 25 the run has 12
outer steps. Every cell samples the whole corpus (`data.sharding=random`, the
default) and trains on the same tokens as data-parallel. Stages, each a
sweep of its own (one seed first, then four at the cells that matter):

  sync_every   H = 5, 10, 25 (today's default), 50, at today's outer optimizer
               (Nesterov, lr 0.7, momentum 0.5)
  outer        outer lr 0.5 / 0.7 / 1.0 / 1.4 x momentum 0 / 0.5 / 0.9, at H = BEST_H
  inner        the inner lr x 0.5 / 1 / 2, at the best outer cell
  learners     at the tuned outer loop: M = 1 (plain, and with outer momentum), M = 2,
               M = 4 with H = 1 and 2, Decoupled DiLoCo (its default and tuned: P = H = 5,
               plain averaging)
  batch        data-parallel and tuned DiLoCo at global batch 32, 64, 128 sequences,
               equal tokens (300, 150, 75 steps; warmup scaled with them)
  confirm      data-parallel, the earlier default, and the best cells, 4 seeds, with the
               precision check ("sign beats fp32") re-run at the tuned setting
  scale        data-parallel, default and tuned DiLoCo and tuned Decoupled DiLoCo (no
               failures) at 1x, 4x and 16x the tokens
               (300, 1200, 4800 steps; the schedules stretch with them)
  scale_llama  data-parallel and tuned DiLoCo for the Llama decoder (experiments/llama.py)

CPU (about a minute a run on an idle 2-core machine):
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:sync_every --workdir=runs/ablations/outer_h --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:outer --workdir=runs/ablations/outer_lr --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:inner --workdir=runs/ablations/outer_inner --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:learners --workdir=runs/ablations/outer_learners --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:batch --workdir=runs/ablations/outer_batch --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:confirm --workdir=runs/ablations/outer_confirm --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:scale --workdir=runs/ablations/outer_scale --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:scale_llama --workdir=runs/ablations/outer_scale_llama --jobs=1
  python -m experiments.report runs/ablations/outer_h runs/ablations/outer_lr runs/ablations/outer_inner \
      runs/ablations/outer_learners runs/ablations/outer_batch runs/ablations/outer_confirm runs/ablations/outer_scale \
      runs/ablations/outer_scale_llama --into=experiments/results/ablations

Results: experiments/results/ablations/report.md ("Outer optimization", "Gap to
data-parallel vs scale").
"""

from experiments import decoupled_diloco, diloco, sweep

DILOCO = "experiments/diloco.py"
DP = "experiments/data_parallel.py"
DECOUPLED = "experiments/decoupled_diloco.py:nochaos"
LLAMA = "experiments/llama.py"
DEFAULT = diloco.EARLIER  # H = 25, Nesterov lr 0.7, momentum 0.5: its default before.
EVALS = {"train.eval_every": 50}  # Loss-vs-tokens curves.
# The evidence each later stage starts from (stage `sync_every`, `outer`; see the report).
BEST_H = 5
BEST_OUTER = {"outer.lr": 1.0, "outer.momentum": 0.0}  # Plain averaging, every BEST_H steps.
TUNED = {"diloco.sync_every": BEST_H, **BEST_OUTER}
# Decoupled DiLoCo syncs one of P fragments a step, so each fragment every H = P steps.
DECOUPLED_TUNED = {"diloco.num_fragments": BEST_H, **TUNED}
DECOUPLED_EARLIER = decoupled_diloco.EARLIER  # P = H = 10, Nesterov 0.7 / 0.5.
DECOUPLED_BEST = {**DECOUPLED_TUNED, "outer.lr": 0.8}  # Stage `confirm`; its default now.
SEEDS = (0, 1, 2, 3)
SCALES = (1, 4, 16)


def _cell(name: str, overrides: dict, config: str = DILOCO) -> dict:
  return sweep.cell(name, config, {**EVALS, **overrides})


def _batch(b: int) -> dict:
  """Global batch `b` at the quickstart's tokens (32 x 300 sequences), schedules scaled."""
  return {"data.batch_size": b, "train.steps": 300 * 32 // b,
          "train.eval_every": 50 * 32 // b, "inner.warmup_steps": 30 * 32 // b}


def _stage(arg: str) -> tuple[list[dict], str, tuple, str]:
  """(cells, title, seeds, notes) of one stage."""
  dp = sweep.cell("data_parallel", DP, EVALS)
  if arg == "sync_every":
    cells = [dp] + [_cell(f"h{h}", {**DEFAULT, "diloco.sync_every": h}) for h in (5, 10, 25, 50)]
    return cells, "DiLoCo M = 4: how often to sync (H)", (0,), (
        "Outer Nesterov lr 0.7, momentum 0.5 (`experiments/diloco.py` then); H inner"
        " steps between syncs, so 300 / H outer steps.")
  if arg == "outer":
    cells = [dp] + [
        _cell(f"lr{lr}_m{m}", {"diloco.sync_every": BEST_H, "outer.lr": lr,
                                 "outer.momentum": m})
        for lr in (0.5, 0.7, 1.0, 1.4) for m in (0.0, 0.5, 0.9)]
    return cells, f"DiLoCo M = 4, H = {BEST_H}: the outer optimizer", (0,), (
        f"Nesterov momentum at H = {BEST_H} (the best of the H stage).")
  if arg == "inner":
    cells = [dp] + [_cell(f"inner_x{f:g}", {**TUNED, "inner.lr": 3e-3 * f})
                    for f in (0.5, 1.0, 2.0)]
    return cells, "DiLoCo M = 4, tuned outer loop: the inner learning rate", (0,), (
        "AdamW peak lr 3e-3 (the data-parallel setting) scaled for 8 sequences a learner.")
  if arg == "learners":
    m1 = {"diloco.num_learners": 1}
    cells = [dp,
             _cell("m1_tuned", {**TUNED, **m1}),
             _cell("m1_h5_lr1.0_m0.5", {**TUNED, **m1, "outer.momentum": 0.5}),
             _cell("m1_h5_lr0.7_m0.9", {**TUNED, **m1, "outer.lr": 0.7, "outer.momentum": 0.9}),
             _cell("m1_h25_lr0.7_m0.9", {**m1, "diloco.sync_every": 25, "outer.lr": 0.7,
                                            "outer.momentum": 0.9}),
             _cell("m2_tuned", {**TUNED, "diloco.num_learners": 2}),
             _cell("m4_h1", {**TUNED, "diloco.sync_every": 1}),
             _cell("m4_h2", {**TUNED, "diloco.sync_every": 2}),
             _cell("m4_tuned", TUNED),
             _cell("decoupled_default", DECOUPLED_EARLIER, DECOUPLED),
             _cell("decoupled_tuned", DECOUPLED_TUNED, DECOUPLED)]
    return cells, "DiLoCo M = 1, 2, 4 and Decoupled DiLoCo at the tuned outer loop", (0,), (
        f"Tuned: H = {BEST_H}, outer lr 1.0, momentum 0 (plain averaging). M = 1 with plain"
        " averaging is data-parallel up to rounding; with outer momentum it is a lookahead"
        " optimizer. Decoupled DiLoCo: `experiments/decoupled_diloco.py:nochaos` with its"
        " earlier outer loop (`default`: P = H = 10, Nesterov lr 0.7, momentum 0.5) and"
        f" tuned as DiLoCo (P = H = {BEST_H}, plain averaging).")
  if arg == "batch":
    cells = [c for b in (32, 64, 128) for c in (
        sweep.cell("data_parallel" if b == 32 else f"data_parallel_b{b}", DP, _batch(b)),
        _cell(f"tuned_b{b}", {**TUNED, **_batch(b)}))]
    return cells, "DiLoCo M = 4 and data-parallel vs the global batch, equal tokens", (0,), (
        "Global batch in sequences of 128 bytes, summed over the 4 learners; the inner lr"
        " stays 3e-3; warmup, evals and steps scale with 32 / batch.")
  if arg == "confirm":
    sign = {"codec.up": "sign"}
    cells = [dp, _cell("default", DEFAULT), _cell("tuned", TUNED),
             _cell("m1_default", {**DEFAULT, "diloco.num_learners": 1}),
             _cell("m2_tuned", {**TUNED, "diloco.num_learners": 2}),
             _cell("decoupled_default", DECOUPLED_EARLIER, DECOUPLED),
             _cell("decoupled_tuned", DECOUPLED_TUNED, DECOUPLED),
             _cell("decoupled_default_sign", {**DECOUPLED_EARLIER, **sign}, DECOUPLED),
             _cell("decoupled_tuned_sign", {**DECOUPLED_TUNED, **sign}, DECOUPLED),
             # Sign's scale (a block's mean |x|) is sqrt(2 / pi) ~ 0.8 of its rms for
             # Gaussian values: is sign's gain only a shorter outer step?
             _cell("decoupled_tuned_lr0.8", DECOUPLED_BEST, DECOUPLED)]
    return cells, "Outer optimization: default vs tuned, 4 seeds", SEEDS, (
        "Paired by seed: each seed's init and data order are shared by every cell."
        " DiLoCo M = 4 (`default`: H = 25, Nesterov lr 0.7, momentum 0.5; `tuned`: H ="
        f" {BEST_H}, plain averaging); `m1_default`: one learner on the whole batch with the"
        " H = 25 outer loop (the tuned one, plain averaging, leaves one learner's training as"
        " it is); Decoupled DiLoCo M = 4 (`default`: P = H = 10, Nesterov lr 0.7, momentum"
        f" 0.5; `tuned`: P = H = {BEST_H}, plain averaging), with fp32 and with 1-bit (`sign`)"
        " pseudo-gradients: the precision check at both outer loops; `decoupled_tuned_lr0.8`:"
        " fp32 with the outer step sign's scale gives Gaussian values (now Decoupled DiLoCo's"
        " default).")
  if arg in ("scale", "scale_llama"):
    kinds = (("data_parallel", DP, {}), ("default", DILOCO, DEFAULT), ("tuned", DILOCO, TUNED),
             ("decoupled", DECOUPLED, DECOUPLED_BEST))
    if arg == "scale_llama":
      kinds = (("data_parallel", LLAMA + ":data_parallel", {}),
               ("tuned", LLAMA + ":diloco", TUNED))
    cells = [sweep.cell(f"{name}_x{x}", config, {**overrides, "train.steps": 300 * x,
                                                  "train.eval_every": 50 * x})
             for x in SCALES for name, config, overrides in kinds]
    model = ", the Llama decoder of `experiments/llama.py`" if arg == "scale_llama" else ""
    return cells, f"Gap to data-parallel vs scale (DiLoCo M = 4{model})", (0,), (
        "Each budget is its own run (warmup, cosine decay and outer steps scale with it)."
        " The table compares every row with data-parallel at 1x; the figure compares each"
        " with data-parallel at its own tokens (the gap).")
  raise ValueError(f"stage {arg!r} is unknown; choose sync_every, outer, inner, learners,"
                   " batch, confirm, scale or scale_llama"
                   " (experiments/ablations/outer.py:sync_every).")


def get_config(arg=None):
  arg = arg or "sync_every"
  cells, title, seeds, notes = _stage(arg)
  scale = arg.startswith("scale")
  checks = {
      "learners": [
          dict(claim="DiLoCo M = 1 with plain averaging is data-parallel (within 0.01%)",
               kind="within", a="m1_tuned", b="data_parallel", tol=1e-4),
          dict(claim="Outer momentum makes M = 1 beat data-parallel (H = 25, lr 0.7,"
               " momentum 0.9)", kind="not_worse", a="m1_h25_lr0.7_m0.9", b="data_parallel",
               tol=0.0),
          dict(claim="M = 4 closes on data-parallel as H falls (5, 2, 1)", kind="increasing",
               cells=["m4_tuned", "m4_h2", "m4_h1"]),
          dict(claim="Tuned DiLoCo M = 4 within 5% of data-parallel at H = 1", kind="within",
               a="m4_h1", b="data_parallel", tol=0.05)],
      "batch": [dict(claim=f"Tuned DiLoCo (M = 4) within 5% of data-parallel at global batch {b}",
                     kind="within", a=f"tuned_b{b}",
                     b="data_parallel" if b == 32 else f"data_parallel_b{b}", tol=0.05)
                for b in (32, 64, 128)],
      "confirm": [
          dict(claim="Tuned DiLoCo (M = 4) beats the H = 25 default", kind="worse",
               a="default", b="tuned", tol=0.0),
          dict(claim="Tuned DiLoCo (M = 4) within 5% of data-parallel, 1x tokens",
               kind="within", a="tuned", b="data_parallel", tol=0.05),
          dict(claim="DiLoCo M = 1 at or below data-parallel", kind="not_worse",
               a="m1_default", b="data_parallel", tol=0.0),
          dict(claim="Tuned DiLoCo M = 2 within 5% of data-parallel, 1x tokens",
               kind="within", a="m2_tuned", b="data_parallel", tol=0.05),
          dict(claim="Tuned Decoupled DiLoCo (P = H = 5, plain averaging) beats its default",
               kind="worse", a="decoupled_default", b="decoupled_tuned", tol=0.0),
          dict(claim="Sign beats fp32 pseudo-gradients, Decoupled DiLoCo's default outer loop",
               kind="worse", a="decoupled_default", b="decoupled_default_sign", tol=0.0),
          dict(claim="Sign beats fp32 pseudo-gradients, Decoupled DiLoCo tuned",
               kind="worse", a="decoupled_tuned", b="decoupled_tuned_sign", tol=0.0),
          dict(claim="An fp32 outer step of 0.8 (sign's shrink) recovers most of sign's gain",
               kind="recovers", bad="decoupled_tuned", fixed="decoupled_tuned_lr0.8",
               good="decoupled_tuned_sign", share=0.5),
          dict(claim="Decoupled DiLoCo: outer lr 0.8 beats 1.0 (P = H = 5, no momentum)",
               kind="worse", a="decoupled_tuned", b="decoupled_tuned_lr0.8", tol=0.0)],
      "scale": [
          dict(claim="Tuned DiLoCo (M = 4) within 5% of data-parallel at 4x tokens",
               kind="within", a="tuned_x4", b="data_parallel_x4", tol=0.05),
          dict(claim="Tuned Decoupled DiLoCo (M = 4) within 5% of data-parallel at 4x tokens",
               kind="within", a="decoupled_x4", b="data_parallel_x4", tol=0.05)],
      "scale_llama": [
          dict(claim="Tuned DiLoCo (M = 4) within 5% of data-parallel at 4x tokens, Llama",
               kind="within", a="tuned_x4", b="data_parallel_x4", tol=0.05)],
  }.get(arg, [])
  return sweep.make_sweep(
      name=f"outer_{arg}", title=title, cells=cells,
      reference="data_parallel_x1" if scale else "data_parallel", seeds=seeds,
      timeout_s=7200 if scale else 1800, columns=("tokens", "outer_steps"),
      figures=("gap_vs_tokens",) if scale else ("loss_curves",), checks=checks, notes=notes,
      commands=__doc__)
