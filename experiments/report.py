r"""Report of finished sweeps: report.md, cells.csv and PNG figures.

  python -m experiments.report DIR [DIR ...] [--out=OUT]
  python -m experiments.report DIR [DIR ...] --into=REPORT_DIR   # add to a report

Each DIR is a sweep's workdir (`experiments/sweep.py` wrote its `sweep.json`);
OUT defaults to DIR/report for one DIR and must be given for several. Reads
every run's `summary.json`, `metrics.jsonl` (eval loss vs step) and
`events.jsonl` (decoupled runs), and writes, per sweep:

  - a table: per cell, the sweep's metric as mean +- standard error over seeds
    and its relative change vs the reference cell, then the sweep's columns;
  - its checks: each claim of the paper the sweep tests, stated supported or
    not supported by these runs, with the numbers;
  - the figures it asks for (`figures` in the sweep): `loss_curves` (eval loss
    vs tokens, mean and +-1 s.e. band over seeds), `bytes` (MB per learner and
    peak upload per learner-step), `goodput_vs_chips` (by M, with the
    data-parallel baselines and the paper's numbers for them),
    `utilisation_vs_bandwidth`, `timeline` (one run's events.jsonl: per learner
    busy, down and slice failures, and the merges of every fragment), `routing`
    (a mixture of experts' `routing/*` diagnostics at each eval, by cell, mean
    over seeds; decoupled/router_probe.py says what each measures),
    `gap_vs_tokens` (cells named `{kind}_x{scale}`: each kind's metric relative
    to the reference kind's at the same scale, vs tokens, with a line fitted in
    log tokens).

Check kinds (dicts in the sweep's `checks`; `metric` defaults to the sweep's):
  within a b tol         |mean(a)/mean(b) - 1| <= tol
  within_abs a b tol     |mean(a) - mean(b)| <= tol (in the metric's own units: 0.01 of
                         accuracy is one point)
  not_worse a b tol      a is at most tol (relative) worse than b
  worse a b tol          a is more than tol (relative) worse than b
  recovers bad fixed good share   fixed closes >= share of bad's gap to good
  lowest a among         mean(a) is the lowest of `among`
  at_least a value       mean(a) >= value
  increasing cells       means rise along `cells` (higher is better) or fall
  dominates a b tol      a[i] is no worse than b[i] for every i
  stays_above a series b reference   at every eval step both cells logged, a's eval
                         series `series` (mean over seeds) >= b's series `reference`
                         (mean over seeds) at that step
"Worse" follows `higher_is_better` (default: True for goodput, uptime and
utilisation, False otherwise); values equal up to float round-off are equal.
Figures are made with matplotlib's Agg backend.
"""

import collections
import csv
import datetime
import json
import math
import os
import platform
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags

from decoupled_diloco import metrics

_OUT = flags.DEFINE_string("out", None, "Output folder (default: DIR/report for one DIR).")
_INTO = flags.DEFINE_string("into", None, "A folder with a report.md to add these sweeps to"
                            " (their earlier sections there are replaced; others are kept).")

HIGHER_IS_BETTER = {"goodput", "uptime", "utilisation", "bytes_reduction_vs_dp",
                    "final_eval_accuracy"}
# field -> (label, scale, format) for tables.
FIELDS = {
    "final_eval_loss": ("eval loss (nats/byte)", 1, "{:.4f}"),
    "final_eval_accuracy": ("top-1 accuracy (%)", 100, "{:.2f}"),
    "tokens": ("tokens (M)", 1e-6, "{:.4f}"),
    "images": ("images", 1, "{:.0f}"),
    "goodput": ("goodput (%)", 100, "{:.1f}"),
    "uptime": ("uptime (%)", 100, "{:.1f}"),
    "utilisation": ("utilisation (%)", 100, "{:.1f}"),
    "bytes_per_learner": ("MB per learner", 1e-6, "{:.2f}"),
    "peak_upload_bytes_per_step": ("peak upload MB per learner-step", 1e-6, "{:.3f}"),
    "peak_bytes_per_step": ("peak MB per step", 1e-6, "{:.3f}"),
    "bytes_reduction_vs_dp": ("bytes vs data-parallel (x less)", 1, "{:.0f}"),
    "outer_steps": ("outer steps", 1, "{:.0f}"),
    "mean_contributors_per_merge": ("contributors per merge", 1, "{:.2f}"),
    "virtual_seconds": ("virtual s", 1, "{:.0f}"),
    "dp_non_elastic_progress_at_end": ("DP non-elastic done by then (%)", 100, "{:.0f}"),
    "dp_elastic_progress_at_end": ("DP elastic done by then (%)", 100, "{:.0f}"),
    "link_load": ("link load (demand / capacity)", 1, "{:.2f}"),
    "bytes_up_per_learner": ("GB up per learner", 1e-9, "{:.1f}"),
    "failures": ("slice failures", 1, "{:.0f}"),
    "wall_seconds": ("wall s", 1, "{:.0f}"),
}


