"""`launch.local` supervises its processes, stops with them, and a run's state survives it.

The fast tests drive `launch/supervise.py` with `sh` children and check the
launcher's results arithmetic by hand. The slow ones run `python -m
launch.local` on a tiny config as a user would: kill -9 of a learner and of
the syncer are survived by restarts; SIGTERM and kill -9 of the launcher take
every child with it, and the run resumes; a finished run is left as it is.
Every process a test starts has a timeout and is killed by its pid at the
end, pass or fail.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from decoupled_diloco.runtime.dist import mailbox as mailbox_lib
from launch import common, local, supervise
from tests import helpers

SECRET = b"supervision-tests"


def _gone(pid: int) -> bool:
  """Whether `pid` has exited (a zombie waiting for its parent counts as gone)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except OSError:
    return True


def _wait_for(condition, timeout_s: float, what: str):
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if (got := condition()):
      return got
    time.sleep(0.05)
  pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


# --- The supervisor, with sh children -------------------------------------------------------


def test_a_dying_process_is_restarted_with_back_off_until_a_crash_loop(tmp_path):
  p = supervise.Process("p", ["sh", "-c", "echo try; exit 3"], dict(os.environ),
                        str(tmp_path / "p.log"), echo=False)
  lines = []
  sup = supervise.Supervisor(lambda: [p], backoff_s=0.05, max_deaths=3, window_s=60,
                             log=lines.append)
  p.start()
  with pytest.raises(supervise.CrashLoop) as crash:
    _wait_for(lambda: sup.tick(), 10, "a crash loop")
  assert p.starts == 3 and sup.restarts == {"p": 2}
  assert [e["restart_in_s"] for e in sup.events if e["event"] == "died"] == [0.05, 0.1]
  assert lines[:2] == ["p: exit code 3; restarting it in 0.05 s", "p: restarted (pid"
                      f" {sup.events[1]['pid']})"]
  message = str(crash.value)
  assert message.startswith("p died 3 times within 60 s (last: exit code 3); stopping the run.")
  assert message.endswith(f"The end of its log {p.log_path}:\ntry\ntry\ntry")


def test_a_killed_process_restarts_and_a_planned_kill_is_not_a_crash(tmp_path):
  p = supervise.Process("p", ["sleep", "60"], dict(os.environ), str(tmp_path / "p.log"),
                        echo=False)
  sup = supervise.Supervisor(lambda: [p], backoff_s=0.01, max_deaths=2, window_s=60,
                             log=lambda line: None)
  try:
    p.start()
    # Two planned kills, then one death of its own: one crash, not a loop.
    for kill in (lambda pid: sup.kill(p, restart_after_s=0.01),) * 2 + (
        lambda pid: os.kill(pid, signal.SIGKILL),):
      first = p.pid
      kill(first)
      _wait_for(lambda: (sup.tick(), p.pid != first and p.running())[1], 10, "a restart")
      assert _gone(first)
    assert sup.restarts == {"p": 3} and not sup.busy()
    died = [e for e in sup.events if e["event"] == "died"]
    assert [e["code"] for e in died] == [-9, -9, -9] and len(sup.deaths["p"]) == 1
    done = supervise.Process("q", ["true"], dict(os.environ), str(tmp_path / "q.log"), False)
    done.start()
    done.wait(10)
    sup.processes = lambda: [done]
    sup.tick()
    assert not sup.busy() and done.starts == 1  # An exit 0 is finished, not dead.
  finally:
    p.stop(grace_s=1)


def test_children_die_with_their_launcher_even_by_kill_9(tmp_path):
  """A launcher (a python process starting a `sleep` child) killed by SIGKILL."""
  log = str(tmp_path / "c.log")
  code = ("import os, sys, time\n"
          "from launch import supervise\n"
          f"p = supervise.Process('c', ['sleep', '60'], dict(os.environ), {log!r}, False)\n"
          "p.start()\n"
          "print(p.pid, flush=True)\n"
          "time.sleep(60)\n")
  launcher = subprocess.Popen([sys.executable, "-c", code], cwd=common.REPO,
                              stdout=subprocess.PIPE, text=True)
  child = None
  try:
    child = int(launcher.stdout.readline())
    assert not _gone(child)
    launcher.kill()
    launcher.wait(10)
    _wait_for(lambda: _gone(child), 10, "the child to die with its launcher")
  finally:
    launcher.kill()
    launcher.wait(10)
    if child is not None and not _gone(child):
      os.kill(child, signal.SIGKILL)


