"""Fused linear cross-entropy (the LM-head loss), forward + backward: fastsft against its baselines.

What one cell measures (a config = N rows, hidden size H, vocabulary V, prompt fraction p; and one
implementation):
  loss      mean cross-entropy of hidden [N, H] @ weight[V, H]^T against labels [N], where a random
            fraction p of the rows (fixed seed) is labelled -100 (prompt rows: no loss, no gradient);
            the backward produces d hidden and d weight (bf16 inputs on the GPU).
  time      one forward + backward, median of triton.testing.do_bench (CUDA events, L2 flushed
            between calls), after one warm call that also compiles / autotunes.
  memory    peak torch.cuda.max_memory_allocated during one call minus what was allocated just before
            it (the inputs), in GiB. The gradients the call produces count; the inputs do not.
  parity    |loss - loss_fastsft| / |loss_fastsft| on the same inputs (fastsft's loss is fp32);
            informational, never asserted here.

Implementations: fastsft (fastsft.ops.fused_linear_cross_entropy), torch_eager (HF's convention:
F.linear, logits.float(), F.cross_entropy), torch_compile (the same function under torch.compile),
torch_linear_ce (torch.nn.functional.linear_cross_entropy, when this torch has it), liger and cce (when
installed), and bare_matmuls: the three lm_head matmuls of a plain linear forward + backward with no loss.

FLOPs: each of the three lm_head matmuls (logits, d hidden, d weight) costs 2*R*V*H over R rows, 6*R*V*H
in all, where R = N_supervised for implementations that skip ignored rows (fastsft, cce) and R = N for
those that compute every row. Recomputation (cce recomputes logits in its backward) is not counted:
TFLOP/s is useful work per second. Bytes are not reported: the least traffic (read hidden and weight,
write their gradients: (N + V) * H * 4 bytes in bf16) against 6*R*V*H flops is an intensity of
1.5*R*V/(N + V) flops per byte, hundreds to thousands at these shapes, above an H100's ~300 flops/byte
ridge: the op is bound by its matmuls, and TFLOP/s is the figure of merit.

    python benchmarks/bench_cross_entropy.py --quick        # N=16384, V=128256, p in {0, 0.5, 0.9}
    python benchmarks/bench_cross_entropy.py --smoke --out /tmp/x   # tiny CPU run, Triton interpreter
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import _common
import torch
import torch.nn.functional as F

# A CPU smoke run executes fastsft's real Triton kernels in Triton's interpreter, which is chosen when
# triton is first imported: so the environment is set here, before anything imports triton (fastsft's
# kernels and triton.testing are imported lazily, inside the functions that use them).
if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FASTSFT_BACKEND", "triton")

IGNORE_INDEX = -100
FULL_N, FULL_V, FULL_H = (4096, 16384, 32768), (32000, 128256, 152064), 4096
QUICK_N, QUICK_V = (16384,), (128256,)
PROMPT_FRACS = (0.0, 0.5, 0.9)
# Smoke shapes: N not a multiple of any block, fp32 because the interpreter's bf16 tl.dot is wrong.
SMOKE_N, SMOKE_V, SMOKE_H = (37, 64), (97,), 32
# bare_matmuls holds G and the logits, 2 * N * V elements: skipped above this share of free memory.
BARE_MEMORY_SHARE = 0.4

# DESIGN.md, "Performance targets": fastsft / baseline ratios and the prompt fraction each applies at
# (None: every config).
TARGETS = {
    "time_vs_liger": {"limit": 0.55, "prompt_frac": 0.5},
    "peak_vs_liger": {"limit": 1.0, "prompt_frac": None},
    "time_vs_bare": {"limit": 1.25, "prompt_frac": 0.0},
}

ALL_ROWS, SUPERVISED_ROWS = "6*N*V*H", "6*N_supervised*V*H"


class Unavailable(Exception):
    """The implementation cannot run here (not installed, too large); recorded as "skipped: <why>"."""


@dataclass(frozen=True)
class Config:
    n: int
    h: int
    v: int
    prompt_frac: float

    def label(self) -> str:
        return f"N={self.n} H={self.h} V={self.v} p={self.prompt_frac:g}"


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    smoke: bool
    seed: int
    warmup_ms: float
    rep_ms: float
    min_reps: int
    cpu_reps: int = 3


@dataclass
class Inputs:
    hidden: torch.Tensor  # [N, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    labels: torch.Tensor  # [N] int64, IGNORE_INDEX on prompt rows
    n_supervised: int


def make_inputs(cfg: Config, settings: Settings) -> Inputs:
    """hidden ~ N(0, 1), weight ~ N(0, 1/H) (so logits ~ N(0, 1)), labels uniform in [0, V) with
    round(p * N) rows, drawn without replacement, set to IGNORE_INDEX. Same seed for every config."""
    device, dtype = settings.device, settings.dtype
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    hidden = torch.randn(cfg.n, cfg.h, generator=gen, device=device).to(dtype).requires_grad_()
    weight = torch.randn(cfg.v, cfg.h, generator=gen, device=device).mul_(cfg.h**-0.5)
    weight = weight.to(dtype).requires_grad_()
    cpu_gen = torch.Generator().manual_seed(settings.seed)
    labels = torch.randint(0, cfg.v, (cfg.n,), generator=cpu_gen)
    n_prompt = round(cfg.prompt_frac * cfg.n)
    labels[torch.randperm(cfg.n, generator=cpu_gen)[:n_prompt]] = IGNORE_INDEX
    return Inputs(hidden, weight, labels.to(device), cfg.n - n_prompt)


# --------------------------------------------------------------------------------------------------
# Implementations: each factory returns (loss_fn(hidden, weight, labels) -> scalar loss, note).
# --------------------------------------------------------------------------------------------------


def hf_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal-LM loss: logits in the matmul's dtype, upcast to fp32, then cross_entropy."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="mean")


def _make_fastsft(inputs: Inputs):
    from fastsft.ops import fused_linear_cross_entropy
    from fastsft.ops._backend import select_backend

    backend = select_backend("fused_linear_cross_entropy", inputs.hidden)
    return (
        lambda h, w, y: fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="mean"),
        f"fastsft backend: {backend}",
    )


def _make_torch_eager(inputs: Inputs):
    return hf_loss, "F.linear -> .float() -> F.cross_entropy (HF convention)"


_compiled: dict = {"key": None, "fn": None}


def _make_torch_compile(inputs: Inputs):
    # One fresh compile per shape: the sweep has more shapes than dynamo's recompile limit, past which
    # it would silently fall back to eager; prompt fractions of one shape share the compiled function.
    key = (tuple(inputs.hidden.shape), tuple(inputs.weight.shape), inputs.hidden.dtype, inputs.hidden.device)
    if _compiled["key"] != key:
        torch._dynamo.reset()
        _compiled.update(key=key, fn=torch.compile(hf_loss, dynamic=False))
    return _compiled["fn"], "torch.compile(hf_loss, dynamic=False), default backend"


def _make_torch_linear_ce(inputs: Inputs):
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None:
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
    params = inspect.signature(fn).parameters
    kwargs = {"reduction": "mean"}
    if "ignore_index" in params:
        kwargs["ignore_index"] = IGNORE_INDEX
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    variant = "reference path (materialises logits)"
    if "options" in params and options_cls is not None:
        kwargs["options"] = options_cls()  # the chunked path: the point of the op is not to hold logits
        variant = "chunked path, LinearCrossEntropyOptions() defaults"
    return (lambda h, w, y: fn(h, w, y, **kwargs)), f"F.linear_cross_entropy, {variant}"


def _loss_tensor(out) -> torch.Tensor:
    """Liger returns a tensor, a (loss, ...) tuple or an output object with .loss, by version."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.loss


