"""Helpers every GPU benchmark in benchmarks/ shares: run metadata, timing, peak memory, result files.

A benchmark script imports this module as `_common` (the script's own folder is first on sys.path when
it runs as `python benchmarks/bench_x.py`). Nothing here imports triton or fastsft at module level: a
script may still have to set TRITON_INTERPRET / FASTSFT_BACKEND after importing this module and before
triton is first imported.

Result files are named `<benchmark>_<gpu-slug>_<YYYY-MM-DD>.{json,md,png}` (DESIGN.md, "Testing
rules": numbers quoted anywhere come from these files).
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
GIB = float(1 << 30)

# Distribution names to try for each package whose version a result file records (first match wins).
PACKAGES = {
    "triton": ("triton", "pytorch-triton"),
    "transformers": ("transformers",),
    "fastsft": ("fastsft",),
    "liger_kernel": ("liger-kernel", "liger-kernel-nightly"),
    "cut_cross_entropy": ("cut-cross-entropy", "cut_cross_entropy"),
}


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Stopping when the caller's time is up
# --------------------------------------------------------------------------------------------------


class OutOfTime(BaseException):
    """SIGTERM: the caller's time limit passed (benchmarks/gpu_proof.py sends it, then SIGKILL 10 s later).
    A BaseException, so that no measurement's `except Exception` swallows it: the script writes what it
    measured."""


def _raise_out_of_time(signum, frame):
    raise OutOfTime


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises OutOfTime in the main thread."""
    signal.signal(signal.SIGTERM, _raise_out_of_time)


def ignore_sigterm() -> None:
    """While the result files are written: a second SIGTERM must not cut them short (SIGKILL still ends it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def sweep_until_out_of_time(configs: Sequence, run_one: Callable[[object], None]) -> list:
    """run_one(config) for each config in turn until SIGTERM; returns the configs that completed (a config
    interrupted half-way is dropped whole, so every reported config has all its implementations)."""
    done = []
    stop_on_sigterm()
    try:
        for config in configs:
            run_one(config)
            done.append(config)
    except OutOfTime:
        print(f"SIGTERM: out of time after {len(done)} of {len(configs)} configs; writing what was measured",
              flush=True)  # fmt: skip
    ignore_sigterm()
    return done


def package_version(*dist_names: str) -> str | None:
    """Installed version of the first distribution found among `dist_names`, or None. Reads package
    metadata only, so it never imports the package (importing triton here would be too early)."""
    for name in dist_names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def gpu_name() -> str:
    """torch.cuda.get_device_name() of the current device, or "cpu" without CUDA."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug(name: str) -> str:
    """File-name form of a device name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"^nvidia-", "", slug)
    return slug or "unknown"


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def git_revision() -> str:
    """Short HEAD hash, with "-dirty" when tracked or untracked files differ from it (result files under
    benchmarks/results do not count); "unknown" when git is missing or this is no git checkout.
    FASTSFT_GIT_REVISION overrides it: a copy of the tree without .git (a lent GPU machine) is told its
    revision by the command that starts it."""
    override = os.environ.get("FASTSFT_GIT_REVISION")
    if override:
        return override
    try:
        revision = _git("rev-parse", "--short", "HEAD")
        changes = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{revision}-dirty" if changes else revision


def command_line() -> str:
    """The command that started this process, as one could paste it into a shell."""
    return shlex.join(["python", *sys.argv])


def collect_metadata() -> dict:
    """Everything a result file needs to be reproducible: device, versions, git revision, date, command.
    Deliberately no hostname."""
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = {
        "gpu": gpu_name(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
    }
    meta.update({key: package_version(*names) for key, names in PACKAGES.items()})
    meta.update(
        python=platform.python_version(),
        git_revision=git_revision(),
        date=now.date().isoformat(),
        timestamp_utc=now.isoformat(timespec="seconds"),
        command=command_line(),
    )
    return meta


def result_stem(benchmark: str, metadata: dict) -> str:
    """`<benchmark>_<gpu-slug>_<date>`: the common name of a run's .json, .md and .png."""
    return f"{benchmark}_{gpu_slug(metadata['gpu'])}_{metadata['date']}"


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Return freed blocks to the device so the next measurement starts from a clean allocator. On CPU
    nothing is measured, and gc.collect() (a third of a second after torch.compile) is skipped."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def host_timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in ms, device work included (synchronised before and after)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def median_time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 100.0,
    rep_ms: float = 500.0,
    min_reps: int = 10,
    cpu_reps: int = 3,
) -> float:
    """Median time of `fn()` in milliseconds; `fn` must already be warm (compiled, autotuned).

    CUDA: triton.testing.do_bench (CUDA events around each call, L2 flushed between calls), with the
    repetition window stretched to at least `min_reps` calls of the measured single-call time, since
    do_bench otherwise runs a single repetition of a call longer than `rep_ms`.
    CPU (smoke runs): time.perf_counter around `cpu_reps` calls.
    """
    if device.type == "cuda":
        from triton.testing import do_bench  # only here: triton must not be imported before the env is set

        estimate = host_timed_ms(fn, device)
        rep = max(rep_ms, min_reps * estimate)
        return float(do_bench(fn, warmup=warmup_ms, rep=rep, return_mode="median"))
    return statistics.median(host_timed_ms(fn, device) for _ in range(max(1, cpu_reps)))


