"""Gated MLP activations in Triton: swiglu = silu(gate) * up and geglu = gelu_tanh(gate) * up.

    silu(g)       = g * sigmoid(g)
    silu'(g)      = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    gelu_tanh(g)  = 0.5 * g * (1 + tanh(u)) = g * sigmoid(2u),   u = sqrt(2/pi) * (g + 0.044715 g^3)
    gelu_tanh'(g) = sigmoid(2u) + g * sigmoid(2u) * (1 - sigmoid(2u)) * 2 * du/dg,
                    du/dg = sqrt(2/pi) * (1 + 3 * 0.044715 g^2)

(The sigmoid form of tanh-GELU is exact algebra and avoids tanh's cancellation near 0.)
forward:  out = act(gate) * up
backward: d_up = dout * act(gate),  d_gate = dout * up * act'(gate)   -- act is recomputed from gate, so
          nothing but gate and up (which the MLP keeps anyway) is saved.
Math in fp32, one rounding per output. Tensors are 2-D [rows, cols] with unit column stride and their own
row strides (gate/up may be the two halves of a fused gate_up projection).
"""

import torch
import triton
import triton.language as tl

from ._common import cast_rounded, interpreting

SILU = 0
GELU_TANH = 1
ACTIVATIONS = {"silu": SILU, "gelu_tanh": GELU_TANH}

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(z):
    # exp(-z) -> inf for very negative z gives exactly 0; -> 0 for large z gives exactly 1.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _activation_and_derivative(g, ACTIVATION: tl.constexpr, COMPUTE_DERIVATIVE: tl.constexpr):
    """(act(g), act'(g)) in fp32; the derivative is 0.0 when not asked for."""
    if ACTIVATION == 0:  # SILU
        s = _sigmoid(g)
        value = g * s
        derivative = 0.0
        if COMPUTE_DERIVATIVE:
            derivative = s * (1.0 + g * (1.0 - s))
    else:  # GELU_TANH
        g2 = g * g
        u = _SQRT_2_OVER_PI * g * (1.0 + _GELU_CUBIC * g2)
        s = _sigmoid(2.0 * u)
        value = g * s
        derivative = 0.0
        if COMPUTE_DERIVATIVE:
            du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * g2)
            derivative = s + g * s * (1.0 - s) * 2.0 * du
    return value, derivative


@triton.jit
def _gated_forward_kernel(
    GATE_ptr,
    gate_row_stride,
    UP_ptr,
    up_row_stride,
    OUT_ptr,
    out_row_stride,
    n_cols,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(GATE_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation_and_derivative(g, ACTIVATION, False)
    out = cast_rounded(act * up, OUT_ptr.dtype.element_ty, FIX_BF16_ROUNDING)
    tl.store(OUT_ptr + row * out_row_stride + cols, out, mask=mask)


@triton.jit
def _gated_backward_kernel(
    GRAD_OUT_ptr,
    grad_out_row_stride,
    GATE_ptr,
    gate_row_stride,
    UP_ptr,
    up_row_stride,
    GRAD_GATE_ptr,
    GRAD_UP_ptr,
    n_cols,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(GRAD_OUT_ptr + row * grad_out_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act, act_derivative = _activation_and_derivative(g, ACTIVATION, True)
    out_offsets = row * n_cols + cols  # grads are contiguous [rows, cols]
    grad_gate = cast_rounded(dout * up * act_derivative, GRAD_GATE_ptr.dtype.element_ty, FIX_BF16_ROUNDING)
    grad_up = cast_rounded(dout * act, GRAD_UP_ptr.dtype.element_ty, FIX_BF16_ROUNDING)
    tl.store(GRAD_GATE_ptr + out_offsets, grad_gate, mask=mask)
    tl.store(GRAD_UP_ptr + out_offsets, grad_up, mask=mask)


def _block(n_cols: int) -> dict:
    if interpreting():
        return dict(BLOCK=max(16, min(1024, triton.next_power_of_2(triton.cdiv(n_cols, 2)))), num_warps=1)
    # 1024 elements per program: 8 per thread at 4 warps (16-byte bf16 vectors, enough loads in flight).
    return dict(BLOCK=min(1024, triton.next_power_of_2(n_cols)), num_warps=4)


def gated_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, *, activation: str) -> None:
    """gate, up [R, C] (unit column stride, any row strides); out [R, C] written = act(gate) * up."""
    n_rows, n_cols = gate.shape
    if n_rows == 0 or n_cols == 0:
        return
    config = _block(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, config["BLOCK"]))
    _gated_forward_kernel[grid](
        GATE_ptr=gate,
        gate_row_stride=gate.stride(0),
        UP_ptr=up,
        up_row_stride=up.stride(0),
        OUT_ptr=out,
        out_row_stride=out.stride(0),
        n_cols=n_cols,
        ACTIVATION=ACTIVATIONS[activation],
        FIX_BF16_ROUNDING=interpreting(),
        **config,
    )


def gated_backward(
    grad_out: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    grad_gate: torch.Tensor,
    grad_up: torch.Tensor,
    *,
    activation: str,
) -> None:
    """grad_out, gate, up [R, C] (unit column stride); grad_gate, grad_up contiguous [R, C] written."""
    n_rows, n_cols = gate.shape
    if n_rows == 0 or n_cols == 0:
        return
    config = _block(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, config["BLOCK"]))
    _gated_backward_kernel[grid](
        GRAD_OUT_ptr=grad_out,
        grad_out_row_stride=grad_out.stride(0),
        GATE_ptr=gate,
        gate_row_stride=gate.stride(0),
        UP_ptr=up,
        up_row_stride=up.stride(0),
        GRAD_GATE_ptr=grad_gate,
        GRAD_UP_ptr=grad_up,
        n_cols=n_cols,
        ACTIVATION=ACTIVATIONS[activation],
        FIX_BF16_ROUNDING=interpreting(),
        **config,
    )
