"""Rotary position embedding (RoPE) in Triton: q and k of a token rotated together in one launch.

HF's rotate_half layout, per token t and head h, with R = the rotary width (R <= D, R even) and
x = [x1, x2, x_pass] split as [R/2, R/2, D - R]:

    forward:  y1 = x1 * cos1 - x2 * sin1       y2 = x2 * cos2 + x1 * sin2       y_pass = x_pass
    inverse:  y1 = x1 * cos1 + x2 * sin2       y2 = x2 * cos2 - x1 * sin1       y_pass = x_pass

with cos = [cos1, cos2] and sin = [sin1, sin2] the token's row of the [T, R] tables. The forward is
y = x * cos + rotate_half(x) * sin; "inverse" is its transpose (the same linear map's adjoint), which is
both the backward (dL/dx from dL/dy) and, for HF's tables (cos1 == cos2, sin1 == sin2), the inverse
rotation. Nothing but cos/sin is needed for the backward, so q and k are not kept alive for it.

One program handles one token of one batch row (grid [T, B]; packed training has B = 1): it loads the
token's cos/sin row once and sweeps all q heads, then all k heads, in [BLOCK_H, BLOCK_HALF] tiles.
Math in fp32, one rounding to the output dtype. Inputs are read
through arbitrary token/head/dim strides (views out of a fused qkv projection or a [B, H, S, D]
transpose need no copy); outputs are written contiguous [B, T, H, D].
"""

import torch
import triton
import triton.language as tl

from ._common import cast_rounded, interpreting