# --- reading ----------------------------------------------------------------------------


def peak_upload_bytes(events: list[dict]) -> int | None:
  """The most bytes one learner sent in one inner step (sends follow their step)."""
  step, per = {}, collections.Counter()
  for e in events:
    if e["event"] == "step":
      step[e["learner"]] = e["step"]
    elif e["event"] == "send":
      per[(e["learner"], step.get(e["learner"], 0))] += e.get("bytes", 0)
  return max(per.values()) if per else None


def load_run(workdir: str) -> dict | None:
  """A run's summary with derived fields and its eval curve, or None if unfinished."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    s = json.load(f)
  config = s.get("config", {})
  if "bytes_up" in s and "diloco" in config:
    s["bytes_per_learner"] = (s["bytes_up"] + s["bytes_down"]) / config["diloco"]["num_learners"]
  events_path = os.path.join(workdir, "events.jsonl")
  if os.path.exists(events_path):
    peak = peak_upload_bytes(metrics.read_jsonl(events_path))
    if peak is not None:
      s["peak_upload_bytes_per_step"] = peak
  evals, series = {}, collections.defaultdict(dict)
  for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    if "eval_loss" in r:
      evals[r["step"]] = r["eval_loss"]  # A resumed run rewrites later steps: last wins.
      for k, v in r.items():
        if k.startswith("routing/"):
          series[k][r["step"]] = v
  s["_evals"], s["_series"] = evals, dict(series)
  s["_workdir"] = workdir
  return s


def load_sweep(workdir: str) -> dict:
  path = os.path.join(workdir, "sweep.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a sweep's --workdir?")
  with open(path) as f:
    sweep = json.load(f)
  sweep["workdir"] = workdir
  sweep["runs"] = {c["name"]: {} for c in sweep["cells"]}
  sweep["missing"] = []
  for c in sweep["cells"]:
    for seed in sweep["seeds"]:
      wd = os.path.join(workdir, c["name"], f"seed_{seed}")
      run = load_run(wd)
      if run is None:
        sweep["missing"].append(f"{c['name']} seed {seed}")
      else:
        sweep["runs"][c["name"]][seed] = run
  return sweep


# --- statistics and checks --------------------------------------------------------------


def stats(values) -> tuple[float, float, int]:
  """(mean, standard error, n) of the finite values; nan if none."""
  v = np.array([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if not v.size:
    return math.nan, math.nan, 0
  se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
  return float(v.mean()), se, int(v.size)


def cell_stats(sweep: dict, cell: str, metric: str) -> tuple[float, float, int]:
  return stats([r.get(metric) for r in sweep["runs"].get(cell, {}).values()])


def difference_stats(sweep: dict, a: str, b: str, metric: str) -> tuple[float, float, str]:
  """(mean of a - b, its standard error, how it was taken).

  Paired over the seeds both cells ran when there are two or more (a seed fixes the
  initialisation and the data order, which move the loss more than most ablations
  do); otherwise the two cells' standard errors combined.
  """
  runs = sweep["runs"]
  value = lambda c, s: runs.get(c, {}).get(s, {}).get(metric)
  ok = lambda x: x is not None and np.isfinite(x)
  common = [s for s in runs.get(a, {}) if ok(value(a, s)) and ok(value(b, s))]
  if len(common) >= 2:
    mean, se, n = stats([value(a, s) - value(b, s) for s in common])
    return mean, se, f"paired over {n} seeds"
  (ma, sa, _), (mb, sb, _) = cell_stats(sweep, a, metric), cell_stats(sweep, b, metric)
  return ma - mb, math.hypot(sa, sb), "unpaired"


def _series_means(sweep: dict, cell: str, key: str) -> dict[int, float]:
  """{eval step: mean over the cell's runs that logged `key` then} of eval series `key`."""
  at = collections.defaultdict(list)
  for r in sweep["runs"][cell].values():
    for step, v in r.get("_series", {}).get(key, {}).items():
      at[step].append(v)
  return {step: float(np.mean(v)) for step, v in at.items()}


def _num(field: str, value: float) -> str:
  if value is None or not np.isfinite(value):
    return "n/a"
  _, scale, fmt = FIELDS.get(field, (field, 1, "{:.4g}"))
  return fmt.format(value * scale)


def _ms(field: str, mean: float, se: float) -> str:
  if not np.isfinite(mean):
    return "n/a"
  return _num(field, mean) + (f" ± {_num(field, se)}" if se else "")


def _worse_by(a: float, b: float, higher: bool) -> float:
  """How much worse a is than b, relative to b (negative: better); 0 for values equal
  but for float round-off (the same quantity reached by different float paths)."""
  if math.isclose(a, b, rel_tol=1e-9):
    return 0.0
  return (b - a) / abs(b) if higher else (a - b) / abs(b)


def evaluate_check(sweep: dict, check: dict) -> tuple[str, str]:
  """(verdict, numbers): `supported`, `not supported` or `no data`.

  Pairwise claims add `(within noise)` when moving the relative difference by two
  standard errors of the difference (`difference_stats`) either way would change the
  verdict.
  """
  metric = check.get("metric", sweep["metric"])
  higher = check.get("higher_is_better", metric in HIGHER_IS_BETTER)
  kind = check["kind"]
  st = lambda c: cell_stats(sweep, c, metric)
  desc = lambda c: f"{c} {_ms(metric, *st(c)[:2])}"
  names = [check[k] for k in ("a", "b", "bad", "fixed", "good") if k in check]
  names += list(check.get("among", [])) + list(check.get("cells", []))
  if kind == "dominates":
    names += list(check["a"]) + list(check["b"])
    names = [n for n in names if isinstance(n, str)]
  if any(st(n)[2] == 0 for n in names):
    return "no data", "missing: " + ", ".join(n for n in names if st(n)[2] == 0)
  verdict = lambda ok: "supported" if ok else "not supported"
  if kind in ("within", "within_abs", "not_worse", "worse"):
    mb = st(check["b"])[0]
    tol = check.get("tol", 0.0)
    diff, diff_se, how = difference_stats(sweep, check["a"], check["b"], metric)
    rel, rel_se = diff / abs(mb), diff_se / abs(mb)  # Paired or not, as its s.e.
    noise = f"; difference {_num(metric, diff)} ± {_num(metric, diff_se)} (s.e., {how})"
    text = f"{desc(check['a'])} vs {desc(check['b'])}: {100 * rel:+.2f}%"
    # The bound is on the relative difference, or (within_abs) on the difference itself.
    x, x_se = (diff, diff_se) if kind == "within_abs" else (rel, rel_se)
    if kind == "within_abs":
      text = (f"{desc(check['a'])} vs {desc(check['b'])}:"
              f" {'-' if diff < 0 else '+'}{_num(metric, abs(diff))}")
      holds = lambda r: abs(r) <= tol
      bound = f"bound ±{_num(metric, tol)}"
    elif kind == "within":
      holds = lambda r: abs(r) <= tol
      bound = f"bound ±{100 * tol:g}%"
    else:
      sign = -1 if higher else 1  # _worse_by(a, b) is sign * rel.
      holds = ((lambda r: sign * r <= tol) if kind == "not_worse" else
               (lambda r: sign * r > tol))
      bound = (f"worse by at most {100 * tol:g}% allowed" if kind == "not_worse" else
               f"must be worse by more than {100 * tol:g}%")
    # A verdict that some value within two standard errors would flip is reported as
    # such: test the interval's ends, and the bounds that fall inside it.
    lo, hi = x - 2 * x_se, x + 2 * x_se
    points = [lo, hi] + [t for t in (-tol, tol) if lo <= t <= hi]
    firm = all(holds(r) == holds(x) for r in points)
    return (verdict(holds(x)) + ("" if firm else " (within noise)"),
            f"{text} ({bound}){noise}")
  if kind == "recovers":
    bad, fixed, good = (st(check[k])[0] for k in ("bad", "fixed", "good"))
    sign = -1 if higher else 1
    gap = sign * (bad - good)
    share = sign * (bad - fixed) / gap if gap else math.nan
    text = (f"{desc(check['bad'])}, {desc(check['fixed'])}, {desc(check['good'])}:"
            f" recovers {100 * share:.0f}% of a {100 * gap / abs(good):.2f}% gap"
            f" (needs >= {100 * check['share']:.0f}%)")
    return verdict(gap > 0 and share >= check["share"]), text
  if kind == "lowest":
    means = {c: st(c)[0] for c in check["among"]}
    ok = all(_worse_by(means[check["a"]], m, higher=False) <= 0 for m in means.values())
    return verdict(ok), ", ".join(desc(c) for c in check["among"])
  if kind == "at_least":
    ok = st(check["a"])[0] >= check["value"]
    return verdict(ok), f"{desc(check['a'])} (needs >= {_num(metric, check['value'])})"
  if kind == "increasing":
    means = [st(c)[0] for c in check["cells"]]
    ok = all(_worse_by(b, a, higher) <= 0 for a, b in zip(means, means[1:]))
    return verdict(ok), ", then ".join(desc(c) for c in check["cells"])
  if kind == "stays_above":
    a, b = (_series_means(sweep, check[c], check[k])
            for c, k in (("a", "series"), ("b", "reference")))
    steps = sorted(set(a) & set(b))
    if not steps:
      return "no data", (f"missing: {check['series']} of {check['a']} or"
                         f" {check['reference']} of {check['b']} at a common eval step")
    margins = [a[t] - b[t] for t in steps]
    held, i = sum(m >= 0 for m in margins), int(np.argmin(margins))
    return verdict(held == len(steps)), (
        f"{check['series']} of {check['a']} >= {check['reference']} of {check['b']} at"
        f" {held} of {len(steps)} evals (means over seeds); closest at step {steps[i]}:"
        f" {a[steps[i]]:.4f} vs {b[steps[i]]:.4f}")
  if kind == "dominates":
    tol = check.get("tol", 0.0)
    worse = [_worse_by(st(a)[0], st(b)[0], higher) for a, b in zip(check["a"], check["b"])]
    held = sum(w <= tol for w in worse)
    i = int(np.argmax(worse))
    return verdict(held == len(worse)), (
        f"holds at {held} of {len(worse)} points; closest: {desc(check['a'][i])} vs"
        f" {desc(check['b'][i])}")
  raise ValueError(f"check kind {kind!r} is unknown; see experiments/report.py.")


# --- figures ----------------------------------------------------------------------------


def _save(fig, out: str, name: str) -> str:
  fig.tight_layout()
  fig.savefig(os.path.join(out, name), dpi=110)
  plt.close(fig)
  return name


def fig_loss_curves(sweep: dict, out: str) -> str | None:
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = False
  for c in sweep["cells"]:
    runs = list(sweep["runs"][c["name"]].values())
    if not runs:
      continue
    steps = sorted(set.intersection(*(set(r["_evals"]) for r in runs)))
    if not steps:
      continue
    tokens_per_step = runs[0]["tokens"] / max(runs[0]["steps"], 1)
    loss = np.array([[r["_evals"][s] for s in steps] for r in runs])
    mean = loss.mean(0)
    se = loss.std(0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
    x = np.array(steps) * tokens_per_step / 1e6
    line, = ax.plot(x, mean, marker="o", ms=3, label=f"{c['name']} (n={len(runs)})")
    ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    drawn = True
  if not drawn:
    plt.close(fig)
    return None
  ax.set_xlabel("tokens (millions)")
  ax.set_ylabel("eval loss (nats/byte)")
  ax.set_title(f"{sweep['title']}\nmean over seeds, band ±1 s.e.", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out, f"{sweep['name']}_loss_vs_tokens.png")


def fig_bytes(sweep: dict, out: str) -> str | None:
  names = [c["name"] for c in sweep["cells"] if sweep["runs"][c["name"]]]
  if not names:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(9, 4))
  for ax, field in zip(axes, ("bytes_per_learner", "peak_upload_bytes_per_step")):
    means = [cell_stats(sweep, n, field)[0] * 1e-6 for n in names]
    ax.bar(names, means, color="tab:blue")
    ax.set_ylabel(FIELDS[field][0])
    ax.set_xlabel("cell")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_title("bytes up + down per learner (MB)", fontsize=10)
  axes[1].set_title("peak upload in one step (MB)", fontsize=10)
  fig.suptitle(sweep["title"], fontsize=10)
  return _save(fig, out, f"{sweep['name']}_bytes.png")


def _config(sweep: dict, cell: str) -> dict:
  runs = sweep["runs"][cell]
  return next(iter(runs.values()))["config"] if runs else {}


def fig_goodput_vs_chips(sweep: dict, out: str) -> str | None:
  series = collections.defaultdict(list)  # label -> [(chips, mean, se)]
  for c in sweep["cells"]:
    cfg = _config(sweep, c["name"])
    if not cfg:
      continue
    label = (f"Decoupled DiLoCo, M = {cfg['num_learners']}" if cfg["method"] == "decoupled"
             else {"dp_non_elastic": "data-parallel", "dp_elastic": "elastic data-parallel"}[
                 cfg["method"]])
    mean, se, _ = cell_stats(sweep, c["name"], "goodput")
    series[label].append((cfg["num_chips"], 100 * mean, 100 * se))
  if not series:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, pts in series.items():
    pts.sort()
    x, y, e = zip(*pts)
    style = "--" if "data-parallel" in label else "-"
    ax.errorbar(x, y, yerr=e, fmt=style, marker="o", ms=4, capsize=2, label=label)
  from experiments.goodput_table import CHIP_COUNTS, PAPER_ELASTIC, PAPER_NON_ELASTIC  # pylint: disable=g-import-not-at-top
  ax.plot(CHIP_COUNTS, PAPER_NON_ELASTIC, "kx", label="paper: data-parallel")
  ax.plot(CHIP_COUNTS, PAPER_ELASTIC, "k+", ms=9, label="paper: elastic data-parallel")
  ax.set_xscale("log")
  ax.set_xlabel("chips (log scale)")
  ax.set_ylabel("goodput (% of allocated chip-time)")
  ax.set_ylim(0, 102)
  ax.set_title("Goodput vs chips (per-chip MTBI 1 year); mean ± s.e. over failure seeds",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower left")
  return _save(fig, out, f"{sweep['name']}_goodput_vs_chips.png")


def fig_utilisation_vs_bandwidth(sweep: dict, out: str) -> str | None:
  series = collections.defaultdict(list)
  for c in sweep["cells"]:
    cfg = _config(sweep, c["name"])
    if not cfg:
      continue
    label = c["name"].rsplit("_", 1)[0]
    series[label].append((cfg["bandwidth_gbps"],
                          100 * cell_stats(sweep, c["name"], "utilisation")[0]))
  if not series:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, pts in series.items():
    pts.sort()
    x, y = zip(*pts)
    ax.plot(x, y, marker="o", ms=4, label=label)
  ax.set_xscale("log")
  ax.set_xlabel("link bandwidth per learner (Gbit/s, log scale)")
  ax.set_ylabel("compute utilisation (%)")
  ax.set_ylim(0, 102)
  ax.set_title(sweep["title"], fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out, f"{sweep['name']}_utilisation_vs_bandwidth.png")


def fig_timeline(sweep: dict, out: str) -> str | None:
  runs = sweep["runs"].get(sweep.get("timeline_cell") or "", {})
  if not runs:
    return None
  seed = min(runs)
  events = metrics.read_jsonl(os.path.join(runs[seed]["_workdir"], "events.jsonl"))
  if not events:
    return None
  num_learners = runs[seed]["config"]["diloco"]["num_learners"]
  end = max(e["t"] for e in events)
  busy = collections.defaultdict(list)
  down, fails, merges = collections.defaultdict(list), collections.defaultdict(list), []
  down_since = {}
  for e in events:
    kind, m = e["event"], e.get("learner")
    if kind == "step":
      busy[m].append((e["t"] - e["seconds"], e["seconds"]))
    elif kind == "down":
      down_since[m] = e["t"]
    elif kind == "rejoin" and m in down_since:
      start = down_since.pop(m)
      down[m].append((start, e["t"] - start))
    elif kind == "fail":
      fails[m].append(e["t"])
    elif kind == "merge":
      merges.append((e["t"], e["fragment"]))
  for m, start in down_since.items():
    down[m].append((start, end - start))
  fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True,
                                gridspec_kw={"height_ratios": [1.3, 1]})
  for m in range(num_learners):
    ax.broken_barh(busy[m], (m - 0.35, 0.7), color="tab:green", label="busy" if m == 0 else None)
    ax.broken_barh(down[m], (m - 0.35, 0.7), color="tab:red", label="down" if m == 0 else None)
    if fails[m]:
      ax.plot(fails[m], [m + 0.42] * len(fails[m]), "kv", ms=4,
              label="slice failure" if not any(fails[k] for k in range(m)) else None)
  ax.set_yticks(range(num_learners), [f"learner {m}" for m in range(num_learners)])
  ax.set_ylabel("learner (white: waiting or stopped)")
  ax.legend(fontsize=7, loc="upper right", ncol=3)
  ax.set_title(f"{sweep['name']} / {sweep['timeline_cell']} seed {seed}: events.jsonl",
               fontsize=10)
  if merges:
    t, p = zip(*merges)
    ax2.plot(t, p, "|", color="tab:blue", ms=6, label="merge")
  ax2.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax2.set_xlabel("virtual time (s)")
  ax2.set_ylabel("fragment merged")
  ax2.grid(alpha=0.3)
  return _save(fig, out, f"{sweep['name']}_timeline.png")


ROUTING_PANELS = (  # (series, title) of the `routing` figure.
    ("routing/topk_overlap_learners", "top-k overlap between learners"),
    ("routing/topk_overlap_global", "top-k overlap, learners vs global"),
    ("routing/topk_overlap_since_last_eval", "top-k overlap with the last eval"),
    ("routing/routing_js_learners", "JS divergence between learners (bits)"),
    ("routing/router_distance", "router distance (relative)"),
    ("routing/utilisation_entropy_global", "utilisation entropy, global"),
    ("routing/utilisation_entropy_after_merge", "utilisation entropy after merges"),
    ("routing/loss_jump_after_alignment", "loss jump after alignment (nats)"),
)


def fig_routing(sweep: dict, out: str) -> str | None:
  fig, axes = plt.subplots(2, 4, figsize=(14, 6))
  drawn = set()
  for n, c in enumerate(sweep["cells"]):  # One colour per cell in every panel.
    runs = [r for r in sweep["runs"][c["name"]].values() if r.get("_series")]
    for ax, (key, title) in zip(axes.flat, ROUTING_PANELS):
      curves = [r["_series"].get(key, {}) for r in runs]
      steps = sorted(set.intersection(*(set(v) for v in curves))) if curves else []
      if not steps:
        continue
      values = np.array([[v[t] for t in steps] for v in curves])
      ax.plot(steps, values.mean(0), marker="o", ms=2, color=f"C{n % 10}",
              label=f"{c['name']} (n={len(runs)})")
      ax.set_title(title, fontsize=9)
      drawn.add(c["name"])
  if not drawn:
    plt.close(fig)
    return None
  for ax in axes.flat:
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
  for ax in axes[1]:
    ax.set_xlabel("step", fontsize=8)
  legend = {}  # One entry per cell, from whichever panels it is drawn in.
  for ax in axes.flat:
    legend.update({label: h for h, label in zip(*ax.get_legend_handles_labels())})
  handles, labels = list(legend.values()), list(legend)
  fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels))
  fig.suptitle(f"{sweep['title']}: routing on a fixed probe batch, mean over seeds",
               fontsize=10)
  fig.tight_layout(rect=(0, 0.06, 1, 0.96))
  fig.savefig(os.path.join(out, f"{sweep['name']}_routing.png"), dpi=110)
  plt.close(fig)
  return f"{sweep['name']}_routing.png"


