"""The wire format: authenticated messages, with no store and no I/O.

Every value in the mailbox is a message: magic, format version, lengths, a
JSON header, raw array bytes, and one tag per role it is meant for: an 8-byte
role id and an HMAC-SHA256, under that role's key (runtime/dist/keys.py), of
the SHA-256 of everything before the tags. A reader checks the one tag of the
role it trusts for that kind of message (the writer's, or its own) before it
parses anything, so a truncated, corrupted, forged or foreign message is
rejected (`MessageError`) and never reaches the algorithm. Decoding allocates
no more than the header's JSON, however hostile the message. The store that
carries messages is runtime/dist/mailbox.py.
"""

import hashlib
import hmac
import json
import math
import struct
import typing
from typing import Sequence

import ml_dtypes
import numpy as np

from decoupled_diloco.algorithm.messages import Contribution, Notice, Publication
from decoupled_diloco.runtime.dist import keys as keys_lib
from decoupled_diloco.runtime.dist.keys import Keyring

_MAGIC = b"DDLM"
_FORMAT = 2
# Magic, format, total bytes, header bytes, number of tags.
_PREFIX = struct.Struct(">4sBQIH")
PREFIX_BYTES = _PREFIX.size
_ID_BYTES, _MAC_BYTES = 8, hashlib.sha256().digest_size
TAG_BYTES = _ID_BYTES + _MAC_BYTES
_MAX_DIMS = 32  # numpy allows 64; no payload comes close.
# The array dtypes a message may carry (codec payloads, outer state), little-endian.
_DTYPES = {np.dtype(t).name: np.dtype(t).newbyteorder("<") for t in (
    np.float64, np.float32, np.float16, ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn, np.int64, np.int32, np.int16, np.int8, np.uint32,
    np.uint16, np.uint8, np.bool_)}


def _role_id(role: str) -> bytes:
  return hashlib.sha256(role.encode()).digest()[:_ID_BYTES]


