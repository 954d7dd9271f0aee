"""Seeded training runs of each method, 50 steps, for comparing commits: the losses must match.

Run it in two checkouts (e.g. `git worktree add /tmp/base <commit>`) and compare the
printed JSON; any change to a number is a change of behaviour:
  python -m experiments.train_digest
"""

import json
import os
import tempfile

from decoupled_diloco import train
from experiments import data_parallel, decoupled_diloco, diloco, streaming_diloco

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "tests", "fixtures", "corpus")
RUNS = {"dp": lambda: data_parallel.get_config(), "diloco": lambda: diloco.get_config(),
        "streaming": lambda: streaming_diloco.get_config(),
        "decoupled_chaos": lambda: decoupled_diloco.get_config("chaos"),
        "hetero_k1_grace": lambda: decoupled_diloco.get_config("hetero_k1_grace")}


def main():
  out = {}
  for name, make in RUNS.items():
    c = make()
    c.data.path = CORPUS
    c.train.update(steps=50, eval_every=25, checkpoint_every=25)
    with tempfile.TemporaryDirectory() as workdir:
      s = train.train_and_evaluate(c, workdir)
    out[name] = [s["final_eval_loss"], s.get("outer_steps"), s.get("goodput")]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
