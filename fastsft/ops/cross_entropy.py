"""cross_entropy and fused_linear_cross_entropy: response-masked losses as torch custom ops.

Both ops are registered with torch.library.custom_op (with fake implementations), so torch.compile
(fullgraph=True) traces through them, and both make no host synchronisation on the CUDA hot path.

fused_linear_cross_entropy computes, for reduction "mean"/"sum", the gradients during the forward
(the loss is a scalar, so d loss / d inputs is known up to the incoming scalar gradient) and scales
them in the backward: the lm_head matmul runs three times in all, like a plain linear forward +
backward, and the [N, V] logits never exist. For reduction "none" the forward returns per-row losses
and the backward recomputes with the per-row incoming gradients.
"""

from __future__ import annotations

import os

import torch

from . import reference
from ._backend import (
    check_float,
    check_label_range,
    check_labels,
    check_options,
    describe,
    select_backend,
    unit_stride_rows,
)

# fp32 logits workspace of the Triton fused linear cross-entropy, per call (see its docstring).
DEFAULT_WORKSPACE_MB = 512


def _workspace_bytes() -> int:
    return int(float(os.environ.get("FASTSFT_FLCE_WORKSPACE_MB", DEFAULT_WORKSPACE_MB)) * (1 << 20))


def _grads_in_forward(reduction: str, dtype: torch.dtype) -> bool:
    """Whether the forward computes the gradients (for a unit incoming gradient).

    Not for "none" (the incoming gradient differs per row) and not for float16: with a loss scaler the
    unit-scale gradients would underflow in fp16 before the scale could be applied, so fp16 recomputes
    in the backward with the real incoming gradient (one more matmul), exactly as torch's fp16 path
    scales its logits gradient.
    """
    return reduction != "none" and dtype != torch.float16


def _scaled(grad: torch.Tensor, factor: torch.Tensor, slice_elements: int = 1 << 24) -> torch.Tensor:
    """grad * factor (0-dim device tensor) with the product in fp32 and one rounding, in slices so the fp32
    temporary stays small. (A plain bf16 * tensor product would round the factor itself to bf16 first:
    a bias of up to 2^-9 whenever factor is, say, 1 / token_count.)"""
    if grad.dtype in (torch.float32, torch.float64) or grad.numel() == 0:
        return grad * factor.to(grad.dtype)
    factor = factor.to(torch.float32)
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    flat_in, flat_out = grad.reshape(-1), out.view(-1)
    for start in range(0, flat_in.numel(), slice_elements):
        stop = start + slice_elements
        flat_out[start:stop].copy_(flat_in[start:stop].float() * factor)
    return out


def _empty(like: torch.Tensor) -> torch.Tensor:
    # custom ops return tensors, never None: an absent gradient is an empty tensor.
    return like.new_empty(0)


def _mean_or_sum_scale(labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """0-dim fp32 factor that turns a sum of row losses into the reduced loss, computed on the device:
    1 / max(#supervised, 1) for "mean" (zero supervised rows -> loss 0, not NaN), 1 for "sum"."""
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=labels.device)
    count = (labels != ignore_index).sum(dtype=torch.int32).clamp(min=1)
    return 1.0 / count.to(torch.float32)


# --------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# --------------------------------------------------------------------------------------------------


