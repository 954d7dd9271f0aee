"""The wire format: authenticated messages, with no store and no I/O.

Every value in the mailbox is a message: magic, format version, lengths, a
JSON header, raw array bytes, and an HMAC-SHA256 keyed with the run secret,
so a truncated, corrupted or foreign message is rejected (`MessageError`) and
never reaches the algorithm. Decoding allocates no more than the header's
JSON, however hostile the header. The store that carries messages is
runtime/dist/mailbox.py.
"""

import hashlib
import hmac
import json
import math
import struct
import typing

import ml_dtypes
import numpy as np

from decoupled_diloco.algorithm.messages import Contribution, Notice, Publication

_MAGIC = b"DDLM"
_FORMAT = 1
_PREFIX = struct.Struct(">4sBQI")  # magic, format, total bytes, header bytes.
_MAC_BYTES = hashlib.sha256().digest_size
_MAX_DIMS = 32  # numpy allows 64; no payload comes close.
# The array dtypes a message may carry (codec payloads, outer state), little-endian.
_DTYPES = {np.dtype(t).name: np.dtype(t).newbyteorder("<") for t in (
    np.float64, np.float32, np.float16, ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn, np.int64, np.int32, np.int16, np.int8, np.uint32,
    np.uint16, np.uint8, np.bool_)}


class MessageError(ValueError):
  """A message that must not be used; `reason` says why in a few words."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason




def encode_message(kind: str, meta: dict, arrays: list, secret: bytes) -> bytes:
  """Frames `meta` (JSON) and `arrays` as one authenticated message.

  Raises:
    ValueError: if an array's dtype is not one a message may carry.
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
  header = json.dumps({"kind": kind, "meta": meta, "arrays": specs},
                      separators=(",", ":")).encode()
  total = _PREFIX.size + len(header) + offset + _MAC_BYTES
  parts = [_PREFIX.pack(_MAGIC, _FORMAT, total, len(header)), header]
  parts += [a.reshape(-1).view(np.uint8) for a in arrays]  # No copy until the join.
  mac = hmac.new(secret, digestmod=hashlib.sha256)
  for part in parts:
    mac.update(part)
  return b"".join(parts + [mac.digest()])


def decode_message(data: bytes, secret: bytes, kind: str) -> tuple[dict, list[np.ndarray]]:
  """Checks and unframes a message of `kind`: (meta, arrays).

  The arrays are read-only views into `data`: decoding allocates no more than
  the header's JSON, however hostile the header.

  Raises:
    MessageError: for anything but an intact message of `kind` under `secret`.
  """
  data = memoryview(data).cast("B")
  if len(data) < _PREFIX.size + _MAC_BYTES:
    raise MessageError("truncated", f"{len(data)} bytes")
  magic, version, total, header_bytes = _PREFIX.unpack_from(data)
  if magic != _MAGIC:
    raise MessageError("bad magic")
  if version != _FORMAT:
    raise MessageError("unsupported format", f"format {version}, this reads {_FORMAT}")
  if total != len(data):
    raise MessageError("truncated" if total > len(data) else "trailing bytes",
                       f"{len(data)} bytes of {total}")
  mac = hmac.new(secret, data[:-_MAC_BYTES], hashlib.sha256).digest()
  if not hmac.compare_digest(mac, data[-_MAC_BYTES:]):
    raise MessageError("bad hmac")
  body_start = _PREFIX.size + header_bytes
  if body_start > len(data) - _MAC_BYTES:
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
  body = data[body_start:-_MAC_BYTES]
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


def contribution_bytes(c: Contribution, incarnation: int, secret: bytes) -> bytes:
  """`c` as a message; `incarnation` counts the learner's restarts."""
  names, arrays = _flatten(c.payload)
  meta = {"fields": _fields(c), "payload": names, "incarnation": int(incarnation)}
  return encode_message("contribution", meta, arrays, secret)


def parse_contribution(data: bytes, secret: bytes) -> tuple[Contribution, int]:
  """The inverse of `contribution_bytes`: (contribution, incarnation).

  Raises:
    MessageError: if `data` is not an intact contribution.
  """
  meta, arrays = decode_message(data, secret, "contribution")
  fields = _parse_fields(Contribution, meta.get("fields"))
  if not _is_int(meta.get("incarnation")):
    raise MessageError("bad header", f"incarnation {meta.get('incarnation')!r}")
  payload = _unflatten(meta.get("payload"), arrays)
  return Contribution(**fields, payload=payload), meta["incarnation"]


def publication_bytes(pub: Publication, secret: bytes, **extra) -> bytes:
  """`pub` as a message, with `extra` JSON fields (epoch, times) in its header."""
  names, arrays = _flatten(pub.payload)
  meta = {"fields": _fields(pub), "payload": names, "extra": extra}
  return encode_message("publication", meta, arrays, secret)


def parse_publication(data: bytes, secret: bytes) -> tuple[Publication, dict]:
  """The inverse of `publication_bytes`: (publication, extra header fields).

  Raises:
    MessageError: if `data` is not an intact publication.
  """
  meta, arrays = decode_message(data, secret, "publication")
  fields = _parse_fields(Publication, meta.get("fields"))
  if not isinstance(meta.get("extra"), dict):
    raise MessageError("bad header", f"extra {meta.get('extra')!r}")
  payload = _unflatten(meta.get("payload"), arrays)
  return Publication(**fields, payload=payload), meta["extra"]


def notice_bytes(notice: Notice, secret: bytes, **extra) -> bytes:
  """`notice` as a message (it carries no arrays)."""
  return encode_message("notice", {"fields": _fields(notice), "extra": extra}, [], secret)


def parse_notice(data: bytes, secret: bytes) -> tuple[Notice, dict]:
  """The inverse of `notice_bytes`: (notice, extra header fields).

  Raises:
    MessageError: if `data` is not an intact notice.
  """
  meta, arrays = decode_message(data, secret, "notice")
  if arrays or not isinstance(meta.get("extra"), dict):
    raise MessageError("bad header", "a notice carries no arrays and an extra dict")
  return Notice(**_parse_fields(Notice, meta.get("fields"))), meta["extra"]
