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

Target (DESIGN.md, "Performance targets"): fastsft >= 1.0x torch varlen_attn's TFLOP/s, fwd+bwd, D=128, GQA
4:1, lognormal_128_8192 documents, 32768 tokens (H100, bf16). Moonshot: FA3-class, >= 450 TFLOP/s forward on
an H100 at the same config.

    python benchmarks/bench_attention.py --quick        # D=128 only: three length mixes, every implementation
    python benchmarks/bench_attention.py --smoke --out /tmp/x   # tiny CPU run, Triton interpreter
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _common
import numpy as np
import torch
import torch.nn.functional as F

# A CPU smoke run executes fastsft's real Triton kernels in Triton's interpreter, which is chosen when
# triton is first imported: so the environment is set here, before anything imports triton (fastsft's
# kernels and triton.testing are imported lazily, inside the functions that use them).
if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FASTSFT_BACKEND", "triton")

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

# DESIGN.md, "Performance targets", at the headline config below (ratios and rates measured on a GPU).
HEADLINE = {"mix": "lognormal_128_8192", "tokens": 32768, "d": 128, "group": 4}
TARGETS = {
    "speedup_vs_torch_varlen": {"limit": 1.0, "rule": ">=", "direction": "fwd+bwd", "device": None,
                                "what": "fastsft TFLOP/s / torch varlen_attn TFLOP/s"},
    "moonshot_fwd_tflops": {"limit": 450.0, "rule": ">=", "direction": "fwd", "device": "H100",
                            "what": "fastsft forward TFLOP/s (moonshot, FA3-class)"},
}  # fmt: skip


class Unavailable(Exception):
    """The implementation cannot run here (not installed, skipped); recorded as "skipped: <why>"."""


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
class Settings:
    device: torch.device
    dtype: torch.dtype
    smoke: bool
    seed: int
    warmup_ms: float
    rep_ms: float
    min_reps: int
    skip: dict[str, str]  # implementation -> why it is not run
    cpu_reps: int = 3


@dataclass
class Inputs:
    q: torch.Tensor  # [T, Hq, D], requires grad
    k: torch.Tensor  # [T, Hk, D], requires grad
    v: torch.Tensor  # [T, Hk, D], requires grad
    grad_out: torch.Tensor  # [T, Hq, D]
    cu_seqlens: torch.Tensor  # [B+1] int32, on the device
    max_seqlen: int
    lengths: list[int]


def make_inputs(cfg: Config, lengths: list[int], settings: Settings) -> Inputs:
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


