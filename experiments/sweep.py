r"""Runs a sweep: every (cell, seed) as its own process, resumably, in parallel.

  python -m experiments.sweep --sweep=experiments/ablations/precision.py --workdir=DIR \
      [--seeds=0,1,2,3] [--jobs=2] [--timeout_s=3600] [--set=train.steps=100]

A sweep file (`experiments/ablations/*.py`) has `get_config(arg)` returning the
ConfigDict that `make_sweep` builds: cells (a name, an experiment config
`path.py:variant` and dotted overrides), the reference cell, default seeds,
and what the report shows and checks. Each (cell, seed) runs

  python -m <program> --config=<config> --workdir=DIR/<cell>/seed_<s> \
      --config.seed=<s> --config.<override>=<value> ...

(`decoupled_diloco.main` for training cells, `experiments.ablations.analytic`
for compute-free ones) with its output in `log.txt` next to its results.

Resuming: a run is finished when its `summary.json` exists, has the expected
step count and was written by the same resolved config; finished runs are
skipped. Any other run is started with the same command, which resumes from
its own latest checkpoint. A run whose summary holds a different config is
reported as stale and left alone (delete its folder to rerun it).

The runner writes `DIR/sweep.json` (the sweep, resolved, for the report) and
`DIR/runs.json` (status and wall time of every run of the last invocation).
A run that fails or times out is reported at the end; the others go on. Exit
status 1 if any run did not finish. Then: `python -m experiments.report DIR`.
"""

import ctypes
import dataclasses
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PROGRAM = "decoupled_diloco.main"

# --- sweep descriptions ---------------------------------------------------------------


def cell(name: str, config: str, overrides: dict | None = None,
         program: str = TRAIN_PROGRAM) -> dict:
  """One row of a sweep: `config` (`path.py:variant`) with dotted `overrides`."""
  return {"name": name, "config": config, "program": program,
          "overrides": dict(overrides or {})}


def make_sweep(*, name: str, title: str, cells: list[dict], reference: str,
               seeds=(0,), timeout_s: float = 1800.0, metric: str = "final_eval_loss",
               higher_is_better: bool = False, seed_fields=("seed",), columns=(),
               figures=(), checks=(), timeline_cell: str = "", notes: str = "",
               commands: str = "") -> ml_collections.ConfigDict:
  """The ConfigDict a sweep file's `get_config` returns.

  Args:
    name: short name (file names in the report).
    title: a heading for the report.
    cells: `cell(...)` rows; names unique.
    reference: the cell the report compares every other row with.
    seeds: default seeds (`--seeds` overrides).
    timeout_s: default wall-clock limit of one run.
    metric: the summary field the table ranks by (mean +- s.e., change vs reference).
    higher_is_better: for `metric` (goodput: True; loss: False).
    seed_fields: config fields that move with a run's seed: a name (set to the
      seed) or `(name, offset)` (set to seed + offset), e.g. `("chaos.seed", 1)`
      gives every seed its own failure draw, seed 0 the config's own.
    columns: extra summary fields the table shows (see experiments/report.py).
    figures: figure kinds the report draws (see experiments/report.py).
    checks: the paper's claims as dicts (see experiments/report.py).
    timeline_cell: the cell whose `events.jsonl` the timeline figure draws.
    notes: a paragraph for the report (what the cells hold fixed, caveats).
    commands: how to run the sweep, for the report's header.
  """
  names = [c["name"] for c in cells]
  if len(set(names)) != len(names):
    raise ValueError(f"cell names must be unique; got {names}.")
  if reference not in names:
    raise ValueError(f"reference={reference!r} is not a cell; cells: {names}.")
  return ml_collections.ConfigDict(dict(
      name=name, title=title, cells=list(cells), reference=reference, seeds=tuple(seeds),
      timeout_s=timeout_s, metric=metric, higher_is_better=higher_is_better,
      seed_fields=tuple((f, 0) if isinstance(f, str) else (f[0], int(f[1]))
                        for f in seed_fields), columns=tuple(columns), figures=tuple(figures),
      checks=list(checks), timeline_cell=timeline_cell, notes=notes, commands=commands))


