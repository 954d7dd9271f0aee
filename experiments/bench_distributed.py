"""The real runtime (processes over a file:// mailbox) against what it is built on.

Four measurements, side by side in one run on this machine, all on
experiments/decoupled_diloco.py:nochaos with its earlier outer loop (tiny model,
P = H = 10: every step sends one fragment and takes one publication) with 16
sequences per learner:

1. Mailbox throughput: create-once writes and reads of a contribution (that
   config's largest fragment, the whole model, 16 MiB) vs a plain file write
   + fsync and read of the same bytes, each operation in turn; medians.
2. Latency: from a contribution written (a learner's `send` event) to the
   publication that merged it landing at that learner (`landed`), in a run
   of 2 learners, split into send -> syncer read (`arrive`) -> `publish` ->
   `landed`, and into contributions on time and late (joining the next round).
3. Restart to first step: in the same run, learner 1 is SIGKILLed and
   restarted, alternately with the run's compilation cache (warm) and with
   an empty one (cold); seconds from the restart (process spawn) to the first
   `step` event of the new incarnation.
4. Learner throughput: one learner process of the real runtime (M = 1) vs the
   same island running the same jitted inner step in a plain loop (same
   model, batch, data, steps; no mailbox, no train.py). The learner and the
   plain loop get core 0, the syncer core 1 (`taskset`), and the two alternate
   (plain, real, plain, real, ...) so that both meet the same machine; each
   pair gives three ratios: of the learner's summary.json `tokens_per_second`
   (after its first step, so compilation excluded; the plain loop's
   likewise), of its steady state (from step 2H + 1, once each fragment's
   send and align functions have been loaded at their first use), and of CPU
   time per step in that steady state (plain / real): on a machine shared
   with other work, pinning does not keep others off core 0, and only the
   last is free of their load. The run of 2 has filled the compilation
   cache, so those functions load rather than compile, as in any run after
   its first minutes.

  python -m experiments.bench_distributed    # 6-8 min on the 2-core CPU at load 2-6

Figures go to --out and are recorded in BUILD.md ("Real runtime (processes
over a mailbox)"). Every process started has a deadline and is stopped by pid.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from decoupled_diloco import config as config_lib
from decoupled_diloco import islands as islands_lib, metrics, optim, steps, tasks
from decoupled_diloco.algorithm import fragments as fragments_lib
from decoupled_diloco.algorithm.messages import Contribution
from decoupled_diloco.runtime.dist import mailbox as mailbox_lib
from decoupled_diloco.runtime.dist import wire
from decoupled_diloco.runtime.dist.keys import Keyring
from decoupled_diloco.runtime import team as team_lib
from experiments import decoupled_diloco, methods, saved
from launch import local

_STEPS = flags.DEFINE_integer("steps", 100, "Inner steps per throughput run.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternating (plain loop, real runtime) pairs.")
_REPEATS = flags.DEFINE_integer("repeats", 12, "Mailbox writes and reads per size.")
_RESTARTS = flags.DEFINE_integer("restarts", 2, "SIGKILL + restart of learner 1, alternately"
                                 " with a warm and a cold compilation cache.")
_TIMEOUT = flags.DEFINE_float("deadline_s", 300.0, "Deadline of each run or wait.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_distributed.json",
                           "Where the figures go (JSON).")
_PLAIN = flags.DEFINE_string("plain_loop", None, "Internal: run the plain loop of the config"
                             " saved at this path and print its tokens/s and CPU s/step (what"
                             " the bench starts on core 0).")

LEARNER_CPU, SYNCER_CPU = "0", "1"


def _read_events(path: str) -> list[dict]:
  return metrics.read_jsonl(path)


def _save(config, path: str) -> str:
  with open(path, "w") as f:
    f.write(config.to_json(sort_keys=True))
  return path


def _wait(run, done, what: str) -> None:
  """Polls `done()`; raises if a process of `run` fails or --deadline_s passes."""
  deadline = time.time() + _TIMEOUT.value
  while not done():
    for p in run.processes:
      if p.popen.poll() not in (None, 0):
        raise RuntimeError(f"{p.name} exited with {p.popen.poll()} while waiting for {what};"
                           f" see {p.log_path}")
    if time.time() > deadline:
      raise TimeoutError(f"waited over --deadline_s={_TIMEOUT.value:.0f} s for {what}")
    time.sleep(0.1)


def run_config(num_learners: int, num_steps: int, checkpoint_every: int):
  """The paper's setting (P = H = 10) on the tiny model, 16 sequences per learner."""
  c = methods.earlier(decoupled_diloco, "nochaos")  # What results/ was measured at.
  c.data.batch_size = 16 * num_learners
  c.diloco.num_learners = num_learners
  c.train.update(steps=num_steps, eval_every=0, checkpoint_every=checkpoint_every,
                 eval_batches=2, log_every=num_steps)
  return c


