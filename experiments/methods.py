"""The four methods as one call, so any task's config can be run by each.

`use_method(c, name)` copies the method's sections (runtime, diloco, outer,
sim) from its own experiment file: `data_parallel`, `diloco`, `streaming`
(Streaming DiLoCo) or `decoupled` (Decoupled DiLoCo without chaos; the
variant the real runtime runs too). DiLoCo and Decoupled DiLoCo keep their
earlier outer loops here (each file's `EARLIER`).
"""

from experiments import data_parallel, decoupled_diloco, diloco, streaming_diloco


def earlier(experiment, variant=None):
  """The experiment's config (`variant`) with its `EARLIER` outer loop: what the task
  sweeps (modality, architecture) and the committed benchmark results ran; the tuned
  loops (experiments/ablations/outer.py) were found on the GPT only."""
  c = experiment.get_config(variant)
  c.update_from_flattened_dict(experiment.EARLIER)
  return c


METHODS = {
    "data_parallel": lambda: data_parallel.get_config(),
    "diloco": lambda: earlier(diloco),
    "streaming": lambda: streaming_diloco.get_config(),
    "decoupled": lambda: earlier(decoupled_diloco, "nochaos"),
}


def use_method(c, name: str) -> None:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}.")
  m = METHODS[name]()
  c.runtime = m.runtime
  for section in ("diloco", "outer", "sim"):
    c[section].update(m[section])
