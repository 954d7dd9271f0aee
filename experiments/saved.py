"""A config saved as JSON: `--config=experiments/saved.py:PATH`.

PATH is a JSON file holding a whole config (`ConfigDict.to_json()`), or a
run's `summary.json` (its `config` field): rerun a finished experiment, or
hand every process of a distributed run one file.
"""

import json

from decoupled_diloco import config as config_lib


def get_config(path: str):
  if not path:
    raise ValueError("experiments/saved.py needs a path: --config=experiments/saved.py:PATH.")
  with open(path) as f:
    saved = json.load(f)
  c = config_lib.base_config()
  c.update_from_flattened_dict(_flatten(saved.get("config", saved)))
  return c


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
