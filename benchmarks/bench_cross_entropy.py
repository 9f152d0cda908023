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
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import _common
import torch
import torch.nn.functional as F

_common.use_interpreter_without_cuda("--smoke")  # before anything imports triton

from fastsft.data import IGNORE_INDEX  # noqa: E402  (the one definition; -100, HF's convention)

FULL_N, FULL_V, FULL_H = (4096, 16384, 32768), (32000, 128256, 152064), 4096
QUICK_N, QUICK_V = (16384,), (128256,)
PROMPT_FRACS = (0.0, 0.5, 0.9)
# Smoke shapes: N not a multiple of any block, fp32 because the interpreter's bf16 tl.dot is wrong.
SMOKE_N, SMOKE_V, SMOKE_H = (37, 64), (97,), 32
# bare_matmuls holds G and the logits, 2 * N * V elements: skipped above this share of free memory.
BARE_MEMORY_SHARE = 0.4

# ARCHITECTURE.md, "Performance targets": fastsft / baseline ratios and the prompt fraction each applies at
# (None: every config).
TARGETS = {
    "time_vs_liger": {"limit": 0.55, "prompt_frac": 0.5},
    "peak_vs_liger": {"limit": 1.0, "prompt_frac": None},
    "time_vs_bare": {"limit": 1.25, "prompt_frac": 0.0},
}

ALL_ROWS, SUPERVISED_ROWS = "6*N*V*H", "6*N_supervised*V*H"
Unavailable = _common.Unavailable


@dataclass(frozen=True)
class Config:
    n: int
    h: int
    v: int
    prompt_frac: float

    def label(self) -> str:
        return f"N={self.n} H={self.h} V={self.v} p={self.prompt_frac:g}"

    def n_prompt(self) -> int:
        """Rows labelled IGNORE_INDEX: round(p * N)."""
        return round(self.prompt_frac * self.n)


@dataclass
class Inputs:
    hidden: torch.Tensor  # [N, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    labels: torch.Tensor  # [N] int64, IGNORE_INDEX on prompt rows


def make_inputs(cfg: Config, settings: _common.Settings) -> Inputs:
    """hidden ~ N(0, 1), weight ~ N(0, 1/H) (so logits ~ N(0, 1)), labels uniform in [0, V) with
    round(p * N) rows, drawn without replacement, set to IGNORE_INDEX. Same seed for every config."""
    device, dtype = settings.device, settings.dtype
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    hidden = torch.randn(cfg.n, cfg.h, generator=gen, device=device).to(dtype).requires_grad_()
    weight = torch.randn(cfg.v, cfg.h, generator=gen, device=device).mul_(cfg.h**-0.5)
    weight = weight.to(dtype).requires_grad_()
    cpu_gen = torch.Generator().manual_seed(settings.seed)
    labels = torch.randint(0, cfg.v, (cfg.n,), generator=cpu_gen)
    labels[torch.randperm(cfg.n, generator=cpu_gen)[: cfg.n_prompt()]] = IGNORE_INDEX
    return Inputs(hidden, weight, labels.to(device))


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


def _make_torch_compile(inputs: Inputs):
    # One compile per shape: the prompt fractions of a shape share it.
    key = (tuple(inputs.hidden.shape), tuple(inputs.weight.shape), inputs.hidden.dtype, inputs.hidden.device)
    return _common.compiled(hf_loss, key), "torch.compile(hf_loss, dynamic=False), default backend"


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
BARE_NOTE = "hidden @ W^T, G @ W, G^T @ hidden; G random [N, V]"


def _loss_step(loss_fn: Callable, inputs: Inputs) -> _common.Step:
    """One forward + backward from fresh gradients, returning the detached loss (no host sync); its reset
    drops the gradients."""
    h, w, y = inputs.hidden, inputs.weight, inputs.labels

    def clear_grads() -> None:
        h.grad = None
        w.grad = None

    def step() -> torch.Tensor:
        clear_grads()
        loss = loss_fn(h, w, y)
        loss.backward()
        return loss.detach()

    return _common.Step(step, reset=clear_grads)


def _bare_matmuls_step(inputs: Inputs, settings: _common.Settings) -> _common.Step:
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

    return _common.Step(step)


# --------------------------------------------------------------------------------------------------
# The benchmark: entries, ratios and targets, report
# --------------------------------------------------------------------------------------------------


