"""rms_norm and add_rms_norm as torch custom ops (Triton or reference backend).

Statistics in fp32 (float64 for float64 inputs); the output in x's dtype; the weight gradient reduced in
fp32 across rows in a fixed order (deterministic run to run) and returned in weight's dtype.
The forward saves x (or the residual sum s), the weight and the per-row rstd [N] fp32.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._backend import check_float, describe, forbid_double_backward, select_backend, unit_stride_rows


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [N, H] rows with unit column stride (a view when the layout allows)."""
    return unit_stride_rows(t.reshape(-1, t.shape[-1]))


def _forward(x, weight, residual, eps, offset):
    """(y, summed or None, rstd) on rows; y/summed in x's layout-free [N, H] form."""
    x_rows = _rows(x)
    residual_rows = _rows(residual) if residual is not None else None
    if select_backend("rms_norm", x) == "reference":
        summed = x_rows + residual_rows if residual_rows is not None else None
        normed_input = summed if summed is not None else x_rows
        y, rstd = reference.rms_norm_rows_forward(normed_input, weight, eps=eps, offset=offset)
        return y, summed, rstd.to(reference.compute_dtype(x.dtype))
    from fastsft.kernels.rms_norm import rms_norm_forward

    y = torch.empty(x_rows.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x_rows.shape[0], dtype=torch.float32, device=x.device)
    summed = torch.empty_like(y) if residual is not None else None
    rms_norm_forward(
        x_rows, weight.contiguous(), y, rstd, eps=eps, offset=offset, residual=residual_rows, summed=summed
    )
    return y, summed, rstd


def _backward(grad_y, normed_input, weight, rstd, grad_summed, offset, need_grad_weight):
    """(grad_x [..., H] in x's dtype, grad_weight [H] in weight's dtype or empty)."""
    shape = normed_input.shape
    x_rows = _rows(normed_input)
    grad_y_rows = _rows(grad_y)
    grad_summed_rows = _rows(grad_summed) if grad_summed is not None else None
    if select_backend("rms_norm", normed_input) == "reference":
        grad_x, grad_w = reference.rms_norm_rows_with_grads(
            grad_y_rows,
            x_rows,
            weight,
            rstd,
            offset=offset,
            grad_summed=grad_summed_rows,
            need_grad_weight=need_grad_weight,
        )
    else:
        from fastsft.kernels.rms_norm import rms_norm_backward

        grad_x = torch.empty(x_rows.shape, dtype=normed_input.dtype, device=normed_input.device)
        grad_w = rms_norm_backward(
            grad_y_rows,
            x_rows,
            weight.contiguous(),
            rstd.contiguous(),
            grad_x,
            offset=offset,
            grad_summed=grad_summed_rows,
            compute_grad_weight=need_grad_weight,
        )
    grad_x = grad_x.to(normed_input.dtype).reshape(shape)
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else weight.new_empty(0)
    return grad_x, grad_w


# ------------------------------------------------------------------------------------------------ rms_norm


@torch.library.custom_op("fastsft::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(x, weight, None, eps, offset)
    return y.reshape(x.shape), rstd


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps, offset):
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(x.shape), x.new_empty(n_rows, dtype=reference.compute_dtype(x.dtype))


