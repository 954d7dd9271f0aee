"""Owning a workdir: checked writable, and locked so that one run at a time uses it.

The lock is `workdir/lock`, held with `flock` for the life of the run and
holding the holder's pid and host (JSON) for the message a second run gets.
The kernel drops an `flock` when its process dies, even by kill -9, so the
lock a killed run leaves behind is stale by construction: the next run takes
it over with a warning naming the dead holder. On a filesystem without
`flock` the pid and host decide: a lock of a pid that is gone from this host
is taken over, any other is respected, and the message says which file to
delete once that run is really gone.
"""

import errno
import fcntl
import json
import os
import socket

from absl import logging

LOCK_NAME = "lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir's lock."""


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and checks a file can be written there.

  Raises:
    ValueError: naming `--workdir` and what the filesystem said.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir={workdir!r} is not writable: {e.strerror or e}.") from None


class Lock:
  """The held lock of one workdir; `release()` (or leaving the `with`) gives it up."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while self._fd is None:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        flock = _try_flock(fd)
      except BlockingIOError:
        os.close(fd)
        raise WorkdirBusyError(self._busy_message(_read(self.path))) from None
      if not _same_file(fd, self.path):  # Its holder released (unlinked) it meanwhile.
        os.close(fd)
        continue
      self._fd = fd
    holder = _read(self.path)
    if holder and holder != me:
      if not flock and not _is_dead_here(holder):
        os.close(self._fd)  # Not `release()`: the file is the holder's.
        self._fd = None
        raise WorkdirBusyError(self._busy_message(holder))
      logging.warning("taking over the lock of a run that is gone (pid %s on %s): %s",
                      holder.get("pid"), holder.get("host"), self.path)
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(me).encode(), 0)
    os.fsync(self._fd)

  def _busy_message(self, holder: dict | None) -> str:
    who = (f"pid {holder.get('pid')} on host {holder.get('host')}" if holder
           else "another process")
    return (f"the workdir {os.path.dirname(self.path)} is in use by {who}; wait for that"
            f" run to end or use another --workdir (if that run is gone, delete {self.path}).")

  def release(self) -> None:
    if self._fd is not None:
      try:
        os.unlink(self.path)  # Before unlocking: a waiter then sees a new file, not ours.
      except FileNotFoundError:
        pass
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _try_flock(fd: int) -> bool:
  """Locks `fd` exclusively; False if the filesystem has no `flock`.

  Raises:
    BlockingIOError: another open file holds it.
  """
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    raise
  except OSError as e:
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      return False
    raise


def _same_file(fd: int, path: str) -> bool:
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      holder = json.loads(f.read() or "null")
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _is_dead_here(holder: dict) -> bool:
  """Whether `holder` names a process of this host that no longer exists."""
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return False
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # Alive, another user's.
    return False
  return False


def write_atomically(path: str, text: str) -> None:
  """Writes `path` atomically: a crash leaves the old file or the new one."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