def _use(run, cache: str, cpus: dict | None = None) -> None:
  """Points every process of `run` at `cache`; pins them (`cpus`: name -> core) if given."""
  for p in run.processes:
    pin = ["taskset", "-c", cpus[p.name]] if cpus else []
    # taskset execs the command, so the pid stays the process's; the later flag wins.
    p.args = [*pin, *p.args, f"--compilation_cache={cache}"]


# --- learner throughput -------------------------------------------------------------------


def plain_loop(config_path: str) -> dict:
  """The learner's inner step alone (init, data shard, jitted step): tokens/s, CPU s/step."""
  cfg = config_lib.parse(saved.get_config(config_path))
  island = islands_lib.make_islands(1)[0]
  task = tasks.build(cfg)
  tx = optim.inner_optimizer(cfg.inner, cfg.train.steps)
  params = task.init(jax.random.key(cfg.seed))
  opt_state = tx.init(params)
  step = steps.make_inner_step(task, tx, island, params, opt_state)
  params, opt_state = island.put(params), island.put(opt_state)
  data = task.train_source(0, cfg.diloco.num_learners, team_lib.learner_batch(cfg), cfg.seed)
  params, opt_state, loss = step(params, opt_state, jax.device_put(next(data), island.batch))
  loss.block_until_ready()  # Compiled and warm, as the learner is after its first step.
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(cfg.train.steps - 1):
    params, opt_state, loss = step(params, opt_state, jax.device_put(next(data), island.batch))
  loss.block_until_ready()
  tokens = (cfg.train.steps - 1) * cfg.data.batch_size * cfg.model.seq_len
  return {"tokens_per_second": tokens / (time.perf_counter() - start),
          "cpu_s_per_step": (time.process_time() - cpu) / (cfg.train.steps - 1)}


