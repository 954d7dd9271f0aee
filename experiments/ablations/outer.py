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
  confirm      data-parallel, today's default, and the best cells, 4 seeds
  scale        data-parallel, default and tuned DiLoCo at 1x, 4x and 16x the tokens
               (300, 1200, 4800 steps; the schedules stretch with them)

CPU (about a minute a run on an idle 2-core machine):
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:sync_every --workdir=runs/ablations/outer_h --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:outer --workdir=runs/ablations/outer_lr --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:inner --workdir=runs/ablations/outer_inner --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:confirm --workdir=runs/ablations/outer_confirm --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/outer.py:scale --workdir=runs/ablations/outer_scale --jobs=1
  python -m experiments.report runs/ablations/outer_h runs/ablations/outer_lr runs/ablations/outer_inner runs/ablations/outer_confirm runs/ablations/outer_scale --into=experiments/results/ablations

Results: experiments/results/ablations/report.md ("Outer optimization", "Gap to
data-parallel vs scale").
"""

from experiments import sweep

DILOCO = "experiments/diloco.py"
DP = "experiments/data_parallel.py"
DEFAULT = {"diloco.sync_every": 25, "outer.lr": 0.7, "outer.momentum": 0.5}
EVALS = {"train.eval_every": 50}  # Loss-vs-tokens curves.
# The evidence each later stage starts from (stage `sync_every`, `outer`; see the report).
BEST_H = 5
BEST_OUTER = {"outer.lr": 1.0, "outer.momentum": 0.0}  # Plain averaging, every BEST_H steps.
SEEDS = (0, 1, 2, 3)
SCALES = (1, 4, 16)


def _diloco(name: str, overrides: dict) -> dict:
  return sweep.cell(name, DILOCO, {**EVALS, **overrides})


def _stage(arg: str) -> tuple[list[dict], str, tuple, str]:
  """(cells, title, seeds, notes) of one stage."""
  dp = sweep.cell("data_parallel", DP, EVALS)
  if arg == "sync_every":
    cells = [dp] + [_diloco(f"h{h}", {**DEFAULT, "diloco.sync_every": h}) for h in (5, 10, 25, 50)]
    return cells, "DiLoCo M = 4: how often to sync (H)", (0,), (
        "Outer Nesterov lr 0.7, momentum 0.5 (today's `experiments/diloco.py`); H inner"
        " steps between syncs, so 300 / H outer steps.")
  if arg == "outer":
    cells = [dp] + [
        _diloco(f"lr{lr}_m{m}", {"diloco.sync_every": BEST_H, "outer.lr": lr,
                                 "outer.momentum": m})
        for lr in (0.5, 0.7, 1.0, 1.4) for m in (0.0, 0.5, 0.9)]
    return cells, f"DiLoCo M = 4, H = {BEST_H}: the outer optimizer", (0,), (
        f"Nesterov momentum at H = {BEST_H} (the best of the H stage).")
  if arg == "inner":
    tuned = {"diloco.sync_every": BEST_H, **BEST_OUTER}
    cells = [dp] + [_diloco(f"inner_x{f:g}", {**tuned, "inner.lr": 3e-3 * f})
                    for f in (0.5, 1.0, 2.0)]
    return cells, "DiLoCo M = 4, tuned outer loop: the inner learning rate", (0,), (
        "AdamW peak lr 3e-3 (the data-parallel setting) scaled for 8 sequences a learner.")
  if arg == "confirm":
    tuned = {"diloco.sync_every": BEST_H, **BEST_OUTER}
    cells = [dp, _diloco("default", DEFAULT), _diloco("tuned", tuned),
             _diloco("m1_default", {**DEFAULT, "diloco.num_learners": 1})]
    return cells, "Outer optimization: DiLoCo M = 4, default vs tuned, 4 seeds", SEEDS, (
        "Paired by seed: each seed's init and data order are shared by every cell."
        " `m1_default`: one learner on the whole batch with the H = 25 outer loop (the"
        " tuned one, plain averaging, leaves one learner's training as it is).")
  if arg == "scale":
    tuned = {"diloco.sync_every": BEST_H, **BEST_OUTER}
    cells = [sweep.cell(f"{name}_x{x}", config, {**overrides, "train.steps": 300 * x,
                                                  "train.eval_every": 50 * x})
             for x in SCALES
             for name, config, overrides in (("data_parallel", DP, {}),
                                             ("default", DILOCO, DEFAULT),
                                             ("tuned", DILOCO, tuned))]
    return cells, "Gap to data-parallel vs scale (DiLoCo M = 4)", (0,), (
        "Each budget is its own run (warmup, cosine decay and outer steps scale with it)."
        " The table compares every row with data-parallel at 1x; the figure compares each"
        " with data-parallel at its own tokens (the gap).")
  raise ValueError(f"stage {arg!r} is unknown; choose sync_every, outer, inner, confirm or scale"
                   " (experiments/ablations/outer.py:sync_every).")


def get_config(arg=None):
  arg = arg or "sync_every"
  cells, title, seeds, notes = _stage(arg)
  scale = arg == "scale"
  checks = {
      "confirm": [
          dict(claim="Tuned DiLoCo (M = 4) beats the H = 25 default", kind="worse",
               a="default", b="tuned", tol=0.0),
          dict(claim="Tuned DiLoCo (M = 4) within 5% of data-parallel, 1x tokens",
               kind="within", a="tuned", b="data_parallel", tol=0.05),
          dict(claim="DiLoCo M = 1 at or below data-parallel", kind="not_worse",
               a="m1_default", b="data_parallel", tol=0.0)],
      "scale": [
          dict(claim="Tuned DiLoCo (M = 4) within 5% of data-parallel at 4x tokens",
               kind="within", a="tuned_x4", b="data_parallel_x4", tol=0.05)],
  }.get(arg, [])
  return sweep.make_sweep(
      name=f"outer_{arg}", title=title, cells=cells,
      reference="data_parallel_x1" if scale else "data_parallel", seeds=seeds,
      timeout_s=7200 if scale else 1800, columns=("tokens", "outer_steps"),
      figures=("gap_vs_tokens",) if scale else ("loss_curves",), checks=checks, notes=notes,
      commands=__doc__)