def fig_gap_vs_tokens(sweep: dict, out: str) -> str | None:
  """Each cell `{kind}_x{scale}`'s loss relative to `{reference kind}_x{scale}`, vs tokens,
  with a least-squares line in log tokens per kind."""
  reference = sweep["reference"].rsplit("_x", 1)[0]
  gaps = collections.defaultdict(list)  # kind -> [(tokens, gap %, s.e. %)]
  for c in sweep["cells"]:
    kind, _, scale = c["name"].rpartition("_x")
    base = f"{reference}_x{scale}"
    if kind == reference or not sweep["runs"].get(c["name"]) or not sweep["runs"].get(base):
      continue
    mean, se, _ = cell_stats(sweep, c["name"], sweep["metric"])
    ref, ref_se, _ = cell_stats(sweep, base, sweep["metric"])
    tokens = next(iter(sweep["runs"][c["name"]].values()))["tokens"]
    gaps[kind].append((tokens, 100 * (mean / ref - 1),
                       100 * math.hypot(se / ref, mean * ref_se / ref**2)))
  if not gaps:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for kind, pts in sorted(gaps.items()):
    pts.sort()
    x, y, e = (np.array(v) for v in zip(*pts))
    line = ax.errorbar(x / 1e6, y, yerr=e, fmt="o", capsize=2, label=kind)[0]
    if len(pts) > 1:
      slope, intercept = np.polyfit(np.log10(x), y, 1)
      fit = np.geomspace(x.min(), x.max() * 4, 20)
      ax.plot(fit / 1e6, slope * np.log10(fit) + intercept, "--", color=line.get_color(),
              label=f"{kind}: {slope:+.1f} points per 10x tokens")
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xscale("log")
  ax.set_xlabel("tokens (millions, log scale)")
  ax.set_ylabel(f"eval loss vs {reference} (%)")
  ax.set_title(f"{sweep['title']}\nmean over seeds, ±1 s.e.; dashed: fit in log tokens",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out, f"{sweep['name']}_gap_vs_tokens.png")


