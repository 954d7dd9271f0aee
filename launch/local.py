"""Decoupled DiLoCo as real processes on this machine: a syncer and M learners.

  python -m launch.local --config=experiments/decoupled_diloco.py:nochaos \
      --workdir=/tmp/dd [--chaos] [--config.section.field=value ...]

Every process is `python -m decoupled_diloco.main --role=...` with its own
workdir (`WORKDIR/syncer`, `WORKDIR/learner{m}`) and one `file://` mailbox
(`WORKDIR/mailbox`); the run secret is generated into `WORKDIR/secret` (mode
600) and passed through the environment. Logs stream with a prefix per
process; one progress line shows the whole run (global versions, steps and
tokens/s per learner, goodput so far). Ctrl-C stops every process.

`--chaos` injects real faults on a seeded schedule, triggered by the
learners' progress: SIGKILL a learner and restart it, SIGKILL the syncer and
restart it, SIGSTOP a learner for a while (a straggler), and throttle a
learner's link (its mailbox emulates the bandwidth and latency). At the end,
`WORKDIR/summary.json` has the syncer's final eval loss, real wall-clock
goodput and uptime, and each process's summary; `WORKDIR/events.jsonl` merges
every process's events. Re-running with the same workdir resumes the run.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from decoupled_diloco import metrics



def _define_flags() -> None:
  """The command line's flags, defined only when this module is the program.

  Tests import `LocalRun`, next to other launchers that define flags of the
  same names.
  """
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (processes, mailbox, results).")
  flags.DEFINE_bool("chaos", False, "Kill, stop and throttle processes on a seeded schedule.")
  flags.DEFINE_integer("chaos_seed", 0, "Seeds which learners the faults hit.")
  flags.DEFINE_integer("devices_per_learner", 1, "CPU devices per learner process (its"
                       " island).")
  flags.DEFINE_float("timeout_s", 3600.0, "Stop everything after this long.")
  flags.mark_flags_as_required(["config", "workdir"])

SECRET_ENV = "DILOCO_SECRET"


class Process:
  """One child process, its log file, and its output streamed with a prefix."""

  def __init__(self, name: str, args: list[str], env: dict, log_path: str, echo: bool):
    self.name, self.args, self.env, self.log_path, self.echo = name, args, env, log_path, echo
    self.popen: subprocess.Popen | None = None
    self.starts = 0

  def start(self) -> None:
    self.popen = subprocess.Popen(self.args, env=self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1,
                                  start_new_session=True)  # Ctrl-C reaches us, not them.
    self.starts += 1
    threading.Thread(target=self._pump, args=(self.popen,), daemon=True).start()

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

  def running(self) -> bool:
    return self.popen is not None and self.popen.poll() is None

  def signal(self, sig: int) -> None:
    if self.running():
      os.kill(self.popen.pid, sig)

  def wait(self, timeout: float | None = None) -> int | None:
    try:
      return self.popen.wait(timeout)
    except subprocess.TimeoutExpired:
      return None

  def stop(self, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s` (by pid; a stopped process is continued)."""
    if not self.running():
      return
    self.signal(signal.SIGCONT)
    self.signal(signal.SIGTERM)
    if self.wait(grace_s) is None:
      self.signal(signal.SIGKILL)
      self.wait(grace_s)


