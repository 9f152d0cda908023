"""What every GPU benchmark in benchmarks/ shares: run metadata, timing, peak memory, result files, and the
one runner of the kernel benchmarks.

A benchmark script imports this module as `_common` (the script's own folder is first on sys.path when it
runs as `python benchmarks/bench_x.py`). Nothing here imports triton or fastsft at module level: a script
may still have to set TRITON_INTERPRET / FASTSFT_BACKEND after importing this module and before triton is
first imported (use_interpreter_without_cuda does that).

The kernel benchmarks (bench_cross_entropy, bench_attention, bench_elementwise) subclass KernelBenchmark
with what they measure: configs, implementations, FLOP or byte accounting, derived ratios and targets,
tables and plots. The runner does the rest the same way for each: command-line run options, the sweep
that stops cleanly on SIGTERM, one entry per (config, implementation, direction), warm-up + timing + peak
memory + parity with failures classified (oom / skipped / error), progress lines, the payload and its
metadata, and the markdown / JSON / PNG files.

Result files are named `<benchmark>_<gpu-slug>_<YYYY-MM-DD>.{json,md,png}` (ARCHITECTURE.md, "Testing
rules": numbers quoted anywhere come from these files).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import operator
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
GIB = float(1 << 30)
REFERENCE = "fastsft"  # the implementation every other one's outputs are compared with (parity)

# Distribution names to try for each package whose version a result file records (first match wins).
PACKAGES = {
    "triton": ("triton", "pytorch-triton"),
    "transformers": ("transformers",),
    "fastsft": ("fastsft",),
    "liger_kernel": ("liger-kernel", "liger-kernel-nightly"),
    "cut_cross_entropy": ("cut-cross-entropy", "cut_cross_entropy"),
}


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
        print(
            f"SIGTERM: out of time after {len(done)} of {len(configs)} configs; writing what was measured",
            flush=True,
        )
    ignore_sigterm()
    return done


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


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
    done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True)
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


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call of `fn`, device work included (synchronised before and after)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def host_timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in ms, device work included."""
    return timed(fn, device)[0] * 1e3


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


@contextmanager
def failures_as_status(*records: dict):
    """Within the block, an exception becomes the status of every one of `records` and goes no further:
    Unavailable -> "skipped: <why>", any other Exception -> classify_failure ("oom", "error: ..."). OutOfTime,
    a BaseException, still passes: the caller's time is up."""
    try:
        yield
    except Unavailable as exc:
        status = f"skipped: {exc}"
    except Exception as exc:  # an OOM or a broken baseline must not end the run
        status = classify_failure(exc)
    else:
        return
    for record in records:
        record["status"] = status


def warning_lines(caught: Iterable[warnings.WarningMessage]) -> list[str]:
    """The first three distinct warnings of a call, the first line of each (200 characters at most)."""
    lines = ((str(w.message).splitlines() or [""])[0][:200] for w in caught)
    return list(dict.fromkeys(lines))[:3]


def as_tuple(result) -> tuple | None:
    """A call's result as a tuple of outputs: a tuple or list as it is, a single tensor alone, None as None."""
    if result is None:
        return None
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def rel_diff(outputs: tuple, reference: tuple) -> float:
    """Worst relative L2 difference ||x - ref|| / ||ref|| over the tensors (computed in fp32)."""
    worst = 0.0
    for out, ref in zip(outputs, reference, strict=True):
        ref32 = ref.detach().float()
        diff = torch.linalg.vector_norm(out.detach().float() - ref32).item()
        worst = max(worst, diff / max(torch.linalg.vector_norm(ref32).item(), 1e-30))
    return worst


_compiled: dict = {"key": None, "fn": None}


def compiled(fn: Callable, key: object) -> Callable:
    """torch.compile(fn, dynamic=False), compiled afresh whenever (fn, key) changes. A sweep has more shapes
    than dynamo's recompile limit, past which dynamo would silently fall back to eager; one fresh compile
    per shape (the key) keeps every measurement compiled."""
    if _compiled["key"] != (fn, key):
        torch._dynamo.reset()
        _compiled.update(key=(fn, key), fn=torch.compile(fn, dynamic=False))
    return _compiled["fn"]


