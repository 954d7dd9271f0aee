r"""Decoupled DiLoCo on Cloud TPU: one learner per slice, a syncer beside them, a gs:// mailbox.

  python -m launch.tpu SUBCOMMAND --run_name=NAME --project=P --zone=Z[,Z...] \
      --accelerator_types=v5p-8,v6e-8 --bucket=gs://B [--config=...] [--set=f=v ...] [--dry_run]

Subcommands, in the order of a run's life (BUILD.md walks through one):
  create  one queued resource per learner (types and zones may differ: v5p and v6e
          slices mix), the syncer's small CPU VM unless --syncer_host names a host,
          and with --create_bucket the bucket. Wait until the queued resources are
          ACTIVE (`gcloud compute tpus queued-resources list`) before `setup`.
  setup   on every TPU host and the syncer's host: clone --repo at --commit, install
          it with the [tpu] extra (the syncer: CPU jax) in a uv venv, and copy into
          ~/diloco/NAME (0700) the run secret (--secret_file, created if missing) to
          the syncer's host, and learner M's credential (derived from it, written
          beside it as NAME.learnerM.key) to learner M's hosts, as learnerM.key.
  run     start the syncer, then each learner on every host of its slice
          (--worker=all; `--distributed` initializes jax.distributed inside the slice).
          `run --learner=M` starts one learner again, e.g. on a slice re-created after
          a preemption (`create --learner=M`, `setup --learner=M`): it rejoins.
  status  read the mailbox: each fragment's global version, the syncer's lease, each
          learner's lease and last step. Touches no TPU.
  logs    a process's log (--learner=M or --syncer; --worker=W; --follow).
  stop    stop the processes; the slices and the VM keep running (and billing).
  delete  delete the queued resources (and their slices) and the syncer VM;
          --delete_mailbox also deletes gs://B/NAME.

Names: queued resource and TPU node NAME-learnerM, syncer VM NAME-syncer, mailbox
gs://B/NAME. On every host the run lives in ~/diloco/NAME: src/ (the checkout and
its .venv), secret (the syncer's host) or learnerM.key (learner M's hosts),
logs/NAME.log and .pid, work/NAME (each process's workdir).

Each learner is its own queued resource with one node (`--node-id`), not one
request with `--node-count`: that makes a multislice of identical slices for one
SPMD program (Cloud TPU sets MEGASCALE_* on them, which the launcher unsets),
while here each slice is an independent program of its own type and zone, and
a preempted one is re-created alone.

--dry_run prints the commands a subcommand would run, one a line, ready to
paste, and runs nothing; local actions (writing the secret and keys) show as
comments.
`run --local` runs the same per-host commands as processes on this machine,
one per learner plus the syncer, with a file:// mailbox under --workdir.
"""

import dataclasses
import os
import re
import shlex
import sys

from absl import app, flags

if __package__ in (None, ""):  # Run as `python launch/tpu.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common  # pylint: disable=g-import-not-at-top

SUBCOMMANDS = ("create", "setup", "run", "status", "logs", "stop", "delete")
# The TPU software version for JAX on each generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5",
                    "v5litepod": "v2-alpha-tpuv5-lite", "v4": "tpu-ubuntu2204-base"}
# `gcloud compute tpus queued-resources create` flags; best-effort exists only in alpha.
PROVISIONING = {"on_demand": [], "spot": ["--spot"], "reserved": ["--reserved"],
                "best_effort": ["--best-effort"]}
# The VMs reach the bucket with their service account; scopes cap what it may do.
SCOPES = "--scopes=https://www.googleapis.com/auth/cloud-platform"

_RUN_NAME = flags.DEFINE_string("run_name", None, "Names the run's slices (NAME-learnerM),"
                                " syncer VM (NAME-syncer), mailbox prefix and host directory.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project ID.")
_ZONE = flags.DEFINE_list("zone", [], "One zone for every slice, or one per learner (v5p and"
                          " v6e are offered in different zones).")
_ACCELERATOR_TYPES = flags.DEFINE_list("accelerator_types", [], "One TPU type per learner, e.g."
                                       " v5p-8,v6e-8: M is how many.")
_RUNTIME_VERSIONS = flags.DEFINE_list("runtime_versions", [], "TPU software version, one or one"
                                      f" per learner (default by generation: {RUNTIME_VERSIONS}).")