class LocalRun:
  """The syncer and M learners of one run, started from `config_path` (a saved config)."""

  def __init__(self, workdir: str, config_path: str, num_learners: int, *,
               devices_per_learner: int = 1, echo: bool = True, extra_flags=()):
    self.workdir = os.path.abspath(workdir)
    self.num_learners = num_learners
    os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)
    self.mailbox_url = f"file://{self.workdir}/mailbox"
    self.secret = _secret(os.path.join(self.workdir, "secret"))
    base = {**os.environ, SECRET_ENV: self.secret, "PYTHONUNBUFFERED": "1",
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    base = {k: v for k, v in base.items() if not k.startswith("MEGASCALE_")}
    saved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "experiments", "saved.py")
    common = [sys.executable, "-m", "decoupled_diloco.main", f"--config={saved}:{config_path}", f"--mailbox={self.mailbox_url}",
              "--compilation_cache=" + os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                      f"{self.workdir}/jax_cache"),
              *extra_flags]
    self.syncer = Process("syncer", [*common, "--role=syncer",
                                     f"--workdir={self.workdir}/syncer"],
                          {**base, "JAX_NUM_CPU_DEVICES": "1"},
                          f"{self.workdir}/logs/syncer.log", echo)
    self.learners = [
        Process(f"learner {m}", [*common, "--role=learner", f"--learner={m}",
                                 f"--workdir={self.workdir}/learner{m}"],
                {**base, "JAX_NUM_CPU_DEVICES": str(devices_per_learner)},
                f"{self.workdir}/logs/learner{m}.log", echo)
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

  def stop(self) -> None:
    for p in self.processes:
      p.stop()

  def link(self, m: int, bytes_per_s: float | None, latency_s: float = 0.0) -> None:
    """Throttles learner m's link (None: back to unthrottled)."""
    path = os.path.join(self.workdir, f"learner{m}", "link.json")
    if bytes_per_s is None:
      if os.path.exists(path):
        os.remove(path)
      return
    with open(path + ".tmp", "w") as f:
      json.dump({"bytes_per_s": bytes_per_s, "latency_s": latency_s}, f)
    os.replace(path + ".tmp", path)

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


# --- progress and chaos ---------------------------------------------------------------------


def progress(box, num_fragments: int, num_learners: int, units_per_step: int,
             started: float, unit: str = "tokens") -> tuple[str, dict]:
  """One line for the whole run, and the learners' lease info it was made from."""
  versions = box.latest_versions(num_fragments)
  leases = box.leases("learner/")
  now, info, parts = time.time(), {}, []
  for m in range(num_learners):
    lease = leases.get(f"learner/{m}")
    if lease is None:
      parts.append(f"L{m} -")
      continue
    info[m] = lease.info
    up = lease.expires_at > now
    step_s = lease.info.get("step_seconds") or 0.0
    rate = units_per_step / step_s if step_s else 0.0
    state = lease.info.get("status", "?") if up else "down"
    parts.append(f"L{m} step {lease.info.get('step', 0)} {rate:,.0f} {unit}/s {state}")
  busy = sum(i.get("busy_s", 0.0) for i in info.values())
  goodput = busy / max(num_learners * (now - started), 1e-9)
  shown = versions if len(versions) <= 8 else f"{min(v or 0 for v in versions)}..{max(v or 0 for v in versions)}"
  return f"versions {shown} | {' | '.join(parts)} | goodput {goodput:.0%}", info


class Chaos:
  """Seeded real faults, each fired once when the learners reach a share of the run.

  (share of train.steps, what, learner, duration in seconds); learners are
  drawn with `seed`. Restarts happen after the duration.
  """

  def __init__(self, run: LocalRun, steps: int, seed: int, log):
    rng = np.random.default_rng(seed)
    m = run.num_learners
    a, b = rng.choice(m, size=2, replace=m < 2)
    self.plan = [(0.25, "kill_learner", int(a), 8.0), (0.45, "kill_syncer", None, 3.0),
                 (0.6, "stop_learner", int(b), 6.0), (0.75, "throttle_learner", int(a), 6.0)]
    self.run, self.steps, self.log = run, steps, log
    self.pending: list[tuple[float, str, int | None]] = []  # (when, action, learner)
    self.fired = set()
    self.events = []

  def tick(self, info: dict) -> None:
    now = time.time()
    done = [i.get("step", 0) / self.steps for i in info.values()]
    share = max(done) if done else 0.0
    for i, (at, what, m, duration) in enumerate(self.plan):
      if i in self.fired or share < at:
        continue
      self.fired.add(i)
      self._do(what, m)
      self.pending.append((now + duration, what, m))
    for item in [x for x in self.pending if x[0] <= now]:
      self.pending.remove(item)
      self._undo(item[1], item[2])

  def _note(self, what: str, **fields) -> None:
    self.events.append({"t": round(time.time(), 6), "event": what, **fields})
    self.log("chaos: %s %s", what, fields)

  def _do(self, what: str, m) -> None:
    run = self.run
    if what == "kill_learner":
      run.learners[m].signal(signal.SIGKILL)
      self._note("sigkill", process=f"learner{m}")
    elif what == "kill_syncer":
      run.syncer.signal(signal.SIGKILL)
      self._note("sigkill", process="syncer")
    elif what == "stop_learner":
      run.learners[m].signal(signal.SIGSTOP)
      self._note("sigstop", process=f"learner{m}")
    elif what == "throttle_learner":
      run.link(m, bytes_per_s=1e6, latency_s=0.2)
      self._note("throttle", process=f"learner{m}", bytes_per_s=1e6, latency_s=0.2)

  def _undo(self, what: str, m) -> None:
    run = self.run
    if what == "kill_learner":
      run.learners[m].wait(10)
      run.learners[m].start()
      self._note("restart", process=f"learner{m}")
    elif what == "kill_syncer":
      run.syncer.wait(10)
      run.syncer.start()
      self._note("restart", process="syncer")
    elif what == "stop_learner":
      run.learners[m].signal(signal.SIGCONT)
      self._note("sigcont", process=f"learner{m}")
    elif what == "throttle_learner":
      run.link(m, None)
      self._note("unthrottle", process=f"learner{m}")

  def finish(self) -> None:
    """Undoes what is still pending (a run may end inside a fault's window)."""
    for _, what, m in self.pending:
      if what in ("stop_learner", "throttle_learner"):
        self._undo(what, m)
    self.pending = [x for x in self.pending if x[1] not in ("stop_learner", "throttle_learner")]


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


def uptime(spans, t0: float, t1: float) -> float:
  """Share of [t0, t1] during which at least one learner was stepping."""
  covered, end = 0.0, t0
  for a, b in sorted(spans):
    a, b = max(a, end), min(b, t1)
    if b > a:
      covered += b - a
      end = b
  return covered / max(t1 - t0, 1e-9)


def collect_results(run: LocalRun, started: float, ended: float, chaos_events: list) -> dict:
  """summary.json of the whole run, and every process's events merged by time."""
  events = []
  for name in ["syncer", *[f"learner{m}" for m in range(run.num_learners)]]:
    events += [{**e, "process": name} for e in metrics.read_jsonl(f"{run.workdir}/{name}/events.jsonl")]
  events += chaos_events
  events.sort(key=lambda e: e["t"])
  with open(f"{run.workdir}/events.jsonl", "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in events)
  read = lambda name: json.load(open(p)) if os.path.exists(p := f"{run.workdir}/{name}/summary.json") else {}
  syncer = read("syncer")
  learners = [read(f"learner{m}") for m in range(run.num_learners)]
  wall = ended - started
  busy = sum(l.get("busy_s", 0.0) for l in learners)
  learner_events = [e for e in events if e.get("process", "").startswith("learner")]
  return {
      **{k: v for k, v in syncer.items() if k.startswith("final_eval_")},  # The task's metrics.
      "wall_seconds": wall,
      # Useful learner time (steps whose state survived) over the learners' wall time.
      "goodput": busy / max(run.num_learners * wall, 1e-9),
      "uptime": uptime(busy_intervals(learner_events), started, ended),
      "outer_steps": syncer.get("outer_steps"), "versions": syncer.get("versions"),
      "restarts": {p.name: p.starts - 1 for p in run.processes},
      "chaos": chaos_events,
      "syncer": {k: v for k, v in syncer.items() if k != "config"},
      "learners": [{k: v for k, v in l.items() if k != "config"} for l in learners],
      "config": syncer.get("config"),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from decoupled_diloco import config as config_lib, tasks  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  config = flags.FLAGS.config
  cfg = config_lib.parse(config)
  workdir = os.path.abspath(flags.FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, "config.json")
  text = config.to_json(sort_keys=True)
  if os.path.exists(config_path) and open(config_path).read() != text:
    sys.exit(f"error: {workdir} holds a run of another config ({config_path}); use another"
             " --workdir.")
  with open(config_path, "w") as f:
    f.write(text)
  run = LocalRun(workdir, config_path, cfg.diloco.num_learners,
                 devices_per_learner=flags.FLAGS.devices_per_learner)
  task = tasks.build(cfg)
  per_learner = task.num_units(task.batch_spec(cfg.data.batch_size // cfg.diloco.num_learners))
  chaos = (Chaos(run, cfg.train.steps, flags.FLAGS.chaos_seed, logging.info)
           if flags.FLAGS.chaos else None)
  started = time.time()
  print(f"starting a syncer and {run.num_learners} learners; logs in {workdir}/logs,"
        f" mailbox {run.mailbox_url}", flush=True)
  run.start()
  box, last_line = run.mailbox(), 0.0
  try:
    while True:
      if time.time() - started > flags.FLAGS.timeout_s:
        raise TimeoutError(f"the run took over --timeout_s={flags.FLAGS.timeout_s:.0f} s")
      line, info = progress(box, cfg.diloco.num_fragments, run.num_learners,
                            per_learner, started, task.unit)
      if chaos:
        chaos.tick(info)
      if time.time() - last_line > 5:
        print(f"[run] {line}", flush=True)
        last_line = time.time()
      restarting = {what for _, what, _ in chaos.pending} if chaos else set()
      failed = [p for p in run.processes if p.popen.poll() not in (None, 0)
                and not (p is run.syncer and "kill_syncer" in restarting)
                and not (p in run.learners and "kill_learner" in restarting)]
      if failed:
        raise RuntimeError(f"{failed[0].name} exited with code {failed[0].popen.poll()};"
                           f" see {failed[0].log_path}")
      if all(p.popen.poll() == 0 for p in run.processes) and not (chaos and chaos.pending):
        break
      time.sleep(0.5)
  except KeyboardInterrupt:
    print("stopping every process (Ctrl-C)", flush=True)
    run.stop()
    sys.exit(130)
  except Exception:
    run.stop()
    raise
  if chaos:
    chaos.finish()
  summary = collect_results(run, started, time.time(), chaos.events if chaos else [])
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  metrics = ", ".join(f"{k[len('final_eval_'):]} {v:.4g}" for k, v in summary.items()
                      if k.startswith("final_eval_") and k != "final_eval_loss")
  print(f"final eval loss {summary['final_eval_loss']:.4f} ({metrics}), goodput"
        f" {summary['goodput']:.1%}, uptime {summary['uptime']:.1%} over"
        f" {summary['wall_seconds']:.0f} s; {summary['outer_steps']} outer steps;"
        f" restarts {summary['restarts']}.\nresults in {workdir} (summary.json, events.jsonl,"
        " logs/)", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