def _make_liger(inputs: Inputs):
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        raise Unavailable("liger_kernel not installed") from exc
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    version = _common.package_version(*_common.PACKAGES["liger_kernel"])
    return (lambda h, w, y: _loss_tensor(module(w, h, y))), f"LigerFusedLinearCrossEntropyLoss {version}"


def _make_cce(inputs: Inputs):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Unavailable("cut_cross_entropy not installed") from exc
    version = _common.package_version(*_common.PACKAGES["cut_cross_entropy"])
    return (
        lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="mean"),
        f"cut_cross_entropy {version}, default impl and filter_eps (gradient filtering on)",
    )


# name -> (factory, FLOP basis); fastsft first: the others' parity is measured against its loss.
LOSS_IMPLS: dict[str, tuple[Callable, str]] = {
    "fastsft": (_make_fastsft, SUPERVISED_ROWS),
    "torch_eager": (_make_torch_eager, ALL_ROWS),
    "torch_compile": (_make_torch_compile, ALL_ROWS),
    "torch_linear_ce": (_make_torch_linear_ce, ALL_ROWS),
    "liger": (_make_liger, ALL_ROWS),
    "cce": (_make_cce, SUPERVISED_ROWS),
}
IMPLS = (*LOSS_IMPLS, "bare_matmuls")
FLOPS_BASIS = {**{name: basis for name, (_, basis) in LOSS_IMPLS.items()}, "bare_matmuls": ALL_ROWS}


