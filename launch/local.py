"""Decoupled DiLoCo as real processes on this machine: a syncer and M learners.

  python -m launch.local --config=experiments/decoupled_diloco.py:nochaos \
      --workdir=/tmp/dd [--chaos] [--config.section.field=value ...]

Every process is `python -m decoupled_diloco.main --role=...` with its own
workdir (`WORKDIR/syncer`, `WORKDIR/learner{m}`) and one `file://` mailbox
(`WORKDIR/mailbox`). The run secret is generated into `WORKDIR/secret` (mode
600) and reaches the syncer through its environment; learner m gets only its
credential (`runtime/dist/keys.py`). Logs stream with a prefix per process;
one progress line shows the whole run (global versions, steps and tokens/s per
learner, goodput so far).

The launcher supervises (launch/supervise.py): a process that dies is
restarted after a back-off (--restart_backoff_s, doubling); one that dies
--crash_deaths times within --crash_window_s stops the run with the end of
its log. Ctrl-C, SIGTERM and SIGHUP stop every process; so does the
launcher's own death, even by kill -9 (the children's PR_SET_PDEATHSIG).

`--chaos` injects real faults on a seeded schedule, triggered by the
learners' progress: SIGKILL a learner, SIGKILL the syncer (both come back
through the supervisor), SIGSTOP a learner for a while (a straggler), and
throttle a learner's link (its mailbox emulates the bandwidth and latency).

Re-running with the same workdir resumes the run; the run's state there is
`config.json` (a workdir of another config is refused), `segments.json` (each
launch's start, end, restarts), `chaos.json` (the fault plan and which faults
fired: none fires twice) and `pids.json`. At the end, `WORKDIR/summary.json`
has the syncer's final eval loss, the wall-clock goodput and uptime over every
launch, and each process's summary; `WORKDIR/events.jsonl` merges every
process's events. Re-running a finished run prints its result and changes
nothing.
"""

import json
import os
import secrets
import signal
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from decoupled_diloco import metrics, workdir as workdir_lib
from decoupled_diloco.runtime.dist import keys
from launch import common, supervise

SECRET_ENV, KEY_ENV = keys.SECRET_ENV, keys.KEY_ENV
MAX_BACKOFF_S = 30.0  # The longest wait before a restart.
Process = supervise.Process  # What tests and benchmarks build runs from.


def _define_flags() -> None:
  """The command line's flags, defined only when this module is the program.

  Tests import `LocalRun`, next to other launchers that define flags of the
  same names.
  """
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (processes, mailbox, results).")
  flags.DEFINE_bool("chaos", False, "Kill, stop and throttle processes on a seeded schedule.")
  flags.DEFINE_integer("chaos_seed", 0, "Seeds which learners the faults hit (a resumed run"
                       " keeps the plan it was started with).")
  flags.DEFINE_integer("devices_per_learner", 1, "CPU devices per learner process (its"
                       " island).")
  flags.DEFINE_string("mailbox", None, "The mailbox URL (default: file://WORKDIR/mailbox;"
                      " e.g. s3://bucket/run?endpoint=http://host:port for an S3-compatible"
                      " store, credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY).")
  flags.DEFINE_float("timeout_s", 3600.0, "Stop everything after this long (this launch).")
  flags.DEFINE_float("restart_backoff_s", 1.0, "Wait before restarting a process that died;"
                     " doubled after each further death within --crash_window_s (at most"
                     f" {MAX_BACKOFF_S:.0f} s).")
  flags.DEFINE_integer("crash_deaths", 4, "A process that dies this many times within"
                       " --crash_window_s is in a crash loop: the run stops.")
  flags.DEFINE_float("crash_window_s", 300.0, "See --crash_deaths.")
  flags.mark_flags_as_required(["config", "workdir"])


