"""Compute-free Decoupled DiLoCo goodput at scale."""

import dataclasses

import numpy as np
import pytest

from decoupled_diloco.runtime import baselines, chaos, goodput
from tests import helpers


def test_no_failures_means_full_goodput():
  model = dataclasses.replace(chaos.FailureModel(), mtbi_chip_hours=1e12)
  r = goodput.simulate_decoupled(model, num_chips=150_000, num_learners=4,
                                 steps_per_learner=500)
  assert r["goodput"] == pytest.approx(1.0) and r["uptime"] == pytest.approx(1.0)
  assert r["virtual_seconds"] == pytest.approx(500.0)
  assert all(l["steps"] == 500 for l in r["learners"])


def test_decoupled_beats_both_data_parallel_baselines_at_scale():
  model = chaos.FailureModel()
  r = goodput.simulate_decoupled(model, num_chips=2_400_000, num_learners=16,
                                 steps_per_learner=2000, step_seconds=10.0)
  n = model.num_slices(2_400_000)
  outages = chaos.sample_outages(model, n, r["virtual_seconds"], 0)
  elastic = baselines.elastic(outages, model, n, r["virtual_seconds"],
                              step_seconds=10.0).goodput
  non_elastic = baselines.non_elastic(outages, model, n, r["virtual_seconds"],
                                      step_seconds=10.0).goodput
  assert r["failures"] > 100 and r["uptime"] > 0.99
  assert r["goodput"] > elastic > non_elastic
  # Bounded above by the share of chips that are up at all.
  assert r["goodput"] < 1 - 0.9 * model.down_fraction


def test_more_learners_contain_failures_better():
  # Paired by seed (the same failure draws for both): better on every seed, and on
  # average by more than three standard errors of the mean difference.
  model = chaos.FailureModel()
  gains = []
  for seed in range(4):
    few, many = (goodput.simulate_decoupled(model, num_chips=1_200_000, num_learners=m,
                                            steps_per_learner=1000, step_seconds=10.0,
                                            seed=seed)["goodput"]
                 for m in (2, 8))
    gains.append(many - few)
  assert min(gains) > 0, gains
  assert np.mean(gains) > 3 * np.std(gains, ddof=1) / np.sqrt(len(gains)), gains


# --- Every lost point accounted for -----------------------------------------------

_PROTOCOL_CAUSES = ("unsent_work", "waiting")
"""What only a learner loses, by construction: a data-parallel job has no
unsent local progress (when it loses every slice, `restart_s` covers its
reload), and it waits for no syncer (the non-elastic job's waiting, for
repairs, is not in the elastic job's causes). Every other cause a learner and
the elastic job of its size lose alike."""
_SHARED_CAUSES = tuple(c for c in baselines.LOSS_CAUSES if c not in _PROTOCOL_CAUSES)


def _accounts_for_everything(useful, lost, allocated):
  assert set(lost) == set(baselines.LOSS_CAUSES)
  assert all(v >= -1e-9 * allocated for v in lost.values()), lost
  assert useful + sum(lost.values()) == pytest.approx(allocated, rel=1e-9)


_FLAKY = chaos.FailureModel(mtbi_chip_hours=64 * 1000 / 3600, chips_per_slice=64,
                            repair_median_s=200.0)
"""Two-slice learners whose slices fail every 1000 s: both are down now and then."""


@pytest.mark.parametrize("model,num_chips,num_learners,steps", [
    (chaos.FailureModel(), 150_000, 4, 400),
    (_FLAKY, 4 * 64, 2, 1000),
])
def test_a_learner_loses_no_more_than_an_elastic_job_of_its_size(
    model, num_chips, num_learners, steps):
  r = goodput.simulate_decoupled(model, num_chips=num_chips, num_learners=num_learners,
                                 steps_per_learner=steps, step_seconds=10.0)
  _accounts_for_everything(r["useful_chip_s"], r["lost_chip_s"], r["allocated_chip_s"])
  base = r["baselines"]
  for name in ("non_elastic", "elastic"):
    b = base[name]
    _accounts_for_everything(b["useful_chip_s"], b["lost_chip_s"], b["allocated_chip_s"])
  assert r["failures"] > 0
  for learner, own in zip(r["learners"], base["elastic_per_learner"]):
    lost, own_lost = learner["lost_chip_s"], own["lost_chip_s"]
    assert own["allocated_chip_s"] == pytest.approx(r["allocated_chip_s"] / num_learners)
    _accounts_for_everything(learner["useful_chip_s"], lost, own["allocated_chip_s"])
    # Same slices, same draws, same elastic timeline, same steps: the same
    # chip-time lost to slices down, reconfigurations, cut steps and the step
    # running at the end; no spares on either side.
    for cause in _SHARED_CAUSES:
      assert lost[cause] == pytest.approx(own_lost[cause], rel=1e-9, abs=1e-6), cause
    assert lost["idle_spares"] == own_lost["idle_spares"] == 0.0
    # Beyond that, a learner loses only what the protocol adds.
    protocol = sum(lost[c] for c in _PROTOCOL_CAUSES)
    assert sum(lost.values()) - protocol <= sum(own_lost.values()) * (1 + 1e-9) + 1e-6
    assert learner["useful_chip_s"] + protocol == pytest.approx(own["useful_chip_s"],
                                                               rel=1e-9)
  if model is _FLAKY:  # Learners lost every slice, and their unsent work.
    assert r["lost_chip_s"]["unsent_work"] > 0


