"""Tasks by name: the built-in ones, and any module that registers its own.

  @tasks.register("my_task")
  def make(cfg: Config) -> Task: ...

`build(cfg)` returns the task named `cfg.task.name`, after importing
`cfg.task.module` (a dotted module outside the package that registers it).
"""

import importlib
from collections.abc import Callable

from decoupled_diloco.config import Config
from decoupled_diloco.tasks.base import Task

_BUILTIN = {  # Task name -> the module that registers it (imported on first use).
    "lm_bytes": "decoupled_diloco.tasks.lm",
    "digits_vit": "decoupled_diloco.tasks.digits",
}
_REGISTRY: dict[str, Callable[[Config], Task]] = {}


def register(name: str):
  """Decorator: `factory(cfg) -> Task` becomes the task `name`."""
  def decorate(factory):
    _REGISTRY[name] = factory
    return factory
  return decorate


def names() -> list[str]:
  return sorted(set(_BUILTIN) | set(_REGISTRY))


def build(cfg: Config) -> Task:
  """The task of `cfg` (`task.name`, after importing `task.module` if given).

  Raises:
    ValueError: one line naming an unknown task, or a module that does not
      import or registers no task, with what is registered.
  """
  name, module = cfg.task.name, cfg.task.module
  if module:
    try:
      importlib.import_module(module)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise ValueError(f"task.module={module!r} does not import ({type(e).__name__}: {e});"
                       f" registered tasks: {', '.join(names())}.") from None
    if not any(f.__module__ == module for f in _REGISTRY.values()):
      raise ValueError(f"task.module={module!r} registers no task (decorate a factory with"
                       f" tasks.register(name)); registered tasks: {', '.join(names())}.")
  if name not in _REGISTRY and name in _BUILTIN:
    importlib.import_module(_BUILTIN[name])
  if name not in _REGISTRY:
    raise ValueError(f"task.name={name!r} is not registered; registered tasks:"
                     f" {', '.join(names())} (or give task.module).")
  return _REGISTRY[name](cfg)