def _loss_step(loss_fn: Callable, inputs: Inputs):
    """step() = one forward + backward from fresh gradients; returns the detached loss (no host sync)."""
    h, w, y = inputs.hidden, inputs.weight, inputs.labels

    def clear_grads() -> None:
        h.grad = None
        w.grad = None

    def step() -> torch.Tensor:
        clear_grads()
        loss = loss_fn(h, w, y)
        loss.backward()
        return loss.detach()

    return step, clear_grads


def _bare_matmuls_step(inputs: Inputs, settings: Settings):
    """The three matmuls of a plain lm_head forward + backward, no loss: logits = hidden @ W^T,
    d hidden = G @ W, d weight = G^T @ hidden, with G a fixed random [N, V] stand-in for d logits
    (random, not zeros: a matmul on zeros can run faster than on real data)."""
    h, w = inputs.hidden.detach(), inputs.weight.detach()
    n, v = h.shape[0], w.shape[0]
    if settings.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(settings.device)
        if 2 * n * v * h.element_size() > BARE_MEMORY_SHARE * free:
            raise Unavailable("memory")
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed + 1)
    g = torch.randn(n, v, generator=gen, device=settings.device).to(h.dtype)

    def step() -> None:
        logits = h @ w.T
        grad_hidden = g @ w
        grad_weight = g.T @ h
        del logits, grad_hidden, grad_weight

    return step, None


def build_step(name: str, inputs: Inputs, settings: Settings):
    """(step, clear_grads or None, note) for implementation `name`; raises Unavailable."""
    if name == "bare_matmuls":
        step, clear = _bare_matmuls_step(inputs, settings)
        return step, clear, "hidden @ W^T, G @ W, G^T @ hidden; G random [N, V]"
    factory, _ = LOSS_IMPLS[name]
    loss_fn, note = factory(inputs)
    step, clear = _loss_step(loss_fn, inputs)
    return step, clear, note


# --------------------------------------------------------------------------------------------------
# Measuring one cell, one config, the sweep
# --------------------------------------------------------------------------------------------------


def _new_entry(name: str, cfg: Config, n_supervised: int) -> dict:
    basis = FLOPS_BASIS[name]
    rows = n_supervised if basis == SUPERVISED_ROWS else cfg.n
    return {
        "config": {**asdict(cfg), "n_supervised": n_supervised},
        "impl": name,
        "status": "not run",
        "time_ms": None,
        "peak_gib": None,
        "tflops": None,
        "flops": 6 * rows * cfg.v * cfg.h,
        "flops_basis": basis,
        "loss": None,
        "parity_rel_diff": None,
        "note": None,
        "warnings": [],
    }


