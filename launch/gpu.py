r"""Decoupled DiLoCo on GPU hosts: learners from a hosts file over ssh, or Slurm jobs.

  python -m launch.gpu SUBCOMMAND --run_name=NAME --hosts_file=hosts.txt --syncer_host=H \
      --mailbox=gs://B/NAME [--config=...] [--set=f=v ...] [--dry_run]
  python -m launch.gpu slurm --run_name=NAME --num_learners=M --nodes_per_learner=N \
      --mailbox=URL [--partition=P] [--dry_run]

The hosts file has one learner per line: the hosts it spans, separated by
spaces ([user@]host as ssh takes it); `#` starts a comment. A learner on
several hosts runs one process per host with `jax.distributed` (the line's
first host coordinates, on --coordinator_port). Every host is one process.

  # learner 0 on one 8-GPU host, learner 1 on two
  gpu-a1
  gpu-b1 gpu-b2

Subcommands: `setup` (clone --repo at --commit on every host, install it with
the [cuda] extra, the syncer's with CPU jax; copy the run secret to the
syncer's host and learner M's credential to learner M's hosts), `run`
(the syncer, then every learner; `run --learner=M` starts one again), `status`
(the mailbox: versions, leases, steps), `logs`, `stop`, and `slurm`: one batch
script per learner and one for the syncer, each its own job (a failed node
ends its learner only; the others keep training), written under --workdir on
the cluster's shared filesystem and submitted with sbatch.

Processes run as in `launch/common.py`: the syncer's secret from a 0600 file
into $DILOCO_SECRET, learner M's credential from learnerM.key into $DILOCO_KEY,
never on a command line; no MEGASCALE_* variable; files under ~/diloco/NAME on
each host (src/, secret or learnerM.key, logs/, work/). On a Slurm cluster the
run directory is on the shared filesystem, so every job can read every key
file there: per-learner keys separate learners only where the hosts do (use
`setup` and `run` over ssh for that). --dry_run prints the
commands, one a line (a Slurm script as the here-document that writes it),
and runs nothing.
"""

import dataclasses
import os
import re
import shlex
import sys

from absl import app, flags

if __package__ in (None, ""):  # Run as `python launch/gpu.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # pylint: disable=g-import-not-at-top

SUBCOMMANDS = ("setup", "run", "status", "logs", "stop", "slurm")

_RUN_NAME = flags.DEFINE_string("run_name", None, "Names the run (host directory"
                                " ~/diloco/NAME, Slurm job names).")
_HOSTS_FILE = flags.DEFINE_string("hosts_file", "", "One learner per line: its hosts.")
_SYNCER_HOST = flags.DEFINE_string("syncer_host", "", "[user@]host the syncer runs on (CPU"
                                   " is enough; it may be one of the learners' hosts).")
_MAILBOX = flags.DEFINE_string("mailbox", "", "gs://bucket/prefix, s3://bucket/prefix, or"
                               " file:///path on a filesystem every host shares.")
_CONFIG = flags.DEFINE_string("config", "experiments/decoupled_diloco.py:small",
                              "Experiment config, `path.py[:variant]` in the checkout.")
_SET = flags.DEFINE_multi_string("set", [], "Config override for every process,"
                                 " `section.field=value` (passed as --config.section.field).")
_COORDINATOR_PORT = flags.DEFINE_integer("coordinator_port", 8476, "Port of a multi-host"
                                         " learner's jax.distributed coordinator.")
_REPO = flags.DEFINE_string("repo", "", "setup: git URL the hosts clone (default: this"
                            " checkout's `origin`).")
_COMMIT = flags.DEFINE_string("commit", "", "setup: commit to install (default: this"
                              " checkout's HEAD, which must be pushed).")
_SECRET_FILE = flags.DEFINE_string("secret_file", "", "The run secret (created with mode 0600"
                                   " if missing; default ~/.config/decoupled_diloco/NAME.secret;"
                                   " slurm: WORKDIR/secret).")
