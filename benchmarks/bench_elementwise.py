"""RoPE, RMSNorm (plain, Gemma's offset form, fused residual add, Qwen3's per-head q/k-norm), SwiGLU and GeGLU:
forward and backward timed separately, fastsft against its baselines, as a share of the copy bandwidth.

These ops are memory-bound (a few flops per byte), so the figure of merit is bandwidth: the least number of
bytes the op must move, over its time, as a fraction of what a plain device-to-device copy achieves.

What one cell measures (a config = op + shape; one implementation; one direction):
  fwd       one forward call with autograd recording (inputs require grad, as in training); outputs dropped.
  bwd       torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True) on one recorded forward,
            with fixed random grad_outputs: the op's backward alone, producing the grads of every
            differentiable input (q, k for RoPE; x, weight (and residual) for the norms; gate, up for the
            activations).
  time      median of triton.testing.do_bench (CUDA events, L2 flushed between calls), after one warm call
            that also compiles / autotunes; on CPU (--smoke) the median of a few host-timed calls.
  GB/s      bytes / time, bytes being the op's minimum traffic below (each input read once, each output
            written once). The same count for every implementation, so GB/s is an effective bandwidth: one
            that moves more (fp32 intermediates, re-reads, several kernels) simply scores lower.
  % copy    GB/s over the copy bandwidth measured at the start of the same run: dst.copy_(src) of a 1 GiB
            bf16 buffer (random data), bytes = 2 x size (read + write), do_bench median.
  memory    peak allocated during one call above what was allocated just before it, GiB (CUDA only).
  parity    ||out - out_fastsft|| / ||out_fastsft|| (L2 norm, worst tensor) on the same inputs: the outputs
            for fwd, the input gradients for bwd. Informational, never asserted here.

Bytes (e = the activation dtype's size, also used for the weight and for cos/sin; rstd is fp32, 4 bytes):
  rope            fwd  read q [T,Hq,D], k [T,Hk,D], cos, sin [T,D]; write q_out, k_out
                       e * (2*T*(Hq+Hk)*D + 2*T*D)
                  bwd  read dq_out, dk_out, cos, sin; write dq, dk: the same count
  rms_norm        fwd  read x [N,H], w [H]; write y [N,H], rstd [N]                   e * (2*N*H + H) + 4*N
                  bwd  read dy, x, w, rstd; write dx, dw                              e * (3*N*H + 2*H) + 4*N
  add_rms_norm    fwd  read x, residual, w; write y, s = x + residual, rstd           e * (4*N*H + H) + 4*N
                  bwd  read dy, ds, s, w, rstd; write dx (= d residual: one tensor), dw
                                                                                      e * (4*N*H + 2*H) + 4*N
  swiglu, geglu   fwd  read gate, up [N,I]; write out                                 e * 3*N*I
                  bwd  read dout, gate, up; write dgate, dup                          e * 5*N*I
  rms_norm_gemma (offset 1) and qk_norm (N = T*Hq rows of width D) count as rms_norm.

Implementations:
  fastsft        fastsft.ops (apply_rope, rms_norm, add_rms_norm, swiglu, geglu): Triton kernels on CUDA.
  torch_eager    the ops written as Hugging Face writes them: LlamaRMSNorm (fp32 variance, weight *
                 hidden.to(input_dtype)), GemmaRMSNorm ((1 + weight.float()), cast at the end), residual add
                 then norm, apply_rotary_pos_emb with rotate_half (on [T, H, D] with cos.unsqueeze(1): HF's
                 math and traffic, without the batch dim), F.silu(gate) * up, F.gelu(gate, "tanh") * up.
  torch_compile  the same functions under torch.compile(dynamic=False), compiled afresh per shape. Not run by
                 --smoke (a CPU compile per shape outlasts the smoke budget) unless named with --impl.
  liger          Liger-Kernel's autograd Functions, when importable: LigerRopeFunction (q, k as HF's
                 [1, H, T, D] transposed views), LigerRMSNormFunction (casting mode "llama", "gemma" for the
                 offset form, in_place=False), LigerFusedAddRMSNormFunction, LigerSiLUMulFunction,
                 LigerGELUMulFunction. Liger rotates q/k in place in its RoPE forward and writes the gradients
                 of swiglu/geglu over its saved gate/up: every cell gets fresh inputs, and repeated timed calls
                 run on whatever values the previous call left (the traffic does not depend on them).

    python benchmarks/bench_elementwise.py --quick        # T=16384, Llama-3-8B shapes + Qwen3 q/k-norm
    python benchmarks/bench_elementwise.py --smoke --out /tmp/x   # tiny CPU run, Triton interpreter
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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

EPS = 1e-6
ROPE_THETA = 500000.0  # Llama 3
DIRECTIONS = ("fwd", "bwd")
OPS = ("rope", "rms_norm", "rms_norm_gemma", "add_rms_norm", "qk_norm", "swiglu", "geglu")
NORM_OPS = ("rms_norm", "rms_norm_gemma", "qk_norm")
IMPLS = ("fastsft", "torch_eager", "torch_compile", "liger")

# Shapes of the models the ops are sized after (hidden H, intermediate I, q / kv heads, head dim D).
MODELS = {
    "llama3-8b": {"h": 4096, "i": 14336, "hq": 32, "hk": 8, "d": 128},
    "llama3.2-1b": {"h": 2048, "i": 8192, "hq": 32, "hk": 8, "d": 64},
    # Smoke: widths that are no multiple of a block, fp32 (checks the script, not speed).
    "smoke": {"h": 48, "i": 80, "hq": 4, "hk": 2, "d": 16},
}
QK_NORM_MODEL = "qwen3-8b"  # Qwen3 normalises each q head: rms_norm over [T * Hq, D] rows
QK_NORM_SHAPE = {"hq": 32, "d": 128}
FULL_TOKENS, QUICK_TOKENS, SMOKE_TOKENS = (16384, 4096), (16384,), (37,)
FULL_MODELS, QUICK_MODELS = ("llama3-8b", "llama3.2-1b"), ("llama3-8b",)
COPY_BYTES_CUDA, COPY_BYTES_CPU = 1 << 30, 8 << 20

# The minimum traffic of each op family and direction (see the docstring); e = activation element size.
BYTES_FORMULAS = {
    ("rope", "fwd"): "e*(2*T*(Hq+Hk)*D + 2*T*D)",
    ("rope", "bwd"): "e*(2*T*(Hq+Hk)*D + 2*T*D)",
    ("rms_norm", "fwd"): "e*(2*N*H + H) + 4*N",
    ("rms_norm", "bwd"): "e*(3*N*H + 2*H) + 4*N",
    ("add_rms_norm", "fwd"): "e*(4*N*H + H) + 4*N",
    ("add_rms_norm", "bwd"): "e*(4*N*H + 2*H) + 4*N",
    ("gated", "fwd"): "e*3*N*I",
    ("gated", "bwd"): "e*5*N*I",
}

# DESIGN.md, "Performance targets": RoPE, RMSNorm, SwiGLU fwd and bwd at >= 80% of the measured copy
# bandwidth and faster than Liger. Applied here to their siblings too (offset / fused-add / q-k norms, GeGLU).
TARGETS = {
    "pct_of_copy": {"limit": 80.0, "rule": ">="},
    "time_vs_liger": {"limit": 1.0, "rule": "<"},
}


class Unavailable(Exception):
    """The implementation cannot run here (not installed, skipped); recorded as "skipped: <why>"."""


def op_family(op: str) -> str:
    return "rms_norm" if op in NORM_OPS else "gated" if op in ("swiglu", "geglu") else op


@dataclass(frozen=True)
class Config:
    op: str
    model: str
    tokens: int  # T
    rows: int  # N: T, or T * Hq for qk_norm (one row per q head)
    width: int  # H for the norms, I for the activations, D for rope and qk_norm
    hq: int = 0  # rope: q heads (qk_norm: q heads per token)
    hk: int = 0  # rope: kv heads

    def shape(self) -> str:
        if self.op == "rope":
            return f"T={self.tokens} Hq={self.hq} Hk={self.hk} D={self.width}"
        if self.op == "qk_norm":
            return f"N={self.rows} (T={self.tokens} x Hq={self.hq}) D={self.width}"
        return f"N={self.rows} {'I' if op_family(self.op) == 'gated' else 'H'}={self.width}"

    def label(self) -> str:
        return f"{self.op} {self.model} {self.shape()}"


def traffic_bytes(cfg: Config, direction: str, elem: int) -> int:
    """The op's minimum traffic in bytes (BYTES_FORMULAS), activations of `elem` bytes, rstd in fp32."""
    n, w, family = cfg.rows, cfg.width, op_family(cfg.op)
    if family == "rope":
        return elem * (2 * n * (cfg.hq + cfg.hk) * w + 2 * n * w)
    if family == "rms_norm":
        return elem * (2 * n * w + w) + 4 * n if direction == "fwd" else elem * (3 * n * w + 2 * w) + 4 * n
    if family == "add_rms_norm":
        return elem * (4 * n * w + w) + 4 * n if direction == "fwd" else elem * (4 * n * w + 2 * w) + 4 * n
    return elem * (3 if direction == "fwd" else 5) * n * w


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    smoke: bool
    seed: int
    warmup_ms: float
    rep_ms: float
    min_reps: int
    skip_compile: str | None  # the reason torch_compile is not run, or None
    cpu_reps: int = 3