def _warm_call(step: Callable, entry: dict, ref_loss: float | None, device: torch.device) -> None:
    """First call: compiles / autotunes, and gives the loss for the parity check (warnings kept)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = step()
        _common.synchronize(device)
    entry["warnings"] = list(dict.fromkeys(str(w.message).splitlines()[0][:200] for w in caught))[:3]
    if loss is not None:
        entry["loss"] = float(loss)
        if ref_loss is not None:
            entry["parity_rel_diff"] = abs(entry["loss"] - ref_loss) / max(abs(ref_loss), 1e-30)


def run_cell(name: str, cfg: Config, inputs: Inputs, settings: Settings, ref_loss: float | None) -> dict:
    """Measure one implementation on one config; any failure becomes the entry's status, never raises."""
    entry = _new_entry(name, cfg, inputs.n_supervised)
    step = clear = None
    try:
        step, clear, entry["note"] = build_step(name, inputs, settings)
        _warm_call(step, entry, ref_loss, settings.device)
        entry["time_ms"] = _common.median_time_ms(
            step, settings.device, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms,
            min_reps=settings.min_reps, cpu_reps=settings.cpu_reps,
        )  # fmt: skip
        entry["peak_gib"] = _common.peak_memory_gib(step, settings.device, before=clear)
        entry["tflops"] = entry["flops"] / (entry["time_ms"] * 1e-3) / 1e12
        entry["status"] = "ok"
    except Unavailable as exc:
        entry["status"] = f"skipped: {exc}"
    except Exception as exc:  # an OOM or a broken baseline must not end the sweep
        entry["status"] = _common.classify_failure(exc)
    finally:
        if clear is not None:
            clear()
        del step, clear
        _common.release_memory(settings.device)
    return entry


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def derive(cfg: Config, entries: list[dict]) -> dict:
    """fastsft's ratios to Liger and to the bare matmuls, each checked against its DESIGN target where
    the target applies (its prompt fraction)."""
    by_impl = {e["impl"]: e for e in entries}
    fast, liger, bare = by_impl.get("fastsft"), by_impl.get("liger"), by_impl.get("bare_matmuls")
    ratios = {
        "time_vs_liger": _ratio(fast, liger, "time_ms"),
        "peak_vs_liger": _ratio(fast, liger, "peak_gib"),
        "time_vs_bare": _ratio(fast, bare, "time_ms") if cfg.prompt_frac == 0.0 else None,
    }
    targets = {}
    for key, target in TARGETS.items():
        applies = target["prompt_frac"] is None or target["prompt_frac"] == cfg.prompt_frac
        met = None if ratios[key] is None or not applies else ratios[key] <= target["limit"]
        targets[key] = {"limit": target["limit"], "applies": applies, "met": met}
    return {
        "config": asdict(cfg),
        "fastsft_over_liger_time": ratios["time_vs_liger"],
        "fastsft_over_liger_peak": ratios["peak_vs_liger"],
        "fastsft_over_bare_time": ratios["time_vs_bare"],
        "targets": targets,
    }


def _progress(entry: dict) -> str:
    cfg = Config(**{k: entry["config"][k] for k in ("n", "h", "v", "prompt_frac")})
    parts = [f"{cfg.label():<36}", f"{entry['impl']:<16}", entry["status"]]
    if entry["time_ms"] is not None:
        parts.append(f"{entry['time_ms']:9.3f} ms")
    if entry["peak_gib"] is not None:
        parts.append(f"{entry['peak_gib']:7.2f} GiB")
    if entry["parity_rel_diff"] is not None:
        parts.append(f"rel.diff {entry['parity_rel_diff']:.1e}")
    return "  ".join(parts)


def run_config(cfg: Config, impls: list[str], settings: Settings) -> list[dict]:
    """All implementations on one config's inputs, fastsft first (its loss is the parity reference)."""
    inputs = make_inputs(cfg, settings)
    entries, ref_loss = [], None
    for name in impls:
        entry = run_cell(name, cfg, inputs, settings, ref_loss)
        if name == "fastsft":
            ref_loss = entry["loss"]
        print(_progress(entry), flush=True)
        entries.append(entry)
    del inputs
    _common.release_memory(settings.device)
    return entries


