"""Failure model, outage sampling and the data-parallel goodput baselines."""

import math

import numpy as np
import pytest

from decoupled_diloco.runtime import baselines
from decoupled_diloco.runtime import chaos

EMPTY = chaos.Outages(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))


def _outages(*rows):
  """Outages from (slice, start, end) rows, sorted by start."""
  rows = sorted(rows, key=lambda r: (r[1], r[0]))
  return chaos.Outages(np.array([r[0] for r in rows], np.int64),
                       np.array([r[1] for r in rows], float),
                       np.array([r[2] for r in rows], float))


# --- Sampling -----------------------------------------------------------------


def test_sampling_is_deterministic_for_a_seed():
  model = chaos.FailureModel()
  a = chaos.sample_outages(model, 500, 1e6, seed=7)
  b = chaos.sample_outages(model, 500, 1e6, seed=7)
  c = chaos.sample_outages(model, 500, 1e6, seed=8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert a.start.size != c.start.size or not np.array_equal(a.start, c.start)


def test_outages_are_sorted_within_horizon_and_never_overlap_on_a_slice():
  o = chaos.sample_outages(chaos.FailureModel(), 300, 2e6, seed=1)
  assert np.all(np.diff(o.start) >= 0)
  assert np.all((o.start >= 0) & (o.start < 2e6) & (o.end > o.start))
  assert np.all((o.slice >= 0) & (o.slice < 300))
  by_slice = np.lexsort((o.start, o.slice))
  s, start, end = o.slice[by_slice], o.start[by_slice], o.end[by_slice]
  same = s[1:] == s[:-1]
  assert np.all(start[1:][same] >= end[:-1][same])


def test_failure_count_matches_the_poisson_rate():
  # With negligible repairs each slice fails as a Poisson process of rate
  # chips_per_slice / MTBI, so the total count is Poisson(mu).
  model = chaos.FailureModel(repair_median_s=1e-6, repair_sigma=0.0)
  num_slices, horizon_s = 2000, 5e6
  mu = num_slices * model.slice_failure_rate * horizon_s  # ~81k.
  o = chaos.sample_outages(model, num_slices, horizon_s, seed=3)
  assert abs(o.start.size - mu) < 5 * math.sqrt(mu)  # 5 sigma: p < 1e-6.


def test_up_times_are_exponential_with_the_slice_rate():
  model = chaos.FailureModel()
  o = chaos.sample_outages(model, 2000, 3e6, seed=4)
  order = np.lexsort((o.start, o.slice))
  s, start, end = o.slice[order], o.start[order], o.end[order]
  same = s[1:] == s[:-1]
  # Gaps between a repair and the next failure of that slice; a gap that
  # would run past the horizon is not seen, so keep repairs well before it.
  done = end[:-1][same]
  early = done < 1e6
  gaps = (start[1:][same] - done)[early]
  mean_up = 1 / model.slice_failure_rate
  # Completed gaps starting before 1e6 are censored at 2e6 s from the start
  # at the earliest: 16 mean up-times, so the bias is below 1e-6.
  standard_error = mean_up / math.sqrt(gaps.size)
  assert abs(gaps.mean() - mean_up) < 5 * standard_error


def test_repair_times_have_the_configured_median_and_spread():
  model = chaos.FailureModel(repair_median_s=1800.0, repair_sigma=1.2)
  o = chaos.sample_outages(model, 3000, 2e6, seed=5)
  log_repair = np.log(o.end - o.start)
  n = log_repair.size
  # Standard error of a sample median of a normal: sigma * sqrt(pi / 2n).
  se_median = 1.2 * math.sqrt(math.pi / (2 * n))
  assert abs(np.median(log_repair) - math.log(1800.0)) < 5 * se_median
  assert abs(log_repair.std() - 1.2) < 5 * 1.2 / math.sqrt(2 * n)


def test_sampling_2_4m_chips():  # Its speed is benchmarked (bench_simulator), not timed here.
  model = chaos.FailureModel()
  o = chaos.sample_outages(model, model.num_slices(2_400_000), 1e6, seed=0)
  assert o.start.size > 50_000


# --- Learners -----------------------------------------------------------------


def test_learners_own_contiguous_disjoint_blocks():
  assert chaos.slices_of_learner(2, 4) == range(8, 12)
  covered = [s for m in range(5) for s in chaos.slices_of_learner(m, 3)]
  assert covered == list(range(15))


def test_outages_of_a_learner():
  o = _outages((0, 1.0, 2.0), (4, 3.0, 5.0), (5, 4.0, 6.0), (8, 7.0, 9.0))
  mine = chaos.outages_of(o, chaos.slices_of_learner(1, 4))
  np.testing.assert_array_equal(mine.slice, [4, 5])
  np.testing.assert_array_equal(mine.start, [3.0, 4.0])


def test_group_that_loses_every_slice_pays_a_restart_to_come_back():
  model = chaos.FailureModel(reconfiguration_s=10.0, restart_s=50.0)
  o = _outages((0, 100.0, 200.0), (1, 150.0, 300.0))
  line = chaos.elastic_timeline(o, range(2), 1000.0, model)
  # Stops: [100, 110) and [150, 160) on failures, [200, 250) restarting from
  # zero slices, [300, 310) re-adding slice 1.
  seconds = line.end - line.start
  useful = np.sum(seconds * line.slices_up * line.running)
  assert useful == pytest.approx(2 * 100 + 1 * 40 + 1 * 50 + 2 * 690)
  assert line.num_reconfigurations == 4
  assert line.start[0] == 0.0 and line.end[-1] == 1000.0
  np.testing.assert_array_equal(line.start[1:], line.end[:-1])


def _reference_elastic_goodput(o, num_slices, horizon_s, model):
  """Event loop with a fine time grid; slow, obviously right."""
  events = sorted([(t, -1) for t in o.start if t < horizon_s]
                  + [(t, +1) for t in o.end if t < horizon_s])
  stops, stop_end, up = [], -math.inf, num_slices
  for t, change in events:
    was = up
    up += change
    if t >= stop_end:
      length = model.restart_s if was == 0 else model.reconfiguration_s
      stop_end = t + length
      stops.append((t, stop_end))
  grid = np.arange(0.0, horizon_s, 0.25) + 0.125
  down = np.zeros(grid.size)
  for s, e in zip(o.start, o.end):
    down += (grid >= s) & (grid < e)
  stopped = np.zeros(grid.size, bool)
  for s, e in stops:
    stopped |= (grid >= s) & (grid < e)
  return np.mean((num_slices - down) * ~stopped) / num_slices


def test_elastic_timeline_matches_a_reference_loop():
  model = chaos.FailureModel(mtbi_chip_hours=0.5, chips_per_slice=1,
                             repair_median_s=900.0, repair_sigma=1.0,
                             reconfiguration_s=20.0, restart_s=60.0)
  o = chaos.sample_outages(model, 4, 20_000.0, seed=11)
  ours = baselines.elastic(o, model, 4, 20_000.0).goodput
  # Midpoint-grid error: at most 0.125 s times the jump at each of ~150
  # boundaries (1 slice at an event, 4 at a stop): < 5e-4 of 4 * 20000.
  assert ours == pytest.approx(
      _reference_elastic_goodput(o, 4, 20_000.0, model), abs=5e-4)


# --- Baselines ----------------------------------------------------------------


@pytest.mark.parametrize("baseline", [baselines.non_elastic, baselines.elastic])
def test_no_failures_gives_full_goodput(baseline):
  model = chaos.FailureModel(spare_fraction=0.0)
  report = baseline(EMPTY, model, 10, 1000.0)
  assert report.goodput == 1.0 and report.uptime == 1.0
  assert report.num_failures == 0 and report.num_stops == 0


def test_non_elastic_spares_are_allocated_but_idle():
  report = baselines.non_elastic(EMPTY, chaos.FailureModel(spare_fraction=0.2),
                                 10, 1000.0)
  assert report.goodput == 0.8 and report.uptime == 1.0


def test_non_elastic_single_outage_by_hand():
  model = chaos.FailureModel(restart_s=50.0, spare_fraction=0.1)
  one = _outages((3, 100.0, 400.0))
  # Job on slices 0-8, spare 9: stops at 100, swaps in 9, runs again at 150.
  report = baselines.non_elastic(one, model, 10, 1000.0)
  assert report.goodput == pytest.approx(9 * 950 / (10 * 1000))
  assert report.uptime == pytest.approx(0.95)
  assert (report.num_failures, report.num_stops) == (1, 1)
  # Without spares it waits for the repair at 400, restarts until 450.
  no_spares = chaos.FailureModel(restart_s=50.0, spare_fraction=0.0)
  report = baselines.non_elastic(one, no_spares, 10, 1000.0)
  assert report.goodput == pytest.approx((100 + 550) / 1000)
  # A failed spare does not stop the job.
  spare = _outages((9, 100.0, 400.0))
  assert baselines.non_elastic(spare, model, 10, 1000.0).goodput == 0.9


def test_non_elastic_folds_failures_into_a_restart_and_waits_when_dry():
  model = chaos.FailureModel(restart_s=50.0, spare_fraction=0.2)
  two = _outages((3, 100.0, 400.0), (5, 120.0, 300.0))
  # Slice 5 fails during the restart: both are swapped, still back at 150.
  report = baselines.non_elastic(two, model, 10, 1000.0)
  assert report.goodput == pytest.approx(8 * 950 / (10 * 1000))
  assert report.num_stops == 1
  # One spare only: slice 5 has no replacement until its repair at 300.
  one_spare = chaos.FailureModel(restart_s=50.0, spare_fraction=0.1)
  report = baselines.non_elastic(two, one_spare, 10, 1000.0)
  assert report.goodput == pytest.approx(9 * (100 + 650) / (10 * 1000))


def test_elastic_single_and_folded_outages_by_hand():
  model = chaos.FailureModel(reconfiguration_s=10.0)
  one = _outages((3, 100.0, 400.0))
  # Stops [100, 110) and [400, 410); 9 slices train from 110 to 400.
  report = baselines.elastic(one, model, 10, 1000.0)
  assert report.goodput == pytest.approx((10 * 100 + 9 * 290 + 10 * 590) / 1e4)
  assert report.uptime == pytest.approx(0.98)
  assert report.num_stops == 2 and report.stopped_s == pytest.approx(20.0)
  # Slice 5 fails at 105, inside the first stop: folded into it.
  two = _outages((3, 100.0, 400.0), (5, 105.0, 300.0))
  report = baselines.elastic(two, model, 10, 1000.0)
  assert report.goodput == pytest.approx(
      (10 * 100 + 8 * 190 + 9 * 90 + 10 * 590) / 1e4)
  assert report.num_stops == 3


@pytest.mark.parametrize("chips,seed", [(150_000, 0), (1_200_000, 1)])
def test_elastic_beats_non_elastic_on_the_same_draws(chips, seed):
  model = chaos.FailureModel()
  n = model.num_slices(chips)
  o = chaos.sample_outages(model, n, 2e5, seed)
  ne = baselines.non_elastic(o, model, n, 2e5)
  el = baselines.elastic(o, model, n, 2e5)
  assert el.goodput >= ne.goodput
  assert ne.num_failures == el.num_failures == np.sum(o.start < 2e5)


def test_calibrated_model_reproduces_the_paper_within_3_points():
  paper = {150_000: (72, 88), 300_000: (57, 80), 600_000: (38, 69),
           1_200_000: (27, 58), 2_400_000: (18, 40)}
  model = chaos.FailureModel()
  horizon_s = 1000 * chaos.HOUR_S
  for chips, (paper_ne, paper_el) in paper.items():
    n = model.num_slices(chips)
    o = chaos.sample_outages(model, n, horizon_s, seed=0)
    step = chaos.CALIBRATION_STEP_S
    ne = 100 * baselines.non_elastic(o, model, n, horizon_s, step_seconds=step).goodput
    el = 100 * baselines.elastic(o, model, n, horizon_s, step_seconds=step).goodput
    assert abs(ne - paper_ne) <= 3, (chips, ne)
    assert abs(el - paper_el) <= 3, (chips, el)


# --- Validation ---------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("mtbi_chip_hours", 0.0), ("mtbi_chip_hours", math.inf),
    ("chips_per_slice", 0), ("chips_per_slice", 2.5), ("chips_per_slice", True),
    ("repair_median_s", -1.0), ("repair_median_s", math.nan),
    ("repair_sigma", -0.1), ("reconfiguration_s", -1.0), ("restart_s", "60"),
    ("spare_fraction", 1.0), ("spare_fraction", -0.1),
])
def test_invalid_field_raises_naming_it(field, value):
  with pytest.raises(ValueError, match=f"FailureModel.{field}="):
    chaos.FailureModel(**{field: value})


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_slices=0), "num_slices"), (dict(horizon_s=-1.0), "horizon_s"),
    (dict(seed=1.5), "seed"),
])
def test_invalid_sampling_argument_raises_naming_it(kwargs, name):
  args = dict(model=chaos.FailureModel(), num_slices=4, horizon_s=10.0, seed=0)
  with pytest.raises(ValueError, match=f"{name}="):
    chaos.sample_outages(**{**args, **kwargs})


