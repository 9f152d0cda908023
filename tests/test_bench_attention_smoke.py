"""The varlen attention benchmark script still runs end to end: `--smoke` on CPU through the Triton interpreter.

Benchmarks are not tests (ARCHITECTURE.md), but a script that only runs on a GPU rots unnoticed; the smoke run takes
the same code paths (documents, fastsft and SDPA per document forward and forward + backward, parity, JSON,
markdown tables, plot) at tiny fp32 shapes. The checks below recompute what the script derives (FLOPs from the
document lengths, TFLOP/s) instead of trusting it. The length mixes of the real sweep are checked in-process.
"""

import importlib
import json
import math
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_attention.py"
IMPLS = ("fastsft", "torch_varlen", "flex_attention", "sdpa_per_doc", "flash_attn", "flash_attn3")
SMOKE_IMPLS = ("fastsft", "sdpa_per_doc")
DIRECTIONS = ("fwd", "fwd+bwd")


def expected_flops(config: dict, lengths: list[int], direction: str) -> float:
    """Causal attention: two matmuls (QK^T, PV) of 2 flops per multiply-add over half of each document's
    s_i x s_i (query, key) pairs, per q head; the backward counts 2.5 forwards."""
    fwd = 4 * config["hq"] * config["d"] * sum(s * s for s in lengths) / 2
    return fwd if direction == "fwd" else 3.5 * fwd


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench_attention")
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
    _, files, payload = smoke
    assert files["png"][0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files["json"][0].name.startswith("attention_cpu_")
    assert payload["benchmark"] == "attention"
    meta = payload["metadata"]
    for key in ("gpu", "cuda", "torch", "triton", "fastsft", "python", "git_revision", "date", "command"):
        assert key in meta, key
    assert meta["torch"] and meta["git_revision"] and "--smoke" in meta["command"]
    s = payload["settings"]
    assert s["smoke"] and s["device"] == "cpu" and s["dtype"] == "float32" and s["causal"]
    assert payload["flops_formulas"] == {"fwd": "4*Hq*D*sum(s_i^2)/2", "fwd+bwd": "3.5 * 4*Hq*D*sum(s_i^2)/2"}


def test_every_cell_measured_with_the_right_flops(smoke):
    _, _, payload = smoke
    assert payload["settings"]["impls"] == list(IMPLS)
    mixes = payload["length_mixes"]
    configs = {_key(e["config"]) for e in payload["results"]}
    assert configs
    # One entry per (config, direction, implementation), and nothing else.
    cells = [(_key(e["config"]), e["direction"], e["impl"]) for e in payload["results"]]
    assert sorted(cells) == sorted(product(configs, DIRECTIONS, IMPLS))

    for entry in payload["results"]:
        config = entry["config"]
        lengths = mixes[f"{config['mix']} T={config['tokens']}"]["lengths"]
        assert sum(lengths) == config["tokens"] and len(lengths) >= 2 and min(lengths) >= 1
        assert entry["docs"] == {
            "n_docs": len(lengths),
            "max_seqlen": max(lengths),
            "sum_sq": sum(s * s for s in lengths),
        }
        assert entry["flops"] == pytest.approx(expected_flops(config, lengths, entry["direction"]))
        if entry["impl"] in SMOKE_IMPLS:  # the rows a smoke run must produce
            assert entry["status"] == "ok", entry
        else:  # need CUDA / bf16, or compile for minutes on CPU
            assert entry["status"].startswith("skipped: --smoke"), entry
        if entry["status"] != "ok":
            assert entry["time_ms"] is None and entry["tflops"] is None, entry
            continue
        assert _finite_positive(entry["time_ms"]), entry
        assert entry["tflops"] == pytest.approx(entry["flops"] / (entry["time_ms"] * 1e-3) / 1e12)
        assert entry["speedup_vs_torch_varlen"] is None  # torch_varlen did not run
        if entry["impl"] == "fastsft":
            assert entry["note"] == "fastsft backend: triton"  # the smoke run exercised the real kernels
            assert entry["parity_rel_diff"] is None  # fastsft is the parity reference
        else:  # same inputs, fp32: out (fwd) and dq, dk, dv (fwd+bwd) agree with fastsft's
            assert entry["parity_rel_diff"] is not None and entry["parity_rel_diff"] < 1e-4, entry


def test_derived_targets(smoke):
    _, _, payload = smoke
    fastsft = {(_key(e["config"]), e["direction"]): e for e in payload["results"] if e["impl"] == "fastsft"}
    derived = {(_key(d["config"]), d["direction"]): d for d in payload["derived"]}
    assert derived.keys() == fastsft.keys()
    for key, d in derived.items():
        assert d["fastsft_tflops"] == pytest.approx(fastsft[key]["tflops"])
        assert d["torch_varlen_tflops"] is None and d["fastsft_speedup_vs_torch_varlen"] is None
        assert set(d["targets"]) == {"speedup_vs_torch_varlen", "moonshot_fwd_tflops"}
        assert all(t["met"] is None and not t["applies"] for t in d["targets"].values()), d  # no headline on CPU


def test_markdown_tables(smoke):
    done, files, payload = smoke
    report = files["md"][0].read_text()
    assert payload["metadata"]["command"] in report
    header = "| mix | T | docs | max len | Hq/Hk | D | dir | impl | ms | TFLOP/s | × vs torch_varlen |"
    assert header in report and header in done.stdout  # the table is printed too
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = [line for line in lines[start + 2 :] if line.startswith("| ")]
    rows = rows[: next((i for i, r in enumerate(rows) if r.startswith("| mix |")), len(rows))]
    assert len(rows) == len(payload["results"])  # one row per measurement, in order
    for row, entry in zip(rows, payload["results"], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == entry["config"]["mix"] and cells[6:8] == [entry["direction"], entry["impl"]]
        if entry["status"] == "ok":
            assert float(cells[8]) == pytest.approx(entry["time_ms"], rel=1e-3, abs=1e-3)
        else:
            assert cells[8] == entry["status"].split(":")[0]
    assert "## fastsft against torch varlen_attn and the targets" in report
    assert "- **fastsft**: fastsft backend: triton" in report


@pytest.fixture
def bench(monkeypatch):
    """The benchmark module, imported in-process (its `_common` lives next to it)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("bench_attention")


@pytest.mark.parametrize("seed", [0, 1])
def test_length_mixes(bench, seed):
    """Every mix fills exactly T tokens; every document but the trimmed last lies in the mix's range."""
    tokens = 32768
    ranges = {"all_2k": (2048, 2048), "lognormal_128_8192": (128, 8192), "short_64_512": (64, 512)}
    assert set(ranges) == set(bench.MIXES)
    for mix, (lo, hi) in ranges.items():
        lengths = bench.document_lengths(mix, tokens, seed)
        assert lengths == bench.document_lengths(mix, tokens, seed)  # deterministic
        assert sum(lengths) == tokens and 1 <= lengths[-1] <= hi, (mix, lengths)
        assert all(lo <= s <= hi for s in lengths[:-1]), (mix, lengths)
        assert all(isinstance(s, int) for s in lengths)
    assert bench.document_lengths("all_2k", tokens, seed) == [2048] * 16
    assert bench.document_lengths("all_2k", 5000, seed) == [2048, 2048, 904]


def test_sweeps(bench):
    """The full sweep holds the DESIGN headline config (lognormal docs, 32k tokens, D=128, GQA 4:1); --quick is
    its D=128 part; explicit flags win."""
    full = bench.make_configs(bench.parse_args([]))
    assert {(c.mix, c.tokens, c.hq, c.hk, c.d) for c in full} == set(
        product(bench.MIXES, [32768], [32], [8], [128, 64])
    )
    assert sum(bench._is_headline(c) for c in full) == 1
    quick = bench.make_configs(bench.parse_args(["--quick"]))
    assert [c for c in full if c.d == 128] == quick
    picked = bench.make_configs(bench.parse_args(["--quick", "--mix", "short_64_512", "--tokens", "8192"]))
    assert [(c.mix, c.tokens, c.d) for c in picked] == [("short_64_512", 8192, 128)]
