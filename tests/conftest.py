"""Test set-up: 8 fake CPU devices so islands build real meshes, set before any JAX work.

Every test builds its runtimes afresh, so the same small step functions are
traced again and again, in this process and in the runs tests start as
subprocesses; a compilation cache private to this pytest session (passed on
through the environment, to the test processes of pytest-xdist too: the
process that made it removes it) lets XLA compile each distinct program once.
A hit runs the executable a fresh compile of that same program gives, so no
test sees other numbers.

The islands of one run compile the same program for different devices. On the
CPU, XLA's code does not depend on which devices run it, so the tests key the
cache without the device assignment (as JAX itself does on GPUs) and each
island loads the first island's executable onto its own devices
(`test_model_islands` checks where the results land and that they agree).

The tests' models are tiny and their runs short, so XLA's optimizing passes
cost more than they save: the tests compile with most of them off
(`jax_disable_most_optimizations`), except where a test runs long enough for
the speed of the compiled code to matter (the `optimized` fixture). No test
compares numbers across the two settings. They also compile fusions with XLA's
older CPU emitters, in one piece (`_FAST_COMPILE`): without the optimizing
passes, a training step of the tests' models compiles several times faster
that way and runs no slower (`experiments/bench_compile.py`, BUILD.md "Test").
Both settings reach the tests' subprocesses through the environment.
"""

import os
import shutil
import tempfile

import pytest

# The session's scratch folder: the compilation cache, and what helpers make outside a
# test's tmp_path. Removed at the end by the process that made it.
_OWN_SCRATCH = "DD_TESTS_SCRATCH" not in os.environ  # Else a pytest-xdist controller's.
if _OWN_SCRATCH:
  os.environ["DD_TESTS_SCRATCH"] = tempfile.mkdtemp(prefix="dd_tests_")
_CACHE_DIR = os.path.join(os.environ["DD_TESTS_SCRATCH"], "jax_cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
# experiments/bench_compile.py's FAST_COMPILE (importing it here would define its flags).
_FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)  # If jax was imported before us.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_disable_most_optimizations", True)


def _key_compiled_programs_without_their_devices():
  """One compile per program for all islands (module docstring); a no-op if JAX moved it."""
  from jax._src import cache_key  # pylint: disable=g-import-not-at-top
  hash_options = getattr(cache_key, "_hash_serialized_compile_options", None)
  if hash_options is None:
    return
  def without_devices(hash_obj, options, strip_device_assignment=False):
    del strip_device_assignment
    return hash_options(hash_obj, options, strip_device_assignment=True)
  cache_key._hash_serialized_compile_options = without_devices  # pylint: disable=protected-access


_key_compiled_programs_without_their_devices()


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end runs (still run in CI)")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's; the suite also runs without it.
def pytest_xdist_auto_num_workers(config):
  """`-n auto`: a test process per core, and one more. The end-to-end tests spend much of
  their time waiting for the processes they started, paced by the wall clock."""
  del config
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1)
  return cores + 1


def pytest_collection_modifyitems(items):
  """The long runs first, so that with several test processes (pytest-xdist) none of
  them is left running one alone at the end while the others idle."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
  del config
  if _OWN_SCRATCH:
    shutil.rmtree(os.environ["DD_TESTS_SCRATCH"], ignore_errors=True)


@pytest.fixture
def optimized():
  """XLA's optimizing passes on for this test's compilations (module docstring).

  The setting is part of the persistent cache's key, so the two settings never share an
  executable.
  """
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def s3_endpoint():
  """An S3 server (moto, in this process, on a free port): `http://host:port`.

  tensorstore's s3 driver enforces create-once and compare-and-swap with
  S3's conditional writes, which moto implements; credentials come from the
  environment, as on a real S3-compatible store.
  """
  import logging  # pylint: disable=g-import-not-at-top
  from moto.server import ThreadedMotoServer  # pylint: disable=g-import-not-at-top
  logging.getLogger("werkzeug").setLevel(logging.ERROR)
  os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
  os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  yield f"http://{host}:{port}"
  server.stop()


@pytest.fixture
def s3_url(s3_endpoint):
  """A fresh bucket on the test S3 server, as a mailbox URL."""
  import urllib.request  # pylint: disable=g-import-not-at-top
  import uuid  # pylint: disable=g-import-not-at-top
  bucket = f"run-{uuid.uuid4().hex[:12]}"
  urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/{bucket}", method="PUT"),
                         timeout=30).read()
  return f"s3://{bucket}/mailbox?endpoint={s3_endpoint}"
