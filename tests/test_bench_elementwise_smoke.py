"""The elementwise benchmark script still runs end to end: `--smoke` on CPU through the Triton interpreter.

Benchmarks are not tests (ARCHITECTURE.md), but a script that only runs on a GPU rots unnoticed; the smoke run
takes the same code paths (copy bandwidth, every op forward and backward, JSON, markdown table, plot) at
tiny fp32 shapes. The checks below recompute what the script derives (bytes from the shapes, GB/s, % of
copy bandwidth, speedups) instead of trusting it.
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
SCRIPT = REPO / "benchmarks" / "bench_elementwise.py"
OPS = ("rope", "rms_norm", "rms_norm_gemma", "add_rms_norm", "qk_norm", "swiglu", "geglu")
IMPLS = ("fastsft", "torch_eager", "torch_compile", "liger")
DIRECTIONS = ("fwd", "bwd")


def expected_bytes(config: dict, direction: str, e: int) -> int:
    """Least traffic, recomputed from the shapes: each input read once, each output written once; e bytes
    per activation / weight / cos-sin element, rstd [N] in fp32."""
    op, n, w = config["op"], config["rows"], config["width"]
    fwd = direction == "fwd"
    if op == "rope":  # q [T,Hq,D], k [T,Hk,D] in and out (or their grads), cos and sin [T,D] read
        return e * (2 * n * (config["hq"] + config["hk"]) * w + 2 * n * w)
    if op in ("rms_norm", "rms_norm_gemma", "qk_norm"):
        # fwd: x, w -> y, rstd; bwd: dy, x, w, rstd -> dx, dw
        return e * (2 * n * w + w) + 4 * n if fwd else e * (3 * n * w + 2 * w) + 4 * n
    if op == "add_rms_norm":
        # fwd: x, residual, w -> y, s, rstd; bwd: dy, ds, s, w, rstd -> dx (= d residual), dw
        return e * (4 * n * w + w) + 4 * n if fwd else e * (4 * n * w + 2 * w) + 4 * n
    assert op in ("swiglu", "geglu"), op
    return e * n * w * (3 if fwd else 5)  # fwd: gate, up -> out; bwd: dout, gate, up -> dgate, dup


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench_elementwise")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTSFT_BACKEND": "triton"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    files = {ext: sorted(out_dir.glob(f"*.{ext}")) for ext in ("json", "md", "png")}
    assert all(len(found) == 1 for found in files.values()), files
    return done, files, json.loads(files["json"][0].read_text())


def test_files_and_metadata(smoke):
    done, files, payload = smoke
    assert files["png"][0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files["json"][0].name.startswith("elementwise_cpu_")
    meta = payload["metadata"]
    for key in ("gpu", "cuda", "torch", "triton", "fastsft", "liger_kernel", "python", "git_revision", "date"):
        assert key in meta, key
    assert meta["torch"] and meta["git_revision"] and "--smoke" in meta["command"]
    s = payload["settings"]
    assert s["smoke"] and s["device"] == "cpu" and s["dtype"] == "float32" and s["element_size"] == 4


def test_copy_bandwidth(smoke):
    _, _, payload = smoke
    copy = payload["copy_bandwidth"]
    assert copy["bytes_moved"] == 2 * copy["buffer_bytes"] > 0  # read + write
    assert _finite_positive(copy["time_ms"]) and _finite_positive(copy["gbps"])
    assert copy["gbps"] == pytest.approx(copy["bytes_moved"] / (copy["time_ms"] * 1e-3) / 1e9)


def test_every_cell_measured_with_the_right_bytes(smoke):
    _, _, payload = smoke
    s = payload["settings"]
    assert s["impls"] == list(IMPLS) and s["ops"] == list(OPS)
    configs = {json.dumps(e["config"], sort_keys=True) for e in payload["results"]}
    assert {json.loads(c)["op"] for c in configs} == set(OPS)
    # One entry per (config, direction, implementation), and nothing else.
    cells = [(json.dumps(e["config"], sort_keys=True), e["direction"], e["impl"]) for e in payload["results"]]
    assert sorted(cells) == sorted(product(configs, DIRECTIONS, IMPLS))

    copy_gbps = payload["copy_bandwidth"]["gbps"]
    by_cell = {(json.dumps(e["config"], sort_keys=True), e["direction"], e["impl"]): e for e in payload["results"]}
    for entry in payload["results"]:
        config = entry["config"]
        assert config["rows"] == config["tokens"] * (config["hq"] if config["op"] == "qk_norm" else 1)
        assert entry["bytes"] == expected_bytes(config, entry["direction"], s["element_size"]), entry
        assert entry["bytes_formula"]
        if entry["impl"] in ("fastsft", "torch_eager"):  # the rows a smoke run must produce
            assert entry["status"] == "ok", entry
        if entry["impl"] == "torch_compile":
            assert entry["status"].startswith("skipped: --smoke"), entry  # CPU compiles are too slow here
        if entry["status"] != "ok":
            assert entry["time_ms"] is None and entry["gbps"] is None, entry
            continue
        assert _finite_positive(entry["time_ms"]), entry
        assert entry["gbps"] == pytest.approx(entry["bytes"] / (entry["time_ms"] * 1e-3) / 1e9)
        assert entry["pct_of_copy"] == pytest.approx(100 * entry["gbps"] / copy_gbps)
        key = (json.dumps(config, sort_keys=True), entry["direction"])
        torch_time = by_cell[(*key, "torch_eager")]["time_ms"]
        assert entry["speedup_vs_torch_eager"] == pytest.approx(torch_time / entry["time_ms"])
        if entry["impl"] == "fastsft":
            assert entry["note"] == "fastsft backend: triton"  # the smoke run exercised the real kernels
            assert entry["parity_rel_diff"] is None  # fastsft is the parity reference
        else:  # same inputs, fp32: outputs (fwd) and input gradients (bwd) agree with fastsft's
            assert entry["parity_rel_diff"] is not None and entry["parity_rel_diff"] < 1e-4, entry


def test_derived_targets(smoke):
    _, _, payload = smoke
    fastsft = {
        (json.dumps(e["config"], sort_keys=True), e["direction"]): e
        for e in payload["results"]
        if e["impl"] == "fastsft"
    }
    derived = {(json.dumps(d["config"], sort_keys=True), d["direction"]): d for d in payload["derived"]}
    assert derived.keys() == fastsft.keys()
    for key, d in derived.items():
        assert d["fastsft_pct_of_copy"] == pytest.approx(fastsft[key]["pct_of_copy"])
        assert set(d["targets"]) == {"pct_of_copy", "time_vs_liger"}
        assert all(t["met"] is None for t in d["targets"].values()), d  # CPU times judge nothing


def test_markdown_table(smoke):
    done, files, payload = smoke
    report = files["md"][0].read_text()
    assert payload["metadata"]["command"] in report
    header = "| op | dir | model | shape | impl | ms | GB/s | % of copy | × vs torch_eager | × vs liger |"
    assert header in report and header in done.stdout  # the table is printed too
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = [line for line in lines[start + 2 :] if line.startswith("| ")]
    rows = rows[: next((i for i, r in enumerate(rows) if r.startswith("| op |")), len(rows))]
    assert len(rows) == len(payload["results"])  # one row per measurement, in order
    for row, entry in zip(rows, payload["results"], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:2] == [entry["config"]["op"], entry["direction"]] and cells[4] == entry["impl"]
        if entry["status"] == "ok":
            assert float(cells[5]) == pytest.approx(entry["time_ms"], rel=1e-3, abs=1e-4)
        else:
            assert cells[5] == entry["status"].split(":")[0]