class MessageError(ValueError):
  """A message that must not be used; `reason` says why in a few words."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason




def encode_message(kind: str, meta: dict, arrays: list, keys: Keyring,
                   audience: Sequence[str]) -> bytes:
  """Frames `meta` (JSON) and `arrays` as one message, tagged for each role of `audience`.

  Raises:
    ValueError: if an array's dtype is not one a message may carry, or `keys`
      lacks an audience role's key.
  """
  arrays = [np.asarray(a) for a in arrays]
  specs, offset = [], 0
  for i, a in enumerate(arrays):
    if a.dtype.name not in _DTYPES:
      raise ValueError(f"Array {i} has dtype {a.dtype}; a message may carry "
                       f"{', '.join(sorted(_DTYPES))}.")
    arrays[i] = a = np.require(a, _DTYPES[a.dtype.name], "C")
    specs.append({"dtype": a.dtype.name, "shape": list(a.shape),
                  "offset": offset, "nbytes": a.nbytes})
    offset += a.nbytes
  role_keys = [(role, keys.key(role)) for role in dict.fromkeys(audience)]
  if not role_keys or any(k is None for _, k in role_keys):
    raise ValueError(f"{keys} cannot tag a message for {list(audience)}.")
  header = json.dumps({"kind": kind, "meta": meta, "arrays": specs},
                      separators=(",", ":")).encode()
  total = _PREFIX.size + len(header) + offset + TAG_BYTES * len(role_keys)
  parts = [_PREFIX.pack(_MAGIC, _FORMAT, total, len(header), len(role_keys)), header]
  parts += [a.reshape(-1).view(np.uint8) for a in arrays]  # No copy until the join.
  digest = hashlib.sha256()
  for part in parts:
    digest.update(part)
  digest = digest.digest()
  parts += [_role_id(role) + hmac.new(key, digest, hashlib.sha256).digest()
            for role, key in role_keys]
  return b"".join(parts)


def read_prefix(data) -> tuple[int, int, int]:
  """(total bytes, header bytes, tags) from a message's first `PREFIX_BYTES` bytes.

  Raises:
    MessageError: if they are not a message's prefix.
  """
  if len(data) < _PREFIX.size:
    raise MessageError("truncated", f"{len(data)} bytes")
  magic, version, total, header_bytes, tags = _PREFIX.unpack_from(data)
  if magic != _MAGIC:
    raise MessageError("bad magic")
  if version != _FORMAT:
    raise MessageError("unsupported format", f"format {version}, this reads {_FORMAT}")
  return total, header_bytes, tags


def decode_message(data: bytes, keys: Keyring, kind: str, role: str) -> tuple[dict, list[np.ndarray]]:
  """Checks `role`'s tag and unframes a message of `kind`: (meta, arrays).

  The arrays are read-only views into `data`: decoding allocates no more than
  the header's JSON, however hostile the header.

  Raises:
    MessageError: for anything but an intact message of `kind` with a good tag
      under `role`'s key (or if `keys` lacks that key).
  """
  data = memoryview(data).cast("B")
  total, header_bytes, tags = read_prefix(data)
  if total != len(data):
    raise MessageError("truncated" if total > len(data) else "trailing bytes",
                       f"{len(data)} bytes of {total}")
  signed = len(data) - TAG_BYTES * tags
  if signed < _PREFIX.size:
    raise MessageError("truncated", f"{tags} tags in {len(data)} bytes")
  key, want = keys.key(role), _role_id(role)
  if key is None:
    raise MessageError("no key", f"{keys} does not hold {role!r}'s key")
  mac = hmac.new(key, hashlib.sha256(data[:signed]).digest(), hashlib.sha256).digest()
  for at in range(signed, len(data), TAG_BYTES):
    if data[at:at + _ID_BYTES] == want:
      if hmac.compare_digest(mac, data[at + _ID_BYTES:at + TAG_BYTES]):
        break
      raise MessageError("bad hmac", f"under {role!r}")
  else:
    raise MessageError("bad hmac", f"no tag for {role!r}")
  body_start = _PREFIX.size + header_bytes
  if body_start > signed:
    raise MessageError("bad header", "header longer than the message")
  try:
    header = json.loads(bytes(data[_PREFIX.size:body_start]))
  except (ValueError, RecursionError) as e:
    raise MessageError("bad header", str(e)) from None
  if not (isinstance(header, dict) and isinstance(header.get("meta"), dict)
          and isinstance(header.get("arrays"), list)):
    raise MessageError("bad header", "needs kind, meta and arrays")
  if header.get("kind") != kind:
    raise MessageError("wrong kind", f"{header.get('kind')!r}, expected {kind!r}")
  body = data[body_start:signed]
  arrays, offset = [], 0
  for spec in header["arrays"]:
    dtype, shape = _array_spec(spec)
    count = math.prod(shape)
    if (spec["offset"] != offset or spec["nbytes"] != count * dtype.itemsize
        or offset + spec["nbytes"] > len(body)):
      raise MessageError("arrays do not match header", f"{spec} at byte {offset}")
    arrays.append(np.frombuffer(body, dtype, count, offset).reshape(shape))
    offset += spec["nbytes"]
  if offset != len(body):
    raise MessageError("arrays do not match header",
                       f"{len(body)} body bytes, arrays add up to {offset}")
  return header["meta"], arrays


def _array_spec(spec) -> tuple[np.dtype, tuple[int, ...]]:
  """(dtype, shape) of one entry of a header's `arrays`, checked."""
  if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list)
          and all(_is_int(spec.get(k)) for k in ("offset", "nbytes"))):
    raise MessageError("bad header", f"array entry {spec!r}")
  shape = spec["shape"]
  if len(shape) > _MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
    raise MessageError("bad header", f"shape {shape!r}")
  if not isinstance(spec.get("dtype"), str) or spec["dtype"] not in _DTYPES:
    raise MessageError("unknown dtype", repr(spec.get("dtype")))
  return _DTYPES[spec["dtype"]], tuple(shape)


def _is_int(x) -> bool:
  return type(x) is int  # Not bool, not float: JSON keeps the two apart.


# --------------------------------------------------------------- messages


def _fields(message) -> dict:
  """A message's scalar fields as their declared Python types (JSON-ready)."""
  types = typing.get_type_hints(type(message))
  return {f: types[f](getattr(message, f)) for f in message._fields if f != "payload"}