def peak_memory_gib(fn: Callable[[], object], device: torch.device, before: Callable[[], None] = None):
    """Peak allocated device memory during one `fn()` call, above what was allocated just before it
    (the inputs), in GiB; None off CUDA. `before` runs first, outside the measurement (e.g. dropping
    the .grad tensors of the previous call so that they do not count as inputs)."""
    if device.type != "cuda":
        return None
    if before is not None:
        before()
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / GIB


def classify_failure(exc: BaseException) -> str:
    """Result status for an exception raised while measuring: "oom" or "error: <type>: <first line>"."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "oom"
    return f"error: {type(exc).__name__}: {text[:160]}"


# --------------------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------------------


def _finite_or_none(value):
    """JSON has no NaN/inf: non-finite floats become null, containers are walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite_or_none(payload), indent=2, allow_nan=False, default=str) + "\n")
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are str()-ed, None prints as an empty cell, pipes are escaped."""

    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metadata_lines(meta: dict) -> list[str]:
    """Markdown bullet lines for a run's metadata (the command line first, as the results must say it)."""
    versions = ", ".join(f"{key} {meta.get(key) or 'not installed'}" for key in ("torch", *PACKAGES))
    return [
        f"- command: `{meta['command']}`",
        f"- device: {meta['gpu']} (CUDA {meta.get('cuda') or 'n/a'}), python {meta['python']}",
        f"- versions: {versions}",
        f"- git revision: {meta['git_revision']}; date: {meta['timestamp_utc']}",
    ]


# --------------------------------------------------------------------------------------------------
# Plotting
# --------------------------------------------------------------------------------------------------


@dataclass
class BarPanel:
    """One axes of grouped bars: `series[name][i]` is the bar of series `name` in group `groups[i]`
    (None: no bar; `marks[(name, i)]`, e.g. "oom", is then written where the bar would be)."""

    title: str
    ylabel: str
    groups: list[str]
    series: dict[str, list[float | None]]
    log: bool = True
    marks: dict[tuple[str, int], str] = field(default_factory=dict)


def _draw_panel(ax, panel: BarPanel, names: list[str], colors: dict[str, object]) -> None:
    """Bars of `names` (the series shown anywhere in the figure, so slots line up across panels)."""
    width = 0.8 / max(1, len(names))
    values = [v for name in names for v in panel.series.get(name, ()) if v is not None and v > 0]
    floor = min(values) if values and panel.log else 0.0
    for j, name in enumerate(names):
        xs = [i - 0.4 + (j + 0.5) * width for i in range(len(panel.groups))]
        column = panel.series.get(name) or [None] * len(panel.groups)
        heights = [v if v is not None and v > 0 else float("nan") for v in column]
        ax.bar(xs, heights, width, color=colors[name])
        for i, x in enumerate(xs):
            if (name, i) in panel.marks:
                ax.text(x, floor, panel.marks[(name, i)], rotation=90, ha="center", va="bottom", fontsize=7,
                        color="crimson")  # fmt: skip
    ax.set_xticks(range(len(panel.groups)), panel.groups, fontsize=8)
    ax.set_xlim(-0.5, len(panel.groups) - 0.5)
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.ylabel + (" (log scale)" if panel.log and values else ""))
    if not values:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
        return
    ax.grid(axis="y", alpha=0.3, which="both")
    if panel.log:
        ax.set_yscale("log")