class CrossEntropy(_common.KernelBenchmark):
    name = "cross_entropy"
    title = "Fused linear cross-entropy, forward + backward"
    description = "fused linear cross-entropy forward + backward (see bench_cross_entropy.py docstring)"
    all_impls = IMPLS
    rate = ("tflops", "flops", 1e12, "TFLOP/s")
    label_width = 36

    def prepare(self, cfg: Config) -> Inputs:
        return make_inputs(cfg, self.settings)

    def entry_fields(self, name: str, cfg: Config, direction: None) -> dict:
        """FLOPs of the three lm_head matmuls over the rows the implementation computes (FLOPS_BASIS)."""
        basis = FLOPS_BASIS[name]
        n_supervised = cfg.n - cfg.n_prompt()
        rows = n_supervised if basis == SUPERVISED_ROWS else cfg.n
        return {
            "config": {**asdict(cfg), "n_supervised": n_supervised},
            "flops": 6 * rows * cfg.v * cfg.h,
            "flops_basis": basis,
            "loss": None,
        }

    def build(self, name: str, cfg: Config, inputs: Inputs) -> _common.Cell:
        if name == "bare_matmuls":
            return _common.Cell(BARE_NOTE, [_bare_matmuls_step(inputs, self.settings)])
        loss_fn, note = LOSS_IMPLS[name][0](inputs)
        return _common.Cell(note, [_loss_step(loss_fn, inputs)])

    def record_outputs(self, entry: dict, outputs: tuple | None) -> None:
        if outputs is not None:  # the loss (the bare matmuls have none)
            entry["loss"] = float(outputs[0])

    def derive(self, cfg: Config, entries: list[dict]) -> list[dict]:
        """fastsft's ratios to Liger and to the bare matmuls, each checked against its DESIGN target where
        the target applies (its prompt fraction)."""
        by_impl = {e["impl"]: e for e in entries}
        fast, liger, bare = by_impl.get("fastsft"), by_impl.get("liger"), by_impl.get("bare_matmuls")
        ratios = {
            "time_vs_liger": _common.ratio(fast, liger, "time_ms"),
            "peak_vs_liger": _common.ratio(fast, liger, "peak_gib"),
            "time_vs_bare": _common.ratio(fast, bare, "time_ms") if cfg.prompt_frac == 0.0 else None,
        }
        targets = {}
        for key, target in TARGETS.items():
            applies = target["prompt_frac"] is None or target["prompt_frac"] == cfg.prompt_frac
            met = None if ratios[key] is None or not applies else _common.meets(ratios[key], "<=", target["limit"])
            targets[key] = {"limit": target["limit"], "applies": applies, "met": met}
        derived = {
            "config": asdict(cfg),
            "fastsft_over_liger_time": ratios["time_vs_liger"],
            "fastsft_over_liger_peak": ratios["peak_vs_liger"],
            "fastsft_over_bare_time": ratios["time_vs_bare"],
            "targets": targets,
        }
        return [derived]

    def settings_fields(self) -> dict:
        configs = self.configs
        sweep = {
            "n": list(dict.fromkeys(c.n for c in configs)),
            "v": list(dict.fromkeys(c.v for c in configs)),
            "h": configs[0].h,
            "prompt_frac": list(dict.fromkeys(c.prompt_frac for c in configs)),
        }
        return {"ignore_index": IGNORE_INDEX, "reduction": "mean", "sweep": sweep}

    def payload_fields(self) -> dict:
        return {"flops_basis": {name: FLOPS_BASIS[name] for name in self.impls}, "targets": TARGETS}

    def summary_lines(self, payload: dict) -> list[str]:
        s = payload["settings"]
        return [
            f"- inputs: {s['dtype']}, H = {s['sweep']['h']}, labels -100 on a random prompt fraction of rows "
            f"(seed {s['seed']}), reduction mean; timing: {_common.timing_line(s)}",
            "- memory: peak allocated during one call above the inputs' allocation (gradients included), GiB",
            "- targets (ARCHITECTURE.md): fastsft ≤ 0.55x Liger's time at prompt 0.5 (headline config N=16384, "
            "V=128256); ≤ Liger's peak memory; ≤ 1.25x the bare matmuls' time with every row supervised. "
            "✓ / ✗ mark configs where a target applies.",
        ]

    def sections(self, payload: dict) -> list[tuple[str, list[str]]]:
        return [
            ("Time and peak memory", [self.main_table(payload)]),
            ("TFLOP/s (FLOP basis in brackets) and loss relative difference to fastsft", [_flops_table(payload)]),
        ]

    def main_table(self, payload: dict) -> str:
        impls = payload["settings"]["impls"]
        limits = {k: t["limit"] for k, t in TARGETS.items()}
        headers = ["N", "V", "prompt", "N_sup", *impls]
        headers += [
            f"fastsft/liger time (≤ {limits['time_vs_liger']} at p=0.5)",
            f"fastsft/liger peak (≤ {limits['peak_vs_liger']})",
            f"fastsft/bare time (≤ {limits['time_vs_bare']} at p=0)",
        ]
        rows = []
        for cfg, by_impl, d in _config_rows(payload):
            row = [cfg["n"], cfg["v"], f"{cfg['prompt_frac']:g}", cfg["n_supervised"]]
            row += [_time_mem_cell(by_impl[name]) for name in impls]
            row += [
                _ratio_cell(d["fastsft_over_liger_time"], d["targets"]["time_vs_liger"]),
                _ratio_cell(d["fastsft_over_liger_peak"], d["targets"]["peak_vs_liger"]),
                _ratio_cell(d["fastsft_over_bare_time"], d["targets"]["time_vs_bare"]),
            ]
            rows.append(row)
        return _common.markdown_table(headers, rows)

    def notes(self, payload: dict) -> list[str]:
        lines = super().notes(payload)
        if any(e["impl"] == "cce" and e["status"] == "ok" for e in payload["results"]):
            lines.append(
                "- cce's gradient filtering skips vocabulary blocks whose softmax is below bf16 resolution: on "
                "random inputs (near-uniform softmax) that is almost all of them, so its backward time is "
                "optimistic."
            )
        return lines

    def panels(self, payload: dict) -> list[list[_common.BarPanel]]:
        """One row per prompt fraction: time and peak memory (log scales); groups (N, V), bars implementations."""
        impls, grid = payload["settings"]["impls"], []
        for frac in payload["settings"]["sweep"]["prompt_frac"]:
            rows = [(cfg, by) for cfg, by, _ in _config_rows(payload) if cfg["prompt_frac"] == frac]
            groups = [f"N={cfg['n']}\nV={cfg['v']}" for cfg, _ in rows]
            cells = (((name, i), by[name]) for i, (_, by) in enumerate(rows) for name in impls)
            marks = _common.failure_marks(cells, also=("skipped: memory",))
            time = {name: [by[name]["time_ms"] for _, by in rows] for name in impls}
            peak = {name: [by[name]["peak_gib"] for _, by in rows] for name in impls}
            where = f"prompt fraction {frac:g}"
            panels = [
                _common.BarPanel(f"fwd+bwd time, {where}", "ms", groups, time, True, marks),
                _common.BarPanel(f"peak memory above the inputs, {where}", "GiB", groups, peak, True, marks),
            ]
            grid.append(panels)
        return grid

    def plot_subject(self, payload: dict) -> str:
        return f"fused linear cross-entropy fwd+bwd, H={payload['settings']['sweep']['h']}"