def _parse_fields(cls, fields) -> dict:
  """Scalar fields of `cls` from a header, each of exactly its declared type."""
  types = typing.get_type_hints(cls)
  names = set(cls._fields) - {"payload"}
  if not isinstance(fields, dict) or fields.keys() != names:
    raise MessageError("bad header", f"{cls.__name__} fields {fields!r}")
  for name in names:
    if type(fields[name]) is not types[name]:
      raise MessageError("bad header", f"{name}={fields[name]!r} is not {types[name].__name__}")
  return fields


def _flatten(payload) -> tuple[list[list[str]], list]:
  """A payload (one dict of arrays per tensor) as (names per tensor, arrays)."""
  return ([list(d) for d in payload], [a for d in payload for a in d.values()])


def _unflatten(names, arrays) -> tuple[dict, ...]:
  if not (isinstance(names, list)
          and all(isinstance(n, list) and all(isinstance(k, str) for k in n) for n in names)):
    raise MessageError("bad header", f"payload names {names!r}")
  if sum(map(len, names)) != len(arrays):
    raise MessageError("arrays do not match header",
                       f"{len(arrays)} arrays for payload names {names}")
  it = iter(arrays)
  return tuple({k: next(it) for k in n} for n in names)


def contribution_bytes(c: Contribution, incarnation: int, keys: Keyring) -> bytes:
  """`c` as a message, tagged by its learner; `incarnation` counts the learner's restarts."""
  names, arrays = _flatten(c.payload)
  meta = {"fields": _fields(c), "payload": names, "incarnation": int(incarnation)}
  return encode_message("contribution", meta, arrays, keys, [keys_lib.learner(c.learner)])


def parse_contribution(data: bytes, keys: Keyring, m: int) -> tuple[Contribution, int]:
  """The inverse of `contribution_bytes` for learner `m`: (contribution, incarnation).

  Raises:
    MessageError: if `data` is not an intact contribution tagged by learner `m`.
  """
  meta, arrays = decode_message(data, keys, "contribution", keys_lib.learner(m))
  fields = _parse_fields(Contribution, meta.get("fields"))
  if not _is_int(meta.get("incarnation")):
    raise MessageError("bad header", f"incarnation {meta.get('incarnation')!r}")
  payload = _unflatten(meta.get("payload"), arrays)
  return Contribution(**fields, payload=payload), meta["incarnation"]


def publication_bytes(pub: Publication, keys: Keyring, audience: Sequence[str],
                      **extra) -> bytes:
  """`pub` as a message for `audience`, with `extra` JSON fields (epoch, times) in its header."""
  names, arrays = _flatten(pub.payload)
  meta = {"fields": _fields(pub), "payload": names, "extra": extra}
  return encode_message("publication", meta, arrays, keys, audience)


def parse_publication(data: bytes, keys: Keyring) -> tuple[Publication, dict]:
  """The inverse of `publication_bytes`, checked under `keys.me`: (publication, extra).

  Raises:
    MessageError: if `data` is not an intact publication for this reader.
  """
  meta, arrays = decode_message(data, keys, "publication", keys.me)
  fields = _parse_fields(Publication, meta.get("fields"))
  if not isinstance(meta.get("extra"), dict):
    raise MessageError("bad header", f"extra {meta.get('extra')!r}")
  payload = _unflatten(meta.get("payload"), arrays)
  return Publication(**fields, payload=payload), meta["extra"]


def notice_bytes(notice: Notice, keys: Keyring, audience: Sequence[str], **extra) -> bytes:
  """`notice` as a message for `audience` (it carries no arrays)."""
  return encode_message("notice", {"fields": _fields(notice), "extra": extra}, [], keys,
                        audience)


def parse_notice(data: bytes, keys: Keyring) -> tuple[Notice, dict]:
  """The inverse of `notice_bytes`, checked under `keys.me`: (notice, extra).

  Raises:
    MessageError: if `data` is not an intact notice for this reader.
  """
  meta, arrays = decode_message(data, keys, "notice", keys.me)
  if arrays or not isinstance(meta.get("extra"), dict):
    raise MessageError("bad header", "a notice carries no arrays and an extra dict")
  return Notice(**_parse_fields(Notice, meta.get("fields"))), meta["extra"]
