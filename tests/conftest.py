"""Test set-up: 8 fake CPU devices so islands build real meshes, set before any JAX work."""

import jax

jax.config.update("jax_num_cpu_devices", 8)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end runs (still run in CI)")
