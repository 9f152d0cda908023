"""Row-wise cross-entropy over logits rows in Triton: loss and (optionally) the logits gradient.

One program handles one row of V logits in BLOCK_V slices, in two passes:
  pass 1 (always): online log-sum-exp in fp32 -> per-row loss;
  pass 2 (COMPUTE_GRAD): d loss / d logits, scaled by the row's gradient factor, written in place or
  to a separate buffer.

Math per supervised row with target y (z = softcap(x) = c * tanh(x / c) when a cap c is set, else x):
  lse   = log(sum_v exp(z_v))
  loss  = lse - (1 - eps) * z_y - eps / V * sum_v z_v + zl * lse^2
  dz_v  = softmax(z)_v * (1 + 2 * zl * lse) - eps / V - (1 - eps) * [v == y]
  dx_v  = dz_v * (1 - (z_v / c)^2)            (softcap chain rule; dx = dz without a cap)
with eps = label_smoothing (PyTorch's definition) and zl = the z-loss coefficient.
Rows whose label is ignore_index get loss 0 and a zero gradient.

The same kernel serves fused_linear_cross_entropy, which runs it over a chunk of rows that were sorted
so that supervised rows come first (HAS_ROW_IDS): a program whose position is past the device-side
count of supervised rows exits at once, so no host synchronisation is needed to skip prompt rows.
"""

import torch
import triton
import triton.language as tl

from ._common import cast_rounded, interpreting


@triton.jit
def softcap_logits(x, cap):
    """cap * tanh(x / cap), with tanh written through exp so it runs identically in the interpreter and
    on the GPU; saturates correctly at +-inf (exp overflow -> +-1). Absolute error ~cap * 1e-7."""
    t = 1.0 - 2.0 / (tl.exp(2.0 * (x / cap)) + 1.0)
    return cap * t


@triton.jit
def _cross_entropy_rows_kernel(
    LOGITS_ptr,
    logits_row_stride,
    LABELS_ptr,
    ROW_IDS_ptr,
    NUM_ROWS_ptr,
    row_offset,
    LOSS_ptr,
    GRAD_ptr,
    grad_row_stride,
    ROW_SCALE_ptr,
    row_scale_stride,
    n_vocab,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_ROW_IDS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    local_row = tl.program_id(0).to(tl.int64)
    if HAS_ROW_IDS:
        # Local row r is position row_offset + r of the permutation ROW_IDS (supervised rows first);
        # positions at or past *NUM_ROWS_ptr are ignored rows and need no work at all.
        position = row_offset + local_row
        if position >= tl.load(NUM_ROWS_ptr):
            return
        row = tl.load(ROW_IDS_ptr + position).to(tl.int64)
    else:
        row = local_row
    logits_row = LOGITS_ptr + local_row * logits_row_stride
    grad_row = GRAD_ptr + local_row * grad_row_stride
    label = tl.load(LABELS_ptr + row).to(tl.int64)

    if label == ignore_index:
        tl.store(LOSS_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(grad_row + cols, tl.zeros([BLOCK_V], GRAD_ptr.dtype.element_ty), mask=cols < n_vocab)
        return

    # Pass 1: online max / sum-exp in fp32 (logits may be bf16; fp32 keeps lse exact to ~1e-7).
    running_max = float("-inf")
    running_sum = 0.0
    sum_logits = 0.0
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < n_vocab
        z = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap_logits(z, softcap)
        sum_logits += tl.sum(tl.where(in_vocab, z, 0.0), axis=0)
        z = tl.where(in_vocab, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        # While every logit so far is -inf (e.g. a masked vocabulary slice) shift by 0, not by -inf:
        # exp(-inf - -inf) would be NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    z_target = tl.load(logits_row + label).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = softcap_logits(z_target, softcap)
    loss = lse - (1.0 - label_smoothing) * z_target + z_loss * lse * lse
    if label_smoothing > 0.0:  # a -inf logit makes sum_logits -inf: 0 * -inf would be NaN
        loss -= label_smoothing * sum_logits / n_vocab
    tl.store(LOSS_ptr + row, loss)

    if COMPUTE_GRAD:
        # Pass 2: each element is read before it is written by this same program, so GRAD_ptr may
        # alias LOGITS_ptr (fused_linear_cross_entropy turns its logits workspace into dlogits in place).
        scale = tl.load(ROW_SCALE_ptr + row * row_scale_stride).to(tl.float32)
        softmax_coef = 1.0 + 2.0 * z_loss * lse
        uniform = label_smoothing / n_vocab
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_vocab = cols < n_vocab
            z = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap_logits(z, softcap)
            dz = tl.exp(z - lse) * softmax_coef - uniform
            dz -= tl.where(cols == label, 1.0 - label_smoothing, 0.0)
            if HAS_SOFTCAP:
                capped = z / softcap
                dz = dz * (1.0 - capped * capped)
            grad = cast_rounded(dz * scale, GRAD_ptr.dtype.element_ty, FIX_BF16_ROUNDING)
            tl.store(grad_row + cols, grad, mask=in_vocab)


def _block_v(n_vocab: int) -> int:
    if interpreting():
        # ~3 slices per row: small test vocabularies still cross slice boundaries, large ones stay fast.
        return max(16, min(4096, triton.next_power_of_2(triton.cdiv(n_vocab, 3))))
    return min(4096, triton.next_power_of_2(n_vocab))


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_losses: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
    num_rows: torch.Tensor | None = None,
    row_offset: int = 0,
) -> None:
    """Launch the row kernel over the rows of `logits`.

    logits     [R, V] fp32/fp16/bf16, unit stride along V.
    labels     [N] integer; row_losses [N] fp32 (written: loss of each processed row).
    grad       None, or [R, V] (any float dtype, unit stride along V; may be `logits` itself): receives
               row_scale[row] * d loss_row / d logits_row.
    row_scale  0-dim (one factor for all rows) or [N] fp32.
    row_ids    None: logits row r is row r of labels/row_losses (R == N). Otherwise an index [N] and
               `num_rows` a 0-dim int32 device tensor: logits row r is row row_ids[row_offset + r], and
               positions >= num_rows are skipped (sorted-out ignored rows).
    """
    n_rows, n_vocab = logits.shape
    if n_rows == 0:
        return
    compute_grad = grad is not None
    has_row_ids = row_ids is not None
    _cross_entropy_rows_kernel[(n_rows,)](
        LOGITS_ptr=logits,
        logits_row_stride=logits.stride(0),
        LABELS_ptr=labels,
        ROW_IDS_ptr=row_ids if has_row_ids else labels,
        NUM_ROWS_ptr=num_rows if has_row_ids else labels,
        row_offset=row_offset,
        LOSS_ptr=row_losses,
        GRAD_ptr=grad if compute_grad else logits,
        grad_row_stride=grad.stride(0) if compute_grad else 0,
        ROW_SCALE_ptr=row_scale if compute_grad else row_losses,
        row_scale_stride=(row_scale.stride(0) if row_scale.dim() == 1 else 0) if compute_grad else 0,
        n_vocab=n_vocab,
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=float(softcap) if softcap is not None else 1.0,
        HAS_ROW_IDS=has_row_ids,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=_block_v(n_vocab),
        FIX_BF16_ROUNDING=interpreting(),
        num_warps=1 if interpreting() else 8,
    )
