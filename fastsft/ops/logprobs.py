"""fused_linear_logprobs and per_sequence_sum: per-token and per-sequence log-probabilities of the labels, for
preference tuning (DPO and friends compare sums of completion log-probs between sequences).

fused_linear_logprobs is the fused linear cross-entropy with reduction "none", negated: the same Triton kernels
(forward: row chunks through an fp32 logits workspace, never the [N, V] logits; backward: recomputed with each
row's own incoming gradient, which a preference loss makes different per sequence), the same backends, the same
skipping of unlabelled rows. per_sequence_sum reduces [T] token values to [S] sequence values by cu_seqlens on
the device, without a host synchronisation.
"""

from __future__ import annotations

import torch

from ._backend import describe
from .cross_entropy import _flce_op, check_linear_head_inputs
from .cross_entropy import check_options as _check_options


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T (+ bias))[i, labels[i]] for every row i, without materialising the logits.

    Args:
        hidden: [N, H] float16 / bfloat16 / float32 (float64: reference backend only): final hidden states,
            one row per token.
        weight: [V, H], same dtype and device as hidden: the lm_head weight.
        labels: [N] int64 or int32, already shifted (labels[i] is the token row i predicts); ignore_index on rows
            whose log-prob is not wanted (prompt tokens, document ends).
        bias: optional [V], same dtype as weight.
        softcap: if set, the logits are softcap * tanh(logits / softcap) first (Gemma-2's final softcap).

    Returns:
        [N] float32 (float64 for float64 inputs): the label's log-probability (<= 0), exactly 0 on ignored rows
        (which never reach the matmul and get zero gradient). Differentiable w.r.t. hidden, weight and bias, each
        row with its own incoming gradient.
    """
    op = "fused_linear_logprobs"
    check_linear_head_inputs(op, hidden, weight, labels, bias, ignore_index)
    _check_options(op, "none", 0.0, 0.0, softcap)
    grad_on = torch.is_grad_enabled()
    row_losses, *_ = _flce_op(
        hidden,
        weight,
        labels,
        bias,
        int(ignore_index),
        "none",
        0.0,
        0.0,
        None if softcap is None else float(softcap),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return 0.0 - row_losses  # not -row_losses: ignored rows read +0.0, not -0.0


def per_sequence_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum of values [T] over each sequence of a packed row: out[s] = sum(values[cu_seqlens[s]:cu_seqlens[s+1]]).

    Args:
        values: [T] floating (e.g. fused_linear_logprobs' output, or a supervised-token mask as float to count
            each sequence's completion tokens).
        cu_seqlens: [S + 1] int32 / int64 on values' device, 0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = T.

    Returns:
        [S] in values' dtype, differentiable w.r.t. values. The sequence of each token is found on the device
        (searchsorted), so there is no host synchronisation; S comes from cu_seqlens' shape.
    """
    op = "per_sequence_sum"
    if not torch.is_tensor(values) or values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"{op}: values must be a 1-D floating tensor [T], got {_what(values)}")
    if (
        not torch.is_tensor(cu_seqlens)
        or cu_seqlens.dim() != 1
        or cu_seqlens.numel() < 1
        or cu_seqlens.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(f"{op}: cu_seqlens must be a 1-D int32/int64 tensor [S + 1], got {_what(cu_seqlens)}")
    if cu_seqlens.device != values.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but values is on {values.device}")
    sequences = cu_seqlens.numel() - 1
    positions = torch.arange(values.shape[0], device=values.device, dtype=cu_seqlens.dtype)
    # Token t belongs to sequence s with cu_seqlens[s] <= t < cu_seqlens[s + 1]; tokens past cu_seqlens[S] (none
    # in a well-formed row) would land in an extra bucket that is dropped.
    owner = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    sums = values.new_zeros(sequences + 1).index_add(0, owner, values)
    return sums[:sequences]


def _what(x) -> str:
    return describe(x) if torch.is_tensor(x) else type(x).__name__