_PROVISIONING = flags.DEFINE_enum("provisioning", "on_demand", list(PROVISIONING),
                                  "How the slices are provisioned (spot: cheapest, preemptible,"
                                  " which Decoupled DiLoCo rides out; best_effort: gcloud alpha).")
_SERVICE_ACCOUNT = flags.DEFINE_string("service_account", "", "Service account of the TPU VMs"
                                       " and the syncer VM (default: Compute Engine's default).")
_BUCKET = flags.DEFINE_string("bucket", "", "gs://BUCKET; the mailbox is gs://BUCKET/NAME.")
_BUCKET_LOCATION = flags.DEFINE_string("bucket_location", "", "create --create_bucket: its"
                                       " location (default: the first zone's region).")
_CREATE_BUCKET = flags.DEFINE_bool("create_bucket", False, "create: also create --bucket.")
_SYNCER_HOST = flags.DEFINE_string("syncer_host", "", "Run the syncer on this [user@]host over"
                                   " ssh instead of on a VM NAME-syncer.")
_SYNCER_ZONE = flags.DEFINE_string("syncer_zone", "", "The syncer VM's zone (default: the"
                                   " first learner's).")
_SYNCER_MACHINE_TYPE = flags.DEFINE_string("syncer_machine_type", "e2-standard-4",
                                           "The syncer VM's machine type (CPU only).")
_CONFIG = flags.DEFINE_string("config", "experiments/decoupled_diloco.py:small",
                              "Experiment config, `path.py[:variant]` in the checkout.")
_SET = flags.DEFINE_multi_string("set", [], "Config override for every process,"
                                 " `section.field=value` (passed as --config.section.field).")
_REPO = flags.DEFINE_string("repo", "", "setup: git URL the hosts clone (default: this"
                            " checkout's `origin`).")
_COMMIT = flags.DEFINE_string("commit", "", "setup: commit to install (default: this"
                              " checkout's HEAD, which must be pushed).")
_SECRET_FILE = flags.DEFINE_string("secret_file", "", "The run secret (created with mode 0600"
                                   " if missing; default ~/.config/decoupled_diloco/NAME.secret).")
_LEARNER = flags.DEFINE_integer("learner", None, "Only learner M (create, setup, run, logs,"
                                " stop, delete).")
_SYNCER = flags.DEFINE_bool("syncer", False, "Only the syncer (create, setup, run, logs, stop,"
                            " delete).")
_WORKER = flags.DEFINE_string("worker", "0", "logs: which host of the slice (0 talks to the"
                              " mailbox; `all` for every host).")
_FOLLOW = flags.DEFINE_bool("follow", False, "logs: keep printing (one process only).")
_LINES = flags.DEFINE_integer("lines", 100, "logs: how many last lines.")
_DELETE_MAILBOX = flags.DEFINE_bool("delete_mailbox", False, "delete: also delete gs://B/NAME.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, one a line; run nothing.")
_LOCAL = flags.DEFINE_bool("local", False, "run, status: processes on this machine and a"
                           " file:// mailbox under --workdir stand in for the slices and bucket.")
_WORKDIR = flags.DEFINE_string("workdir", "", "--local: the run's directory (default"
                               " /tmp/decoupled_diloco/NAME).")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 3600.0, "--local: stop every process after this"
                                " many seconds.")


@dataclasses.dataclass(frozen=True)
class Plan:
  """One run on Cloud TPU, resolved from the flags."""
  name: str
  project: str
  zones: tuple[str, ...]  # One per learner.
  accelerator_types: tuple[str, ...]
  runtime_versions: tuple[str, ...]
  provisioning: str
  service_account: str
  bucket: str
  syncer_host: str  # '' for the VM NAME-syncer.
  syncer_zone: str
  syncer_machine_type: str
  spec: common.RunSpec

  @property
  def num_learners(self) -> int:
    return len(self.accelerator_types)

  def node(self, m: int) -> str:
    return f"{self.name}-learner{m}"

  @property
  def syncer_vm(self) -> str:
    return f"{self.name}-syncer"

  @property
  def layout(self) -> common.Layout:
    return common.remote_layout(self.name)


def _per_learner(values, m: int, flag: str) -> tuple[str, ...]:
  values = list(values)
  if len(values) == 1:
    values *= m
  if len(values) != m:
    raise ValueError(f"--{flag} needs one value, or one per learner ({m}: one per"
                     f" --accelerator_types entry); got {len(values)}.")
  return tuple(values)