FIGURES = {"loss_curves": fig_loss_curves, "bytes": fig_bytes,
           "gap_vs_tokens": fig_gap_vs_tokens,
           "goodput_vs_chips": fig_goodput_vs_chips,
           "utilisation_vs_bandwidth": fig_utilisation_vs_bandwidth, "timeline": fig_timeline,
           "routing": fig_routing}


# --- writing ----------------------------------------------------------------------------


def table(sweep: dict) -> list[str]:
  metric = sweep["metric"]
  ref, _, _ = cell_stats(sweep, sweep["reference"], metric)
  columns = [c for c in sweep["columns"]
             if any(c in r for runs in sweep["runs"].values() for r in runs.values())]
  head = (["cell", "seeds", FIELDS.get(metric, (metric,))[0] + " (mean ± s.e.)",
           f"vs {sweep['reference']}"] + [FIELDS.get(c, (c,))[0] for c in columns])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for c in sweep["cells"]:
    mean, se, n = cell_stats(sweep, c["name"], metric)
    rel = ("reference" if c["name"] == sweep["reference"] else
           f"{100 * (mean / ref - 1):+.2f}%" if np.isfinite(mean) and np.isfinite(ref) else "n/a")
    row = [c["name"], str(n), _ms(metric, mean, se), rel]
    row += [_num(col, cell_stats(sweep, c["name"], col)[0]) for col in columns]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def csv_rows(sweeps: list[dict]) -> list[dict]:
  rows = []
  for sweep in sweeps:
    overrides = {c["name"]: c["overrides"] for c in sweep["cells"]}
    for cell, runs in sweep["runs"].items():
      for seed, r in sorted(runs.items()):
        row = {"sweep": sweep["name"], "cell": cell, "seed": seed,
               "overrides": json.dumps(overrides[cell], sort_keys=True),
               "run": os.path.relpath(r["_workdir"], sweep["workdir"])}
        row.update({k: v for k, v in r.items()
                    if not k.startswith("_") and isinstance(v, (int, float, str, bool))
                    or v is None and not k.startswith("_")})
        rows.append(row)
  return rows


