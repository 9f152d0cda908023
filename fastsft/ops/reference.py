"""Pure-PyTorch versions of every fastsft op: the CPU fallback and the test oracle.

Two kinds of function live here:

* Differentiable forwards (`cross_entropy`, `fused_linear_cross_entropy`): plain torch code whose
  gradients come from autograd. Tests use them, in float64, as the oracle; nothing here shares code with
  the Triton kernels.
* Loss-and-gradient helpers (`*_with_grads`): the same math with the gradient written out by hand,
  which the `reference` backend runs inside fastsft's custom ops (autograd does not record inside a
  custom op's implementation). Tests check them against autograd of the differentiable forwards.

Computation happens in float32 for half-precision inputs and in float64 for float64 inputs.

Loss of one supervised row with target y, logits x, z = softcap(x) = c * tanh(x / c) (or z = x):
    lse  = logsumexp(z)
    loss = lse - (1 - eps) * z_y - eps * mean(z) + zl * lse^2
which is PyTorch's label-smoothed cross-entropy plus a z-loss term. Rows labelled ignore_index
contribute 0. reduction="mean" divides by the number of supervised rows (0 of them gives a loss of 0,
never NaN), "sum" does not divide, "none" returns one loss per row.
"""

from __future__ import annotations

import torch

# Rows of logits materialised at once by the reference helpers: bounds CPU memory at ~256 MiB of fp32
# for a 128k vocabulary.
_REFERENCE_CHUNK_ELEMENTS = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and single precision, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _softcapped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _reduce(row_losses: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_losses
    total = row_losses.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def _row_losses(logits, labels, ignore_index, label_smoothing, z_loss, softcap):
    """(row_losses [N], z [N, V], lse [N], valid [N], safe_labels [N]) in compute dtype; 0 on ignored rows."""
    z = _softcapped(logits.to(compute_dtype(logits.dtype)), softcap)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).long()
    lse = torch.logsumexp(z, dim=-1)
    z_target = z.gather(1, safe_labels.unsqueeze(1)).squeeze(1)
    row_losses = lse - (1.0 - label_smoothing) * z_target + z_loss * lse * lse
    if label_smoothing > 0.0:  # only then: a -inf logit (a masked token) would make 0 * -inf = NaN
        row_losses = row_losses - label_smoothing * z.mean(dim=-1)
    row_losses = torch.where(valid, row_losses, torch.zeros_like(row_losses))
    return row_losses, z, lse, valid, safe_labels


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
    """Differentiable cross-entropy. logits [N, V] float, labels [N] integer -> scalar (or [N] for "none"),
    in compute_dtype(logits.dtype)."""
    row_losses, _, _, valid, _ = _row_losses(logits, labels, ignore_index, label_smoothing, z_loss, softcap)
    return _reduce(row_losses, valid, reduction)


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
    """Differentiable linear + cross-entropy: hidden [N, H], weight [V, H], bias [V] or None, labels [N].
    Materialises all [N, V] logits (oracle only)."""
    dtype = compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return cross_entropy(
        logits,
        labels,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )


def cross_entropy_rows_with_grads(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_scale: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses [N] and, when row_scale is given (0-dim or [N]), the gradient of
    sum_r row_scale[r] * loss_r with respect to logits [N, V] (in compute dtype; zero on ignored rows)."""
    row_losses, z, lse, valid, safe_labels = _row_losses(
        logits, labels, ignore_index, label_smoothing, z_loss, softcap
    )
    if row_scale is None:
        return row_losses, None
    n_vocab = z.shape[-1]
    dz = torch.exp(z - lse.unsqueeze(1)) * (1.0 + 2.0 * z_loss * lse).unsqueeze(1) - label_smoothing / n_vocab
    dz.scatter_add_(1, safe_labels.unsqueeze(1), torch.full_like(lse, label_smoothing - 1.0).unsqueeze(1))
    if softcap is not None:
        dz = dz * (1.0 - (z / softcap) ** 2)
    scale = row_scale.to(z.dtype)
    scale = scale.unsqueeze(1) if scale.dim() == 1 else scale
    dz = torch.where(valid.unsqueeze(1), dz * scale, torch.zeros_like(dz))
    return row_losses, dz


def fused_linear_cross_entropy_with_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    row_scale: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-row losses [N] and the gradients of sum_r row_scale[r] * loss_r (each in compute dtype, or
    None when not asked for). Only supervised rows are multiplied with the weight, in row chunks that
    keep the logits under ~_REFERENCE_CHUNK_ELEMENTS elements."""
    dtype = compute_dtype(hidden.dtype)
    n_rows, n_vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    row_losses = torch.zeros(n_rows, dtype=dtype, device=hidden.device)
    grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_grad_hidden else None
    grad_weight = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_grad_weight else None
    grad_bias = torch.zeros(n_vocab, dtype=dtype, device=w.device) if need_grad_bias else None
    want_grads = row_scale is not None and (need_grad_hidden or need_grad_weight or need_grad_bias)

    supervised = (labels != ignore_index).nonzero().squeeze(1)  # host sync: fine for the reference
    step = max(1, _REFERENCE_CHUNK_ELEMENTS // max(n_vocab, 1))
    for start in range(0, supervised.numel(), step):
        rows = supervised[start : start + step]
        h = hidden[rows].to(dtype)
        logits = h @ w.T
        if b is not None:
            logits = logits + b
        scale = None
        if want_grads:
            scale = row_scale[rows] if row_scale.dim() == 1 else row_scale
        losses, dz = cross_entropy_rows_with_grads(
            logits,
            labels[rows],
            scale,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        row_losses[rows] = losses
        if dz is None:
            continue
        if grad_hidden is not None:
            grad_hidden[rows] = dz @ w
        if grad_weight is not None:
            grad_weight += dz.T @ h
        if grad_bias is not None:
            grad_bias += dz.sum(dim=0)
    return row_losses, grad_hidden, grad_weight, grad_bias