@dataclass
class Inputs:
    tensors: dict[str, torch.Tensor]  # the op's arguments by name; the leaves require grad
    leaves: tuple[torch.Tensor, ...]  # what the backward differentiates, in order
    grad_outputs: tuple[torch.Tensor, ...]  # one fixed random gradient per output ([T, H, D] layout for rope)


def rope_tables(tokens: int, head_dim: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's cos/sin [T, D] (duplicated halves) for positions restarting every 4096 tokens, as in a packed
    batch; computed in fp32, stored in the activation dtype like HF's rotary embedding returns them."""
    positions = torch.arange(tokens, device=device, dtype=torch.float32) % 4096
    inv_freq = ROPE_THETA ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_inputs(cfg: Config, settings: Settings) -> Inputs:
    """Random inputs (never zeros: they can hide unwritten outputs and run faster), the same for every
    implementation of a config (same seed). Activations ~ N(0, 1); weights ~ 1 + N(0, 0.1^2), or N(0, 0.1^2)
    for the Gemma offset form (whose stored weight is the deviation from 1)."""
    device, dtype = settings.device, settings.dtype
    gen = torch.Generator(device=device).manual_seed(settings.seed)

    def randn(*shape, scale=1.0, shift=0.0, grad=False):
        t = torch.randn(*shape, generator=gen, device=device).mul_(scale).add_(shift).to(dtype)
        return t.requires_grad_(grad)

    n, w = cfg.rows, cfg.width
    if cfg.op == "rope":
        q, k = randn(n, cfg.hq, w, grad=True), randn(n, cfg.hk, w, grad=True)
        cos, sin = rope_tables(n, w, device, dtype)
        grads = (randn(n, cfg.hq, w), randn(n, cfg.hk, w))
        return Inputs({"q": q, "k": k, "cos": cos, "sin": sin}, (q, k), grads)
    if cfg.op in ("swiglu", "geglu"):
        gate, up = randn(n, w, grad=True), randn(n, w, grad=True)
        return Inputs({"gate": gate, "up": up}, (gate, up), (randn(n, w),))
    x = randn(n, w, grad=True)
    weight = randn(w, scale=0.1, shift=0.0 if cfg.op == "rms_norm_gemma" else 1.0, grad=True)
    if cfg.op == "add_rms_norm":
        residual = randn(n, w, grad=True)
        grads = (randn(n, w), randn(n, w))  # d y and d s (the new residual stream is used downstream)
        return Inputs({"x": x, "residual": residual, "weight": weight}, (x, residual, weight), grads)
    return Inputs({"x": x, "weight": weight}, (x, weight), (randn(n, w),))


# --------------------------------------------------------------------------------------------------
# Implementations: each factory returns a Runner for one config's inputs.
# --------------------------------------------------------------------------------------------------


def _identity(outputs: tuple) -> tuple:
    return outputs


@dataclass
class Runner:
    forward: Callable[[], tuple]  # one forward from the inputs (autograd records it); a tuple of outputs
    note: str
    grad_outputs: tuple | None = None  # in forward()'s output layout; None: the Inputs' own
    canonical: Callable[[tuple], tuple] = field(default=_identity)  # outputs in fastsft's layout (parity)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# Hugging Face's code for these ops (transformers' Llama / Gemma modelling files), as plain functions.
def hf_rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (hf_rotate_half(q) * sin)
    k_embed = (k * cos) + (hf_rotate_half(k) * sin)
    return q_embed, k_embed


def hf_llama_rms_norm(hidden_states, weight, eps=EPS):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def hf_gemma_rms_norm(x, weight, eps=EPS):
    output = x.float()
    output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + eps)
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def hf_add_rms_norm(x, residual, weight, eps=EPS):
    hidden_states = residual + x  # the decoder layer's residual add; the sum is the next residual stream
    return hf_llama_rms_norm(hidden_states, weight, eps), hidden_states


