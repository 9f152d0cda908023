"""Packed-sequence (varlen) attention, FlashAttention-2 style: forward, and a backward in three kernels.

Layout. q [T, Hq, D], k/v [T, Hk, D] (any token/head strides, unit stride along D), documents given by
cu_seqlens (int32 [B+1]): document b owns rows cu_seqlens[b]:cu_seqlens[b+1] and no query attends across a
document boundary. The log-sum-exp of every (q head, token) is saved as fp32 [Hq, T] (natural log).

Work is laid out over (document, block) pairs: `block_table` turns cu_seqlens into a prefix sum of blocks
per document and a block -> document map, on the device (no host sync), so a batch of many short
documents launches one program per real block and none for [max_seqlen]-sized padding. A program's id
is head-fastest (pid = block * heads + head): consecutive programs share their K/V block in L2.

The head dim is a constexpr (models have one): with a run-time head dim the D-mask of every K/V load is
opaque to the compiler, the loads go element by element, and Triton does not software-pipeline them (no
cp.async / no multi-stage buffering; seen in the sm_90 PTX). Padded dims (80, 96 -> 128) keep 16-wide runs.

Masking. Within a document, query i may see key j when j < L (document length), j <= i (causal) and
i - j < window (left context, Hugging Face's `sliding_window`). Key blocks that no query of the block may
see are never visited (not masked: skipped), and the visited range is split into blocks that need the
mask and blocks that need none (`_visit_ranges`), so the interior of long documents runs mask-free.

Numerics. Scores in fp32, in log2 units (one exp2 per score), online softmax with the running max; the
probabilities are rounded to the input dtype only as the operand of the P @ V (and dS @ K) products, as
FlashAttention does. Softcap (Gemma-2): s = c * tanh(scale * q.k / c), differentiated through tanh.
Attention sinks (gpt_oss, HAS_SINKS): a per-q-head logit that joins every softmax denominator as one more
column without a value; the forward folds it into the running (max, sum) after the last key block, so
the saved lse includes it, and the backward's only extra work is its gradient, in the delta kernel.

Backward (FlashAttention-2): delta = rowsum(dO * O) (`_attention_delta_kernel`), then dK/dV with one
program per (key block, kv head) that sweeps every q head of its GQA group in registers (deterministic, no
atomics), then dQ with one program per (query block, q head). Probabilities are recomputed from the saved
log-sum-exp; no [T, T] or per-document score matrix is ever in memory.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import cast_rounded, dot_acc, dot_config, interpreting

LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: saturates cleanly to +-1 for large |x| (no inf / inf); absolute error
    # ~1e-7 near 0, i.e. ~softcap * 1e-7 on a score, far below what the softmax can resolve in fp32.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _scores_log2(qk, qk_scale, softcap_log2, HAS_SOFTCAP: tl.constexpr):
    """Scores s * log2(e) from the raw products qk = q.k, and tanh for the softcap backward.

    Without softcap: qk_scale = scale * log2(e), s = scale * qk.
    With softcap c:  qk_scale = scale / c, softcap_log2 = c * log2(e), s = c * tanh(scale * qk / c).
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * qk_scale)
        return t * softcap_log2, t
    else:
        return qk * qk_scale, qk


