"""Fused linear + cross-entropy in Triton: loss and gradients without the [N, V] logits.

Rows are processed in chunks of `chunk_rows`. Before the launch the caller sorts the rows so that the
supervised ones (label != ignore_index) come first and passes their count as a 0-dim device tensor;
every kernel reads that count and exits early for rows at or past it. Prompt rows therefore never reach
a matmul, forward or backward, and nothing waits on the host (no .item()).

Per chunk of C sorted rows (R = the chunk's supervised rows, known only on the device):
  1. logits GEMM   : W[C, V] workspace (fp32) <- hidden[rows] @ weight^T (+ bias)        2*R*V*H flops
  2. row kernel    : per-row loss; workspace <- row_scale * d loss / d logits, in place (kernels/cross_entropy.py)
  3. dhidden GEMM  : grad_hidden[rows] <- dlogits @ weight, cast once to hidden's dtype    2*R*V*H flops
  4. dweight GEMM  : grad_weight (fp32) += dlogits^T @ hidden[rows]; grad_bias (fp32) += column sums
                                                                                              2*R*V*H flops
Three matmuls in all, the same count as the bare lm_head forward + backward: the loss costs no recompute.
dlogits are rounded to the weight dtype as they enter the tensor-core dot (as torch's bf16 backward does);
every accumulation is fp32.

Memory: workspace = chunk_rows * V * 4 bytes, plus grad_weight in fp32 (V * H * 4 bytes, cast once by the
caller) and O(N) per-row statistics. Nothing else scales with N.
"""

import torch
import triton
import triton.language as tl

from ._common import cast_rounded, dot_acc, dot_config, interpreting
from .cross_entropy import cross_entropy_rows


