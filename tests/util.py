"""Shared helpers for the tests: the tiny VAE config (`vae.py:tiny` + dotted-key overrides) and flattened params.
They live with the fault worker (benchmarks/fault_worker.py), which trains the same config in subprocesses."""
from benchmarks.fault_worker import flat, tiny_vae_config

__all__ = ["flat", "tiny_vae_config"]
