"""Test session setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

# Multi-device code is tested on 8 fake CPU devices; the flag must be set before `import jax`.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
