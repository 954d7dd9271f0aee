"""Installs decoupled_diloco: `pip install -e .[test]` (add `[cuda]` or `[tpu]` on accelerators)."""

import setuptools

setuptools.setup(
    name="decoupled_diloco",
    version="0.1.0",
    description="Decoupled DiLoCo: resilient, asynchronous distributed pre-training in JAX.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["decoupled_diloco", "decoupled_diloco.*"]),
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.11.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "tensorstore>=0.1.86",  # runtime/mailbox.py (also under orbax).
        "ml-dtypes>=0.7.0",  # runtime/mailbox.py (also under jax).
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",  # experiments/report.py figures (Agg, headless).
        "scikit-learn>=1.4",  # The digits images of tasks/digits.py (shipped in the wheel).
        "grain>=0.2.12",  # data/reader.py: every learner's batches, sharded and resumable.
        "tokenizers>=0.20",  # data/prepare.py: BPE trained locally (HF tokenizer.json).
        "tqdm>=4.66",  # data/prepare.py's progress bar.
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5",  # Test processes: one per core and one more (conftest.py).
                 "import-linter>=2.17",  # .importlinter, run by .ci/run.
                 "moto[server]>=5.0"],  # An S3 server in the tests: the mailbox over s3://.
        "cuda": ["jax[cuda12]>=0.7.0"],
        "tpu": ["jax[tpu]>=0.7.0"],
    },
)
