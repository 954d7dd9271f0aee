"""Launchers (launch/): what `--dry_run` prints for TPU slices, GPU hosts and Slurm.

The printed commands are checked as a user would paste them (shlex-split),
and the per-host command is run in a sandbox home with a fake interpreter, so
the tests see what a host would do: the syncer gets the run secret and learner
M only its credential, through their environment; no MEGASCALE_* variable
reaches them; the flags are right. The end-to-end
test runs `launch/tpu.py run --local` (two learners and a syncer on this
machine) and checks that it trains.
"""

import json
import math
import os
import re
import shlex
import stat
import subprocess
import sys
import time

import pytest

from decoupled_diloco.runtime.dist import keys
from launch import common, gpu, local
from tests import helpers

SECRET = "file-s3cret-never-printed-1234"
ENV_SECRET = "env-s3cret-never-printed-5678"
TPU = ["--run_name=dd1", "--project=my-proj", "--zone=us-east5-a,us-east1-d",
       "--accelerator_types=v5p-8,v6e-8", "--bucket=gs://my-bucket", "--set=train.steps=1000"]


def launch(tool: str, *args, returncode: int = 0) -> str:
  """`python -m launch.TOOL ARGS` with a secret in its environment; its stdout."""
  env = {**os.environ, common.SECRET_ENV: ENV_SECRET}
  got = subprocess.run([sys.executable, "-m", f"launch.{tool}", *args], cwd=common.REPO, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
  assert got.returncode == returncode, got.stderr
  credentials = [keys.learner_credential(s.encode(), m) for s in (SECRET, ENV_SECRET)
                 for m in range(3)]
  for text in (got.stdout, got.stderr):
    assert SECRET not in text and ENV_SECRET not in text
    assert not any(c.split(":")[1] in text for c in credentials)
    # The only assignments of the secret and of a learner's key read them from a file.
    assert not re.search(r'DILOCO_(SECRET|KEY)=(?!"\$\(cat )', text)
  return got.stdout if returncode == 0 else got.stderr


def commands(stdout: str) -> list[list[str]]:
  """The printed commands as the shell would split them (comments dropped)."""
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def flag(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def main_args(remote: str) -> list[str]:
  """The flags of `decoupled_diloco.main` inside a host's shell command."""
  words = shlex.split(remote.replace(";", " ; "))
  start = words.index("decoupled_diloco.main") + 1
  return words[start:words.index(">", start) if ">" in words[start:] else None]


# --- Cloud TPU ------------------------------------------------------------------------


def test_tpu_create_requests_one_queued_resource_per_mixed_slice():
  cmds = commands(launch("tpu", "create", *TPU, "--provisioning=spot", "--create_bucket",
                         "--dry_run"))
  assert [c[:4] for c in cmds] == [["gcloud", "storage", "buckets", "create"]] + [
      ["gcloud", "compute", "tpus", "queued-resources"]] * 2 + [
      ["gcloud", "compute", "instances", "create"]]
  bucket, qr0, qr1, vm = cmds
  assert bucket[4] == "gs://my-bucket" and flag(bucket, "location") == "us-east5"
  assert "--uniform-bucket-level-access" in bucket
  for m, (qr, zone, kind, version) in enumerate([(qr0, "us-east5-a", "v5p-8", "v2-alpha-tpuv5"),
                                                (qr1, "us-east1-d", "v6e-8", "v2-alpha-tpuv6e")]):
    assert qr[5] == flag(qr, "node-id") == f"dd1-learner{m}"
    assert (flag(qr, "zone"), flag(qr, "accelerator-type"), flag(qr, "runtime-version")) == (
        zone, kind, version)
    assert flag(qr, "project") == "my-proj" and "--spot" in qr
    assert not any(a.startswith("--node-count") for a in qr)  # Not a multislice.
  assert vm[4] == "dd1-syncer" and flag(vm, "zone") == "us-east5-a"
  assert flag(vm, "scopes") == "https://www.googleapis.com/auth/cloud-platform"


def test_tpu_run_starts_the_syncer_then_every_host_of_every_slice():
  cmds = commands(launch("tpu", "run", *TPU, "--dry_run"))
  assert len(cmds) == 3
  syncer, *learners = cmds
  assert syncer[:4] == ["gcloud", "compute", "ssh", "dd1-syncer"]
  assert flag(main_args(flag(syncer, "command")), "role") == "syncer"
  assert 'DILOCO_SECRET="$(cat ../secret)"' in flag(syncer, "command")
  assert "DILOCO_KEY=" not in flag(syncer, "command")
  for m, (cmd, zone) in enumerate(zip(learners, ["us-east5-a", "us-east1-d"])):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", f"dd1-learner{m}"]
    assert (flag(cmd, "zone"), flag(cmd, "worker")) == (zone, "all")
    remote = flag(cmd, "command")
    args = main_args(remote)
    assert flag(args, "role") == "learner" and flag(args, "learner") == str(m)
    assert flag(args, "mailbox") == "gs://my-bucket/dd1"
    assert flag(args, "workdir") == f"../work/learner{m}"
    assert "--distributed" in args  # jax.distributed inside the slice, no arguments.
    assert "--config.diloco.num_learners=2" in args and "--config.train.steps=1000" in args
    assert common.DROP_MEGASCALE in remote
    # Its own credential only; never the run secret.
    assert f'DILOCO_KEY="$(cat ../learner{m}.key)"' in remote
    assert "unset DILOCO_SECRET" in remote and "DILOCO_SECRET=" not in remote


def test_tpu_run_one_learner_restarts_only_that_learner():
  cmds = commands(launch("tpu", "run", *TPU, "--learner=1", "--dry_run"))
  assert len(cmds) == 1 and cmds[0][5] == "dd1-learner1"
  assert flag(main_args(flag(cmds[0], "command")), "learner") == "1"
  recreate = commands(launch("tpu", "create", *TPU, "--learner=1", "--dry_run"))
  assert [c[5] for c in recreate] == ["dd1-learner1"]


def test_tpu_setup_installs_the_commit_and_copies_each_host_its_key(tmp_path):
  secret = tmp_path / "run.secret"
  secret.write_text(SECRET)
  secret.chmod(0o600)
  cmds = commands(launch("tpu", "setup", *TPU, "--repo=https://example.com/dd.git",
                         "--commit=0123abc", f"--secret_file={secret}", "--dry_run"))
  installs, copies = cmds[:3], cmds[3:]
  for m in range(2):
    remote = flag(installs[m], "command")
    assert flag(installs[m], "worker") == "all"
    assert "git checkout --quiet --force 0123abc" in remote and "'.[tpu]'" in remote
    # Learner m's hosts: its credential, never the secret.
    assert copies[m] == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                         str(tmp_path / f"run.learner{m}.key"),
                         f"dd1-learner{m}:diloco/dd1/learner{m}.key", "--project=my-proj",
                         f"--zone={['us-east5-a', 'us-east1-d'][m]}", "--worker=all"]
  assert installs[2][:4] == ["gcloud", "compute", "ssh", "dd1-syncer"]
  assert flag(installs[2], "command").endswith("-e .")  # CPU jax for the syncer.
  assert copies[2] == ["gcloud", "compute", "scp", str(secret), "dd1-syncer:diloco/dd1/secret",
                       "--project=my-proj", "--zone=us-east5-a"]
  assert not list(tmp_path.glob("*.key"))  # A dry run writes nothing.


def test_tpu_stop_logs_delete_status():
  stop = commands(launch("tpu", "stop", *TPU, "--dry_run"))
  assert [c[3] if c[2] == "ssh" else c[5] for c in stop] == [
      "dd1-syncer", "dd1-learner0", "dd1-learner1"]
  logs = commands(launch("tpu", "logs", *TPU, "--learner=0", "--follow", "--dry_run"))
  assert flag(logs[0], "worker") == "0"
  assert flag(logs[0], "command") == "tail -n100 -F diloco/dd1/logs/learner0.log"
  assert "--follow follows one process" in launch("tpu", "logs", *TPU, "--follow", "--dry_run",
                                                  returncode=1)
  delete = commands(launch("tpu", "delete", *TPU, "--delete_mailbox", "--dry_run"))
  assert delete == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "dd1-learner0",
       "--project=my-proj", "--zone=us-east5-a", "--force", "--quiet"],
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "dd1-learner1",
       "--project=my-proj", "--zone=us-east1-d", "--force", "--quiet"],
      ["gcloud", "compute", "instances", "delete", "dd1-syncer", "--project=my-proj",
       "--zone=us-east5-a", "--quiet"],
      ["gcloud", "storage", "rm", "--recursive", "gs://my-bucket/dd1"]]
  assert commands(launch("tpu", "status", *TPU, "--dry_run")) == []  # Reads, runs nothing.


