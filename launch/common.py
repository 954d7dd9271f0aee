r"""What the launchers share: the command each host runs, shown or run, and local processes.

`tpu.py` and `gpu.py` decide where a run's processes go (TPU slices through
`gcloud ... ssh --worker=all`, GPU hosts through ssh, Slurm jobs, or this
machine with `--local`); this module decides what each of them runs:

  cd SRC && unset <every MEGASCALE_* variable> && unset DILOCO_SECRET \
    && DILOCO_KEY="$(cat RUN_DIR/learnerM.key)" && export DILOCO_KEY \
    && exec PYTHON -m decoupled_diloco.main --config=... --workdir=RUN_DIR/work/NAME \
         --role=learner --learner=M --mailbox=URL [--distributed ...] [--config.x.y=v ...]

- Keys reach a process through its environment, read from a file only its
  owner can read. The syncer's host holds the run secret (RUN_DIR/secret, into
  $DILOCO_SECRET); learner M's hosts hold only learner M's credential
  (RUN_DIR/learnerM.key, into $DILOCO_KEY; `runtime/dist/keys.py`), so a
  learner's host can sign as that learner and nobody else. Neither is ever on
  a command line: `ps` shows every user's command lines, shells keep history,
  and a dry run's output gets pasted into tickets.
- No MEGASCALE_* variable reaches a learner. Cloud TPU sets them for
  multislice jobs (one SPMD program over several slices); a stale one makes
  `jax.distributed.initialize` wait for slices that are other learners here.

Every command is an argv list printed with `shlex.join`, so what `--dry_run`
prints can be pasted into a POSIX shell as is, one command a line.
"""

import ctypes
import dataclasses
import functools
import importlib.util
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time

from decoupled_diloco.runtime.dist import keys

ENTRY = "decoupled_diloco.main"
SECRET_ENV = keys.SECRET_ENV  # The run secret: the syncer's and the launcher's hosts.
KEY_ENV = keys.KEY_ENV  # One learner's credential: that learner's hosts only.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_VERSION = "3.12"  # What `setup` installs on hosts; Ubuntu 22.04 TPU images ship 3.10.
UV = '"$HOME/.local/bin/uv"'  # Where uv's installer puts it (https://docs.astral.sh/uv/).

# POSIX sh (a host's login shell may be dash): the names of every MEGASCALE_* variable.
DROP_MEGASCALE = "unset $(env | sed -n 's/^\\(MEGASCALE_[A-Za-z0-9_]*\\)=.*/\\1/p')"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where one run's files are on a host, as paths that host's shell understands."""
  root: str  # The run's directory, from where commands start (a host's home, or absolute).
  src: str  # This repository's checkout, from there too; processes run in it.
  python: str  # The interpreter, from `src`.
  back: str  # The run's directory, from `src`.

  def secret(self, from_src: bool = False) -> str:
    return f"{self.back if from_src else self.root}/secret"

  def key(self, m: int, from_src: bool = False) -> str:
    """Learner m's credential (one file per learner: a run directory may be shared)."""
    return f"{self.back if from_src else self.root}/learner{m}.key"

  def log(self, name: str) -> str:
    return f"{self.root}/logs/{name}.log"

  def pid(self, name: str) -> str:
    return f"{self.root}/logs/{name}.pid"


def remote_layout(run_name: str) -> Layout:
  """A run on a TPU VM or GPU host, under the home directory where ssh commands start."""
  root = f"diloco/{run_name}"
  return Layout(root=root, src=f"{root}/src", python=".venv/bin/python", back="..")


def local_layout(run_dir: str) -> Layout:
  """A run on this machine: this checkout and its interpreter, files under `run_dir`."""
  run_dir = os.path.abspath(run_dir)
  return Layout(root=run_dir, src=REPO, python=sys.executable, back=run_dir)