def test_one_learner_and_the_elastic_job_lose_the_same_by_hand():
  # Two one-chip slices, steps of 3 s, reconfigurations of 2 s; slice 0 is down
  # over [10, 50). Running spans [0, 10) on 2 chips, [12, 50) on 1, [52, ...) on
  # 2: 3 steps then 1 s cut on 2 chips; 12 steps then 2 s cut on 1 chip; then
  # 10 steps, to 82 s.
  model = chaos.FailureModel(chips_per_slice=1, reconfiguration_s=2.0, restart_s=5.0)
  outages = chaos.Outages(np.array([0]), np.array([10.0]), np.array([50.0]))
  timeline = chaos.elastic_timeline(outages, range(2), 1000.0, model)
  sim = helpers.simulation([3.0], quorum=1, timelines=[timeline])
  sim.run(25)
  r = sim.report()
  assert r["virtual_seconds"] == 82.0
  dp = baselines.elastic(outages, model, 2, 82.0, step_seconds=3.0)
  expected = {"slices_down": 40.0, "reconfiguration": 2 * 1 + 2 * 2, "lost_steps": 2 + 2,
              "unsent_work": 0.0, "waiting": 0.0, "idle_spares": 0.0, "in_progress": 0.0}
  assert r["lost_chip_s"] == pytest.approx(expected)
  assert dp.lost_chip_s == pytest.approx(expected)
  assert r["useful_chip_s"] == dp.useful_chip_s == pytest.approx(9 * 2 + 36 + 30 * 2)
  # Cut short by the horizon instead: the step still running is in progress.
  assert baselines.elastic(outages, model, 2, 81.0, step_seconds=3.0).lost_chip_s[
      "in_progress"] == pytest.approx(2 * 2)


@pytest.mark.parametrize("model,num_chips,step_seconds", [
    (chaos.FailureModel(), 150_000, 1.0),
    (_FLAKY, 2 * 64, 10.0),
])
def test_a_one_learner_run_loses_what_the_baselines_lose_on_the_same_draws(
    model, num_chips, step_seconds):
  r = goodput.simulate_decoupled(model, num_chips=num_chips, num_learners=1,
                                 steps_per_learner=1000, step_seconds=step_seconds)
  lost = r["lost_chip_s"]
  elastic = r["baselines"]["elastic"]  # On the learner's slices: it owns them all.
  assert elastic["allocated_chip_s"] == pytest.approx(r["allocated_chip_s"], rel=1e-12)
  assert r["failures"] >= 10 and lost["lost_steps"] > 0
  for cause in _SHARED_CAUSES:
    assert lost[cause] == pytest.approx(elastic["lost_chip_s"][cause], rel=1e-9,
                                        abs=1e-6), cause
  # By construction, the learner alone loses its unsent work; nothing else.
  assert r["useful_chip_s"] + lost["unsent_work"] + lost["waiting"] == pytest.approx(
      elastic["useful_chip_s"], rel=1e-9)
  assert lost["waiting"] == 0.0  # Learners do not wait for the syncer here.
  if model is _FLAKY:
    assert lost["unsent_work"] > 0
  # The non-elastic job (fixed size, hot spares, restarts) differs by design,
  # but loses the same chips to slices down and charges its cut steps too.
  non_elastic = r["baselines"]["non_elastic"]["lost_chip_s"]
  assert non_elastic["slices_down"] == pytest.approx(lost["slices_down"], rel=1e-9)
  assert non_elastic["lost_steps"] > 0


def test_the_calibration_is_the_slowest_repair_fit_of_the_stored_family():
  from experiments import goodput_table  # pylint: disable=import-outside-toplevel
  assert len(goodput_table.FAMILY) >= 2
  # Fitted, and its predictions stored, with the table's default steps and M.
  assert goodput_table.FAMILY_STEP_SECONDS == chaos.CALIBRATION_STEP_S
  assert goodput_table._STEP_SECONDS.default == chaos.CALIBRATION_STEP_S  # pylint: disable=protected-access
  default_learners = {int(m) for m in goodput_table._LEARNERS.default}  # pylint: disable=protected-access
  for member in goodput_table.FAMILY:
    assert goodput_table.largest_error(np.array(member["rows"])) <= goodput_table.FAMILY_MAX_GAP
    assert set(member["decoupled"]) == default_learners
  # Chosen by published repair times (chaos.py), not by its Decoupled rows.
  slowest = max(goodput_table.FAMILY, key=lambda member: member["repair_median_s"])
  assert goodput_table.member_model(slowest) == chaos.FailureModel()


def test_family_predictions_follow_the_step_time_and_learners_asked_for():
  from experiments import goodput_table  # pylint: disable=import-outside-toplevel
  member = dict(goodput_table.FAMILY[-1], decoupled={4: [1.0] * 5})
  stored = goodput_table.family_predictions([member], [4], 100, 2.0, 0, stored=True)
  assert stored == [{4: [1.0] * 5}]
  # Another step time (stored=False) or an M not stored: simulated now.
  fresh = goodput_table.family_predictions([member], [4, 2], 100, 2.0, 0, stored=False)
  assert fresh == [goodput_table.decoupled_rows(goodput_table.member_model(member), [4, 2],
                                                100, 2.0, 0)]
  assert goodput_table.family_predictions([member], [2], 100, 2.0, 0, stored=True) == [
      {2: fresh[0][2]}]