def load_module(path: str):
  """Imports a Python file by path (sweep files and experiment configs)."""
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.exists(full):
    raise FileNotFoundError(f"config file {path!r} does not exist.")
  spec = importlib.util.spec_from_file_location(
      "sweep_config_" + os.path.splitext(os.path.basename(full))[0], full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str):
  """`path.py[:arg]` -> that file's `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  return load_module(path).get_config(arg or None)


# --- runs -------------------------------------------------------------------------------


def _format(value) -> str:
  """A value as config_flags parses it back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  return repr(value) if isinstance(value, float) else str(value)


def _set(c: ml_collections.ConfigDict, dotted: str, value) -> None:
  *sections, field = dotted.split(".")
  node = c
  for s in sections:
    node = node[s]
  if field not in node:
    raise ValueError(f"override {dotted}={value!r}: the config has no field {dotted!r}.")
  old = node[field]
  if isinstance(old, bool) and isinstance(value, str):
    value = {"true": True, "false": False}[value.lower()]
  elif isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(value, str):
    value = type(old)(float(value)) if isinstance(old, int) else float(value)
  node[field] = value


def _normal(tree):
  """As the summary's JSON holds it (tuples become lists)."""
  return json.loads(json.dumps(tree))


@dataclasses.dataclass
class Run:
  cell: str
  seed: int
  workdir: str
  argv: list
  config: dict  # Resolved, as summary.json's "config" will hold it.
  steps: int  # What summary.json's "steps" must be.
  status: str = "pending"  # pending, finished, skipped, running, failed, timeout, stale.
  detail: str = ""
  wall_s: float = 0.0
  resumed_from_step: int = 0


def plan(sweep: ml_collections.ConfigDict, workdir: str, seeds, extra: dict,
         only=None) -> list[Run]:
  """Every (cell, seed) with its command and resolved config; checks every override."""
  runs = []
  for c in sweep.cells:
    if only and c["name"] not in only:
      continue
    for seed in seeds:
      cfg = load_config(c["config"])
      overrides = {**c["overrides"], **{f: seed + off for f, off in sweep.seed_fields}, **extra}
      for k, v in overrides.items():
        _set(cfg, k, v)
      wd = os.path.join(workdir, c["name"], f"seed_{seed}")
      argv = [sys.executable, "-m", c["program"], f"--config={c['config']}", f"--workdir={wd}"]
      argv += [f"--config.{k}={_format(v)}" for k, v in overrides.items()]
      steps = cfg.train.steps if "train" in cfg else cfg.steps
      runs.append(Run(c["name"], int(seed), wd, argv, _normal(cfg.to_dict()), int(steps)))
  return runs


def _diff(a, b, prefix=""):
  """Dotted fields both configs have with different values (a field only one of them
  has is no difference: the code gained or renamed it since the run)."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) & set(b)) for d in _diff(a[k], b[k], f"{prefix}{k}.")]
  return [] if a == b else [prefix.rstrip(".")]


def classify(run: Run) -> None:
  """Marks a run `skipped` (finished before), `stale`, or leaves it `pending`."""
  path = os.path.join(run.workdir, "summary.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    summary = json.load(f)
  differ = _diff(summary.get("config") or {}, run.config)
  if differ:
    run.status = "stale"
    run.detail = (f"{path} was written by another config (differs in {', '.join(differ[:5])});"
                  " delete the folder to rerun it")
  elif summary.get("steps") == run.steps:
    run.status, run.resumed_from_step = "skipped", summary.get("resumed_from_step", 0)
  # A summary with fewer steps (the sweep asked for more): the run resumes past it.


def _die_with_parent():
  """Children get SIGKILL if the runner dies, so no orphan writes to a workdir."""
  if sys.platform.startswith("linux"):
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _clock(seconds: float) -> str:
  m, s = divmod(int(max(seconds, 0)), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def _current_step(run: Run) -> int:
  """The last step in the run's metrics.jsonl (0 if none yet); cheap, reads the tail."""
  path = os.path.join(run.workdir, "metrics.jsonl")
  try:
    with open(path, "rb") as f:
      f.seek(max(os.path.getsize(path) - 4096, 0))
      lines = f.read().splitlines()
    return int(json.loads(lines[-1])["step"]) if lines else 0
  except (OSError, ValueError, KeyError, IndexError):
    return 0


