"""Command line: `python -m decoupled_diloco.main --config=experiments/X.py[:variant] --workdir=DIR`.

Override any field with `--config.section.field=value`. Re-running with the
same workdir resumes from its latest checkpoint.
"""

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from decoupled_diloco import config as config_lib
from decoupled_diloco import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the summary go.")
flags.mark_flags_as_required(["config", "workdir"])


class _OnlyWarningsFromLibraries(py_logging.Filter):
  """Orbax logs every checkpoint phase at INFO; keep our progress lines readable."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "decoupled_diloco" in record.pathname


def _parse_flags(argv):
  """absl's parser; an override of a field the config lacks is one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):  # What ml_collections raises for --config.<unknown>.
    base = config_lib.base_config()  # Declares every field; variants add none.
    for arg in argv[1:]:
      if not arg.startswith("--config."):
        continue
      node, where = base, "config"
      for part in arg[len("--config."):].split("=")[0].split("."):
        if not isinstance(node, type(base)) or part not in node:
          sys.exit(f"error: {arg.split('=')[0]}: {where} has no field {part!r}"
                   + (f"; its fields: {', '.join(sorted(node))}." if isinstance(node, type(base))
                      else "."))
        node, where = node[part], part if where == "config" else f"{where}.{part}"
    raise


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OnlyWarningsFromLibraries())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