def plot_panels(path: Path, panels: Sequence[Sequence[BarPanel]], title: str) -> Path:
    """Save a grid of grouped-bar panels (rows x columns) as a PNG with one shared legend (Agg backend,
    no display needed). A series keeps its colour and slot in every panel; series with neither a bar nor a
    mark anywhere (e.g. a baseline that is not installed) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = [p for row in panels for p in row]
    shown = {n for p in flat for n, column in p.series.items() if any(v is not None for v in column)}
    shown |= {name for p in flat for name, _ in p.marks}
    every = list(dict.fromkeys(n for p in flat for n in p.series))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(every)}  # same in every run
    names = [n for n in every if n in shown]
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    n_groups = max(len(p.groups) for p in flat)
    panel_width = max(5.0, 0.2 * n_groups * max(1, len(names)) + 1.5)
    size = (panel_width * n_cols, 3.4 * n_rows + 0.8)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=size, squeeze=False, layout="constrained")
    for r, row in enumerate(panels):
        for c in range(n_cols):
            if c < len(row):
                _draw_panel(axes[r][c], row[c], names, colors)
            else:
                axes[r][c].axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names]
    fig.legend(handles, names, loc="outside lower center", ncol=max(1, min(len(names), 7)), fontsize=9)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Shared by the bench_*.py scripts: command-line options, implementation notes, result files
# --------------------------------------------------------------------------------------------------


def add_run_options(parser) -> None:
    """The options every kernel benchmark takes: --smoke, --out, --seed and the do_bench budget."""
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny fp32 shapes; without CUDA through the Triton interpreter (checks the script, not speed)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-ms", type=float, default=100.0, help="do_bench warmup (ms)")
    parser.add_argument("--rep-ms", type=float, default=500.0, help="do_bench repetition window (ms), at least")
    parser.add_argument("--min-reps", type=int, default=10, help="timed calls, at least")


def implementation_notes(payload: dict) -> list[str]:
    """One markdown line per implementation: what ran, and every distinct non-ok status or warning it had."""
    lines = []
    for name in payload["settings"]["impls"]:
        entries = [e for e in payload["results"] if e["impl"] == name]
        notes = list(dict.fromkeys(e["note"] for e in entries if e["note"]))
        problems = list(dict.fromkeys(e["status"] for e in entries if e["status"] != "ok"))[:5]
        warned = list(dict.fromkeys(w for e in entries for w in e["warnings"]))
        text = "; ".join(notes) or "(did not run)"
        if problems:
            text += "; statuses: " + "; ".join(f"`{p}`" for p in problems)
        if warned:
            text += "; warnings: " + "; ".join(f"`{w}`" for w in warned[:3])
        lines.append(f"- **{name}**: {text}")
    return lines


def write_json_only(payload: dict, out_dir: Path) -> list[Path]:
    """<benchmark>_<gpu>_<date>.json alone: a run stopped before any config completed has no table or plot."""
    return [write_json(out_dir / f"{result_stem(payload['benchmark'], payload['metadata'])}.json", payload)]


def write_result_files(payload: dict, out_dir: Path, markdown: str, panels, title: str) -> list[Path]:
    """<benchmark>_<gpu>_<date>.{json,md,png} in out_dir."""
    stem = result_stem(payload["benchmark"], payload["metadata"])
    return [
        write_json(out_dir / f"{stem}.json", payload),
        write_text(out_dir / f"{stem}.md", markdown),
        plot_panels(out_dir / f"{stem}.png", panels, title),
    ]
