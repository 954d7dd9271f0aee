"""What a checkpoint holds of the simulator: messages by reference, numbers by type.

`MessageTable` stores each message's payload once (the arrays go into the
orbax checkpoint) and refers to it from the JSON state; `to_json` and
`from_json` keep every number's type across the round trip.
"""

import numpy as np

from decoupled_diloco.algorithm.messages import Contribution, Notice, Publication


class MessageTable:
  """The messages of a checkpoint: JSON references into a list of payloads.

  A message referred to from several places (a publication in every inbox) is
  stored once and comes back as one object.
  """

  def __init__(self, payloads=()):
    self.payloads = list(payloads)
    self._saved: dict[int, int] = {}  # id(message) -> payload index.
    self._restored: dict[int, Contribution | Publication] = {}  # payload index -> message.

  def ref(self, message: Contribution | Publication | Notice) -> dict:
    """The message's fields, with the index of its payload in `payloads`."""
    if isinstance(message, Notice):  # No payload.
      return {"type": "Notice", **message._asdict()}
    if id(message) not in self._saved:
      self._saved[id(message)] = len(self.payloads)
      self.payloads.append(message.payload)
    return {"type": type(message).__name__, **message._asdict(),
            "payload": self._saved[id(message)]}

  def message(self, ref: dict) -> Contribution | Publication:
    """The message that `ref` refers to."""
    if ref["type"] == "Notice":
      return Notice(**{k: v for k, v in ref.items() if k != "type"})
    i = ref["payload"]
    if i not in self._restored:
      kind = {"Contribution": Contribution, "Publication": Publication}[ref["type"]]
      fields = {k: v for k, v in ref.items() if k != "type"}
      self._restored[i] = kind(**{**fields, "payload": tuple(self.payloads[i])})
    return self._restored[i]


def to_json(x):
  """`x` as JSON, with numpy floats tagged so that `from_json` gives them back.

  Python's `round` and numpy's differ in the last digit now and then, and
  the event log rounds times: a resumed run must keep every number's type.
  """
  if isinstance(x, np.float64):
    return {"float64": float(x)}
  if isinstance(x, (list, tuple)):
    return [to_json(v) for v in x]
  if isinstance(x, dict):
    return {k: to_json(v) for k, v in x.items()}
  return x


def from_json(x):
  """The inverse of `to_json`."""
  if isinstance(x, list):
    return [from_json(v) for v in x]
  if isinstance(x, dict):
    if x.keys() == {"float64"}:
      return np.float64(x["float64"])
    return {k: from_json(v) for k, v in x.items()}
  return x