class ProgressBar:
  """One line: runs done, steps done, failures, elapsed, ETA (from this session's rate)."""

  def __init__(self, runs: list[Run], stream=sys.stderr):
    self.runs, self.stream = runs, stream
    self.tty = stream.isatty()
    self.t0 = time.time()
    self.start_done = self.done_steps()
    self.total = sum(r.steps for r in runs)
    self._last_line, self._last_print = "", 0.0

  def done_steps(self) -> int:
    return sum(r.steps if r.status in ("finished", "skipped") else
               min(_current_step(r), r.steps) if r.status in ("running", "pending", "failed",
                                                             "timeout") else 0
               for r in self.runs)

  def line(self) -> str:
    done = self.done_steps()
    elapsed = time.time() - self.t0
    rate = (done - self.start_done) / max(elapsed, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    n_done = sum(r.status in ("finished", "skipped") for r in self.runs)
    n_bad = sum(r.status in ("failed", "timeout", "stale") for r in self.runs)
    width = 30
    filled = int(width * done / max(self.total, 1))
    return (f"[{'#' * filled}{'.' * (width - filled)}] {n_done}/{len(self.runs)} runs"
            f"  {done}/{self.total} steps  {n_bad} failed  elapsed {_clock(elapsed)}"
            f"  ETA {_clock(eta) if eta == eta else '?'}")

  def show(self, force: bool = False) -> None:
    line = self.line()
    now = time.time()
    if self.tty:
      self.stream.write("\r" + line.ljust(len(self._last_line)))
    elif force or (line != self._last_line and now - self._last_print > 10):
      self.stream.write(line + "\n")
    else:
      return
    self.stream.flush()
    self._last_line, self._last_print = line, now

  def close(self) -> None:
    self.show(force=True)
    if self.tty:
      self.stream.write("\n")


def _finish(run: Run, rc: int) -> None:
  if rc != 0:
    run.status, run.detail = "failed", f"exit status {rc}; see {run.workdir}/log.txt"
    return
  classify(run)
  if run.status != "skipped":
    run.status, run.detail = "failed", (f"exited 0 without a summary of {run.steps} steps;"
                                        f" see {run.workdir}/log.txt")
  else:
    run.status = "finished"


def _kill(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def execute(runs: list[Run], jobs: int, timeout_s: float, progress: ProgressBar,
            jax_cache: str | None = None) -> None:
  """Runs every pending run, `jobs` at a time; never raises for a run's failure."""
  queue = [r for r in runs if r.status == "pending"]
  active: dict[int, tuple[Run, subprocess.Popen, float, object]] = {}
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  if jax_cache and "JAX_COMPILATION_CACHE_DIR" not in env:
    env.update(JAX_COMPILATION_CACHE_DIR=jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  try:
    while queue or active:
      while queue and len(active) < jobs:
        run = queue.pop(0)
        os.makedirs(run.workdir, exist_ok=True)
        log = open(os.path.join(run.workdir, "log.txt"), "a")
        log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} "
                  f"{' '.join(run.argv)}\n")
        log.flush()
        proc = subprocess.Popen(run.argv, cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
        run.status = "running"
        active[proc.pid] = (run, proc, time.time(), log)
      time.sleep(0.5)
      for pid, (run, proc, start, log) in list(active.items()):
        rc = proc.poll()
        over = time.time() - start > timeout_s
        if rc is None and not over:
          continue
        if rc is None:
          _kill(proc)
          run.status, run.detail = "timeout", (f"killed after {timeout_s:.0f} s; rerun to"
                                               " resume from its checkpoint")
        else:
          _finish(run, rc)
        run.wall_s = time.time() - start
        log.close()
        del active[pid]
        if run.status != "finished":
          progress.stream.write(f"\n{run.cell} seed {run.seed}: {run.status}: {run.detail}\n")
      progress.show()
  finally:
    for run, proc, _, log in active.values():
      _kill(proc)
      log.close()


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.sweep or not f.workdir:
    raise app.UsageError("--sweep and --workdir are required.")
  sweep = load_config(f.sweep)
  seeds = [int(s) for s in f.seeds] if f.seeds else list(sweep.seeds)
  bad = [kv for kv in f.set if "=" not in kv]
  if bad:
    raise app.UsageError(f"--set takes field.path=value; got {bad}.")
  extra = dict(kv.split("=", 1) for kv in f.set)
  timeout_s = f.timeout_s or sweep.timeout_s
  workdir = os.path.abspath(f.workdir)
  runs = plan(sweep, workdir, seeds, extra, f.only)
  for run in runs:
    classify(run)
  command = " ".join(["python -m experiments.sweep"] + sys.argv[1:])
  if f.dry_run:
    for run in runs:
      print(f"{run.status:>8}  {' '.join(run.argv)}")
    return
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "sweep.json"), {
      **_normal(sweep.to_dict()), "sweep_file": f.sweep, "command": command,
      "seeds": seeds, "set": extra})
  progress = ProgressBar(runs)
  print(f"{sweep.name}: {len(runs)} runs ({len(sweep.cells)} cells x {len(seeds)} seeds),"
        f" {sum(r.status == 'skipped' for r in runs)} already finished; {f.jobs} at a"
        f" time, {timeout_s:.0f} s limit each; logs in {workdir}/<cell>/seed_<s>/log.txt",
        flush=True)
  try:
    jax_cache = (None if f.jax_cache == "none" else
                 os.path.abspath(f.jax_cache or os.path.join(workdir, "jax_cache")))
    execute(runs, f.jobs, timeout_s, progress, jax_cache)
  finally:
    progress.close()
    write_json(os.path.join(workdir, "runs.json"), [
        {"cell": r.cell, "seed": r.seed, "status": r.status, "detail": r.detail,
         "wall_s": r.wall_s, "workdir": r.workdir} for r in runs])
  bad = [r for r in runs if r.status not in ("finished", "skipped")]
  for r in bad:
    print(f"NOT FINISHED  {r.cell} seed {r.seed}: {r.status}: {r.detail}")
  ran = [r for r in runs if r.status == "finished"]
  print(f"{len(ran)} ran, {sum(r.status == 'skipped' for r in runs)} skipped,"
        f" {len(bad)} not finished; wall {sum(r.wall_s for r in ran):.0f} s summed over runs."
        f"  Report: python -m experiments.report {workdir}")
  if bad:
    sys.exit(1)


