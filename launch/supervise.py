"""A launcher's child processes on this machine, and the supervisor that restarts them.

Every child dies with the launcher, even when the launcher is killed with
SIGKILL (`common.die_with`; Linux). A child that dies (a non-zero exit, or a
signal) is restarted after a back-off that doubles with each of its deaths
within `window_s`; the `max_deaths`-th death within that window is a crash
loop, which stops the run with the end of the process's log. A child the
launcher kills on purpose (a chaos fault) comes back after the delay the
launcher picks, and is not counted as a crash.
"""

import collections
import functools
import os
import signal
import subprocess
import sys
import threading
import time

from launch import common


class Process:
  """One child process, its log file, and its output streamed with a prefix.

  `on_start(process)` runs after each start (e.g. to record its pid).
  """

  def __init__(self, name: str, args: list[str], env: dict, log_path: str, echo: bool,
               on_start=None):
    self.name, self.args, self.env, self.log_path, self.echo = name, args, env, log_path, echo
    self.on_start = on_start
    self.popen: subprocess.Popen | None = None
    self.starts = 0
    self._pump_thread: threading.Thread | None = None

  def start(self) -> None:
    """Starts the process; call from the main thread (its death signal is tied to the caller)."""
    self.popen = subprocess.Popen(
        self.args, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
        start_new_session=True,  # Ctrl-C reaches the launcher, not them.
        preexec_fn=functools.partial(common.die_with, os.getpid()))
    self.starts += 1
    self._pump_thread = threading.Thread(target=self._pump, args=(self.popen,), daemon=True)
    self._pump_thread.start()
    if self.on_start:
      self.on_start(self)

  def _pump(self, popen) -> None:
    with open(self.log_path, "a") as log:
      for line in popen.stdout:
        log.write(line)
        log.flush()
        if self.echo:
          sys.stdout.write(f"[{self.name}] {line}")

  @property
  def pid(self) -> int | None:
    return self.popen.pid if self.popen else None

  def poll(self) -> int | None:
    """Its exit status (negative: the killing signal); None while it runs, or before it starts."""
    return self.popen.poll() if self.popen else None

  def running(self) -> bool:
    return self.popen is not None and self.popen.poll() is None

  def signal(self, sig: int) -> None:
    """Sends `sig` to its process group (it leads its own session), if it runs."""
    if self.running():
      try:
        os.killpg(self.popen.pid, sig)
      except ProcessLookupError:  # Exited meanwhile.
        pass

  def wait(self, timeout: float | None = None) -> int | None:
    try:
      return self.popen.wait(timeout)
    except subprocess.TimeoutExpired:
      return None

  def stop(self, grace_s: float = 5.0) -> None:
    stop_all([self], grace_s)

  def tail(self, lines: int = 20) -> str:
    """The last `lines` lines of its log (after the output of a process that ended is in)."""
    if self._pump_thread is not None and not self.running():
      self._pump_thread.join(2.0)
    try:
      with open(self.log_path, errors="replace") as f:
        return "".join(collections.deque(f, maxlen=lines))
    except FileNotFoundError:
      return ""


def stop_all(processes, grace_s: float = 5.0) -> None:
  """SIGTERM to every running process at once (a stopped one is continued first), then
  SIGKILL to those still running after `grace_s`."""
  live = [p for p in processes if p.running()]
  for p in live:
    p.signal(signal.SIGCONT)
    p.signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in live:
    if p.wait(max(deadline - time.monotonic(), 0.0)) is None:
      p.signal(signal.SIGKILL)
      p.wait(grace_s)


def how_it_ended(code: int) -> str:
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  return f"exit code {code}"


class CrashLoop(RuntimeError):
  """A process died `max_deaths` times within `window_s`: restarting it again would not help."""


class Supervisor:
  """Restarts the processes that die; see the module docstring.

  Args:
    processes: a callable giving the processes to watch (they may be replaced).
    backoff_s: the wait before the restart after a first death; doubled after each
      further death within `window_s`, up to `max_backoff_s`.
    max_deaths: deaths within `window_s` that make a crash loop.
    log: called with one line for each death and restart.
  """

  def __init__(self, processes, *, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
               max_deaths: int = 4, window_s: float = 300.0, log=print, clock=time.time):
    self.processes, self.log, self.clock = processes, log, clock
    self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
    self.max_deaths, self.window_s = max_deaths, window_s
    self.deaths = collections.defaultdict(collections.deque)  # name -> times, in the window.
    self.restart_at: dict[str, float] = {}  # name -> when it starts again.
    self.planned: dict[str, float] = {}  # name -> restart delay of a kill the launcher made.
    self.restarts = collections.Counter()  # name -> restarts.
    self.events: list[dict] = []

  def kill(self, process: Process, restart_after_s: float, sig: int = signal.SIGKILL) -> None:
    """Kills `process` on purpose: it starts again `restart_after_s` after it died."""
    if process.running():
      self.planned[process.name] = restart_after_s
      process.signal(sig)

  def busy(self) -> bool:
    """True while a process is to be restarted (the run is not over)."""
    return bool(self.restart_at or self.planned)

  def tick(self) -> None:
    """Restarts the processes whose time has come, and schedules those that died.

    Raises:
      CrashLoop: a process died `max_deaths` times within `window_s`; the message
        ends with its last log lines.
    """
    now = self.clock()
    for p in self.processes():
      if p.name in self.restart_at:
        if now >= self.restart_at[p.name]:
          del self.restart_at[p.name]
          p.start()
          self.restarts[p.name] += 1
          self._note("restart", p.name, f"{p.name}: restarted (pid {p.pid})", pid=p.pid)
        continue
      code = p.poll()
      if code is None or code == 0:
        if code == 0:
          self.planned.pop(p.name, None)  # It finished before the planned kill.
        continue
      how = how_it_ended(code)
      if p.name in self.planned:
        delay = self.planned.pop(p.name)
      else:
        recent = self.deaths[p.name]
        recent.append(now)
        while recent[0] <= now - self.window_s:
          recent.popleft()
        if len(recent) >= self.max_deaths:
          self._note("crash_loop", p.name, f"{p.name}: {how}", code=code)
          raise CrashLoop(
              f"{p.name} died {len(recent)} times within {self.window_s:.0f} s (last: {how});"
              f" stopping the run. The end of its log {p.log_path}:\n{p.tail(20).rstrip()}")
        delay = min(self.backoff_s * 2 ** (len(recent) - 1), self.max_backoff_s)
      self.restart_at[p.name] = now + delay
      self._note("died", p.name, f"{p.name}: {how}; restarting it in {delay:g} s", code=code,
                 restart_in_s=delay)

  def _note(self, event: str, name: str, line: str, **fields) -> None:
    self.events.append({"t": round(self.clock(), 6), "event": event, "process": name, **fields})
    self.log(line)
