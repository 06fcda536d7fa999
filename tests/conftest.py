"""Test session setup: 8 simulated CPU devices, set before JAX is imported anywhere, and JAX's
persistent compilation cache."""

import os
import pathlib

# Multi-device code is tested on 8 fake CPU devices; the flag must be set before `import jax`.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# Compiling, not running, is most of the suite's time, and most of compiling is LLVM optimising
# the generated CPU code; the tests' programs are small, so unoptimised code runs them about as
# fast and compiles in about two thirds of the CPU time. The level changes how fast the code is,
# not what it computes (XLA's CPU fast-math stays off), and every process the tests start
# inherits it. A level the user sets wins.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA's CPU backend has two code generators for fused element-wise work: the MLIR fusion emitters
# (the default) and the older elemental IR emitter. The older one compiles the suite's programs
# in less CPU time (README.md, "Tests and lint", has the figures). Both implement the same HLO;
# they may differ by an ulp where XLA recomputes a value in two fusions and contracts one into a
# fused multiply-add, and the older one may round two programs that differ only in a constant
# differently. So no test claims bit equality between values of different fusions or different
# programs; bit-for-bit tests compare one program with itself. A setting the user makes wins.
if "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

# Compiling is most of the suite's time, and many tests (and the processes they start, which
# inherit these variables) compile the same small programs: the persistent cache shares them
# across tests, xdist workers and runs. Its key covers the program, JAX version, flags and
# devices, so a hit is the program that would have been compiled. A full run adds about 30 MB;
# delete the folder to start cold. (No size bound: JAX's bound needs filelock and made a cold
# run a third slower with its bookkeeping.)
_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402  (after the environment above, which must precede any JAX import)


@pytest.fixture(scope="session")
def toy_init_workdir(tmp_path_factory):
  """tests/tiny.py's config at its initial state, as a workdir `diffjax train` leaves
  (tests/workdirs.py): built once per test process, shared read-only by the sample, evaluate
  and user-error tests; a test that writes into it copies it first."""
  from tiny import tiny_config  # pylint: disable=import-outside-toplevel
  from workdirs import workdir_at_init  # pylint: disable=import-outside-toplevel

  return workdir_at_init(tiny_config(), tmp_path_factory.mktemp("toy_init") / "w")


@pytest.fixture(scope="session")
def digits_init_workdir(tmp_path_factory):
  """The class-conditional digits config of tests/workdirs.py at its initial state; as
  ``toy_init_workdir``, shared read-only."""
  from workdirs import digits_config, workdir_at_init  # pylint: disable=import-outside-toplevel

  return workdir_at_init(digits_config(), tmp_path_factory.mktemp("digits_init") / "w")
