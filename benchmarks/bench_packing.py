"""Packing benchmark: best-fit-decreasing packing of 1M log-normal document lengths, native vs pure Python.

    pytest benchmarks/bench_packing.py --benchmark-only     # pytest-benchmark timings
    python benchmarks/bench_packing.py [--n 1000000] [--max-tokens 16384] [--repeats 7] [--out DIR]

The script times whole `pack_documents` calls (ordering, best fit, bin shuffle) for each backend, and the
native best-fit loop alone, as the median of --repeats runs (time.perf_counter, after one warm-up run), and
writes benchmarks/results/packing_<cpu-slug>_<date>.{json,md} with the CPU, versions and git revision.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path

import _common
import numpy as np

from fastsft import _native
from fastsft.data.packing import pack_documents

NUM_DOCS = 1_000_000
MAX_TOKENS = 16384
MAX_SEQ_LEN = 4096


def lognormal_lengths(num_docs: int, max_tokens: int, seed: int = 0) -> np.ndarray:
    """int64 [num_docs]: instruction-data-like lengths, log-normal (median ~665 tokens, mean ~1000, long
    tail) clipped to 16..min(4096, max_tokens), i.e. a max_seq_len of 4096."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(6.5, 1.0, num_docs)), 16, min(MAX_SEQ_LEN, max_tokens)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------

_lengths_cache: dict[tuple[int, int], np.ndarray] = {}


def _benchmark_lengths() -> np.ndarray:
    key = (NUM_DOCS, MAX_TOKENS)
    if key not in _lengths_cache:
        _lengths_cache[key] = lognormal_lengths(*key)
    return _lengths_cache[key]


def test_pack_native(benchmark):
    import pytest

    if _native.native_module() is None:
        pytest.skip(_native.load_error())
    packing = benchmark.pedantic(
        pack_documents,
        args=(_benchmark_lengths(), MAX_TOKENS),
        kwargs={"backend": "native"},
        rounds=7,
        iterations=1,
        warmup_rounds=1,
    )
    benchmark.extra_info.update(num_docs=NUM_DOCS, max_tokens=MAX_TOKENS, bins=len(packing))
    benchmark.extra_info["efficiency"] = packing.efficiency


def test_pack_python(benchmark):
    packing = benchmark.pedantic(
        pack_documents,
        args=(_benchmark_lengths(), MAX_TOKENS),
        kwargs={"backend": "python"},
        rounds=3,
        iterations=1,
        warmup_rounds=1,
    )
    benchmark.extra_info.update(num_docs=NUM_DOCS, max_tokens=MAX_TOKENS, bins=len(packing))
    benchmark.extra_info["efficiency"] = packing.efficiency


