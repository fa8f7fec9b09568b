"""Benchmarks users run: `python -m benchmarks.samplers | decoding | train_step [--quick] [--json=PATH]`.

Each prints a table to stdout and writes a JSON list of records (`--json`). Shared flags, timing and
compile-counting helpers live in `benchmarks.common`.
"""
