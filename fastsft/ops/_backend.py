"""Backend choice and input validation shared by every op.

FASTSFT_BACKEND (read at each call, so tests and users can switch it at run time):
  auto       Triton on CUDA tensors, reference on CPU.
  triton     The Triton kernels. On CPU tensors this needs TRITON_INTERPRET=1 set before Triton is
             first imported: the kernels then run in Triton's interpreter (how CI checks kernel parity).
  reference  The pure-PyTorch implementation in fastsft/ops/reference.py, on any device.
Any other value is an error (BackendError).
FASTSFT_DEBUG=1 turns on checks that need a host synchronisation on CUDA tensors (label ranges).
"""

from __future__ import annotations

import math
import os

import torch

BACKENDS = ("auto", "triton", "reference")


class BackendError(ValueError):
    """FASTSFT_BACKEND names no backend."""


def check_backend_setting() -> str:
    """The FASTSFT_BACKEND value, checked up front (the command line calls it before any work)."""
    return requested_backend()


def requested_backend() -> str:
    value = os.environ.get("FASTSFT_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise BackendError(f"FASTSFT_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def debug_checks() -> bool:
    return os.environ.get("FASTSFT_DEBUG", "0") == "1"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(op: str, tensor: torch.Tensor) -> str:
    """The implementation `op` runs with for inputs like `tensor` (device and dtype): "triton" or
    "reference". float64 runs on the reference backend only."""
    requested = requested_backend()
    if requested == "reference":
        return "reference"
    if tensor.dtype == torch.float64:
        if requested == "triton":
            raise TypeError(
                f"{op}: the Triton kernels take float16, bfloat16 or float32, got float64; "
                "float64 runs with FASTSFT_BACKEND=reference (or auto)"
            )
        return "reference"
    if requested == "triton":
        if not _triton_importable():
            raise RuntimeError(f"{op}: FASTSFT_BACKEND=triton but triton is not installed (pip install triton)")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"{op}: FASTSFT_BACKEND=triton with {tensor.device.type} tensors needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before triton is first imported, or use FASTSFT_BACKEND=auto"
            )
        return "triton"
    # auto
    return "triton" if tensor.is_cuda and _triton_importable() else "reference"


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got {describe(t)}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {describe(t)}")


def check_labels(op: str, labels: torch.Tensor, n_rows: int, device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor [N], got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"{op}: labels must be [N] with N = {n_rows} (one target per row), got {describe(labels)}")
    if labels.dtype not in (torch.int64, torch.int32):  # narrower types cannot hold ignore_index=-100 alike
        raise TypeError(f"{op}: labels must be an integer tensor (int64 or int32), got {describe(labels)}")
    if labels.device != device:
        raise ValueError(f"{op}: labels is on {labels.device} but the inputs are on {device}")


def check_label_range(op: str, labels: torch.Tensor, n_vocab: int, ignore_index: int) -> None:
    """Every label is ignore_index or in [0, V). Costs a host sync on CUDA, so it runs always on CPU
    tensors, on CUDA only with FASTSFT_DEBUG=1, and never while torch.compile traces."""
    if torch.compiler.is_compiling() or (labels.is_cuda and not debug_checks()):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_vocab))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: labels[{index}] = {int(labels[index])} is outside [0, {n_vocab}) and is not "
            f"ignore_index ({ignore_index}); {int(bad.sum())} such label(s) in all"
        )


def check_options(op: str, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    """The loss options; a non-finite one (nan, inf) would silently make every loss NaN or inf."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:  # also false for nan
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(float(z_loss)) and float(z_loss) >= 0.0):
        raise ValueError(f"{op}: z_loss must be a finite float >= 0, got {z_loss}")
    if softcap is not None and not (math.isfinite(float(softcap)) and float(softcap) > 0.0):
        raise ValueError(f"{op}: softcap must be None or a finite float > 0, got {softcap}")


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows with unit stride along the last dim, as the kernels index them. Applied inside each op's own
    implementation: under torch.compile an op may receive expanded or strided inputs even where the
    eager caller passed contiguous ones."""
    if t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]:
        return t
    return t.contiguous()


def forbid_double_backward(backward_op, op: str) -> None:
    """Register an autograd formula on a backward custom op that fails loudly: differentiating `op`'s
    gradient (create_graph=True, then backward again) is not supported, and without this torch would
    report only that no formula is registered for an internal op."""

    def _fail(ctx, *grads):
        raise RuntimeError(f"fastsft {op}: double backward (differentiating its gradient) is not supported")

    backward_op.register_autograd(_fail, setup_context=lambda ctx, inputs, output: None)