def test_spares_leaving_no_job_raise():
  with pytest.raises(ValueError, match="spare_fraction="):
    baselines.non_elastic(EMPTY, chaos.FailureModel(spare_fraction=0.9), 1, 10.0)


# --- Lost chip-time by cause ----------------------------------------------------


def _assert_accounts_for_everything(report):
  assert set(report.lost_chip_s) == set(baselines.LOSS_CAUSES)
  assert all(v >= 0 for v in report.lost_chip_s.values())
  total = report.useful_chip_s + sum(report.lost_chip_s.values())
  assert total == pytest.approx(report.allocated_chip_s, rel=1e-12)
  assert report.goodput == pytest.approx(
      report.useful_chip_s / report.allocated_chip_s, rel=1e-12)


def test_non_elastic_losses_by_hand():
  model = chaos.FailureModel(chips_per_slice=2, restart_s=50.0, spare_fraction=0.1)
  # Job on slices 0-8, spare 9; slice 3 down over [100, 400), restart [100, 150).
  r = baselines.non_elastic(_outages((3, 100.0, 400.0)), model, 10, 1000.0)
  _assert_accounts_for_everything(r)
  assert r.lost_chip_s["slices_down"] == pytest.approx(2 * 300)
  # Slice 9 swapped in: 9 healthy job slices idle through the restart.
  assert r.lost_chip_s["reconfiguration"] == pytest.approx(2 * 9 * 50)
  # The spare idles until 100; slice 3 is the idle spare after its repair.
  assert r.lost_chip_s["idle_spares"] == pytest.approx(2 * (100 + 600))
  assert r.lost_chip_s["waiting"] == 0.0
  # Without spares: 9 healthy slices wait [100, 400), then restart [400, 450).
  dry = chaos.FailureModel(chips_per_slice=2, restart_s=50.0, spare_fraction=0.0)
  r = baselines.non_elastic(_outages((3, 100.0, 400.0)), dry, 10, 1000.0)
  _assert_accounts_for_everything(r)
  assert r.lost_chip_s["waiting"] == pytest.approx(2 * 9 * 300)
  assert r.lost_chip_s["reconfiguration"] == pytest.approx(2 * 10 * 50)
  assert r.lost_chip_s["idle_spares"] == 0.0


