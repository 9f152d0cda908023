"""Helpers shared by the Triton kernels: interpreter detection and the dot-product wrapper."""

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_config(dtype) -> dict:
    """Constexpr flags for `dot_acc`, chosen from the operands' torch dtype at launch time.

    DOT_IN_FP32: the interpreter's tl.dot returns garbage for bf16 operands (fp32/fp16 are right), so
        when interpreting we upcast bf16 operands to fp32 first: exact, since bf16 -> fp32 is lossless.
    DOT_IEEE: fp32 operands use IEEE fp32 products instead of Triton's default TF32, which would
        cost ~1e-3 relative error and break fp32 parity (~1e-5).
    """
    import torch

    return {
        "DOT_IN_FP32": interpreting() and dtype == torch.bfloat16,
        "DOT_IEEE": dtype == torch.float32,
    }


@triton.jit
def dot_acc(a, b, acc, DOT_IN_FP32: tl.constexpr, DOT_IEEE: tl.constexpr):
    """acc += a @ b with fp32 accumulation (see `dot_config` for the two flags)."""
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if DOT_IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def cast_rounded(x, dtype: tl.constexpr, FIX_BF16_ROUNDING: tl.constexpr):
    """x.to(dtype), rounding to nearest-even as the GPU does.

    The Triton interpreter truncates fp32 -> bf16 (also on stores into bf16 memory), a systematic bias
    that would make CPU parity of bf16 outputs look 2x worse than torch. Under FIX_BF16_ROUNDING (set
    when interpreting) the fp32 bits are rounded here first, so that the truncation is exact.
    """
    if FIX_BF16_ROUNDING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