def write_csv(rows: list[dict], path: str) -> None:
  lead = ["sweep", "cell", "seed"]
  keys = lead + sorted({k for r in rows for k in r} - set(lead))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, restval="")
    w.writeheader()
    w.writerows(rows)


# Runs made before `data.sharding` existed: each learner read its contiguous block of the
# corpus, windows at random offsets (the reader before data/reader.py).
_BEFORE_SHARDING = "contiguous (made before data.sharding: random-offset windows)"


def parts(sweeps: list[dict], out: str) -> tuple[list[str], list[str], list[str]]:
  """(the sweeps' command lines, their rows of the checks table, their sections)."""
  commands = [f"- {s['name']}: `{s['command']}`" for s in sweeps]
  rows, sections = [], []
  verdicts = {}
  for s in sweeps:
    for check in s["checks"]:
      verdicts[(s["name"], check["claim"])] = v = evaluate_check(s, check)
      rows.append(f"| {s['name']} | {check['claim']} | **{v[0]}** | {v[1]} |")
  for s in sweeps:
    sections += ["", f"## {s['title']}", ""]
    if s.get("notes"):
      sections += [s["notes"], ""]
    seeds = ",".join(str(x) for x in s["seeds"])
    sections += [f"Command: `{s['command']}` (seeds {seeds}; reference cell `{s['reference']}`;"
                 f" sweep file `{s['sweep_file']}`).", ""]
    if s["set"]:
      sections += [f"Every cell also set: `{json.dumps(s['set'], sort_keys=True)}`.", ""]
    sharding = {r.get("config", {}).get("data", {}).get("sharding", _BEFORE_SHARDING)
                for runs in s["runs"].values() for r in runs.values()}
    sections += [f"Data: `data.sharding` {', '.join(sorted(sharding))}.", ""]
    sections += table(s)
    if s["missing"]:
      sections += ["", f"Not finished (left out): {', '.join(s['missing'])}."]
    if s["checks"]:
      sections += ["", "Checks:", ""]
      sections += [f"- {c['claim']}: **{verdicts[(s['name'], c['claim'])][0]}**;"
                   f" {verdicts[(s['name'], c['claim'])][1]}" for c in s["checks"]]
    for kind in s["figures"]:
      name = FIGURES[kind](s, out)
      if name:
        sections += ["", f"![{kind}]({name})"]
  return commands, rows, sections


