"""The GPU proof in one command: every GPU test and benchmark, in order of value, inside one time budget.

    python benchmarks/gpu_proof.py --out "$OUT"              # on a GPU machine (default budget 480 s)
    python benchmarks/gpu_proof.py --dry-run --out /tmp/p    # the same code path on the CPU, tiny sizes

A GPU is lent by chance, for 15 device-minutes a session (machine start included, at most 10 minutes a
command, at most 8 files back). So everything runs from this one prepared command, and each part is a
subprocess with its own share of the budget (time a part leaves unused passes to the next):

| part | what | share |
|---|---|---|
| gpu_tests | `pytest -m gpu`: the parity tests at real sizes (32k-token attention, V=128k CE, ...) | 22% |
| bench_cross_entropy | `--quick`: fused linear CE vs Liger / torch / CCE, N=16384, V=128256 | 12% |
| bench_elementwise | `--quick`: RoPE / RMSNorm / SwiGLU GB/s vs copy bandwidth | 8% |
| bench_attention | `--quick`: varlen attention TFLOP/s vs torch varlen_attn, flex, SDPA per document | 12% |
| bench_sft | end to end (HF padded / packed / + Liger / fastsft per attention backend), loss parity | the rest (32%) |
| bench_dpo | `--shapes llama-3.2-1b`: DPO step, fastsft packed vs TRL padded / + Liger / fused head, parity | 14% |

bench_sft and bench_dpo take their time as `--budget-s`, split it between their rows and their parity checks,
and stop cleanly themselves.

A part that runs past its time is stopped (SIGTERM to its process group, SIGKILL 10 s later) and recorded
as "out of time" with whatever files it had written; a part that fails is recorded with its exit code and
the proof goes on. `--dry-run` runs each part in its CPU mode (`--smoke` / `--dry-run`, kernels through
the Triton interpreter), so CI checks this script without a GPU.

Triton's JIT compile time is part of the budget on a bare machine: the parts share one Triton cache
(`TRITON_CACHE_DIR` inside the work folder) so a kernel compiled by one part is not compiled again, each
part's wall time and the cache entries it added are recorded, and the bundle carries an index of the cache
(kernel, target, key) so a later session can check whether a cache pre-filled on the CPU (triton 3.6's
ptxas compiles sm_90 there) would hit on the GPU machine.

Output (at most 8 files, as the device returns no more), in --out:
    SUMMARY.md       the device, versions, git revision, per-part status and time, then each result table
    summary.json     the same as data
    proof.log        every part's output, with timings
    results.tar.gz   every result file (JSON / markdown / PNG per benchmark, the pytest junit XML, the
                     Triton cache index), laid out to unpack into benchmarks/results/:
                     `tar xzf results.tar.gz -C benchmarks/results`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import _common

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_BUDGET_S = 480.0  # one 10-minute device command, with room for the machine's start and a retry
BUNDLE_RESERVE_S = 15.0  # kept back for the summary and the tarball
KILL_GRACE_S = 10.0
MAX_BUNDLE_FILES = 8


@dataclass
class Part:
    """One subprocess of the proof. `share` of the budget (None: whatever is left)."""

    name: str
    share: float | None
    what: str

    def command(self, out_dir: Path, dry_run: bool, budget_s: float) -> list[str]:
        python = sys.executable
        if self.name == "gpu_tests":
            tests = ["tests/test_attention_implementations.py"] if dry_run else ["tests"]
            return [
                python,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "--durations=15",
                f"--junitxml={out_dir / 'gpu_tests_junit.xml'}",
                *tests,
            ]
        script = str(BENCHMARKS / f"{self.name}.py")
        if self.name in ("bench_sft", "bench_dpo"):
            # These split their own time between their rows and their parity checks, and stop cleanly.
            mode = ["--dry-run"] if dry_run else []
            if self.name == "bench_dpo":  # the target shape only: its share holds one shape's rows
                mode += ["--shapes", "llama-3.2-1b"]
            return [
                python,
                script,
                *mode,
                "--budget-s",
                f"{max(budget_s - KILL_GRACE_S, 1.0):.0f}",
                "--out",
                str(out_dir),
            ]
        return [python, script, "--smoke" if dry_run else "--quick", "--out", str(out_dir)]


PARTS = (
    Part("gpu_tests", 0.22, "pytest -m gpu: parity at real sizes"),
    Part("bench_cross_entropy", 0.12, "fused linear cross-entropy vs Liger / torch / CCE"),
    Part("bench_elementwise", 0.08, "RoPE / RMSNorm / SwiGLU vs copy bandwidth"),
    Part("bench_attention", 0.12, "varlen attention vs torch varlen_attn / flex / SDPA"),
    Part("bench_sft", None, "end to end vs HF padded / packed / + Liger, and loss-curve parity"),
    Part("bench_dpo", 0.14, "DPO step vs TRL padded / + Liger, and loss parity"),
)


@dataclass
class PartResult:
    name: str
    status: str  # "ok", "failed (exit N)", "out of time", "skipped: no time left"
    seconds: float
    time_limit_s: float
    files: list[str] = field(default_factory=list)
    triton_cache_entries_added: int = 0
    tests: dict | None = None  # gpu_tests: passed / failed / skipped / errors from the junit XML


class Log:
    """Everything printed goes to the terminal and to proof.log, flushed (a killed run keeps its log)."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        line = f"[proof {time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def raw(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)
        self.file.flush()


def _cache_entries(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.iterdir()} if cache_dir.is_dir() else set()


def run_part(part: Part, command: list[str], env: dict, time_limit_s: float, log: Log) -> tuple[str, float]:
    """Run one part's subprocess with its output streamed into the log; stop it at time_limit_s."""
    log(f"{part.name}: start ({part.what}); time limit {time_limit_s:.0f} s")
    log(f"{part.name}: $ {' '.join(command)}")
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=_common.REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    reader = threading.Thread(target=lambda: [log.raw(line) for line in process.stdout], daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=time_limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"{part.name}: out of time after {time.monotonic() - started:.0f} s; stopping it")
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    reader.join(timeout=5.0)
    seconds = time.monotonic() - started
    if timed_out:
        status = "out of time"
    elif process.returncode == 0:
        status = "ok"
    else:
        status = f"failed (exit {process.returncode})"
    log(f"{part.name}: {status} in {seconds:.1f} s")
    return status, seconds


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
        os.killpg(process.pid, sig)


def junit_counts(path: Path) -> dict | None:
    """passed / failed / errors / skipped from pytest's junit XML (None when pytest wrote none)."""
    if not path.is_file():
        return None
    suites = ElementTree.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def triton_cache_index(cache_dir: Path) -> list[dict]:
    """One record per compiled kernel in the cache: its key (the folder), name, target and launch options."""
    index = []
    for entry in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else ():
        for meta_path in entry.glob("*.json"):
            if meta_path.name.startswith("__grp__"):
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict) or "name" not in meta:
                continue
            index.append(
                {
                    "key": entry.name,
                    "name": meta.get("name"),
                    "target": meta.get("target"),
                    "num_warps": meta.get("num_warps"),
                    "num_stages": meta.get("num_stages"),
                    "triton_version": meta.get("triton_version"),
                    "files": sorted(p.name for p in entry.iterdir()),
                }
            )
    return index


def _weight(part: Part) -> float:
    """A part's share of the budget; the part without one takes what the others' shares leave."""
    return part.share if part.share is not None else 1.0 - sum(p.share for p in PARTS if p.share is not None)


def time_limit(budget_s: float, spent_s: float, parts: list[Part], position: int) -> float:
    """The time of parts[position]: the budget (less the bundling reserve) is split by the parts' shares;
    a part gets its own share plus whatever the earlier parts left unused."""
    usable = budget_s - BUNDLE_RESERVE_S
    total = sum(_weight(p) for p in parts)
    allotted_so_far = usable * sum(_weight(p) for p in parts[: position + 1]) / total
    return max(0.0, allotted_so_far - spent_s)


def summary_markdown(summary: dict, work: Path) -> str:
    meta = summary["metadata"]
    lines = [
        f"# GPU proof: {meta.get('gpu')} ({'dry run, CPU' if summary['dry_run'] else 'real run'})",
        "",
        *_common.metadata_lines(meta),
        "",
        f"Budget {summary['budget_s']:.0f} s; used {summary['seconds']:.0f} s. "
        "Unpack `results.tar.gz` into `benchmarks/results/` to commit the result files.",
        "",
        _common.markdown_table(
            ["part", "status", "time (s)", "limit (s)", "Triton kernels compiled", "result files"],
            [
                [
                    p["name"],
                    p["status"],
                    f"{p['seconds']:.1f}",
                    f"{p['time_limit_s']:.0f}",
                    p["triton_cache_entries_added"],
                    len(p["files"]),
                ]
                for p in summary["parts"]
            ],
        ),
    ]
    tests = next((p["tests"] for p in summary["parts"] if p["name"] == "gpu_tests" and p["tests"]), None)
    if tests:
        lines += [
            "",
            f"GPU tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped.",
        ]
    for table in sorted(work.glob("*.md")):
        lines += ["", "---", "", f"<!-- {table.name} -->", table.read_text().strip()]
    return "\n".join(lines) + "\n"


def bundle(out: Path, work: Path, summary: dict, log: Log) -> list[Path]:
    """SUMMARY.md, summary.json, results.tar.gz (+ proof.log): at most MAX_BUNDLE_FILES files in out."""
    (out / "SUMMARY.md").write_text(summary_markdown(summary, work))
    _common.write_json(out / "summary.json", summary)
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and "triton_cache" not in path.relative_to(work).parts:
                tar.add(path, arcname=str(path.relative_to(work)))
    shutil.rmtree(work)
    files = sorted(p for p in out.iterdir())
    log(f"bundle: {', '.join(p.name for p in files)}")
    assert len(files) <= MAX_BUNDLE_FILES, files
    return files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (emptied first)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="total seconds for all parts")
    parser.add_argument("--dry-run", action="store_true", help="CPU modes of every part (what CI runs)")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], help="run only these parts")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    work = out / "work"
    cache_dir = work / "triton_cache"
    cache_dir.mkdir(parents=True)
    log = Log(out / "proof.log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(cache_dir)}
    if args.dry_run:  # kernels through Triton's interpreter on the CPU, as the CPU suite runs them
        env.update(TRITON_INTERPRET="1", FASTSFT_BACKEND="triton")
    parts = [p for p in PARTS if not args.parts or p.name in args.parts]
    metadata = _common.collect_metadata()
    log(
        f"GPU proof on {metadata['gpu']} (torch {metadata['torch']}, triton {metadata['triton']}, git "
        f"{metadata['git_revision']}); budget {args.budget_s:.0f} s{'; dry run' if args.dry_run else ''}"
    )
    started = time.monotonic()
    results = []
    for position, part in enumerate(parts):
        spent = time.monotonic() - started
        limit = time_limit(args.budget_s, spent, parts, position)
        if limit < 5.0:
            log(f"{part.name}: skipped, {limit:.0f} s left for it")
            results.append(PartResult(part.name, "skipped: no time left", 0.0, limit))
            continue
        before_files, before_cache = set(work.iterdir()), _cache_entries(cache_dir)
        status, seconds = run_part(part, part.command(work, args.dry_run, limit), env, limit, log)
        added = sorted(p.name for p in set(work.iterdir()) - before_files)
        result = PartResult(part.name, status, seconds, limit, added, len(_cache_entries(cache_dir) - before_cache))
        if part.name == "gpu_tests":
            result.tests = junit_counts(work / "gpu_tests_junit.xml")
        results.append(result)
    _common.write_json(work / "triton_cache_index.json", {"entries": triton_cache_index(cache_dir)})
    summary = {
        "benchmark": "gpu_proof",
        "metadata": metadata,
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "seconds": time.monotonic() - started,
        "parts": [vars(r) for r in results],
        "shares": {p.name: round(_weight(p), 3) for p in parts},
    }
    bundle(out, work, summary, log)
    failed = [r.name for r in results if r.status not in ("ok",)]
    log(f"done in {time.monotonic() - started:.0f} s; " + (f"not ok: {', '.join(failed)}" if failed else "all ok"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