def run_plain(config_path: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  out = subprocess.run(["taskset", "-c", LEARNER_CPU, sys.executable, "-m",
                        "experiments.bench_distributed", f"--plain_loop={config_path}"],
                       env=env, capture_output=True, text=True, timeout=_TIMEOUT.value,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_seconds(pid: int) -> float | None:
  """User + system CPU time of process `pid`, all threads; None once it is gone."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except FileNotFoundError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_real(workdir: str, config_path: str, cache: str) -> dict:
  """One syncer (core 1) and one learner (core 0) to the end; the learner's figures.

  Besides its tokens/s, the learner's steady state: from step 2H + 1, when
  every fragment has been sent and aligned once (each shape's send and align
  functions traced and loaded from the cache at first use, in its timed
  loop), to its last step, from its step events; and its CPU time, sampled as
  it runs, per step over that window: what it spends on the core, its
  courier threads included, whatever else runs there.
  """
  run = local.LocalRun(workdir, config_path, 1, echo=False)
  _use(run, cache, {"syncer": SYNCER_CPU, "learner 0": LEARNER_CPU})
  samples = []  # (wall time, learner CPU seconds)

  def finished() -> bool:
    if (cpu := _cpu_seconds(run.learners[0].pid)) is not None:
      samples.append((time.time(), cpu))
    return all(p.popen.poll() == 0 for p in run.processes)

  try:
    run.start(_TIMEOUT.value)
    _wait(run, finished, "the run to finish")
  finally:
    run.stop()
  with open(f"{run.workdir}/learner0/summary.json") as f:
    learner = json.load(f)
  with open(f"{run.workdir}/syncer/summary.json") as f:
    syncer = json.load(f)
  c = learner["config"]
  step_times = {e["step"]: e["t"] for e in _read_events(f"{run.workdir}/learner0/events.jsonl")
                if e["event"] == "step"}
  first, last = 2 * c["diloco"]["sync_every"] + 1, max(step_times)
  times, cpus = zip(*samples)
  cpu = np.interp([step_times[first], step_times[last]], times, cpus)
  tokens = (last - first) * c["data"]["batch_size"] * c["model"]["seq_len"]
  return {"tokens_per_second": learner["tokens_per_second"],
          "steady_tokens_per_second": tokens / (step_times[last] - step_times[first]),
          "steady_cpu_s_per_step": float(cpu[1] - cpu[0]) / (last - first),
          "steady_from_step": first, "waiting_s": learner["waiting_s"],
          "aligned": learner["aligned"], "bytes_up": learner["bytes_up"],
          "bytes_down": learner["bytes_down"], "outer_steps": syncer["outer_steps"]}


def learner_throughput(root: str, cache: str) -> dict:
  """Alternated pairs; the bench itself keeps off the learner's core meanwhile."""
  config_path = _save(run_config(1, _STEPS.value, 0), f"{root}/throughput.json")
  mine = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {int(SYNCER_CPU)})
  plain, real = [], []
  try:
    for r in range(_ROUNDS.value):
      plain.append(run_plain(config_path))
      print(f"round {r}: plain loop {plain[-1]}", flush=True)
      real.append(run_real(f"{root}/throughput{r}", config_path, cache))
      real[-1]["load_average"] = os.getloadavg()[0]
      print(f"round {r}: real runtime {real[-1]}", flush=True)
  finally:
    os.sched_setaffinity(0, mine)
  ratio = lambda real_key, plain_key: [b[real_key] / a[plain_key] for a, b in zip(plain, real)]
  ratios = {"tokens_per_second": ratio("tokens_per_second", "tokens_per_second"),
            "steady_tokens_per_second": ratio("steady_tokens_per_second", "tokens_per_second"),
            # CPU time per step (plain / real): on a core of its own it is the wall
            # time, so this leaves out other agents' load on this shared machine.
            "steady_cpu": [a["cpu_s_per_step"] / b["steady_cpu_s_per_step"]
                           for a, b in zip(plain, real)]}
  return {"plain": plain, "real": real, "ratios": ratios,
          "medians": {k: statistics.median(v) for k, v in ratios.items()}, "steps": _STEPS.value}


# --- mailbox throughput ------------------------------------------------------------------


def payload_sizes() -> dict[str, int]:
  """Bytes of float32 contributions: the paper config's largest fragment, the model, 16 MiB."""
  cfg = config_lib.parse(decoupled_diloco.get_config("nochaos"))
  flat = fragments_lib.flatten(tasks.build(cfg).init(jax.random.key(0)))
  parts = fragments_lib.partition(flat, cfg.diloco.num_fragments, cfg.diloco.fragmentation)
  largest = max(sum(flat[k].size for k in part) for part in parts)
  return {f"largest fragment (P={cfg.diloco.num_fragments})": 4 * largest,
          "whole model": 4 * sum(v.size for v in flat.values()), "16 MiB": 16 << 20}


def _write_synced(path: str, data: bytes) -> bool:
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())  # As tensorstore's file:// driver does.
  return True


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def mailbox_throughput(root: str) -> list[dict]:
  """Mailbox send/receive vs write+fsync/read of the same message bytes, per payload size."""
  secret = os.urandom(32)
  box = mailbox_lib.Mailbox(f"file://{root}/mailbox_bench", secret)
  os.makedirs(f"{root}/plain_files")
  rows = []
  for p, (name, nbytes) in enumerate(payload_sizes().items()):
    rows.append(_mailbox_row(box, secret, f"{root}/plain_files/{p}_", p, nbytes))
    row = rows[-1]
    print(f"{name} ({row['message_bytes'] / 1e6:.2f} MB): write {row['mailbox_write_mb_s']:.0f}"
          f" MB/s vs file {row['file_write_mb_s']:.0f} ({row['write_ratio']:.2f}x); read"
          f" {row['mailbox_read_mb_s']:.0f} vs {row['file_read_mb_s']:.0f}"
          f" ({row['read_ratio']:.2f}x); framing + HMAC alone {row['encode_mb_s']:.0f} /"
          f" {row['decode_mb_s']:.0f} MB/s", flush=True)
    row["payload"] = name
  return rows


