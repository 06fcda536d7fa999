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