def test_elastic_losses_by_hand():
  model = chaos.FailureModel(chips_per_slice=2, reconfiguration_s=10.0)
  # Stops [100, 110) on 9 slices and [400, 410) on 10; slice 3 down 300 s.
  r = baselines.elastic(_outages((3, 100.0, 400.0)), model, 10, 1000.0)
  _assert_accounts_for_everything(r)
  assert r.lost_chip_s["slices_down"] == pytest.approx(2 * 300)
  assert r.lost_chip_s["reconfiguration"] == pytest.approx(2 * (9 * 10 + 10 * 10))
  assert sum(r.lost_chip_s.values()) == pytest.approx(
      r.lost_chip_s["slices_down"] + r.lost_chip_s["reconfiguration"])


def test_baselines_lose_the_step_a_stop_cuts_by_hand():
  one = _outages((3, 100.0, 400.0))
  # Non-elastic, 9 job slices of 2 chips: steps of 30 s from 0 (3 done, 10 s cut
  # at the failure at 100) and from the restart's end at 150 (28 done by 990,
  # 10 s still running at the horizon).
  model = chaos.FailureModel(chips_per_slice=2, restart_s=50.0, spare_fraction=0.1)
  r = baselines.non_elastic(one, model, 10, 1000.0, step_seconds=30.0)
  _assert_accounts_for_everything(r)
  assert r.lost_chip_s["lost_steps"] == pytest.approx(2 * 9 * 10)
  assert r.lost_chip_s["in_progress"] == pytest.approx(2 * 9 * 10)
  assert r.useful_chip_s == pytest.approx(2 * 9 * (90 + 840))
  assert r.uptime == pytest.approx(0.94) and r.stopped_s == pytest.approx(50.0)
  # Elastic, 10 s reconfigurations: spans [0, 100) on 10 slices, [110, 400) on 9
  # (9 steps, 20 s cut), [410, 1000) on 10 (19 steps, 20 s in progress).
  model = chaos.FailureModel(chips_per_slice=2, reconfiguration_s=10.0)
  r = baselines.elastic(one, model, 10, 1000.0, step_seconds=30.0)
  _assert_accounts_for_everything(r)
  assert r.lost_chip_s["lost_steps"] == pytest.approx(2 * (10 * 10 + 9 * 20))
  assert r.lost_chip_s["in_progress"] == pytest.approx(2 * 10 * 20)
  assert r.uptime == pytest.approx((1000 - 20 - 10 - 20) / 1000)
  # Without a step model (the default) no step is lost.
  assert baselines.elastic(one, model, 10, 1000.0).lost_chip_s["lost_steps"] == 0.0
  with pytest.raises(ValueError, match="step_seconds=-1.0"):
    baselines.elastic(one, model, 10, 1000.0, step_seconds=-1.0)


