"""RMSNorm (and residual add + RMSNorm) in Triton, forward and backward.

Per row x of width H, with w' = offset + w (offset = 1 for Gemma's (1 + w) form):

    forward:   rstd = 1 / sqrt(mean(x^2) + eps)          (fp32)
               y    = x * rstd * w'                       (fp32, one rounding to x's dtype)
    backward:  x_hat = x * rstd,  g' = dy * w'
               dx   = rstd * (g' - x_hat * mean(g' * x_hat))  (+ d residual-sum, fused variant)
               dw   = sum over rows of dy * x_hat          (fp32)

With a residual (the decoder layer's `h = x + residual; y = norm(h)`), the forward first forms
s = x + residual, rounded once to x's dtype exactly as torch's add rounds it, normalises s and stores
both; the backward adds the incoming gradient of s to dx.

Layout: a program owns a [BLOCK_ROWS, BLOCK_COLS] tile of rows. Narrow rows (Qwen3's per-head q/k norm,
H = 128) pack many rows into one tile; rows wider than one tile (MAX_TILE_COLS) are swept in
NUM_CHUNKS column chunks, twice (statistics, then output).

Determinism: the weight gradient is reduced without atomics. The backward launches a fixed number of
programs (from the device and the row count only); program p accumulates the rows p, p + P, ... in fp32
into its own row of a [P, H] partial buffer, and the caller sums those P rows in a fixed order.
"""

import torch
import triton
import triton.language as tl

from ._common import cast_rounded, interpreting