_LEARNER = flags.DEFINE_integer("learner", None, "Only learner M (setup, run, logs, stop).")
_SYNCER = flags.DEFINE_bool("syncer", False, "Only the syncer (setup, run, logs, stop).")
_FOLLOW = flags.DEFINE_bool("follow", False, "logs: keep printing (one process only).")
_LINES = flags.DEFINE_integer("lines", 100, "logs: how many last lines.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, one a line; run nothing.")
_NUM_LEARNERS = flags.DEFINE_integer("num_learners", 2, "slurm: M, one job each.")
_NODES_PER_LEARNER = flags.DEFINE_integer("nodes_per_learner", 1, "slurm: nodes of one learner.")
_GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per node.")
_TIME = flags.DEFINE_string("time", "24:00:00", "slurm: each job's time limit.")
_PARTITION = flags.DEFINE_string("partition", "", "slurm: partition (default: the cluster's).")
_ACCOUNT = flags.DEFINE_string("account", "", "slurm: account to charge.")
_WORKDIR = flags.DEFINE_string("workdir", "", "slurm: the run's directory on the shared"
                               " filesystem (default ~/diloco/NAME).")
_PYTHON = flags.DEFINE_string("python", ".venv/bin/python", "slurm: the interpreter, from this"
                              " checkout (which the compute nodes see at the same path).")


@dataclasses.dataclass(frozen=True)
class Plan:
  """One run on GPU hosts, resolved from the flags."""
  name: str
  learners: tuple[tuple[str, ...], ...]  # Each learner's hosts; the first coordinates.
  syncer_host: str
  port: int
  spec: common.RunSpec

  @property
  def layout(self) -> common.Layout:
    return common.remote_layout(self.name)

  def processes(self, m: int) -> list[tuple[str, common.Process]]:
    """(host, process) for every host of learner `m`."""
    hosts = self.learners[m]
    if len(hosts) == 1:
      return [(hosts[0], self.spec.learner(self.layout, m))]
    coordinator = f"{hosts[0].rpartition('@')[2]}:{self.port}"
    return [(host, self.spec.learner(
        self.layout, m, name=f"learner{m}-{i}",
        distributed=("--distributed", f"--coordinator_address={coordinator}",
                     f"--num_processes={len(hosts)}", f"--process_id={i}")))
            for i, host in enumerate(hosts)]


def read_hosts(path: str) -> tuple[tuple[str, ...], ...]:
  """The hosts file: one learner per line, its hosts separated by spaces."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"--hosts_file={path!r}: {e.strerror}.") from None
  learners = tuple(tuple(line.split("#", 1)[0].split()) for line in text.splitlines())
  learners = tuple(hosts for hosts in learners if hosts)
  if not learners:
    raise ValueError(f"--hosts_file={path!r} lists no learner (one line per learner: its hosts).")
  seen = [h for hosts in learners for h in hosts]
  twice = sorted({h for h in seen if seen.count(h) > 1})
  if twice:
    raise ValueError(f"--hosts_file={path!r} lists {', '.join(twice)} more than once; each host"
                     " runs one process of one learner.")
  return learners


def _mailbox() -> str:
  if not re.fullmatch(r"(gs|s3)://[^/]+/.+|file:///.+", _MAILBOX.value):
    raise ValueError(f"--mailbox={_MAILBOX.value!r}: gs://bucket/prefix, s3://bucket/prefix or"
                     " file:///abs/path (on a filesystem every host shares).")
  return _MAILBOX.value


def _name() -> str:
  name = _RUN_NAME.value or ""
  if not re.fullmatch(r"[a-z][-a-z0-9]{0,38}[a-z0-9]", name):
    raise ValueError(f"--run_name={name!r}: 2-40 lowercase letters, digits and hyphens,"
                     " starting with a letter.")
  return name


def make_plan() -> Plan:
  """The run the flags describe; ValueError naming the flag if they do not make one."""
  name, learners = _name(), read_hosts(_HOSTS_FILE.value)
  spec = common.RunSpec(config=_CONFIG.value, mailbox=_mailbox(), num_learners=len(learners),
                        sets=common.check_sets(_SET.value, len(learners)))
  return Plan(name=name, learners=learners, syncer_host=_SYNCER_HOST.value,
              port=_COORDINATOR_PORT.value, spec=spec)


# --- Commands over ssh ----------------------------------------------------------------


def setup_commands(plan: Plan, learners, syncer: bool, repo: str, commit: str,
                   secret_file: str) -> tuple[list[list[str]], list[list[str]]]:
  """(installs, key copies), one install per host; each list runs in parallel.

  Learner m's hosts get its credential only; the syncer's host gets the secret.
  """
  layout = plan.layout
  extras = {h: "cuda" for m in learners for h in plan.learners[m]}
  if syncer:
    extras.setdefault(plan.syncer_host, "")
  installs = [["ssh", h, common.install(layout, repo, commit, extra)]
              for h, extra in extras.items()]
  copies = [["scp", common.key_file(secret_file, m), f"{h}:{layout.key(m)}"]
            for m in learners for h in plan.learners[m]]
  copies += [["scp", secret_file, f"{plan.syncer_host}:{layout.secret()}"]] if syncer else []
  return installs, copies


def run_commands(plan: Plan, learners, syncer: bool) -> list[list[str]]:
  layout = plan.layout
  cmds = [["ssh", plan.syncer_host, common.start(layout, plan.spec.syncer(layout))]
          ] if syncer else []
  return cmds + [["ssh", h, common.start(layout, p)] for m in learners
                 for h, p in plan.processes(m)]


def stop_commands(plan: Plan, learners, syncer: bool) -> list[list[str]]:
  cmds = [["ssh", plan.syncer_host, common.stop(plan.layout, "syncer")]] if syncer else []
  return cmds + [["ssh", h, common.stop(plan.layout, p.name)] for m in learners
                 for h, p in plan.processes(m)]


def logs_commands(plan: Plan, learners, syncer: bool, lines: int, follow: bool):
  cmds = [["ssh", plan.syncer_host, common.tail(plan.layout, "syncer", lines, follow)]
          ] if syncer else []
  for m in learners:
    host, proc = plan.processes(m)[0]  # Process 0 is the one that talks to the mailbox.
    cmds.append(["ssh", host, common.tail(plan.layout, proc.name, lines, follow)])
  return cmds


# --- Slurm ----------------------------------------------------------------------------


def slurm_layout(workdir: str, python: str) -> common.Layout:
  """A run on a cluster's shared filesystem: this checkout, files under `workdir`."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  return common.Layout(root=workdir, src=common.REPO, python=python, back=workdir)


