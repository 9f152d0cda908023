"""Compile every Triton kernel for real GPU targets on a machine without a GPU (run as a script).

The interpreter accepts code the GPU compiler rejects (loop-carried type changes, unsupported ops), so
the CPU suite also compiles each kernel, with its real GPU block sizes, down to a cubin for Ampere
(sm_80) and Hopper (sm_90) with Triton's bundled ptxas. Prints one JSON line per compile.
Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions at import time).
"""

import json
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from fastsft.kernels import activations as act  # noqa: E402
from fastsft.kernels import attention as attn  # noqa: E402
from fastsft.kernels import cross_entropy as ce  # noqa: E402
from fastsft.kernels import linear_cross_entropy as lce  # noqa: E402
from fastsft.kernels import rms_norm as rms  # noqa: E402
from fastsft.kernels import rope  # noqa: E402

I64_SCALARS = {"row_offset", "chunk_start"}
FP32_SCALARS = {"label_smoothing", "z_loss", "softcap", "eps", "offset", "qk_scale", "softcap_log2", "grad_scale"}


def signature(kernel, pointer_types: dict, default_pointer: str) -> dict:
    """Triton signature from the kernel's parameter names: X_ptr -> pointer, *_stride and row offsets
    -> i64, float options -> fp32, other scalars -> i32, constexprs -> constexpr."""
    sig = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointer_types.get(name, default_pointer)
        elif name.endswith("_stride") or name in I64_SCALARS:
            sig[name] = "i64"
        elif name in FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def alignment(kernel) -> dict:
    """What a real launch tells the compiler: torch's allocations are 16-byte aligned and the strides of
    [T, H, D] tensors with D in (64, 80, 96, 128, 256) are multiples of 16, so Triton specialises every
    pointer and stride as divisible by 16 (vectorised loads and cp.async depend on it)."""
    return {
        (index,): [["tt.divisibility", 16]]
        for index, param in enumerate(kernel.params)
        if not param.is_constexpr and param.name.endswith(("_ptr", "_stride"))
    }


def cases(dtype: str):
    dots = {"DOT_IN_FP32": False, "DOT_IEEE": dtype == "fp32", "FIX_BF16_ROUNDING": False}
    index = {"LABELS_ptr": "i64", "ROW_IDS_ptr": "i64", "NUM_ROWS_ptr": "i32"}
    gemm_launch = lce._GPU_CONFIG["launch"]
    yield (
        ce._cross_entropy_rows_kernel,
        dict(index, LOGITS_ptr=dtype, LOSS_ptr="fp32", ROW_SCALE_ptr="fp32", GRAD_ptr=dtype),
        {"HAS_ROW_IDS": True, "HAS_SOFTCAP": True, "COMPUTE_GRAD": True, "BLOCK_V": 4096, "FIX_BF16_ROUNDING": False},
        {"num_warps": 8},
    )
    yield (
        lce._logits_kernel,
        dict(index, HIDDEN_ptr=dtype, WEIGHT_ptr=dtype, BIAS_ptr=dtype, OUT_ptr="fp32"),
        dict(lce._GPU_CONFIG["logits"], HAS_BIAS=True, DOT_IN_FP32=False, DOT_IEEE=dtype == "fp32"),
        gemm_launch,
    )
    yield (
        lce._grad_hidden_kernel,
        dict(index, DLOGITS_ptr="fp32", WEIGHT_ptr=dtype, GRAD_HIDDEN_ptr=dtype),
        dict(lce._GPU_CONFIG["grad_hidden"], **dots),
        gemm_launch,
    )
    yield (
        lce._grad_weight_kernel,
        dict(index, DLOGITS_ptr="fp32", HIDDEN_ptr=dtype, GRAD_WEIGHT_ptr="fp32", GRAD_BIAS_ptr="fp32"),
        dict(lce._GPU_CONFIG["grad_weight"], COMPUTE_WEIGHT=True, COMPUTE_BIAS=True, **dots),
        gemm_launch,
    )
    yield from elementwise_cases(dtype)
    yield from attention_cases(dtype)