@dataclasses.dataclass(frozen=True)
class Process:
  """One process of a run: its name (log, pid file) and `decoupled_diloco.main`'s flags."""
  name: str
  args: tuple[str, ...]
  learner: int | None = None  # Whose credential it holds; None: the syncer (the secret).


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What every process of one run shares."""
  config: str  # `path.py[:variant]`, relative to the checkout.
  mailbox: str  # gs://bucket/prefix, s3://bucket/prefix or file:///abs/path.
  num_learners: int  # M; set on every process as diloco.num_learners.
  sets: tuple[str, ...] = ()  # `section.field=value` config overrides, for every process.

  def _args(self, layout: Layout, workdir: str, role: list[str]) -> tuple[str, ...]:
    sets = (f"diloco.num_learners={self.num_learners}", *self.sets)
    return (f"--config={self.config}", f"--workdir={layout.back}/work/{workdir}", *role,
            f"--mailbox={self.mailbox}", *(f"--config.{s}" for s in sets))

  def syncer(self, layout: Layout) -> Process:
    return Process("syncer", self._args(layout, "syncer", ["--role=syncer"]))

  def learner(self, layout: Layout, m: int, distributed=(), name: str = "") -> Process:
    """Learner `m`; `distributed` are its jax.distributed flags when it spans hosts."""
    role = ["--role=learner", f"--learner={m}", *distributed]
    return Process(name or f"learner{m}", self._args(layout, f"learner{m}", role), learner=m)


def check_range(flag: str, value, low, high=None, *, above: bool = False) -> None:
  """Raises ValueError naming `--flag` unless `value` is in range.

  In range: `low <= value` (`low < value` with `above`), and `value <= high` if given.
  """
  if not ((value > low if above else value >= low) and (high is None or value <= high)):
    allowed = f"above {low}" if above else f"at least {low}"
    allowed += f" and at most {high}" if high is not None else ""
    raise ValueError(f"--{flag}={value}: must be {allowed}.")


def check_sets(sets, num_learners: int) -> tuple[str, ...]:
  """`--set` values: each `section.field=value`, none contradicting the launcher's M."""
  for s in sets:
    key, eq, value = s.partition("=")
    if not eq or "." not in key:
      raise ValueError(f"--set={s!r} is not `section.field=value` (e.g. train.steps=1000).")
    if key == "diloco.num_learners" and value != str(num_learners):
      raise ValueError(f"--set={s} contradicts the launcher's {num_learners} learners (one per"
                       " slice or hosts-file line); drop it, the launcher sets it.")
  return tuple(sets)


# --- Shell commands -------------------------------------------------------------------


def prelude(layout: Layout, learner: int | None) -> list[str]:
  """Into the checkout, MEGASCALE_* gone, the process's key in its environment (sh, one a line).

  The syncer (`learner` None) gets the run secret, learner m its credential and
  never the secret, even if the host's environment had it.
  """
  if learner is None:
    var, path, drop = SECRET_ENV, layout.secret(from_src=True), KEY_ENV
  else:
    var, path, drop = KEY_ENV, layout.key(learner, from_src=True), SECRET_ENV
  return [f"cd {shlex.quote(layout.src)}", DROP_MEGASCALE, f"unset {drop}",
          f'{var}="$(cat {shlex.quote(path)})"', f"export {var}"]


def _main(layout: Layout, proc: Process) -> str:
  return shlex.join([layout.python, "-m", ENTRY, *proc.args])


def _running(pid_file: str) -> str:
  """True in sh while the pid file names a live process of ours (not a recycled pid)."""
  pid = shlex.quote(pid_file)
  return f'test -f {pid} && grep -qs decoupled_diloco "/proc/$(cat {pid})/cmdline"'


def foreground(layout: Layout, proc: Process) -> str:
  """The shell command that becomes `proc` (exec: its pid is the process's own)."""
  return " && ".join(prelude(layout, proc.learner) + ["exec " + _main(layout, proc)])


def start(layout: Layout, proc: Process) -> str:
  """The shell command that starts `proc` in the background and returns.

  `setsid nohup` detaches it from the ssh session that started it; its output
  goes to its log and its pid to its pid file (for `stop`). It refuses to start
  a second copy while one runs (they would share a workdir).
  """
  # Paths from `src`, where the prelude leaves the shell.
  log = f"{layout.back}/logs/{proc.name}.log"
  pid = f"{layout.back}/logs/{proc.name}.pid"
  busy = shlex.quote(f"{proc.name} is already running; stop it first.")
  return " && ".join(prelude(layout, proc.learner) + [
      f"mkdir -p {shlex.quote(layout.back + '/logs')}",
      f"if {_running(pid)}; then echo {busy} >&2; exit 1; fi",
      f"{{ setsid nohup {_main(layout, proc)} > {shlex.quote(log)} 2>&1 < /dev/null"
      f" & echo $! > {shlex.quote(pid)}; }}"])