class LocalRun:
  """The syncer and M learners of one run, started from `config_path` (a saved config).

  The syncer's environment has the run secret; learner m's has only its
  credential (`keys.learner_credential`). `WORKDIR/pids.json` names the
  launcher's and each child's pid, rewritten at each start.
  """

  def __init__(self, workdir: str, config_path: str, num_learners: int, *,
               devices_per_learner: int = 1, echo: bool = True, extra_flags=(),
               mailbox_url: str | None = None):
    self.workdir = os.path.abspath(workdir)
    self.num_learners = num_learners
    os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)
    self.mailbox_url = mailbox_url or f"file://{self.workdir}/mailbox"
    self.secret = _secret(os.path.join(self.workdir, "secret"))
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MEGASCALE_") and k not in (SECRET_ENV, KEY_ENV)}
    base.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    saved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "experiments", "saved.py")
    argv = [sys.executable, "-m", "decoupled_diloco.main", f"--config={saved}:{config_path}",
            f"--mailbox={self.mailbox_url}",
            "--compilation_cache=" + os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                    f"{self.workdir}/jax_cache"),
            *extra_flags]
    self.syncer = Process("syncer", [*argv, "--role=syncer",
                                     f"--workdir={self.workdir}/syncer"],
                          {**base, SECRET_ENV: self.secret, "JAX_NUM_CPU_DEVICES": "1"},
                          f"{self.workdir}/logs/syncer.log", echo, self._record_pids)
    self.learners = [
        Process(f"learner {m}", [*argv, "--role=learner", f"--learner={m}",
                                 f"--workdir={self.workdir}/learner{m}"],
                {**base, KEY_ENV: keys.learner_credential(self.secret.encode(), m),
                 "JAX_NUM_CPU_DEVICES": str(devices_per_learner)},
                f"{self.workdir}/logs/learner{m}.log", echo, self._record_pids)
        for m in range(num_learners)]

  @property
  def processes(self) -> list[Process]:
    return [self.syncer, *self.learners]

  def start(self, timeout_s: float = 300.0) -> None:
    """Starts the syncer, then the learners once it leads (or has failed, or timed out).

    Learners started first would only pile up contributions for a syncer
    still compiling; started together, a run would begin with a backlog.
    """
    self.syncer.start()
    box, deadline = self.mailbox(), time.time() + timeout_s
    while (self.syncer.running() and time.time() < deadline
           and box.latest_version(0) is None):
      time.sleep(0.2)
    for p in self.learners:
      p.start()

  def stop(self, grace_s: float = 5.0) -> None:
    """Stops every process at once: SIGTERM, then SIGKILL after `grace_s`."""
    supervise.stop_all(self.processes, grace_s)

  def _record_pids(self, _=None) -> None:
    pids = {"launcher": os.getpid(), **{p.name: p.pid for p in self.processes if p.pid}}
    workdir_lib.write_atomically(os.path.join(self.workdir, "pids.json"), json.dumps(pids))

  def link(self, m: int, bytes_per_s: float | None, latency_s: float = 0.0) -> None:
    """Throttles learner m's link (None: back to unthrottled)."""
    path = os.path.join(self.workdir, f"learner{m}", "link.json")
    if bytes_per_s is None:
      if os.path.exists(path):
        os.remove(path)
      return
    workdir_lib.write_atomically(path, json.dumps({"bytes_per_s": bytes_per_s,
                                                   "latency_s": latency_s}))

  def mailbox(self):
    from decoupled_diloco.runtime.dist.mailbox import Mailbox  # pylint: disable=g-import-not-at-top
    return Mailbox(self.mailbox_url, self.secret.encode())