def _state(pid: int) -> str:
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0]


def test_chaos_faults_go_through_the_supervisor_and_fire_once_per_run(tmp_path):
  """The plan in chaos.json, with short durations; the processes are `sleep`s."""
  run = local.LocalRun(str(tmp_path / "run"), "unused.json", 2, echo=False)
  for p in run.processes:
    p.args = ["sleep", "60"]
  for m in (0, 1):
    os.makedirs(tmp_path / "run" / f"learner{m}")
  # Any death but a planned one is a crash loop here.
  sup = supervise.Supervisor(lambda: run.processes, backoff_s=0.01, max_deaths=1, window_s=60,
                             log=lambda line: None)
  path = tmp_path / "run" / "chaos.json"
  plan = [[0.25, "kill_learner", 1, 0.05], [0.45, "kill_syncer", None, 0.05],
          [0.6, "stop_learner", 0, 0.05], [0.75, "throttle_learner", 1, 60.0]]
  path.write_text(json.dumps({"seed": 3, "plan": plan, "fired": [], "pending": [],
                              "events": []}))
  lines = []
  chaos = local.Chaos(run, sup, steps=100, seed=0, log=lines.append, path=str(path))
  assert lines == ["chaos: this run's plan was drawn with --chaos_seed=3; it keeps it"]
  link = tmp_path / "run" / "learner1" / "link.json"
  try:
    for p in run.processes:
      p.start()
    for step, p in ((30, run.learners[1]), (50, run.syncer)):
      first = p.pid
      chaos.tick({0: {"step": step}})
      _wait_for(lambda: (sup.tick(), p.pid != first and p.running())[1], 10, "a restart")
    assert sup.restarts == {"learner 1": 1, "syncer": 1}
    chaos.tick({0: {"step": 60}, 1: {"step": 10}})
    # Stopped (once the kernel has delivered the signal), then continued after 0.05 s: the
    # SIGCONT comes from a later tick.
    _wait_for(lambda: _state(run.learners[0].pid) == "T", 10, "SIGSTOP")
    _wait_for(lambda: (chaos.tick({}), _state(run.learners[0].pid) != "T")[1], 10, "SIGCONT")
    chaos.tick({0: {"step": 80}})
    assert json.loads(link.read_text()) == {"bytes_per_s": 1e6, "latency_s": 0.2}
    assert [e["event"] for e in chaos.events] == ["sigkill", "sigkill", "sigstop", "sigcont",
                                                 "throttle"]
    # The launcher dies inside the throttle's window; the next one undoes it and fires
    # nothing again.
    again = local.Chaos(run, sup, steps=100, seed=3, log=lines.append, path=str(path))
    assert not link.exists() and again.events[-1]["event"] == "unthrottle"
    again.tick({0: {"step": 100}})
    assert len(again.events) == 6 and not again.pending
    assert json.loads(path.read_text())["fired"] == [0, 1, 2, 3]
  finally:
    run.stop(grace_s=1)


