"""Test-wide setup: 8 simulated CPU devices, set before JAX initialises its backend."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.pop("JAX_NUM_CPU_DEVICES", None)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
