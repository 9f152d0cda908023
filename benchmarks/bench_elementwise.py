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
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import _common
import torch
import torch.nn.functional as F

_common.use_interpreter_without_cuda("--smoke")  # before anything imports triton

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

# ARCHITECTURE.md, "Performance targets": RoPE, RMSNorm, SwiGLU fwd and bwd at >= 80% of the measured copy
# bandwidth and faster than Liger. Applied here to their siblings too (offset / fused-add / q-k norms, GeGLU).
TARGETS = {
    "pct_of_copy": {"limit": 80.0, "rule": ">="},
    "time_vs_liger": {"limit": 1.0, "rule": "<"},
}
Unavailable = _common.Unavailable


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


def make_inputs(cfg: Config, settings: _common.Settings) -> Inputs:
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


@dataclass
class Runner:
    forward: Callable[[], tuple]  # one forward from the inputs (autograd records it); a tuple of outputs
    note: str
    grad_outputs: tuple | None = None  # in forward()'s output layout; None: the Inputs' own
    canonical: Callable[[tuple], tuple] | None = None  # outputs in fastsft's layout (parity); None: as they are


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


def _make_fastsft(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
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


def _make_torch_eager(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
    fn, names = HF_FUNCTIONS[cfg.op]
    args = [inputs.tensors[name] for name in names]
    return Runner(lambda: _common.as_tuple(fn(*args)), f"HF's code, eager ({fn.__name__})")


def _make_torch_compile(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
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
    compiled = _common.compiled(fn, (cfg, settings.dtype, settings.device))
    note = f"torch.compile({fn.__name__}, dynamic=False), default backend"
    return Runner(lambda: _common.as_tuple(compiled(*args)), note)


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


def _make_liger(cfg: Config, inputs: Inputs, settings: _common.Settings) -> Runner:
    function = _liger_function(cfg.op)
    t = inputs.tensors
    version = _common.package_version(*_common.PACKAGES["liger_kernel"])
    grad_outputs = canonical = None
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
            return _common.as_tuple(function.apply(heads_first(t["q"]), heads_first(t["k"]), *args[2:]))

    else:
        if cfg.op in ("swiglu", "geglu"):
            values = {"a": t["gate"], "b": t["up"]}
        else:
            gemma = cfg.op == "rms_norm_gemma"
            values = {"X": t["x"], "W": t["weight"], "eps": EPS, "offset": 1.0 if gemma else 0.0}
            values.update(casting_mode="gemma" if gemma else "llama", in_place=False)
            if cfg.op == "add_rms_norm":
                values = {"X": t["x"], "R": t["residual"], **{k: v for k, v in values.items() if k != "X"}}
        args, ignored = _liger_positional(function, values)

        def forward():
            return _common.as_tuple(function.apply(*args))

    note = f"liger_kernel {version}: {function.__module__}.{function.__name__}"
    if ignored:
        note += f" (this version takes no {', '.join(ignored)})"
    return Runner(forward, note, grad_outputs, canonical)


FACTORIES: dict[str, Callable[[Config, Inputs, _common.Settings], Runner]] = {
    "fastsft": _make_fastsft,
    "torch_eager": _make_torch_eager,
    "torch_compile": _make_torch_compile,
    "liger": _make_liger,
}


def measure_copy_bandwidth(settings: _common.Settings) -> dict:
    """dst.copy_(src) of one large bf16 buffer (1 GiB on CUDA): bytes = 2 x size (read + write)."""
    n_bytes = COPY_BYTES_CUDA if settings.device.type == "cuda" else COPY_BYTES_CPU
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed)
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=settings.device).normal_(generator=gen)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm
    time_ms = settings.median_ms(lambda: dst.copy_(src))
    moved = 2 * n_bytes
    gbps = moved / (time_ms * 1e-3) / 1e9
    return {"buffer_bytes": n_bytes, "dtype": "bfloat16", "bytes_moved": moved, "time_ms": time_ms, "gbps": gbps}


# --------------------------------------------------------------------------------------------------
# The benchmark: entries, cells, bandwidth shares and targets, report
# --------------------------------------------------------------------------------------------------


class Elementwise(_common.KernelBenchmark):
    name = "elementwise"
    title = "Elementwise ops (RoPE, RMSNorm, SwiGLU / GeGLU), forward and backward"
    description = "RoPE / RMSNorm / SwiGLU / GeGLU forward and backward (see bench_elementwise.py docstring)"
    all_impls = IMPLS
    directions = DIRECTIONS
    rate = ("gbps", "bytes", 1e9, "GB/s")

    def smoke_skips(self) -> dict[str, str]:
        return {"torch_compile": "--smoke does not compile (minutes per shape on CPU); name it with --impl to run it"}

    def setup(self) -> None:
        """The copy bandwidth every GB/s is a share of, measured first in the same run."""
        self.copy = copy = measure_copy_bandwidth(self.settings)
        _common.release_memory(self.settings.device)
        mib = copy["buffer_bytes"] >> 20
        print(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({mib} MiB bf16, {copy['time_ms']:.4f} ms)", flush=True)

    def entry_fields(self, name: str, cfg: Config, direction: str) -> dict:
        return {
            "pct_of_copy": None,
            "bytes": traffic_bytes(cfg, direction, self.settings.dtype.itemsize),
            "bytes_formula": BYTES_FORMULAS[(op_family(cfg.op), direction)],
            "speedup_vs_torch_eager": None,
            "speedup_vs_liger": None,
        }

    def build(self, name: str, cfg: Config, shared: None) -> _common.Cell:
        """fwd: one forward with autograd recording; bwd: torch.autograd.grad of one recorded forward,
        again and again (retain_graph)."""
        inputs = make_inputs(cfg, self.settings)  # fresh per implementation: Liger overwrites some inputs
        runner = FACTORIES[name](cfg, inputs, self.settings)
        grad_outputs = runner.grad_outputs if runner.grad_outputs is not None else inputs.grad_outputs

        def backward_step() -> _common.Step:
            outputs = runner.forward()  # the graph every timed call differentiates

            def backward() -> tuple:
                return torch.autograd.grad(outputs, inputs.leaves, grad_outputs, retain_graph=True)

            return _common.Step(backward)

        return _common.Cell(runner.note, [_common.Step(runner.forward, runner.canonical), backward_step])

    def derive(self, cfg: Config, entries: list[dict]) -> list[dict]:
        """Per direction: every entry's share of the copy bandwidth and speedups (the baseline's time over its
        own), and fastsft's two DESIGN targets (met: None unless on a GPU: CPU times say nothing)."""
        derived = []
        for direction in DIRECTIONS:
            by_impl = {e["impl"]: e for e in entries if e["direction"] == direction}
            for entry in by_impl.values():
                if entry["gbps"] is not None:
                    entry["pct_of_copy"] = 100.0 * entry["gbps"] / self.copy["gbps"]
                entry["speedup_vs_torch_eager"] = _common.ratio(by_impl.get("torch_eager"), entry)
                entry["speedup_vs_liger"] = _common.ratio(by_impl.get("liger"), entry)
            fast = by_impl.get("fastsft")
            values = {
                "pct_of_copy": fast["pct_of_copy"] if fast else None,
                "time_vs_liger": _common.ratio(fast, by_impl.get("liger")),
            }
            targets = {}
            for key, target in TARGETS.items():
                value = values[key]
                judged = value is not None and self.on_gpu
                met = _common.meets(value, target["rule"], target["limit"]) if judged else None
                targets[key] = {**target, "value": value, "met": met}
            record = {
                "config": asdict(cfg),
                "direction": direction,
                "fastsft_pct_of_copy": values["pct_of_copy"],
                "fastsft_over_liger_time": values["time_vs_liger"],
                "targets": targets,
            }
            derived.append(record)
        return derived

    def settings_fields(self) -> dict:
        configs = self.configs
        sweep = {
            "tokens": list(dict.fromkeys(c.tokens for c in configs)),
            "models": list(dict.fromkeys(c.model for c in configs)),
        }
        ops = list(dict.fromkeys(c.op for c in configs))
        return {"element_size": self.settings.dtype.itemsize, "eps": EPS, "ops": ops, "sweep": sweep}

    def payload_fields(self) -> dict:
        formulas = {f"{family} {direction}": f for (family, direction), f in BYTES_FORMULAS.items()}
        return {"copy_bandwidth": self.copy, "bytes_formulas": formulas, "targets": TARGETS}

    def summary_lines(self, payload: dict) -> list[str]:
        s, copy = payload["settings"], payload["copy_bandwidth"]
        formulas = [f"  - {family} {direction}: `{f}`" for (family, direction), f in BYTES_FORMULAS.items()]
        return [
            f"- inputs: {s['dtype']}, random (seed {s['seed']}), eps {s['eps']:g}; timing: {_common.timing_line(s)}",
            f"- copy bandwidth (same run): {copy['gbps']:.1f} GB/s — `dst.copy_(src)`, "
            f"{copy['buffer_bytes'] >> 20} MiB bf16, bytes = 2 x size, {copy['time_ms']:.4f} ms",
            "- GB/s = the op's minimum traffic (the same bytes for every implementation; e = activation element "
            "size, rstd fp32) / time; fwd = one forward with autograd recording, bwd = `torch.autograd.grad` of "
            "one recorded forward (all input gradients). × vs X = X's time / this row's time (> 1: this row is "
            "faster).",
            *formulas,
            "- targets (ARCHITECTURE.md): fastsft ≥ 80% of the copy bandwidth and faster than Liger, forward and "
            "backward (stated for RoPE, RMSNorm, SwiGLU; applied to their siblings too). ✓ / ✗ where measured "
            "on a GPU.",
        ]

    def sections(self, payload: dict) -> list[tuple[str, list[str]]]:
        return [
            ("Every measurement", [self.main_table(payload)]),
            ("fastsft against the targets", [_targets_table(payload)]),
        ]

    def main_table(self, payload: dict) -> str:
        headers = ["op", "dir", "model", "shape", "impl", "ms", "GB/s", "% of copy", "× vs torch_eager"]
        headers += ["× vs liger", "peak GiB", "rel. diff to fastsft"]
        rows = []
        for e in payload["results"]:
            cfg = Config(**e["config"])
            head = [cfg.op, e["direction"], cfg.model, cfg.shape(), e["impl"]]
            if e["status"] != "ok":
                rows.append([*head, _common.short_status(e["status"]), *[None] * 6])
                continue
            row = [
                *head,
                _common.num(e["time_ms"], ".4f"),
                _common.sig3(e["gbps"]),
                _common.sig3(e["pct_of_copy"]),
                _common.num(e["speedup_vs_torch_eager"], ".2f"),
                _common.num(e["speedup_vs_liger"], ".2f"),
                _common.num(e["peak_gib"], ".3f"),
                "(ref)" if e["impl"] == "fastsft" else _common.num(e["parity_rel_diff"], ".1e"),
            ]
            rows.append(row)
        return _common.markdown_table(headers, rows)

    def panels(self, payload: dict) -> list[list[_common.BarPanel]]:
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
                marks = _common.failure_marks(((n, i), by_cell[(c, n)]) for i, c in enumerate(configs) for n in impls)
                row.append(_common.BarPanel(f"{op} {direction}", "% of copy bandwidth", groups, series, False, marks))
            if row:
                grid.append(row)
        return grid

    def plot_subject(self, payload: dict) -> str:
        return f"elementwise ops, effective bandwidth as % of copy ({payload['copy_bandwidth']['gbps']:.0f} GB/s)"


def _target_cell(target: dict) -> str:
    if target["value"] is None:
        return ""
    return _common.sig3(target["value"]) + _common.check_mark(target["met"])


def _targets_table(payload: dict) -> str:
    limits = {key: t["limit"] for key, t in TARGETS.items()}
    headers = ["op", "dir", "model", "shape", f"fastsft % of copy (≥ {limits['pct_of_copy']:g})"]
    headers.append(f"fastsft / liger time (< {limits['time_vs_liger']:g})")
    rows = []
    for d in payload["derived"]:
        cfg, targets = Config(**d["config"]), d["targets"]
        pct, liger = _target_cell(targets["pct_of_copy"]), _target_cell(targets["time_vs_liger"])
        rows.append([cfg.op, d["direction"], cfg.model, cfg.shape(), pct, liger])
    return _common.markdown_table(headers, rows)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _common.argument_parser(
        "elementwise", "RoPE / RMSNorm / SwiGLU / GeGLU fwd and bwd: fastsft vs torch eager, torch.compile, Liger."
    )
    parser.add_argument("--op", nargs="+", choices=OPS, help="ops to run (default all)")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"tokens T (default {' '.join(map(str, FULL_TOKENS))})")
    parser.add_argument(
        "--model", nargs="+", choices=FULL_MODELS, help=f"model shapes (default {' '.join(FULL_MODELS)})"
    )
    _common.add_run_options(parser, IMPLS, "T=16384, Llama-3-8B shapes (+ Qwen3 q/k-norm)")
    args = parser.parse_args(argv)
    _common.check_values(parser, "--tokens", args.tokens, lambda t: t >= 1, ">= 1")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return Elementwise(args, make_configs(args)).run()


if __name__ == "__main__":
    sys.exit(main())
