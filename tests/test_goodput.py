"""Compute-free Decoupled DiLoCo goodput at scale."""

import dataclasses

import numpy as np
import pytest

from decoupled_diloco.runtime import baselines, chaos, goodput


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
  elastic = baselines.elastic(outages, model, n, r["virtual_seconds"]).goodput
  non_elastic = baselines.non_elastic(outages, model, n, r["virtual_seconds"]).goodput
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

_PROTOCOL_CAUSES = ("lost_steps", "unsent_work", "waiting", "in_progress")


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
    # Same slices, same draws, same elastic timeline: the same chip-time lost to
    # slices down and to reconfigurations; no spares on either side.
    for cause in ("slices_down", "reconfiguration"):
      assert lost[cause] == pytest.approx(own_lost[cause], rel=1e-9, abs=1e-6)
    assert lost["idle_spares"] == own_lost["idle_spares"] == 0.0
    # Beyond that, a learner loses only what the protocol adds.
    protocol = sum(lost[c] for c in _PROTOCOL_CAUSES)
    assert sum(lost.values()) - protocol <= sum(own_lost.values()) * (1 + 1e-9) + 1e-6
    assert learner["useful_chip_s"] + protocol == pytest.approx(own["useful_chip_s"],
                                                               rel=1e-9)
  if model is _FLAKY:  # Learners lost every slice, and their unsent work.
    assert r["lost_chip_s"]["unsent_work"] > 0


def test_the_calibration_is_the_slowest_repair_fit_of_the_stored_family():
  from experiments import goodput_table  # pylint: disable=import-outside-toplevel
  assert len(goodput_table.FAMILY) >= 2
  for member in goodput_table.FAMILY:
    assert goodput_table.largest_error(np.array(member["rows"])) <= goodput_table.FAMILY_MAX_GAP
    assert set(member["decoupled"]) == set(goodput_table.FAMILY_LEARNERS)
  # Chosen by published repair times (chaos.py), not by its Decoupled rows.
  slowest = max(goodput_table.FAMILY, key=lambda member: member["repair_median_s"])
  assert goodput_table.member_model(slowest) == chaos.FailureModel()