@pytest.mark.parametrize("chips,seed", [(150_000, 0), (1_200_000, 1)])
def test_baselines_account_for_all_allocated_chip_time(chips, seed):
  model = chaos.FailureModel()
  n = model.num_slices(chips)
  o = chaos.sample_outages(model, n, 2e5, seed)
  for report in (baselines.non_elastic(o, model, n, 2e5),
                 baselines.elastic(o, model, n, 2e5)):
    _assert_accounts_for_everything(report)
    # Every system loses the chips of down slices alike (same draws).
    assert report.lost_chip_s["slices_down"] > 0
  ne, el = (baselines.non_elastic(o, model, n, 2e5), baselines.elastic(o, model, n, 2e5))
  assert ne.lost_chip_s["slices_down"] == pytest.approx(el.lost_chip_s["slices_down"])


def test_non_elastic_that_runs_dry_waits():
  model = chaos.FailureModel(mtbi_chip_hours=0.5, chips_per_slice=1, repair_median_s=900.0,
                             repair_sigma=1.0, restart_s=60.0, spare_fraction=0.1)
  o = chaos.sample_outages(model, 10, 20_000.0, seed=3)
  r = baselines.non_elastic(o, model, 10, 20_000.0)
  _assert_accounts_for_everything(r)
  assert r.lost_chip_s["waiting"] > 0 and r.lost_chip_s["idle_spares"] > 0