def _runtime_version(accelerator_type: str) -> str:
  generation = accelerator_type.rsplit("-", 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise ValueError(f"--accelerator_types: no default TPU software version for"
                     f" {accelerator_type!r} (known: {sorted(RUNTIME_VERSIONS)}); give"
                     " --runtime_versions.")
  return RUNTIME_VERSIONS[generation]


def make_plan(local: bool = False) -> Plan:
  """The run the flags describe; ValueError naming the flag if they do not make one."""
  name = _RUN_NAME.value or ""
  if not re.fullmatch(r"[a-z][-a-z0-9]{0,38}[a-z0-9]", name):
    raise ValueError(f"--run_name={name!r}: 2-40 lowercase letters, digits and hyphens,"
                     " starting with a letter (it prefixes Cloud resource names).")
  types = tuple(_ACCELERATOR_TYPES.value)
  if not types:
    raise ValueError("--accelerator_types: one TPU type per learner, e.g. v5p-8,v6e-8.")
  m = len(types)
  if local:
    workdir = _WORKDIR.value or f"/tmp/decoupled_diloco/{name}"
    mailbox = f"file://{os.path.abspath(workdir)}/mailbox"
    zones = versions = ("",) * m
  else:
    for flag, value in (("project", _PROJECT.value), ("zone", _ZONE.value)):
      if not value:
        raise ValueError(f"--{flag} is required (or --local).")
    if not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9]", _BUCKET.value):
      raise ValueError(f"--bucket={_BUCKET.value!r}: gs://BUCKET, a bucket name (3-63"
                       " lowercase letters, digits, -, _, .) without a path; the mailbox is"
                       " gs://BUCKET/NAME.")
    mailbox = f"{_BUCKET.value}/{name}"
    zones = _per_learner(_ZONE.value, m, "zone")
    versions = (_per_learner(_RUNTIME_VERSIONS.value, m, "runtime_versions")
                if _RUNTIME_VERSIONS.value else tuple(map(_runtime_version, types)))
  spec = common.RunSpec(config=_CONFIG.value, mailbox=mailbox, num_learners=m,
                        sets=common.check_sets(_SET.value, m))
  return Plan(name=name, project=_PROJECT.value or "", zones=zones, accelerator_types=types,
              runtime_versions=versions, provisioning=_PROVISIONING.value,
              service_account=_SERVICE_ACCOUNT.value, bucket=_BUCKET.value,
              syncer_host=_SYNCER_HOST.value, syncer_zone=_SYNCER_ZONE.value or zones[0],
              syncer_machine_type=_SYNCER_MACHINE_TYPE.value, spec=spec)


# --- Commands -------------------------------------------------------------------------


def _where(plan: Plan, zone: str) -> list[str]:
  return [f"--project={plan.project}", f"--zone={zone}"]


def _account(plan: Plan) -> list[str]:
  return [f"--service-account={plan.service_account}"] if plan.service_account else []


def tpu_ssh(plan: Plan, m: int, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", plan.node(m), *_where(plan, plan.zones[m]),
          f"--worker={worker}", f"--command={command}"]


def syncer_ssh(plan: Plan, command: str) -> list[str]:
  if plan.syncer_host:
    return ["ssh", plan.syncer_host, command]
  return ["gcloud", "compute", "ssh", plan.syncer_vm, *_where(plan, plan.syncer_zone),
          f"--command={command}"]


def create_commands(plan: Plan, learners, syncer: bool, bucket: bool) -> list[list[str]]:
  cmds = []
  if bucket:
    location = _BUCKET_LOCATION.value or plan.zones[0].rsplit("-", 1)[0]
    cmds.append(["gcloud", "storage", "buckets", "create", plan.bucket,
                 f"--project={plan.project}", f"--location={location}",
                 "--uniform-bucket-level-access"])
  track = ["alpha"] if plan.provisioning == "best_effort" else []
  for m in learners:
    cmds.append(["gcloud", *track, "compute", "tpus", "queued-resources", "create", plan.node(m),
                 f"--node-id={plan.node(m)}", *_where(plan, plan.zones[m]),
                 f"--accelerator-type={plan.accelerator_types[m]}",
                 f"--runtime-version={plan.runtime_versions[m]}",
                 *PROVISIONING[plan.provisioning], *_account(plan), SCOPES])
  if syncer and not plan.syncer_host:
    cmds.append(["gcloud", "compute", "instances", "create", plan.syncer_vm,
                 *_where(plan, plan.syncer_zone), f"--machine-type={plan.syncer_machine_type}",
                 "--image-family=debian-12", "--image-project=debian-cloud", *_account(plan),
                 SCOPES])
  return cmds


