"""The mailbox: learners and the syncer talk through a key-value store.

DESIGN.md section 5 gives the protocol. The store is reached through
tensorstore, so one machine (`file://`), a test (`memory://`) and data centres
(`gs://`, `s3://`) run the same code. Three primitives carry it:

  create-once   a write conditioned on the key being missing. Contributions,
                publications and outer states are written this way, so a
                message is never overwritten and a version is published once.
  compare-and-swap  a write conditioned on the generation last read: leases.
  fencing       `down/{fragment}/{version}` is created once, so of two syncers
                that both believe they hold the lease, one publishes each
                version; the other's create fails and it must stop and reload.

A conditional write that loses does not raise: tensorstore returns an empty
generation. Every conditional write here checks what it got back.

Keys (`p` fragment, `v` version, `e` the syncer lease's epoch):

  up/{p}/{round:010d}/{learner:05d}   a learner's contribution
  syncer/outer/{p}/{v:010d}/{e:06d}   outer optimizer state after version v
  full/{p}/{v:010d}/{e:06d}           full copy of version v (optional)
  down/{p}/{v:010d}                   the publication of version v; names e
  lease/{name}                        JSON lease (syncer, learner/{m}, ...)
  run/config                          the run's config text

States and full copies are keyed by epoch too: a stale syncer can write them
before its `down` create loses, and must not leave them where the winner's
publication would find them.

Every value is a message: magic, format version, lengths, a JSON header, raw
array bytes, and an HMAC-SHA256 keyed with the run secret, so a truncated,
corrupted or foreign message is rejected (counted in `Mailbox.rejected`,
logged) and never reaches the algorithm. Leases are plain JSON: they carry no
arrays, and `put_config` already refuses a mailbox that belongs to another run.
"""

import collections
import hashlib
import hmac
import json
import math
import os
import struct
import threading
import time
import typing
from typing import NamedTuple

from absl import logging
import ml_dtypes
import numpy as np
import tensorstore as ts

from decoupled_diloco.algorithm.messages import FULL, Contribution, Publication

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
# One process-wide memory store, so that Mailboxes opened on the same
# `memory://name` (a syncer and learners in one test) see each other's keys.
_MEMORY = ts.Context()