def test_a_new_launch_kills_children_an_earlier_one_left(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  sleep = [sys.executable, "-c", "import time; time.sleep(60)", "decoupled_diloco.main"]
  ours = subprocess.Popen([*sleep, f"--workdir={workdir}/learner0"])
  other = subprocess.Popen([*sleep, f"--workdir={workdir}2/learner0"])  # Another run's.
  try:
    with open(os.path.join(workdir, "pids.json"), "w") as f:
      json.dump({"launcher": 1, "learner 0": ours.pid, "learner 1": other.pid}, f)
    lines = []
    local.stop_leftovers(workdir, lines.append)
    assert ours.wait(10) == -signal.SIGKILL and other.poll() is None
    assert lines == [f"killed learner 0 (pid {ours.pid}), left running by an earlier launcher"]
  finally:
    for p in (ours, other):
      p.kill()
      p.wait(10)


# --- Progress and results over several launches ---------------------------------------------


def test_progress_shows_finished_learners_as_done_and_goodput_over_every_launch(tmp_path):
  url = f"memory://progress-{os.getpid()}"
  past = mailbox_lib.Mailbox(url, SECRET, clock=lambda: time.time() - 100)
  for m, status in ((0, "done"), (1, "running")):  # Both leases expired 40 s ago.
    past.acquire(f"learner/{m}", f"host:{m}", 60.0,
                 {"step": 12, "step_seconds": 0.5, "busy_s": 30.0, "status": status})
  box = mailbox_lib.Mailbox(url, SECRET)
  line, _ = local.progress(box, 1, 2, units_per_step=100, elapsed_s=40.0)
  assert line == ("versions [None] | L0 step 12 200 tokens/s done | L1 step 12 200 tokens/s down"
                  " | goodput 75%")
  # A resumed run's busy time spans its launches: over this launch's 10 s alone it would
  # read 300%.
  path = tmp_path / "segments.json"
  path.write_text(json.dumps([{"start": 1000.0, "end": 1030.0, "ended": "stopped (SIGTERM)",
                               "restarts": {}, "events": []}]))
  segments = local.Segments(str(path))
  now = segments.current["start"] + 10.0
  assert segments.elapsed(now) == pytest.approx(40.0)
  assert local.progress(box, 1, 2, 100, segments.elapsed(now))[0].endswith("goodput 75%")
  assert local.progress(box, 1, 2, 100, 20.0)[0].endswith("goodput 100%")  # Never above.


def test_a_stop_signal_inside_a_mailbox_call_stops_the_launcher_rather_than_failing_it():
  # SIGTERM lands in whatever the launcher is doing, most often polling the mailbox, whose
  # retries wrap the errors they meet: the stop must pass through them as a stop.
  box = mailbox_lib.Mailbox(f"memory://stop-{os.getpid()}", SECRET)
  def interrupted():
    local._raise_stopped(signal.SIGTERM, None)  # pylint: disable=protected-access
  with pytest.raises(local.Stopped, match="SIGTERM"):
    box._op("list down/", interrupted)  # pylint: disable=protected-access


def test_uptime_counts_the_launches_only():
  # Launches [0, 10] and [20, 30]; a learner stepped over [5, 25]: 5 s in each, of 20.
  assert local.uptime([(5.0, 25.0)], [(0.0, 10.0), (20.0, 30.0)]) == 0.5
  assert local.uptime([(0.0, 4.0), (2.0, 6.0), (21.0, 40.0)], [(0.0, 10.0), (20.0, 30.0)]) == 0.75
  assert local.uptime([(0.0, 10.0)], [(0.0, 10.0)]) == 1.0


# --- The launcher's command line ------------------------------------------------------------


def _config(tmp_path, steps: int, **overrides):
  """A tiny decoupled run of one learner, as a saved config file for `experiments/saved.py`."""
  config = helpers.tiny_config("decoupled", steps=steps, **{
      "diloco.num_learners": 1, "diloco.num_fragments": 1, "diloco.sync_every": 5,
      "train.checkpoint_every": 10, "dist.lease_s": 3.0, **overrides})
  path = tmp_path / f"config{steps}.json"
  path.write_text(config.to_json(sort_keys=True))
  return f"--config=experiments/saved.py:{path}"


def _local(*args, timeout: float = 60) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "launch.local", *args], cwd=common.REPO,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("flag, message", [
    ("--timeout_s=0", "--timeout_s=0.0: must be above 0."),
    ("--devices_per_learner=0", "--devices_per_learner=0: must be at least 1."),
    ("--crash_deaths=0", "--crash_deaths=0: must be at least 1."),
    ("--restart_backoff_s=-1", "--restart_backoff_s=-1.0: must be at least 0 and at most 30.0."),
])
def test_launcher_number_mistakes_get_one_line(tmp_path, flag, message):
  got = _local(_config(tmp_path, 4), f"--workdir={tmp_path / 'run'}", flag)
  assert got.returncode == 1 and got.stderr == f"error: {message}\n"
  assert not (tmp_path / "run").exists()


