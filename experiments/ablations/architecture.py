r"""Dense vs mixture-of-experts: data-parallel, DiLoCo and Decoupled DiLoCo at equal tokens.

The paper's dense-vs-MoE ablation, scaled to a CPU: `experiments/llama.py`
(dense) against `experiments/moe.py` (8 experts, top-2, at the dense model's
active parameters), each under the three methods of `experiments/methods.py`
at the same batch and steps (1.23M tokens). Two more MoE cells under Decoupled
DiLoCo: routers and experts merged by the weighted mean instead of RDA
(`diloco.mean_roles`), and experts split across fragments
(`diloco.split_experts`). Ranked by eval bits per byte, which both models
compute from the cross-entropy alone (the MoE's loss adds its load-balance and
z-losses).

CPU (8 cells x 4 seeds):
  python -m experiments.sweep --sweep=experiments/ablations/architecture.py --workdir=runs/ablations/architecture --jobs=1
  python -m experiments.report runs/ablations/architecture --into=experiments/results/ablations

Results: experiments/results/ablations/report.md (its architecture section);
BUILD.md, "Ablation sweeps".

The MoE cells evaluate every 10 steps, Decoupled DiLoCo's sync interval
(H = 10 per fragment), so the report's `routing` figure follows the routers
closely and data-parallel's `routing/topk_overlap_since_last_eval` is how
much a router moves by itself in the time learners spend apart: at each eval,
the bar the learners' overlap must stay above (router_probe.py; routers move
fast early in training and slowly later, so the bar is taken at the same
step, not averaged over training).
"""

from experiments import sweep

METHODS = ("data_parallel", "diloco", "decoupled")
EVERY_50 = {"train.eval_every": 50, "train.checkpoint_every": 50}
MOE = {"train.eval_every": 10, "train.checkpoint_every": 50}  # Evals at H: see above.
SEEDS = (0, 1, 2, 3)


def get_config(arg=None):
  del arg
  cells = [sweep.cell(f"dense_{m}", f"experiments/llama.py:{m}", EVERY_50) for m in METHODS]
  cells += [sweep.cell(f"moe_{m}", f"experiments/moe.py:{m}", MOE) for m in METHODS]
  cells += [
      sweep.cell("moe_decoupled_mean_experts", "experiments/moe.py:decoupled",
                 {**MOE, "diloco.mean_roles": ("embed", "router", "expert")}),
      sweep.cell("moe_decoupled_split", "experiments/moe.py:decoupled",
                 {**MOE, "diloco.split_experts": True}),
  ]
  return sweep.make_sweep(
      name="architecture", title="Dense and mixture-of-experts decoders, by method",
      cells=cells, reference="dense_data_parallel", seeds=SEEDS, timeout_s=2400,
      metric="final_eval_bits_per_byte", columns=("tokens", "outer_steps"),
      figures=("loss_curves", "routing"),
      checks=[
          dict(claim="Decoupled DiLoCo within 2% of data-parallel, dense", kind="within",
               a="dense_decoupled", b="dense_data_parallel", tol=0.02),
          dict(claim="Decoupled DiLoCo within 2% of data-parallel, MoE", kind="within",
               a="moe_decoupled", b="moe_data_parallel", tol=0.02),
          dict(claim="RDA on routers and experts >= the mean (MoE, Decoupled)",
               kind="not_worse", a="moe_decoupled", b="moe_decoupled_mean_experts", tol=0.0),
          dict(claim="Routing overlap between learners stays above data-parallel's own"
                     " over H = 10 steps, at every eval (MoE, Decoupled)",
               kind="stays_above",
               a="moe_decoupled", series="routing/topk_overlap_learners",
               b="moe_data_parallel", reference="routing/topk_overlap_since_last_eval"),
      ],
      notes=("`experiments/llama.py` and `experiments/moe.py` as they are: 300 steps of"
             " 32 x 128 bytes in every cell (checkpoints every 50 steps; evals every 50,"
             " the MoE cells' every 10)."),
      commands=__doc__)
