"""Typed messages between learners and the syncer.

Payloads are codec outputs (one dict of arrays per tensor, in the fragment's
path order): exactly what a transport would serialize. `nbytes` counts them.
"""

from typing import Any, NamedTuple

FULL = -1  # `Publication.base_version` of a full copy (not an update).


class Contribution(NamedTuple):
  """Learner -> syncer: a fragment's pseudo-gradient `base - theta`, encoded."""
  learner: int
  fragment: int
  round: int  # The scheduled sync of the fragment it belongs to (algorithm/rounds.py).
  base_version: int  # Version of the global fragment the delta is measured from.
  steps: int  # Inner steps since that alignment.
  tokens: int  # Tokens processed since that alignment.
  payload: tuple[dict[str, Any], ...]
  nbytes: int
  sent_at: float = 0.0  # Sender's clock (runtime seconds) when it was sent.
  step_seconds: float = 0.0  # Sender's recent inner-step time (0: unknown).


class Publication(NamedTuple):
  """Syncer -> learners: a fragment's new global version, encoded.

  A full copy (`base_version == FULL`) holds the fragment itself; an update
  holds `Theta_version - Theta_hat_base` against what learners hold at
  `base_version`, and applies only there.
  """
  fragment: int
  version: int
  payload: tuple[dict[str, Any], ...]
  nbytes: int
  base_version: int = FULL
  round: int = -1  # The round whose merge made it (-1: a copy, not a merge).
  started_at: float = 0.0  # When that round's first on-time send left (runtime seconds).
  step_seconds: float = 0.0  # The syncer's running estimate of learners' step time.


class Notice(NamedTuple):
  """Syncer -> learners: round `round` of `fragment` closed with nothing to merge.

  Sent only when learners wait (lock-step): it answers the round, so they
  stop waiting for it, and carries no parameters (the fragment is unchanged).
  """
  fragment: int
  round: int
  version: int  # The fragment's version, unchanged.