@pytest.mark.parametrize("args, message", [
    (["--zone=a-b-c,a-b-d,a-b-e"], "--zone needs one value, or one per learner"),
    (["--bucket=gs://b/path"], "--bucket"),
    (["--accelerator_types=v5p-8,v9z-8"], "no default TPU software version for 'v9z-8'"),
    (["--set=diloco.num_learners=3"], "contradicts the launcher's 2 learners"),
    (["--set=steps"], "section.field=value"),
    (["--run_name=Bad_Name"], "--run_name"),
    (["--learner=2"], "learners are 0..1"),
    (["--timeout_s=0"], "--timeout_s=0.0: must be above 0."),
    (["--lines=0"], "--lines=0: must be at least 1."),
    (["--worker=-1"], "--worker=-1: a host's index"),
])
def test_tpu_flag_mistakes_get_one_sentence(args, message):
  assert message in launch("tpu", "run", *TPU, *args, "--dry_run", returncode=1)


def test_tpu_host_command_runs_the_learner_with_its_key_in_its_environment(tmp_path):
  """The printed per-host command, run by sh in a fake home as gcloud ssh would run it."""
  [cmd] = commands(launch("tpu", "run", *TPU, "--learner=1", "--dry_run"))
  start = flag(cmd, "command")
  [stop] = commands(launch("tpu", "stop", *TPU, "--learner=1", "--dry_run"))
  run_dir = tmp_path / "diloco" / "dd1"
  python = run_dir / "src" / ".venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  # Records what it was given, then runs until stopped (its command line names
  # decoupled_diloco, as the real one's does).
  python.write_text('#!/bin/sh\nenv > "$HOME/env.txt"\nprintf "%s\\n" "$@" > "$HOME/argv.txt"\n'
                    "while :; do sleep 0.1; done\n")
  python.chmod(0o755)
  credential = keys.learner_credential(SECRET.encode(), 1)
  (run_dir / "secret").write_text(SECRET)  # As if the syncer shared the host.
  (run_dir / "learner1.key").write_text(credential)
  host_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
              "MEGASCALE_COORDINATOR_ADDRESS": "stale:8080", "MEGASCALE_SLICE_ID": "3",
              common.SECRET_ENV: SECRET}  # E.g. from the host's profile: dropped.
  sh = lambda command: subprocess.run(["sh", "-c", command], cwd=tmp_path, env=host_env,
                                      capture_output=True, text=True, timeout=30, check=False)
  assert sh(start).returncode == 0
  for _ in range(100):
    if (tmp_path / "argv.txt").exists():
      break
    time.sleep(0.05)
  time.sleep(0.1)
  env = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines()
             if "=" in line)
  assert env[common.KEY_ENV] == credential and common.SECRET_ENV not in env
  assert not [k for k in env if k.startswith("MEGASCALE_")]
  argv = (tmp_path / "argv.txt").read_text().splitlines()
  assert argv == ["-m", "decoupled_diloco.main", *main_args(start)]
  pid = int((run_dir / "logs" / "learner1.pid").read_text())
  again = sh(start)  # A second copy would share the workdir: refused.
  assert again.returncode == 1 and "learner1 is already running" in again.stderr
  assert sh(flag(stop, "command")).returncode == 0
  for _ in range(100):
    if not os.path.exists(f"/proc/{pid}") or "Z" in _state(pid):
      break
    time.sleep(0.05)
  assert not os.path.exists(f"/proc/{pid}") or "Z" in _state(pid)
  assert not (run_dir / "logs" / "learner1.pid").exists()