# --------------------------------------------------------------------------------------------------
# Ratios, targets and table cells
# --------------------------------------------------------------------------------------------------

_RULES = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def quotient(a: float | None, b: float | None) -> float | None:
    """a / b when both are known and b is non-zero, else None."""
    return a / b if a is not None and b else None


def ratio(a: dict | None, b: dict | None, key: str = "time_ms") -> float | None:
    """a[key] / b[key] for two entries that were both measured (None when either is missing)."""
    if not a or not b:
        return None
    return quotient(a.get(key), b.get(key))


def meets(value: float, rule: str, limit: float) -> bool:
    """Whether `value <rule> limit` holds, rule being one of ">=", "<=", ">", "<"."""
    return _RULES[rule](value, limit)


def check_mark(met: bool | None) -> str:
    """The mark after a value checked against its target: " ✓" met, " ✗" missed, "" not checked."""
    return "" if met is None else (" ✓" if met else " ✗")


def num(value: float | None, fmt: str) -> str | None:
    """`value` formatted, or None (an empty cell) when it is unknown or not finite."""
    return None if value is None or not math.isfinite(value) else format(value, fmt)


def sig3(value: float | None) -> str | None:
    """Three significant digits without an exponent (rates span 1e-5 on a CPU smoke run to thousands on a
    GPU); None when unknown or not finite."""
    if value is None or not math.isfinite(value):
        return None
    digits = 2 - math.floor(math.log10(abs(value))) if value else 0
    return f"{value:.{max(0, digits)}f}"


def short_status(status: str) -> str:
    """A status as a table cell: "skipped: why" -> "skipped", "error: ..." -> "error"."""
    return status.split(":")[0]


def is_failure(status: str, also: Sequence[str] = ()) -> bool:
    """Statuses a plot marks where the bar would be: out of memory, an error, and the statuses in `also`
    (not those of a baseline that is not installed)."""
    return status == "oom" or status.startswith("error") or status in also


def failure_marks(cells: Iterable[tuple[tuple[str, int], dict]], also: Sequence[str] = ()) -> dict:
    """BarPanel.marks from ((series, group index), entry) pairs: the short status of every failed entry."""
    return {slot: short_status(entry["status"]) for slot, entry in cells if is_failure(entry["status"], also)}


def timing_line(settings: dict) -> str:
    """How the payload's settings timed each call, for the markdown report."""
    if settings["device"] == "cuda":
        return (
            f"triton.testing.do_bench median (warmup {settings['warmup_ms']:g} ms, repetitions over at least "
            f"{settings['rep_ms']:g} ms and {settings['min_reps']} calls, L2 flushed between calls)"
        )
    return f"time.perf_counter median of {settings['cpu_reps']} calls (smoke run without CUDA: no speed data)"


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


def implementation_notes(
    entries: list[dict],
    names: Sequence[str],
    *,
    key: str = "impl",
    lead: dict[str, str] | None = None,
    details: Callable[[dict], Iterable[str | None]] = lambda entry: (entry["note"],),
) -> list[str]:
    """One markdown line per implementation (entries whose `key` is the name): its `lead` text, what its
    entries say (`details`, e.g. the note), then every distinct non-ok status and the first warnings."""
    lines = []
    for name in names:
        mine = [e for e in entries if e[key] == name]
        said = list(dict.fromkeys(x.replace("\n", " ") for e in mine for x in details(e) if x))
        problems = list(dict.fromkeys(e["status"] for e in mine if e["status"] != "ok"))[:5]
        warned = list(dict.fromkeys(w for e in mine for w in e["warnings"]))[:3]
        text = "; ".join(([lead[name]] if lead else []) + said) or "(did not run)"
        if problems:
            text += "; statuses: " + "; ".join(f"`{p}`" for p in problems)
        if warned:
            text += "; warnings: " + "; ".join(f"`{w}`" for w in warned)
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
                mark = panel.marks[(name, i)]
                ax.text(x, floor, mark, rotation=90, ha="center", va="bottom", fontsize=7, color="crimson")
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
# Command line
# --------------------------------------------------------------------------------------------------