@triton.jit
def _allowed(q_pos, k_pos, seq_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """May the query at q_pos see the key at k_pos (positions within the document, broadcast against each
    other: [M, 1] and [1, N] for a score tile, [1, M] and [N, 1] for a transposed one)."""
    ok = k_pos < seq_len
    if CAUSAL:
        ok = ok & (k_pos <= q_pos)
    if HAS_WINDOW:
        ok = ok & (q_pos - k_pos < window)
    return ok


@triton.jit
def _locate_block(BLOCK_DOC_ptr, BLOCK_CUM_ptr, CU_SEQLENS_ptr, block, REVERSED: tl.constexpr):
    """(first token of the document, document length, index of this block within the document) for
    program block `block`. Programs past the last real block get length 0: every loop of theirs is
    empty and every store masked. REVERSED numbers a document's blocks from its end, so the
    busiest causal query blocks (the last ones) start first."""
    doc = tl.load(BLOCK_DOC_ptr + block)
    first_block = tl.load(BLOCK_CUM_ptr + doc)
    end_block = tl.load(BLOCK_CUM_ptr + doc + 1)
    doc_start = tl.load(CU_SEQLENS_ptr + doc)
    seq_len = tl.load(CU_SEQLENS_ptr + doc + 1) - doc_start
    if REVERSED:
        local = end_block - 1 - block
    else:
        local = block - first_block
    real = block < end_block
    # Spare programs: length 0 and block 0, so that every row / column index is >= the length.
    return doc_start, tl.where(real, seq_len, 0), tl.where(real, local, 0)


@triton.jit
def _key_ranges(
    m0, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr
):
    """Key blocks visited by query block [m0, m0 + BLOCK_M): [lo, a) masked, [a, b) mask-free, [b, hi)
    masked. Blocks before lo (outside every query's window) and from hi on (above the causal diagonal,
    or past the document) are skipped.

    A key block [n0, n0 + BLOCK_N) is mask-free when it lies inside the document (n0 + BLOCK_N <= L),
    below the diagonal for the block's first query (n0 + BLOCK_N - 1 <= m0) and inside the window of its
    last query (n0 >= m0 + BLOCK_M - window)."""
    if CAUSAL:
        hi = tl.minimum(seq_len, m0 + BLOCK_M)
        full_hi = tl.minimum(seq_len, m0 + 1) // BLOCK_N * BLOCK_N
    else:
        hi = seq_len
        full_hi = seq_len // BLOCK_N * BLOCK_N
    lo = seq_len * 0
    full_lo = seq_len * 0
    if HAS_WINDOW:
        lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(a, full_hi)
    return lo, a, b, hi


@triton.jit
def _query_ranges(
    n0, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr
):
    """Query blocks that see key block [n0, n0 + BLOCK_N), split like `_key_ranges`: [lo, a) masked,
    [a, b) mask-free, [b, hi) masked.

    Queries past the document need no mask here: their rows load q = dO = 0 and lse = +inf, so their
    probabilities are exactly 0. A query block [m0, m0 + BLOCK_M) is mask-free when it lies on or below
    the diagonal for the key block's last key (m0 >= n0 + BLOCK_N - 1) and its last query still sees the
    block's first key (m0 + BLOCK_M <= n0 + window)."""
    lo = seq_len * 0
    full_lo = seq_len * 0
    if CAUSAL:
        lo = n0 // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    hi = seq_len
    full_hi = seq_len
    if HAS_WINDOW:
        hi = tl.minimum(seq_len, n0 + BLOCK_N - 1 + window)
        full_hi = (n0 + window) // BLOCK_M * BLOCK_M
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(a, tl.minimum(full_hi, hi))
    return lo, a, b, hi


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _forward_blocks(
    acc,
    m_i,
    l_i,
    q,
    K_ptr,
    V_ptr,
    k_token_stride,
    v_token_stride,
    rows,
    dims,
    doc_start,
    seq_len,
    window,
    qk_scale,
    softcap_log2,
    start,
    end,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) over key blocks start, start + BLOCK_N, ... < end."""
    dim_ok = dims < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        tokens = (doc_start + cols).to(tl.int64)
        col_ok = cols < seq_len
        # k as [D, BLOCK_N] (transposed by its pointers), v as [BLOCK_N, D].
        k_t_ptrs = K_ptr + tokens[None, :] * k_token_stride + dims[:, None]
        k_t = tl.load(k_t_ptrs, mask=dim_ok[:, None] & col_ok[None, :], other=0.0)
        qk = dot_acc(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_IN_FP32, DOT_IEEE)
        s, _ = _scores_log2(qk, qk_scale, softcap_log2, HAS_SOFTCAP)
        if MASKED:
            allowed = _allowed(rows[:, None], cols[None, :], seq_len, window, CAUSAL, HAS_WINDOW)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no allowed key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V_ptr + tokens[:, None] * v_token_stride + dims[None, :]
        v = tl.load(v_ptrs, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        p_lowp = cast_rounded(p, v.dtype, FIX_BF16_ROUNDING)
        acc = dot_acc(p_lowp, v, acc * alpha[:, None], DOT_IN_FP32, DOT_IEEE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_forward_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    OUT_ptr,
    LSE_ptr,
    SINKS_ptr,
    CU_SEQLENS_ptr,
    BLOCK_DOC_ptr,
    BLOCK_CUM_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    out_token_stride,
    out_head_stride,
    lse_head_stride,
    n_q_heads,
    group_size,
    window,
    qk_scale,
    softcap_log2,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    """One program: BLOCK_M queries of one document, one q head. Writes out and lse (natural log; with
    HAS_SINKS, the head's sink logit SINKS_ptr[head] (fp32) is one more softmax column, without a value)."""
    pid = tl.program_id(0)
    head = pid % n_q_heads
    block = pid // n_q_heads
    doc_start, seq_len, local = _locate_block(BLOCK_DOC_ptr, BLOCK_CUM_ptr, CU_SEQLENS_ptr, block, REVERSED=CAUSAL)
    m0 = local * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    dim_ok = dims < HEAD_DIM
    q_tokens = (doc_start + rows).to(tl.int64)
    kv_head = (head // group_size).to(tl.int64)
    head64 = head.to(tl.int64)
    K_ptr += kv_head * k_head_stride
    V_ptr += kv_head * v_head_stride

    q_ptrs = Q_ptr + q_tokens[:, None] * q_token_stride + head64 * q_head_stride + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)

    lo, a, b, hi = _key_ranges(m0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # The arguments after (acc, m_i, l_i, q) that are the same for all three ranges, in parameter order.
    common = (
        K_ptr,
        V_ptr,
        k_token_stride,
        v_token_stride,
        rows,
        dims,
        doc_start,
        seq_len,
        window,
        qk_scale,
        softcap_log2,
    )
    acc, m_i, l_i = _forward_blocks(
        acc,
        m_i,
        l_i,
        q,
        *common,
        start=lo,
        end=a,
        MASKED=True,
        HEAD_DIM=HEAD_DIM,
        CAUSAL=CAUSAL,
        HAS_WINDOW=HAS_WINDOW,
        HAS_SOFTCAP=HAS_SOFTCAP,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        DOT_IN_FP32=DOT_IN_FP32,
        DOT_IEEE=DOT_IEEE,
        FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
    )
    acc, m_i, l_i = _forward_blocks(
        acc,
        m_i,
        l_i,
        q,
        *common,
        start=a,
        end=b,
        MASKED=False,
        HEAD_DIM=HEAD_DIM,
        CAUSAL=CAUSAL,
        HAS_WINDOW=HAS_WINDOW,
        HAS_SOFTCAP=HAS_SOFTCAP,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        DOT_IN_FP32=DOT_IN_FP32,
        DOT_IEEE=DOT_IEEE,
        FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
    )
    acc, m_i, l_i = _forward_blocks(
        acc,
        m_i,
        l_i,
        q,
        *common,
        start=b,
        end=hi,
        MASKED=True,
        HEAD_DIM=HEAD_DIM,
        CAUSAL=CAUSAL,
        HAS_WINDOW=HAS_WINDOW,
        HAS_SOFTCAP=HAS_SOFTCAP,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        DOT_IN_FP32=DOT_IN_FP32,
        DOT_IEEE=DOT_IEEE,
        FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
    )

    if HAS_SINKS:
        # The sink is one more score of every row (in log2 units, like s), folded in once after the keys:
        # rescale to the new running max and add its exp2 to the denominator; it adds nothing to acc.
        sink = tl.load(SINKS_ptr + head64).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # sink = -inf on a row past the document
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.math.exp2(sink - m_safe)
        acc = acc * alpha[:, None]
        m_i = m_new

    # Every query of the document sees at least itself, so l_i > 0 on stored rows; the guard only keeps
    # rows past the document (never stored) finite.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    out_ptrs = OUT_ptr + q_tokens[:, None] * out_token_stride + head64 * out_head_stride + dims[None, :]
    out = cast_rounded(out, OUT_ptr.dtype.element_ty, FIX_BF16_ROUNDING)
    tl.store(out_ptrs, out, mask=row_ok[:, None] & dim_ok[None, :])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # log2 units -> natural log
    tl.store(LSE_ptr + head64 * lse_head_stride + q_tokens, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _attention_delta_kernel(
    OUT_ptr,
    DOUT_ptr,
    DELTA_ptr,
    LSE_ptr,
    SINKS_ptr,
    DSINKS_PARTIAL_ptr,
    n_tokens,
    out_token_stride,
    out_head_stride,
    dout_token_stride,
    dout_head_stride,
    delta_head_stride,
    dsinks_head_stride,
    HEAD_DIM: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32 (the softmax backward's row term).

    With HAS_SINKS, also this token block's part of the sink's gradient: the sink is a softmax column with
    no value, so d sink_h = -sum_t P_sink[h, t] * delta[h, t] with P_sink = exp(sink_h - lse[h, t]) (lse
    includes the sink). Written per (head, token block) to DSINKS_PARTIAL_ptr and summed by the launcher
    (deterministic, no atomics). The sink changes nothing else: the probabilities recomputed from this lse
    already carry its share of the denominator, so dS = P * (dP - delta) stays exact."""
    head = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    token_ok = tokens < n_tokens
    mask = token_ok[:, None] & (dims < HEAD_DIM)[None, :]
    out_ptrs = OUT_ptr + tokens[:, None] * out_token_stride + head * out_head_stride + dims[None, :]
    dout_ptrs = DOUT_ptr + tokens[:, None] * dout_token_stride + head * dout_head_stride + dims[None, :]
    out = tl.load(out_ptrs, mask=mask, other=0.0)
    dout = tl.load(dout_ptrs, mask=mask, other=0.0)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    tl.store(DELTA_ptr + head * delta_head_stride + tokens, delta, mask=token_ok)
    if HAS_SINKS:
        sink = tl.load(SINKS_ptr + head).to(tl.float32)
        # Tokens past the end load lse = +inf: P_sink = 0 (and delta = 0) there.
        lse = tl.load(LSE_ptr + head * delta_head_stride + tokens, mask=token_ok, other=float("inf"))
        p_sink = tl.exp(sink - lse)
        partial = -tl.sum(p_sink * delta, 0)
        tl.store(DSINKS_PARTIAL_ptr + head * dsinks_head_stride + tl.program_id(0), partial)


@triton.jit
def _grad_kv_blocks(
    dk,
    dv,
    k,
    v,
    Q_ptr,
    DOUT_ptr,
    LSE_ptr,
    DELTA_ptr,
    q_token_stride,
    dout_token_stride,
    cols,
    dims,
    doc_start,
    seq_len,
    window,
    qk_scale,
    softcap_log2,
    start,
    end,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    """Accumulate dV += P^T dO and dK += dS^T Q (dS without the final `scale`) over query blocks
    start, start + BLOCK_M, ... < end of one q head. Works on transposed [keys, queries] tiles."""
    dim_ok = dims < HEAD_DIM
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_len
        tokens = (doc_start + rows).to(tl.int64)
        q_t_ptrs = Q_ptr + tokens[None, :] * q_token_stride + dims[:, None]
        q_t = tl.load(q_t_ptrs, mask=dim_ok[:, None] & row_ok[None, :], other=0.0)
        # Rows past the document load q = dO = 0, so they add nothing to dK / dV; lse = +inf makes their
        # probabilities exactly 0 as well, so no product of them can turn into inf or NaN.
        lse2 = tl.load(LSE_ptr + tokens, mask=row_ok, other=float("inf")) * 1.4426950408889634
        qk_t = dot_acc(k, q_t, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), DOT_IN_FP32, DOT_IEEE)
        s_t, tanh_t = _scores_log2(qk_t, qk_scale, softcap_log2, HAS_SOFTCAP)
        if MASKED:
            allowed_t = _allowed(rows[None, :], cols[:, None], seq_len, window, CAUSAL, HAS_WINDOW)
            s_t = tl.where(allowed_t, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        dout_ptrs = DOUT_ptr + tokens[:, None] * dout_token_stride + dims[None, :]
        dout = tl.load(dout_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        dv = dot_acc(cast_rounded(p_t, dout.dtype, FIX_BF16_ROUNDING), dout, dv, DOT_IN_FP32, DOT_IEEE)
        dp_t = dot_acc(v, tl.trans(dout), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), DOT_IN_FP32, DOT_IEEE)
        delta = tl.load(DELTA_ptr + tokens, mask=row_ok, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        dk = dot_acc(cast_rounded(ds_t, k.dtype, FIX_BF16_ROUNDING), tl.trans(q_t), dk, DOT_IN_FP32, DOT_IEEE)
    return dk, dv


@triton.jit
def _attention_grad_kv_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    DOUT_ptr,
    LSE_ptr,
    DELTA_ptr,
    DK_ptr,
    DV_ptr,
    CU_SEQLENS_ptr,
    BLOCK_DOC_ptr,
    BLOCK_CUM_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    dout_token_stride,
    dout_head_stride,
    dk_token_stride,
    dk_head_stride,
    dv_token_stride,
    dv_head_stride,
    lse_head_stride,
    n_kv_heads,
    group_size,
    window,
    qk_scale,
    softcap_log2,
    grad_scale,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    """One program: BLOCK_N keys of one document, one kv head; dK and dV summed over the kv head's
    `group_size` q heads in registers (deterministic GQA reduction), written once."""
    pid = tl.program_id(0)
    kv_head = pid % n_kv_heads
    block = pid // n_kv_heads
    # Natural order: under a causal mask a document's first key block is seen by the most queries.
    doc_start, seq_len, local = _locate_block(BLOCK_DOC_ptr, BLOCK_CUM_ptr, CU_SEQLENS_ptr, block, REVERSED=False)
    n0 = local * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < seq_len
    dim_ok = dims < HEAD_DIM
    k_tokens = (doc_start + cols).to(tl.int64)
    kv_head64 = kv_head.to(tl.int64)
    tile_mask = col_ok[:, None] & dim_ok[None, :]
    k_ptrs = K_ptr + k_tokens[:, None] * k_token_stride + kv_head64 * k_head_stride + dims[None, :]
    v_ptrs = V_ptr + k_tokens[:, None] * v_token_stride + kv_head64 * v_head_stride + dims[None, :]
    k = tl.load(k_ptrs, mask=tile_mask, other=0.0)
    v = tl.load(v_ptrs, mask=tile_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo, a, b, hi = _query_ranges(n0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for g in range(0, group_size):
        head = kv_head64 * group_size + g
        q_head_ptr = Q_ptr + head * q_head_stride
        dout_head_ptr = DOUT_ptr + head * dout_head_stride
        lse_head_ptr = LSE_ptr + head * lse_head_stride
        delta_head_ptr = DELTA_ptr + head * lse_head_stride
        # The arguments after (dk, dv, k, v) that are the same for all three ranges, in parameter order.
        common = (
            q_head_ptr,
            dout_head_ptr,
            lse_head_ptr,
            delta_head_ptr,
            q_token_stride,
            dout_token_stride,
            cols,
            dims,
            doc_start,
            seq_len,
            window,
            qk_scale,
            softcap_log2,
        )
        dk, dv = _grad_kv_blocks(
            dk,
            dv,
            k,
            v,
            *common,
            start=lo,
            end=a,
            MASKED=True,
            HEAD_DIM=HEAD_DIM,
            CAUSAL=CAUSAL,
            HAS_WINDOW=HAS_WINDOW,
            HAS_SOFTCAP=HAS_SOFTCAP,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            DOT_IN_FP32=DOT_IN_FP32,
            DOT_IEEE=DOT_IEEE,
            FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
        )
        dk, dv = _grad_kv_blocks(
            dk,
            dv,
            k,
            v,
            *common,
            start=a,
            end=b,
            MASKED=False,
            HEAD_DIM=HEAD_DIM,
            CAUSAL=CAUSAL,
            HAS_WINDOW=HAS_WINDOW,
            HAS_SOFTCAP=HAS_SOFTCAP,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            DOT_IN_FP32=DOT_IN_FP32,
            DOT_IEEE=DOT_IEEE,
            FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
        )
        dk, dv = _grad_kv_blocks(
            dk,
            dv,
            k,
            v,
            *common,
            start=b,
            end=hi,
            MASKED=True,
            HEAD_DIM=HEAD_DIM,
            CAUSAL=CAUSAL,
            HAS_WINDOW=HAS_WINDOW,
            HAS_SOFTCAP=HAS_SOFTCAP,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            DOT_IN_FP32=DOT_IN_FP32,
            DOT_IEEE=DOT_IEEE,
            FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
        )

    dk_ptrs = DK_ptr + k_tokens[:, None] * dk_token_stride + kv_head64 * dk_head_stride + dims[None, :]
    dv_ptrs = DV_ptr + k_tokens[:, None] * dv_token_stride + kv_head64 * dv_head_stride + dims[None, :]
    tl.store(dk_ptrs, cast_rounded(dk * grad_scale, DK_ptr.dtype.element_ty, FIX_BF16_ROUNDING), mask=tile_mask)
    tl.store(dv_ptrs, cast_rounded(dv, DV_ptr.dtype.element_ty, FIX_BF16_ROUNDING), mask=tile_mask)


@triton.jit
def _grad_q_blocks(
    dq,
    q,
    dout,
    lse2,
    delta,
    K_ptr,
    V_ptr,
    k_token_stride,
    v_token_stride,
    rows,
    dims,
    doc_start,
    seq_len,
    window,
    qk_scale,
    softcap_log2,
    start,
    end,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    """Accumulate dQ += dS K (without the final `scale`) over key blocks start, start + BLOCK_N, ... < end."""
    dim_ok = dims < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        tokens = (doc_start + cols).to(tl.int64)
        tile_t_mask = dim_ok[:, None] & (cols < seq_len)[None, :]
        k_t = tl.load(K_ptr + tokens[None, :] * k_token_stride + dims[:, None], mask=tile_t_mask, other=0.0)
        v_t = tl.load(V_ptr + tokens[None, :] * v_token_stride + dims[:, None], mask=tile_t_mask, other=0.0)
        qk = dot_acc(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_IN_FP32, DOT_IEEE)
        s, tanh = _scores_log2(qk, qk_scale, softcap_log2, HAS_SOFTCAP)
        if MASKED:
            allowed = _allowed(rows[:, None], cols[None, :], seq_len, window, CAUSAL, HAS_WINDOW)
            s = tl.where(allowed, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = dot_acc(dout, v_t, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_IN_FP32, DOT_IEEE)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh * tanh)
        dq = dot_acc(cast_rounded(ds, q.dtype, FIX_BF16_ROUNDING), tl.trans(k_t), dq, DOT_IN_FP32, DOT_IEEE)
    return dq


@triton.jit
def _attention_grad_q_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    DOUT_ptr,
    LSE_ptr,
    DELTA_ptr,
    DQ_ptr,
    CU_SEQLENS_ptr,
    BLOCK_DOC_ptr,
    BLOCK_CUM_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    dout_token_stride,
    dout_head_stride,
    dq_token_stride,
    dq_head_stride,
    lse_head_stride,
    n_q_heads,
    group_size,
    window,
    qk_scale,
    softcap_log2,
    HEAD_DIM: tl.constexpr,
    grad_scale,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr,
):
    """One program: dQ of BLOCK_M queries of one document, one q head (same key ranges as the forward)."""
    pid = tl.program_id(0)
    head = pid % n_q_heads
    block = pid // n_q_heads
    doc_start, seq_len, local = _locate_block(BLOCK_DOC_ptr, BLOCK_CUM_ptr, CU_SEQLENS_ptr, block, REVERSED=CAUSAL)
    m0 = local * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    tile_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    q_tokens = (doc_start + rows).to(tl.int64)
    head64 = head.to(tl.int64)
    kv_head = (head // group_size).to(tl.int64)
    q_ptrs = Q_ptr + q_tokens[:, None] * q_token_stride + head64 * q_head_stride + dims[None, :]
    dout_ptrs = DOUT_ptr + q_tokens[:, None] * dout_token_stride + head64 * dout_head_stride + dims[None, :]
    q = tl.load(q_ptrs, mask=tile_mask, other=0.0)
    dout = tl.load(dout_ptrs, mask=tile_mask, other=0.0)
    lse2 = tl.load(LSE_ptr + head64 * lse_head_stride + q_tokens, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA_ptr + head64 * lse_head_stride + q_tokens, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, a, b, hi = _key_ranges(m0, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # The arguments after (dq, q, dout, lse2, delta) that are the same for all three ranges, in parameter order.
    common = (
        K_ptr + kv_head * k_head_stride,
        V_ptr + kv_head * v_head_stride,
        k_token_stride,
        v_token_stride,
        rows,
        dims,
        doc_start,
        seq_len,
        window,
        qk_scale,
        softcap_log2,
    )
    dq = _grad_q_blocks(
        dq,
        q,
        dout,
        lse2,
        delta,
        *common,
        start=lo,
        end=a,
        MASKED=True,
        HEAD_DIM=HEAD_DIM,
        CAUSAL=CAUSAL,
        HAS_WINDOW=HAS_WINDOW,
        HAS_SOFTCAP=HAS_SOFTCAP,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        DOT_IN_FP32=DOT_IN_FP32,
        DOT_IEEE=DOT_IEEE,
        FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
    )
    dq = _grad_q_blocks(
        dq,
        q,
        dout,
        lse2,
        delta,
        *common,
        start=a,
        end=b,
        MASKED=False,
        HEAD_DIM=HEAD_DIM,
        CAUSAL=CAUSAL,
        HAS_WINDOW=HAS_WINDOW,
        HAS_SOFTCAP=HAS_SOFTCAP,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        DOT_IN_FP32=DOT_IN_FP32,
        DOT_IEEE=DOT_IEEE,
        FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
    )
    dq = _grad_q_blocks(
        dq,
        q,
        dout,
        lse2,
        delta,
        *common,
        start=b,
        end=hi,
        MASKED=True,
        HEAD_DIM=HEAD_DIM,
        CAUSAL=CAUSAL,
        HAS_WINDOW=HAS_WINDOW,
        HAS_SOFTCAP=HAS_SOFTCAP,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        DOT_IN_FP32=DOT_IN_FP32,
        DOT_IEEE=DOT_IEEE,
        FIX_BF16_ROUNDING=FIX_BF16_ROUNDING,
    )
    dq_ptrs = DQ_ptr + q_tokens[:, None] * dq_token_stride + head64 * dq_head_stride + dims[None, :]
    tl.store(dq_ptrs, cast_rounded(dq * grad_scale, DQ_ptr.dtype.element_ty, FIX_BF16_ROUNDING), mask=tile_mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

# Block sizes and launch shapes per pass: first guesses after the FlashAttention-2 Triton tutorial, checked
# offline only (ptxas -v for sm_80/sm_90: the K/V loads are software-pipelined with cp.async; register
# spills only in the dK/dV pass, ~20 B at D=128 and ~440 B at D=256); issue #8 tunes them on the GPU.
# "fwd"/"grad_q": BLOCK_M queries resident, BLOCK_N keys streamed. "grad_kv": BLOCK_N keys resident,
# BLOCK_M queries streamed.
_GPU_CONFIGS = {
    # head dims up to 64
    64: {
        "fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        "grad_kv": dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3),
        "grad_q": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    },
    # 65..128 (80 and 96 pad to 128)
    128: {
        "fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        "grad_kv": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        "grad_q": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
    },
    # 129..256
    256: {
        "fwd": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        # BLOCK_N=64 keeps dK/dV on Hopper's wgmma (it needs 64 accumulator rows; BLOCK_N=32 falls back
        # to mma.sync) at the cost of ~440 B of register spills (ptxas -v, sm_90a); #8 measures the trade.
        "grad_kv": dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
        "grad_q": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    },
    # fp32 rows take twice the bytes of 16-bit ones, so fp32 uses the class of twice its head dim; fp32
    # with head dims 129..256 lands here (the 16-bit tiles of this size overflow an A100's shared memory).
    512: {
        "fwd": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
        "grad_kv": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
        "grad_q": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
    },
}
# The interpreter's cost is per block operation, and small blocks let small test documents cross block
# boundaries; FASTSFT_ATTENTION_BLOCKS="M,N" overrides every pass (tests, tuning experiments).
_INTERPRETER_BLOCK = 16
MAX_HEAD_DIM = 256


def padded_head_dim(head_dim: int) -> int:
    """Head dims are padded to a power of two >= 16 inside the kernel (tl.dot needs K >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(head_dim: int, pass_name: str, *, max_seqlen: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """{BLOCK_M, BLOCK_N, num_warps, num_stages} of one pass ("fwd", "grad_kv", "grad_q") for q/k/v of
    `dtype` (fp32 tiles need twice the shared memory of fp16 / bf16 ones)."""
    override = os.environ.get("FASTSFT_ATTENTION_BLOCKS")
    if override:
        try:
            block_m, block_n = (int(x) for x in override.split(","))
        except ValueError:
            block_m = block_n = 0
        if not all(b >= 16 and b & (b - 1) == 0 for b in (block_m, block_n)):
            raise ValueError(f"FASTSFT_ATTENTION_BLOCKS={override!r} must be 'M,N', two powers of two >= 16")
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)
    if interpreting():
        return dict(BLOCK_M=_INTERPRETER_BLOCK, BLOCK_N=_INTERPRETER_BLOCK, num_warps=4, num_stages=1)
    row_bytes_class = padded_head_dim(head_dim) * (2 if dtype == torch.float32 else 1)
    config = dict(_GPU_CONFIGS[min(c for c in _GPU_CONFIGS if c >= row_bytes_class)][pass_name])
    if pass_name != "grad_kv" and max_seqlen <= 64:
        # Batches of only short documents: 64-query blocks waste fewer rows than 128-query ones.
        config["BLOCK_M"] = min(config["BLOCK_M"], 64)
    return config


def block_table(cu_seqlens: torch.Tensor, n_tokens: int, *, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map program blocks to documents, on the device, without a host sync.

    Returns (block_doc int32 [G], block_cum int32 [B+1], G): document b owns blocks
    block_cum[b]:block_cum[b+1] (cdiv(length_b, block) of them) and block_doc[g] is the document of block
    g. G = min(cdiv(T, block) + B, T) bounds the real block count from above without reading it back;
    blocks g >= block_cum[B] find a document whose range ends before them and do nothing.
    """
    n_docs = cu_seqlens.shape[0] - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    blocks_per_doc = torch.div(lengths + (block - 1), block, rounding_mode="floor")
    block_cum = torch.zeros(n_docs + 1, dtype=torch.int32, device=cu_seqlens.device)
    torch.cumsum(blocks_per_doc, 0, dtype=torch.int32, out=block_cum[1:])
    n_programs = min(triton.cdiv(n_tokens, block) + n_docs, n_tokens)
    program_blocks = torch.arange(n_programs, dtype=torch.int32, device=cu_seqlens.device)
    block_doc = torch.searchsorted(block_cum[1:], program_blocks, right=True, out_int32=True)
    return block_doc.clamp_(max=n_docs - 1), block_cum, n_programs


def _masks(
    *, causal: bool, window: int | None, softcap: float | None, scale: float, n_tokens: int
) -> tuple[dict, dict]:
    """(scalar arguments, constexpr flags) shared by the forward and backward kernels."""
    # A window >= T sees as much as no window. Clamping it keeps the kernels' position sums (n0 + window,
    # ...) inside int32: "no limit" spelled as 2**31 - 1 or sys.maxsize would wrap and skip every block.
    window_arg = 0 if window is None else min(window, n_tokens)
    if softcap is None:
        scalars = dict(window=window_arg, qk_scale=scale * LOG2E, softcap_log2=0.0)
    else:
        scalars = dict(window=window_arg, qk_scale=scale / softcap, softcap_log2=softcap * LOG2E)
    flags = dict(CAUSAL=causal, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None)
    return scalars, flags


def attention_forward(q, k, v, cu_seqlens, *, max_seqlen, causal, scale, window, softcap, sinks=None, out, lse) -> None:
    """Fill out [T, Hq, D] (q's dtype) and lse [Hq, T] (fp32, natural log). q/k/v/out have unit stride
    along D; cu_seqlens is a valid, contiguous int32 [B+1] prefix (the caller validates it); sinks is None
    or a contiguous fp32 [Hq] of sink logits (lse then includes them)."""
    n_tokens, n_q_heads, head_dim = q.shape
    if n_tokens == 0:
        return
    config = launch_config(head_dim, "fwd", max_seqlen=max_seqlen, dtype=q.dtype)
    block_m = config.pop("BLOCK_M")
    block_doc, block_cum, n_blocks = block_table(cu_seqlens, n_tokens, block=block_m)
    # scalars: window, qk_scale, softcap_log2; flags: CAUSAL, HAS_WINDOW, HAS_SOFTCAP (named as the kernel's).
    scalars, flags = _masks(causal=causal, window=window, softcap=softcap, scale=scale, n_tokens=n_tokens)
    _attention_forward_kernel[(n_blocks * n_q_heads,)](
        Q_ptr=q,
        K_ptr=k,
        V_ptr=v,
        OUT_ptr=out,
        LSE_ptr=lse,
        SINKS_ptr=lse if sinks is None else sinks,  # not read without sinks
        CU_SEQLENS_ptr=cu_seqlens,
        BLOCK_DOC_ptr=block_doc,
        BLOCK_CUM_ptr=block_cum,
        q_token_stride=q.stride(0),
        q_head_stride=q.stride(1),
        k_token_stride=k.stride(0),
        k_head_stride=k.stride(1),
        v_token_stride=v.stride(0),
        v_head_stride=v.stride(1),
        out_token_stride=out.stride(0),
        out_head_stride=out.stride(1),
        lse_head_stride=lse.stride(0),
        n_q_heads=n_q_heads,
        group_size=n_q_heads // k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_D=padded_head_dim(head_dim),
        FIX_BF16_ROUNDING=interpreting(),
        HAS_SINKS=sinks is not None,
        **scalars,
        **flags,
        **dot_config(q.dtype),
        **config,  # BLOCK_N, num_warps, num_stages
    )


def attention_backward(
    grad_out, q, k, v, out, lse, cu_seqlens, *, max_seqlen, causal, scale, window, softcap, sinks=None, dq, dk, dv
) -> torch.Tensor | None:
    """Fill dq [T, Hq, D], dk/dv [T, Hk, D] from grad_out and the forward's out and lse; with sinks
    (contiguous fp32 [Hq], as given to the forward), return their gradient (fp32 [Hq]), else None."""
    n_tokens, n_q_heads, head_dim = q.shape
    if n_tokens == 0:
        return None if sinks is None else torch.zeros_like(sinks)
    n_kv_heads = k.shape[1]
    block_d = padded_head_dim(head_dim)
    delta = torch.empty_like(lse)
    delta_block = 64 if not interpreting() else 16
    n_delta_blocks = triton.cdiv(n_tokens, delta_block)
    # Per (q head, token block) parts of the sinks' gradient, summed below (a fixed order: deterministic).
    dsinks_partial = None if sinks is None else lse.new_empty((n_q_heads, n_delta_blocks))
    # Both kernels below index delta with lse's head stride (lse_head_stride), and so does the delta kernel
    # read lse with delta's: the two must share a layout.
    assert lse.stride() == delta.stride()
    _attention_delta_kernel[(n_delta_blocks, n_q_heads)](
        OUT_ptr=out,
        DOUT_ptr=grad_out,
        DELTA_ptr=delta,
        LSE_ptr=lse,
        SINKS_ptr=lse if sinks is None else sinks,  # not read without sinks
        DSINKS_PARTIAL_ptr=delta if dsinks_partial is None else dsinks_partial,  # not written without sinks
        n_tokens=n_tokens,
        out_token_stride=out.stride(0),
        out_head_stride=out.stride(1),
        dout_token_stride=grad_out.stride(0),
        dout_head_stride=grad_out.stride(1),
        delta_head_stride=delta.stride(0),
        dsinks_head_stride=0 if dsinks_partial is None else dsinks_partial.stride(0),
        HEAD_DIM=head_dim,
        HAS_SINKS=sinks is not None,
        BLOCK_T=delta_block,
        BLOCK_D=block_d,
    )
    scalars, flags = _masks(causal=causal, window=window, softcap=softcap, scale=scale, n_tokens=n_tokens)
    # Arguments of both gradient kernels that do not depend on the pass (names are the kernels' parameters).
    common = dict(
        grad_scale=scale,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        FIX_BF16_ROUNDING=interpreting(),
        **scalars,
        **flags,
        **dot_config(q.dtype),
    )

    config = launch_config(head_dim, "grad_kv", max_seqlen=max_seqlen, dtype=q.dtype)
    block_doc, block_cum, n_blocks = block_table(cu_seqlens, n_tokens, block=config["BLOCK_N"])
    _attention_grad_kv_kernel[(n_blocks * n_kv_heads,)](
        Q_ptr=q,
        K_ptr=k,
        V_ptr=v,
        DOUT_ptr=grad_out,
        LSE_ptr=lse,
        DELTA_ptr=delta,
        DK_ptr=dk,
        DV_ptr=dv,
        CU_SEQLENS_ptr=cu_seqlens,
        BLOCK_DOC_ptr=block_doc,
        BLOCK_CUM_ptr=block_cum,
        q_token_stride=q.stride(0),
        q_head_stride=q.stride(1),
        k_token_stride=k.stride(0),
        k_head_stride=k.stride(1),
        v_token_stride=v.stride(0),
        v_head_stride=v.stride(1),
        dout_token_stride=grad_out.stride(0),
        dout_head_stride=grad_out.stride(1),
        dk_token_stride=dk.stride(0),
        dk_head_stride=dk.stride(1),
        dv_token_stride=dv.stride(0),
        dv_head_stride=dv.stride(1),
        lse_head_stride=lse.stride(0),
        n_kv_heads=n_kv_heads,
        group_size=n_q_heads // n_kv_heads,
        **common,
        **config,  # BLOCK_M, BLOCK_N, num_warps, num_stages
    )

    config = launch_config(head_dim, "grad_q", max_seqlen=max_seqlen, dtype=q.dtype)
    block_doc, block_cum, n_blocks = block_table(cu_seqlens, n_tokens, block=config["BLOCK_M"])
    _attention_grad_q_kernel[(n_blocks * n_q_heads,)](
        Q_ptr=q,
        K_ptr=k,
        V_ptr=v,
        DOUT_ptr=grad_out,
        LSE_ptr=lse,
        DELTA_ptr=delta,
        DQ_ptr=dq,
        CU_SEQLENS_ptr=cu_seqlens,
        BLOCK_DOC_ptr=block_doc,
        BLOCK_CUM_ptr=block_cum,
        q_token_stride=q.stride(0),
        q_head_stride=q.stride(1),
        k_token_stride=k.stride(0),
        k_head_stride=k.stride(1),
        v_token_stride=v.stride(0),
        v_head_stride=v.stride(1),
        dout_token_stride=grad_out.stride(0),
        dout_head_stride=grad_out.stride(1),
        dq_token_stride=dq.stride(0),
        dq_head_stride=dq.stride(1),
        lse_head_stride=lse.stride(0),
        n_q_heads=n_q_heads,
        group_size=n_q_heads // n_kv_heads,
        **common,
        **config,  # BLOCK_M, BLOCK_N, num_warps, num_stages
    )
    return None if dsinks_partial is None else dsinks_partial.sum(1)