def _state(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except OSError:
    return "gone"


# --- Local processes ------------------------------------------------------------------


def test_tpu_run_local_runs_the_same_learner_command_here(tmp_path):
  local = commands(launch("tpu", "run", *TPU, "--local", f"--workdir={tmp_path}", "--dry_run"))
  remote = commands(launch("tpu", "run", *TPU, "--dry_run"))
  assert [c[:2] for c in local] == [["sh", "-c"]] * 3
  for here, there in zip(local, remote):
    args, remote_args = main_args(here[2]), main_args(flag(there, "command"))
    assert flag(args, "mailbox") == f"file://{tmp_path}/mailbox"
    assert flag(args, "workdir").startswith(f"{tmp_path}/work/")
    strip = lambda a: [x for x in a if x.split("=")[0] not in
                       ("--mailbox", "--workdir", "--distributed")]
    assert strip(args) == strip(remote_args)
    if flag(args, "role") == "syncer":
      assert f'DILOCO_SECRET="$(cat {tmp_path}/secret)"' in here[2]
    else:
      assert f'DILOCO_KEY="$(cat {tmp_path}/learner{flag(args, "learner")}.key)"' in here[2]
      assert "DILOCO_SECRET=" not in here[2]
    assert common.DROP_MEGASCALE in here[2]


def test_local_runner_prefixes_output_and_stops_everyone(tmp_path):
  out = tmp_path / "out.txt"
  with open(out, "w") as f:
    rc = common.run_local({"syncer": "echo merging; sleep 0.5; echo done",
                           "learner0": "echo step 1", "learner1": "sleep 0.3; echo step 2"},
                          log_dir=str(tmp_path / "logs"), timeout_s=30, out=f)
  assert rc == 0
  lines = set(out.read_text().splitlines())
  assert {"[syncer] merging", "[learner0] step 1", "[learner1] step 2", "[syncer] done"} <= lines
  assert (tmp_path / "logs" / "learner1.log").read_text() == "step 2\n"
  # The learners are done but the syncer is not: it gets its grace, then the run fails,
  # as it does when the syncer fails at the end (no final evaluation).
  for cmd, grace_s, want in (("sleep 60", 0.5, 124), ("sleep 0.3; exit 6", 30, 6)):
    with open(out, "w") as f:
      assert common.run_local({"syncer": cmd, "learner0": "true"}, log_dir=str(tmp_path / "logs"),
                              timeout_s=30, syncer_grace_s=grace_s, out=f) == want
  pid_file = tmp_path / "pid"
  with open(out, "w") as f:
    rc = common.run_local({"syncer": f"echo $$ > {pid_file}; exec sleep 60",
                           "learner0": "sleep 60"},
                          log_dir=str(tmp_path / "logs"), timeout_s=1, out=f)
  assert rc == 124  # Timed out; every child stopped.
  assert _state(int(pid_file.read_text())) in ("gone", "Z")
  with open(out, "w") as f:
    assert common.run_local({"learner0": "exit 3", "learner1": "sleep 60"},
                            log_dir=str(tmp_path / "logs"), timeout_s=30, out=f) == 3


def test_launch_local_gives_learners_their_credential_and_the_syncer_the_secret(
    tmp_path, monkeypatch):
  monkeypatch.setenv(common.SECRET_ENV, "a secret this shell happens to hold")
  monkeypatch.setenv(common.KEY_ENV, "a stale credential")
  run = local.LocalRun(str(tmp_path), "unused.json", 2, echo=False)
  secret = (tmp_path / "secret").read_text()
  assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
  assert run.syncer.env[common.SECRET_ENV] == secret and common.KEY_ENV not in run.syncer.env
  for m, learner in enumerate(run.learners):
    assert learner.env[common.KEY_ENV] == keys.learner_credential(secret.encode(), m)
    assert common.SECRET_ENV not in learner.env
    assert not any(secret in arg for arg in learner.args)


def test_secret_file_is_private_and_read_as_the_hosts_read_it(tmp_path, monkeypatch):
  monkeypatch.delenv(common.SECRET_ENV, raising=False)
  path = tmp_path / "dir" / "secret"
  common.ensure_secret(str(path))
  assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(common.read_secret(str(path))) == 64
  path.chmod(0o644)
  with pytest.raises(ValueError, match="readable by others"):
    common.ensure_secret(str(path))


def test_learner_key_files_hold_one_credential_each(tmp_path):
  paths = {m: str(tmp_path / "keys" / f"learner{m}.key") for m in (0, 1)}
  common.write_keys(SECRET, paths)
  for m, path in paths.items():
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
      text = f.read()
    assert text == keys.learner_credential(SECRET.encode(), m) and SECRET not in text
    assert keys.Keyring.from_credential(text).learner == m
  before = os.stat(paths[0]).st_mtime_ns
  common.write_keys(SECRET, paths)  # Already there: untouched.
  assert os.stat(paths[0]).st_mtime_ns == before
  assert common.key_file("/x/dd1.secret", 2) == "/x/dd1.learner2.key"


# --- GPU hosts and Slurm --------------------------------------------------------------


HOSTS = "# learner 0 on one host, learner 1 on two\ngpu-a1\nme@gpu-b1  gpu-b2  # two hosts\n"


def test_gpu_hosts_file_one_process_per_host_with_jax_distributed(tmp_path):
  hosts = tmp_path / "hosts.txt"
  hosts.write_text(HOSTS)
  gpu_flags = ["--run_name=g1", f"--hosts_file={hosts}", "--syncer_host=cpu-1",
               "--mailbox=gs://b/g1"]
  cmds = commands(launch("gpu", "run", *gpu_flags, "--dry_run"))
  assert [c[:2] for c in cmds] == [["ssh", "cpu-1"], ["ssh", "gpu-a1"], ["ssh", "me@gpu-b1"],
                                   ["ssh", "gpu-b2"]]
  args = [main_args(c[2]) for c in cmds]
  assert flag(args[0], "role") == "syncer"
  assert "--distributed" not in args[1] and flag(args[1], "learner") == "0"
  for i in (0, 1):
    a = args[2 + i]
    assert flag(a, "learner") == "1" and "--distributed" in a
    assert flag(a, "coordinator_address") == "gpu-b1:8476"  # Host name, without the user.
    assert (flag(a, "num_processes"), flag(a, "process_id")) == ("2", str(i))
  assert all(flag(a, "mailbox") == "gs://b/g1" for a in args)
  assert all(common.DROP_MEGASCALE in c[2] for c in cmds)
  setup = commands(launch("gpu", "setup", *gpu_flags, "--repo=R", "--commit=C", "--dry_run"))
  installs, copies = setup[:4], setup[4:]
  assert [c[:2] for c in installs] == [["ssh", h] for h in ("gpu-a1", "me@gpu-b1", "gpu-b2",
                                                            "cpu-1")]
  assert ["'.[cuda]'" in c[2] for c in installs] == [True, True, True, False]
  home = os.path.expanduser("~/.config/decoupled_diloco")
  assert copies == [["scp", f"{home}/g1.learner0.key", "gpu-a1:diloco/g1/learner0.key"],
                    ["scp", f"{home}/g1.learner1.key", "me@gpu-b1:diloco/g1/learner1.key"],
                    ["scp", f"{home}/g1.learner1.key", "gpu-b2:diloco/g1/learner1.key"],
                    ["scp", f"{home}/g1.secret", "cpu-1:diloco/g1/secret"]]
  restart = commands(launch("gpu", "run", *gpu_flags, "--learner=1", "--dry_run"))
  assert [c[1] for c in restart] == ["me@gpu-b1", "gpu-b2"]


@pytest.mark.parametrize("args, message", [
    (["--gpus_per_node=0"], "--gpus_per_node=0: must be at least 1."),
    (["--nodes_per_learner=0"], "--nodes_per_learner=0: must be at least 1."),
    (["--num_learners=-1"], "--num_learners=-1: must be at least 1."),
    (["--coordinator_port=70000"], "--coordinator_port=70000: must be at least 1 and at most"
     " 65535."),
])
def test_gpu_number_mistakes_get_one_sentence(args, message):
  err = launch("gpu", "slurm", "--run_name=g1", "--mailbox=gs://b/g1", *args, "--dry_run",
               returncode=1)
  assert err == f"error: {message}\n"


def test_gpu_hosts_file_mistakes(tmp_path):
  hosts = tmp_path / "hosts.txt"
  hosts.write_text("a b\nb\n")
  with pytest.raises(ValueError, match="lists b more than once"):
    gpu.read_hosts(str(hosts))
  hosts.write_text("# nothing\n\n")
  with pytest.raises(ValueError, match="lists no learner"):
    gpu.read_hosts(str(hosts))


def test_slurm_scripts_run_one_learner_per_job(tmp_path):
  """The generated scripts, run with a fake scontrol, srun and interpreter."""
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "scontrol").write_text('#!/bin/sh\nprintf "node-a\\nnode-b\\n"\n')
  # Runs the step's command once per node, as Slurm would on each node.
  (fake / "srun").write_text('#!/bin/sh\nshift\nfor i in 0 1; do SLURM_NTASKS=2 SLURM_PROCID=$i'
                             ' "$@" || exit 1; done\n')
  # Records its arguments, and its key (with the secret, which it must not have, after it).
  (fake / "python").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv.$SLURM_PROCID\n'
                               f'echo "$DILOCO_KEY${{DILOCO_SECRET-}}"'
                               f' > {tmp_path}/key.$SLURM_PROCID\n')
  for f in fake.iterdir():
    f.chmod(0o755)
  workdir = tmp_path / "run"
  out = launch("gpu", "slurm", "--run_name=g1", "--num_learners=2", "--nodes_per_learner=2",
               "--mailbox=gs://b/g1", f"--workdir={workdir}", f"--python={fake}/python",
               "--partition=gpu", "--dry_run")
  scripts = dict(re.findall(r"cat > (\S+) <<'EOF'\n(.*?)EOF\n", out, re.S))
  assert sorted(os.path.basename(p) for p in scripts) == [
      "learner0.sbatch", "learner1.sbatch", "syncer.sbatch"]
  assert [c for c in commands(re.sub(r"cat > .*?EOF\n", "", out, flags=re.S))] == [
      ["mkdir", "-p", f"{workdir}/logs", f"{workdir}/slurm"]] + [
      ["sbatch", p] for p in scripts]
  learner1 = scripts[f"{workdir}/slurm/learner1.sbatch"]
  for directive in ("--job-name=g1-learner1", "--nodes=2", "--ntasks-per-node=1",
                    "--gpus-per-node=8", "--partition=gpu",
                    f"--output={workdir}/logs/learner1-%j.log"):
    assert f"#SBATCH {directive}\n" in learner1
  assert "--gpus-per-node" not in scripts[f"{workdir}/slurm/syncer.sbatch"]
  workdir.mkdir()
  (workdir / "secret").write_text(SECRET)
  (workdir / "learner1.key").write_text(keys.learner_credential(SECRET.encode(), 1))
  path = tmp_path / "learner1.sbatch"
  path.write_text(learner1)
  env = {"PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(tmp_path),
         "SLURM_JOB_NODELIST": "node-[a-b]", "MEGASCALE_SLICE_ID": "1",
         common.SECRET_ENV: SECRET}  # Dropped: a learner gets its credential only.
  got = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30,
                       check=False)
  assert got.returncode == 0, got.stderr
  for i in (0, 1):
    argv = (tmp_path / f"argv.{i}").read_text().splitlines()
    assert argv[:2] == ["-m", "decoupled_diloco.main"]
    assert flag(argv, "learner") == "1" and "--distributed" in argv
    assert flag(argv, "coordinator_address") == "node-a:8476"
    assert (flag(argv, "num_processes"), flag(argv, "process_id")) == ("2", str(i))
    assert flag(argv, "workdir") == f"{workdir}/work/learner1"
    assert (tmp_path / f"key.{i}").read_text() == (
        keys.learner_credential(SECRET.encode(), 1) + "\n")