@triton.jit
def _rotate_heads(
    X_ptr,
    x_token_stride,
    x_head_stride,
    x_dim_stride,
    OUT_ptr,
    token,
    out_token,
    n_heads,
    cos1,
    cos2,
    sin1,
    sin2,
    HEAD_DIM: tl.constexpr,
    HALF_ROT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    INVERSE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    """Rotate the n_heads heads of token `token` of X (already offset to its batch row) into row `out_token`
    of OUT (contiguous [B * T, n_heads, HEAD_DIM])."""
    out_dtype = OUT_ptr.dtype.element_ty
    x_token = X_ptr + token * x_token_stride
    out_token = OUT_ptr + out_token * n_heads * HEAD_DIM
    dims = tl.arange(0, BLOCK_HALF)
    in_half = dims < HALF_ROT
    for head_start in range(0, n_heads, BLOCK_H):
        heads = (head_start + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (heads < n_heads)[:, None] & in_half[None, :]
        x_first = x_token + heads[:, None] * x_head_stride + dims[None, :] * x_dim_stride
        x_second = x_first + HALF_ROT * x_dim_stride
        x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_second, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            y1 = x1 * cos1[None, :] + x2 * sin2[None, :]
            y2 = x2 * cos2[None, :] - x1 * sin1[None, :]
        else:
            y1 = x1 * cos1[None, :] - x2 * sin1[None, :]
            y2 = x2 * cos2[None, :] + x1 * sin2[None, :]
        out_first = out_token + heads[:, None] * HEAD_DIM + dims[None, :]
        tl.store(out_first, cast_rounded(y1, out_dtype, FIX_BF16_ROUNDING), mask=mask)
        tl.store(out_first + HALF_ROT, cast_rounded(y2, out_dtype, FIX_BF16_ROUNDING), mask=mask)
        if BLOCK_PASS > 0:
            # Partial rotary: dims [2 * HALF_ROT, HEAD_DIM) pass through unchanged.
            pass_dims = 2 * HALF_ROT + tl.arange(0, BLOCK_PASS)
            pass_mask = (heads < n_heads)[:, None] & (pass_dims < HEAD_DIM)[None, :]
            x_pass_offsets = heads[:, None] * x_head_stride + pass_dims[None, :] * x_dim_stride
            x_pass = tl.load(x_token + x_pass_offsets, mask=pass_mask, other=0.0)
            tl.store(out_token + heads[:, None] * HEAD_DIM + pass_dims[None, :], x_pass.to(out_dtype), mask=pass_mask)


@triton.jit
def _rope_kernel(
    Q_ptr,
    q_batch_stride,
    q_token_stride,
    q_head_stride,
    q_dim_stride,
    K_ptr,
    k_batch_stride,
    k_token_stride,
    k_head_stride,
    k_dim_stride,
    Q_OUT_ptr,
    K_OUT_ptr,
    COS_ptr,
    cos_batch_stride,
    cos_token_stride,
    cos_dim_stride,
    SIN_ptr,
    sin_batch_stride,
    sin_token_stride,
    sin_dim_stride,
    n_tokens,
    n_q_heads,
    n_k_heads,
    HEAD_DIM: tl.constexpr,
    HALF_ROT: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    INVERSE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # int64: token * stride passes 2^31 at long packed rows
    batch = tl.program_id(1).to(tl.int64)
    out_token = batch * n_tokens + token
    dims = tl.arange(0, BLOCK_HALF)
    in_half = dims < HALF_ROT
    cos_row = COS_ptr + batch * cos_batch_stride + token * cos_token_stride + dims * cos_dim_stride
    sin_row = SIN_ptr + batch * sin_batch_stride + token * sin_token_stride + dims * sin_dim_stride
    cos1 = tl.load(cos_row, mask=in_half, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + HALF_ROT * cos_dim_stride, mask=in_half, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row, mask=in_half, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + HALF_ROT * sin_dim_stride, mask=in_half, other=0.0).to(tl.float32)
    _rotate_heads(
        X_ptr=Q_ptr + batch * q_batch_stride,
        x_token_stride=q_token_stride,
        x_head_stride=q_head_stride,
        x_dim_stride=q_dim_stride,
        OUT_ptr=Q_OUT_ptr,
        token=token,
        out_token=out_token,
        n_heads=n_q_heads,
        cos1=cos1,
        cos2=cos2,
        sin1=sin1,
        sin2=sin2,
        HEAD_DIM=HEAD_DIM,
        HALF_ROT=HALF_ROT,
        BLOCK_H=BLOCK_HQ,
        BLOCK_HALF=BLOCK_HALF,
        BLOCK_PASS=BLOCK_PASS,
        INVERSE=INVERSE,
        FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
    )
    _rotate_heads(
        X_ptr=K_ptr + batch * k_batch_stride,
        x_token_stride=k_token_stride,
        x_head_stride=k_head_stride,
        x_dim_stride=k_dim_stride,
        OUT_ptr=K_OUT_ptr,
        token=token,
        out_token=out_token,
        n_heads=n_k_heads,
        cos1=cos1,
        cos2=cos2,
        sin1=sin1,
        sin2=sin2,
        HEAD_DIM=HEAD_DIM,
        HALF_ROT=HALF_ROT,
        BLOCK_H=BLOCK_HK,
        BLOCK_HALF=BLOCK_HALF,
        BLOCK_PASS=BLOCK_PASS,
        INVERSE=INVERSE,
        FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
    )


# A [BLOCK_H, BLOCK_HALF] fp32 tile per operand: 2048 elements keeps four live tiles (x1, x2, y1, y2)
# in registers at 4 warps; the interpreter prefers few, large tiles.
_TILE_ELEMENTS = 2048


def _block_heads(n_heads: int, block_half: int) -> int:
    if interpreting():
        return triton.next_power_of_2(max(n_heads, 1))
    return max(1, min(triton.next_power_of_2(max(n_heads, 1)), _TILE_ELEMENTS // block_half))


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    *,
    inverse: bool,
) -> None:
    """Launch the RoPE kernel over B rows of T tokens.

    q [B, T, Hq, D], k [B, T, Hk, D]: fp32/fp16/bf16, any strides.
    cos, sin [B, T, R]: any float dtype and strides (batch stride 0 to share one table), R even, R <= D.
    q_out [B, T, Hq, D], k_out [B, T, Hk, D]: contiguous, written (q's dtype).
    inverse: apply the transposed rotation (the backward).
    """
    n_batch, n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[2]
    rotary_dim = cos.shape[2]
    if n_tokens == 0 or n_batch == 0:
        return
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    pass_width = head_dim - rotary_dim
    _rope_kernel[(n_tokens, n_batch)](
        Q_ptr=q,
        q_batch_stride=q.stride(0),
        q_token_stride=q.stride(1),
        q_head_stride=q.stride(2),
        q_dim_stride=q.stride(3),
        K_ptr=k,
        k_batch_stride=k.stride(0),
        k_token_stride=k.stride(1),
        k_head_stride=k.stride(2),
        k_dim_stride=k.stride(3),
        Q_OUT_ptr=q_out,
        K_OUT_ptr=k_out,
        COS_ptr=cos,
        cos_batch_stride=cos.stride(0),
        cos_token_stride=cos.stride(1),
        cos_dim_stride=cos.stride(2),
        SIN_ptr=sin,
        sin_batch_stride=sin.stride(0),
        sin_token_stride=sin.stride(1),
        sin_dim_stride=sin.stride(2),
        n_tokens=n_tokens,
        n_q_heads=n_q_heads,
        n_k_heads=n_k_heads,
        HEAD_DIM=head_dim,
        HALF_ROT=half,
        BLOCK_HQ=_block_heads(n_q_heads, block_half),
        BLOCK_HK=_block_heads(n_k_heads, block_half),
        BLOCK_HALF=block_half,
        BLOCK_PASS=triton.next_power_of_2(pass_width) if pass_width > 0 else 0,
        INVERSE=inverse,
        FIX_BF16_ROUNDING=interpreting(),
        num_warps=1 if interpreting() else 4,
    )