def slurm_script(name: str, spec: common.RunSpec, layout: common.Layout, m: int | None, *,
                 nodes: int, gpus_per_node: int, time: str, partition: str, account: str,
                 port: int) -> str:
  """The batch script of learner `m` (None: the syncer), one job of its own."""
  job = "syncer" if m is None else f"learner{m}"
  directives = [f"--job-name={name}-{job}", f"--nodes={1 if m is None else nodes}",
                "--ntasks-per-node=1"]
  directives += [] if m is None else [f"--gpus-per-node={gpus_per_node}"]
  directives += [f"--time={time}", f"--output={layout.root}/logs/{job}-%j.log"]
  directives += [f"--partition={partition}"] * bool(partition)
  directives += [f"--account={account}"] * bool(account)
  what = ("The syncer" if m is None else f"Learner {m}") + f" of run {name}, in a job of its own"
  lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
           f"# {what}: a failed node ends this job only; the others keep training.",
           "set -eu", *common.prelude(layout, m)]
  if m is None or nodes == 1:
    proc = spec.syncer(layout) if m is None else spec.learner(layout, m)
    lines.append("exec " + shlex.join([layout.python, "-m", common.ENTRY, *proc.args]))
  else:
    proc = spec.learner(layout, m, distributed=("--distributed",))
    lines += [f'coordinator="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{port}"',
              # One task per node; each learns its rank from Slurm. "$0" is the coordinator.
              "exec srun --ntasks-per-node=1 sh -c 'exec \"$@\" --coordinator_address=\"$0\""
              " --num_processes=\"$SLURM_NTASKS\" --process_id=\"$SLURM_PROCID\"' \"$coordinator\" "
              + shlex.join([layout.python, "-m", common.ENTRY, *proc.args])]
  return "\n".join(lines) + "\n"


