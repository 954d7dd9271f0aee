"""The mailbox: learners and the syncer talk through a key-value store.

DESIGN.md section 5 gives the protocol. The store is reached through
tensorstore, so one machine (`file://`), a test (`memory://`) and data centres
(`gs://`, `s3://`, S3-compatible stores) run the same code. Three primitives
carry it:

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
  lease/{name}                        a lease (syncer, learner/{m})
  run/config                          the run's config text

States and full copies are keyed by epoch too: a stale syncer can write them
before its `down` create loses, and must not leave them where the winner's
publication would find them.

Nothing read counts unless it authenticates. Every value, leases and the run
config included, is a message (runtime/dist/wire.py) tagged under the key of
the role that may write it (runtime/dist/keys.py), and is checked before it
influences anything: an object that does not authenticate, or is larger than
any legitimate value of its key (`Limits`; refused after reading its
24-byte prefix), is treated as absent for every decision (latest version,
liveness, lease holder, run config), logged once and counted once in
`rejected` (by kind of key and reason). A create that loses to such an object
takes the key over with compare-and-swap on its generation; only a create
that loses to an authentic object is a real fence. Store errors that may pass
(permissions, unavailable, timeouts) are retried with back-off for
`retry_s`; every store operation has a deadline.
"""

import collections
import math
import os
import re
import threading
import time
import urllib.parse
from typing import Callable, NamedTuple

from absl import logging
import numpy as np
import tensorstore as ts

from decoupled_diloco import config as config_lib
from decoupled_diloco.algorithm.messages import FULL, Contribution, Notice, Publication
from decoupled_diloco.runtime.dist import keys as keys_lib
from decoupled_diloco.runtime.dist.keys import Keyring
from decoupled_diloco.runtime.dist.wire import (PREFIX_BYTES, MessageError, contribution_bytes,
                                                decode_message, encode_message, notice_bytes,
                                                parse_contribution, parse_notice,
                                                parse_publication, publication_bytes,
                                                read_prefix)

# One process-wide memory store, so that Mailboxes opened on the same
# `memory://name` (a syncer and learners in one test) see each other's keys.
_MEMORY = ts.Context()
SMALL = 1 << 20  # The largest lease, notice or run config (bytes).
_HEADER_ROOM = 1 << 20  # What a message adds to its arrays: header, tags.
_NO_LIMITS = (4 << 30) + _HEADER_ROOM  # Without `Limits`: a 4 GiB fragment's.
_MAX_EPOCH = 10**9  # Epochs in keys above this are not ours (a planted key).
# Store errors worth retrying (tensorstore's absl status codes in the message).
_TRANSIENT = re.compile(r"PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED"
                        r"|ABORTED|INTERNAL|UNKNOWN|Permission denied|timed out", re.I)


def _is_int(x) -> bool:
  return type(x) is int  # Not bool, not float: JSON keeps the two apart.


class StoreError(RuntimeError):
  """The store failed an operation past its deadline; the message says which and why."""


# ------------------------------------------------------------------ store


class Lease(NamedTuple):
  """A named lease as last read or written; `generation` is what CAS compares."""
  name: str
  holder: str
  epoch: int  # Increments each time another holder takes the lease.
  expires_at: float  # On the writer's clock: ttls must exceed clock skew.
  info: dict
  generation: bytes
  serial: int = 0  # Counts writes, so that every write changes the bytes (S3: MD5 generations).


class Limits(NamedTuple):
  """The largest legitimate message per key, per fragment (bytes, header and tags included)."""
  up: tuple[int, ...]  # Contributions.
  down: tuple[int, ...]  # Publications and full copies.
  outer: tuple[int, ...]  # Outer states.

  @classmethod
  def of(cls, up_payload, down_payload, outer_arrays, num_learners: int) -> "Limits":
    """From the arrays' bytes per fragment (a payload, a full copy, an outer state)."""
    room = _HEADER_ROOM + 64 * (num_learners + 2)
    add = lambda sizes: tuple(int(n) + room for n in sizes)
    return cls(add(up_payload), add(down_payload), add(outer_arrays))


def audience(num_learners: int) -> list[str]:
  """Who reads what the syncer writes for everyone: itself and every learner."""
  return [keys_lib.SYNCER] + [keys_lib.learner(m) for m in range(num_learners)]