def stop(layout: Layout, name: str) -> str:
  """The shell command that stops process `name` (SIGTERM) if it runs."""
  pid = layout.pid(name)
  quoted = shlex.quote(pid)
  return f'if {_running(pid)}; then kill -TERM "$(cat {quoted})"; fi; rm -f {quoted}'


def tail(layout: Layout, name: str, lines: int, follow: bool) -> str:
  return shlex.join(["tail", f"-n{lines}", *(["-F"] if follow else []), layout.log(name)])


def install(layout: Layout, repo: str, commit: str, extra: str) -> str:
  """The shell command that checks out `repo` at `commit` and installs it (`.[extra]`).

  uv brings its own Python (TPU VM images ship 3.10; the project needs 3.11+).
  The run's directory is 0700: it will hold the secret.
  """
  q = shlex.quote
  target = f".[{extra}]" if extra else "."
  return " && ".join([
      f"mkdir -p {q(layout.root)}", f"chmod 700 {q(layout.root)}",
      "(command -v git > /dev/null"  # Debian images (the syncer VM) come without git.
      " || (sudo apt-get update -qq && sudo apt-get install -y -qq git))",
      f"(test -d {q(layout.src + '/.git')} || git clone --quiet {q(repo)} {q(layout.src)})",
      f"cd {q(layout.src)}", "git fetch --quiet origin",
      f"git checkout --quiet --force {q(commit)}",
      f"(test -x {UV} || curl -LsSf https://astral.sh/uv/install.sh | sh)",
      f"(test -x .venv/bin/python || {UV} venv --quiet --python {PYTHON_VERSION} .venv)",
      f"{UV} pip install --quiet --python .venv/bin/python -e {q(target)}"])


def from_git(value: str, flag: str, *args) -> str:
  """`value`, or what git says of this checkout (the default of --repo and --commit)."""
  if value:
    return value
  got = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=False)
  if got.returncode != 0 or not got.stdout.strip():
    raise ValueError(f"--{flag}: `git {' '.join(args)}` gave nothing here; give --{flag}.")
  return got.stdout.strip()


# --- Running or showing commands ------------------------------------------------------


