"""Who holds which key: one key per role, derived from the run secret.

A message in the mailbox carries one tag per reader it is meant for, each an
HMAC of the message's digest under that reader's (or writer's) role key
(runtime/dist/wire.py). The roles:

  syncer      the syncer's own records (outer state, its lease); every
              publication, notice and the run config carry a tag for it too
  learner/m   learner m's contributions and lease (the syncer checks them
              under this key), and the tag learner m checks on publications
  learners    the one key all learners share: the tag learners check on each
              other's leases (a rejoining learner reads their positions)

The run secret's holders (the syncer, the launcher) derive every key. A
learner's host gets only its credential (`learner_credential`): its own key
and the shared `learners` key. So a learner can sign only as itself, and a
publication it forges is accepted by nobody but itself. BUILD.md "Threat
model" says what each holder can and cannot do.
"""

import hashlib
import hmac

SECRET_ENV = "DILOCO_SECRET"  # The run secret: the syncer's and the launcher's hosts.
KEY_ENV = "DILOCO_KEY"  # One learner's credential: its learner's host only.
SYNCER = "syncer"
PEERS = "learners"


def learner(m: int) -> str:
  return f"learner/{m}"


def derive(secret: bytes, role: str) -> bytes:
  """`role`'s key under the run secret."""
  return hmac.new(secret, b"decoupled_diloco role key: " + role.encode(), hashlib.sha256).digest()


def learner_credential(secret: bytes, m: int) -> str:
  """What learner m's host holds (printable, one token): its key and the peers' key."""
  return f"{learner(m)}:{derive(secret, learner(m)).hex()}:{derive(secret, PEERS).hex()}"


class Keyring:
  """The keys one process holds. `me` is the role whose tag it checks on what is
  addressed to it (publications, notices, the run config).

  Build it with `from_secret` (every key) or `from_credential` (one learner's).
  """

  def __init__(self, me: str, keys: dict[str, bytes], secret: bytes | None = None):
    self.me, self._keys, self._secret = me, dict(keys), secret

  @classmethod
  def from_secret(cls, secret: bytes, me: str = SYNCER) -> "Keyring":
    if not isinstance(secret, bytes) or not secret:
      raise ValueError("The run secret must be non-empty bytes.")
    return cls(me, {}, secret)

  @classmethod
  def from_credential(cls, text: str) -> "Keyring":
    """The keyring of `learner_credential`'s output.

    Raises:
      ValueError: if `text` is not a learner credential.
    """
    parts = text.strip().split(":")
    try:
      role, own, peers = parts
      m = int(role.removeprefix("learner/")) if role.startswith("learner/") else -1
      keys = {role: bytes.fromhex(own), PEERS: bytes.fromhex(peers)}
    except ValueError:
      m, keys = -1, {}
    if m < 0 or role != learner(m) or any(len(k) != 32 for k in keys.values()):
      raise ValueError(f"${KEY_ENV} is not a learner credential (learner/M:HEX:HEX, as the"
                       " launchers write it).")
    return cls(role, keys)

  @property
  def learner(self) -> int | None:
    """The learner this credential is for; None for the secret's holders."""
    return None if self._secret is not None else int(self.me.removeprefix("learner/"))

  def key(self, role: str) -> bytes | None:
    """`role`'s key, or None if this process does not hold it."""
    if self._secret is not None:
      return derive(self._secret, role)
    return self._keys.get(role)

  def holds(self, role: str) -> bool:
    return self.key(role) is not None

  def __repr__(self):
    return f"Keyring({self.me!r}, {'every role' if self._secret else sorted(self._keys)})"