def kvstore_spec(url: str) -> dict:
  """The tensorstore KvStore spec of a mailbox URL; see `Mailbox`.

  Raises:
    ValueError: for a URL of any other form.
  """
  scheme, sep, rest = url.partition("://")
  if not sep and url and ":" not in url.split("/")[0]:
    scheme, rest = "file", os.path.abspath(url)
  rest, _, query_text = rest.partition("?")
  rest = rest.rstrip("/")
  path = rest + "/" if rest else ""
  query = urllib.parse.parse_qs(query_text)
  if set(query) - ({"endpoint", "region"} if scheme == "s3" else set()):
    raise ValueError(f"Mailbox url {url!r}: unknown parameters {sorted(query)}"
                     " (only s3:// takes ?endpoint=...&region=...).")
  if scheme == "memory":
    return {"driver": "memory", "path": path}
  if scheme == "file" and rest.startswith("/"):
    return {"driver": "file", "path": path}
  if scheme in ("gs", "s3") and rest:
    bucket, _, prefix = rest.partition("/")
    spec = {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket,
            "path": prefix + "/" if prefix else ""}
    if scheme == "s3":  # Create-once and leases need S3's conditional writes.
      spec["use_conditional_write"] = True
      if "endpoint" in query:  # An S3-compatible store (MinIO, R2, Ceph, moto).
        spec.update(endpoint=query["endpoint"][0], aws_region=query.get("region", ["us-east-1"])[0],
                    aws_credentials={"type": "environment"})
      elif "region" in query:
        spec["aws_region"] = query["region"][0]
    return spec
  hint = " (file: URLs need two slashes: file:///abs/path)" if url.startswith("file:") else ""
  raise ValueError(
      f"Mailbox url {url!r} is not one of file:///abs/path, a local path, memory://name,"
      f" gs://bucket/prefix or s3://bucket/prefix[?endpoint=http://host:port]{hint}.")


# A conditional write's `if_equal` for "the key is missing" (StorageGeneration
# NoValue), as tensorstore's Python API reports it for a missing key.
_MISSING = ts.KvStore.open({"driver": "memory"}).result().read("_").result().stamp.generation


def _successor(prefix: str) -> str:
  """The first key after every key that starts with `prefix` ('' if none)."""
  return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""


def _numbers(key: str, prefix: str, count: int) -> tuple[int, ...] | None:
  """The `count` decimal fields after `prefix` in `key`, or None if malformed."""
  parts = key[len(prefix):].split("/")
  if len(parts) != count or not all(s.isascii() and s.isdigit() and len(s) <= 18 for s in parts):
    return None
  return tuple(map(int, parts))


def _up_key(p, rnd, m): return f"up/{p}/{rnd:010d}/{m:05d}"
def _down_key(p, v): return f"down/{p}/{v:010d}"
def _full_key(p, v, e): return f"full/{p}/{v:010d}/{e:06d}"
def _outer_key(p, v, e): return f"syncer/outer/{p}/{v:010d}/{e:06d}"
def _notice_key(p, rnd): return f"notice/{p}/{rnd:010d}"


# The kind of object a key holds, for limits and the rejection counts.
_KINDS = (("up/", "contribution"), ("down/", "publication"), ("full/", "full copy"),
          ("syncer/outer/", "outer state"), ("notice/", "notice"), ("lease/", "lease"),
          ("run/", "config"))


def kind_of(key: str) -> str:
  return next((kind for prefix, kind in _KINDS if key.startswith(prefix)), "other")


class _Read(NamedTuple):
  """A bounded read: `state` ("value", "missing" or "bad"), the bytes, the generation."""
  state: str
  value: bytes
  generation: bytes
  reason: str = ""