def _make_fastsft(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
    from fastsft.ops import varlen_attention
    from fastsft.ops._backend import select_backend

    backend = select_backend("varlen_attention", inputs.q)
    return Runner(
        lambda q, k, v, cu, max_len: varlen_attention(q, k, v, cu, max_len, causal=True),
        f"fastsft backend: {backend}",
    )


def _make_torch_varlen(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
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


_compiled: dict = {"key": None, "fn": None}


def _make_flex_attention(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
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
    # One fresh compile per config: the sweep has more shapes than dynamo's recompile limit, past which it
    # would silently fall back to eager (flex_attention's eager path materialises the scores).
    key = (cfg, settings.dtype, settings.device)
    if _compiled["key"] != key:
        torch._dynamo.reset()
        _compiled.update(key=key, fn=torch.compile(flex_attention, dynamic=False))
    flex = _compiled["fn"]

    def attend(q, k, v, cu, max_len):
        heads_first = lambda x: x.transpose(0, 1).unsqueeze(0)  # [T, H, D] -> [1, H, T, D], a view
        out = flex(heads_first(q), heads_first(k), heads_first(v), block_mask=block_mask, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)

    note = (f"torch.compile(flex_attention, dynamic=False), document causal block mask "
            f"(block size {block_mask.BLOCK_SIZE}), enable_gqa=True, default kernel options")  # fmt: skip
    return Runner(attend, note, extra={"block_mask": block_mask, "doc_id": doc_id})


def _make_sdpa_per_doc(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
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


def _make_flash_attn(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
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


def _make_flash_attn3(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
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


FACTORIES: dict[str, Callable[[Config, Inputs, Settings], Runner]] = {
    "fastsft": _make_fastsft,
    "torch_varlen": _make_torch_varlen,
    "flex_attention": _make_flex_attention,
    "sdpa_per_doc": _make_sdpa_per_doc,
    "flash_attn": _make_flash_attn,
    "flash_attn3": _make_flash_attn3,
}


# --------------------------------------------------------------------------------------------------
# One cell, one config, the sweep
# --------------------------------------------------------------------------------------------------


def _new_entry(name: str, cfg: Config, stats: dict, direction: str) -> dict:
    return {
        "config": asdict(cfg),
        "docs": {k: stats[k] for k in ("n_docs", "max_seqlen", "sum_sq")},
        "direction": direction,
        "impl": name,
        "status": "not run",
        "time_ms": None,
        "tflops": None,
        "flops": attention_flops(cfg, stats["sum_sq"], direction),
        "flops_formula": FLOPS_FORMULAS[direction],
        "peak_gib": None,
        "parity_rel_diff": None,
        "parity_of": "out" if direction == "fwd" else "worst of dq, dk, dv",
        "speedup_vs_torch_varlen": None,
        "note": None,
        "warnings": [],
    }


def _rel_diff(outputs: tuple, reference: tuple) -> float:
    """Worst relative L2 difference over the tensors (computed in fp32)."""
    worst = 0.0
    for out, ref in zip(outputs, reference, strict=True):
        ref32 = ref.detach().float()
        diff = torch.linalg.vector_norm(out.detach().float() - ref32).item()
        worst = max(worst, diff / max(torch.linalg.vector_norm(ref32).item(), 1e-30))
    return worst


def _warm_call(step: Callable, entry: dict, device: torch.device):
    """First call: compiles / autotunes; its result is kept for the parity check (warnings recorded)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = step()
        _common.synchronize(device)
    entry["warnings"] = list(dict.fromkeys(str(w.message).splitlines()[0][:200] for w in caught))[:3]
    return result


def _measure(name: str, step: Callable, entry: dict, result: tuple, ref: dict, settings: Settings) -> None:
    """Parity of `result` against fastsft's (or store it, for fastsft), then time, TFLOP/s and peak memory."""
    key = entry["direction"]
    if name == "fastsft":
        ref[key] = tuple(r.detach() for r in result)
    elif ref.get(key) is not None:
        try:
            entry["parity_rel_diff"] = _rel_diff(result, ref[key])
        except Exception as exc:  # a layout mismatch is worth a note, not the measurement
            entry["warnings"].append(f"parity not computed: {_common.classify_failure(exc)}")
    del result
    entry["time_ms"] = _common.median_time_ms(
        step, settings.device, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms,
        min_reps=settings.min_reps, cpu_reps=settings.cpu_reps,
    )  # fmt: skip
    entry["peak_gib"] = _common.peak_memory_gib(step, settings.device)
    entry["tflops"] = entry["flops"] / (entry["time_ms"] * 1e-3) / 1e12
    entry["status"] = "ok"


def run_cell(name: str, cfg: Config, stats: dict, inputs: Inputs, settings: Settings, ref: dict) -> list[dict]:
    """One implementation on one config, fwd then fwd+bwd; failures become the entries' status."""
    entries = [_new_entry(name, cfg, stats, direction) for direction in DIRECTIONS]
    runner = None
    try:
        if name in settings.skip:
            raise Unavailable(settings.skip[name])
        runner = FACTORIES[name](cfg, inputs, settings)
    except Unavailable as exc:
        for entry in entries:
            entry["status"] = f"skipped: {exc}"
        return entries
    except Exception as exc:
        for entry in entries:
            entry["status"] = _common.classify_failure(exc)
        _common.release_memory(settings.device)
        return entries
    fwd_entry, bwd_entry = entries
    fwd_entry["note"] = bwd_entry["note"] = runner.note
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

    try:
        result = (_warm_call(forward, fwd_entry, settings.device),)
        _measure(name, forward, fwd_entry, result, ref, settings)
    except Exception as exc:  # an OOM or a broken baseline must not end the sweep
        fwd_entry["status"] = _common.classify_failure(exc)
    result = None
    _common.release_memory(settings.device)
    try:
        result = canonical_grads(_warm_call(forward_backward, bwd_entry, settings.device))
        _measure(name, forward_backward, bwd_entry, result, ref, settings)
    except Exception as exc:
        bwd_entry["status"] = _common.classify_failure(exc)
    result = runner = q = k = v = None  # drops the closures' references before the next cell
    _common.release_memory(settings.device)
    return entries


def _ratio(num: dict | None, den: dict | None) -> float | None:
    """num's time over den's, both measured; None otherwise."""
    if not num or not den or num.get("time_ms") is None or not den.get("time_ms"):
        return None
    return num["time_ms"] / den["time_ms"]


def _is_headline(cfg: Config) -> bool:
    return (cfg.mix == HEADLINE["mix"] and cfg.tokens == HEADLINE["tokens"] and cfg.d == HEADLINE["d"]
            and cfg.hq == HEADLINE["group"] * cfg.hk)  # fmt: skip


def derive(cfg: Config, stats: dict, entries: list[dict], gpu: str, judge: bool) -> list[dict]:
    """Per direction: every entry's speedup over torch_varlen (its time / the entry's), and fastsft's targets:
    checked (met True / False) only at the headline config and direction, on a GPU (`judge`), and for the
    moonshot on an H100; None elsewhere."""
    derived = []
    for direction in DIRECTIONS:
        by_impl = {e["impl"]: e for e in entries if e["direction"] == direction}
        for entry in by_impl.values():
            entry["speedup_vs_torch_varlen"] = _ratio(by_impl.get("torch_varlen"), entry)
        fast, varlen = by_impl.get("fastsft"), by_impl.get("torch_varlen")
        values = {
            "speedup_vs_torch_varlen": fast["speedup_vs_torch_varlen"] if fast else None,
            "moonshot_fwd_tflops": fast["tflops"] if fast else None,
        }
        targets = {}
        for key, target in TARGETS.items():
            applies = _is_headline(cfg) and direction == target["direction"]
            on_device = judge and (target["device"] is None or target["device"] in gpu)
            value = values[key]
            met = value >= target["limit"] if value is not None and applies and on_device else None
            targets[key] = {**target, "value": value, "applies": applies, "met": met}
        derived.append({
            "config": asdict(cfg), "direction": direction, "docs": {k: stats[k] for k in ("n_docs", "max_seqlen")},
            "fastsft_tflops": fast["tflops"] if fast else None,
            "torch_varlen_tflops": varlen["tflops"] if varlen else None,
            "fastsft_speedup_vs_torch_varlen": values["speedup_vs_torch_varlen"],
            "targets": targets,
        })  # fmt: skip
    return derived


def _progress(entry: dict) -> str:
    cfg = Config(**entry["config"])
    parts = [f"{cfg.label():<52}", f"{entry['direction']:<7}", f"{entry['impl']:<14}", entry["status"]]
    if entry["time_ms"] is not None:
        parts.append(f"{entry['time_ms']:9.3f} ms  {entry['tflops']:8.2f} TFLOP/s")
    if entry["peak_gib"] is not None:
        parts.append(f"{entry['peak_gib']:6.2f} GiB")
    if entry["parity_rel_diff"] is not None:
        parts.append(f"rel.diff {entry['parity_rel_diff']:.1e}")
    return "  ".join(parts)


def _failed_entries(name: str, cfg: Config, stats: dict, status: str) -> list[dict]:
    entries = [_new_entry(name, cfg, stats, direction) for direction in DIRECTIONS]
    for entry in entries:
        entry["status"] = status
    return entries


def run_sweep(configs: list[Config], impls: list[str], settings: Settings, lengths: dict):
    """Every implementation on every config (fastsft first: its outputs and gradients are the parity
    reference), until SIGTERM (the caller's time limit). `lengths[(mix, tokens)]` holds each batch's
    document lengths. Returns (results, derived, the configs measured)."""
    results, derived = [], []
    gpu, judge = _common.gpu_name(), settings.device.type == "cuda"

    def run_one(cfg: Config) -> None:
        docs = lengths[(cfg.mix, cfg.tokens)]
        stats = doc_stats(docs)
        entries = []
        try:
            inputs = make_inputs(cfg, docs, settings)
        except Exception as exc:  # the inputs themselves did not fit: every cell of the config fails alike
            status = _common.classify_failure(exc)
            print(f"{cfg.label()}: inputs failed: {status}", flush=True)
            entries = [e for name in impls for e in _failed_entries(name, cfg, stats, status)]
        else:
            ref: dict = {}
            for name in impls:
                cell = run_cell(name, cfg, stats, inputs, settings, ref)
                for entry in cell:
                    print(_progress(entry), flush=True)
                entries += cell
            del inputs, ref
        _common.release_memory(settings.device)
        derived.extend(derive(cfg, stats, entries, gpu, judge))
        results.extend(entries)

    done = _common.sweep_until_out_of_time(configs, run_one)
    return results, derived, done


# --------------------------------------------------------------------------------------------------
# Report: markdown tables and plot
# --------------------------------------------------------------------------------------------------


def _short_status(entry: dict) -> str:
    return entry["status"].split(":")[0]


def _num(value: float | None, fmt: str) -> str | None:
    return None if value is None or not math.isfinite(value) else format(value, fmt)


def _sig3(value: float | None) -> str | None:
    """Three significant digits without an exponent (TFLOP/s spans 1e-5 on a CPU smoke run to 700 on a GPU)."""
    if value is None or not math.isfinite(value):
        return None
    digits = 2 - math.floor(math.log10(abs(value))) if value else 0
    return f"{value:.{max(0, digits)}f}"


def _target_cell(target: dict) -> str:
    if target["value"] is None:
        return ""
    mark = "" if target["met"] is None else (" ✓" if target["met"] else " ✗")
    return _sig3(target["value"]) + mark


MAIN_HEADERS = ["mix", "T", "docs", "max len", "Hq/Hk", "D", "dir", "impl", "ms", "TFLOP/s", "× vs torch_varlen",
                "peak GiB", "rel. diff to fastsft"]  # fmt: skip


def _main_table(payload: dict) -> str:
    rows = []
    for e in payload["results"]:
        cfg = Config(**e["config"])
        head = [cfg.mix, cfg.tokens, e["docs"]["n_docs"], e["docs"]["max_seqlen"], cfg.heads(), cfg.d,
                e["direction"], e["impl"]]  # fmt: skip
        if e["status"] != "ok":
            rows.append([*head, _short_status(e), *[None] * 4])
            continue
        rows.append([
            *head, _num(e["time_ms"], ".3f"), _sig3(e["tflops"]), _num(e["speedup_vs_torch_varlen"], ".2f"),
            _num(e["peak_gib"], ".3f"), "(ref)" if e["impl"] == "fastsft" else _num(e["parity_rel_diff"], ".1e"),
        ])  # fmt: skip
    return _common.markdown_table(MAIN_HEADERS, rows)


def _targets_table(payload: dict) -> str:
    speed, moon = TARGETS["speedup_vs_torch_varlen"], TARGETS["moonshot_fwd_tflops"]
    headers = ["mix", "T", "Hq/Hk", "D", "dir", "fastsft TFLOP/s", "torch_varlen TFLOP/s",
               f"fastsft × vs torch_varlen (≥ {speed['limit']:g} {speed['direction']}, headline)",
               f"moonshot: fastsft fwd TFLOP/s (≥ {moon['limit']:g} on {moon['device']}, headline)"]  # fmt: skip
    rows = []
    for d in payload["derived"]:
        cfg = Config(**d["config"])
        t = d["targets"]
        moonshot = _target_cell(t["moonshot_fwd_tflops"]) if t["moonshot_fwd_tflops"]["applies"] else ""
        rows.append([
            cfg.mix, cfg.tokens, cfg.heads(), cfg.d, d["direction"], _sig3(d["fastsft_tflops"]),
            _sig3(d["torch_varlen_tflops"]), _target_cell(t["speedup_vs_torch_varlen"]), moonshot,
        ])  # fmt: skip
    return _common.markdown_table(headers, rows)


def _mix_lines(payload: dict) -> list[str]:
    lines = []
    for key, mix in payload["length_mixes"].items():
        lengths = mix["lengths"]
        shown = ", ".join(map(str, lengths[:12])) + (", ..." if len(lengths) > 12 else "")
        lines.append(f"- **{key}**: {mix['n_docs']} documents, max {mix['max_seqlen']}, mean "
                     f"{mix['mean_seqlen']:.0f}, sum(s_i^2) = {mix['sum_sq']}; lengths {shown}")  # fmt: skip
    return lines


def render_markdown(payload: dict) -> str:
    meta, s = payload["metadata"], payload["settings"]
    if s["device"] == "cuda":
        timing = (f"triton.testing.do_bench median (warmup {s['warmup_ms']:g} ms, repetitions over at least "
                  f"{s['rep_ms']:g} ms and {s['min_reps']} calls, L2 flushed between calls)")  # fmt: skip
    else:
        timing = f"time.perf_counter median of {s['cpu_reps']} calls (smoke run without CUDA: no speed data)"
    parts = [
        "# Varlen causal attention (packed documents), forward and forward + backward",
        "",
        *_common.metadata_lines(meta),
        f"- inputs: {s['dtype']}, q, k, v, grad_out ~ N(0, 1) (seed {s['seed']}), softmax scale 1/sqrt(D), causal "
        f"within each document; timing: {timing}",
        f"- TFLOP/s = FLOPs / time, the same FLOPs for every implementation (s_i = document lengths): fwd "
        f"`{FLOPS_FORMULAS['fwd']}`, fwd+bwd `{FLOPS_FORMULAS['fwd+bwd']}` (backward = 2.5x forward, "
        "FlashAttention's convention). fwd = one forward with autograd recording; fwd+bwd = one forward and "
        "`torch.autograd.grad` of dq, dk, dv. × vs torch_varlen = torch_varlen's time / this row's time.",
        "- parity (informational): relative L2 difference to fastsft of out (fwd) / the worst of dq, dk, dv "
        "(fwd+bwd); memory: peak allocated during one call above the inputs, GiB.",
        f"- target (DESIGN.md): fastsft ≥ 1.0x torch varlen_attn TFLOP/s, fwd+bwd, D=128, GQA 4:1, "
        f"{HEADLINE['mix']} documents, {HEADLINE['tokens']} tokens; moonshot ≥ 450 TFLOP/s forward on an H100. "
        "✓ / ✗ at the headline config where measured on a GPU.",
        "",
        "## Every measurement",
        "",
        _main_table(payload),
        "",
        "## fastsft against torch varlen_attn and the targets",
        "",
        _targets_table(payload),
        "",
        "## Length mixes",
        "",
        *_mix_lines(payload),
        "",
        "## Implementations",
        "",
        *_common.implementation_notes(payload),
        "",
    ]
    return "\n".join(parts)


def _is_failure(status: str) -> bool:
    """Statuses the plot marks where the bar would be (not those of a baseline that is not installed)."""
    return status == "oom" or status.startswith("error")


def _panels(payload: dict) -> list[list[_common.BarPanel]]:
    """Rows: TFLOP/s fwd, TFLOP/s fwd+bwd, peak memory fwd+bwd; one column per (heads, D); groups = length mixes
    (and T), bars = implementations."""
    impls, results = payload["settings"]["impls"], payload["results"]
    configs = list(dict.fromkeys(Config(**e["config"]) for e in results))
    shapes = list(dict.fromkeys((c.hq, c.hk, c.d) for c in configs))
    by_cell = {(Config(**e["config"]), e["direction"], e["impl"]): e for e in results}
    grid = []
    for direction, key, ylabel, log in (("fwd", "tflops", "TFLOP/s", False), ("fwd+bwd", "tflops", "TFLOP/s", False),
                                        ("fwd+bwd", "peak_gib", "GiB", True)):  # fmt: skip
        row = []
        for hq, hk, d in shapes:
            group = [c for c in configs if (c.hq, c.hk, c.d) == (hq, hk, d)]
            labels = [f"{c.mix}\nT={c.tokens}" for c in group]
            series = {name: [by_cell[(c, direction, name)][key] for c in group] for name in impls}
            marks = {(name, i): _short_status(by_cell[(c, direction, name)]) for i, c in enumerate(group)
                     for name in impls if _is_failure(by_cell[(c, direction, name)]["status"])}  # fmt: skip
            what = "TFLOP/s" if key == "tflops" else "peak memory above the inputs"
            title = f"{what} {direction}, Hq/Hk={hq}/{hk} D={d}"
            row.append(_common.BarPanel(title, ylabel, labels, series, log, marks))
        grid.append(row)
    return grid


def write_outputs(payload: dict, out_dir: Path) -> list[Path]:
    meta, s = payload["metadata"], payload["settings"]
    title = f"varlen causal attention: {meta['gpu']}, {s['dtype']}, git {meta['git_revision']}"
    return _common.write_result_files(payload, out_dir, render_markdown(payload), _panels(payload), title)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Varlen causal attention fwd and fwd+bwd: fastsft vs torch varlen_attn, flex_attention, "
        "SDPA per document, flash-attn.",
        epilog="Writes attention_<gpu>_<date>.{json,md,png} into --out.",
    )
    parser.add_argument("--mix", nargs="+", choices=MIXES, help="document length mixes (default all)")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"tokens T per batch (default {FULL_TOKENS})")
    parser.add_argument("--d", type=int, nargs="+", help="head dims (default 128 64; --quick: 128)")
    parser.add_argument("--impl", nargs="+", choices=IMPLS, help="implementations to run (default all)")
    parser.add_argument("--quick", action="store_true", help="D=128 only (all mixes, T=32768)")
    _common.add_run_options(parser)
    args = parser.parse_args(argv)
    for tokens in args.tokens or ():
        if tokens < 1:
            parser.error(f"--tokens values must be >= 1, got {tokens}")
    for d in args.d or ():
        if d < 1:
            parser.error(f"--d values must be >= 1, got {d}")
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


def make_settings(args: argparse.Namespace) -> Settings:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Tiny smoke shapes: one thread. Several (OpenMP pools of torch and of torch.compile's kernels)
        # spin against each other on a small machine and turn 0.2 ms calls into 50 ms ones.
        torch.set_num_threads(1)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    skip = {}
    if args.smoke:
        why = (f"--smoke runs {' and '.join(SMOKE_IMPLS)} only (the others need CUDA and bf16, or compile for "
               "minutes on CPU); name it with --impl to run it")  # fmt: skip
        skip = {name: why for name in IMPLS if name not in SMOKE_IMPLS and name not in (args.impl or ())}
    return Settings(device, dtype, args.smoke, args.seed, args.warmup_ms, args.rep_ms, args.min_reps, skip)


def build_payload(configs, impls, settings, lengths, results, derived) -> dict:
    return {
        "benchmark": "attention",
        "description": "varlen causal attention forward and forward + backward (see bench_attention.py docstring)",
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
            "causal": True,
            "softmax_scale": "1/sqrt(D)",
            "impls": impls,
            "sweep": {
                "mixes": list(dict.fromkeys(c.mix for c in configs)),
                "tokens": list(dict.fromkeys(c.tokens for c in configs)),
                "head_dims": list(dict.fromkeys(c.d for c in configs)),
                "heads": list(dict.fromkeys(c.heads() for c in configs)),
            },
        },
        "length_mixes": {
            f"{mix} T={tokens}": {**doc_stats(docs), "lengths": docs} for (mix, tokens), docs in lengths.items()
        },
        "flops_formulas": FLOPS_FORMULAS,
        "headline": HEADLINE,
        "targets": TARGETS,
        "results": results,
        "derived": derived,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print(
            "bench_attention.py needs a CUDA GPU (none is visible to torch). Run it on a GPU machine, or pass "
            "--smoke for a tiny CPU run through the Triton interpreter that checks the script only.",
            file=sys.stderr,
        )
        return 2
    settings = make_settings(args)
    configs = make_configs(args)
    impls = [name for name in IMPLS if args.impl is None or name in args.impl]
    lengths = {(c.mix, c.tokens): document_lengths(c.mix, c.tokens, args.seed) for c in configs}
    print(f"{len(configs)} configs x {len(impls)} implementations x fwd, fwd+bwd on {_common.gpu_name()}, "
          f"{settings.dtype}")  # fmt: skip
    results, derived, done = run_sweep(configs, impls, settings, lengths)
    payload = build_payload(configs, impls, settings, lengths, results, derived)  # the sweep asked for
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