def _flce_losses_and_grads(
    hidden, weight, labels, bias, row_scale, *, ignore_index, label_smoothing, z_loss, softcap, needs
):
    """Backend dispatch. Returns (row_losses [N], grad_hidden, grad_weight, grad_bias), the gradients of
    sum_r row_scale[r] * loss_r already in the inputs' dtypes (None where not needed).
    needs: (need_grad_hidden, need_grad_weight, need_grad_bias)."""
    need_grad_hidden, need_grad_weight, need_grad_bias = needs
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    wanted = dict(need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias)
    if select_backend("fused_linear_cross_entropy", hidden) == "reference":
        row_losses, gh, gw, gb = reference.fused_linear_cross_entropy_with_grads(
            hidden, weight, bias, labels, row_scale, **options, **wanted
        )
    else:
        from fastsft.kernels.linear_cross_entropy import linear_cross_entropy

        hidden, weight = unit_stride_rows(hidden), unit_stride_rows(weight)
        bias = bias.contiguous() if bias is not None else None
        labels = labels.contiguous()
        supervised = labels != ignore_index
        # Stable partition, supervised rows first; the kernels read the count from device memory.
        row_ids = torch.sort(supervised.to(torch.int8), descending=True, stable=True).indices
        num_rows = supervised.sum(dtype=torch.int32)
        if row_scale is None:  # losses only
            row_scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        row_scale = row_scale.to(torch.float32).contiguous()
        row_losses, gh, gw, gb = linear_cross_entropy(
            hidden,
            weight,
            bias,
            labels,
            row_ids,
            num_rows,
            row_scale,
            **options,
            **wanted,
            workspace_bytes=_workspace_bytes(),
        )
    # Gradients accumulated in fp32 (or fp64) are cast once, here.
    gh = gh.to(hidden.dtype) if gh is not None else None
    gw = gw.to(weight.dtype) if gw is not None else None
    gb = gb.to(bias.dtype) if gb is not None else None
    return row_losses, gh, gw, gb


@torch.library.custom_op("fastsft::fused_linear_cross_entropy", mutates_args=())
def _flce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad_hidden, grad_weight, grad_bias); the gradients (of the loss, for a unit incoming
    gradient) are computed only where `_grads_in_forward` says and only where needed, else empty."""
    loss_dtype = reference.compute_dtype(hidden.dtype)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if not _grads_in_forward(reduction, hidden.dtype):
        row_losses, *_ = _flce_losses_and_grads(
            hidden, weight, labels, bias, None, **options, needs=(False, False, False)
        )
        if reduction != "none":
            row_losses = row_losses.sum() * _mean_or_sum_scale(labels, ignore_index, reduction)
        return row_losses.to(loss_dtype), _empty(hidden), _empty(weight), _empty(weight)
    scale = _mean_or_sum_scale(labels, ignore_index, reduction)
    needs = (need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None)
    row_losses, gh, gw, gb = _flce_losses_and_grads(hidden, weight, labels, bias, scale, **options, needs=needs)
    loss = (row_losses.sum() * scale).to(loss_dtype)
    return (
        loss,
        gh if gh is not None else _empty(hidden),
        gw if gw is not None else _empty(weight),
        gb if gb is not None else _empty(weight),
    )


@_flce_op.register_fake
def _flce_fake(
    hidden,
    weight,
    labels,
    bias,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
):
    loss_dtype = reference.compute_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=loss_dtype)
    with_grads = _grads_in_forward(reduction, hidden.dtype)
    gh = hidden.new_empty(hidden.shape) if with_grads and need_grad_hidden else _empty(hidden)
    gw = weight.new_empty(weight.shape) if with_grads and need_grad_weight else _empty(weight)
    has_gb = with_grads and need_grad_bias and bias is not None
    gb = bias.new_empty(bias.shape) if has_gb else _empty(weight)
    return loss, gh, gw, gb


@torch.library.custom_op("fastsft::fused_linear_cross_entropy_backward", mutates_args=())
def _flce_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    grad_rows: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_r grad_rows[r] * loss_r (the backward of reduction="none")."""
    needs = (need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None)
    _, gh, gw, gb = _flce_losses_and_grads(
        hidden,
        weight,
        labels,
        bias,
        grad_rows,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        needs=needs,
    )
    return (
        gh if gh is not None else _empty(hidden),
        gw if gw is not None else _empty(weight),
        gb if gb is not None else _empty(weight),
    )


@_flce_backward_op.register_fake
def _flce_backward_fake(
    hidden,
    weight,
    labels,
    bias,
    grad_rows,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
):
    gh = hidden.new_empty(hidden.shape) if need_grad_hidden else _empty(hidden)
    gw = weight.new_empty(weight.shape) if need_grad_weight else _empty(weight)
    gb = bias.new_empty(bias.shape) if need_grad_bias and bias is not None else _empty(weight)
    return gh, gw, gb


def _flce_setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        labels,
        bias,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        need_grad_hidden,
        need_grad_weight,
        need_grad_bias,
    ) = inputs
    _, gh, gw, gb = output
    # The returned gradients are results, not functions of the inputs that autograd could differentiate:
    # marking them makes a double backward fail loudly instead of returning zeros.
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.reduction = reduction
    ctx.needs = (need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None)
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
    ctx.grads_in_forward = _grads_in_forward(reduction, hidden.dtype)
    if ctx.grads_in_forward:
        ctx.save_for_backward(gh, gw, gb)
    else:
        ctx.save_for_backward(hidden, weight, labels, bias)