def setup_commands(plan: Plan, learners, syncer: bool, repo: str, commit: str,
                   secret_file: str) -> tuple[list[list[str]], list[list[str]]]:
  """(installs, key copies): each list runs in parallel, the copies after the installs.

  Learner m's hosts get its credential only; the syncer's host gets the secret.
  """
  layout, installs, copies = plan.layout, [], []
  for m in learners:
    installs.append(tpu_ssh(plan, m, common.install(layout, repo, commit, "tpu")))
    copies.append(["gcloud", "compute", "tpus", "tpu-vm", "scp",
                   common.key_file(secret_file, m), f"{plan.node(m)}:{layout.key(m)}",
                   *_where(plan, plan.zones[m]), "--worker=all"])
  if syncer:
    installs.append(syncer_ssh(plan, common.install(layout, repo, commit, "")))
    if plan.syncer_host:
      copies.append(["scp", secret_file, f"{plan.syncer_host}:{layout.secret()}"])
    else:
      copies.append(["gcloud", "compute", "scp", secret_file,
                     f"{plan.syncer_vm}:{layout.secret()}", *_where(plan, plan.syncer_zone)])
  return installs, copies


def learner_process(plan: Plan, layout: common.Layout, m: int, local: bool) -> common.Process:
  # On a TPU slice jax.distributed.initialize() finds its peers itself (one slice).
  return plan.spec.learner(layout, m, distributed=() if local else ("--distributed",))


def run_commands(plan: Plan, learners, syncer: bool) -> list[list[str]]:
  layout = plan.layout
  cmds = [syncer_ssh(plan, common.start(layout, plan.spec.syncer(layout)))] if syncer else []
  for m in learners:
    cmds.append(tpu_ssh(plan, m, common.start(layout, learner_process(plan, layout, m, False))))
  return cmds


def stop_commands(plan: Plan, learners, syncer: bool) -> list[list[str]]:
  layout = plan.layout
  cmds = [syncer_ssh(plan, common.stop(layout, "syncer"))] if syncer else []
  return cmds + [tpu_ssh(plan, m, common.stop(layout, f"learner{m}")) for m in learners]


def logs_commands(plan: Plan, learners, syncer: bool, worker: str, lines: int,
                  follow: bool) -> list[list[str]]:
  layout = plan.layout
  cmds = [syncer_ssh(plan, common.tail(layout, "syncer", lines, follow))] if syncer else []
  return cmds + [tpu_ssh(plan, m, common.tail(layout, f"learner{m}", lines, follow), worker)
                 for m in learners]


def delete_commands(plan: Plan, learners, syncer: bool, mailbox: bool) -> list[list[str]]:
  track = ["alpha"] if plan.provisioning == "best_effort" else []
  cmds = [["gcloud", *track, "compute", "tpus", "queued-resources", "delete", plan.node(m),
           *_where(plan, plan.zones[m]), "--force", "--quiet"] for m in learners]
  if syncer and not plan.syncer_host:
    cmds.append(["gcloud", "compute", "instances", "delete", plan.syncer_vm,
                 *_where(plan, plan.syncer_zone), "--quiet"])
  if mailbox:
    cmds.append(["gcloud", "storage", "rm", "--recursive", plan.spec.mailbox])
  return cmds


def local_commands(plan: Plan, run_dir: str) -> dict[str, str]:
  """`run --local`: each process's command, as a TPU host would run it, for this machine."""
  layout = common.local_layout(run_dir)
  procs = [plan.spec.syncer(layout)]
  procs += [learner_process(plan, layout, m, True) for m in range(plan.num_learners)]
  return {p.name: common.foreground(layout, p) for p in procs}


# --- Subcommands ----------------------------------------------------------------------