def use_interpreter_without_cuda(cpu_flag: str) -> None:
    """With `cpu_flag` (e.g. --smoke) on the command line and no CUDA: run fastsft's real Triton kernels in
    Triton's interpreter. The interpreter is chosen when triton is first imported, so a script calls this
    right after its imports, before anything imports triton (fastsft's kernels and triton.testing are
    imported lazily, inside the functions that use them)."""
    if cpu_flag in sys.argv and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("FASTSFT_BACKEND", "triton")


def argument_parser(benchmark: str, description: str) -> argparse.ArgumentParser:
    """A kernel benchmark's parser; its epilog names the result files."""
    epilog = f"Writes {benchmark}_<gpu>_<date>.{{json,md,png}} into --out."
    return argparse.ArgumentParser(description=description, epilog=epilog)


def add_out_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR, help="output folder")


def add_run_options(parser: argparse.ArgumentParser, impls: Sequence[str], quick_help: str) -> None:
    """The options every kernel benchmark takes after its sweep options: --impl, --quick (its shapes
    described by `quick_help`), --smoke, --out, --seed and the do_bench budget."""
    parser.add_argument("--impl", nargs="+", choices=impls, help="implementations to run (default all)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny fp32 shapes; without CUDA through the Triton interpreter (checks the script, not speed)",
    )
    add_out_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-ms", type=float, default=100.0, help="do_bench warmup (ms)")
    parser.add_argument("--rep-ms", type=float, default=500.0, help="do_bench repetition window (ms), at least")
    parser.add_argument("--min-reps", type=int, default=10, help="timed calls, at least")


def check_values(parser: argparse.ArgumentParser, option: str, values, ok: Callable[[float], bool], rule: str):
    """parser.error (exit 2) unless every one of an option's `values` is `ok`; `rule` says what is."""
    for value in values or ():
        if not ok(value):
            parser.error(f"{option} values must be {rule}, got {value}")


def cuda_missing(script: str, instead: str) -> bool:
    """True, after saying so on stderr, when torch sees no CUDA GPU: a benchmark's real run needs one, and
    `instead` says what to pass for the run that checks the script on a CPU."""
    if torch.cuda.is_available():
        return False
    print(
        f"{script} needs a CUDA GPU (none is visible to torch). Run it on a GPU machine, or {instead}.",
        file=sys.stderr,
    )
    return True


# --------------------------------------------------------------------------------------------------
# The kernel benchmarks' runner
# --------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The implementation cannot run here (not installed, skipped, too large); recorded as "skipped: <why>"."""


@dataclass
class Settings:
    """How a kernel benchmark measures: device, dtype, seed, the timing budget, and the implementations it
    leaves out (name -> why)."""

    device: torch.device
    dtype: torch.dtype
    smoke: bool
    seed: int
    warmup_ms: float
    rep_ms: float
    min_reps: int
    skip: dict[str, str] = field(default_factory=dict)
    cpu_reps: int = 3

    def median_ms(self, fn: Callable[[], object]) -> float:
        """median_time_ms of a warm `fn` under these settings' budget."""
        return median_time_ms(
            fn,
            self.device,
            warmup_ms=self.warmup_ms,
            rep_ms=self.rep_ms,
            min_reps=self.min_reps,
            cpu_reps=self.cpu_reps,
        )

    def record(self) -> dict:
        """The settings as a payload records them."""
        return {
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "smoke": self.smoke,
            "seed": self.seed,
            "warmup_ms": self.warmup_ms,
            "rep_ms": self.rep_ms,
            "min_reps": self.min_reps,
            "cpu_reps": self.cpu_reps,
        }