def _flce_backward(ctx, grad_loss, *_grads_of_grad_outputs):
    need_grad_hidden, need_grad_weight, need_grad_bias = ctx.needs
    if ctx.grads_in_forward:
        # The forward computed the gradients for a unit incoming gradient; scale by the real one (a 0-dim
        # device tensor: no sync), in fp32 with one rounding. Exact when it is 1.
        gh, gw, gb = (_scaled(g, grad_loss) for g in ctx.saved_tensors)
    else:
        hidden, weight, labels, bias = ctx.saved_tensors
        grad_rows = grad_loss
        if ctx.reduction != "none":
            grad_rows = grad_loss.float() * _mean_or_sum_scale(labels, ctx.options[0], ctx.reduction)
        gh, gw, gb = _flce_backward_op(
            hidden,
            weight,
            labels,
            bias,
            grad_rows.contiguous(),
            *ctx.options,
            need_grad_hidden,
            need_grad_weight,
            need_grad_bias,
        )
    # Gradients for (hidden, weight, labels, bias), then none for the eight non-tensor arguments.
    grads = (gh if need_grad_hidden else None, gw if need_grad_weight else None, None, gb if need_grad_bias else None)
    return (*grads, *[None] * 8)


_flce_op.register_autograd(_flce_backward, setup_context=_flce_setup_context)