@triton.jit
def _logits_kernel(
    HIDDEN_ptr,
    hidden_row_stride,
    WEIGHT_ptr,
    weight_row_stride,
    BIAS_ptr,
    ROW_IDS_ptr,
    NUM_ROWS_ptr,
    OUT_ptr,
    out_row_stride,
    chunk_start,
    chunk_rows,
    n_vocab,
    hidden_size,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    """OUT[r, v] = hidden[ROW_IDS[chunk_start + r]] . weight[v] (+ bias[v]), fp32.

    Program order: the row-block index varies fastest, so programs running together share one weight
    tile (the large operand) while the chunk's hidden rows stay in L2.
    """
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(chunk_rows, BLOCK_M)
    pid_m = pid % n_row_blocks
    pid_v = pid // n_row_blocks
    first = chunk_start + pid_m * BLOCK_M
    n_valid = tl.load(NUM_ROWS_ptr)
    if first >= n_valid:
        return
    positions = first + tl.arange(0, BLOCK_M)
    row_ok = positions < n_valid
    rows = tl.load(ROW_IDS_ptr + positions, mask=row_ok, other=0).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < n_vocab
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = HIDDEN_ptr + rows[:, None] * hidden_row_stride + ks[None, :]
    b_ptrs = WEIGHT_ptr + cols.to(tl.int64)[None, :] * weight_row_stride + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k in range(0, hidden_size, BLOCK_K):
        k_ok = (k + ks) < hidden_size
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot_acc(a, b, acc, DOT_IN_FP32, DOT_IEEE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    local = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    out_ptrs = OUT_ptr + local[:, None] * out_row_stride + cols[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_hidden_kernel(
    DLOGITS_ptr,
    dlogits_row_stride,
    WEIGHT_ptr,
    weight_row_stride,
    ROW_IDS_ptr,
    NUM_ROWS_ptr,
    GRAD_HIDDEN_ptr,
    grad_hidden_row_stride,
    chunk_start,
    chunk_rows,
    n_vocab,
    hidden_size,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    """grad_hidden[ROW_IDS[chunk_start + r], h] = sum_v DLOGITS[r, v] * weight[v, h].

    The full vocabulary reduction happens inside one program, so each output element is written once,
    in hidden's dtype, with no atomics.
    """
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(chunk_rows, BLOCK_M)
    pid_m = pid % n_row_blocks
    pid_h = pid // n_row_blocks
    first = chunk_start + pid_m * BLOCK_M
    n_valid = tl.load(NUM_ROWS_ptr)
    if first >= n_valid:
        return
    positions = first + tl.arange(0, BLOCK_M)
    row_ok = positions < n_valid
    local = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    hcols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hcols < hidden_size
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = DLOGITS_ptr + local[:, None] * dlogits_row_stride + ks[None, :]
    b_ptrs = WEIGHT_ptr + ks.to(tl.int64)[:, None] * weight_row_stride + hcols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for k in range(0, n_vocab, BLOCK_K):
        k_ok = (k + ks) < n_vocab
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        # dlogits enter the dot in the weight's dtype (tensor cores; the same rounding as torch's backward).
        a = cast_rounded(a, WEIGHT_ptr.dtype.element_ty, FIX_BF16_ROUNDING)
        acc = dot_acc(a, b, acc, DOT_IN_FP32, DOT_IEEE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * weight_row_stride
    rows = tl.load(ROW_IDS_ptr + positions, mask=row_ok, other=0).to(tl.int64)
    out_ptrs = GRAD_HIDDEN_ptr + rows[:, None] * grad_hidden_row_stride + hcols[None, :]
    grad = cast_rounded(acc, GRAD_HIDDEN_ptr.dtype.element_ty, FIX_BF16_ROUNDING)
    tl.store(out_ptrs, grad, mask=row_ok[:, None] & h_ok[None, :])


@triton.jit
def _grad_weight_kernel(
    DLOGITS_ptr,
    dlogits_row_stride,
    HIDDEN_ptr,
    hidden_row_stride,
    ROW_IDS_ptr,
    NUM_ROWS_ptr,
    GRAD_WEIGHT_ptr,
    GRAD_BIAS_ptr,
    chunk_start,
    chunk_rows,
    n_vocab,
    hidden_size,
    COMPUTE_WEIGHT: tl.constexpr,
    COMPUTE_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    """GRAD_WEIGHT[v, h] += sum_r DLOGITS[r, v] * hidden[ROW_IDS[chunk_start + r], h]   (fp32, [V, H])
    GRAD_BIAS[v]     += sum_r DLOGITS[r, v]                                         (fp32, [V])

    The reduction runs over the chunk's supervised rows only (a device-side bound); each program owns
    its output tile, so the read-modify-write needs no atomics and is deterministic. The bias sum is
    done by the programs of the first hidden block.
    """
    pid = tl.program_id(0)
    if COMPUTE_WEIGHT:
        n_h_blocks = tl.cdiv(hidden_size, BLOCK_H)
    else:
        n_h_blocks = 1  # bias only: one program per vocabulary block
    pid_h = pid % n_h_blocks
    pid_v = pid // n_h_blocks
    n_rows = tl.minimum(tl.load(NUM_ROWS_ptr) - chunk_start, chunk_rows)
    if n_rows <= 0:
        return
    vcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vcols < n_vocab
    hcols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hcols < hidden_size
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for k in range(0, n_rows, BLOCK_K):
        local = k + ks
        k_ok = local < n_rows
        # dlogits^T tile [BLOCK_V, BLOCK_K], read column-wise from the row-major workspace.
        a_ptrs = DLOGITS_ptr + local.to(tl.int64)[None, :] * dlogits_row_stride + vcols[:, None]
        a = tl.load(a_ptrs, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        if COMPUTE_BIAS:
            bias_acc += tl.sum(a, axis=1)
        if COMPUTE_WEIGHT:
            rows = tl.load(ROW_IDS_ptr + chunk_start + local, mask=k_ok, other=0).to(tl.int64)
            b_ptrs = HIDDEN_ptr + rows[:, None] * hidden_row_stride + hcols[None, :]
            b = tl.load(b_ptrs, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
            a_cast = cast_rounded(a, HIDDEN_ptr.dtype.element_ty, FIX_BF16_ROUNDING)
            acc = dot_acc(a_cast, b, acc, DOT_IN_FP32, DOT_IEEE)
    if COMPUTE_WEIGHT:
        out_ptrs = GRAD_WEIGHT_ptr + vcols.to(tl.int64)[:, None] * hidden_size + hcols[None, :]
        out_mask = v_ok[:, None] & h_ok[None, :]
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
        tl.store(out_ptrs, acc, mask=out_mask)
    if COMPUTE_BIAS:
        if pid_h == 0:
            bias_ptrs = GRAD_BIAS_ptr + vcols
            tl.store(bias_ptrs, tl.load(bias_ptrs, mask=v_ok, other=0.0) + bias_acc, mask=v_ok)


# Block sizes per kernel: (rows or output-tile dims..., reduction dim). The GPU values are a sane Hopper/
# Ampere starting point (tuned in the GPU kernel issue). In the interpreter each dimension is cut into ~3
# blocks: small test shapes still cross every block boundary, and large ones stay fast enough on a CPU.
_GPU_CONFIG = {
    "logits": {"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 64},
    "grad_hidden": {"BLOCK_M": 128, "BLOCK_H": 128, "BLOCK_K": 64},
    "grad_weight": {"BLOCK_V": 128, "BLOCK_H": 128, "BLOCK_K": 64},
    "launch": {"num_warps": 8, "num_stages": 3},
}


def _interpreter_block(dim: int) -> int:
    return max(16, min(256, triton.next_power_of_2(triton.cdiv(dim, 3))))


def _configs(n_rows: int, n_vocab: int, hidden_size: int) -> dict:
    if not interpreting():
        return _GPU_CONFIG
    m, v, h = (_interpreter_block(d) for d in (n_rows, n_vocab, hidden_size))
    return {
        "logits": {"BLOCK_M": m, "BLOCK_V": v, "BLOCK_K": h},
        "grad_hidden": {"BLOCK_M": m, "BLOCK_H": h, "BLOCK_K": v},
        "grad_weight": {"BLOCK_V": v, "BLOCK_H": h, "BLOCK_K": m},
        "launch": {"num_warps": 1, "num_stages": 1},
    }


def chunk_rows_for(n_rows: int, n_vocab: int, *, workspace_bytes: int, block_m: int) -> int:
    """Rows per chunk: as many as fit the fp32 [rows, V] workspace budget, a multiple of the row block,
    at least one row block and at most all rows (rounded up to the block)."""
    fit = (workspace_bytes // (4 * n_vocab)) // block_m * block_m
    all_rows = triton.cdiv(max(n_rows, 1), block_m) * block_m
    return max(block_m, min(fit, all_rows))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    row_ids: torch.Tensor,
    num_rows: torch.Tensor,
    row_scale: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    workspace_bytes: int,
):
    """Per-row losses and, optionally, the gradients of sum_r row_scale[r] * loss_r.

    hidden [N, H] and weight [V, H]: same float dtype, unit stride along H. bias [V] or None.
    labels [N] integer. row_ids [N] int64: a permutation of the rows with the supervised ones first;
    num_rows: 0-dim int32 device tensor, the number of supervised rows. row_scale: 0-dim or [N] fp32.

    Returns (row_losses [N] fp32, grad_hidden [N, H] hidden.dtype | None, grad_weight [V, H] fp32 | None,
    grad_bias [V] fp32 | None). Ignored rows have loss 0 and zero gradient.
    """
    n_rows, hidden_size = hidden.shape
    n_vocab = weight.shape[0]
    device = hidden.device
    config = _configs(n_rows, n_vocab, hidden_size)
    launch = config["launch"]
    dots = dot_config(hidden.dtype)
    compute_grad = need_grad_hidden or need_grad_weight or need_grad_bias

    row_losses = torch.zeros(n_rows, device=device, dtype=torch.float32)
    grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, device=device, dtype=torch.float32) if need_grad_weight else None
    grad_bias = torch.zeros(n_vocab, device=device, dtype=torch.float32) if need_grad_bias else None
    if n_rows == 0:
        return row_losses, grad_hidden, grad_weight, grad_bias

    block_m = config["logits"]["BLOCK_M"]
    chunk_rows = chunk_rows_for(n_rows, n_vocab, workspace_bytes=workspace_bytes, block_m=block_m)
    workspace = torch.empty((min(chunk_rows, n_rows), n_vocab), device=device, dtype=torch.float32)
    cdiv = triton.cdiv
    for chunk_start in range(0, n_rows, chunk_rows):
        rows_here = min(chunk_rows, n_rows - chunk_start)
        cfg = config["logits"]
        _logits_kernel[(cdiv(rows_here, cfg["BLOCK_M"]) * cdiv(n_vocab, cfg["BLOCK_V"]),)](
            HIDDEN_ptr=hidden,
            hidden_row_stride=hidden.stride(0),
            WEIGHT_ptr=weight,
            weight_row_stride=weight.stride(0),
            BIAS_ptr=bias if bias is not None else weight,
            ROW_IDS_ptr=row_ids,
            NUM_ROWS_ptr=num_rows,
            OUT_ptr=workspace,
            out_row_stride=workspace.stride(0),
            chunk_start=chunk_start,
            chunk_rows=rows_here,
            n_vocab=n_vocab,
            hidden_size=hidden_size,
            HAS_BIAS=bias is not None,
            **cfg,
            **dots,
            **launch,
        )
        cross_entropy_rows(
            workspace[:rows_here],
            labels,
            row_losses,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            grad=workspace[:rows_here] if compute_grad else None,
            row_scale=row_scale,
            row_ids=row_ids,
            num_rows=num_rows,
            row_offset=chunk_start,
        )
        if need_grad_hidden:
            cfg = config["grad_hidden"]
            _grad_hidden_kernel[(cdiv(rows_here, cfg["BLOCK_M"]) * cdiv(hidden_size, cfg["BLOCK_H"]),)](
                DLOGITS_ptr=workspace,
                dlogits_row_stride=workspace.stride(0),
                WEIGHT_ptr=weight,
                weight_row_stride=weight.stride(0),
                ROW_IDS_ptr=row_ids,
                NUM_ROWS_ptr=num_rows,
                GRAD_HIDDEN_ptr=grad_hidden,
                grad_hidden_row_stride=grad_hidden.stride(0),
                chunk_start=chunk_start,
                chunk_rows=rows_here,
                n_vocab=n_vocab,
                hidden_size=hidden_size,
                FIX_BF16_ROUNDING=interpreting(),
                **cfg,
                **dots,
                **launch,
            )
        if need_grad_weight or need_grad_bias:
            cfg = config["grad_weight"]
            n_h_blocks = cdiv(hidden_size, cfg["BLOCK_H"]) if need_grad_weight else 1
            _grad_weight_kernel[(cdiv(n_vocab, cfg["BLOCK_V"]) * n_h_blocks,)](
                DLOGITS_ptr=workspace,
                dlogits_row_stride=workspace.stride(0),
                HIDDEN_ptr=hidden,
                hidden_row_stride=hidden.stride(0),
                ROW_IDS_ptr=row_ids,
                NUM_ROWS_ptr=num_rows,
                GRAD_WEIGHT_ptr=grad_weight if need_grad_weight else workspace,
                GRAD_BIAS_ptr=grad_bias if need_grad_bias else workspace,
                chunk_start=chunk_start,
                chunk_rows=rows_here,
                n_vocab=n_vocab,
                hidden_size=hidden_size,
                COMPUTE_WEIGHT=need_grad_weight,
                COMPUTE_BIAS=need_grad_bias,
                FIX_BF16_ROUNDING=interpreting(),
                **cfg,
                **dots,
                **launch,
            )
    return row_losses, grad_hidden, grad_weight, grad_bias