def _config_rows(payload: dict):
    """Yield (config dict, {impl: entry}, derived) per config, in sweep order."""
    impls = payload["settings"]["impls"]
    for i, derived in enumerate(payload["derived"]):
        entries = payload["results"][i * len(impls) : (i + 1) * len(impls)]
        yield entries[0]["config"], {e["impl"]: e for e in entries}, derived


def _time_mem_cell(entry: dict) -> str:
    if entry["status"] != "ok":
        return _common.short_status(entry["status"])
    text = f"{entry['time_ms']:.2f} ms"
    return text + (f" / {entry['peak_gib']:.2f} GiB" if entry["peak_gib"] is not None else "")


def _ratio_cell(value: float | None, target: dict) -> str:
    return "" if value is None else f"{value:.2f}{_common.check_mark(target['met'])}"


def _flops_parity_cell(entry: dict) -> str:
    if entry["status"] != "ok":
        return _common.short_status(entry["status"])
    text = f"{entry['tflops']:.3g}"
    if entry["impl"] == "fastsft":
        return text + " (ref)"
    return text + (f" ({entry['parity_rel_diff']:.1e})" if entry["parity_rel_diff"] is not None else "")


def _flops_table(payload: dict) -> str:
    impls = payload["settings"]["impls"]
    headers = ["N", "V", "prompt", *(f"{name} [{FLOPS_BASIS[name]}]" for name in impls)]
    rows = [
        [cfg["n"], cfg["v"], f"{cfg['prompt_frac']:g}", *(_flops_parity_cell(by_impl[n]) for n in impls)]
        for cfg, by_impl, _ in _config_rows(payload)
    ]
    return _common.markdown_table(headers, rows)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _common.argument_parser(
        "cross_entropy", "Fused linear cross-entropy fwd+bwd: fastsft vs torch, Liger, CCE and the bare matmuls."
    )
    parser.add_argument("--n", type=int, nargs="+", help=f"rows N (default {' '.join(map(str, FULL_N))})")
    parser.add_argument("--v", type=int, nargs="+", help=f"vocabulary sizes V (default {' '.join(map(str, FULL_V))})")
    parser.add_argument("--h", type=int, help=f"hidden size H (default {FULL_H})")
    parser.add_argument(
        "--prompt-frac", type=float, nargs="+", help="fractions of rows labelled -100 (default 0 0.5 0.9)"
    )
    _common.add_run_options(parser, IMPLS, "one shape: N=16384, V=128256, all prompt fractions")
    args = parser.parse_args(argv)
    _common.check_values(parser, "--prompt-frac", args.prompt_frac, lambda p: 0.0 <= p <= 1.0, "in [0, 1]")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return CrossEntropy(args, make_configs(args)).run()


if __name__ == "__main__":
    sys.exit(main())
