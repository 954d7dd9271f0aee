"""Typed messages between learners and the syncer.

Payloads are codec outputs (one dict of arrays per tensor, in the fragment's
path order): exactly what a transport would serialize. `nbytes` counts them.
"""

from typing import Any, NamedTuple


class Contribution(NamedTuple):
  """Learner -> syncer: a fragment's pseudo-gradient `base - theta`, encoded."""
  learner: int
  fragment: int
  base_version: int  # Version of the global fragment the delta is measured from.
  steps: int  # Inner steps since that alignment.
  tokens: int  # Tokens processed since that alignment.
  payload: tuple[dict[str, Any], ...]
  nbytes: int


class Publication(NamedTuple):
  """Syncer -> learners: the new global fragment, encoded."""
  fragment: int
  version: int
  payload: tuple[dict[str, Any], ...]
  nbytes: int