def render(sweeps: list[dict], out: str, command: str) -> str:
  os.makedirs(out, exist_ok=True)
  commands, rows, sections = parts(sweeps, out)
  lines = ["# Ablations of Decoupled DiLoCo", "",
           f"Written by `{command}` on {datetime.date.today().isoformat()}"
           f" ({platform.machine()}, {os.cpu_count()} CPUs, Python"
           f" {platform.python_version()}). Sweeps, each run with:", ""]
  lines += commands
  lines += ["", "Every run of every cell, one row each: [cells.csv](cells.csv).", "",
            "## The paper's trends, checked", "",
            "A verdict marked *(within noise)* would change if the difference moved by two"
            " standard errors: more seeds decide it. Differences are paired by seed where"
            " both cells ran the same seeds (a seed fixes the initialisation and the data"
            " order).", "",
            "| sweep | claim | this run | numbers |", "|---|---|---|---|"]
  lines += rows + sections
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  write_csv(csv_rows(sweeps), os.path.join(out, "cells.csv"))
  return path


def merge_into(sweeps: list[dict], out: str, command: str) -> str:
  """Adds `sweeps` to the report already in `out`, replacing their earlier versions.

  The other sweeps' lines, rows and figures stay as they are, so one sweep can
  be added or re-run without the run folders of the others.
  """
  path = os.path.join(out, "report.md")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--into={out}: no report.md there to merge into.")
  with open(path) as f:
    lines = f.read().splitlines()
  names = {s["name"] for s in sweeps}
  titles = {f"## {s['title']}" for s in sweeps}
  commands, rows, sections = parts(sweeps, out)
  merged = (f"Sections {', '.join(sorted(names))} merged in by `{command}` on"
            f" {datetime.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()}"
            f" CPUs, Python {platform.python_version()}).")
  kept, skipping = [], False
  for line in lines:  # Drops these sweeps' earlier command lines, rows, sections and note.
    if line.startswith("## "):
      skipping = line in titles
    if (skipping or any(line.startswith((f"- {n}: `", f"| {n} |")) for n in names)
        or line.startswith("Sections ") and " merged in by `" in line
        and set(line[len("Sections "):line.index(" merged in")].split(", ")) <= names):
      continue
    if not (line == "" and kept and kept[-1] == ""):
      kept.append(line)
  while kept and not kept[-1]:
    kept.pop()
  header = kept[:kept.index("## The paper's trends, checked")]
  last_command = max(i for i, l in enumerate(header) if l.startswith("- ") and l.endswith("`"))
  kept[last_command + 1:last_command + 1] = commands + ["", merged]
  table_start = kept.index("| sweep | claim | this run | numbers |")
  table_end = next(i for i in range(table_start, len(kept) + 1)
                   if i == len(kept) or not kept[i].startswith("|"))
  kept[table_end:table_end] = rows
  with open(path, "w") as f:
    f.write("\n".join(kept + sections) + "\n")
  cells = os.path.join(out, "cells.csv")
  with open(cells, newline="") as f:
    old = [r for r in csv.DictReader(f) if r["sweep"] not in names]
  write_csv(old + csv_rows(sweeps), cells)
  return path


def main(argv):
  dirs = argv[1:]
  if not dirs:
    raise app.UsageError("give one or more sweep workdirs: python -m experiments.report DIR...")
  if _INTO.value and _OUT.value:
    raise app.UsageError("give --out (a new report) or --into (an existing one), not both.")
  if len(dirs) > 1 and not (_OUT.value or _INTO.value):
    raise app.UsageError("--out is required with several sweep workdirs.")
  out = _INTO.value or _OUT.value or os.path.join(dirs[0], "report")
  sweeps = [load_sweep(os.path.abspath(d)) for d in dirs]
  command = " ".join(["python -m experiments.report"] + sys.argv[1:])
  path = (merge_into if _INTO.value else render)(sweeps, out, command)
  print(f"wrote {path}, {out}/cells.csv and the figures")

if __name__ == "__main__":
  app.run(main)
