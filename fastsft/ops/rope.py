"""apply_rope: rotary position embedding of q and k as one torch custom op (Triton or reference).

The op is linear in (q, k), so its backward is the same op with the transposed rotation: only cos and sin
are saved, never q or k, and a double backward works too.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import check_float, describe, select_backend


def _with_unit_dim_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernel takes any strides, but a zero or non-unit stride along the last dim (an expanded grad
    # under torch.compile) would defeat vectorised loads: copy only then.
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("fastsft::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, Hq, D], k [B, T, Hk, D], cos/sin [B or 1, T, R] -> contiguous rotated (q, k)."""
    if select_backend("apply_rope", q) == "reference":
        q_out = reference.rope_rotate(q, cos, sin, inverse=inverse).contiguous()
        k_out = reference.rope_rotate(k, cos, sin, inverse=inverse).contiguous()
        return q_out, k_out
    from fastsft.kernels.rope import rope

    q, k = _with_unit_dim_stride(q), _with_unit_dim_stride(k)
    # A [1, T, R] table serves every batch row through a zero batch stride.
    cos = _with_unit_dim_stride(cos).expand(q.shape[0], -1, -1)
    sin = _with_unit_dim_stride(sin).expand(q.shape[0], -1, -1)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    rope(q, k, cos, sin, q_out, k_out, inverse=inverse)
    return q_out, k_out


@_rope_op.register_fake
def _rope_fake(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup_context(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    grad_q_in, grad_k_in = _rope_op(grad_q, grad_k, cos, sin, not ctx.inverse)
    return grad_q_in, grad_k_in, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def _check(op: str, q, k, cos, sin, batched: bool) -> None:
    token_dims = "B, T" if batched else "T"
    check_float(op, "q", q, 4 if batched else 3, f"[{token_dims}, Hq, D]")
    check_float(op, "k", k, 4 if batched else 3, f"[{token_dims}, Hk, D]")
    check_float(op, "cos", cos, 3 if batched else 2, f"[{token_dims}, R]")
    check_float(op, "sin", sin, 3 if batched else 2, f"[{token_dims}, R]")
    tokens, head_dim = q.shape[:-2], q.shape[-1]
    if k.shape[:-2] != tokens or k.shape[-1] != head_dim:
        want = f"[{token_dims}, Hk, D] = [{', '.join(map(str, tokens))}, Hk, {head_dim}]"
        raise ValueError(f"{op}: k must be {want} like q, got {describe(k)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise TypeError(f"{op}: q and k must share dtype and device; q: {describe(q)}; k: {describe(k)}")
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos and sin must have the same shape; cos: {describe(cos)}; sin: {describe(sin)}")
    table_tokens = cos.shape[:-1]
    if table_tokens[-1] != tokens[-1] or (batched and table_tokens[0] not in (1, tokens[0])):
        want = f"[B or 1, T, R] with B = {tokens[0]}, T = {tokens[1]}" if batched else f"[T, R] with T = {tokens[0]}"
        raise ValueError(f"{op}: cos/sin must have one row per token, {want}, got {describe(cos)}")
    rotary_dim = cos.shape[-1]
    if rotary_dim == 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"{op}: cos/sin width R = {rotary_dim} must be even, > 0 and <= head dim D = {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{op}: {name} requires grad, but apply_rope treats cos/sin as constants; "
                "detach them (HF's rotary embedding computes them under no_grad)"
            )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k in Hugging Face's rotate_half layout, in one launch.

    Args:
        q: [T, Hq, D] float16 / bfloat16 / float32 (float64: reference backend), any strides (views out of
            a fused qkv projection or of a [1, H, T, D] transpose are read in place).
        k: [T, Hk, D], same dtype and device as q; Hk may differ from Hq (GQA).
        cos, sin: [T, R] with R even and R <= D, one row per token (packed documents just carry their own
            positions). R < D is partial rotary: dims R..D of q and k pass through unchanged.

    Returns:
        (q_out [T, Hq, D], k_out [T, Hk, D]), contiguous, in q's dtype:
        out = x * cos + rotate_half(x) * sin on the first R dims, computed in fp32 with one rounding.
        (HF's apply_rotary_pos_emb promotes to cos/sin's dtype when it is wider; fastsft keeps q's.)

    Gradients flow to q and k (the backward is the transposed rotation; only cos/sin are saved). cos and
    sin are treated as constants, like the outputs of HF's rotary embedding (computed under no_grad);
    passing ones that require grad is an error rather than a silently missing gradient.
    """
    _check("apply_rope", q, k, cos, sin, batched=False)
    q_out, k_out = _rope_op(q.unsqueeze(0), k.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0), False)
    return q_out.squeeze(0), k_out.squeeze(0)


def apply_rope_batched(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rope` over a batch: q [B, T, Hq, D], k [B, T, Hk, D], cos/sin [B, T, R] or [1, T, R]
    (one table shared by every row). Any strides, so HF's [B, H, T, D] tensors go in as
    `q.transpose(1, 2)` without a copy. Returns contiguous (q_out [B, T, Hq, D], k_out [B, T, Hk, D])."""
    _check("apply_rope", q, k, cos, sin, batched=True)
    return _rope_op(q, k, cos, sin, False)