def _mailbox_row(box, secret: bytes, file_prefix: str, p: int, nbytes: int) -> dict:
  """Each operation in turn, --repeats times (so all meet the same machine); medians."""
  values = np.random.default_rng(p).standard_normal(nbytes // 4, dtype=np.float32)
  c = Contribution(learner=0, fragment=p, round=0, base_version=0, steps=1, tokens=1,
                   payload=({"values": values},), nbytes=values.nbytes)
  keys = Keyring.from_secret(secret)
  data = wire.contribution_bytes(c, 1, keys)
  ops = {"mailbox_write": lambda r: box.send(c._replace(round=r), incarnation=1),
         "mailbox_read": lambda r: box.receive(p, r, 0) is not None,
         "file_write": lambda r: _write_synced(f"{file_prefix}{r}", data),
         "file_read": lambda r: len(_read(f"{file_prefix}{r}")) == len(data),
         # What the mailbox adds in memory alone: framing and the HMAC, each way.
         "encode": lambda r: len(wire.contribution_bytes(c, 1, keys)) == len(data),
         "decode": lambda r: wire.parse_contribution(data, keys, 0) is not None}
  times = {k: [] for k in ops}
  for r in range(_REPEATS.value):
    for k, op in ops.items():
      t0 = time.perf_counter()
      if not op(r):
        raise RuntimeError(f"{k} of {len(data)} bytes (repeat {r}) failed")
      times[k].append(time.perf_counter() - t0)
  mb_s = {k: len(data) / statistics.median(v) / 1e6 for k, v in times.items()}
  return {"message_bytes": len(data), **{f"{k}_mb_s": v for k, v in mb_s.items()},
          **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
          "write_ratio": mb_s["mailbox_write"] / mb_s["file_write"],
          "read_ratio": mb_s["mailbox_read"] / mb_s["file_read"]}


# --- latency and restarts ---------------------------------------------------------------


def latency(workdir: str, num_learners: int, before: float) -> dict:
  """Send -> landed of the contributions sent before `before`: medians, overall and per leg.

  A contribution that arrives after its round closed joins the next one
  (`diloco.late`), so it lands with that round's publication: on-time and
  late ones are also summarised apart.
  """
  syncer = _read_events(f"{workdir}/syncer/events.jsonl")
  arrived = {(e["learner"], e["fragment"], e["round"]): e for e in syncer
             if e["event"] == "arrive"}
  published = {(e["fragment"], e["round"]): e for e in syncer
               if e["event"] == "publish" and e["round"] >= 0}
  legs = {"send_to_arrive_s": [], "arrive_to_publish_s": [], "publish_to_landed_s": [],
          "send_to_landed_s": []}
  by_status = {}
  for m in range(num_learners):
    events = _read_events(f"{workdir}/learner{m}/events.jsonl")
    landed = sorted((e["version"], e["t"], e["fragment"]) for e in events
                    if e["event"] == "landed")
    for send in events:
      if send["event"] != "send" or send["t"] >= before:
        continue
      arrive = arrived.get((m, send["fragment"], send["round"]))
      pub = arrive and published.get((send["fragment"], arrive["joins"]))
      # The first version at or after it (a learner may skip to a newer full copy).
      t = pub and next((t for v, t, q in landed
                        if q == send["fragment"] and v >= pub["version"]), None)
      if t is None:
        continue
      for key, dt in zip(legs, (arrive["t"] - send["t"], pub["t"] - arrive["t"], t - pub["t"],
                                t - send["t"])):
        legs[key].append(dt)
      by_status.setdefault(arrive["status"], []).append(t - send["t"])
  total = legs["send_to_landed_s"]
  return {"contributions": len(total),
          **{f"median_{k}": statistics.median(v) for k, v in legs.items()},
          "p90_send_to_landed_s": float(np.percentile(total, 90)),
          "by_arrival": {k: {"share": len(v) / len(total), "median_send_to_landed_s":
                             statistics.median(v)} for k, v in sorted(by_status.items())}}


def restart(run, m: int, cache: str | None) -> dict:
  """SIGKILLs learner m, restarts it (with `cache` if given); seconds to its first step."""
  p = run.learners[m]
  p.signal(signal.SIGKILL)
  p.wait(10)
  if cache is not None:
    os.makedirs(cache)
    p.args = [*p.args, f"--compilation_cache={cache}"]  # The later flag wins.
  spawned = time.time()
  p.start()
  path = f"{run.workdir}/learner{m}/events.jsonl"
  new = lambda: [e for e in _read_events(path) if e["t"] > spawned]
  _wait(run, lambda: any(e["event"] == "step" for e in new()), f"learner {m}'s first step")
  events = new()
  if cache is not None:
    p.args = p.args[:-1]
  first = lambda what: next(e["t"] for e in events if e["event"] == what)
  kinds = {e["event"] for e in events}
  return {"cache": "cold" if cache else "warm",
          "spawn_to_first_step_s": first("step") - spawned,
          "spawn_to_start_s": first("start") - spawned,
          "start_to_first_step_s": first("step") - first("start"),
          # From its own checkpoint, or from the global model if too far behind.
          "from": "rejoin" if "rejoin" in kinds else "resume" if "resume" in kinds else "scratch"}


def latency_and_restarts(root: str, cache: str) -> tuple[dict, list[dict]]:
  """A run of 2 learners: latency until learner 1 is first killed, then its restarts."""
  run = local.LocalRun(f"{root}/run", _save(run_config(2, 5000, 25), f"{root}/run.json"), 2,
                          echo=False)
  _use(run, cache)
  box = run.mailbox()
  step = lambda m: (lease.info.get("step", 0) if (lease := box.read_lease(f"learner/{m}"))
                    else 0)
  restarts = []
  try:
    run.start(_TIMEOUT.value)
    _wait(run, lambda: step(1) >= 40, "learner 1 to reach step 40")
    first_kill = time.time()
    for i in range(_RESTARTS.value):
      cold = f"{root}/empty_cache{i}" if i % 2 else None
      restarts.append(restart(run, 1, cold))
      print(f"restart {i}: {restarts[-1]}", flush=True)
      at = step(1)
      _wait(run, lambda: step(1) >= at + 5, "learner 1 to step on")
  finally:
    run.stop()
  return latency(run.workdir, 2, first_kill), restarts


def import_seconds() -> float:
  """What a restarted process pays before any of its own work: importing the library."""
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-c", "import decoupled_diloco.train,"
                  " decoupled_diloco.runtime.dist.learner"], check=True, timeout=_TIMEOUT.value)
  return time.perf_counter() - t0