class Shell:
  """Runs argv lists; with `dry_run` prints them, one a line, and runs nothing."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def note(self, text: str) -> None:
    """A local action (no command) that a dry run shows as a shell comment."""
    if self.dry_run:
      print(f"# {text}", file=self.out)

  def run(self, argvs: list[list[str]], parallel: bool = False) -> None:
    """Runs `argvs` in order (or all at once); exits naming the commands that failed."""
    if self.dry_run:
      for argv in argvs:
        print(shlex.join(argv), file=self.out)
      return
    failed = []
    if parallel:
      procs = []
      for argv in argvs:
        print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
        procs.append((argv, subprocess.Popen(argv)))
      failed = [argv for argv, p in procs if p.wait() != 0]
    else:
      for argv in argvs:
        print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
        if subprocess.run(argv, check=False).returncode != 0:
          failed.append(argv)
          break  # Later steps depend on earlier ones.
    if failed:
      sys.exit("error: these commands failed:\n  " + "\n  ".join(map(shlex.join, failed)))


def setup(shell: "Shell", secret: str, learners, repo_flag: str, commit_flag: str,
          commands) -> None:
  """`setup` on every platform: the run secret and `learners`' keys, then installs and copies.

  `commands(repo, commit)` gives (installs, copies) for the repository and
  commit the flags name (default: this checkout's origin and HEAD); the copies
  send learner m's hosts `key_file(secret, m)` and the syncer's the secret.
  """
  shell.note(f"write a random run secret to {secret} (mode 0600) unless it exists")
  for m in learners:
    shell.note(f"write learner {m}'s credential to {key_file(secret, m)} (mode 0600)")
  if not shell.dry_run:
    ensure_secret(secret)
    write_keys(read_secret(secret), {m: key_file(secret, m) for m in learners})
  repo = from_git(repo_flag, "repo", "remote", "get-url", "origin")
  commit = from_git(commit_flag, "commit", "rev-parse", "HEAD")
  installs, copies = commands(repo, commit)
  shell.run(installs, parallel=True)
  shell.run(copies, parallel=True)


def start_run(shell: "Shell", commands: list[str], syncer: bool) -> None:
  """`run`: the syncer first (learners find its lease), then the learners at once."""
  shell.run(commands[:1] if syncer else [])
  shell.run(commands[1:] if syncer else commands, parallel=True)


def check_follow(follow: bool, learners, syncer: bool) -> None:
  if follow and len(learners) + syncer != 1:
    raise ValueError("--follow follows one process: add --learner=M or --syncer.")


def ensure_secret(path: str) -> None:
  """Creates the run secret at `path` (mode 0600) unless it exists.

  Its value: $DILOCO_SECRET if this shell has one, else 32 random bytes, hex.
  """
  path = os.path.expanduser(path)
  if os.path.exists(path):
    if os.stat(path).st_mode & 0o077:
      raise ValueError(f"the run secret {path} is readable by others; chmod 600 it.")
    return
  os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  with os.fdopen(fd, "w") as f:
    f.write(os.environ.get(SECRET_ENV) or secrets.token_hex(32))


def read_secret(path: str) -> str:
  """The run secret as the hosts' shells read it (`$(cat file)` drops trailing newlines)."""
  path = os.path.expanduser(path)
  if os.path.exists(path):
    with open(path) as f:
      return f.read().rstrip("\n")
  if os.environ.get(SECRET_ENV):
    return os.environ[SECRET_ENV]
  raise ValueError(f"no run secret: {path} does not exist and ${SECRET_ENV} is unset.")


def key_file(secret_file: str, m: int) -> str:
  """Where `setup` keeps learner m's credential on this machine: beside the run secret."""
  return f"{secret_file.removesuffix('.secret')}.learner{m}.key"


def write_keys(secret: str, paths: dict[int, str]) -> None:
  """Writes learner m's credential (`keys.learner_credential`) to `paths[m]`, mode 0600.

  A file that already holds it is left as it is.
  """
  for m, path in paths.items():
    path = os.path.expanduser(path)
    credential = keys.learner_credential(secret.encode(), m)
    if os.path.exists(path):
      with open(path) as f:
        if f.read() == credential:
          continue
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):  # A crashed write's: its mode may be anything.
      os.remove(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
      f.write(credential)
    os.replace(tmp, path)


# --- Local processes ------------------------------------------------------------------


# prctl(2), to tie a child's life to the launcher's (Linux; elsewhere None).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
  """A child's `preexec_fn`: SIGKILL as soon as the launcher `parent` dies, even by kill -9.

  Use as `functools.partial(die_with, os.getpid())`. The kernel sends it when
  the *thread* that forked the child exits, so children are started from the
  main thread. A launcher already gone before the call left an orphan: it
  kills itself.
  """
  if _PRCTL is None:
    return
  _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill(procs: dict, grace_s: float = 10.0) -> None:
  """SIGTERM to each live child's process group, then SIGKILL after `grace_s`."""
  for proc in procs.values():
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, signal.SIGTERM)
      except ProcessLookupError:  # Exited meanwhile.
        pass
  deadline = time.monotonic() + grace_s
  for proc in procs.values():
    try:
      proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      proc.wait()


def _pump(name: str, proc, log_path: str, out, lock) -> None:
  with open(log_path, "a") as log:
    for line in proc.stdout:
      log.write(line)
      log.flush()
      with lock:
        out.write(f"[{name}] {line}")
        out.flush()