# --------------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def collect_metadata() -> dict:
    """CPU, versions, git revision, date, command (no hostname). fastsft's native build status matters
    here: without it the "native" rows cannot run."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastsft": _common.package_version("fastsft"),
        "native": "fastsft._C loaded" if _native.native_module() else _native.load_error(),
        "git_revision": _common.git_revision(),
        "date": now.date().isoformat(),
        "timestamp_utc": now.isoformat(timespec="seconds"),
        "command": _common.command_line(),
    }


def _median_seconds(fn, repeats: int) -> tuple[float, list[float], object]:
    result = fn()  # warm-up: first-touch page faults, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def measure(lengths: np.ndarray, max_tokens: int, repeats: int) -> list[dict]:
    """One entry per measured implementation: pack_documents per backend, and the native step 2 alone."""
    entries = []
    packings = {}
    for backend in ("native", "python"):
        entry = {"impl": f"pack_documents(backend={backend!r})", "backend": backend, "status": "ok"}
        if backend == "native" and _native.native_module() is None:
            entries.append({**entry, "status": f"unavailable: {_native.load_error()}"})
            continue
        median, times, packing = _median_seconds(
            lambda backend=backend: pack_documents(lengths, max_tokens, backend=backend), repeats
        )
        packings[backend] = packing
        entry.update(median_s=median, min_s=min(times), times_s=times, bins=len(packing), efficiency=packing.efficiency)
        entries.append(entry)

    module = _native.native_module()
    if module is not None:
        # Step 2 alone, on lengths already in packing order (what pack_documents hands it).
        ordered = np.sort(lengths)[::-1].copy()
        offsets, positions = np.empty(len(lengths) + 1, np.int64), np.empty(len(lengths), np.int64)
        median, times, bins = _median_seconds(
            lambda: module.best_fit_pack(ordered, max_tokens, offsets, positions), repeats
        )
        entries.append(
            {
                "impl": "fastsft._C.best_fit_pack (step 2 only)",
                "backend": "native",
                "status": "ok",
                "median_s": median,
                "min_s": min(times),
                "times_s": times,
                "bins": bins,
                "efficiency": float(lengths.sum()) / (bins * max_tokens),
            }
        )

    if len(packings) == 2:
        native, python = packings["native"], packings["python"]
        identical = all(
            np.array_equal(getattr(native, name), getattr(python, name))
            for name in ("bin_offsets", "doc_ids", "doc_tokens", "bin_tokens")
        )
        for entry in entries[:2]:
            entry["identical_to_other_backend"] = identical
    return entries


def render_markdown(payload: dict) -> str:
    meta, settings = payload["metadata"], payload["settings"]
    rows = [
        [
            e["impl"],
            e["status"],
            _ms(e.get("median_s")),
            _ms(e.get("min_s")),
            e.get("bins"),
            None if e.get("efficiency") is None else f"{e['efficiency']:.6f}",
        ]
        for e in payload["results"]
    ]
    lines = [
        f"# Packing: best-fit decreasing, {settings['num_docs']:,} documents, max_tokens {settings['max_tokens']}",
        "",
        f"- command: `{meta['command']}`",
        f"- cpu: {meta['cpu']} ({meta['cpu_count']} logical CPUs; packing is single-threaded)",
        f"- versions: python {meta['python']}, numpy {meta['numpy']}, fastsft {meta['fastsft']}; {meta['native']}",
        f"- git revision: {meta['git_revision']}; date: {meta['timestamp_utc']}",
        f"- lengths: {settings['lengths']}; total {settings['total_tokens']:,} tokens, so at least "
        f"{settings['lower_bound_bins']:,} bins",
        f"- time: median of {settings['repeats']} runs (time.perf_counter) after one warm-up run",
        "",
        _common.markdown_table(["implementation", "status", "median (ms)", "min (ms)", "bins", "efficiency"], rows),
    ]
    identical = {e.get("identical_to_other_backend") for e in payload["results"]} - {None}
    if identical:
        lines += ["", f"- native and python packings bit-identical: {identical == {True}}"]
    return "\n".join(lines) + "\n"


def _ms(seconds):
    return None if seconds is None else f"{seconds * 1e3:.2f}"


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=NUM_DOCS, help="number of documents")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per implementation (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the length sample")
    parser.add_argument("--out", type=Path, default=_common.DEFAULT_RESULTS_DIR, help="output folder")
    args = parser.parse_args(argv)

    lengths = lognormal_lengths(args.n, args.max_tokens, args.seed)
    total = int(lengths.sum())
    payload = {
        "benchmark": "packing",
        "metadata": collect_metadata(),
        "settings": {
            "num_docs": args.n,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "seed": args.seed,
            "lengths": f"round(lognormal(mean=6.5, sigma=1.0)) clipped to [16, {min(MAX_SEQ_LEN, args.max_tokens)}]",
            "total_tokens": total,
            "lower_bound_bins": -(-total // args.max_tokens),
        },
        "results": measure(lengths, args.max_tokens, args.repeats),
    }
    meta = payload["metadata"]
    stem = f"packing_{_common.gpu_slug(meta['cpu'])}_{meta['date']}"
    markdown = render_markdown(payload)
    paths = [
        _common.write_json(args.out / f"{stem}.json", payload),
        _common.write_text(args.out / f"{stem}.md", markdown),
    ]
    print(markdown)
    print("\n".join(f"wrote {path}" for path in paths))
    return paths


if __name__ == "__main__":
    main()