def main(argv):
  del argv
  if _PLAIN.value:
    print(json.dumps(plain_loop(_PLAIN.value)))
    return
  logging.set_verbosity(logging.WARNING)
  load = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix="bench_distributed") as root:
    started = time.time()
    cache = f"{root}/jax_cache"  # Shared by every process but the cold restarts.
    mailbox = mailbox_throughput(root)
    lat, restarts = latency_and_restarts(root, cache)
    imports = import_seconds()
    throughput = learner_throughput(root, cache)
    wall = time.time() - started
  by_cache = {kind: statistics.median(r["spawn_to_first_step_s"] for r in restarts
                                      if r["cache"] == kind)
              for kind in ("warm", "cold") if any(r["cache"] == kind for r in restarts)}
  results = {"command": " ".join(["python -m experiments.bench_distributed", *sys.argv[1:]]),
             "cpus": os.cpu_count(), "load_average_before": load,
             "load_average_after": os.getloadavg(), "wall_seconds": wall,
             "learner_throughput": throughput, "mailbox": mailbox, "latency": lat,
             "restarts": {"runs": restarts, "median_spawn_to_first_step_s": by_cache,
                          "import_s": imports}}
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=1)
  t = throughput
  print("\nlearner, real runtime / plain loop (target >= 0.95):")
  for key, values in t["ratios"].items():
    print(f"  {key}: {', '.join(f'{v:.3f}' for v in values)}; median {t['medians'][key]:.3f}")
  for row in mailbox:
    print(f"mailbox {row['payload']} ({row['message_bytes'] / 1e6:.2f} MB): write"
          f" {row['write_ratio']:.2f}x, read {row['read_ratio']:.2f}x a plain file's MB/s")
  arrivals = ", ".join(f"{k} {100 * v['share']:.0f}%: {v['median_send_to_landed_s']:.3f} s"
                       for k, v in lat["by_arrival"].items())
  print(f"send -> landed: median {lat['median_send_to_landed_s']:.3f} s (p90"
        f" {lat['p90_send_to_landed_s']:.3f} s; {arrivals}) over {lat['contributions']}"
        " contributions")
  caches = ", ".join(f"{k} cache {v:.1f}" for k, v in by_cache.items())
  print(f"restart -> first step (median s): {caches}; importing the library alone"
        f" {imports:.1f} s")
  print(f"load average {load[0]:.1f} before, {results['load_average_after'][0]:.1f} after;"
        f" {wall:.0f} s; figures in {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