def test_elastic_on_a_block_is_the_elastic_job_of_that_size():
  model = chaos.FailureModel(mtbi_chip_hours=0.5, chips_per_slice=1, repair_median_s=900.0,
                             repair_sigma=1.0, reconfiguration_s=20.0, restart_s=60.0)
  o = chaos.sample_outages(model, 12, 20_000.0, seed=5)
  block = chaos.slices_of_learner(1, 4)
  mine = chaos.outages_of(o, block)
  shifted = chaos.Outages(mine.slice - block.start, mine.start, mine.end)
  a = baselines.elastic(o, model, 4, 20_000.0, slices=block)
  b = baselines.elastic(shifted, model, 4, 20_000.0)
  assert a.useful_chip_s == pytest.approx(b.useful_chip_s)
  assert a.lost_chip_s == pytest.approx(b.lost_chip_s)
  assert a.num_failures == b.num_failures == np.sum(mine.start < 20_000.0)
  with pytest.raises(ValueError, match="slices="):
    baselines.elastic(o, model, 3, 20_000.0, slices=block)


def test_stationary_start_has_the_long_run_share_of_slices_down():
  model = chaos.FailureModel()
  o = chaos.sample_outages(model, 20_000, 3600.0, seed=4, stationary=True)
  at_zero = np.sum(o.start == 0.0)
  # Binomial(20000, d): standard error ~ 0.0016.
  assert abs(at_zero / 20_000 - model.down_fraction) < 0.006
  # Down at 0 and at the horizon alike (in the long run: no warm-up).
  for t in (0.0, 3599.0):
    down = np.sum((o.start <= t) & (o.end > t)) / 20_000
    assert abs(down - model.down_fraction) < 0.006, t
  assert np.all(o.start >= 0) and np.all(np.diff(o.start) >= 0)
  # Without it, every slice starts up.
  assert np.sum(chaos.sample_outages(model, 20_000, 3600.0, seed=4).start == 0.0) == 0