def elementwise_cases(dtype: str):
    """RoPE, RMSNorm and gated activations at the real GPU layouts (Llama-3-8B-like widths)."""
    fix = {"FIX_BF16_ROUNDING": False}
    for head_dim, rotary_dim in ((128, 128), (80, 32), (256, 256)):
        half = rotary_dim // 2
        block_half = 1 << (half - 1).bit_length()
        pass_width = head_dim - rotary_dim
        constexprs = dict(
            HEAD_DIM=head_dim,
            HALF_ROT=half,
            BLOCK_HALF=block_half,
            BLOCK_HQ=rope._block_heads(32, block_half),  # 32 q heads, 8 kv heads: Llama-3-8B
            BLOCK_HK=rope._block_heads(8, block_half),
            BLOCK_PASS=(1 << (pass_width - 1).bit_length()) if pass_width else 0,
            INVERSE=head_dim == 80,
            **fix,
        )
        yield rope._rope_kernel, {"COS_ptr": "fp32", "SIN_ptr": "fp32"}, constexprs, {"num_warps": 4}
    for width in (128, 4096, 20000):  # many rows per tile; one row per tile; chunked
        layout = rms._layout(width)
        num_warps = layout.pop("num_warps")
        pointers = {"W_ptr": "fp32", "RSTD_ptr": "fp32"}
        constexprs = dict(layout, HAS_RESIDUAL=True, **fix)
        yield rms._rms_norm_forward_kernel, pointers, constexprs, {"num_warps": num_warps}
        layout = rms._layout(width, backward=True)
        num_warps = layout.pop("num_warps")
        pointers = {"W_ptr": "fp32", "RSTD_ptr": "fp32", "PARTIAL_GRAD_W_ptr": "fp32"}
        constexprs = dict(layout, HAS_GRAD_SUM=True, COMPUTE_GRAD_W=True, **fix)
        yield rms._rms_norm_backward_kernel, pointers, constexprs, {"num_warps": num_warps}
    config = act._block(14336)
    num_warps = config.pop("num_warps")
    for activation in act.ACTIVATIONS.values():
        for kernel in (act._gated_forward_kernel, act._gated_backward_kernel):
            yield kernel, {}, dict(config, ACTIVATION=activation, **fix), {"num_warps": num_warps}


# (dtype, head dim, options on) for varlen attention: compiles are slow (~5 s each), so every head-dim
# class with every option on (window, softcap and sinks: the most code) in bf16, the plain causal path (no
# sinks) in bf16 and fp16, and fp32 (its own tiles and shared-memory budget; 256 has a class of its own).
ATTENTION_CASES = (
    ("bf16", 64, True),
    ("bf16", 128, True),
    ("bf16", 256, True),
    ("bf16", 128, False),
    ("fp16", 128, False),
    ("fp32", 128, True),
    ("fp32", 256, True),
)
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def attention_cases(dtype: str):
    """Varlen attention kernels at their GPU block sizes and launch shapes."""
    import torch

    dots = {"DOT_IN_FP32": False, "DOT_IEEE": dtype == "fp32", "FIX_BF16_ROUNDING": False}
    index = {
        "CU_SEQLENS_ptr": "i32",
        "BLOCK_DOC_ptr": "i32",
        "BLOCK_CUM_ptr": "i32",
        "LSE_ptr": "fp32",
        "DELTA_ptr": "fp32",
        "SINKS_ptr": "fp32",
        "DSINKS_PARTIAL_ptr": "fp32",
    }
    kernels = {
        "fwd": attn._attention_forward_kernel,
        "grad_kv": attn._attention_grad_kv_kernel,
        "grad_q": attn._attention_grad_q_kernel,
    }
    for case_dtype, head_dim, options in ATTENTION_CASES:
        if case_dtype != dtype:
            continue
        flags = dict(CAUSAL=True, HAS_WINDOW=options, HAS_SOFTCAP=options, HAS_SINKS=options)
        for pass_name, kernel in kernels.items():
            torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
            config = attn.launch_config(head_dim, pass_name, max_seqlen=8192, dtype=torch_dtype)
            launch = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
            constexprs = dict(config, **flags, **dots, HEAD_DIM=head_dim, BLOCK_D=attn.padded_head_dim(head_dim))
            if pass_name != "fwd":
                del constexprs["HAS_SINKS"]  # the sinks' gradient is the delta kernel's work
            yield kernel, index, constexprs, launch
    if dtype == "bf16":
        for has_sinks in (False, True):
            delta_constexprs = {"HEAD_DIM": 128, "HAS_SINKS": has_sinks, "BLOCK_T": 64, "BLOCK_D": 128}
            yield attn._attention_delta_kernel, index, delta_constexprs, {"num_warps": 4}


def main() -> int:
    failures = 0
    for arch in (80, 90):
        for dtype in ("bf16", "fp16", "fp32"):
            for kernel, pointers, constexprs, options in cases(dtype):
                record = {"kernel": kernel.__name__, "arch": arch, "dtype": dtype, "constexprs": constexprs}
                started = time.perf_counter()
                try:
                    sig = signature(kernel, pointers, dtype)
                    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=alignment(kernel))
                    compiled = compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    ptx = compiled.asm["ptx"]
                    record.update(ok=True, wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx, cp_async="cp.async" in ptx)
                    record.update(num_stages=options.get("num_stages", 3))
                    record.update(shared_bytes=compiled.metadata.shared, cubin_bytes=len(compiled.asm["cubin"]))
                    # Cold compile time (source to cubin, ptxas included): what a bare GPU machine pays per variant.
                    record.update(compile_s=round(time.perf_counter() - started, 2))
                except Exception as exc:  # report every failure, not just the first
                    failures += 1
                    record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
                print(json.dumps(record), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