def check_linear_head_inputs(op: str, hidden, weight, labels, bias, ignore_index: int) -> None:
    """The argument checks of an op on hidden [N, H], an lm_head weight [V, H], labels [N] and a bias [V]: clear
    errors naming `op`, the tensor, its shape and dtype."""
    check_float(op, "hidden", hidden, 2, "[N, H]")
    check_float(op, "weight", weight, 2, "[V, H]")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{op}: hidden is [N, H] = {tuple(hidden.shape)} but weight is [V, H] = {tuple(weight.shape)}: H differs"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{op}: weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary, {describe(weight)}")
    if bias is not None:
        check_float(op, "bias", bias, 1, "[V]")
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"{op}: bias must be [V] = [{weight.shape[0]}] like weight ({weight.dtype}, {weight.device}), "
                f"got {describe(bias)}"
            )
    check_labels(op, labels, hidden.shape[0], hidden.device)
    check_label_range(op, labels, weight.shape[0], ignore_index)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, without materialising the logits.

    Args:
        hidden: [N, H] float16 / bfloat16 / float32 (float64: reference backend only) — the final hidden
            states, one row per token.
        weight: [V, H], same dtype and device as hidden — the lm_head weight.
        labels: [N] int64 or int32, already shifted (labels[i] is the target of row i); ignore_index on
            rows that carry no loss (prompt tokens, document ends, padding).
        bias: optional [V], same dtype as weight.
        reduction: "mean" (sum over supervised rows / their count; 0 when there are none), "sum", or
            "none" ([N], 0 on ignored rows).
        label_smoothing: eps in [0, 1], PyTorch's definition.
        z_loss: coefficient of lse^2 added to each supervised row's loss (PaLM's z-loss).
        softcap: if set, logits become softcap * tanh(logits / softcap) (Gemma-2).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [N] for reduction="none".

    Rows labelled ignore_index never reach the matmul (forward or backward) and get exactly zero
    gradient. On CUDA (Triton backend) the work is done in row chunks through an fp32 workspace of at
    most max(FASTSFT_FLCE_WORKSPACE_MB (default 512) MiB, 16 * V * 4 bytes) plus the fp32 weight-gradient
    accumulator (V * H * 4 bytes, cast once to weight's dtype) and O(N) per-row statistics; no host
    synchronisation. Labels outside [0, V) raise on CPU; on CUDA set FASTSFT_DEBUG=1 to check them
    (a host sync).

    For "mean"/"sum" with grad enabled and bf16/fp32 inputs, the gradients are computed during the forward
    (no recompute in the backward; evaluate under torch.no_grad() to skip that work) and scaled by the
    incoming gradient in fp32. float16 and "none" recompute in the backward with the real incoming
    gradient, so a loss scaler's factor reaches the fp16 gradients before they are rounded.
    """
    check_linear_head_inputs("fused_linear_cross_entropy", hidden, weight, labels, bias, ignore_index)
    check_options("fused_linear_cross_entropy", reduction, label_smoothing, z_loss, softcap)
    grad_on = torch.is_grad_enabled()
    loss, *_ = _flce_op(
        hidden,
        weight,
        labels,
        bias,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return loss


# --------------------------------------------------------------------------------------------------
# cross_entropy (on materialised logits)
# --------------------------------------------------------------------------------------------------


def _ce_rows(logits, labels, row_scale, *, ignore_index, label_smoothing, z_loss, softcap):
    """Backend dispatch: (row_losses [N], dlogits [N, V] in logits' dtype or None when row_scale is None)."""
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if select_backend("cross_entropy", logits) == "reference":
        row_losses, grad = reference.cross_entropy_rows_with_grads(logits, labels, row_scale, **options)
        # contiguous like the fake implementation says, whatever the logits' strides
        return row_losses, (grad.to(logits.dtype).contiguous() if grad is not None else None)
    from fastsft.kernels.cross_entropy import cross_entropy_rows

    logits = unit_stride_rows(logits)
    labels = labels.contiguous()
    row_losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if row_scale is not None else None
    if row_scale is not None:
        row_scale = row_scale.to(torch.float32).contiguous()
    cross_entropy_rows(logits, labels, row_losses, grad=grad, row_scale=row_scale, **options)
    return row_losses, grad


@torch.library.custom_op("fastsft::cross_entropy", mutates_args=())
def _ce_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> torch.Tensor:
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    row_losses, _ = _ce_rows(logits, labels, None, **options)
    row_losses = row_losses.to(reference.compute_dtype(logits.dtype))
    if reduction == "none":
        return row_losses
    return row_losses.sum() * _mean_or_sum_scale(labels, ignore_index, reduction).to(row_losses.dtype)


@_ce_op.register_fake
def _ce_fake(logits, labels, ignore_index, reduction, label_smoothing, z_loss, softcap):
    shape = (logits.shape[0],) if reduction == "none" else ()
    return logits.new_empty(shape, dtype=reference.compute_dtype(logits.dtype))


@torch.library.custom_op("fastsft::cross_entropy_backward", mutates_args=())
def _ce_backward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> torch.Tensor:
    """d (sum_r row_scale[r] * loss_r) / d logits, in logits' dtype; row_scale 0-dim or [N]."""
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    _, grad = _ce_rows(logits, labels, row_scale, **options)
    return grad


@_ce_backward_op.register_fake
def _ce_backward_fake(logits, labels, row_scale, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup_context(ctx, inputs, output):
    logits, labels, ignore_index, reduction, label_smoothing, z_loss, softcap = inputs
    ctx.save_for_backward(logits, labels)
    ctx.reduction = reduction
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap)


def _ce_backward(ctx, grad_loss):
    logits, labels = ctx.saved_tensors
    ignore_index = ctx.options[0]
    if ctx.reduction == "none":
        row_scale = grad_loss
    else:
        row_scale = grad_loss * _mean_or_sum_scale(labels, ignore_index, ctx.reduction).to(grad_loss.dtype)
    grad = _ce_backward_op(logits, labels, row_scale.contiguous(), *ctx.options)
    return grad, None, None, None, None, None, None


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits [N, V] (float16/bfloat16/float32; float64 on the reference backend) against
    labels [N] (int64/int32, ignore_index on unsupervised rows). Same options and loss as
    `fused_linear_cross_entropy`; returns float32 (float64 for float64 logits), a scalar or [N].
    The gradient has logits' dtype and is zero on ignored rows."""
    op = "cross_entropy"
    check_float(op, "logits", logits, 2, "[N, V]")
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: logits has an empty vocabulary, {describe(logits)}")
    check_labels(op, labels, logits.shape[0], logits.device)
    check_options(op, reduction, label_smoothing, z_loss, softcap)
    check_label_range(op, labels, logits.shape[1], ignore_index)
    return _ce_op(
        logits,
        labels,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
    )
