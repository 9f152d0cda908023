"""Packed-sequence (varlen) causal attention, forward and forward + backward: fastsft against its baselines.

A batch is T tokens of whole documents laid end to end (no padding): q [T, Hq, D], k, v [T, Hk, D] and
cu_seqlens [B+1] (document b = rows cu_seqlens[b]:cu_seqlens[b+1]); each token attends causally within its
own document only. The figure of merit is TFLOP/s: the op is bound by its matmuls.

What one cell measures (a config = length mix + T tokens + Hq / Hk heads + head dim D; one implementation;
one direction):
  fwd       one forward call with autograd recording (q, k, v require grad, as in training); output dropped.
  fwd+bwd   one forward, then torch.autograd.grad(out, (q, k, v), grad_out) with a fixed random grad_out:
            a fresh forward and its backward per call, producing dq, dk, dv.
  time      median of triton.testing.do_bench (CUDA events, L2 flushed between calls), after one warm call
            that also compiles / autotunes; on CPU (--smoke) the median of a few host-timed calls. Building
            a block mask, repeating k/v heads or reading document bounds to the host (per implementation,
            below) happens once, outside the timed calls.
  TFLOP/s   FLOPs below / time; the same count for every implementation (useful work: recomputation, masked
            blocks and padding are not counted, so an implementation doing more simply scores lower).
  memory    peak allocated during one call above what was allocated just before it (the inputs), GiB
            (CUDA only); gradients produced by the call count.
  parity    ||x - x_fastsft|| / ||x_fastsft|| (relative L2 norm) on the same inputs, x = out for fwd and the
            worst of dq, dk, dv for fwd+bwd. Informational, never asserted here.
  × vs torch_varlen   torch_varlen's time / this row's time (> 1: this row is faster).

FLOPs, with s_i the document lengths (sum_i s_i = T):
  fwd       4 * Hq * D * sum_i(s_i^2) / 2   two matmuls (Q K^T, P V) of 2 flops per multiply-add over every
                                            (query, key) pair of a document, halved for the causal mask
  fwd+bwd   3.5 * fwd                       the backward counted as 2.5x the forward (five matmuls: Q K^T
                                            recomputed, dV, dP, dQ, dK), FlashAttention's convention

Length mixes, T = 32768 tokens per batch by default (lengths drawn with numpy's default_rng(seed); the last
document is trimmed so that the lengths sum to exactly T):
  all_2k               T / 2048 documents of 2048 tokens
  lognormal_128_8192   log-normal lengths, median 1024 (mu = ln 1024, sigma = 1), clipped to [128, 8192]
  short_64_512         uniform integers in [64, 512]
Heads: Hq = 32, Hk = 8 (GQA 4:1) for both head dims D = 128 and D = 64; bf16; q, k, v, grad_out ~ N(0, 1);
softmax scale 1 / sqrt(D).

Implementations (each a small adapter: (q, k, v [T, H, D], cu_seqlens, max_seqlen) -> out [T, Hq, D]):
  fastsft        fastsft.ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True).
  torch_varlen   torch.nn.attention.varlen.varlen_attn (FlashAttention-2 kernels in torch), causal through
                 window_size=(-1, 0) or is_causal=True, whichever this torch's signature has; GQA through
                 enable_gqa=True where it exists, else k/v heads repeated (repeat_interleave) outside the timed
                 calls (then its dk, dv are summed over each group for the parity check; said in the notes).
  flex_attention torch.nn.attention.flex_attention.flex_attention under torch.compile(dynamic=False), with a
                 document causal block mask (create_block_mask over a document-id tensor: same document and
                 q_idx >= kv_idx) built outside the timed calls; enable_gqa=True; layout [1, H, T, D] (views).
  sdpa_per_doc   F.scaled_dot_product_attention run document by document in a Python loop (is_causal=True,
                 enable_gqa=True, layout [1, H, s, D] views), outputs concatenated; document bounds read to
                 the host once (a training loop has them there).
  flash_attn     flash_attn.flash_attn_varlen_func(..., causal=True), when importable (native GQA).
  flash_attn3    flash_attn_interface.flash_attn_varlen_func(..., causal=True) (FlashAttention-3, Hopper),
                 when importable.
A failure (not installed, unsupported, out of memory) is recorded in its cell, never ends the run. --smoke runs
fastsft and sdpa_per_doc only (torch_varlen and flash_attn need CUDA and bf16, flex_attention compiles for
minutes on CPU), unless the others are named with --impl.

Target (ARCHITECTURE.md, "Performance targets"): fastsft >= 1.0x torch varlen_attn's TFLOP/s, fwd+bwd, D=128, GQA
4:1, lognormal_128_8192 documents, 32768 tokens (H100, bf16). Moonshot: FA3-class, >= 450 TFLOP/s forward on
an H100 at the same config.

    python benchmarks/bench_attention.py --quick        # D=128 only: three length mixes, every implementation
    python benchmarks/bench_attention.py --smoke --out /tmp/x   # tiny CPU run, Triton interpreter
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import _common
import numpy as np
import torch
import torch.nn.functional as F

_common.use_interpreter_without_cuda("--smoke")  # before anything imports triton

DIRECTIONS = ("fwd", "fwd+bwd")
IMPLS = ("fastsft", "torch_varlen", "flex_attention", "sdpa_per_doc", "flash_attn", "flash_attn3")
SMOKE_IMPLS = ("fastsft", "sdpa_per_doc")
MIXES = ("all_2k", "lognormal_128_8192", "short_64_512")
FULL_TOKENS, FULL_HEAD_DIMS, QUICK_HEAD_DIMS = 32768, (128, 64), (128,)
HQ, HK = 32, 8  # GQA 4:1 for every head dim (Llama-3-8B's heads at D=128)
LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA, LOGNORMAL_CLIP = 1024, 1.0, (128, 8192)
SHORT_RANGE = (64, 512)
# Smoke: two documents of uneven lengths (no multiple of a block), 2 q heads sharing 1 k/v head, fp32
# (the interpreter's bf16 tl.dot is wrong).
SMOKE_MIX, SMOKE_TOKENS, SMOKE_HQ, SMOKE_HK, SMOKE_HEAD_DIMS = "two_docs", 48, 2, 1, (16,)

FLOPS_FORMULAS = {"fwd": "4*Hq*D*sum(s_i^2)/2", "fwd+bwd": "3.5 * 4*Hq*D*sum(s_i^2)/2"}
BWD_OVER_FWD = 2.5  # FlashAttention's convention: the backward is 2.5 forwards (five matmuls against two)

# ARCHITECTURE.md, "Performance targets", at the headline config below (ratios and rates measured on a GPU).
HEADLINE = {"mix": "lognormal_128_8192", "tokens": 32768, "d": 128, "group": 4}
TARGETS = {
    "speedup_vs_torch_varlen": {
        "limit": 1.0,
        "rule": ">=",
        "direction": "fwd+bwd",
        "device": None,
        "what": "fastsft TFLOP/s / torch varlen_attn TFLOP/s",
    },
    "moonshot_fwd_tflops": {
        "limit": 450.0,
        "rule": ">=",
        "direction": "fwd",
        "device": "H100",
        "what": "fastsft forward TFLOP/s (moonshot, FA3-class)",
    },
}
Unavailable = _common.Unavailable


# --------------------------------------------------------------------------------------------------
# Documents and configs
# --------------------------------------------------------------------------------------------------


def _fill(draw: Callable[[], int], tokens: int) -> list[int]:
    """Documents of length draw() until they reach `tokens`, the last one trimmed to land exactly on it."""
    lengths, total = [], 0
    while total < tokens:
        length = min(int(draw()), tokens - total)
        lengths.append(length)
        total += length
    return lengths


def document_lengths(mix: str, tokens: int, seed: int) -> list[int]:
    """The document lengths of `mix` for a batch of `tokens` tokens (they sum to exactly `tokens`; every one
    but the trimmed last lies in the mix's range). Deterministic in (mix, tokens, seed)."""
    rng = np.random.default_rng(seed)
    if mix == "all_2k":
        return _fill(lambda: 2048, tokens)
    if mix == "lognormal_128_8192":
        lo, hi = LOGNORMAL_CLIP
        return _fill(lambda: np.clip(round(rng.lognormal(math.log(LOGNORMAL_MEDIAN), LOGNORMAL_SIGMA)), lo, hi), tokens)
    if mix == "short_64_512":
        return _fill(lambda: rng.integers(SHORT_RANGE[0], SHORT_RANGE[1] + 1), tokens)
    if mix == SMOKE_MIX:  # two uneven documents
        first = min(tokens, tokens // 3 + 1)
        return [first, tokens - first] if tokens > first else [first]
    raise ValueError(f"unknown length mix {mix!r}")


@dataclass(frozen=True)
class Config:
    mix: str
    tokens: int  # T
    hq: int
    hk: int
    d: int

    def heads(self) -> str:
        return f"{self.hq}/{self.hk}"

    def label(self) -> str:
        return f"{self.mix} T={self.tokens} Hq/Hk={self.heads()} D={self.d}"


def doc_stats(lengths: list[int]) -> dict:
    return {
        "n_docs": len(lengths),
        "max_seqlen": max(lengths),
        "mean_seqlen": sum(lengths) / len(lengths),
        "sum_sq": sum(s * s for s in lengths),
    }


def attention_flops(cfg: Config, sum_sq: int, direction: str) -> float:
    """FLOPS_FORMULAS: causal forward 4*Hq*D*sum(s_i^2)/2, forward + backward 3.5x that."""
    fwd = 4 * cfg.hq * cfg.d * sum_sq / 2
    return fwd if direction == "fwd" else fwd * (1.0 + BWD_OVER_FWD)


@dataclass
class Inputs:
    q: torch.Tensor  # [T, Hq, D], requires grad
    k: torch.Tensor  # [T, Hk, D], requires grad
    v: torch.Tensor  # [T, Hk, D], requires grad
    grad_out: torch.Tensor  # [T, Hq, D]
    cu_seqlens: torch.Tensor  # [B+1] int32, on the device
    max_seqlen: int
    lengths: list[int]


def make_inputs(cfg: Config, lengths: list[int], settings: _common.Settings) -> Inputs:
    """q, k, v, grad_out ~ N(0, 1) in the run's dtype (never zeros: they can hide unwritten outputs and run
    faster), the same for every implementation of a config (same seed)."""
    device, dtype = settings.device, settings.dtype
    gen = torch.Generator(device=device).manual_seed(settings.seed)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_(grad)

    t = cfg.tokens
    q, k, v = randn(t, cfg.hq, cfg.d, grad=True), randn(t, cfg.hk, cfg.d, grad=True), randn(t, cfg.hk, cfg.d, grad=True)
    cu_seqlens = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    return Inputs(q, k, v, randn(t, cfg.hq, cfg.d), cu_seqlens, max(lengths), lengths)


# --------------------------------------------------------------------------------------------------
# Implementations: each factory returns a Runner whose `attend(q, k, v, cu_seqlens, max_seqlen)` takes
# q [T, Hq, D], k / v [T, Hk', D] and returns out [T, Hq, D].
# --------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    note: str
    kv_repeat: int = 1  # > 1: k / v heads repeated this many times before the timed calls (no native GQA)
    extra: dict = field(default_factory=dict)  # what the adapter keeps alive (block mask, ...)


def _make_fastsft(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
    from fastsft.ops import varlen_attention
    from fastsft.ops._backend import select_backend

    backend = select_backend("varlen_attention", inputs.q)
    return Runner(
        lambda q, k, v, cu, max_len: varlen_attention(q, k, v, cu, max_len, causal=True),
        f"fastsft backend: {backend}",
    )


def _make_torch_varlen(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn") from exc
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        kwargs, causal = {"window_size": (-1, 0)}, "window_size=(-1, 0)"
    elif "is_causal" in params:
        kwargs, causal = {"is_causal": True}, "is_causal=True"
    else:
        raise Unavailable(f"varlen_attn{inspect.signature(varlen_attn)} has no causal flag this script knows")
    kv_repeat, gqa = 1, "Hq == Hk (no GQA)"
    if cfg.hq != cfg.hk:
        if "enable_gqa" in params:
            kwargs["enable_gqa"], gqa = True, "native GQA (enable_gqa=True)"
        else:
            kv_repeat = cfg.hq // cfg.hk
            gqa = f"no enable_gqa in this torch: k/v heads repeated {kv_repeat}x outside the timed calls"

    def attend(q, k, v, cu, max_len):
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)

    return Runner(attend, f"torch {torch.__version__} varlen_attn, {causal}, {gqa}", kv_repeat)


def _make_flex_attention(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no flex_attention") from exc
    device = inputs.q.device
    lengths = torch.tensor(inputs.lengths, device=device)
    doc_id = torch.repeat_interleave(torch.arange(len(inputs.lengths), device=device, dtype=torch.int32), lengths)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)

    mask_kwargs = {"device": device}
    if "_compile" in inspect.signature(create_block_mask).parameters:
        mask_kwargs["_compile"] = True  # the eager path materialises [T, T] intermediates (GiBs at T = 32k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 suggests compiling it instead
        block_mask = create_block_mask(document_causal, None, None, cfg.tokens, cfg.tokens, **mask_kwargs)
    # Compiled per config: flex_attention's eager fallback materialises the scores.
    flex = _common.compiled(flex_attention, (cfg, settings.dtype, settings.device))

    def attend(q, k, v, cu, max_len):
        heads_first = lambda x: x.transpose(0, 1).unsqueeze(0)  # [T, H, D] -> [1, H, T, D], a view
        out = flex(heads_first(q), heads_first(k), heads_first(v), block_mask=block_mask, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)

    note = (
        f"torch.compile(flex_attention, dynamic=False), document causal block mask "
        f"(block size {block_mask.BLOCK_SIZE}), enable_gqa=True, default kernel options"
    )
    return Runner(attend, note, extra={"block_mask": block_mask, "doc_id": doc_id})


def _make_sdpa_per_doc(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
    bounds = [int(b) for b in inputs.cu_seqlens.tolist()]  # once, on the host, outside the timed calls
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))

    def attend(q, k, v, cu, max_len):
        heads_first = lambda x, s, e: x[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, s, D] view
        outs = []
        for s, e in spans:
            o = F.scaled_dot_product_attention(
                heads_first(q, s, e), heads_first(k, s, e), heads_first(v, s, e), is_causal=True, enable_gqa=True
            )
            outs.append(o.squeeze(0).transpose(0, 1))
        return torch.cat(outs)

    return Runner(attend, f"F.scaled_dot_product_attention per document ({len(spans)} calls per step), default backend")


def _make_flash_attn(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise Unavailable("flash_attn not installed") from exc
    except Exception as exc:  # a build that does not load against this torch
        raise Unavailable(f"flash_attn import failed: {type(exc).__name__}: {str(exc)[:120]}") from exc

    def attend(q, k, v, cu, max_len):
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

    version = _common.package_version("flash-attn", "flash_attn")
    return Runner(attend, f"flash_attn {version} flash_attn_varlen_func, causal=True, native GQA")


def _make_flash_attn3(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except ImportError as exc:
        raise Unavailable("flash_attn_interface (FlashAttention-3) not installed") from exc
    except Exception as exc:
        raise Unavailable(f"flash_attn_interface import failed: {type(exc).__name__}: {str(exc)[:120]}") from exc

    def attend(q, k, v, cu, max_len):
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        return out[0] if isinstance(out, (tuple, list)) else out  # (out, lse) in some versions

    return Runner(attend, "flash_attn_interface.flash_attn_varlen_func (FA3), causal=True, native GQA")


FACTORIES: dict[str, Callable[[Config, Inputs, _common.Settings], Runner]] = {
    "fastsft": _make_fastsft,
    "torch_varlen": _make_torch_varlen,
    "flex_attention": _make_flex_attention,
    "sdpa_per_doc": _make_sdpa_per_doc,
    "flash_attn": _make_flash_attn,
    "flash_attn3": _make_flash_attn3,
}


def _is_headline(cfg: Config) -> bool:
    return (
        cfg.mix == HEADLINE["mix"]
        and cfg.tokens == HEADLINE["tokens"]
        and cfg.d == HEADLINE["d"]
        and cfg.hq == HEADLINE["group"] * cfg.hk
    )


# --------------------------------------------------------------------------------------------------
# The benchmark: entries, cells, speedups and targets, report
# --------------------------------------------------------------------------------------------------


class Attention(_common.KernelBenchmark):
    name = "attention"
    title = "Varlen causal attention (packed documents), forward and forward + backward"
    description = "varlen causal attention forward and forward + backward (see bench_attention.py docstring)"
    all_impls = IMPLS
    directions = DIRECTIONS
    rate = ("tflops", "flops", 1e12, "TFLOP/s")

    def smoke_skips(self) -> dict[str, str]:
        why = (
            f"--smoke runs {' and '.join(SMOKE_IMPLS)} only (the others need CUDA and bf16, or compile for "
            "minutes on CPU); name it with --impl to run it"
        )
        return {name: why for name in IMPLS if name not in SMOKE_IMPLS}

    def setup(self) -> None:
        """The document lengths of every (mix, tokens) batch of the sweep, and their statistics."""
        batches = dict.fromkeys((c.mix, c.tokens) for c in self.configs)
        self.lengths = {(mix, t): document_lengths(mix, t, self.settings.seed) for mix, t in batches}
        self.stats = {batch: doc_stats(lengths) for batch, lengths in self.lengths.items()}

    def prepare(self, cfg: Config) -> Inputs:
        return make_inputs(cfg, self.lengths[(cfg.mix, cfg.tokens)], self.settings)

    def entry_fields(self, name: str, cfg: Config, direction: str) -> dict:
        stats = self.stats[(cfg.mix, cfg.tokens)]
        return {
            "docs": {k: stats[k] for k in ("n_docs", "max_seqlen", "sum_sq")},
            "flops": attention_flops(cfg, stats["sum_sq"], direction),
            "flops_formula": FLOPS_FORMULAS[direction],
            "parity_of": "out" if direction == "fwd" else "worst of dq, dk, dv",
            "speedup_vs_torch_varlen": None,
        }

    def build(self, name: str, cfg: Config, inputs: Inputs) -> _common.Cell:
        """fwd: one forward with autograd recording; fwd+bwd: a fresh forward and torch.autograd.grad of
        dq, dk, dv (put back in fastsft's layout for parity when k / v heads were repeated)."""
        runner = FACTORIES[name](cfg, inputs, self.settings)
        q, k, v, r = inputs.q, inputs.k, inputs.v, runner.kv_repeat
        if r > 1:  # no native GQA: the adapter gets k / v with Hq heads, leaves of their own
            k = k.detach().repeat_interleave(r, dim=1).requires_grad_()
            v = v.detach().repeat_interleave(r, dim=1).requires_grad_()
        cu, max_len, grad_out = inputs.cu_seqlens, inputs.max_seqlen, inputs.grad_out

        def forward() -> torch.Tensor:
            return runner.attend(q, k, v, cu, max_len)

        def forward_backward() -> tuple:
            return torch.autograd.grad(forward(), (q, k, v), grad_out)

        def canonical_grads(grads: tuple) -> tuple:
            """dq, dk, dv in fastsft's layout: gradients of repeated k / v heads summed over each group."""
            dq, dk, dv = grads
            if r > 1:
                dk, dv = (g.unflatten(1, (g.shape[1] // r, r)).sum(2) for g in (dk, dv))
            return dq, dk, dv

        return _common.Cell(runner.note, [_common.Step(forward), _common.Step(forward_backward, canonical_grads)])

    def derive(self, cfg: Config, entries: list[dict]) -> list[dict]:
        """Per direction: every entry's speedup over torch_varlen (its time / the entry's), and fastsft's
        targets: checked (met True / False) only at the headline config and direction, on a GPU, and for the
        moonshot on an H100; None elsewhere."""
        stats = self.stats[(cfg.mix, cfg.tokens)]
        derived = []
        for direction in DIRECTIONS:
            by_impl = {e["impl"]: e for e in entries if e["direction"] == direction}
            for entry in by_impl.values():
                entry["speedup_vs_torch_varlen"] = _common.ratio(by_impl.get("torch_varlen"), entry)
            fast, varlen = by_impl.get("fastsft"), by_impl.get("torch_varlen")
            values = {
                "speedup_vs_torch_varlen": fast["speedup_vs_torch_varlen"] if fast else None,
                "moonshot_fwd_tflops": fast["tflops"] if fast else None,
            }
            targets = {}
            for key, target in TARGETS.items():
                applies = _is_headline(cfg) and direction == target["direction"]
                on_device = self.on_gpu and (target["device"] is None or target["device"] in self.gpu)
                value = values[key]
                judged = value is not None and applies and on_device
                met = _common.meets(value, target["rule"], target["limit"]) if judged else None
                targets[key] = {**target, "value": value, "applies": applies, "met": met}
            record = {
                "config": asdict(cfg),
                "direction": direction,
                "docs": {k: stats[k] for k in ("n_docs", "max_seqlen")},
                "fastsft_tflops": fast["tflops"] if fast else None,
                "torch_varlen_tflops": varlen["tflops"] if varlen else None,
                "fastsft_speedup_vs_torch_varlen": values["speedup_vs_torch_varlen"],
                "targets": targets,
            }
            derived.append(record)
        return derived

    def settings_fields(self) -> dict:
        configs = self.configs
        sweep = {
            "mixes": list(dict.fromkeys(c.mix for c in configs)),
            "tokens": list(dict.fromkeys(c.tokens for c in configs)),
            "head_dims": list(dict.fromkeys(c.d for c in configs)),
            "heads": list(dict.fromkeys(c.heads() for c in configs)),
        }
        return {"causal": True, "softmax_scale": "1/sqrt(D)", "sweep": sweep}

    def payload_fields(self) -> dict:
        mixes = {
            f"{mix} T={tokens}": {**self.stats[(mix, tokens)], "lengths": lengths}
            for (mix, tokens), lengths in self.lengths.items()
        }
        return {"length_mixes": mixes, "flops_formulas": FLOPS_FORMULAS, "headline": HEADLINE, "targets": TARGETS}

    def summary_lines(self, payload: dict) -> list[str]:
        s = payload["settings"]
        return [
            f"- inputs: {s['dtype']}, q, k, v, grad_out ~ N(0, 1) (seed {s['seed']}), softmax scale 1/sqrt(D), "
            f"causal within each document; timing: {_common.timing_line(s)}",
            f"- TFLOP/s = FLOPs / time, the same FLOPs for every implementation (s_i = document lengths): fwd "
            f"`{FLOPS_FORMULAS['fwd']}`, fwd+bwd `{FLOPS_FORMULAS['fwd+bwd']}` (backward = 2.5x forward, "
            "FlashAttention's convention). fwd = one forward with autograd recording; fwd+bwd = one forward and "
            "`torch.autograd.grad` of dq, dk, dv. × vs torch_varlen = torch_varlen's time / this row's time.",
            "- parity (informational): relative L2 difference to fastsft of out (fwd) / the worst of dq, dk, dv "
            "(fwd+bwd); memory: peak allocated during one call above the inputs, GiB.",
            f"- target (ARCHITECTURE.md): fastsft ≥ 1.0x torch varlen_attn TFLOP/s, fwd+bwd, D=128, GQA 4:1, "
            f"{HEADLINE['mix']} documents, {HEADLINE['tokens']} tokens; moonshot ≥ 450 TFLOP/s forward on an "
            "H100. ✓ / ✗ at the headline config where measured on a GPU.",
        ]

    def sections(self, payload: dict) -> list[tuple[str, list[str]]]:
        return [
            ("Every measurement", [self.main_table(payload)]),
            ("fastsft against torch varlen_attn and the targets", [_targets_table(payload)]),
            ("Length mixes", _mix_lines(payload)),
        ]

    def main_table(self, payload: dict) -> str:
        headers = ["mix", "T", "docs", "max len", "Hq/Hk", "D", "dir", "impl", "ms", "TFLOP/s"]
        headers += ["× vs torch_varlen", "peak GiB", "rel. diff to fastsft"]
        rows = []
        for e in payload["results"]:
            cfg = Config(**e["config"])
            docs = e["docs"]
            head = [cfg.mix, cfg.tokens, docs["n_docs"], docs["max_seqlen"], cfg.heads(), cfg.d, e["direction"]]
            head.append(e["impl"])
            if e["status"] != "ok":
                rows.append([*head, _common.short_status(e["status"]), *[None] * 4])
                continue
            parity = "(ref)" if e["impl"] == "fastsft" else _common.num(e["parity_rel_diff"], ".1e")
            row = [
                *head,
                _common.num(e["time_ms"], ".3f"),
                _common.sig3(e["tflops"]),
                _common.num(e["speedup_vs_torch_varlen"], ".2f"),
                _common.num(e["peak_gib"], ".3f"),
                parity,
            ]
            rows.append(row)
        return _common.markdown_table(headers, rows)

    def panels(self, payload: dict) -> list[list[_common.BarPanel]]:
        """Rows: TFLOP/s fwd, TFLOP/s fwd+bwd, peak memory fwd+bwd; one column per (heads, D); groups = length
        mixes (and T), bars = implementations."""
        impls, results = payload["settings"]["impls"], payload["results"]
        configs = list(dict.fromkeys(Config(**e["config"]) for e in results))
        shapes = list(dict.fromkeys((c.hq, c.hk, c.d) for c in configs))
        by_cell = {(Config(**e["config"]), e["direction"], e["impl"]): e for e in results}
        grid = []
        rows = (("fwd", "tflops", "TFLOP/s", False), ("fwd+bwd", "tflops", "TFLOP/s", False))
        rows += (("fwd+bwd", "peak_gib", "GiB", True),)
        for direction, key, ylabel, log in rows:
            row = []
            for hq, hk, d in shapes:
                group = [c for c in configs if (c.hq, c.hk, c.d) == (hq, hk, d)]
                labels = [f"{c.mix}\nT={c.tokens}" for c in group]
                series = {name: [by_cell[(c, direction, name)][key] for c in group] for name in impls}
                cells = (((name, i), by_cell[(c, direction, name)]) for i, c in enumerate(group) for name in impls)
                what = "TFLOP/s" if key == "tflops" else "peak memory above the inputs"
                title = f"{what} {direction}, Hq/Hk={hq}/{hk} D={d}"
                row.append(_common.BarPanel(title, ylabel, labels, series, log, _common.failure_marks(cells)))
            grid.append(row)
        return grid

    def plot_subject(self, payload: dict) -> str:
        return "varlen causal attention"


def _target_cell(target: dict) -> str:
    if target["value"] is None:
        return ""
    return _common.sig3(target["value"]) + _common.check_mark(target["met"])


def _targets_table(payload: dict) -> str:
    speed, moon = TARGETS["speedup_vs_torch_varlen"], TARGETS["moonshot_fwd_tflops"]
    headers = ["mix", "T", "Hq/Hk", "D", "dir", "fastsft TFLOP/s", "torch_varlen TFLOP/s"]
    headers += [
        f"fastsft × vs torch_varlen (≥ {speed['limit']:g} {speed['direction']}, headline)",
        f"moonshot: fastsft fwd TFLOP/s (≥ {moon['limit']:g} on {moon['device']}, headline)",
    ]
    rows = []
    for d in payload["derived"]:
        cfg = Config(**d["config"])
        t = d["targets"]
        moonshot = _target_cell(t["moonshot_fwd_tflops"]) if t["moonshot_fwd_tflops"]["applies"] else ""
        row = [
            cfg.mix,
            cfg.tokens,
            cfg.heads(),
            cfg.d,
            d["direction"],
            _common.sig3(d["fastsft_tflops"]),
            _common.sig3(d["torch_varlen_tflops"]),
            _target_cell(t["speedup_vs_torch_varlen"]),
            moonshot,
        ]
        rows.append(row)
    return _common.markdown_table(headers, rows)


def _mix_lines(payload: dict) -> list[str]:
    lines = []
    for key, mix in payload["length_mixes"].items():
        lengths = mix["lengths"]
        shown = ", ".join(map(str, lengths[:12])) + (", ..." if len(lengths) > 12 else "")
        lines.append(
            f"- **{key}**: {mix['n_docs']} documents, max {mix['max_seqlen']}, mean {mix['mean_seqlen']:.0f}, "
            f"sum(s_i^2) = {mix['sum_sq']}; lengths {shown}"
        )
    return lines


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _common.argument_parser(
        "attention",
        "Varlen causal attention fwd and fwd+bwd: fastsft vs torch varlen_attn, flex_attention, "
        "SDPA per document, flash-attn.",
    )
    parser.add_argument("--mix", nargs="+", choices=MIXES, help="document length mixes (default all)")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"tokens T per batch (default {FULL_TOKENS})")
    parser.add_argument("--d", type=int, nargs="+", help="head dims (default 128 64; --quick: 128)")
    _common.add_run_options(parser, IMPLS, "D=128 only (all mixes, T=32768)")
    args = parser.parse_args(argv)
    _common.check_values(parser, "--tokens", args.tokens, lambda t: t >= 1, ">= 1")
    _common.check_values(parser, "--d", args.d, lambda d: d >= 1, ">= 1")
    return args


def make_configs(args: argparse.Namespace) -> list[Config]:
    """The sweep: explicit flags win over --smoke / --quick shapes, which win over the full sweep."""
    if args.smoke:
        mixes, tokens, dims, hq, hk = (SMOKE_MIX,), (SMOKE_TOKENS,), SMOKE_HEAD_DIMS, SMOKE_HQ, SMOKE_HK
    else:
        mixes, tokens, hq, hk = MIXES, (FULL_TOKENS,), HQ, HK
        dims = QUICK_HEAD_DIMS if args.quick else FULL_HEAD_DIMS
    mixes, tokens, dims = args.mix or mixes, args.tokens or tokens, args.d or dims
    return [Config(mix, t, hq, hk, d) for d in dims for mix in mixes for t in tokens]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return Attention(args, make_configs(args)).run()


if __name__ == "__main__":
    sys.exit(main())