def run_sweep(configs: list[Config], impls: list[str], settings: Settings):
    """(results, derived, the configs measured): every config in turn until SIGTERM (the caller's time limit)."""
    results, derived = [], []

    def run_one(cfg: Config) -> None:
        try:
            entries = run_config(cfg, impls, settings)
        except Exception as exc:  # the inputs themselves did not fit: every cell of the config fails alike
            status = _common.classify_failure(exc)
            _common.release_memory(settings.device)
            entries = [_failed_entry(name, cfg, status) for name in impls]
            print(f"{cfg.label()}: inputs failed: {status}", flush=True)
        results.extend(entries)
        derived.append(derive(cfg, entries))

    done = _common.sweep_until_out_of_time(configs, run_one)
    return results, derived, done


def _failed_entry(name: str, cfg: Config, status: str) -> dict:
    entry = _new_entry(name, cfg, cfg.n - round(cfg.prompt_frac * cfg.n))
    entry["status"] = status
    return entry


# --------------------------------------------------------------------------------------------------
# Report: markdown tables and plot
# --------------------------------------------------------------------------------------------------


def _short_status(entry: dict) -> str:
    return entry["status"].split(":")[0]


def _time_mem_cell(entry: dict) -> str:
    if entry["status"] != "ok":
        return _short_status(entry)
    text = f"{entry['time_ms']:.2f} ms"
    return text + (f" / {entry['peak_gib']:.2f} GiB" if entry["peak_gib"] is not None else "")


def _ratio_cell(value: float | None, target: dict) -> str:
    if value is None:
        return ""
    mark = "" if target["met"] is None else (" ✓" if target["met"] else " ✗")
    return f"{value:.2f}{mark}"


def _flops_parity_cell(entry: dict) -> str:
    if entry["status"] != "ok":
        return _short_status(entry)
    text = f"{entry['tflops']:.3g}"
    if entry["impl"] == "fastsft":
        return text + " (ref)"
    return text + (f" ({entry['parity_rel_diff']:.1e})" if entry["parity_rel_diff"] is not None else "")


def _config_rows(payload: dict):
    """Yield (config dict, {impl: entry}, derived) per config, in sweep order."""
    impls = payload["settings"]["impls"]
    for i, derived in enumerate(payload["derived"]):
        entries = payload["results"][i * len(impls) : (i + 1) * len(impls)]
        yield entries[0]["config"], {e["impl"]: e for e in entries}, derived


def _main_table(payload: dict) -> str:
    impls = payload["settings"]["impls"]
    limits = {k: t["limit"] for k, t in TARGETS.items()}
    headers = ["N", "V", "prompt", "N_sup", *impls,
               f"fastsft/liger time (≤ {limits['time_vs_liger']} at p=0.5)",
               f"fastsft/liger peak (≤ {limits['peak_vs_liger']})",
               f"fastsft/bare time (≤ {limits['time_vs_bare']} at p=0)"]  # fmt: skip
    rows = []
    for cfg, by_impl, d in _config_rows(payload):
        rows.append([
            cfg["n"], cfg["v"], f"{cfg['prompt_frac']:g}", cfg["n_supervised"],
            *(_time_mem_cell(by_impl[name]) for name in impls),
            _ratio_cell(d["fastsft_over_liger_time"], d["targets"]["time_vs_liger"]),
            _ratio_cell(d["fastsft_over_liger_peak"], d["targets"]["peak_vs_liger"]),
            _ratio_cell(d["fastsft_over_bare_time"], d["targets"]["time_vs_bare"]),
        ])  # fmt: skip
    return _common.markdown_table(headers, rows)


def _flops_table(payload: dict) -> str:
    impls = payload["settings"]["impls"]
    headers = ["N", "V", "prompt", *(f"{name} [{FLOPS_BASIS[name]}]" for name in impls)]
    rows = [
        [cfg["n"], cfg["v"], f"{cfg['prompt_frac']:g}", *(_flops_parity_cell(by_impl[n]) for n in impls)]
        for cfg, by_impl, _ in _config_rows(payload)
    ]
    return _common.markdown_table(headers, rows)


