"""Helpers shared by the Triton kernels: interpreter detection and the dot-product wrapper."""

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _backport_interpreter_scalar_index() -> None:
    """Interpreter only: let `range(start, end, STEP)` take runtime scalars under Triton 3.6 with numpy >= 2.4.

    The interpreter holds every scalar (a runtime int argument, program_id, a loaded value) as a 1-element
    numpy array, and turns one into a Python int (what Python's `range` and `tl.range` need for a runtime
    bound) with int(array). Triton 3.6 does that on the array itself, which numpy >= 2.4 refuses for arrays
    that are not 0-d, so every loop with a runtime bound fails; 3.9 squeezes first (triton-lang/triton#9172).
    No kernel-side spelling avoids it at no compiled cost: tl.range, tl.cast and arithmetic all end in the
    same conversion, and a while loop compiles to scf.while, which the pipeliner does not software-pipeline.
    So, only when the installed interpreter shows the failure, its per-launch patch of tl.tensor is
    wrapped to convert as 3.9 does. Compiled kernels never pass through here.
    """
    import operator
    import types
    import warnings

    import numpy as np
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    class Probe:  # a stand-in tl.tensor holding a scalar the way the interpreter does
        handle = types.SimpleNamespace(data=np.zeros(1, dtype=np.int32))

    patch_tensor(Probe, types.SimpleNamespace(set_attr=setattr))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # numpy 1.25-2.3 warns where 2.4 refuses
            operator.index(Probe())
        return  # this Triton / numpy pair converts scalars already
    except (TypeError, DeprecationWarning):
        pass

    def patch_tensor_squeezing_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_squeezing_index


if interpreting():
    _backport_interpreter_scalar_index()


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
