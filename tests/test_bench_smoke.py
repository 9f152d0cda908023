"""The cross-entropy benchmark script still runs end to end: `--smoke` on CPU through the Triton interpreter.

Benchmarks are not tests (ARCHITECTURE.md), but a script that only runs on a GPU rots unnoticed; the smoke
run takes the same code paths (measure, JSON, markdown table, plot) at tiny fp32 shapes.
"""

import json
import math
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_cross_entropy.py"


def _run_smoke(out_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTSFT_BACKEND": "triton"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _config_key(config: dict) -> tuple:
    return (config["n"], config["h"], config["v"], config["prompt_frac"])


def test_cross_entropy_bench_smoke(tmp_path):
    done = _run_smoke(tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"

    files = {ext: sorted(tmp_path.glob(f"*.{ext}")) for ext in ("json", "md", "png")}
    assert all(len(found) == 1 for found in files.values()), files
    assert files["png"][0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(files["json"][0].read_text())

    meta = payload["metadata"]
    for key in ("gpu", "cuda", "torch", "triton", "fastsft", "python", "git_revision", "date", "command"):
        assert key in meta, key
    assert meta["torch"] and meta["git_revision"] and "--smoke" in meta["command"]

    # One entry per (config, implementation), and nothing else.
    sweep, impls = payload["settings"]["sweep"], payload["settings"]["impls"]
    configs = {(n, sweep["h"], v, p) for n, v, p in product(sweep["n"], sweep["v"], sweep["prompt_frac"])}
    cells = [(_config_key(e["config"]), e["impl"]) for e in payload["results"]]
    assert sorted(cells) == sorted(product(configs, impls))
    assert len(payload["derived"]) == len(configs)

    for entry in payload["results"]:
        if entry["impl"] in ("fastsft", "torch_eager"):
            assert entry["status"] == "ok", entry
            assert entry["time_ms"] is not None and math.isfinite(entry["time_ms"]) and entry["time_ms"] > 0
        if entry["impl"] == "fastsft":
            assert entry["note"] == "fastsft backend: triton"  # the smoke run exercised the real kernels
        if entry["impl"] == "torch_eager":
            assert entry["parity_rel_diff"] is not None and entry["parity_rel_diff"] < 1e-4, entry  # fp32

    report = files["md"][0].read_text()
    assert meta["command"] in report
    header = next(line for line in report.splitlines() if line.startswith("| N | V | prompt | N_sup |"))
    assert all(f" {name} |" in header for name in impls), header
    rows = [line for line in report.splitlines() if line.startswith(tuple(f"| {n} |" for n in sweep["n"]))]
    assert len(rows) == 2 * len(configs)  # the time table and the TFLOP/s table, one row per config


@pytest.mark.parametrize("script", ["bench_cross_entropy.py", "bench_elementwise.py", "bench_attention.py"])
def test_kernel_benches_need_cuda_without_smoke(tmp_path, script):
    """Without a GPU, a real (non-smoke) run refuses with a clear message and writes nothing."""
    if _cuda_available():
        return  # the check below is about machines without a GPU
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done
    assert "needs a CUDA GPU" in done.stderr
    assert not any(tmp_path.iterdir())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