def hf_swiglu(gate, up):
    return F.silu(gate) * up


def hf_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


# op -> (HF function, names of its tensor arguments in Inputs.tensors)
HF_FUNCTIONS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "rope": (hf_apply_rotary_pos_emb, ("q", "k", "cos", "sin")),
    "rms_norm": (hf_llama_rms_norm, ("x", "weight")),
    "rms_norm_gemma": (hf_gemma_rms_norm, ("x", "weight")),
    "add_rms_norm": (hf_add_rms_norm, ("x", "residual", "weight")),
    "qk_norm": (hf_llama_rms_norm, ("x", "weight")),
    "swiglu": (hf_swiglu, ("gate", "up")),
    "geglu": (hf_geglu, ("gate", "up")),
}
FASTSFT_BACKEND_OP = {"rope": "apply_rope", "swiglu": "swiglu", "geglu": "geglu"}  # others: "rms_norm"


def _make_fastsft(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
    from fastsft import ops
    from fastsft.ops._backend import select_backend

    t = inputs.tensors
    if cfg.op == "rope":
        forward = lambda: ops.apply_rope(t["q"], t["k"], t["cos"], t["sin"])
    elif cfg.op == "add_rms_norm":
        forward = lambda: ops.add_rms_norm(t["x"], t["residual"], t["weight"], EPS)
    elif cfg.op in NORM_OPS:
        offset = 1.0 if cfg.op == "rms_norm_gemma" else 0.0
        forward = lambda: (ops.rms_norm(t["x"], t["weight"], EPS, offset=offset),)
    else:
        fn = ops.swiglu if cfg.op == "swiglu" else ops.geglu
        forward = lambda: (fn(t["gate"], t["up"]),)
    backend = select_backend(FASTSFT_BACKEND_OP.get(cfg.op, "rms_norm"), inputs.leaves[0])
    return Runner(forward, f"fastsft backend: {backend}")


def _make_torch_eager(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
    fn, names = HF_FUNCTIONS[cfg.op]
    args = [inputs.tensors[name] for name in names]
    return Runner(lambda: _as_tuple(fn(*args)), f"HF's code, eager ({fn.__name__})")


_compiled: dict = {"key": None, "fn": None}


def _make_torch_compile(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
    if settings.skip_compile:
        raise Unavailable(settings.skip_compile)
    fn, names = HF_FUNCTIONS[cfg.op]
    args = [inputs.tensors[name] for name in names]
    # Buffer donation lets a compiled backward reuse its saved activations, which then forbids a second
    # backward through one graph (retain_graph=True, how the backward is timed here): off for this run.
    try:
        import torch._functorch.config as functorch_config
    except ImportError:
        functorch_config = None
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    # One fresh compile per config: the sweep has more shapes than dynamo's recompile limit, past which it
    # would silently fall back to eager.
    key = (cfg, settings.dtype, settings.device)
    if _compiled["key"] != key:
        torch._dynamo.reset()
        _compiled.update(key=key, fn=torch.compile(fn, dynamic=False))
    compiled = _compiled["fn"]
    return Runner(lambda: _as_tuple(compiled(*args)), f"torch.compile({fn.__name__}, dynamic=False), default backend")


# Liger's autograd Function per op and the module that defines it in older versions.
LIGER_FUNCTIONS = {
    "rope": ("LigerRopeFunction", "rope"),
    "rms_norm": ("LigerRMSNormFunction", "rms_norm"),
    "rms_norm_gemma": ("LigerRMSNormFunction", "rms_norm"),
    "qk_norm": ("LigerRMSNormFunction", "rms_norm"),
    "add_rms_norm": ("LigerFusedAddRMSNormFunction", "fused_add_rms_norm"),
    "swiglu": ("LigerSiLUMulFunction", "swiglu"),
    "geglu": ("LigerGELUMulFunction", "geglu"),
}


def _liger_function(op: str):
    """Liger's Function for `op`: from liger_kernel.ops, where Liger's own model patches take it (newer
    versions put a device-specific implementation there), else from its defining module (older versions)."""
    name, module_name = LIGER_FUNCTIONS[op]
    try:
        package = importlib.import_module("liger_kernel.ops")
    except ImportError as exc:
        raise Unavailable("liger_kernel not installed") from exc
    except Exception as exc:  # a Liger that does not import against this torch / triton
        raise Unavailable(f"liger_kernel import failed: {type(exc).__name__}: {str(exc)[:120]}") from exc
    function = getattr(package, name, None)
    if function is None:
        try:
            function = getattr(importlib.import_module(f"liger_kernel.ops.{module_name}"), name, None)
        except Exception as exc:
            raise Unavailable(f"liger_kernel.ops.{module_name} failed: {type(exc).__name__}: {exc}") from exc
    if function is None:
        raise Unavailable(f"this liger_kernel has no {name}")
    return function


def _liger_positional(function, values: dict) -> tuple[list, list[str]]:
    """Arguments for function.apply (positional only), matched by name to its forward's parameters: the
    value where `values` has one, the parameter's default elsewhere. Also returns the names in `values` this
    version's forward does not take (recorded in the note). Raises Unavailable on an unknown signature."""
    params = list(inspect.signature(function.forward).parameters.values())[1:]  # after ctx
    args = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise Unavailable(f"cannot read {function.__name__}.forward's parameters")
        if p.name in values:
            args.append(values[p.name])
        elif p.default is not p.empty:
            args.append(p.default)
        else:
            raise Unavailable(f"{function.__name__}.forward has an unknown required parameter {p.name!r}")
    known = {p.name for p in params}
    return args, [name for name in values if name not in known]


def _make_liger(cfg: Config, inputs: Inputs, settings: Settings) -> Runner:
    function = _liger_function(cfg.op)
    t = inputs.tensors
    version = _common.package_version(*_common.PACKAGES["liger_kernel"])
    grad_outputs, canonical = None, _identity
    if cfg.op == "rope":
        # HF's layout: q/k [B, H, S, D] as transposed views of the projection's [B, S, H, D] output, cos/sin
        # [B, S, D]. Liger returns [1, H, T, D] views (of q and k, which it rotates in place).
        def heads_first(x):
            return x.unsqueeze(0).transpose(1, 2)

        values = {"q": None, "k": None, "cos": t["cos"].unsqueeze(0), "sin": t["sin"].unsqueeze(0)}
        args, ignored = _liger_positional(function, values)
        grad_outputs = tuple(heads_first(g) for g in inputs.grad_outputs)
        canonical = lambda outs: tuple(o.transpose(1, 2).squeeze(0) for o in outs)

        def forward():
            return _as_tuple(function.apply(heads_first(t["q"]), heads_first(t["k"]), *args[2:]))

    else:
        if cfg.op in ("swiglu", "geglu"):
            values = {"a": t["gate"], "b": t["up"]}
        else:
            gemma = cfg.op == "rms_norm_gemma"
            values = {"X": t["x"], "W": t["weight"], "eps": EPS, "offset": 1.0 if gemma else 0.0,
                      "casting_mode": "gemma" if gemma else "llama", "in_place": False}  # fmt: skip
            if cfg.op == "add_rms_norm":
                values = {"X": t["x"], "R": t["residual"], **{k: v for k, v in values.items() if k != "X"}}
        args, ignored = _liger_positional(function, values)

        def forward():
            return _as_tuple(function.apply(*args))

    note = f"liger_kernel {version}: {function.__module__}.{function.__name__}"
    if ignored:
        note += f" (this version takes no {', '.join(ignored)})"
    return Runner(forward, note, grad_outputs, canonical)


FACTORIES: dict[str, Callable[[Config, Inputs, Settings], Runner]] = {
    "fastsft": _make_fastsft,
    "torch_eager": _make_torch_eager,
    "torch_compile": _make_torch_compile,
    "liger": _make_liger,
}


# --------------------------------------------------------------------------------------------------
# Copy bandwidth, one cell, one config, the sweep
# --------------------------------------------------------------------------------------------------


def measure_copy_bandwidth(settings: Settings) -> dict:
    """dst.copy_(src) of one large bf16 buffer (1 GiB on CUDA): bytes = 2 x size (read + write)."""
    n_bytes = COPY_BYTES_CUDA if settings.device.type == "cuda" else COPY_BYTES_CPU
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed)
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=settings.device).normal_(generator=gen)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm
    time_ms = _common.median_time_ms(
        lambda: dst.copy_(src), settings.device, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms,
        min_reps=settings.min_reps, cpu_reps=settings.cpu_reps,
    )  # fmt: skip
    moved = 2 * n_bytes
    return {"buffer_bytes": n_bytes, "dtype": "bfloat16", "bytes_moved": moved, "time_ms": time_ms,
            "gbps": moved / (time_ms * 1e-3) / 1e9}  # fmt: skip


def _new_entry(name: str, cfg: Config, direction: str, settings: Settings) -> dict:
    family = op_family(cfg.op)
    return {
        "config": asdict(cfg),
        "direction": direction,
        "impl": name,
        "status": "not run",
        "time_ms": None,
        "gbps": None,
        "pct_of_copy": None,
        "bytes": traffic_bytes(cfg, direction, settings.dtype.itemsize),
        "bytes_formula": BYTES_FORMULAS[(family, direction)],
        "peak_gib": None,
        "parity_rel_diff": None,
        "speedup_vs_torch_eager": None,
        "speedup_vs_liger": None,
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


def _warm_call(step: Callable, entry: dict, device: torch.device) -> tuple:
    """First call: compiles / autotunes; its result is kept for the parity check (warnings recorded)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = step()
        _common.synchronize(device)
    entry["warnings"] = list(dict.fromkeys(str(w.message).splitlines()[0][:200] for w in caught))[:3]
    return result


def _measure(name: str, step: Callable, entry: dict, result: tuple, ref: dict, settings: Settings) -> None:
    """Parity of `result` against fastsft's (or store it, for fastsft), then time and peak memory."""
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
    entry["gbps"] = entry["bytes"] / (entry["time_ms"] * 1e-3) / 1e9
    entry["status"] = "ok"


def run_cell(name: str, cfg: Config, settings: Settings, ref: dict) -> list[dict]:
    """One implementation on one config, forward then backward; failures become the entries' status."""
    entries = [_new_entry(name, cfg, direction, settings) for direction in DIRECTIONS]
    inputs = runner = outputs = None
    try:
        # Fresh inputs per implementation: Liger overwrites some of its inputs (see the docstring).
        inputs = make_inputs(cfg, settings)
        runner = FACTORIES[name](cfg, inputs, settings)
    except Unavailable as exc:
        for entry in entries:
            entry["status"] = f"skipped: {exc}"
        return entries
    except Exception as exc:
        for entry in entries:
            entry["status"] = _common.classify_failure(exc)
        inputs = runner = None
        _common.release_memory(settings.device)
        return entries
    fwd_entry, bwd_entry = entries
    fwd_entry["note"] = bwd_entry["note"] = runner.note
    try:
        result = runner.canonical(_warm_call(runner.forward, fwd_entry, settings.device))
        _measure(name, runner.forward, fwd_entry, result, ref, settings)
    except Exception as exc:  # an OOM or a broken baseline must not end the sweep
        fwd_entry["status"] = _common.classify_failure(exc)
    try:
        outputs = runner.forward()  # one recorded graph, differentiated again and again
        grad_outputs = runner.grad_outputs if runner.grad_outputs is not None else inputs.grad_outputs

        def backward() -> tuple:
            return torch.autograd.grad(outputs, inputs.leaves, grad_outputs, retain_graph=True)

        result = _warm_call(backward, bwd_entry, settings.device)
        _measure(name, backward, bwd_entry, result, ref, settings)
    except Exception as exc:
        bwd_entry["status"] = _common.classify_failure(exc)
    inputs = runner = outputs = None  # drops the graph and the closures' references before the next cell
    _common.release_memory(settings.device)
    return entries


def _ratio(num: dict | None, den: dict | None) -> float | None:
    """num's time over den's, both measured; None otherwise."""
    if not num or not den or num.get("time_ms") is None or not den.get("time_ms"):
        return None
    return num["time_ms"] / den["time_ms"]


def derive(cfg: Config, entries: list[dict], copy_gbps: float, judge: bool) -> list[dict]:
    """Per direction: every entry's share of the copy bandwidth and speedups (the baseline's time over its
    own), and fastsft's two DESIGN targets (met: None unless `judge`, i.e. on a GPU: CPU times say nothing)."""
    derived = []
    for direction in DIRECTIONS:
        by_impl = {e["impl"]: e for e in entries if e["direction"] == direction}
        for entry in by_impl.values():
            if entry["gbps"] is not None:
                entry["pct_of_copy"] = 100.0 * entry["gbps"] / copy_gbps
            entry["speedup_vs_torch_eager"] = _ratio(by_impl.get("torch_eager"), entry)
            entry["speedup_vs_liger"] = _ratio(by_impl.get("liger"), entry)
        fast = by_impl.get("fastsft")
        values = {"pct_of_copy": fast["pct_of_copy"] if fast else None,
                  "time_vs_liger": _ratio(fast, by_impl.get("liger"))}  # fmt: skip
        targets = {}
        for key, target in TARGETS.items():
            value = values[key]
            met = None if value is None or not judge else (value >= target["limit"] if target["rule"] == ">=" else
                                              value < target["limit"])  # fmt: skip
            targets[key] = {**target, "value": value, "met": met}
        derived.append({"config": asdict(cfg), "direction": direction, "fastsft_pct_of_copy": values["pct_of_copy"],
                        "fastsft_over_liger_time": values["time_vs_liger"], "targets": targets})  # fmt: skip
    return derived


def _progress(entry: dict) -> str:
    cfg = Config(**entry["config"])
    parts = [f"{cfg.label():<52}", entry["direction"], f"{entry['impl']:<14}", entry["status"]]
    if entry["time_ms"] is not None:
        parts.append(f"{entry['time_ms']:9.4f} ms  {entry['gbps']:8.1f} GB/s")
    if entry["parity_rel_diff"] is not None:
        parts.append(f"rel.diff {entry['parity_rel_diff']:.1e}")
    return "  ".join(parts)


def run_sweep(configs: list[Config], impls: list[str], settings: Settings, copy_gbps: float):
    """(results, derived, the configs measured): every config in turn until SIGTERM (the caller's time limit)."""
    results, derived = [], []

    def run_one(cfg: Config) -> None:
        ref: dict = {}  # fastsft's outputs and gradients on this config's inputs (parity reference)
        entries = []
        for name in impls:
            cell = run_cell(name, cfg, settings, ref)
            for entry in cell:
                print(_progress(entry), flush=True)
            entries += cell
        del ref
        _common.release_memory(settings.device)
        derived.extend(derive(cfg, entries, copy_gbps, judge=settings.device.type == "cuda"))
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
    """Three significant digits without an exponent (GB/s spans 0.001 on a CPU smoke run to 3000 on a GPU)."""
    if value is None or not math.isfinite(value):
        return None
    digits = 2 - math.floor(math.log10(abs(value))) if value else 0
    return f"{value:.{max(0, digits)}f}"


def _target_cell(target: dict) -> str:
    if target["value"] is None:
        return ""
    mark = "" if target["met"] is None else (" ✓" if target["met"] else " ✗")
    return _sig3(target["value"]) + mark


def _main_table(payload: dict) -> str:
    headers = ["op", "dir", "model", "shape", "impl", "ms", "GB/s", "% of copy", "× vs torch_eager", "× vs liger",
               "peak GiB", "rel. diff to fastsft"]  # fmt: skip
    rows = []
    for e in payload["results"]:
        cfg = Config(**e["config"])
        head = [cfg.op, e["direction"], cfg.model, cfg.shape(), e["impl"]]
        if e["status"] != "ok":
            rows.append([*head, _short_status(e), *[None] * 6])
            continue
        rows.append([
            *head, _num(e["time_ms"], ".4f"), _sig3(e["gbps"]), _sig3(e["pct_of_copy"]),
            _num(e["speedup_vs_torch_eager"], ".2f"), _num(e["speedup_vs_liger"], ".2f"), _num(e["peak_gib"], ".3f"),
            "(ref)" if e["impl"] == "fastsft" else _num(e["parity_rel_diff"], ".1e"),
        ])  # fmt: skip
    return _common.markdown_table(headers, rows)


def _targets_table(payload: dict) -> str:
    limits = {key: t["limit"] for key, t in TARGETS.items()}
    headers = ["op", "dir", "model", "shape", f"fastsft % of copy (≥ {limits['pct_of_copy']:g})",
               f"fastsft / liger time (< {limits['time_vs_liger']:g})"]  # fmt: skip
    rows = []
    for d in payload["derived"]:
        cfg = Config(**d["config"])
        targets = d["targets"]
        rows.append([cfg.op, d["direction"], cfg.model, cfg.shape(), _target_cell(targets["pct_of_copy"]),
                     _target_cell(targets["time_vs_liger"])])  # fmt: skip
    return _common.markdown_table(headers, rows)


def render_markdown(payload: dict) -> str:
    meta, s, copy = payload["metadata"], payload["settings"], payload["copy_bandwidth"]
    if s["device"] == "cuda":
        timing = (f"triton.testing.do_bench median (warmup {s['warmup_ms']:g} ms, repetitions over at least "
                  f"{s['rep_ms']:g} ms and {s['min_reps']} calls, L2 flushed between calls)")  # fmt: skip
    else:
        timing = f"time.perf_counter median of {s['cpu_reps']} calls (smoke run without CUDA: no speed data)"
    formulas = [f"  - {family} {direction}: `{formula}`" for (family, direction), formula in BYTES_FORMULAS.items()]
    parts = [
        "# Elementwise ops (RoPE, RMSNorm, SwiGLU / GeGLU), forward and backward",
        "",
        *_common.metadata_lines(meta),
        f"- inputs: {s['dtype']}, random (seed {s['seed']}), eps {s['eps']:g}; timing: {timing}",
        f"- copy bandwidth (same run): {copy['gbps']:.1f} GB/s — `dst.copy_(src)`, "
        f"{copy['buffer_bytes'] >> 20} MiB bf16, bytes = 2 x size, {copy['time_ms']:.4f} ms",
        "- GB/s = the op's minimum traffic (the same bytes for every implementation; e = activation element size, "
        "rstd fp32) / time; fwd = one forward with autograd recording, bwd = `torch.autograd.grad` of one "
        "recorded forward (all input gradients). × vs X = X's time / this row's time (> 1: this row is faster).",
        *formulas,
        "- targets (DESIGN.md): fastsft ≥ 80% of the copy bandwidth and faster than Liger, forward and backward "
        "(stated for RoPE, RMSNorm, SwiGLU; applied to their siblings too). ✓ / ✗ where measured on a GPU.",
        "",
        "## Every measurement",
        "",
        _main_table(payload),
        "",
        "## fastsft against the targets",
        "",
        _targets_table(payload),
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
    """One row per op, fwd and bwd side by side: % of copy bandwidth, groups = shapes, bars = implementations."""
    impls, grid = payload["settings"]["impls"], []
    for op in payload["settings"]["ops"]:
        row = []
        for direction in DIRECTIONS:
            entries = [e for e in payload["results"] if e["config"]["op"] == op and e["direction"] == direction]
            configs = list(dict.fromkeys(Config(**e["config"]) for e in entries))
            if not configs:
                continue
            by_cell = {(Config(**e["config"]), e["impl"]): e for e in entries}
            groups = [f"{c.model}\nT={c.tokens}" for c in configs]
            series = {name: [by_cell[(c, name)]["pct_of_copy"] for c in configs] for name in impls}
            marks = {(name, i): _short_status(by_cell[(c, name)]) for i, c in enumerate(configs) for name in impls
                     if _is_failure(by_cell[(c, name)]["status"])}  # fmt: skip
            row.append(_common.BarPanel(f"{op} {direction}", "% of copy bandwidth", groups, series, False, marks))
        if row:
            grid.append(row)
    return grid


def write_outputs(payload: dict, out_dir: Path) -> list[Path]:
    meta, s = payload["metadata"], payload["settings"]
    title = (f"elementwise ops, effective bandwidth as % of copy ({payload['copy_bandwidth']['gbps']:.0f} GB/s): "
             f"{meta['gpu']}, {s['dtype']}, git {meta['git_revision']}")  # fmt: skip
    return _common.write_result_files(payload, out_dir, render_markdown(payload), _panels(payload), title)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="RoPE / RMSNorm / SwiGLU / GeGLU fwd and bwd: fastsft vs torch eager, torch.compile, Liger.",
        epilog="Writes elementwise_<gpu>_<date>.{json,md,png} into --out.",
    )
    parser.add_argument("--op", nargs="+", choices=OPS, help="ops to run (default all)")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"tokens T (default {' '.join(map(str, FULL_TOKENS))})")
    parser.add_argument(
        "--model", nargs="+", choices=FULL_MODELS, help=f"model shapes (default {' '.join(FULL_MODELS)})"
    )
    parser.add_argument("--impl", nargs="+", choices=IMPLS, help="implementations to run (default all)")
    parser.add_argument("--quick", action="store_true", help="T=16384, Llama-3-8B shapes (+ Qwen3 q/k-norm)")
    _common.add_run_options(parser)
    args = parser.parse_args(argv)
    for tokens in args.tokens or ():
        if tokens < 1:
            parser.error(f"--tokens values must be >= 1, got {tokens}")
    return args


def make_configs(args: argparse.Namespace) -> list[Config]:
    """The sweep: explicit flags win over --smoke / --quick shapes, which win over the full sweep."""
    if args.smoke:
        tokens, models, qk_model = SMOKE_TOKENS, ("smoke",), ("smoke", MODELS["smoke"])
    else:
        tokens = QUICK_TOKENS if args.quick else FULL_TOKENS
        models = QUICK_MODELS if args.quick else FULL_MODELS
        qk_model = (QK_NORM_MODEL, QK_NORM_SHAPE)
        models = args.model or models
    tokens = args.tokens or tokens
    configs = []
    for op in args.op or OPS:
        if op == "qk_norm":
            name, m = qk_model
            configs += [Config(op, name, t, t * m["hq"], m["d"], hq=m["hq"]) for t in tokens]
            continue
        for name in models:
            m = MODELS[name]
            for t in tokens:
                if op == "rope":
                    configs.append(Config(op, name, t, t, m["d"], hq=m["hq"], hk=m["hk"]))
                else:
                    configs.append(Config(op, name, t, t, m["i"] if op in ("swiglu", "geglu") else m["h"]))
    return configs


def make_settings(args: argparse.Namespace) -> Settings:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Tiny smoke shapes: one thread. Several (OpenMP pools of torch and of torch.compile's kernels)
        # spin against each other on a small machine and turn 0.2 ms calls into 50 ms ones.
        torch.set_num_threads(1)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    skip_compile = None
    if args.smoke and not (args.impl and "torch_compile" in args.impl):
        skip_compile = "--smoke does not compile (minutes per shape on CPU); name it with --impl to run it"
    return Settings(device, dtype, args.smoke, args.seed, args.warmup_ms, args.rep_ms, args.min_reps, skip_compile)


def build_payload(configs, impls, settings, copy, results, derived) -> dict:
    return {
        "benchmark": "elementwise",
        "description": "RoPE / RMSNorm / SwiGLU / GeGLU forward and backward (see bench_elementwise.py docstring)",
        "metadata": _common.collect_metadata(),
        "settings": {
            "device": settings.device.type,
            "dtype": str(settings.dtype).removeprefix("torch."),
            "element_size": settings.dtype.itemsize,
            "smoke": settings.smoke,
            "seed": settings.seed,
            "warmup_ms": settings.warmup_ms,
            "rep_ms": settings.rep_ms,
            "min_reps": settings.min_reps,
            "cpu_reps": settings.cpu_reps,
            "eps": EPS,
            "impls": impls,
            "ops": list(dict.fromkeys(c.op for c in configs)),
            "sweep": {
                "tokens": list(dict.fromkeys(c.tokens for c in configs)),
                "models": list(dict.fromkeys(c.model for c in configs)),
            },
        },
        "copy_bandwidth": copy,
        "bytes_formulas": {f"{family} {direction}": f for (family, direction), f in BYTES_FORMULAS.items()},
        "targets": TARGETS,
        "results": results,
        "derived": derived,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print(
            "bench_elementwise.py needs a CUDA GPU (none is visible to torch). Run it on a GPU machine, or pass "
            "--smoke for a tiny CPU run through the Triton interpreter that checks the script only.",
            file=sys.stderr,
        )
        return 2
    settings = make_settings(args)
    configs = make_configs(args)
    impls = [name for name in IMPLS if args.impl is None or name in args.impl]
    print(f"{len(configs)} configs x {len(impls)} implementations x fwd/bwd on {_common.gpu_name()}, {settings.dtype}")
    copy = measure_copy_bandwidth(settings)
    _common.release_memory(settings.device)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['buffer_bytes'] >> 20} MiB bf16, {copy['time_ms']:.4f} ms)")
    results, derived, done = run_sweep(configs, impls, settings, copy["gbps"])
    payload = build_payload(configs, impls, settings, copy, results, derived)  # the sweep asked for
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