# --- Status and an end-to-end run -----------------------------------------------------


def test_status_reads_leases_and_versions_from_the_mailbox():
  mailbox_lib = pytest.importorskip("decoupled_diloco.runtime.dist.mailbox")
  distributed = pytest.importorskip("decoupled_diloco.runtime.dist.learner")
  url = "memory://launch-status"
  box = mailbox_lib.Mailbox(url, SECRET.encode())
  box.acquire(distributed.SYNCER_LEASE, "syncer-host:12", 60.0)
  box.acquire(distributed.learner_lease(0), "tpu-0:7", 60.0,
              {"step": 42, "step_seconds": 0.25, "status": "running"})
  lines = common.status_lines(url, SECRET, num_fragments=2, num_learners=2)
  assert lines[0] == f"mailbox {url}"
  assert lines[1].startswith("syncer: live (holder syncer-host:12, epoch 1")
  assert lines[2:4] == ["fragment 0: no version published", "fragment 1: no version published"]
  assert lines[4].startswith("learner 0: live, step 42, 0.250 s/step (lease expires in")
  assert lines[5] == "learner 1: never seen"


# tests/helpers.tiny_config and decoupled_config, as --set flags.
TINY = [f"data.path={helpers.CORPUS}", "model.num_layers=1", "model.d_model=64",
        "model.num_heads=2", "model.mlp_dim=128", "model.seq_len=32", "data.batch_size=16",
        "train.steps=12", "train.log_every=5", "train.eval_every=0", "train.eval_batches=2",
        "train.checkpoint_every=0", "inner.warmup_steps=2", "diloco.sync_every=3",
        "diloco.num_fragments=1"]