@triton.jit
def _rms_norm_forward_kernel(
    X_ptr,
    x_row_stride,
    RESIDUAL_ptr,
    residual_row_stride,
    SUM_ptr,
    sum_row_stride,
    W_ptr,
    Y_ptr,
    y_row_stride,
    RSTD_ptr,
    n_rows,
    n_cols,
    eps,
    offset,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    x_dtype = X_ptr.dtype.element_ty

    if NUM_CHUNKS == 1:
        # The whole row block lives in registers: one read, one write.
        cols = tl.arange(0, BLOCK_COLS)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(X_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(RESIDUAL_ptr + rows[:, None] * residual_row_stride + cols[None, :], mask=mask, other=0.0)
            # torch rounds bf16 + bf16 once from the exact (fp32) sum; the norm then sees the rounded sum.
            x = cast_rounded(x.to(tl.float32) + r.to(tl.float32), x_dtype, FIX_BF16_ROUNDING)
            tl.store(SUM_ptr + rows[:, None] * sum_row_stride + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        w = tl.load(W_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
        y = x * rstd[:, None] * w[None, :]
        y_ptrs = Y_ptr + rows[:, None] * y_row_stride + cols[None, :]
        tl.store(y_ptrs, cast_rounded(y, Y_ptr.dtype.element_ty, FIX_BF16_ROUNDING), mask=mask)
    else:
        # Wide rows: pass 1 accumulates the sum of squares chunk by chunk (writing s when fused), pass 2
        # re-reads the row (mostly from L2: it was just read) and writes y.
        sum_squares = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            x = tl.load(X_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r_ptrs = RESIDUAL_ptr + rows[:, None] * residual_row_stride + cols[None, :]
                r = tl.load(r_ptrs, mask=mask, other=0.0)
                x = cast_rounded(x.to(tl.float32) + r.to(tl.float32), x_dtype, FIX_BF16_ROUNDING)
                tl.store(SUM_ptr + rows[:, None] * sum_row_stride + cols[None, :], x, mask=mask)
            x = x.to(tl.float32)
            sum_squares += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(sum_squares / n_cols + eps)
        for chunk in range(NUM_CHUNKS):
            cols = chunk * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            x = tl.load(X_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                # Recomputed rather than read back from SUM_ptr: no ordering between this program's own
                # stores and loads is needed.
                r_ptrs = RESIDUAL_ptr + rows[:, None] * residual_row_stride + cols[None, :]
                r = tl.load(r_ptrs, mask=mask, other=0.0)
                x = cast_rounded(x.to(tl.float32) + r.to(tl.float32), x_dtype, FIX_BF16_ROUNDING)
            w = tl.load(W_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
            y = x.to(tl.float32) * rstd[:, None] * w[None, :]
            y_ptrs = Y_ptr + rows[:, None] * y_row_stride + cols[None, :]
            tl.store(y_ptrs, cast_rounded(y, Y_ptr.dtype.element_ty, FIX_BF16_ROUNDING), mask=mask)
    tl.store(RSTD_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_backward_kernel(
    GRAD_Y_ptr,
    grad_y_row_stride,
    X_ptr,
    x_row_stride,
    W_ptr,
    RSTD_ptr,
    GRAD_SUM_ptr,
    grad_sum_row_stride,
    GRAD_X_ptr,
    grad_x_row_stride,
    PARTIAL_GRAD_W_ptr,
    n_rows,
    n_cols,
    offset,
    HAS_GRAD_SUM: tl.constexpr,
    COMPUTE_GRAD_W: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    program = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_ROWS)
    partial_row = PARTIAL_GRAD_W_ptr + program.to(tl.int64) * n_cols
    grad_x_dtype = GRAD_X_ptr.dtype.element_ty

    if NUM_CHUNKS == 1:
        cols = tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        grad_w = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        for row_block in range(program, n_row_blocks, n_programs):
            # w is reloaded per row block (an L1/L2 hit) rather than held across the loop: at 16k-wide rows
            # keeping it live next to grad_w spills registers.
            w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
            rows = tl.arange(0, BLOCK_ROWS).to(tl.int64) + row_block * BLOCK_ROWS
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            dy_ptrs = GRAD_Y_ptr + rows[:, None] * grad_y_row_stride + cols[None, :]
            dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD_ptr + rows, mask=row_mask, other=0.0)
            x_hat = x * rstd[:, None]
            g = dy * w[None, :]
            mean_g_xhat = tl.sum(g * x_hat, axis=1) / n_cols
            dx = rstd[:, None] * (g - x_hat * mean_g_xhat[:, None])
            if HAS_GRAD_SUM:
                grad_sum_ptrs = GRAD_SUM_ptr + rows[:, None] * grad_sum_row_stride + cols[None, :]
                dx += tl.load(grad_sum_ptrs, mask=mask, other=0.0).to(tl.float32)
            dx_ptrs = GRAD_X_ptr + rows[:, None] * grad_x_row_stride + cols[None, :]
            tl.store(dx_ptrs, cast_rounded(dx, grad_x_dtype, FIX_BF16_ROUNDING), mask=mask)
            if COMPUTE_GRAD_W:
                grad_w += tl.sum(dy * x_hat, axis=0)
        if COMPUTE_GRAD_W:
            tl.store(partial_row + cols, grad_w, mask=col_mask)
    else:
        # Wide rows: pass 1 forms mean(g * x_hat) chunk by chunk; pass 2 writes dx and adds dy * x_hat into
        # this program's own partial row (read-modify-write by one program only: deterministic).
        if COMPUTE_GRAD_W:
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
                tl.store(partial_row + cols, tl.zeros([BLOCK_COLS], dtype=tl.float32), mask=cols < n_cols)
            # The partial row is read back by other threads of this program (load and store layouts may
            # differ): order the zeroing before the first read-modify-write.
            tl.debug_barrier()
        for row_block in range(program, n_row_blocks, n_programs):
            rows = tl.arange(0, BLOCK_ROWS).to(tl.int64) + row_block * BLOCK_ROWS
            row_mask = rows < n_rows
            rstd = tl.load(RSTD_ptr + rows, mask=row_mask, other=0.0)
            sum_g_xhat = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
                col_mask = cols < n_cols
                mask = row_mask[:, None] & col_mask[None, :]
                dy_ptrs = GRAD_Y_ptr + rows[:, None] * grad_y_row_stride + cols[None, :]
                dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
                x_ptrs = X_ptr + rows[:, None] * x_row_stride + cols[None, :]
                x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
                sum_g_xhat += tl.sum(dy * w[None, :] * x * rstd[:, None], axis=1)
            mean_g_xhat = sum_g_xhat / n_cols
            for chunk in range(NUM_CHUNKS):
                cols = chunk * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
                col_mask = cols < n_cols
                mask = row_mask[:, None] & col_mask[None, :]
                dy_ptrs = GRAD_Y_ptr + rows[:, None] * grad_y_row_stride + cols[None, :]
                dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
                x_ptrs = X_ptr + rows[:, None] * x_row_stride + cols[None, :]
                x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
                x_hat = x * rstd[:, None]
                dx = rstd[:, None] * (dy * w[None, :] - x_hat * mean_g_xhat[:, None])
                if HAS_GRAD_SUM:
                    grad_sum_ptrs = GRAD_SUM_ptr + rows[:, None] * grad_sum_row_stride + cols[None, :]
                    dx += tl.load(grad_sum_ptrs, mask=mask, other=0.0).to(tl.float32)
                dx_ptrs = GRAD_X_ptr + rows[:, None] * grad_x_row_stride + cols[None, :]
                tl.store(dx_ptrs, cast_rounded(dx, grad_x_dtype, FIX_BF16_ROUNDING), mask=mask)
                if COMPUTE_GRAD_W:
                    partial = tl.load(partial_row + cols, mask=col_mask, other=0.0)
                    tl.store(partial_row + cols, partial + tl.sum(dy * x_hat, axis=0), mask=col_mask)
                    tl.debug_barrier()  # this store before the next row's read of the same partial row


# Widest row kept whole in registers (fp32 elements per program). Wider rows take the chunked path.
MAX_TILE_COLS = 16384
_CHUNK_COLS = 4096
# Elements per [BLOCK_ROWS, BLOCK_COLS] tile when several narrow rows share a program.
_ROWS_TILE_ELEMENTS = 4096


def _layout(n_cols: int, backward: bool = False) -> dict:
    """Block shape for rows of width n_cols: constexprs and num_warps."""
    if interpreting():
        # Small tiles and a few chunks keep the interpreter fast and still cross chunk boundaries when a
        # test asks for the chunked path (FASTSFT_RMS_NORM_MAX_TILE_COLS in tests, see tile_limit).
        limit = tile_limit()
        block_cols = triton.next_power_of_2(n_cols)
        if block_cols > limit:
            block_cols = triton.next_power_of_2(max(16, limit // 2))
        num_chunks = triton.cdiv(n_cols, block_cols)
        block_rows = max(1, min(16, 256 // block_cols)) if num_chunks == 1 else 1
        return dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, NUM_CHUNKS=num_chunks, num_warps=1)
    block_cols = triton.next_power_of_2(n_cols)
    if block_cols > tile_limit():
        block_cols = _CHUNK_COLS
    num_chunks = triton.cdiv(n_cols, block_cols)
    block_rows = max(1, _ROWS_TILE_ELEMENTS // block_cols) if num_chunks == 1 else 1
    # ~16 fp32 elements of each live tile per thread (the backward holds more live tiles: dy, x, grad_w,
    # so it goes up to 32 warps where the forward stops at 16).
    max_warps = 32 if backward else 16
    num_warps = max(1, min(max_warps, block_rows * block_cols // 512))
    return dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, NUM_CHUNKS=num_chunks, num_warps=num_warps)


def tile_limit() -> int:
    """Widest single tile (MAX_TILE_COLS; tests lower it through FASTSFT_RMS_NORM_MAX_TILE_COLS to reach the
    chunked path at interpreter-friendly widths)."""
    import os

    return int(os.environ.get("FASTSFT_RMS_NORM_MAX_TILE_COLS", MAX_TILE_COLS))


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    rstd: torch.Tensor,
    *,
    eps: float,
    offset: float,
    residual: torch.Tensor | None = None,
    summed: torch.Tensor | None = None,
) -> None:
    """x [N, H] (unit column stride), weight [H], y [N, H] and rstd [N] fp32 written.
    With `residual` [N, H]: normalises s = x + residual, written into `summed` [N, H]."""
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    layout = _layout(n_cols)
    num_warps = layout.pop("num_warps")
    has_residual = residual is not None
    grid = (triton.cdiv(n_rows, layout["BLOCK_ROWS"]),)
    _rms_norm_forward_kernel[grid](
        X_ptr=x,
        x_row_stride=x.stride(0),
        RESIDUAL_ptr=residual if has_residual else x,
        residual_row_stride=residual.stride(0) if has_residual else 0,
        SUM_ptr=summed if has_residual else x,
        sum_row_stride=summed.stride(0) if has_residual else 0,
        W_ptr=weight,
        Y_ptr=y,
        y_row_stride=y.stride(0),
        RSTD_ptr=rstd,
        n_rows=n_rows,
        n_cols=n_cols,
        eps=float(eps),
        offset=float(offset),
        HAS_RESIDUAL=has_residual,
        FIX_BF16_ROUNDING=interpreting(),
        num_warps=num_warps,
        **layout,
    )


def backward_programs(n_rows: int, *, block_rows: int, device: torch.device) -> int:
    """Programs of the backward launch: a fixed function of the device and the row count, so the weight
    gradient's reduction order (and result) is the same on every run."""
    row_blocks = triton.cdiv(n_rows, block_rows)
    if interpreting() or device.type != "cuda":
        return max(1, min(row_blocks, 4))
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    # ~2 resident programs per SM is what the register budget allows at real widths; more programs would
    # only add partial rows (n_programs x H x 4 bytes written, then re-read by the final sum), and each
    # program gets at least ~8 row blocks so that traffic stays small next to the rows themselves.
    return max(1, min(2 * sm_count, triton.cdiv(row_blocks, 8)))


def rms_norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    grad_x: torch.Tensor,
    *,
    offset: float,
    grad_summed: torch.Tensor | None = None,
    compute_grad_weight: bool = True,
) -> torch.Tensor | None:
    """grad_y, x [N, H] (unit column stride; x is the normalised input, i.e. s for the fused variant),
    rstd [N] fp32 from the forward; grad_x [N, H] written (plus grad_summed [N, H] when given).
    Returns the weight gradient [H] in fp32 (None when not computed)."""
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return torch.zeros(n_cols, dtype=torch.float32, device=x.device) if compute_grad_weight else None
    layout = _layout(n_cols, backward=True)
    num_warps = layout.pop("num_warps")
    n_programs = backward_programs(n_rows, block_rows=layout["BLOCK_ROWS"], device=x.device)
    # One fp32 row per program when the weight gradient is wanted; else a 1-element stand-in the kernel never
    # touches (COMPUTE_GRAD_W is off).
    partial_shape = (n_programs, n_cols) if compute_grad_weight else (1,)
    partial = torch.empty(partial_shape, dtype=torch.float32, device=x.device)
    has_grad_sum = grad_summed is not None
    _rms_norm_backward_kernel[(n_programs,)](
        GRAD_Y_ptr=grad_y,
        grad_y_row_stride=grad_y.stride(0),
        X_ptr=x,
        x_row_stride=x.stride(0),
        W_ptr=weight,
        RSTD_ptr=rstd,
        GRAD_SUM_ptr=grad_summed if has_grad_sum else grad_y,
        grad_sum_row_stride=grad_summed.stride(0) if has_grad_sum else 0,
        GRAD_X_ptr=grad_x,
        grad_x_row_stride=grad_x.stride(0),
        PARTIAL_GRAD_W_ptr=partial,
        n_rows=n_rows,
        n_cols=n_cols,
        offset=float(offset),
        HAS_GRAD_SUM=has_grad_sum,
        COMPUTE_GRAD_W=compute_grad_weight,
        FIX_BF16_ROUNDING=interpreting(),
        num_warps=num_warps,
        **layout,
    )
    # Fixed-order fp32 sum over the per-program partials: deterministic.
    return partial.sum(dim=0) if compute_grad_weight else None