class MessageError(ValueError):
  """A message that must not be used; `reason` says why in a few words."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


# ------------------------------------------------------------ wire format


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


# ------------------------------------------------------------------ store


class Lease(NamedTuple):
  """A named lease as last read or written; `generation` is what CAS compares."""
  name: str
  holder: str
  epoch: int  # Increments each time another holder takes the lease.
  expires_at: float  # On the writer's clock: ttls must exceed clock skew.
  info: dict
  generation: bytes


def kvstore_spec(url: str) -> dict:
  """The tensorstore KvStore spec of a mailbox URL; see `Mailbox`.

  Raises:
    ValueError: for a URL of any other form.
  """
  scheme, sep, rest = url.partition("://")
  if not sep and url:
    scheme, rest = "file", os.path.abspath(url)
  rest = rest.rstrip("/")
  path = rest + "/" if rest else ""
  if scheme == "memory":
    return {"driver": "memory", "path": path}
  if scheme == "file" and rest.startswith("/"):
    return {"driver": "file", "path": path}
  if scheme in ("gs", "s3") and rest:
    bucket, _, prefix = rest.partition("/")
    return {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket,
            "path": prefix + "/" if prefix else ""}
  raise ValueError(
      f"Mailbox url {url!r} is not one of file:///abs/path, a local path, "
      "memory://name, gs://bucket/prefix or s3://bucket/prefix.")


# A conditional write's `if_equal` for "the key is missing" (StorageGeneration
# NoValue), as tensorstore's Python API reports it for a missing key.
_MISSING = ts.KvStore.open({"driver": "memory"}).result().read("_").result().stamp.generation


def _successor(prefix: str) -> str:
  """The first key after every key that starts with `prefix` ('' if none)."""
  return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""


def _numbers(key: str, prefix: str, count: int) -> tuple[int, ...] | None:
  """The `count` decimal fields after `prefix` in `key`, or None if malformed."""
  parts = key[len(prefix):].split("/")
  if len(parts) != count or not all(s.isascii() and s.isdigit() for s in parts):
    return None
  return tuple(map(int, parts))


def _up_key(p, rnd, m): return f"up/{p}/{rnd:010d}/{m:05d}"
def _down_key(p, v): return f"down/{p}/{v:010d}"
def _full_key(p, v, e): return f"full/{p}/{v:010d}/{e:06d}"
def _outer_key(p, v, e): return f"syncer/outer/{p}/{v:010d}/{e:06d}"


class _Read(NamedTuple):
  """A read: `state` ("value" or "missing"), the bytes, the generation."""
  state: str
  value: bytes
  generation: bytes


class Mailbox:
  """Learners' and the syncer's view of one run's key-value store.

  Reading methods never raise on a bad message: they return None, count the
  reason in `rejected` and log it. Store errors (network, permissions) raise.
  Safe to share between threads.

  Args:
    url: `file:///abs/path` or a local path, `memory://name` (one store per
      process: use a fresh name per test), `gs://bucket/prefix` or
      `s3://bucket/prefix` (S3 needs conditional writes, as AWS has had since
      2024; S3-compatible stores may lack them).
    secret: the run secret that keys every message's HMAC.
    latency_s, bytes_per_s: emulate a slow link: each store operation sleeps
      latency_s, plus len(value) / bytes_per_s when it moves a value. Both
      are attributes, so a chaos test can throttle a running learner's link.
    clock: wall-clock seconds, for leases (tests pass a fake one).
  """

  def __init__(self, url: str, secret: bytes, *, latency_s: float = 0.0,
               bytes_per_s: float = math.inf, clock=time.time):
    if not isinstance(secret, bytes) or not secret:
      raise ValueError("The mailbox secret must be non-empty bytes.")
    spec = kvstore_spec(url)
    context = _MEMORY if spec["driver"] == "memory" else ts.Context()
    self._kv = ts.KvStore.open(spec, context=context).result()
    self.url, self._secret, self._clock = url, secret, clock
    self.latency_s, self.bytes_per_s = latency_s, bytes_per_s
    self._lock = threading.Lock()
    self.rejected = collections.Counter()
    self.bytes_written = self.bytes_read = 0

  def __repr__(self):
    return f"Mailbox({self.url!r})"

  # ------------------------------------------------------------------ raw

  def _link(self, nbytes: int = 0) -> None:
    delay = self.latency_s + nbytes / self.bytes_per_s
    if delay > 0:
      time.sleep(delay)

  def _read(self, key: str) -> "_Read":
    result = self._kv.read(key).result()
    value = result.value  # Each access of `.value` copies the bytes: take them once.
    self._link(len(value))
    with self._lock:
      self.bytes_read += len(value)
    return _Read(result.state, value, result.stamp.generation)

  def _write(self, key: str, value: bytes, if_equal: bytes | None = None) -> bytes:
    """Writes `value`; its new generation, empty if `if_equal` did not match."""
    stamp = self._kv.write(key, value, if_equal=if_equal).result()
    self._link(len(value))
    with self._lock:
      self.bytes_written += len(value)
    return stamp.generation

  def _exists(self, key: str) -> bool:
    self._link()
    return self._kv.read(key, byte_range=slice(0, 0)).result().state == "value"

  def _reject(self, key: str, reason: str) -> None:
    logging.warning("Mailbox rejected %s: %s", key, reason)
    with self._lock:
      self.rejected[reason] += 1

  def create(self, key: str, value: bytes) -> bool:
    """Writes `value` if `key` is missing; False (nothing written) if not."""
    return bool(self._write(key, value, if_equal=_MISSING))

  def read(self, key: str) -> bytes | None:
    result = self._read(key)
    return result.value if result.state == "value" else None

  def keys(self, prefix: str) -> list[str]:
    """Every key that starts with `prefix`, sorted."""
    self._link()
    found = self._kv.list(ts.KvStore.KeyRange(prefix, _successor(prefix))).result()
    return sorted(k.decode() for k in found)

  def delete(self, keys) -> None:
    futures = [self._kv.write(k, None) for k in keys]  # In flight together.
    for f in futures:
      f.result()
    self._link()

  def _message(self, key: str, parse, *, missing_ok: bool = False):
    """`parse(value)` of `key`, or None (rejection counted) if bad or missing."""
    data = self.read(key)
    if data is None:
      return None if missing_ok else self._reject(key, "missing")
    try:
      return parse(data)
    except MessageError as e:
      return self._reject(key, e.reason)

  # -------------------------------------------------------- contributions

  def send(self, c: Contribution, incarnation: int) -> bool:
    """Creates `c`'s key; False if that learner already sent for that round."""
    if min(c.fragment, c.round, c.learner) < 0:
      raise ValueError(f"Contribution fragment, round and learner must be >= 0; got "
                       f"{c.fragment}, {c.round}, {c.learner}.")
    return self.create(_up_key(c.fragment, c.round, c.learner),
                       contribution_bytes(c, incarnation, self._secret))

  def contributions(self, p: int) -> list[tuple[int, int]]:
    """(round, learner) of every contribution to fragment `p`, sorted."""
    prefix = f"up/{p}/"
    return [n for k in self.keys(prefix) if (n := _numbers(k, prefix, 2))]

  def receive(self, p: int, rnd: int, m: int) -> tuple[Contribution, int] | None:
    """Learner `m`'s contribution to round `rnd` of fragment `p`, with its incarnation."""
    key = _up_key(p, rnd, m)
    got = self._message(key, lambda data: parse_contribution(data, self._secret))
    if got is not None and (got[0].fragment, got[0].round, got[0].learner) != (p, rnd, m):
      return self._reject(key, "key mismatch")
    return got

  # ------------------------------------------------------ publications

  def _holds(self, lease: Lease) -> bool:
    current = self.read_lease(lease.name)
    return (current is not None and (current.holder, current.epoch) == (lease.holder, lease.epoch)
            and current.expires_at > self._clock())

  def _stage(self, key: str, value: bytes, down_key: str) -> bool:
    """Creates `key` ahead of publishing `down_key`; False if that is published.

    `key` holds the lease's epoch, so only this holder writes it: if it
    exists, a failed attempt of ours left it, and while the version is
    unpublished nothing reads it, so it is overwritten.
    """
    if self.create(key, value):
      return True
    if self._exists(down_key):
      return False
    return bool(self._write(key, value))

  def publish(self, pub: Publication, *, lease: Lease, outer: tuple[dict, list],
              full: Publication | None = None, **extra) -> bool:
    """Publishes `pub`, fenced by `lease`; False if this syncer must stop and reload.

    Writes the outer state, then the full copy, then `down/{p}/{v}`: a
    publication is visible only once what it names exists. False if `lease`
    is no longer current, or if `pub.version` is already published (another
    syncer took over): nothing this call wrote is then named by a publication.
    """
    p, v, e = pub.fragment, pub.version, lease.epoch
    if full is not None and (full.fragment, full.version, full.base_version) != (p, v, FULL):
      raise ValueError(f"full must be a full copy (base_version {FULL}) of fragment {p} "
                       f"version {v}; got {full.fragment}, {full.version}, {full.base_version}.")
    if not self._holds(lease):
      logging.warning("Syncer %s (epoch %d) no longer holds lease %r; not publishing %d/%d.",
                      lease.holder, e, lease.name, p, v)
      return False
    down = _down_key(p, v)
    meta, arrays = outer
    staged = [(_outer_key(p, v, e), encode_message(
        "outer", {"fragment": p, "version": v, "epoch": e, "state": meta}, arrays, self._secret))]
    if full is not None:
      staged.append((_full_key(p, v, e), publication_bytes(full, self._secret, epoch=e)))
    if not all(self._stage(key, value, down) for key, value in staged):
      return False
    return self.create(down, publication_bytes(pub, self._secret, epoch=e, **extra))

  def versions(self, p: int) -> list[int]:
    """Published versions of fragment `p`, sorted."""
    prefix = f"down/{p}/"
    return [n[0] for k in self.keys(prefix) if (n := _numbers(k, prefix, 1))]

  def latest_version(self, p: int) -> int | None:
    return max(self.versions(p), default=None)

  def latest_versions(self, num_fragments: int) -> list[int | None]:
    """`latest_version` of every fragment, from one listing (what pollers call)."""
    latest: list[int | None] = [None] * num_fragments
    for key in self.keys("down/"):
      if (n := _numbers(key, "down/", 2)) and n[0] < num_fragments:
        p, v = n
        latest[p] = v if latest[p] is None else max(latest[p], v)
    return latest

  def publication(self, p: int, v: int) -> tuple[Publication, dict] | None:
    """(publication, extra header fields) of version `v` of fragment `p`."""
    key = _down_key(p, v)
    got = self._message(key, lambda data: parse_publication(data, self._secret))
    if got is None:
      return None
    if (got[0].fragment, got[0].version) != (p, v):
      return self._reject(key, "key mismatch")
    if not _is_int(got[1].get("epoch")):
      return self._reject(key, "bad header")
    return got

  def full_copy(self, p: int, v: int) -> Publication | None:
    """A full copy of version `v` of fragment `p`, if one was published."""
    got = self.publication(p, v)
    if got is None:
      return None
    pub, extra = got
    if pub.base_version == FULL:
      return pub
    key = _full_key(p, v, extra["epoch"])
    full = self._message(key, lambda data: parse_publication(data, self._secret)[0],
                         missing_ok=True)  # Not every version has a full copy.
    if full is not None and (full.fragment, full.version, full.base_version) != (p, v, FULL):
      return self._reject(key, "key mismatch")
    return full

  def outer_state(self, p: int, v: int) -> tuple[dict, list[np.ndarray]] | None:
    """The outer state saved with version `v` of fragment `p`: (meta, arrays)."""
    got = self.publication(p, v)
    if got is None:
      return None
    e = got[1]["epoch"]
    key = _outer_key(p, v, e)
    state = self._message(key, lambda data: decode_message(data, self._secret, "outer"))
    if state is None:
      return None
    meta, arrays = state
    if [meta.get("fragment"), meta.get("version"), meta.get("epoch")] != [p, v, e]:
      return self._reject(key, "key mismatch")
    if not isinstance(meta.get("state"), dict):
      return self._reject(key, "bad header")
    return meta["state"], arrays

  # --------------------------------------------------------------- leases

  def _lease(self, name: str, result) -> Lease | None:
    """The lease in a read result; None if missing or malformed (counted)."""
    if result.state != "value":
      return None
    try:
      d = json.loads(result.value)
      lease = Lease(name, d["holder"], d["epoch"], d["expires_at"], d["info"],
                    result.generation)
    except (ValueError, TypeError, KeyError, RecursionError):
      lease = None
    if lease is None or not (isinstance(lease.holder, str) and _is_int(lease.epoch)
                             and isinstance(lease.expires_at, float)
                             and isinstance(lease.info, dict)):
      return self._reject(f"lease/{name}", "bad lease")
    return lease

  def _swap(self, lease: Lease, if_equal: bytes) -> Lease | None:
    """Writes `lease` if the key's generation is `if_equal`; the stored lease or None."""
    value = json.dumps({"holder": lease.holder, "epoch": lease.epoch,
                        "expires_at": lease.expires_at, "info": lease.info}).encode()
    generation = self._write(f"lease/{lease.name}", value, if_equal=if_equal)
    return lease._replace(generation=generation) if generation else None

  def acquire(self, name: str, holder: str, ttl_s: float, info: dict | None = None) -> Lease | None:
    """Takes lease `name` if it is free, expired or held by `holder`; else None.

    `holder` must name one process (host, pid, a random suffix): fencing
    tells syncers apart by (holder, epoch). A malformed lease is never
    taken, since its epoch, hence the next one, is unknown.
    """
    result = self._read(f"lease/{name}")
    current = self._lease(name, result)
    now = self._clock()
    if result.state == "value":
      if current is None or (current.holder != holder and current.expires_at > now):
        return None
      epoch = current.epoch + (current.holder != holder)
    else:
      epoch = 1
    return self._swap(Lease(name, holder, epoch, float(now + ttl_s), info or {}, b""),
                      result.generation)

  def renew(self, lease: Lease, ttl_s: float, info: dict | None = None) -> Lease | None:
    """Extends `lease` by `ttl_s` from now; None if it was lost meanwhile."""
    renewed = lease._replace(expires_at=float(self._clock() + ttl_s),
                             info=lease.info if info is None else info)
    return self._swap(renewed, lease.generation)

  def read_lease(self, name: str) -> Lease | None:
    return self._lease(name, self._read(f"lease/{name}"))

  def leases(self, prefix: str) -> dict[str, Lease]:
    """Every lease whose name starts with `prefix`, by name."""
    found = {}
    for key in self.keys(f"lease/{prefix}"):
      name = key[len("lease/"):]
      if (lease := self.read_lease(name)) is not None:
        found[name] = lease
    return found

  def release(self, lease: Lease) -> None:
    """Expires `lease` now, if still held, so a successor need not wait."""
    self._swap(lease._replace(expires_at=float(self._clock())), lease.generation)

  # --------------------------------------------------------- config, GC

  def put_config(self, text: str) -> None:
    """Records the run's config; refuses a mailbox that another run wrote.

    Raises:
      ValueError: if the mailbox holds another config, or one under another secret.
    """
    if self.create("run/config", encode_message("config", {"text": text}, [], self._secret)):
      return
    try:
      stored = decode_message(self.read("run/config") or b"", self._secret, "config")[0]
      same, why = stored.get("text") == text, "is another config"
    except MessageError:
      same, why = False, "does not read under this run's secret"
    if not same:
      raise ValueError(f"Mailbox {self.url} belongs to another run (its run/config {why}); "
                       "pick another mailbox path.")

  def collect(self, p: int, *, below_round: int, below_version: int) -> int:
    """Deletes fragment `p`'s old keys; returns how many.

    They are the contributions to rounds before `below_round`, and the
    publications, full copies and outer states of versions before
    `below_version`, except the latest published version's.
    """
    latest = self.latest_version(p)
    prefix = f"up/{p}/"
    doomed = [k for k in self.keys(prefix) if (n := _numbers(k, prefix, 2)) and n[0] < below_round]
    for prefix, count in ((f"down/{p}/", 1), (f"full/{p}/", 2), (f"syncer/outer/{p}/", 2)):
      doomed += [k for k in self.keys(prefix)
                 if (n := _numbers(k, prefix, count)) and n[0] < below_version and n[0] != latest]
    self.delete(doomed)
    return len(doomed)