@pytest.mark.slow
def test_tpu_run_local_trains_two_learners_and_a_syncer(tmp_path):
  args = ["run", "--local", "--run_name=e2e", "--accelerator_types=v5p-8,v6e-8",
          f"--workdir={tmp_path}", "--config=experiments/decoupled_diloco.py:nochaos",
          "--timeout_s=1200", *(f"--set={s}" for s in TINY)]
  env = {k: v for k, v in os.environ.items() if k != common.SECRET_ENV}
  got = subprocess.run([sys.executable, "-m", "launch.tpu", *args], cwd=common.REPO, env=env,
                       capture_output=True, text=True, timeout=1500, check=False)
  assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-4000:]
  for m in (0, 1):
    assert f"[learner{m}]" in got.stdout
    with open(tmp_path / "work" / f"learner{m}" / "summary.json") as f:
      assert json.load(f)["steps"] == 12
  published = os.listdir(tmp_path / "mailbox" / "down" / "0")
  assert published, "the syncer published no version"
  with open(tmp_path / "work" / "syncer" / "summary.json") as f:  # It evaluated the global model.
    assert math.isfinite(json.load(f)["final_eval_loss"])
  secret = common.read_secret(str(tmp_path / "secret"))
  assert secret not in got.stdout and secret not in got.stderr
  for m in (0, 1):  # What the learners ran with: their own credential, private.
    key = tmp_path / f"learner{m}.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text() == keys.learner_credential(secret.encode(), m)
