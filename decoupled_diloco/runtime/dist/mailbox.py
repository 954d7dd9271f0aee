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
  notice/{p}/{round:010d}             round closed with nothing merged (learners wait)
  lease/{name}                        JSON lease (syncer, learner/{m}, ...)
  run/config                          the run's config text

States and full copies are keyed by epoch too: a stale syncer can write them
before its `down` create loses, and must not leave them where the winner's
publication would find them.

Every value is an authenticated message (runtime/dist/wire.py), so a
truncated, corrupted or foreign message is rejected (counted in
`Mailbox.rejected`, logged) and never reaches the algorithm. Leases are plain JSON: they carry no
arrays, and `put_config` already refuses a mailbox that belongs to another run.
"""

import collections
import json
import math
import os
import threading
import time
from typing import NamedTuple

from absl import logging
import numpy as np
import tensorstore as ts

from decoupled_diloco.algorithm.messages import FULL, Contribution, Notice, Publication
from decoupled_diloco.runtime.dist.wire import (MessageError, contribution_bytes, decode_message,
                                                encode_message, notice_bytes, parse_contribution,
                                                parse_notice, parse_publication, publication_bytes)

# One process-wide memory store, so that Mailboxes opened on the same
# `memory://name` (a syncer and learners in one test) see each other's keys.
_MEMORY = ts.Context()


def _is_int(x) -> bool:
  return type(x) is int  # Not bool, not float: JSON keeps the two apart.


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
def _notice_key(p, rnd): return f"notice/{p}/{rnd:010d}"


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
    sleep: how the slow link waits (tests pass their fake clock's).
  """

  def __init__(self, url: str, secret: bytes, *, latency_s: float = 0.0,
               bytes_per_s: float = math.inf, clock=time.time, sleep=time.sleep):
    if not isinstance(secret, bytes) or not secret:
      raise ValueError("The mailbox secret must be non-empty bytes.")
    spec = kvstore_spec(url)
    context = _MEMORY if spec["driver"] == "memory" else ts.Context()
    self._kv = ts.KvStore.open(spec, context=context).result()
    self.url, self._secret, self._clock, self._sleep = url, secret, clock, sleep
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
      self._sleep(delay)

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

  def notify(self, notice: Notice, *, lease: Lease) -> bool:
    """Writes `notice` (fenced by `lease`, like `publish`); False if this syncer must stop."""
    if not self._holds(lease):
      return False
    key = _notice_key(notice.fragment, notice.round)
    return self.create(key, notice_bytes(notice, self._secret, epoch=lease.epoch))

  def latest_notices(self, num_fragments: int) -> list[int | None]:
    """The newest round with a notice, per fragment, from one listing."""
    latest: list[int | None] = [None] * num_fragments
    for key in self.keys("notice/"):
      if (n := _numbers(key, "notice/", 2)) and n[0] < num_fragments:
        latest[n[0]] = n[1] if latest[n[0]] is None else max(latest[n[0]], n[1])
    return latest

  def notice(self, p: int, rnd: int) -> Notice | None:
    """The notice that round `rnd` of fragment `p` closed with nothing merged."""
    key = _notice_key(p, rnd)
    got = self._message(key, lambda data: parse_notice(data, self._secret))
    if got is not None and (got[0].fragment, got[0].round) != (p, rnd):
      return self._reject(key, "key mismatch")
    return None if got is None else got[0]

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
      same, why = stored.get("text") == text, _differences(stored.get("text"), text)
    except MessageError:
      same, why = False, "does not read under this run's secret"
    if not same:
      raise ValueError(f"Mailbox {self.url} belongs to another run (its run/config {why}); "
                       "pick another mailbox path.")

  def collect(self, p: int, *, below_round: int, below_version: int) -> int:
    """Deletes fragment `p`'s old keys; returns how many.

    They are the contributions and notices of rounds before `below_round`, and the
    publications, full copies and outer states of versions before
    `below_version`, except the latest published version's.
    """
    latest = self.latest_version(p)
    prefix = f"up/{p}/"
    doomed = [k for k in self.keys(prefix) if (n := _numbers(k, prefix, 2)) and n[0] < below_round]
    doomed += [k for k in self.keys(f"notice/{p}/")
               if (n := _numbers(k, f"notice/{p}/", 1)) and n[0] < below_round]
    for prefix, count in ((f"down/{p}/", 1), (f"full/{p}/", 2), (f"syncer/outer/{p}/", 2)):
      doomed += [k for k in self.keys(prefix)
                 if (n := _numbers(k, prefix, count)) and n[0] < below_version and n[0] != latest]
    self.delete(doomed)
    return len(doomed)


def _differences(stored, text: str, most: int = 4) -> str:
  """What differs between two JSON run records, by dotted key (the first `most`)."""
  def flat(value, prefix=""):
    if not isinstance(value, dict):
      return {prefix: value}
    return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
  try:
    old, new = flat(json.loads(stored)), flat(json.loads(text))
  except (TypeError, ValueError):
    return "is another config"
  keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  shown = "; ".join(f"{k.rstrip('.')}: {old.get(k)!r} there, {new.get(k)!r} here"
                    for k in keys[:most])
  return f"differs in {shown}" + (f" and {len(keys) - most} more" if len(keys) > most else "")