class Mailbox:
  """A process's view of one run's key-value store.

  Reading methods never raise on a bad or hostile object: they treat it as
  absent (see module docstring). Store errors raise `StoreError` once retries
  run out. Safe to share between threads.

  Args:
    url: `file:///abs/path` or a local path, `memory://name` (one store per
      process: use a fresh name per test), `gs://bucket/prefix`,
      `s3://bucket/prefix` (AWS), or `s3://bucket/prefix?endpoint=http://host:port`
      (an S3-compatible store; credentials from AWS_ACCESS_KEY_ID and
      AWS_SECRET_ACCESS_KEY). S3 stores need conditional writes.
    keys: this process's `Keyring`, or the run secret (bytes: every key).
    num_learners: who publications, notices and the run config are tagged
      for (the syncer's and the launcher's mailboxes need it to write them).
    limits: the largest legitimate message per fragment (`Limits`); None
      bounds every fragment's values as a 4 GiB fragment's (tools, tests).
    latency_s, bytes_per_s: emulate a slow link: each store operation sleeps
      latency_s, plus len(value) / bytes_per_s when it moves a value. Both
      are attributes, so a chaos test can throttle a running learner's link.
    clock: wall-clock seconds, for leases and retries (tests pass a fake one).
    sleep: how the slow link and retries wait (tests pass their fake clock's).
    timeout_s: each store operation's deadline; opening fails after it if the
      store cannot be reached (a wrong endpoint, no credentials).
    retry_s: how long errors that may pass are retried before `StoreError`.
  """

  def __init__(self, url: str, keys: Keyring | bytes, *, num_learners: int | None = None,
               limits: Limits | None = None, latency_s: float = 0.0,
               bytes_per_s: float = math.inf, clock=time.time, sleep=time.sleep,
               timeout_s: float = 10.0, retry_s: float = 300.0):
    if isinstance(keys, bytes):
      keys = Keyring.from_secret(keys)
    if not isinstance(keys, Keyring):
      raise ValueError(f"The mailbox needs a Keyring or the run secret (bytes); got {keys!r}.")
    spec = kvstore_spec(url)
    context = _MEMORY if spec["driver"] == "memory" else ts.Context()
    self.url, self.keyring, self._clock, self._sleep = url, keys, clock, sleep
    self.timeout_s, self.retry_s = timeout_s, retry_s
    self.latency_s, self.bytes_per_s = latency_s, bytes_per_s
    self.limits = limits
    self.audience = audience(num_learners or 0)
    self._lock = threading.Lock()
    self.rejected = collections.Counter()  # (kind, reason) -> objects.
    self._bad: dict[tuple[str, bytes], str] = {}  # (key, generation) -> reason, logged once.
    self._newest: dict[str, tuple[int, object]] = {}  # Prefix -> (number, parsed), authentic.
    self.bytes_written = self.bytes_read = 0
    try:
      self._kv = ts.KvStore.open(spec, context=context).result(timeout=timeout_s)
      self._kv.list(ts.KvStore.KeyRange("run/", "run0")).result(timeout=timeout_s)
    except Exception as e:  # pylint: disable=broad-except  (any reason: one line)
      why = ("no answer (check the URL, the endpoint, the credentials and the network)"
             if isinstance(e, TimeoutError) else _reason(e))
      raise StoreError(f"cannot reach the mailbox {url} within {timeout_s:g} s: {why}") from None

  def __repr__(self):
    return f"Mailbox({self.url!r})"

  # ------------------------------------------------------------------ raw

  def _op(self, what: str, start: Callable[[], "ts.Future"]):
    """`start()`'s result within `timeout_s`; errors that may pass are retried for `retry_s`.

    Raises:
      StoreError: once retries run out, or at once for errors that will not pass.
    """
    deadline, wait = self._clock() + self.retry_s, 0.1
    while True:
      try:
        return start().result(timeout=self.timeout_s)
      except Exception as e:  # pylint: disable=broad-except  (sorted below)
        error = e
      transient = isinstance(error, TimeoutError) or bool(_TRANSIENT.search(str(error)))
      if not transient or self._clock() + wait > deadline:
        raise StoreError(f"mailbox {self.url}: {what} failed"
                         f"{f' for {self.retry_s:.0f} s' if transient else ''}: "
                         f"{_reason(error)}") from None
      logging.warning("mailbox %s: %s failed (%s); retrying in %.1f s", self.url, what,
                      _reason(error), wait)
      self._sleep(wait)
      wait = min(2 * wait, 10.0)

  def _link(self, nbytes: int = 0) -> None:
    delay = self.latency_s + nbytes / self.bytes_per_s
    if delay > 0:
      self._sleep(delay)

  def limit(self, key: str) -> int:
    """The largest legitimate value of `key` (bytes)."""
    field = {"contribution": "up", "publication": "down", "full copy": "down",
             "outer state": "outer"}.get(kind_of(key))
    if field is None:
      return SMALL
    if self.limits is None:
      return _NO_LIMITS
    p = key.removeprefix("syncer/").split("/")[1]
    sizes = getattr(self.limits, field)
    return sizes[int(p)] if p.isdigit() and int(p) < len(sizes) else 0

  def _read(self, key: str, tries: int = 4) -> _Read:
    """`key`'s value, reading at most its prefix if it is larger than `limit(key)`.

    Two reads: the prefix (which says the length), then the object. A writer may
    replace the object between them (a lease renewed): then the second read's bytes
    are not of the object the first one sized, so the read starts again (`tries`
    times; after that the key counts as missing for now, and no object is blamed).
    """
    def start(byte_range):
      return lambda: self._kv.read(key, byte_range=byte_range)
    try:
      head = self._op(f"read {key}", start(slice(0, PREFIX_BYTES)))
    except StoreError as e:
      if "OUT_OF_RANGE" not in str(e):
        raise
      # Shorter than any message; its generation, for a compare-and-swap over it.
      head = self._op(f"read {key}", start(slice(0, 0)))
      if head.state != "value":
        return _Read("missing", b"", head.stamp.generation)
      return _Read("bad", b"", head.stamp.generation, "truncated")
    if head.state != "value":
      return _Read("missing", b"", head.stamp.generation)
    generation = head.stamp.generation
    if (key, generation) in self._bad:
      return _Read("bad", b"", generation, self._bad[key, generation])
    try:
      total = read_prefix(head.value)[0]
    except MessageError as e:
      return _Read("bad", b"", generation, e.reason)
    if total > self.limit(key):
      return _Read("bad", b"", generation, "too large")
    try:
      result = self._op(f"read {key}", start(slice(0, total)))
    except StoreError as e:
      if "OUT_OF_RANGE" not in str(e):
        raise
      result = self._op(f"read {key}", start(slice(0, 0)))  # Shorter than it says, or replaced?
      if result.stamp.generation == generation:
        return _Read("bad", b"", generation, "truncated")
    if result.stamp.generation != generation:  # Replaced (or deleted) between the two reads.
      if tries > 1:
        return self._read(key, tries - 1)
      return _Read("missing", b"", generation)
    value = result.value  # Each access of `.value` copies the bytes: take them once.
    self._link(len(value))
    with self._lock:
      self.bytes_read += len(value)
    return _Read("value", value, generation)

  def _write(self, key: str, value: bytes | None, if_equal: bytes | None = None) -> bytes:
    """Writes `value` (None: deletes); its new generation, empty if `if_equal` did not match.

    A conditional write retried after an error may find its own first attempt
    there: that counts as written.
    """
    tries = [0]
    def start():
      tries[0] += 1
      return self._kv.write(key, value, if_equal=if_equal)
    stamp = self._op(f"write {key}", start)
    if not stamp.generation and tries[0] > 1 and value is not None:
      current = self._op(f"read {key}", lambda: self._kv.read(key))
      if current.state == "value" and current.value == value:
        return current.stamp.generation
    if value is not None:
      self._link(len(value))
      with self._lock:
        self.bytes_written += len(value)
    return stamp.generation

  def _reject(self, key: str, generation: bytes, reason: str) -> None:
    """Logs and counts an object that does not count, once per object."""
    with self._lock:
      if (key, generation) in self._bad:
        return
      self._bad[key, generation] = reason
      self.rejected[kind_of(key), reason] += 1
    logging.warning("Mailbox %s: %s does not count (%s); it is treated as absent",
                    self.url, key, reason)

  def _parsed(self, key: str, parse):
    """(parse(value), generation) of `key`; (None, generation) if missing or bad (counted)."""
    got = self._read(key)
    if got.state == "missing":
      return None, got.generation
    if got.state == "bad":
      self._reject(key, got.generation, got.reason)
      return None, got.generation
    try:
      return parse(got.value), got.generation
    except MessageError as e:
      self._reject(key, got.generation, e.reason)
      return None, got.generation

  def _take_over(self, key: str, value: bytes, parse) -> str:
    """Creates `key`; if an object that does not count holds it, replaces that
    (compare-and-swap on its generation).

    Returns "created", "replaced", "authentic" (an object that counts is there:
    nothing written) or "lost" (objects that do not count kept replacing ours).
    """
    for _ in range(4):
      if self.create(key, value):
        return "created"
      parsed, generation = self._parsed(key, parse)
      if parsed is not None:
        return "authentic"
      if generation and generation != _MISSING and self._write(key, value, if_equal=generation):
        logging.warning("Mailbox %s: took %s over from an object that did not count",
                        self.url, key)
        return "replaced"
    return "lost"

  def create(self, key: str, value: bytes) -> bool:
    """Writes `value` if `key` is missing; False (nothing written) if not."""
    return bool(self._write(key, value, if_equal=_MISSING))

  def read(self, key: str) -> bytes | None:
    """The raw value of `key` (bounded as any read: None if missing or too large)."""
    got = self._read(key)
    return got.value if got.state == "value" else None

  def keys(self, prefix: str) -> list[str]:
    """Every key that starts with `prefix`, sorted."""
    self._link()
    found = self._op(f"list {prefix}",
                     lambda: self._kv.list(ts.KvStore.KeyRange(prefix, _successor(prefix))))
    return sorted(k.decode() for k in found)

  def delete(self, keys) -> None:
    futures = [(k, self._kv.write(k, None)) for k in keys]  # In flight together.
    for k, future in futures:
      try:
        future.result(timeout=self.timeout_s)
      except Exception:  # pylint: disable=broad-except  (retried one by one)
        self._write(k, None)
    self._link()

  def _newest_authentic(self, prefix: str, numbers, get, low: int = -1):
    """(number, parsed) of the highest of `numbers` (keys under `prefix`) above `low`
    whose object counts (`get(number)`, None if not); None if there is none.

    The newest authentic object per prefix is remembered: messages are written
    once, and an authentic one stays so even if its key is later overwritten.
    """
    known = self._newest.get(prefix)
    for number in sorted(numbers, reverse=True):
      if number <= low or (known is not None and number < known[0]):
        break
      if known is not None and number == known[0]:
        return known
      if (parsed := get(number)) is not None:
        with self._lock:
          self._newest[prefix] = known = (number, parsed)
        return known
    return known if known is not None and known[0] > low else None

  def _numbered(self, prefix: str, num_fragments: int) -> list[list[int]]:
    """Per fragment, the numbers of the keys `{prefix}{p}/{number}`, from one listing."""
    found = [[] for _ in range(num_fragments)]
    for key in self.keys(prefix):
      if (n := _numbers(key, prefix, 2)) and n[0] < num_fragments:
        found[n[0]].append(n[1])
    return found

  # -------------------------------------------------------- contributions

  def send(self, c: Contribution, incarnation: int) -> str:
    """Creates `c`'s key: "sent", "duplicate" (this learner sent that round already, an
    earlier incarnation maybe), "replaced" (it held an object that did not count) or
    "lost" (something kept replacing it)."""
    if min(c.fragment, c.round, c.learner) < 0:
      raise ValueError(f"Contribution fragment, round and learner must be >= 0; got "
                       f"{c.fragment}, {c.round}, {c.learner}.")
    key = _up_key(c.fragment, c.round, c.learner)
    outcome = self._take_over(key, contribution_bytes(c, incarnation, self.keyring),
                              lambda data: self._contribution(data, key, c.fragment, c.round,
                                                              c.learner))
    return {"created": "sent", "authentic": "duplicate"}.get(outcome, outcome)

  def contributions(self, p: int) -> list[tuple[int, int]]:
    """(round, learner) of every contribution to fragment `p`, sorted."""
    prefix = f"up/{p}/"
    return [n for k in self.keys(prefix) if (n := _numbers(k, prefix, 2))]

  def _contribution(self, data, key: str, p: int, rnd: int, m: int):
    got = parse_contribution(data, self.keyring, m)
    if (got[0].fragment, got[0].round, got[0].learner) != (p, rnd, m):
      raise MessageError("key mismatch", key)
    return got

  def receive(self, p: int, rnd: int, m: int) -> tuple[Contribution, int] | None:
    """Learner `m`'s contribution to round `rnd` of fragment `p`, with its incarnation;
    None if missing or if the object there does not count."""
    key = _up_key(p, rnd, m)
    return self._parsed(key, lambda data: self._contribution(data, key, p, rnd, m))[0]

  # ------------------------------------------------------ publications

  def _publication(self, data, key: str, p: int, v: int):
    got = parse_publication(data, self.keyring)
    if (got[0].fragment, got[0].version) != (p, v):
      raise MessageError("key mismatch", key)
    if not _is_int(got[1].get("epoch")):
      raise MessageError("bad header", f"epoch {got[1].get('epoch')!r}")
    return got

  def _holds(self, lease: Lease) -> bool:
    """`lease` is still ours: the stored lease is it, or (an object that does not count
    or none is there) ours has not expired."""
    current = self.read_lease(lease.name)
    if current is None:
      return lease.expires_at > self._clock()
    return ((current.holder, current.epoch) == (lease.holder, lease.epoch)
            and current.expires_at > self._clock())

  def _stage(self, key: str, value: bytes, down_key: str, p: int, v: int) -> bool:
    """Creates `key` ahead of publishing `down_key`; False if that is published.

    `key` holds the lease's epoch, so only this holder writes it: if it
    exists, a failed attempt of ours left it (or an object that does not
    count), and while the version is unpublished nothing reads it, so it is
    overwritten.
    """
    if self.create(key, value):
      return True
    if self._parsed(down_key, lambda data: self._publication(data, down_key, p, v))[0]:
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
        "outer", {"fragment": p, "version": v, "epoch": e, "state": meta}, arrays, self.keyring,
        [keys_lib.SYNCER]))]
    if full is not None:
      staged.append((_full_key(p, v, e),
                     publication_bytes(full, self.keyring, self.audience, epoch=e)))
    if not all(self._stage(key, value, down, p, v) for key, value in staged):
      return False
    outcome = self._take_over(down, publication_bytes(pub, self.keyring, self.audience, epoch=e,
                                                      **extra),
                              lambda data: self._publication(data, down, p, v))
    return outcome in ("created", "replaced")

  def notify(self, notice: Notice, *, lease: Lease) -> bool:
    """Writes `notice` (fenced by `lease`, like `publish`); False if this syncer must stop."""
    if not self._holds(lease):
      return False
    p, rnd = notice.fragment, notice.round
    key = _notice_key(p, rnd)
    outcome = self._take_over(key, notice_bytes(notice, self.keyring, self.audience,
                                                epoch=lease.epoch),
                              lambda data: self._notice(data, key, p, rnd))
    return outcome in ("created", "replaced")

  def _notice(self, data, key: str, p: int, rnd: int) -> Notice:
    notice = parse_notice(data, self.keyring)[0]
    if (notice.fragment, notice.round) != (p, rnd):
      raise MessageError("key mismatch", key)
    return notice

  def latest_notices(self, num_fragments: int, above) -> list[Notice | None]:
    """Per fragment p, the notice of its newest round above `above[p]` that counts."""
    out = []
    for p, rounds in enumerate(self._numbered("notice/", num_fragments)):
      got = self._newest_authentic(f"notice/{p}/", rounds, lambda rnd: self.notice(p, rnd),
                                   low=int(above[p]))
      out.append(None if got is None else got[1])
    return out

  def notice(self, p: int, rnd: int) -> Notice | None:
    """The notice that round `rnd` of fragment `p` closed with nothing merged."""
    key = _notice_key(p, rnd)
    return self._parsed(key, lambda data: self._notice(data, key, p, rnd))[0]

  def versions(self, p: int) -> list[int]:
    """Versions of fragment `p` with a key under `down/`, sorted (some may not count:
    `publication` tells)."""
    prefix = f"down/{p}/"
    return [n[0] for k in self.keys(prefix) if (n := _numbers(k, prefix, 1))]

  def _latest(self, p: int, versions) -> int | None:
    got = self._newest_authentic(f"down/{p}/", versions, lambda v: self.publication(p, v))
    return None if got is None else got[0]

  def latest_version(self, p: int) -> int | None:
    """The newest version of fragment `p` whose publication counts."""
    return self._latest(p, self.versions(p))

  def latest_versions(self, num_fragments: int) -> list[int | None]:
    """`latest_version` of every fragment, from one listing (what pollers call)."""
    return [self._latest(p, versions)
            for p, versions in enumerate(self._numbered("down/", num_fragments))]

  def publication(self, p: int, v: int) -> tuple[Publication, dict] | None:
    """(publication, extra header fields) of version `v` of fragment `p`."""
    known = self._newest.get(f"down/{p}/")
    if known is not None and known[0] == v:
      return known[1]
    key = _down_key(p, v)
    return self._parsed(key, lambda data: self._publication(data, key, p, v))[0]

  def full_copy(self, p: int, v: int) -> Publication | None:
    """A full copy of version `v` of fragment `p`, if one was published."""
    got = self.publication(p, v)
    if got is None:
      return None
    pub, extra = got
    if pub.base_version == FULL:
      return pub
    key = _full_key(p, v, extra["epoch"])
    def parse(data):
      full = parse_publication(data, self.keyring)[0]
      if (full.fragment, full.version, full.base_version) != (p, v, FULL):
        raise MessageError("key mismatch", key)
      return full
    return self._parsed(key, parse)[0]  # Not every version has a full copy.

  def outer_state(self, p: int, v: int) -> tuple[dict, list[np.ndarray]] | None:
    """The outer state saved with version `v` of fragment `p`: (meta, arrays)."""
    got = self.publication(p, v)
    if got is None:
      return None
    e = got[1]["epoch"]
    key = _outer_key(p, v, e)
    def parse(data):
      meta, arrays = decode_message(data, self.keyring, "outer", keys_lib.SYNCER)
      if [meta.get("fragment"), meta.get("version"), meta.get("epoch")] != [p, v, e]:
        raise MessageError("key mismatch", key)
      if not isinstance(meta.get("state"), dict):
        raise MessageError("bad header", "no state")
      return meta["state"], arrays
    return self._parsed(key, parse)[0]

  # --------------------------------------------------------------- leases

  @staticmethod
  def _writer(name: str) -> str:
    """The role that writes lease `name` (learner/m: that learner; else the syncer)."""
    return name if name.startswith("learner/") else keys_lib.SYNCER

  def _lease(self, name: str, data, generation: bytes) -> Lease:
    """The lease in `data`, checked under its writer's key (or, for a learner's
    lease read by another learner, the learners' shared key)."""
    writer = self._writer(name)
    role = writer if self.keyring.holds(writer) else keys_lib.PEERS
    meta, arrays = decode_message(data, self.keyring, "lease", role)
    fields = (meta.get("name"), meta.get("holder"), meta.get("epoch"), meta.get("expires_at"),
              meta.get("info"), meta.get("serial"))
    if fields[0] != name:
      raise MessageError("key mismatch", f"lease/{name}")
    if arrays or not (isinstance(fields[1], str) and _is_int(fields[2])
                      and isinstance(fields[3], float) and isinstance(fields[4], dict)
                      and _is_int(fields[5])):
      raise MessageError("bad lease")
    return Lease(name, fields[1], fields[2], fields[3], fields[4], generation, fields[5])

  def _read_lease(self, name: str) -> tuple[Lease | None, bytes]:
    """(the lease if it counts, the key's generation)."""
    parsed, generation = self._parsed(f"lease/{name}",
                                      lambda data: self._lease(name, data, b""))
    return (parsed._replace(generation=generation) if parsed else None), generation

  def _swap(self, lease: Lease, if_equal: bytes) -> Lease | None:
    """Writes `lease` if the key's generation is `if_equal`; the stored lease or None."""
    lease = lease._replace(serial=lease.serial + 1)
    writer = self._writer(lease.name)
    roles = [writer] if writer == keys_lib.SYNCER else [writer, keys_lib.PEERS]
    value = encode_message("lease", {"name": lease.name, "holder": lease.holder,
                                     "epoch": lease.epoch, "expires_at": lease.expires_at,
                                     "info": lease.info, "serial": lease.serial},
                           [], self.keyring, roles)
    generation = self._write(f"lease/{lease.name}", value, if_equal=if_equal)
    return lease._replace(generation=generation) if generation else None

  def _fresh_epoch(self) -> int:
    """An epoch above every one the syncers have staged state under."""
    epochs = [n[-1] for prefix, count in (("syncer/outer/", 3), ("full/", 3))
              for k in self.keys(prefix) if (n := _numbers(k, prefix, count))
              and n[-1] < _MAX_EPOCH]
    return max(epochs, default=0) + 1

  def acquire(self, name: str, holder: str, ttl_s: float, info: dict | None = None) -> Lease | None:
    """Takes lease `name` if it is free, expired or held by `holder`; else None.

    `holder` must name one process (host, pid, a random suffix): fencing
    tells syncers apart by (holder, epoch). A key holding an object that does
    not count is free; the epoch then starts above every staged one.
    """
    current, generation = self._read_lease(name)
    now = self._clock()
    if current is not None:
      if current.holder != holder and current.expires_at > now:
        return None
      epoch, serial = current.epoch + (current.holder != holder), current.serial
    else:
      epoch, serial = self._fresh_epoch(), 0
    return self._swap(Lease(name, holder, epoch, float(now + ttl_s), info or {}, b"", serial),
                      generation)

  def renew(self, lease: Lease, ttl_s: float, info: dict | None = None) -> Lease | None:
    """Extends `lease` by `ttl_s` from now; None if another holder took it meanwhile.

    If the key was deleted or holds an object that does not count, the lease
    is still ours (nobody authentic took it): it is written back.
    """
    renewed = lease._replace(expires_at=float(self._clock() + ttl_s),
                             info=lease.info if info is None else info)
    if (done := self._swap(renewed, lease.generation)) is not None:
      return done
    current, generation = self._read_lease(lease.name)
    if current is not None:
      return None
    logging.warning("Mailbox %s: lease/%s was deleted or overwritten; writing it back",
                    self.url, lease.name)
    return self._swap(renewed, generation)

  def read_lease(self, name: str) -> Lease | None:
    """Lease `name`, if the object there counts."""
    return self._read_lease(name)[0]

  def leases(self, prefix: str) -> dict[str, Lease]:
    """Every lease whose name starts with `prefix` and that counts, by name."""
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

  def _config(self, data) -> str:
    meta, arrays = decode_message(data, self.keyring, "config", self.keyring.me)
    if arrays or not isinstance(meta.get("text"), str):
      raise MessageError("bad header", "a config carries its text")
    return meta["text"]

  def run_config(self) -> str | None:
    """The run's config text, if the object there counts."""
    return self._parsed("run/config", self._config)[0]

  def put_config(self, text: str) -> None:
    """Records the run's config (the syncer, or the launcher, creates the run); refuses a
    mailbox that another run wrote.

    Raises:
      ValueError: if the mailbox holds another run's config (naming what differs).
    """
    value = encode_message("config", {"text": text}, [], self.keyring, self.audience)
    outcome = self._take_over("run/config", value, self._config)
    if outcome == "lost":
      raise StoreError(f"mailbox {self.url}: run/config keeps being replaced by objects that"
                       " do not authenticate")
    if outcome == "authentic":
      self.check_config(self.run_config(), text)

  def check_config(self, stored: str | None, text: str) -> None:
    """Raises ValueError naming each field of `text` that differs from the run's."""
    if stored is not None and stored != text:
      raise ValueError(f"Mailbox {self.url} belongs to another run: its run/config "
                       f"{config_lib.differences(stored, text)}. Use the same config, or"
                       " another mailbox for another run.")

  def join(self, text: str, startup_s: float, num_fragments: int, poll_s: float = 0.5) -> None:
    """Waits (up to `startup_s`) for the run's config and first publications; a learner
    joins a run, it never creates one.

    Raises:
      ValueError: if the run's config differs from `text` (naming each field).
      TimeoutError: if no run appears in time.
    """
    deadline = self._clock() + startup_s
    while True:
      stored = self.run_config()
      self.check_config(stored, text)
      if stored is not None and None not in self.latest_versions(num_fragments):
        return
      if self._clock() >= deadline:
        what = "run/config" if stored is None else "the first publications"
        raise TimeoutError(f"no run at mailbox {self.url}: waited {startup_s:.0f} s"
                           f" (dist.startup_s) for {what}. Is the syncer running, on this"
                           " mailbox URL, with this run's secret?")
      self._sleep(poll_s)

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
    with self._lock:
      self._bad = {k: r for k, r in self._bad.items() if k[0] not in set(doomed)}
    return len(doomed)

  # ------------------------------------------------------------ counts

  def rejected_counts(self) -> dict[str, dict[str, int]]:
    """Objects that did not count, by kind of key and reason."""
    out: dict[str, dict[str, int]] = {}
    for (kind, reason), n in sorted(self.rejected.items()):
      out.setdefault(kind, {})[reason] = n
    return out

  def load_rejected(self, counts: dict, bad: list) -> None:
    """Takes up a predecessor's rejections (`rejected_counts`, `bad_objects`), so an
    object it counted is not counted again."""
    with self._lock:
      for kind, reasons in counts.items():
        for reason, n in reasons.items():
          self.rejected[kind, reason] = max(self.rejected[kind, reason], int(n))
      for key, generation, reason in bad:
        self._bad.setdefault((key, bytes.fromhex(generation)), reason)

  def bad_objects(self, most: int = 10_000) -> list[list[str]]:
    """The objects counted as rejected: [key, generation (hex), reason] (the first `most`)."""
    with self._lock:
      return [[k, g.hex(), r] for (k, g), r in list(self._bad.items())[:most]]


def _reason(error: Exception) -> str:
  """An exception in one line."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text[:300]
