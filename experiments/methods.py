"""The four methods as one call, so any task's config can be run by each.

`use_method(c, name)` copies the method's sections (runtime, diloco, outer,
sim) from its own experiment file: `data_parallel`, `diloco`, `streaming`
(Streaming DiLoCo) or `decoupled` (Decoupled DiLoCo without chaos; the
variant the real runtime runs too).
"""

from experiments import data_parallel, decoupled_diloco, diloco, streaming_diloco

METHODS = {
    "data_parallel": lambda: data_parallel.get_config(),
    # H = 25, Nesterov 0.7 / 0.5: the outer loop the task sweeps (modality,
    # architecture) ran; the tuned one (experiments/diloco.py) was found on the GPT only.
    "diloco": lambda: diloco.get_config("h25"),
    "streaming": lambda: streaming_diloco.get_config(),
    # P = H = 10, Nesterov 0.7 / 0.5, for the same reason.
    "decoupled": lambda: _with(decoupled_diloco.get_config("nochaos"), decoupled_diloco.EARLIER),
}


def _with(c, overrides: dict):
  c.update_from_flattened_dict(overrides)
  return c


def use_method(c, name: str) -> None:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}.")
  m = METHODS[name]()
  c.runtime = m.runtime
  for section in ("diloco", "outer", "sim"):
    c[section].update(m[section])