def _slurm(shell: common.Shell) -> None:
  name, m = _name(), _NUM_LEARNERS.value
  common.check_range("num_learners", m, 1)
  common.check_range("nodes_per_learner", _NODES_PER_LEARNER.value, 1)
  common.check_range("gpus_per_node", _GPUS_PER_NODE.value, 1)
  layout = slurm_layout(_WORKDIR.value or f"~/diloco/{name}", _PYTHON.value)
  spec = common.RunSpec(config=_CONFIG.value, mailbox=_mailbox(), num_learners=m,
                        sets=common.check_sets(_SET.value, m))
  scripts = {f"{layout.root}/slurm/{'syncer' if i is None else f'learner{i}'}.sbatch":
             slurm_script(name, spec, layout, i, nodes=_NODES_PER_LEARNER.value,
                          gpus_per_node=_GPUS_PER_NODE.value, time=_TIME.value,
                          partition=_PARTITION.value, account=_ACCOUNT.value,
                          port=_COORDINATOR_PORT.value)
             for i in [None, *range(m)]}
  secret, key_files = layout.secret(), {i: layout.key(i) for i in range(m)}
  shell.note(f"write a random run secret to {secret} (mode 0600) unless it exists, and"
             f" learner M's credential to {layout.root}/learnerM.key")
  dirs = ["mkdir", "-p", f"{layout.root}/logs", f"{layout.root}/slurm"]
  if shell.dry_run:
    shell.run([dirs])
    for path, text in scripts.items():
      print(f"cat > {shlex.quote(path)} <<'EOF'\n{text}EOF", file=shell.out)
      shell.run([["sbatch", path]])
    return
  common.ensure_secret(secret)
  common.write_keys(common.read_secret(secret), key_files)
  shell.run([dirs])
  for path, text in scripts.items():
    with open(path, "w") as f:
      f.write(text)
  shell.run([["sbatch", path] for path in scripts])


# --- Subcommands ----------------------------------------------------------------------


def _targets(plan: Plan) -> tuple[list[int], bool]:
  """(learners, syncer) the subcommand acts on: all, or --learner=M, or --syncer."""
  if _LEARNER.value is not None and _SYNCER.value:
    raise ValueError("--learner and --syncer: give one, or neither for every process.")
  if _LEARNER.value is not None:
    if not 0 <= _LEARNER.value < len(plan.learners):
      raise ValueError(f"--learner={_LEARNER.value}: the hosts file has learners"
                       f" 0..{len(plan.learners) - 1}.")
    return [_LEARNER.value], False
  if not plan.syncer_host:
    raise ValueError("--syncer_host is required (or --learner=M).")
  return ([] if _SYNCER.value else list(range(len(plan.learners)))), True


def main(argv) -> int:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    sys.exit(f"usage: python -m launch.gpu {{{','.join(SUBCOMMANDS)}}} [flags]; see --help.")
  command, shell = argv[1], common.Shell(_DRY_RUN.value)
  try:
    common.check_range("coordinator_port", _COORDINATOR_PORT.value, 1, 65535)
    common.check_range("lines", _LINES.value, 1)
    if command == "slurm":
      _slurm(shell)
      return 0
    plan = make_plan()
    secret = os.path.expanduser(_SECRET_FILE.value or
                                f"~/.config/decoupled_diloco/{plan.name}.secret")
    if command == "status":
      shell.note(f"reads the mailbox {plan.spec.mailbox}; touches no host")
      if not shell.dry_run:
        fragments = int(common.config_field(plan.spec.config, plan.spec.sets,
                                            "diloco.num_fragments"))
        print("\n".join(common.status_lines(plan.spec.mailbox, common.read_secret(secret),
                                            fragments, len(plan.learners))))
      return 0
    learners, syncer = _targets(plan)
    if command == "setup":
      common.setup(shell, secret, learners, _REPO.value, _COMMIT.value,
                   lambda repo, commit: setup_commands(plan, learners, syncer, repo, commit,
                                                       secret))
    elif command == "run":
      common.start_run(shell, run_commands(plan, learners, syncer), syncer)
    elif command == "logs":
      common.check_follow(_FOLLOW.value, learners, syncer)
      shell.run(logs_commands(plan, learners, syncer, _LINES.value, _FOLLOW.value))
    elif command == "stop":
      shell.run(stop_commands(plan, learners, syncer), parallel=True)
  except ValueError as e:
    sys.exit(f"error: {e}")
  return 0


if __name__ == "__main__":
  app.run(main)