def _notes(payload: dict) -> list[str]:
    """One line per implementation: what ran, and every distinct non-ok status or warning it had."""
    lines = _common.implementation_notes(payload)
    if any(e["impl"] == "cce" and e["status"] == "ok" for e in payload["results"]):
        lines.append(
            "- cce's gradient filtering skips vocabulary blocks whose softmax is below bf16 resolution: on "
            "random inputs (near-uniform softmax) that is almost all of them, so its backward time is "
            "optimistic."
        )
    return lines


def render_markdown(payload: dict) -> str:
    meta, s = payload["metadata"], payload["settings"]
    if s["device"] == "cuda":
        timing = (f"triton.testing.do_bench median (warmup {s['warmup_ms']:g} ms, repetitions over at least "
                  f"{s['rep_ms']:g} ms and {s['min_reps']} calls)")  # fmt: skip
    else:
        timing = f"time.perf_counter median of {s['cpu_reps']} calls (smoke run without CUDA: no speed data)"
    parts = [
        "# Fused linear cross-entropy, forward + backward",
        "",
        *_common.metadata_lines(meta),
        f"- inputs: {s['dtype']}, H = {s['sweep']['h']}, labels -100 on a random prompt fraction of rows "
        f"(seed {s['seed']}), reduction mean; timing: {timing}",
        "- memory: peak allocated during one call above the inputs' allocation (gradients included), GiB",
        "- targets (DESIGN.md): fastsft ≤ 0.55x Liger's time at prompt 0.5 (headline config N=16384, "
        "V=128256); ≤ Liger's peak memory; ≤ 1.25x the bare matmuls' time with every row supervised. "
        "✓ / ✗ mark configs where a target applies.",
        "",
        "## Time and peak memory",
        "",
        _main_table(payload),
        "",
        "## TFLOP/s (FLOP basis in brackets) and loss relative difference to fastsft",
        "",
        _flops_table(payload),
        "",
        "## Implementations",
        "",
        *_notes(payload),
        "",
    ]
    return "\n".join(parts)


def _is_failure(status: str) -> bool:
    """Statuses the plot marks where the bar would be (not those of a baseline that is not installed)."""
    return status in ("oom", "skipped: memory") or status.startswith("error")


def _panels(payload: dict) -> list[list[_common.BarPanel]]:
    """One row per prompt fraction: time and peak memory (log scales); groups (N, V), bars implementations."""
    impls, grid = payload["settings"]["impls"], []
    for frac in payload["settings"]["sweep"]["prompt_frac"]:
        rows = [(cfg, by) for cfg, by, _ in _config_rows(payload) if cfg["prompt_frac"] == frac]
        groups = [f"N={cfg['n']}\nV={cfg['v']}" for cfg, _ in rows]
        marks = {(name, i): _short_status(by[name]) for i, (_, by) in enumerate(rows) for name in impls
                 if _is_failure(by[name]["status"])}  # fmt: skip
        time = {name: [by[name]["time_ms"] for _, by in rows] for name in impls}
        peak = {name: [by[name]["peak_gib"] for _, by in rows] for name in impls}
        where = f"prompt fraction {frac:g}"
        grid.append([
            _common.BarPanel(f"fwd+bwd time, {where}", "ms", groups, time, True, marks),
            _common.BarPanel(f"peak memory above the inputs, {where}", "GiB", groups, peak, True, marks),
        ])  # fmt: skip
    return grid