def _targets(plan: Plan) -> tuple[list[int], bool]:
  """(learners, syncer) the subcommand acts on: all, or --learner=M, or --syncer."""
  if _LEARNER.value is not None and _SYNCER.value:
    raise ValueError("--learner and --syncer: give one, or neither for every process.")
  if _LEARNER.value is not None:
    if not 0 <= _LEARNER.value < plan.num_learners:
      raise ValueError(f"--learner={_LEARNER.value}: learners are 0..{plan.num_learners - 1}.")
    return [_LEARNER.value], False
  if _SYNCER.value:
    return [], True
  return list(range(plan.num_learners)), True


def _secret_file(plan: Plan) -> str:
  return os.path.expanduser(_SECRET_FILE.value or
                            f"~/.config/decoupled_diloco/{plan.name}.secret")


def _local(plan: Plan, command: str, shell: common.Shell) -> int:
  run_dir = os.path.abspath(_WORKDIR.value or f"/tmp/decoupled_diloco/{plan.name}")
  secret = common.local_layout(run_dir).secret()
  if command == "status":
    shell.note(f"reads the mailbox {plan.spec.mailbox} with the secret in {secret}")
    if not shell.dry_run:
      _print_status(plan, common.read_secret(secret))
    return 0
  commands = local_commands(plan, run_dir)
  key_files = {m: common.local_layout(run_dir).key(m) for m in range(plan.num_learners)}
  shell.note(f"write a random run secret to {secret} (mode 0600) unless it exists,"
             f" and learner M's credential to {run_dir}/learnerM.key")
  if shell.dry_run:
    for cmd in commands.values():
      print(shlex.join(["sh", "-c", cmd]), file=shell.out)
    return 0
  common.ensure_secret(secret)
  common.write_keys(common.read_secret(secret), key_files)
  return common.run_local(commands, log_dir=os.path.join(run_dir, "logs"),
                          timeout_s=_TIMEOUT_S.value)


def _print_status(plan: Plan, secret: str) -> None:
  fragments = int(common.config_field(plan.spec.config, plan.spec.sets, "diloco.num_fragments"))
  print("\n".join(common.status_lines(plan.spec.mailbox, secret, fragments, plan.num_learners)))


def check_numbers() -> None:
  """Every number among the flags, in range; ValueError naming the flag."""
  common.check_range("timeout_s", _TIMEOUT_S.value, 0, above=True)
  common.check_range("lines", _LINES.value, 1)
  if not re.fullmatch(r"all|\d+", _WORKER.value):
    raise ValueError(f"--worker={_WORKER.value}: a host's index in its slice (0, 1, ...) or"
                     " `all`.")


def main(argv) -> int:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    sys.exit(f"usage: python -m launch.tpu {{{','.join(SUBCOMMANDS)}}} [flags]; see --help.")
  command, shell = argv[1], common.Shell(_DRY_RUN.value)
  try:
    check_numbers()
    if _LOCAL.value and command not in ("run", "status"):
      raise ValueError(f"--local stands in for the slices in `run` and `status`, not"
                       f" `{command}`.")
    plan = make_plan(local=_LOCAL.value)
    if _LOCAL.value:
      return _local(plan, command, shell)
    learners, syncer = _targets(plan)
    if command == "create":
      shell.run(create_commands(plan, learners, syncer, _CREATE_BUCKET.value))
    elif command == "setup":
      secret = _secret_file(plan)
      common.setup(shell, secret, learners, _REPO.value, _COMMIT.value,
                   lambda repo, commit: setup_commands(plan, learners, syncer, repo, commit,
                                                       secret))
    elif command == "run":
      common.start_run(shell, run_commands(plan, learners, syncer), syncer)
    elif command == "status":
      shell.note(f"reads the mailbox {plan.spec.mailbox}; touches no TPU")
      if not shell.dry_run:
        _print_status(plan, common.read_secret(_secret_file(plan)))
    elif command == "logs":
      common.check_follow(_FOLLOW.value, learners, syncer)
      shell.run(logs_commands(plan, learners, syncer, _WORKER.value, _LINES.value,
                              _FOLLOW.value))
    elif command == "stop":
      shell.run(stop_commands(plan, learners, syncer), parallel=True)
    elif command == "delete":
      shell.run(delete_commands(plan, learners, syncer, _DELETE_MAILBOX.value), parallel=True)
  except ValueError as e:
    sys.exit(f"error: {e}")
  return 0


if __name__ == "__main__":
  app.run(main)
