"""`pytest benchmarks/ --benchmark-only` runs the CPU-side benchmarks (pytest-benchmark; ARCHITECTURE.md, "Testing
rules"). They live in bench_*.py scripts next to the GPU ones, which are plain scripts run as
`python benchmarks/bench_x.py`, so only the files listed here are collected."""

import pytest

CPU_BENCHMARKS = {"bench_packing.py"}


def pytest_collect_file(file_path, parent):
    if file_path.name in CPU_BENCHMARKS:
        return pytest.Module.from_parent(parent, path=file_path)
    return None
