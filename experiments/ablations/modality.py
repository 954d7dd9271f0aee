r"""Text and vision: data-parallel, DiLoCo and Decoupled DiLoCo at equal units.

The paper's text-and-vision ablation, scaled to a CPU. Text: the Llama-style
decoder on bytes (`experiments/llama.py:<method>`); vision: the small ViT on
scikit-learn's digits (`experiments/digits_vit.py:<method>`). Each method runs
its own experiment file's settings (`experiments/methods.py`); within a
modality every cell has the same batch and steps, so the same tokens or images
(the tables show them). Two sweeps, because the two are ranked by different
metrics: `text` by eval loss, `vision` by top-1 accuracy on the held-out digits
(the 320 images of its 5 full batches of 64; one image is 0.31 points).

Both run their config's 300 steps: 32 x 128 bytes a step for text (1.23M
tokens), 64 images for vision (19,200). DiLoCo syncs every 25 steps (12 outer
steps), Decoupled DiLoCo sends one of 10 fragments every step.

CPU (3 cells x 4 seeds each):
  python -m experiments.sweep --sweep=experiments/ablations/modality.py:text --workdir=runs/ablations/modality_text --jobs=1
  python -m experiments.sweep --sweep=experiments/ablations/modality.py:vision --workdir=runs/ablations/modality_vision --jobs=1
  python -m experiments.report runs/ablations/modality_text runs/ablations/modality_vision --into=experiments/results/ablations

Results: experiments/results/ablations/report.md (its modality sections); BUILD.md,
"Ablation sweeps".
"""

from experiments import sweep

METHODS = ("data_parallel", "diloco", "decoupled")
# Evals every 50 steps give the loss-vs-tokens curves; checkpoints as often make an
# interrupted run lose at most 50 steps.
TEXT = {"train.eval_every": 50, "train.checkpoint_every": 50}
SEEDS = (0, 1, 2, 3)  # The paper's differences are under 1%: one seed cannot tell.


def get_config(arg=None):
  if arg == "text":
    return sweep.make_sweep(
        name="modality_text", title="Text: Llama on bytes, by method at equal tokens",
        cells=[sweep.cell(m, f"experiments/llama.py:{m}", TEXT) for m in METHODS],
        reference="data_parallel", seeds=SEEDS, timeout_s=1800,
        columns=("tokens", "outer_steps"), figures=("loss_curves",),
        checks=[dict(claim="Decoupled DiLoCo within 2% of data-parallel's eval loss, text",
                     kind="within", a="decoupled", b="data_parallel", tol=0.02)],
        notes=("`experiments/llama.py` as it is: 300 steps of 32 x 128 bytes in every cell"
               " (evals and checkpoints every 50 steps)."),
        commands=__doc__)
  if arg == "vision":
    return sweep.make_sweep(
        name="modality_vision", title="Vision: a ViT on the digits, by method at equal images",
        cells=[sweep.cell(m, f"experiments/digits_vit.py:{m}") for m in METHODS],
        reference="data_parallel", seeds=SEEDS, timeout_s=1800,
        metric="final_eval_accuracy", higher_is_better=True, columns=("images", "outer_steps"),
        checks=[dict(claim="Decoupled DiLoCo within 1 point of data-parallel's top-1, vision",
                     kind="within_abs", a="decoupled", b="data_parallel", tol=0.01)],
        notes=("`experiments/digits_vit.py` as it is: 300 steps of 64 images in every cell;"
               " top-1 accuracy on the 320 held-out images of 5 full batches (one image is"
               " 0.31 points)."),
        commands=__doc__)
  raise ValueError(f"modality {arg!r} is unknown; choose text or vision"
                   " (experiments/ablations/modality.py:text).")