def _secret(path: str) -> str:
  """The run's secret, made once (mode 600) and reused on resume."""
  if not os.path.exists(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
      f.write(secrets.token_hex(32))
  with open(path) as f:
    return f.read().strip()


def stop_leftovers(workdir: str, log) -> None:
  """Kills children that an earlier launcher of `workdir` left running.

  They die with their launcher (PR_SET_PDEATHSIG, Linux); this catches any
  that did not: a pid in `pids.json` whose command line is a process of this
  run (a pid reused since by anything else is left alone).
  """
  try:
    with open(os.path.join(workdir, "pids.json")) as f:
      pids = json.load(f)
  except (OSError, ValueError):
    return
  for name, pid in pids.items():
    if name == "launcher" or not isinstance(pid, int):
      continue
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode(errors="replace").split("\0")
    except OSError:
      continue
    if "decoupled_diloco.main" in argv and any(a.startswith(f"--workdir={workdir}/")
                                               for a in argv):
      os.kill(pid, signal.SIGKILL)
      log(f"killed {name} (pid {pid}), left running by an earlier launcher")


class Segments:
  """The launches of one run (`segments.json`): each one's start, end, restarts and events.

  A running segment's end is rewritten at least every `beat_s`, so a segment
  whose launcher was killed (kill -9, a lost machine) counts up to its last beat.
  """

  def __init__(self, path: str, beat_s: float = 1.0):
    self.path, self.beat_s = path, beat_s
    self.all = []
    if os.path.exists(path):
      with open(path) as f:
        self.all = json.load(f)
    for s in self.all:
      if s["ended"] == "running":  # Its launcher died without a word.
        s["ended"] = "launcher lost"
    now = time.time()
    self.all.append({"start": now, "end": now, "ended": "running", "restarts": {}, "events": []})
    self._written = 0.0
    self.write()

  @property
  def current(self) -> dict:
    return self.all[-1]

  def elapsed(self, now: float) -> float:
    """Wall seconds of the run so far: the earlier segments', and this one's until `now`."""
    return sum(s["end"] - s["start"] for s in self.all[:-1]) + now - self.current["start"]

  def beat(self, supervisor, ended: str | None = None) -> None:
    """Records this segment's end so far (`ended`: how it ended, written at once)."""
    now = time.time()
    self.current.update(end=now, restarts=dict(supervisor.restarts), events=supervisor.events)
    if ended:
      self.current["ended"] = ended
    if ended or now - self._written >= self.beat_s:
      self.write()

  def write(self) -> None:
    workdir_lib.write_atomically(self.path, json.dumps(self.all, indent=1))
    self._written = time.time()


# --- progress and chaos ---------------------------------------------------------------------


def progress(box, num_fragments: int, num_learners: int, units_per_step: int,
             elapsed_s: float, unit: str = "tokens") -> tuple[str, dict]:
  """One line for the whole run, and the learners' lease info it was made from.

  `elapsed_s`: the run's wall time so far, over every launch (a learner's
  busy time is over all of them too: it is checkpointed).
  """
  versions = box.latest_versions(num_fragments)
  leases = box.leases("learner/")
  now, info, parts = time.time(), {}, []
  for m in range(num_learners):
    lease = leases.get(f"learner/{m}")
    if lease is None:
      parts.append(f"L{m} -")
      continue
    info[m] = lease.info
    step_s = lease.info.get("step_seconds") or 0.0
    rate = units_per_step / step_s if step_s else 0.0
    status = lease.info.get("status", "?")
    state = status if status == "done" or lease.expires_at > now else "down"
    parts.append(f"L{m} step {lease.info.get('step', 0)} {rate:,.0f} {unit}/s {state}")
  busy = sum(i.get("busy_s", 0.0) for i in info.values())
  # At most 1: a launcher killed with -9 last wrote its segment's end up to a second early.
  goodput = min(busy / max(num_learners * elapsed_s, 1e-9), 1.0)
  shown = (versions if len(versions) <= 8
           else f"{min(v or 0 for v in versions)}..{max(v or 0 for v in versions)}")
  return f"versions {shown} | {' | '.join(parts)} | goodput {goodput:.0%}", info


def chaos_plan(seed: int, num_learners: int) -> list[list]:
  """(share of train.steps, what, learner, duration in seconds), learners drawn with `seed`."""
  rng = np.random.default_rng(seed)
  a, b = rng.choice(num_learners, size=2, replace=num_learners < 2)
  return [[0.25, "kill_learner", int(a), 8.0], [0.45, "kill_syncer", None, 3.0],
          [0.6, "stop_learner", int(b), 6.0], [0.75, "throttle_learner", int(a), 6.0]]


class Chaos:
  """Seeded real faults, each fired once when the learners reach a share of the run.

  The plan (`chaos_plan`), which faults have fired, those still in force and
  what was done are the run's state, in `path`: a resumed run keeps its plan
  and fires no fault twice. A killed process comes back through the
  supervisor `duration` after its death; a stop or a throttle is undone after
  `duration`, when the run ends, or when it resumes if its launcher died first.
  """

  def __init__(self, run: LocalRun, supervisor: supervise.Supervisor, steps: int, seed: int,
               log, path: str):
    self.run, self.supervisor, self.steps, self.log, self.path = run, supervisor, steps, log, path
    if os.path.exists(path):
      with open(path) as f:
        state = json.load(f)
      if state["seed"] != seed:
        log(f"chaos: this run's plan was drawn with --chaos_seed={state['seed']}; it keeps it")
    else:
      state = {"seed": seed, "plan": chaos_plan(seed, run.num_learners), "fired": [],
               "pending": [], "events": []}
    self.seed, self.plan, self.events = state["seed"], state["plan"], state["events"]
    self.fired = set(state["fired"])
    self.pending: list[tuple[float, str, int | None]] = []  # (when, action, learner)
    self._save()
    for _, what, m in state["pending"]:  # In force when the last launcher died.
      self._undo(what, m)

  def _save(self) -> None:
    state = {"seed": self.seed, "plan": self.plan, "fired": sorted(self.fired),
             "pending": self.pending, "events": self.events}
    workdir_lib.write_atomically(self.path, json.dumps(state, indent=1))

  def tick(self, info: dict) -> None:
    now = time.time()
    done = [i.get("step", 0) / self.steps for i in info.values()]
    share = max(done) if done else 0.0
    for i, (at, what, m, duration) in enumerate(self.plan):
      if i in self.fired or share < at:
        continue
      self.fired.add(i)
      if what in ("stop_learner", "throttle_learner"):
        self.pending.append((now + duration, what, m))
      self._save()  # Before the fault: a launcher that dies now never fires it twice.
      self._do(what, m, duration)
    for item in [x for x in self.pending if x[0] <= now]:
      self.pending.remove(item)
      self._undo(item[1], item[2])

  def _note(self, what: str, **fields) -> None:
    self.events.append({"t": round(time.time(), 6), "event": what, **fields})
    self._save()
    self.log(f"chaos: {what} {fields}")

  def _do(self, what: str, m, duration: float) -> None:
    run = self.run
    if what == "kill_learner":
      self.supervisor.kill(run.learners[m], restart_after_s=duration)
      self._note("sigkill", process=f"learner{m}")
    elif what == "kill_syncer":
      self.supervisor.kill(run.syncer, restart_after_s=duration)
      self._note("sigkill", process="syncer")
    elif what == "stop_learner":
      run.learners[m].signal(signal.SIGSTOP)
      self._note("sigstop", process=f"learner{m}")
    elif what == "throttle_learner":
      run.link(m, bytes_per_s=1e6, latency_s=0.2)
      self._note("throttle", process=f"learner{m}", bytes_per_s=1e6, latency_s=0.2)

  def _undo(self, what: str, m) -> None:
    if what == "stop_learner":
      self.run.learners[m].signal(signal.SIGCONT)
      self._note("sigcont", process=f"learner{m}")
    elif what == "throttle_learner":
      self.run.link(m, None)
      self._note("unthrottle", process=f"learner{m}")

  def finish(self) -> None:
    """Undoes what is still in force (a run may end inside a fault's window)."""
    pending, self.pending = self.pending, []
    for _, what, m in pending:
      self._undo(what, m)
    self._save()


# --- results -----------------------------------------------------------------------------


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
  """Per learner: [previous step, step] spans, broken by starts (a restart loses them)."""
  spans, last = [], {}
  for e in events:
    m = e.get("learner")
    if e["event"] == "start":
      last.pop(m, None)
    elif e["event"] == "step":
      if m in last:
        spans.append((last[m], e["t"]))
      last[m] = e["t"]
  return spans


def uptime(spans, windows) -> float:
  """Share of the `windows` (the launches' [start, end]) during which a learner was stepping."""
  covered, total = 0.0, sum(t1 - t0 for t0, t1 in windows)
  for t0, t1 in windows:
    end = t0
    for a, b in sorted(spans):
      a, b = max(a, end), min(b, t1)
      if b > a:
        covered += b - a
        end = b
  return min(covered / max(total, 1e-9), 1.0)


def collect_results(run: LocalRun, segments: list[dict], chaos_events: list) -> dict:
  """summary.json of the whole run over every launch (`segments`), and every process's
  events merged by time (WORKDIR/events.jsonl; the launcher's own as process `launcher`)."""
  events = []
  for name in ["syncer", *[f"learner{m}" for m in range(run.num_learners)]]:
    events += [{**e, "process": name}
               for e in metrics.read_jsonl(f"{run.workdir}/{name}/events.jsonl")]
  events += chaos_events
  events += [{**e, "process": "launcher", "of": e["process"]} for s in segments
             for e in s["events"]]
  events.sort(key=lambda e: e["t"])
  with open(f"{run.workdir}/events.jsonl", "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in events)
  syncer = metrics.read_summary(f"{run.workdir}/syncer") or {}
  learners = [metrics.read_summary(f"{run.workdir}/learner{m}") or {}
              for m in range(run.num_learners)]
  windows = [(s["start"], s["end"]) for s in segments]
  wall = sum(t1 - t0 for t0, t1 in windows)
  busy = sum(l.get("busy_s", 0.0) for l in learners)
  learner_events = [e for e in events if e.get("process", "").startswith("learner")]
  restarts = {p.name: sum(s["restarts"].get(p.name, 0) for s in segments) for p in run.processes}
  return {
      **{k: v for k, v in syncer.items() if k.startswith("final_eval_")},  # The task's metrics.
      "wall_seconds": wall,  # Over every launch (`segments`), not the gaps between them.
      # Useful learner time (steps whose state survived) over the learners' wall time;
      # at most 1 (see `progress`).
      "goodput": min(busy / max(run.num_learners * wall, 1e-9), 1.0),
      "uptime": uptime(busy_intervals(learner_events), windows),
      "segments": [{k: s[k] for k in ("start", "end", "ended")} for s in segments],
      "outer_steps": syncer.get("outer_steps"), "versions": syncer.get("versions"),
      "restarts": restarts,
      "chaos": chaos_events,
      "syncer": {k: v for k, v in syncer.items() if k != "config"},
      "learners": [{k: v for k, v in l.items() if k != "config"} for l in learners],
      "config": syncer.get("config"),
  }


def final_line(summary: dict, workdir: str) -> str:
  """The run's result: the syncer's final eval of the global model, goodput, restarts."""
  loss = summary.get("final_eval_loss")
  named = ", ".join(f"{k[len('final_eval_'):]} {v:.4g}" for k, v in summary.items()
                    if k.startswith("final_eval_") and k != "final_eval_loss")
  result = (f"final eval loss {loss:.4f} ({named})" if loss is not None
            else "no final eval loss (the syncer's summary has none)")
  launches = len(summary.get("segments", [])) or 1
  return (f"{result}, goodput {summary['goodput']:.1%}, uptime {summary['uptime']:.1%} over"
          f" {summary['wall_seconds']:.0f} s in {launches} launch{'es' * (launches > 1)};"
          f" {summary['outer_steps']} outer steps; restarts {summary['restarts']}.\n"
          f"results in {workdir} (summary.json, events.jsonl, logs/)")


# --- the launcher ------------------------------------------------------------------------


class Stopped(BaseException):
  """The launcher got SIGINT, SIGTERM or SIGHUP.

  A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way (the
  mailbox's retries wrap any error they meet as a StoreError) turns a stop into a failure.
  """

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _raise_stopped(signum, frame) -> None:
  del frame
  raise Stopped(signum)


def check_flags(f) -> None:
  """Every number the command line gives, in range; ValueError naming the flag."""
  common.check_range("timeout_s", f.timeout_s, 0, above=True)
  common.check_range("devices_per_learner", f.devices_per_learner, 1)
  common.check_range("chaos_seed", f.chaos_seed, 0)
  common.check_range("restart_backoff_s", f.restart_backoff_s, 0, high=MAX_BACKOFF_S)
  common.check_range("crash_deaths", f.crash_deaths, 1)
  common.check_range("crash_window_s", f.crash_window_s, 0, above=True)


def check_config(config_path: str, text: str) -> None:
  """ValueError naming each field where the workdir's saved config differs from `text`."""
  if not os.path.exists(config_path):
    return
  with open(config_path) as f:
    stored = f.read()
  if stored != text:
    from decoupled_diloco import config as config_lib  # pylint: disable=g-import-not-at-top
    why = config_lib.differences(stored, text, most=1000)
    raise ValueError(f"--workdir={os.path.dirname(config_path)} holds a run of another config:"
                     f" its {config_path} {why}. Use another --workdir (or this run's config"
                     " to resume it).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  workdir = os.path.abspath(f.workdir)
  config_path = os.path.join(workdir, "config.json")
  text = f.config.to_json(sort_keys=True)
  try:
    check_flags(f)
    check_config(config_path, text)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if (summary := metrics.read_summary(workdir)) is not None:
    print(f"this run is finished; nothing to do.\n{final_line(summary, workdir)}", flush=True)
    return 0
  os.makedirs(workdir, exist_ok=True)
  try:
    lock = workdir_lib.Lock(workdir)
  except workdir_lib.WorkdirBusyError as e:
    sys.exit(f"error: {e}")
  with lock:
    if not os.path.exists(config_path):
      workdir_lib.write_atomically(config_path, text)
    return run_once(f, workdir, config_path)


def _mailbox_url(workdir: str, given: str | None) -> str:
  """The run's mailbox: `given` at its first launch (default file://WORKDIR/mailbox), the
  same at every later one (recorded in WORKDIR/mailbox_url)."""
  from decoupled_diloco.runtime.dist import mailbox  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "mailbox_url")
  recorded = open(path).read().strip() if os.path.exists(path) else None
  url = given or recorded or f"file://{workdir}/mailbox"
  if recorded is not None and url != recorded:
    sys.exit(f"error: --mailbox={url}: this run's mailbox is {recorded} ({path}); use it,"
             " or another --workdir for another run.")
  try:
    mailbox.kvstore_spec(url)
  except ValueError as e:
    sys.exit(f"error: --mailbox: {e}")
  if recorded is None:
    workdir_lib.write_atomically(path, url)
  return url


def run_once(f, workdir: str, config_path: str) -> int:
  """One launch of the run in `workdir` until it finishes, is stopped, or fails; its exit code."""
  from decoupled_diloco import config as config_lib, tasks  # pylint: disable=g-import-not-at-top
  cfg = config_lib.parse(f.config)
  say = lambda line: print(f"[run] {line}", flush=True)
  stop_leftovers(workdir, say)
  run = LocalRun(workdir, config_path, cfg.diloco.num_learners,
                 devices_per_learner=f.devices_per_learner,
                 mailbox_url=_mailbox_url(workdir, f.mailbox))
  task = tasks.build(cfg)
  per_learner = task.num_units(task.batch_spec(cfg.data.batch_size // cfg.diloco.num_learners))
  supervisor = supervise.Supervisor(lambda: run.processes, backoff_s=f.restart_backoff_s,
                                    max_backoff_s=MAX_BACKOFF_S, max_deaths=f.crash_deaths,
                                    window_s=f.crash_window_s, log=say)
  chaos = (Chaos(run, supervisor, cfg.train.steps, f.chaos_seed, say,
                 os.path.join(workdir, "chaos.json")) if f.chaos else None)
  segments = Segments(os.path.join(workdir, "segments.json"))
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, _raise_stopped)
  resumed = f" (launch {len(segments.all)} of this run)" if len(segments.all) > 1 else ""
  print(f"starting a syncer and {run.num_learners} learners{resumed}; logs in {workdir}/logs,"
        f" mailbox {run.mailbox_url}", flush=True)
  ended, code, last_line = "failed", 1, 0.0
  try:
    run.start()
    box = run.mailbox()
    while True:
      now = time.time()
      if now - segments.current["start"] > f.timeout_s:
        ended, code = "timed out", 124
        print(f"error: the run took over --timeout_s={f.timeout_s:.0f} s; stopping every"
              " process.", file=sys.stderr, flush=True)
        break
      line, info = progress(box, cfg.diloco.num_fragments, run.num_learners, per_learner,
                            segments.elapsed(now), task.unit)
      supervisor.tick()
      if chaos:
        chaos.tick(info)
      segments.beat(supervisor)
      if now - last_line > 5:
        say(line)
        last_line = now
      if (all(p.poll() == 0 for p in run.processes) and not supervisor.busy()
          and not (chaos and chaos.pending)):
        ended, code = "finished", 0
        break
      time.sleep(0.5)
  except Stopped as e:
    ended, code = f"stopped ({e})", 128 + e.signum
    print(f"stopping every process ({e})", file=sys.stderr, flush=True)
  except supervise.CrashLoop as e:
    ended, code = "crash loop", 1
    print(f"error: {e}", file=sys.stderr, flush=True)
  finally:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
      signal.signal(sig, signal.SIG_IGN)  # Stopping is bounded; let it finish.
    run.stop()
    if chaos:
      chaos.finish()
    segments.beat(supervisor, ended)
  if code:
    return code
  summary = collect_results(run, segments.all, chaos.events if chaos else [])
  workdir_lib.write_atomically(os.path.join(workdir, "summary.json"),
                               json.dumps(summary, indent=1))
  print(final_line(summary, workdir), flush=True)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