@torch.library.custom_op("fastsft::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_y: torch.Tensor,
    normed_input: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    grad_summed: torch.Tensor | None,
    offset: float,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of the normalised input [+ grad_summed], grad of weight or empty)."""
    return _backward(grad_y, normed_input, weight, rstd, grad_summed, offset, need_grad_weight)


@_rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(grad_y, normed_input, weight, rstd, grad_summed, offset, need_grad_weight):
    return normed_input.new_empty(normed_input.shape), weight.new_empty(weight.shape if need_grad_weight else 0)


forbid_double_backward(_rms_norm_backward_op, "rms_norm")


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _, offset = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset = offset


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_grad_weight = ctx.needs_input_grad[1]
    grad_x, grad_w = _rms_norm_backward_op(grad_y, x, weight, rstd, None, ctx.offset, need_grad_weight)
    return grad_x, (grad_w if need_grad_weight else None), None, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


# ------------------------------------------------------------------------------------------------ add_rms_norm


@torch.library.custom_op("fastsft::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, summed, rstd = _forward(x, weight, residual, eps, offset)
    return y.reshape(x.shape), summed.reshape(x.shape), rstd


@_add_rms_norm_op.register_fake
def _add_rms_norm_fake(x, residual, weight, eps, offset):
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(n_rows, dtype=reference.compute_dtype(x.dtype))


def _add_rms_norm_setup_context(ctx, inputs, output):
    _, _, weight, _, offset = inputs
    _, summed, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(summed, weight, rstd)
    ctx.offset = offset


def _add_rms_norm_backward(ctx, grad_y, grad_summed, _grad_rstd):
    summed, weight, rstd = ctx.saved_tensors
    need_grad_weight = ctx.needs_input_grad[2]
    grad_s, grad_w = _rms_norm_backward_op(grad_y, summed, weight, rstd, grad_summed, ctx.offset, need_grad_weight)
    # d s / d x = d s / d residual = identity: both inputs get the same gradient (as torch's add does).
    return grad_s, grad_s, (grad_w if need_grad_weight else None), None, None


_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup_context)


# ------------------------------------------------------------------------------------------------ public


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        got = describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a tensor [..., H], got {got}")
    check_float(op, "x", x, x.dim(), "[..., H]")
    check_float(op, "weight", weight, 1, "[H]")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight is {describe(weight)} but x's last dim is H = {x.shape[-1]}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x has an empty last dim, {describe(x)}")
    # Non-finite scalars would silently give zeros (eps=inf) or NaN (offset=nan) for every row.
    if not (math.isfinite(float(eps)) and float(eps) >= 0.0):
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps}")
    if not math.isfinite(float(offset)):
        raise ValueError(f"{op}: offset must be a finite float, got {offset}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim: y = x / sqrt(mean(x^2) + eps) * (offset + weight).

    Args:
        x: [..., H] float16 / bfloat16 / float32 (float64: reference backend); rows up to any width
            (rows wider than 16k are processed in chunks).
        weight: [H], any float dtype (e.g. fp32 master weights with bf16 activations).
        eps: added to the mean square (HF's variance_epsilon).
        offset: 0 for Llama/Mistral/Qwen; 1.0 for Gemma's (1 + weight) form.

    Returns:
        y [..., H] in x's dtype: statistics and products in fp32, one rounding. (With fp32 weights and bf16
        x, HF's LlamaRMSNorm promotes its output to fp32; fastsft keeps x's dtype, as the next matmul
        wants.)

    The backward returns grad x in x's dtype and grad weight in weight's dtype, reduced in fp32 across rows
    without atomics (the same bits on every run).
    """
    _check("rms_norm", x, weight, eps, offset)
    y, _ = _rms_norm_op(x, weight, float(eps), float(offset))
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one pass: s = x + residual (rounded once to x's dtype, exactly like
    torch's add), y = rms_norm(s, weight, eps, offset=offset).

    Args:
        x, residual: [..., H], same shape, dtype and device.
        weight: [H].

    Returns:
        (y, s), both [..., H] in x's dtype. s is the decoder layer's new residual stream.
    """
    _check("add_rms_norm", x, weight, eps, offset)
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype != x.dtype:
        got = describe(residual) if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise ValueError(f"add_rms_norm: residual must match x ({describe(x)}), got {got}")
    if residual.device != x.device:
        raise ValueError(f"add_rms_norm: residual is on {residual.device} but x is on {x.device}")
    y, summed, _ = _add_rms_norm_op(x, residual, weight, float(eps), float(offset))
    return y, summed