def test_a_workdir_of_another_config_is_refused_naming_each_difference(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  saved = helpers.tiny_config("decoupled", steps=4, **{"diloco.num_learners": 1,
                                                       "diloco.num_fragments": 1,
                                                       "diloco.sync_every": 5,
                                                       "train.checkpoint_every": 10,
                                                       "dist.lease_s": 3.0})
  (workdir / "config.json").write_text(saved.to_json(sort_keys=True))
  got = _local(_config(tmp_path, 6, **{"model.d_model": 32}), f"--workdir={workdir}")
  assert got.returncode == 1
  assert got.stderr == (f"error: --workdir={workdir} holds a run of another config: its"
                        f" {workdir}/config.json differs in model.d_model: 64 there, 32 here;"
                        " train.steps: 4 there, 6 here. Use another --workdir (or this run's"
                        " config to resume it).\n")
  assert os.listdir(workdir) == ["config.json"]


# --- Real runs ------------------------------------------------------------------------------


class Launcher:
  """`python -m launch.local` in the background, its output in a file."""

  def __init__(self, tmp_path, config_flag: str, workdir, name: str, timeout_s: float = 300):
    self.workdir, self.out = str(workdir), tmp_path / f"{name}.txt"
    with open(self.out, "w") as out:
      self.popen = subprocess.Popen(
          [sys.executable, "-m", "launch.local", config_flag, f"--workdir={workdir}",
           f"--timeout_s={timeout_s}", "--restart_backoff_s=0.5"],
          cwd=common.REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    self.children: set[int] = set()

  def output(self) -> str:
    return self.out.read_text()

  def child_pids(self) -> set[int]:
    """The children pids.json has named, from this launcher (they add up)."""
    try:
      with open(os.path.join(self.workdir, "pids.json")) as f:
        pids = json.load(f)
    except (OSError, ValueError):
      return self.children
    if pids.get("launcher") == self.popen.pid:
      self.children |= {pid for name, pid in pids.items() if name != "launcher"}
    return self.children

  def pid_of(self, name: str) -> int | None:
    try:
      with open(os.path.join(self.workdir, "pids.json")) as f:
        pids = json.load(f)
    except (OSError, ValueError):
      return None
    return pids.get(name) if pids.get("launcher") == self.popen.pid else None

  def step(self) -> int:
    """Learner 0's step, from its lease in the mailbox (0 before it has one)."""
    if not os.path.exists(os.path.join(self.workdir, "secret")):
      return 0
    with open(os.path.join(self.workdir, "secret")) as f:
      secret = f.read().strip()
    box = mailbox_lib.Mailbox(f"file://{self.workdir}/mailbox", secret.encode())
    lease = box.read_lease("learner/0")
    return lease.info.get("step", 0) if lease else 0

  def wait_for(self, condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
      self.child_pids()
      if (got := condition()):
        return got
      if self.popen.poll() is not None:
        pytest.fail(f"the launcher exited ({self.popen.returncode}) while waiting for {what}:\n"
                    + self.output()[-4000:])
      time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}:\n" + self.output()[-4000:])

  def finish(self, timeout_s: float = 300) -> int:
    try:
      return self.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the launcher ran over {timeout_s} s:\n" + self.output()[-4000:])

  def kill(self) -> None:
    """By pid: the launcher, then any child of it still running."""
    self.child_pids()
    if self.popen.poll() is None:
      self.popen.kill()
    self.popen.wait(30)
    for pid in self.children:
      if not _gone(pid):
        os.kill(pid, signal.SIGKILL)


def _hashes(root) -> dict:
  out = {}
  for d, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(d, name), "rb") as f:
        out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.mark.slow
def test_kill_9_of_a_learner_and_of_the_syncer_are_survived(tmp_path):
  """No --chaos: the supervisor alone brings both back, and the run finishes.

  Then a second launch of the finished run changes no file.
  """
  workdir = tmp_path / "run"
  config = _config(tmp_path, 120, **{"dist.min_step_s": 0.05})
  run = Launcher(tmp_path, config, workdir, "launch")
  try:
    run.wait_for(lambda: run.step() >= 15, 240, "learner 0 to reach step 15")
    learner = run.pid_of("learner 0")
    os.kill(learner, signal.SIGKILL)
    run.wait_for(lambda: run.pid_of("learner 0") not in (None, learner), 60,
                 "learner 0's restart")
    at = run.step()
    run.wait_for(lambda: run.step() > at, 120, "learner 0 to step again")
    syncer = run.pid_of("syncer")
    os.kill(syncer, signal.SIGKILL)
    run.wait_for(lambda: run.pid_of("syncer") not in (None, syncer), 60, "the syncer's restart")
    assert run.finish() == 0, run.output()[-4000:]
  finally:
    run.kill()
  out = run.output()
  assert "[run] learner 0: killed by SIGKILL; restarting it in 0.5 s" in out
  assert "[run] syncer: killed by SIGKILL; restarting it in 0.5 s" in out
  # One final eval loss for the run: the syncer's, printed once by the launcher.
  finals = [line for line in out.splitlines() if line.startswith("final eval loss")]
  assert len(finals) == 1 and "restarts {'syncer': 1, 'learner 0': 1}" in finals[0]
  assert "learner's own final eval loss" in out
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["restarts"] == {"syncer": 1, "learner 0": 1}
  assert [s["ended"] for s in summary["segments"]] == ["finished"]
  assert summary["learners"][0]["steps"] == 120
  assert 0 < summary["goodput"] <= 1 and 0 < summary["uptime"] <= 1

  before = _hashes(workdir)
  again = _local(config, f"--workdir={workdir}")
  assert again.returncode == 0, again.stderr
  assert again.stdout.startswith("this run is finished; nothing to do.\nfinal eval loss")
  assert f"results in {workdir}" in again.stdout
  assert _hashes(workdir) == before


@pytest.mark.slow
def test_a_crash_loop_stops_the_run_with_the_end_of_the_log(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "learner0").write_text("a file where learner 0's workdir should be")
  got = _local(_config(tmp_path, 20), f"--workdir={workdir}", "--crash_deaths=2",
               "--restart_backoff_s=0.1", timeout=240)
  assert got.returncode == 1, got.stdout[-3000:] + got.stderr[-3000:]
  assert "[run] learner 0: exit code 1; restarting it in 0.1 s" in got.stdout
  error = got.stderr[got.stderr.index("error: "):]
  assert error.startswith("error: learner 0 died 2 times within 300 s (last: exit code 1);"
                          " stopping the run. The end of its log")
  tail = error.split("\n")[1:]
  assert 1 < len(tail) <= 21 and "not writable" in "".join(tail)
  segments = json.loads((workdir / "segments.json").read_text())
  assert [s["ended"] for s in segments] == ["crash loop"]
  assert not (workdir / "summary.json").exists()


@pytest.mark.slow
def test_sigterm_and_kill_9_of_the_launcher_stop_every_child_and_the_run_resumes(tmp_path):
  """Three launches of one run: stopped by SIGTERM, killed by SIGKILL, finished."""
  workdir = tmp_path / "run"
  config = _config(tmp_path, 100, **{"dist.min_step_s": 0.02})
  launches = []
  try:
    for name, sig in (("first", signal.SIGTERM), ("second", signal.SIGKILL)):
      run = Launcher(tmp_path, config, workdir, name)
      launches.append(run)
      at = run.step()
      run.wait_for(lambda: run.step() >= at + 10 and len(run.child_pids()) == 2, 240,
                   "learner 0 to step on")
      run.popen.send_signal(sig)
      _wait_for(lambda: all(_gone(pid) for pid in run.child_pids()), 10,
                f"the {name} launch's children {sorted(run.child_pids())} to exit")
      assert run.popen.wait(10) == (143 if sig == signal.SIGTERM else -9)
    assert "stopping every process (SIGTERM)" in launches[0].output()
    run = Launcher(tmp_path, config, workdir, "third")
    launches.append(run)
    assert run.finish() == 0, run.output()[-4000:]
  finally:
    for run in launches:
      run.kill()
  segments = json.loads((workdir / "segments.json").read_text())
  assert [s["ended"] for s in segments] == ["stopped (SIGTERM)", "launcher lost", "finished"]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["segments"] == [{k: s[k] for k in ("start", "end", "ended")} for s in segments]
  assert summary["wall_seconds"] == pytest.approx(sum(s["end"] - s["start"] for s in segments))
  # Busy time over every launch's wall time, unclamped: at most 1, give or take the
  # second a killed launcher's last heartbeat may leave out of its segment (over the
  # last launch alone, as the summary once computed it, it would be far above).
  busy = sum(l["busy_s"] for l in summary["learners"])
  raw = busy / (len(summary["learners"]) * summary["wall_seconds"])
  assert 0 < raw <= 1 + 1.0 / summary["wall_seconds"], raw
  assert summary["goodput"] == pytest.approx(min(raw, 1.0))
  assert 0 < summary["uptime"] <= 1
  assert summary["learners"][0]["steps"] == 100
  shown = [int(g) for g in re.findall(r"\| goodput (\d+)%", run.output())]
  assert shown and max(shown) <= 100
  assert "(launch 3 of this run)" in run.output()