def make_settings(args: argparse.Namespace, skip: dict[str, str]) -> Settings:
    """CUDA when there is one, else the CPU; bf16, or fp32 for --smoke (the interpreter's bf16 tl.dot is
    wrong)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Tiny smoke shapes: one thread. Several (OpenMP pools of torch and of torch.compile's kernels)
        # spin against each other on a small machine and turn 0.2 ms calls into 50 ms ones.
        torch.set_num_threads(1)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    return Settings(device, dtype, args.smoke, args.seed, args.warmup_ms, args.rep_ms, args.min_reps, skip)


@dataclass
class Step:
    """What one entry times: `call`, warmed once, then timed and measured for peak memory. Its first result,
    as a tuple of outputs put into the reference's layout by `canonical`, is what parity compares; `reset`
    (e.g. dropping .grad tensors) runs before the peak-memory call and once the entry is done."""

    call: Callable[[], object]
    canonical: Callable[[tuple], tuple] | None = None
    reset: Callable[[], None] | None = None


@dataclass
class Cell:
    """One implementation set up on one config: its note, and one step per direction (or a function that
    builds it when its entry is measured, so that a failure building it fails that entry alone)."""

    note: str
    steps: Sequence[Step | Callable[[], Step]]


class KernelBenchmark:
    """The run every kernel benchmark shares. A script subclasses this with what it measures and runs
    `Script(args, configs).run()`: no GPU without --smoke is refused; the configs are swept in order until
    SIGTERM (a config cut short is dropped whole), every implementation on each, one entry per direction;
    each entry is warmed up, compared with the reference's outputs, timed and measured for peak memory,
    a failure becoming its status ("skipped: why", "oom", "error: ..."), never the end of the sweep; a
    progress line is printed per entry; the payload (metadata, settings, results, derived, configs not run)
    and its markdown report and plot are written.

    A subclass sets the class attributes below and implements entry_fields, build, derive, settings_fields,
    payload_fields, summary_lines, sections, main_table, panels and plot_subject; smoke_skips, setup,
    prepare, record_outputs and notes have defaults."""

    name: str  # payload["benchmark"] and the result files' stem
    title: str  # the markdown report's heading
    description: str  # payload["description"]
    all_impls: tuple[str, ...]  # every implementation, in the order they run (REFERENCE first)
    directions: tuple[str | None, ...] = (None,)  # an entry per direction and implementation; None: no key
    rate: tuple[str, str, float, str]  # (entry key, its per-call amount key, unit, unit name)
    label_width: int = 52  # of a config's label in the progress lines

    def __init__(self, args: argparse.Namespace, configs: list):
        self.args = args
        self.configs = configs
        self.impls = [name for name in self.all_impls if args.impl is None or name in args.impl]
        skip = {}
        if args.smoke:  # an implementation named with --impl runs anyway
            skip = {name: why for name, why in self.smoke_skips().items() if name not in (args.impl or ())}
        self.settings = make_settings(args, skip)
        self.gpu = gpu_name()
        self.on_gpu = self.settings.device.type == "cuda"  # CPU times judge no target

    # ----- what a script supplies ------------------------------------------------------------------

    def smoke_skips(self) -> dict[str, str]:
        """Implementations a --smoke run leaves out unless --impl names them, and why."""
        return {}

    def setup(self) -> None:
        """Runs once, after the header line and before the sweep."""

    def prepare(self, cfg):
        """Inputs every implementation of `cfg` shares, passed to build(); a failure here fails every entry of
        the config alike."""
        return None

    def entry_fields(self, name: str, cfg, direction: str | None) -> dict:
        """The script's own fields of implementation `name`'s fresh entry (its FLOP or byte count, its derived
        keys set to None); they may replace the shared ones (e.g. "config")."""
        raise NotImplementedError

    def build(self, name: str, cfg, shared) -> Cell:
        """Implementation `name` set up on `cfg`; raises Unavailable when it cannot run here."""
        raise NotImplementedError

    def record_outputs(self, entry: dict, outputs: tuple | None) -> None:
        """What an entry keeps of its first call's outputs besides parity (nothing by default)."""

    def derive(self, cfg, entries: list[dict]) -> list[dict]:
        """The config's derived records (ratios, targets); may also fill the entries' derived keys."""
        raise NotImplementedError

    def settings_fields(self) -> dict:
        """The script's own keys of payload["settings"] (its sweep, constants)."""
        raise NotImplementedError

    def payload_fields(self) -> dict:
        """The script's own top-level payload keys (formulas, targets, ...)."""
        raise NotImplementedError

    def summary_lines(self, payload: dict) -> list[str]:
        """The markdown bullet lines after the metadata: inputs, timing, formulas, targets."""
        raise NotImplementedError

    def sections(self, payload: dict) -> list[tuple[str, list[str]]]:
        """The markdown sections before "Implementations": (heading, lines)."""
        raise NotImplementedError

    def main_table(self, payload: dict) -> str:
        """The table printed at the end of the run."""
        raise NotImplementedError

    def notes(self, payload: dict) -> list[str]:
        """The markdown lines of the "Implementations" section."""
        return implementation_notes(payload["results"], payload["settings"]["impls"])

    def panels(self, payload: dict) -> list[list[BarPanel]]:
        """The plot: rows of panels."""
        raise NotImplementedError

    def plot_subject(self, payload: dict) -> str:
        """What the plot shows, its title's start (the device, dtype and revision follow)."""
        raise NotImplementedError

    # ----- the run ---------------------------------------------------------------------------------

    def run(self) -> int:
        """The whole run; the process's exit status."""
        cpu_run = "pass --smoke for a tiny CPU run through the Triton interpreter that checks the script only"
        if not self.args.smoke and cuda_missing(f"bench_{self.name}.py", cpu_run):
            return 2
        directions = [d for d in self.directions if d is not None]
        per_impl = f" x {', '.join(directions)}" if directions else ""
        header = f"{len(self.configs)} configs x {len(self.impls)} implementations{per_impl}"
        print(f"{header} on {self.gpu}, {self.settings.dtype}", flush=True)
        self.setup()
        results, derived, done = self.sweep()
        payload = self.payload(results, derived)  # the sweep asked for
        payload["configs_not_run"] = [c.label() for c in self.configs[len(done) :]]  # out of time
        if not done:  # stopped before the first config completed
            print("wrote " + ", ".join(str(p) for p in write_json_only(payload, self.args.out)))
            return 0
        meta, dtype = payload["metadata"], payload["settings"]["dtype"]
        title = f"{self.plot_subject(payload)}: {meta['gpu']}, {dtype}, git {meta['git_revision']}"
        paths = write_result_files(payload, self.args.out, self.render_markdown(payload), self.panels(payload), title)
        print("\n" + self.main_table(payload) + "\n")
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0

    def sweep(self) -> tuple[list[dict], list[dict], list]:
        """(results, derived, the configs measured): every config in turn until SIGTERM."""
        results, derived = [], []

        def run_one(cfg) -> None:
            entries = []
            try:
                shared = self.prepare(cfg)
            except Exception as exc:  # the inputs themselves did not fit: every cell of the config fails alike
                status = classify_failure(exc)
                print(f"{cfg.label()}: inputs failed: {status}", flush=True)
                for name in self.impls:
                    entries += self.new_entries(name, cfg, status)
            else:
                ref: dict = {}  # the reference's outputs per direction
                for name in self.impls:
                    cell = self.run_cell(name, cfg, shared, ref)
                    for entry in cell:
                        print(self.progress(cfg, entry), flush=True)
                    entries += cell
                del shared, ref
            release_memory(self.settings.device)
            derived.extend(self.derive(cfg, entries))
            results.extend(entries)

        done = sweep_until_out_of_time(self.configs, run_one)
        return results, derived, done

    def new_entries(self, name: str, cfg, status: str = "not run") -> list[dict]:
        """The fresh entries of one implementation on one config, a direction each."""
        entries = []
        for direction in self.directions:
            entry = {"config": asdict(cfg), "impl": name, "status": status, "time_ms": None, self.rate[0]: None}
            entry.update(peak_gib=None, parity_rel_diff=None, note=None, warnings=[])
            if direction is not None:
                entry["direction"] = direction
            entry.update(self.entry_fields(name, cfg, direction))
            entries.append(entry)
        return entries

    def run_cell(self, name: str, cfg, shared, ref: dict) -> list[dict]:
        """One implementation on one config, every direction; failures become the entries' status."""
        entries = self.new_entries(name, cfg)
        cell = None
        with failures_as_status(*entries):  # one that cannot even be set up fails its own entries only
            if name in self.settings.skip:
                raise Unavailable(self.settings.skip[name])
            cell = self.build(name, cfg, shared)
        if cell is not None:
            for entry, step in zip(entries, cell.steps, strict=True):
                entry["note"] = cell.note
                self.measure(entry, step, ref)
                release_memory(self.settings.device)
            cell = None  # drops the steps' closures (graphs, inputs) before the next cell
        release_memory(self.settings.device)
        return entries

    def measure(self, entry: dict, step: Step | Callable[[], Step], ref: dict) -> None:
        """Fill one entry: warm call (warnings recorded), parity against the reference's outputs (or store
        them, for the reference), time, peak memory, rate; a failure becomes its status."""
        device = self.settings.device
        with failures_as_status(entry):
            if not isinstance(step, Step):
                step = step()
            try:
                with warnings.catch_warnings(record=True) as caught:  # the first call compiles / autotunes
                    warnings.simplefilter("always")
                    outputs = as_tuple(step.call())
                    synchronize(device)
                entry["warnings"] = warning_lines(caught)
                if outputs is not None and step.canonical is not None:
                    outputs = step.canonical(outputs)
                self.record_outputs(entry, outputs)
                self.compare(entry, outputs, ref)
                del outputs
                entry["time_ms"] = self.settings.median_ms(step.call)
                entry["peak_gib"] = peak_memory_gib(step.call, device, before=step.reset)
                key, amount, unit, _ = self.rate
                entry[key] = entry[amount] / (entry["time_ms"] * 1e-3) / unit
                entry["status"] = "ok"
            finally:
                if step.reset is not None:
                    step.reset()

    @staticmethod
    def compare(entry: dict, outputs: tuple | None, ref: dict) -> None:
        """The reference's outputs are kept per direction; any other implementation's are compared with them."""
        key = entry.get("direction")
        if outputs is None:
            return
        if entry["impl"] == REFERENCE:
            ref[key] = tuple(o.detach() for o in outputs)
        elif ref.get(key) is not None:
            try:
                entry["parity_rel_diff"] = rel_diff(outputs, ref[key])
            except Exception as exc:  # a layout mismatch is worth a note, not the measurement
                entry["warnings"].append(f"parity not computed: {classify_failure(exc)}")

    def progress(self, cfg, entry: dict) -> str:
        """One entry as a progress line."""
        parts = [f"{cfg.label():<{self.label_width}}"]
        if "direction" in entry:
            parts.append(f"{entry['direction']:<7}")
        parts += [f"{entry['impl']:<16}", entry["status"]]
        if entry["time_ms"] is not None:
            key, _, _, unit_name = self.rate
            parts.append(f"{entry['time_ms']:9.4f} ms  {entry[key]:9.4g} {unit_name}")
        if entry["peak_gib"] is not None:
            parts.append(f"{entry['peak_gib']:7.2f} GiB")
        if entry["parity_rel_diff"] is not None:
            parts.append(f"rel.diff {entry['parity_rel_diff']:.1e}")
        return "  ".join(parts)

    def payload(self, results: list[dict], derived: list[dict]) -> dict:
        """Everything the JSON file holds, but configs_not_run."""
        return {
            "benchmark": self.name,
            "description": self.description,
            "metadata": collect_metadata(),
            "settings": {**self.settings.record(), **self.settings_fields(), "impls": self.impls},
            **self.payload_fields(),
            "results": results,
            "derived": derived,
        }

    def render_markdown(self, payload: dict) -> str:
        """The report: heading, metadata and summary lines, the script's sections, the implementations."""
        parts = [f"# {self.title}", "", *metadata_lines(payload["metadata"]), *self.summary_lines(payload), ""]
        for heading, lines in [*self.sections(payload), ("Implementations", self.notes(payload))]:
            parts += [f"## {heading}", "", *lines, ""]
        return "\n".join(parts)