def define_flags() -> None:
  """Flags of the command line; defined here, not at import, because sweep files
  import this module (`make_sweep`) while it may itself be running as __main__."""
  flags.DEFINE_string("sweep", None, "Sweep file, `path.py` or `path.py:arg`.")
  flags.DEFINE_string("workdir", None, "Where every run's folder goes.")
  flags.DEFINE_list("seeds", None, "Seeds (default: the sweep's own).")
  flags.DEFINE_integer("jobs", 1, "Runs in parallel.")
  flags.DEFINE_float("timeout_s", None, "Wall-clock limit of one run, seconds (default:"
                     " the sweep's own); a run past it is killed, and resumes next time.")
  flags.DEFINE_multi_string("set", [], "`field.path=value` applied to every cell after its"
                            " own overrides, e.g. train.steps=50.")
  flags.DEFINE_list("only", None, "Run only these cells.")
  flags.DEFINE_bool("dry_run", False, "Print the commands and their status; run nothing.")
  flags.DEFINE_string("jax_cache", "", "JAX's persistent compilation cache, shared by the"
                      " runs (cells differ in values, rarely in shapes: a tiny run starts"
                      " in ~25 s instead of ~70 s on 2 CPU cores); default WORKDIR/jax_cache,"
                      " `none` for off. An environment that sets JAX_COMPILATION_CACHE_DIR"
                      " wins.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