def write_outputs(payload: dict, out_dir: Path) -> list[Path]:
    meta, s = payload["metadata"], payload["settings"]
    title = (f"fused linear cross-entropy fwd+bwd: {meta['gpu']}, {s['dtype']}, H={s['sweep']['h']}, "
             f"git {meta['git_revision']}")  # fmt: skip
    return _common.write_result_files(payload, out_dir, render_markdown(payload), _panels(payload), title)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fused linear cross-entropy fwd+bwd: fastsft vs torch, Liger, CCE and the bare matmuls.",
        epilog="Writes cross_entropy_<gpu>_<date>.{json,md,png} into --out.",
    )
    parser.add_argument("--n", type=int, nargs="+", help=f"rows N (default {' '.join(map(str, FULL_N))})")
    parser.add_argument(
        "--v", type=int, nargs="+", help=f"vocabulary sizes V (default {' '.join(map(str, FULL_V))})"
    )
    parser.add_argument("--h", type=int, help=f"hidden size H (default {FULL_H})")
    parser.add_argument(
        "--prompt-frac", type=float, nargs="+", help="fractions of rows labelled -100 (default 0 0.5 0.9)"
    )
    parser.add_argument("--impl", nargs="+", choices=IMPLS, help="implementations to run (default all)")
    parser.add_argument(
        "--quick", action="store_true", help="one shape: N=16384, V=128256, all prompt fractions"
    )
    _common.add_run_options(parser)
    args = parser.parse_args(argv)
    for frac in args.prompt_frac or ():
        if not 0.0 <= frac <= 1.0:
            parser.error(f"--prompt-frac values must be in [0, 1], got {frac}")
    return args


def make_configs(args: argparse.Namespace) -> list[Config]:
    """The sweep: explicit flags win over --smoke / --quick shapes, which win over the full sweep."""
    if args.smoke:
        n, v, h = SMOKE_N, SMOKE_V, SMOKE_H
    elif args.quick:
        n, v, h = QUICK_N, QUICK_V, FULL_H
    else:
        n, v, h = FULL_N, FULL_V, FULL_H
    n, v, h = args.n or n, args.v or v, args.h or h
    fracs = args.prompt_frac or PROMPT_FRACS
    return [Config(ni, h, vi, frac) for ni in n for vi in v for frac in fracs]


def make_settings(args: argparse.Namespace) -> Settings:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Tiny smoke shapes: one thread. Several (OpenMP pools of torch and of torch.compile's kernels)
        # spin against each other on a small machine and turn 0.2 ms calls into 50 ms ones.
        torch.set_num_threads(1)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    return Settings(device, dtype, args.smoke, args.seed, args.warmup_ms, args.rep_ms, args.min_reps)


def build_payload(configs, impls, settings, results, derived) -> dict:
    return {
        "benchmark": "cross_entropy",
        "description": "fused linear cross-entropy forward + backward (see bench_cross_entropy.py docstring)",
        "metadata": _common.collect_metadata(),
        "settings": {
            "device": settings.device.type,
            "dtype": str(settings.dtype).removeprefix("torch."),
            "smoke": settings.smoke,
            "seed": settings.seed,
            "warmup_ms": settings.warmup_ms,
            "rep_ms": settings.rep_ms,
            "min_reps": settings.min_reps,
            "cpu_reps": settings.cpu_reps,
            "ignore_index": IGNORE_INDEX,
            "reduction": "mean",
            "impls": impls,
            "sweep": {
                "n": list(dict.fromkeys(c.n for c in configs)),
                "v": list(dict.fromkeys(c.v for c in configs)),
                "h": configs[0].h,
                "prompt_frac": list(dict.fromkeys(c.prompt_frac for c in configs)),
            },
        },
        "flops_basis": {name: FLOPS_BASIS[name] for name in impls},
        "targets": TARGETS,
        "results": results,
        "derived": derived,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print(
            "bench_cross_entropy.py needs a CUDA GPU (none is visible to torch). Run it on a GPU machine, or "
            "pass --smoke for a tiny CPU run through the Triton interpreter that checks the script only.",
            file=sys.stderr,
        )
        return 2
    settings = make_settings(args)
    configs = make_configs(args)
    impls = [name for name in IMPLS if args.impl is None or name in args.impl]
    print(f"{len(configs)} configs x {len(impls)} implementations on {_common.gpu_name()}, {settings.dtype}")
    results, derived, done = run_sweep(configs, impls, settings)
    payload = build_payload(configs, impls, settings, results, derived)  # the sweep asked for
    payload["configs_not_run"] = [c.label() for c in configs[len(done) :]]  # out of time
    if not done:  # stopped before the first config completed
        print("wrote " + ", ".join(str(p) for p in _common.write_json_only(payload, args.out)))
        return 0
    paths = write_outputs(payload, args.out)
    print("\n" + _main_table(payload) + "\n")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