def run_local(commands: dict[str, str], *, log_dir: str, timeout_s: float,
              syncer: str = "syncer", syncer_grace_s: float = 120.0, out=None) -> int:
  """Runs each shell command as a local process until every learner has exited.

  The syncer starts first. Each line a process prints is shown prefixed with
  its name and appended to `log_dir/NAME.log`. Once the learners are done the
  syncer gets `syncer_grace_s` to exit by itself (it evaluates the final
  global model first), then is stopped. Every child is stopped (SIGTERM,
  then SIGKILL) on a timeout, on Ctrl-C or if one fails.

  Returns:
    0 if every learner and the syncer exited 0; 124 on a timeout (the syncer's
    grace included); 130 on Ctrl-C; else the first nonzero exit status.
  """
  out = out or sys.stdout
  os.makedirs(log_dir, exist_ok=True)
  lock, procs, pumps = threading.Lock(), {}, []
  order = sorted(commands, key=lambda name: name != syncer)
  try:
    for name in order:
      procs[name] = subprocess.Popen(
          ["sh", "-c", commands[name]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL, text=True, start_new_session=True,
          preexec_fn=functools.partial(die_with, os.getpid()))
      pumps.append(threading.Thread(
          target=_pump, args=(name, procs[name], os.path.join(log_dir, f"{name}.log"), out, lock),
          daemon=True))
      pumps[-1].start()
    deadline = time.monotonic() + timeout_s
    learners = [n for n in order if n != syncer]
    while True:  # Failures first: a learner that failed as the last one ended counts.
      failed = [n for n in procs if procs[n].poll()]
      if failed:
        print(f"{failed[0]} exited with status {procs[failed[0]].returncode}; stopping the run.",
              file=sys.stderr)
        return procs[failed[0]].returncode
      if all(procs[n].poll() is not None for n in learners):
        break
      if time.monotonic() > deadline:
        print(f"timed out after {timeout_s:.0f} s; stopping the run.", file=sys.stderr)
        return 124
      time.sleep(0.2)
    if syncer in procs:
      try:
        if (rc := procs[syncer].wait(syncer_grace_s)):
          print(f"{syncer} exited with status {rc} after the learners finished.", file=sys.stderr)
          return rc
      except subprocess.TimeoutExpired:
        print(f"{syncer} was still running {syncer_grace_s:g} s after the learners finished;"
              " stopping it (the run has no final evaluation).", file=sys.stderr)
        return 124
    return 0
  except KeyboardInterrupt:
    print("interrupted; stopping every process.", file=sys.stderr)
    return 130
  finally:
    _kill(procs)
    for pump in pumps:
      pump.join(5.0)


# --- Status ---------------------------------------------------------------------------


def config_field(spec: str, sets, dotted: str):
  """Field `dotted` of experiment config `path.py[:variant]` after the `--set` overrides."""
  for s in reversed(list(sets)):
    key, _, value = s.partition("=")
    if key == dotted:
      return value
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("launch_config", os.path.join(REPO, path))
  if module_spec is None or not os.path.exists(os.path.join(REPO, path)):
    raise ValueError(f"--config={spec}: no file {path} in {REPO}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  node = module.get_config(arg or None)
  for part in dotted.split("."):
    node = node[part]
  return node


def _ago(seconds: float) -> str:
  return f"expires in {seconds:.0f} s" if seconds >= 0 else f"expired {-seconds:.0f} s ago"


def status_lines(mailbox_url: str, secret: str, num_fragments: int, num_learners: int) -> list[str]:
  """What the mailbox says of a run: versions, the syncer, each learner's last step."""
  # Lazily: dry runs and the other subcommands need neither jax nor tensorstore.
  # pylint: disable-next=g-import-not-at-top
  from decoupled_diloco.runtime.dist import learner as distributed, mailbox as mailbox_lib
  box = mailbox_lib.Mailbox(mailbox_url, secret.encode())
  now = time.time()
  lines = [f"mailbox {mailbox_url}"]
  syncer = box.read_lease(distributed.SYNCER_LEASE)
  if syncer is None:
    lines.append("syncer: no lease yet")
  else:
    state = "live" if syncer.expires_at > now else "down"
    lines.append(f"syncer: {state} (holder {syncer.holder}, epoch {syncer.epoch},"
                 f" lease {_ago(syncer.expires_at - now)})")
  for p in range(num_fragments):
    version = box.latest_version(p)
    lines.append(f"fragment {p}: " + ("no version published" if version is None
                                      else f"version {version}"))
  leases = box.leases(distributed.LEARNER_LEASES)
  for m in range(num_learners):
    lease = leases.get(distributed.learner_lease(m))
    if lease is None:
      lines.append(f"learner {m}: never seen")
      continue
    info = lease.info
    state = info.get("status", "running")  # E.g. `done` once it trained its last step.
    if state == "running":
      state = "live" if lease.expires_at > now else "down"
    seconds = info.get("step_seconds")
    pace = f", {seconds:.3f} s/step" if isinstance(seconds, (int, float)) else ""
    lines.append(f"learner {m}: {state}, step {info.get('step', '?')}{pace}"
                 f" (lease {_ago(lease.expires_at - now)})")
  return lines
