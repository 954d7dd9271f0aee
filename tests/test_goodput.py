"""Compute-free Decoupled DiLoCo goodput at scale."""

import dataclasses

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
  model = chaos.FailureModel()
  few, many = (goodput.simulate_decoupled(model, num_chips=1_200_000, num_learners=m,
                                          steps_per_learner=1000, step_seconds=10.0)
               for m in (2, 8))
  assert many["goodput"] > few["goodput"]
