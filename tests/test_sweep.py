"""The sweep runner resumes after being killed, and the report shows what the runs wrote.

As a user would run them, the runner as a process: a compute-free sweep
(`experiments/ablations/goodput.py`, one cell, three seeds) killed with its runs
once one run has finished, then run again; and `experiments/ablations/smoke.py`
(2 cells x 2 seeds, a one-layer model, 24 steps) trained on the tests' corpus,
then reported.
"""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import matplotlib.image
import ml_collections
import numpy as np
import pytest

from tests.helpers import CORPUS, REPO

SWEEP = "experiments/ablations/smoke.py"
RUNS = [(cell, seed) for cell in ("fp32", "int4") for seed in (0, 1)]
# Three compute-free runs of a few seconds each (mostly start-up), one at a time.
ANALYTIC = ["--sweep=experiments/ablations/goodput.py", "--only=ddl_m4_150k", "--seeds=0,1,2",
            "--set=steps=300", "--jobs=1"]
ANALYTIC_RUNS = [("ddl_m4_150k", seed) for seed in (0, 1, 2)]


def test_plan_skips_finished_runs_and_flags_stale_ones(tmp_path):
  from experiments import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  spec = sweep_lib.load_config(SWEEP)
  runs = sweep_lib.plan(spec, str(tmp_path), [0, 1], {"train.steps": "8"})
  assert [(r.cell, r.seed, r.steps) for r in runs] == [(c, s, 8) for c, s in RUNS]
  assert "--config.codec.up=int4" in runs[2].argv and "--config.seed=1" in runs[3].argv
  run = runs[0]
  os.makedirs(run.workdir)
  summary = {"steps": 8, "resumed_from_step": 0, "config": json.loads(json.dumps(run.config))}
  with open(os.path.join(run.workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  sweep_lib.classify(run)
  assert run.status == "skipped"
  summary["config"]["codec"]["up"] = "bf16"
  with open(os.path.join(run.workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  run.status = "pending"
  sweep_lib.classify(run)
  assert run.status == "stale" and "codec.up" in run.detail
  with pytest.raises(ValueError, match="no field 'codec.nope'"):
    sweep_lib.plan(spec, str(tmp_path), [0], {"codec.nope": "1"})


def test_seed_fields_give_each_seed_its_own_failure_draw(tmp_path):
  from experiments import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  spec = sweep_lib.load_config("experiments/ablations/chaos.py")
  runs = sweep_lib.plan(spec, str(tmp_path), [0, 3], {})
  got = {(r.cell, r.seed): (r.config["seed"], r.config["chaos"]["seed"]) for r in runs}
  assert got[("chaos", 0)] == (0, 1) and got[("chaos", 3)] == (3, 4)
  assert "--config.chaos.seed=4" in runs[-1].argv


def _summary(workdir, cell, seed):
  """A run's summary.json; None while there is none or it is still being written."""
  path = os.path.join(workdir, cell, f"seed_{seed}", "summary.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _sweep(workdir, args, **kwargs):
  """`python -m experiments.sweep ARGS` in its own process group (a kill takes its runs)."""
  return subprocess.Popen([sys.executable, "-m", "experiments.sweep", f"--workdir={workdir}",
                           *args], cwd=REPO, start_new_session=True, **kwargs)


def _kill_group(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_killed_sweep_resumes_skipping_finished_runs(tmp_path):
  workdir = str(tmp_path / "sweep")
  with open(tmp_path / "first.log", "w") as log:
    proc = _sweep(workdir, ANALYTIC, stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + 240
      while time.time() < deadline and proc.poll() is None:
        finished = [r for r in ANALYTIC_RUNS if _summary(workdir, *r)]
        if finished:
          break
        time.sleep(0.05)
      else:
        pytest.fail(f"no run finished in time: {_tail(tmp_path)}")
    finally:
      _kill_group(proc)
  # The kill may land after a second run finished; the ones still unfinished run again.
  finished = [r for r in ANALYTIC_RUNS if _summary(workdir, *r)]
  unfinished = [r for r in ANALYTIC_RUNS if r not in finished]
  assert unfinished, "the sweep finished before it was killed"
  path = lambda r: os.path.join(workdir, r[0], f"seed_{r[1]}", "summary.json")
  before = {r: (os.path.getmtime(path(r)), _summary(workdir, *r)) for r in finished}

  second = _sweep(workdir, ANALYTIC, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                  text=True)
  try:
    out, _ = second.communicate(timeout=240)
  finally:
    _kill_group(second)
  assert second.returncode == 0, out
  assert f"{len(finished)} already finished" in out, out
  with open(os.path.join(workdir, "runs.json")) as f:
    status = {(r["cell"], r["seed"]): r["status"] for r in json.load(f)}
  assert status == {r: "skipped" if r in finished else "finished" for r in ANALYTIC_RUNS}
  for r, (mtime, summary) in before.items():  # Skipped, not rerun.
    assert (os.path.getmtime(path(r)), _summary(workdir, *r)) == (mtime, summary), r
  for r in ANALYTIC_RUNS:
    assert _summary(workdir, *r)["steps"] == 300, r


@pytest.mark.slow
def test_report_shows_what_the_runs_wrote(tmp_path):
  workdir = str(tmp_path / "sweep")
  runner = _sweep(workdir, [f"--sweep={SWEEP}", "--jobs=2", f"--set=data.path={CORPUS}"],
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    log, _ = runner.communicate(timeout=600)
  finally:
    _kill_group(runner)
  assert runner.returncode == 0, log[-4000:]
  summaries = {r: _summary(workdir, *r) for r in RUNS}
  for r in RUNS:
    assert summaries[r]["steps"] == 24, r

  report = subprocess.run([sys.executable, "-m", "experiments.report", workdir], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert report.returncode == 0, report.stdout + report.stderr
  out = os.path.join(workdir, "report")
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  assert "Data: `data.sharding` random." in text  # What the runs' resolved configs say.
  rows = {line.split("|")[1].strip(): line for line in text.splitlines()
          if line.startswith("| fp32 ") or line.startswith("| int4 ")}
  for cell in ("fp32", "int4"):
    losses = [summaries[(cell, s)]["final_eval_loss"] for s in (0, 1)]
    mean, se = np.mean(losses), np.std(losses, ddof=1) / np.sqrt(2)
    assert f"| 2 | {mean:.4f} ± {se:.4f} |" in rows[cell], rows[cell]
    mb = np.mean([(summaries[(cell, s)]["bytes_up"] + summaries[(cell, s)]["bytes_down"]) / 2
                  for s in (0, 1)]) / 1e6
    assert f"| {mb:.2f} |" in rows[cell], rows[cell]
  ref = np.mean([summaries[("fp32", s)]["final_eval_loss"] for s in (0, 1)])
  int4 = np.mean([summaries[("int4", s)]["final_eval_loss"] for s in (0, 1)])
  assert f"| {100 * (int4 / ref - 1):+.2f}% |" in rows["int4"]

  with open(os.path.join(out, "cells.csv")) as f:
    table = list(csv.DictReader(f))
  assert len(table) == 4
  for row in table:
    s = summaries[(row["cell"], int(row["seed"]))]
    assert float(row["final_eval_loss"]) == s["final_eval_loss"]
    assert int(row["bytes_up"]) == s["bytes_up"]

  figures = sorted(glob.glob(os.path.join(out, "*.png")))
  assert [os.path.basename(p) for p in figures] == [
      "smoke_bytes.png", "smoke_loss_vs_tokens.png", "smoke_timeline.png"]
  for path in figures:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path
    assert f"]({os.path.basename(path)})" in text


def _tail(tmp_path) -> str:
  with open(tmp_path / "first.log") as f:
    return f.read()[-2000:]


def test_pairwise_checks_say_when_the_verdict_is_within_noise():
  from experiments import report  # pylint: disable=g-import-not-at-top
  def sweep(a, b):
    runs = {"a": {s: {"final_eval_loss": v} for s, v in enumerate(a)},
            "b": {s: {"final_eval_loss": v} for s, v in enumerate(b)}}
    return {"metric": "final_eval_loss", "runs": runs}
  not_worse = dict(claim="a >= b", kind="not_worse", a="a", b="b", tol=0.0)
  within = dict(claim="a ~ b", kind="within", a="a", b="b", tol=0.01)
  # Clearly better, on tight seeds: firm.
  assert report.evaluate_check(sweep([2.00, 2.001], [2.10, 2.101]), not_worse)[0] == "supported"
  # Better on average, but not on every seed: the sign could flip.
  verdict, numbers = report.evaluate_check(sweep([2.00, 2.10], [2.06, 2.05]), not_worse)
  assert verdict == "supported (within noise)" and "paired over 2 seeds" in numbers
  # Seeds far apart, cells 0.5% apart on each: paired, firmly within 1%...
  assert report.evaluate_check(sweep([2.01, 2.111], [2.00, 2.10]), within)[0] == "supported"
  # ...and unpaired (no common seeds) the seeds' spread leaves it open.
  unpaired = sweep([2.01, 2.111], [2.00, 2.10])
  unpaired["runs"]["b"] = {s + 2: r for s, r in unpaired["runs"]["b"].items()}
  verdict, numbers = report.evaluate_check(unpaired, within)
  assert verdict == "supported (within noise)" and "unpaired" in numbers
  # 2.2% apart, give or take 1.5% (two s.e.): the interval reaches inside the 1% bound.
  assert report.evaluate_check(sweep([2.03, 2.16], [2.00, 2.10]), within)[0] == (
      "not supported (within noise)")
  # 3% apart on tight seeds: firmly outside 1%.
  assert report.evaluate_check(sweep([2.06, 2.061], [2.00, 2.001]), within)[0] == "not supported"


def test_within_abs_bounds_the_difference_in_the_metrics_own_units():
  from experiments import report  # pylint: disable=g-import-not-at-top
  def sweep(a, b):
    runs = {"a": {s: {"final_eval_accuracy": v} for s, v in enumerate(a)},
            "b": {s: {"final_eval_accuracy": v} for s, v in enumerate(b)}}
    return {"metric": "final_eval_accuracy", "runs": runs}
  one_point = dict(claim="a ~ b", kind="within_abs", a="a", b="b", tol=0.01)
  # 1.5 points apart on every seed: within 2 points, though 9% apart relative to b.
  low = sweep([0.10, 0.20], [0.115, 0.215])
  verdict, numbers = report.evaluate_check(low, {**one_point, "tol": 0.02})
  assert verdict == "supported", numbers
  assert "a 15.00 ± 5.00 vs b 16.50 ± 5.00: -1.50 (bound ±2.00)" in numbers, numbers
  assert report.evaluate_check(low, {**one_point, "kind": "within", "tol": 0.02})[0] == (
      "not supported")
  # 2 points apart on every seed: firmly outside 1 point.
  assert report.evaluate_check(sweep([0.94, 0.95], [0.96, 0.97]), one_point)[0] == (
      "not supported")
  # 1 and 0.5 points apart: 0.75 +- 0.25 (s.e.), two s.e. reach past the bound.
  verdict, numbers = report.evaluate_check(sweep([0.95, 0.96], [0.96, 0.965]), one_point)
  assert verdict == "supported (within noise)" and "paired over 2 seeds" in numbers, numbers


def test_dominates_treats_float_round_off_as_equal():
  from experiments import report  # pylint: disable=g-import-not-at-top
  runs = {"d1": {0: {"u": 0.750000003}}, "s1": {0: {"u": 0.7500000030000001}},
          "d2": {0: {"u": 0.9}}, "s2": {0: {"u": 0.91}}}
  sweep = {"metric": "u", "runs": runs}
  check = dict(claim="d >= s", kind="dominates", a=["d1"], b=["s1"], higher_is_better=True)
  assert report.evaluate_check(sweep, check)[0] == "supported"
  verdict, numbers = report.evaluate_check(sweep, {**check, "a": ["d1", "d2"], "b": ["s1", "s2"]})
  assert verdict == "not supported" and "holds at 1 of 2 points" in numbers


def test_stays_above_compares_the_two_series_at_each_eval_and_routing_is_drawn(tmp_path):
  from experiments import report  # pylint: disable=g-import-not-at-top
  learners = "routing/topk_overlap_learners"
  itself = "routing/topk_overlap_since_last_eval"
  runs = {"dec": {0: {"final_eval_loss": 2.0, "_series": {learners: {10: 0.5, 20: 0.9}}},
                  1: {"final_eval_loss": 2.0, "_series": {learners: {10: 0.7, 20: 0.8}}}},
          "dp": {0: {"final_eval_loss": 2.0, "_series": {itself: {10: 0.3, 20: 0.8, 30: 1}}},
                 1: {"final_eval_loss": 2.0, "_series": {itself: {10: 0.5, 20: 0.8}}}}}
  sweep = {"name": "arch", "title": "Arch", "metric": "final_eval_loss", "runs": runs,
           "cells": [{"name": "dec"}, {"name": "dp"}]}
  check = dict(claim="overlap", kind="stays_above", a="dec", series=learners, b="dp",
               reference=itself)
  # Means over seeds: 0.6 vs 0.4 at step 10, 0.85 vs 0.8 at 20 (30: dp only, not compared).
  verdict, numbers = report.evaluate_check(sweep, check)
  assert verdict == "supported", numbers
  assert "at 2 of 2 evals" in numbers and "closest at step 20: 0.8500 vs 0.8000" in numbers
  runs["dec"][1]["_series"][learners][20] = 0.6  # Step 20: 0.75 < 0.8.
  verdict, numbers = report.evaluate_check(sweep, check)
  assert verdict == "not supported" and "at 1 of 2 evals" in numbers, numbers
  assert report.evaluate_check(sweep, {**check, "reference": "routing/nope"})[0] == "no data"
  name = report.fig_routing(sweep, str(tmp_path))
  assert name == "arch_routing.png"
  assert matplotlib.image.imread(str(tmp_path / name)).shape[0] > 100
  for cell in runs.values():
    for run in cell.values():
      run["_series"] = {}
  assert report.fig_routing(sweep, str(tmp_path)) is None  # A dense sweep: no figure.


def _fake_sweep(tmp_path, name: str, losses: dict[str, list[float]]) -> dict:
  """What `report.load_sweep` returns for a finished sweep, without its run folders."""
  workdir = str(tmp_path / name)
  runs = {cell: {seed: {"final_eval_loss": v, "_workdir": f"{workdir}/{cell}/seed_{seed}",
                        "_evals": {}} for seed, v in enumerate(values)}
          for cell, values in losses.items()}
  return {"name": name, "title": f"Sweep {name}", "command": f"sweep {name}", "seeds": [0, 1],
          "reference": "a", "sweep_file": f"{name}.py", "set": {}, "missing": [],
          "figures": [], "columns": [], "metric": "final_eval_loss", "workdir": workdir,
          "cells": [{"name": c, "overrides": {}} for c in losses], "runs": runs,
          "checks": [dict(claim=f"{name}: b ~ a", kind="within", a="b", b="a", tol=0.01)]}


def test_merge_into_adds_or_replaces_one_sweep_and_keeps_the_others(tmp_path):
  from experiments import report  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "report")
  first = _fake_sweep(tmp_path, "one", {"a": [2.0, 2.1], "b": [2.0, 2.1]})
  second = _fake_sweep(tmp_path, "two", {"a": [3.0, 3.1], "b": [3.5, 3.6]})
  report.render([first, second], out, "report one two")
  with open(f"{out}/report.md") as f:
    before = f.read()
  # Sweep two re-run (now within 1%), and a new sweep three.
  second = _fake_sweep(tmp_path, "two", {"a": [3.0, 3.1], "b": [3.0, 3.1]})
  third = _fake_sweep(tmp_path, "three", {"a": [1.0, 1.1], "b": [1.5, 1.6]})
  report.merge_into([second, third], out, "report two three --into")
  report.merge_into([second, third], out, "report two three --into")  # Idempotent.
  with open(f"{out}/report.md") as f:
    after = f.read()
  lines = after.splitlines()
  # Sweep one is untouched; two appears once, with its new verdict; three is added.
  one = before[before.index("## Sweep one"):before.index("## Sweep two")]
  assert one in after
  assert after.count("## Sweep two") == 1 and after.count("## Sweep three") == 1
  assert "| two | two: b ~ a | **supported** |" in after
  assert "| two | two: b ~ a | **not supported** |" not in after
  assert "| three | three: b ~ a | **not supported** |" in after
  assert [l for l in lines if l.startswith("- ")][:3] == [
      "- one: `sweep one`", "- two: `sweep two`", "- three: `sweep three`"]
  assert sum("merged in by `report two three --into`" in l for l in lines) == 1
  # The checks table is one block: every row sits between its head and the first section.
  head = lines.index("| sweep | claim | this run | numbers |")
  table = lines[head:lines.index("## Sweep one")]
  assert [l.split(" | ")[0] for l in table if l.startswith("| ") and "**" in l] == [
      "| one", "| two", "| three"]
  with open(f"{out}/cells.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted((r["sweep"], r["cell"], r["seed"]) for r in rows) == sorted(
      (s, c, str(seed)) for s in ("one", "two", "three") for c in "ab" for seed in (0, 1))
  assert {r["final_eval_loss"] for r in rows if r["sweep"] == "two"} == {"3.0", "3.1"}


def test_gap_vs_tokens_draws_each_kind_against_the_reference_at_its_scale(tmp_path):
  from experiments import report  # pylint: disable=g-import-not-at-top
  loss = {"data_parallel_x1": 2.0, "tuned_x1": 2.2, "data_parallel_x4": 1.5, "tuned_x4": 1.575}
  runs = {cell: {0: {"final_eval_loss": v, "tokens": 1_000_000 * int(cell[-1])}}
          for cell, v in loss.items()}
  sweep = {"name": "scale", "title": "Scale", "metric": "final_eval_loss", "runs": runs,
           "reference": "data_parallel_x1", "cells": [{"name": c} for c in loss]}
  lines = []
  real_polyfit = report.np.polyfit
  def polyfit(x, y, deg):
    lines.append((list(x), list(y)))
    return real_polyfit(x, y, deg)
  report.np.polyfit = polyfit
  try:
    name = report.fig_gap_vs_tokens(sweep, str(tmp_path))
  finally:
    report.np.polyfit = real_polyfit
  assert name == "scale_gap_vs_tokens.png"
  assert matplotlib.image.imread(str(tmp_path / name)).shape[0] > 100
  (x, y), = lines  # One kind, tuned: +10% at 1M tokens, +5% at 4M.
  np.testing.assert_allclose(x, [6.0, np.log10(4e6)])
  np.testing.assert_allclose(y, [10.0, 5.0])
  del runs["data_parallel_x4"]  # No reference at 4x: nothing to draw a trend from.
  assert report.fig_gap_vs_tokens(sweep, str(tmp_path)) is not None
  del runs["data_parallel_x1"]
  assert report.fig_gap_vs_tokens(sweep, str(tmp_path)) is None


@pytest.mark.parametrize("stage", ["sync_every", "outer", "inner", "learners", "batch",
                                   "confirm", "scale", "scale_llama"])
def test_every_outer_loop_stage_plans_valid_configs(tmp_path, stage):
  """A misspelt override or an invalid cell (e.g. a batch M does not divide) fails here,
  not an hour into a sweep."""
  from decoupled_diloco import config as config_lib  # pylint: disable=g-import-not-at-top
  from experiments import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  spec = sweep_lib.load_config(f"experiments/ablations/outer.py:{stage}")
  runs = sweep_lib.plan(spec, str(tmp_path), [0], {})
  assert len(runs) == len(spec.cells)
  for run in runs:
    config_lib.parse(ml_collections.ConfigDict(run.config))
  with pytest.raises(ValueError, match="stage 'nope' is unknown"):
    sweep_lib.load_config("experiments/ablations/outer.py:nope")
