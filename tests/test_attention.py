"""varlen_attention: forward and backward against plain per-document attention in float64 (fp32 ~1e-5
relative; bf16/fp16 within 2x the error of torch's own attention in that dtype), every option (attention
sinks and their gradient included), GQA, odd head dims, block-boundary document lengths, the visited-block
ranges, argument validation.

On CPU the kernels run in Triton's interpreter with 16 x 16 blocks (FASTSFT_ATTENTION_BLOCKS overrides
them, to test unequal query / key blocks); the GPU suite runs the same tests plus real sizes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import triton
import triton.language as tl
from _parity import assert_op_parity
from conftest import DEVICE, HAS_CUDA, assert_within_torch_error

from fastsft.kernels import attention as kernels
from fastsft.ops import reference, varlen_attention
from fastsft.ops.attention import _attention_op


def documents(lengths, n_q_heads=4, n_kv_heads=2, head_dim=32, dtype=torch.float32):
    """Random q [T, Hq, D], k, v [T, Hk, D] (values exact in dtype) and cu_seqlens for `lengths`."""
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    n_tokens = int(cu_seqlens[-1])
    q = torch.randn(n_tokens, n_q_heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(n_tokens, n_kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(n_tokens, n_kv_heads, head_dim, device=DEVICE).to(dtype)
    return q, k, v, cu_seqlens


def random_sinks(n_q_heads, dtype=torch.float32):
    """Sink logits [Hq] (exact in dtype) spread over the range of the scores: some heads' sinks take most
    of the softmax mass, some almost none."""
    return (2.0 * torch.randn(n_q_heads, device=DEVICE)).to(dtype)


def check_parity(
    lengths, dtype=torch.float32, n_q_heads=4, n_kv_heads=2, head_dim=32, sinks=False, sinks_dtype=None, **options
):
    """Outputs and gradients against float64; sinks=True adds random sink logits (in sinks_dtype, default
    dtype) as a fourth differentiable input."""
    q, k, v, cu_seqlens = documents(lengths, n_q_heads, n_kv_heads, head_dim, dtype)
    max_seqlen = max(lengths)
    inputs = [q, k, v] + ([random_sinks(n_q_heads, sinks_dtype or dtype)] if sinks else [])

    def sinks_of(rest):
        return rest[0] if rest else None

    assert_op_parity(
        f"varlen_attention {options}" + (" with sinks" if sinks else ""),
        lambda q, k, v, *rest: varlen_attention(q, k, v, cu_seqlens, max_seqlen, sinks=sinks_of(rest), **options),
        lambda q, k, v, *rest: reference.varlen_attention(q, k, v, cu_seqlens, sinks=sinks_of(rest), **options),
        inputs,
        dtype,
        # Torch's own attention in dtype, as Hugging Face's eager attention computes it.
        torch_lowp_op=lambda q, k, v, *rest: reference.varlen_attention(
            q, k, v, cu_seqlens, sinks=sinks_of(rest), eager_softmax=True, **options
        ),
        input_dtypes=[None, None, None, sinks_dtype] if sinks else None,
    )


# Lengths around the 16-token interpreter block: 1-token documents, exact multiples, one past, one short,
# an empty document, and one spanning many blocks.
MIXED_LENGTHS = [1, 16, 17, 5, 0, 33, 1, 47]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"causal": False},
        {"window": 2},
        {"window": 7},
        {"window": 20, "softcap": 2.5},
        {"softcap": 3.0, "softmax_scale": 0.3},
        {"causal": False, "softcap": 1.5},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "causal",
)
def test_fp32_parity_every_option(triton_backend, options):
    check_parity(MIXED_LENGTHS, **options)


@pytest.mark.parametrize("blocks", ["32,16", "16,32"])
def test_unequal_query_and_key_blocks(triton_backend, monkeypatch, blocks):
    """The GPU configs use BLOCK_M != BLOCK_N in every pass; the visited ranges must stay right."""
    monkeypatch.setenv("FASTSFT_ATTENTION_BLOCKS", blocks)
    check_parity([1, 31, 32, 33, 70], window=19)
    check_parity([48, 3, 65])


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(triton_backend, head_dim):
    check_parity([9, 17, 24], n_q_heads=2, n_kv_heads=1, head_dim=head_dim)


@pytest.mark.parametrize("n_kv_heads", [8, 4, 2, 1])
def test_gqa_ratios(triton_backend, n_kv_heads):
    check_parity([13, 20, 2], n_q_heads=8, n_kv_heads=n_kv_heads, head_dim=16, window=11)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", [{}, {"window": 9, "softcap": 5.0}], ids=["causal", "window+softcap"])
def test_low_precision_within_torch_error(triton_backend, dtype, options):
    check_parity([1, 16, 17, 40], dtype=dtype, head_dim=64, **options)


def test_window_of_one_attends_to_itself_only(triton_backend):
    """window=1: out = v of the token's own k/v head, dv = the sum of its q heads' incoming gradients, and
    dq = dk = 0 up to rounding (the exact gradient is 0, so this is checked apart from relative parity)."""
    q, k, v, cu_seqlens = documents([1, 16, 17], n_q_heads=4, n_kv_heads=2, head_dim=16)
    for t in (q, k, v):
        t.requires_grad_()
    grad = torch.randn_like(q)
    out = varlen_attention(q, k, v, cu_seqlens, 17, window=1)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, v.detach().repeat_interleave(2, dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dv, grad.view(34, 2, 2, 16).sum(2), rtol=1e-6, atol=1e-6)
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5


@pytest.mark.parametrize("window", [2**31 - 1, 2**63 - 1], ids=["int32_max", "int64_max"])
def test_window_meaning_no_limit(triton_backend, window):
    """A window of 2**31 - 1 or sys.maxsize ("no limit") equals no window: the kernels' position sums
    (key block + window) used to wrap around int32 and skip every query block, leaving dK = dV = 0."""
    check_parity([5, 20], n_q_heads=2, n_kv_heads=1, head_dim=16, window=window)


def test_strided_cu_seqlens(triton_backend):
    """cu_seqlens as a strided view (a column of a bigger table) reads the same documents as a copy."""
    q, k, v, cu_seqlens = documents([5, 20, 3], n_q_heads=2, n_kv_heads=1, head_dim=16)
    for t in (q, k, v):
        t.requires_grad_()
    strided = torch.stack([cu_seqlens, torch.zeros_like(cu_seqlens)], dim=1)[:, 0]
    assert not strided.is_contiguous()
    grad = torch.randn_like(q)
    results = []
    for cu in (strided, cu_seqlens):
        out = varlen_attention(q, k, v, cu, 20)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for strided_result, contiguous_result in zip(*results, strict=True):
        torch.testing.assert_close(strided_result, contiguous_result, rtol=0, atol=0)


def test_one_long_document_with_window(triton_backend):
    """Many blocks on both sides of the diagonal and of the window edge, mask-free blocks in between."""
    check_parity([150], n_q_heads=2, n_kv_heads=1, head_dim=16, window=40)


def test_log_sum_exp_is_saved_per_head_and_token(triton_backend):
    q, k, v, cu_seqlens = documents([3, 20, 1], head_dim=16)
    out, lse = _attention_op(q, k, v, cu_seqlens, 20, True, 0.25, None, None)
    want_out, want_lse = reference.varlen_attention(
        q.double(), k.double(), v.double(), cu_seqlens, softmax_scale=0.25, return_lse=True
    )
    assert lse.shape == (4, 24) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)


def test_strided_views_of_a_fused_qkv_projection(triton_backend):
    """q, k, v as views of one [T, (Hq + 2 Hk) * D] projection (token stride != H * D) give the same
    outputs and gradients as contiguous copies."""
    n_tokens, n_q_heads, n_kv_heads, head_dim = 40, 4, 2, 16
    qkv = torch.randn(n_tokens, (n_q_heads + 2 * n_kv_heads) * head_dim, device=DEVICE, requires_grad=True)
    cu_seqlens = torch.tensor([0, 18, 40], dtype=torch.int32, device=DEVICE)
    grad = torch.randn(n_tokens, n_q_heads, head_dim, device=DEVICE)

    def run(contiguous: bool):
        q, k, v = qkv.split([n_q_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=1)
        q, k, v = (t.view(n_tokens, -1, head_dim) for t in (q, k, v))
        if contiguous:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        else:
            assert q.stride(0) == qkv.shape[1] and not q.is_contiguous()
        out = varlen_attention(q, k, v, cu_seqlens, 22)
        return out, torch.autograd.grad(out, qkv, grad)[0]

    strided, contiguous = run(False), run(True)
    torch.testing.assert_close(strided[0], contiguous[0], rtol=0, atol=0)
    torch.testing.assert_close(strided[1], contiguous[1], rtol=0, atol=0)


def test_backward_saves_nothing_quadratic(triton_backend):
    """Autograd keeps q, k, v, out, the fp32 lse [Hq, T] and cu_seqlens: no T x T or per-document scores."""
    q, k, v, cu_seqlens = documents([64, 64], head_dim=16)
    q.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        varlen_attention(q, k, v, cu_seqlens, 64)
    assert saved and max(t.numel() for t in saved) <= q.numel()
    assert sum(t.numel() for t in saved) <= 2 * q.numel() + 2 * k.numel() + q.shape[0] * q.shape[1] + 3


def test_gradients_are_deterministic(triton_backend):
    q, k, v, cu_seqlens = documents([37, 50], n_q_heads=8, n_kv_heads=2, head_dim=32)
    grad = torch.randn_like(q)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(varlen_attention(*leaves, cu_seqlens, 50, window=30), leaves, grad)

    for first, second in zip(grads(), grads(), strict=True):
        assert torch.equal(first, second)


def test_reference_backend_matches_float64_autograd(reference_backend):
    """The CPU fallback's hand-written backward against autograd of the float64 oracle."""
    check_parity(MIXED_LENGTHS, window=6, softcap=2.0)
    check_parity([10, 3], causal=False, n_q_heads=6, n_kv_heads=3)


def test_no_tokens(triton_backend):
    q, k, v, cu_seqlens = documents([0])
    q.requires_grad_()
    out = varlen_attention(q, k, v, cu_seqlens, 0)
    assert out.shape == (0, 4, 32)
    assert torch.autograd.grad(out.sum(), q)[0].shape == q.shape


def test_double_backward_is_a_clear_error(triton_backend):
    q, k, v, cu_seqlens = documents([6], head_dim=16)
    q.requires_grad_()
    (grad_q,) = torch.autograd.grad(varlen_attention(q, k, v, cu_seqlens, 6).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_q.sum().backward()


def test_opcheck(triton_backend):
    q, k, v, cu_seqlens = documents([5, 11], head_dim=16)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(_attention_op, (q, k, v, cu_seqlens, 11, True, 0.25, 4, 3.0))


# ---------------------------------------------------------------------------------------------------------
# Attention sinks (gpt_oss): a per-head logit in every softmax denominator, without a value.
# ---------------------------------------------------------------------------------------------------------

SINK_OPTIONS = [
    {},
    {"causal": False},
    {"window": 2},
    {"window": 20, "softcap": 2.5},
    {"softcap": 3.0, "softmax_scale": 0.3},
]


def _ids(options):
    return ",".join(f"{k}={v}" for k, v in options.items()) or "causal"


@pytest.mark.parametrize("options", SINK_OPTIONS, ids=_ids)
def test_sinks_fp32_parity_every_option(triton_backend, options):
    """Outputs, dq, dk, dv and the sinks' gradient of the kernels against float64 autograd of the reference."""
    check_parity(MIXED_LENGTHS, sinks=True, **options)


@pytest.mark.parametrize("options", [{}, {"window": 6, "softcap": 2.0}], ids=_ids)
def test_sinks_reference_backend_matches_float64_autograd(reference_backend, options):
    """The CPU fallback's hand-written backward (sinks' gradient included) against autograd."""
    check_parity(MIXED_LENGTHS, sinks=True, **options)
    check_parity([10, 3], causal=False, n_q_heads=6, n_kv_heads=3, sinks=True)


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_sinks_with_gqa(triton_backend, n_kv_heads):
    """Each q head has its own sink, also where several q heads share a k/v head."""
    check_parity([13, 20, 2, 1], n_q_heads=8, n_kv_heads=n_kv_heads, head_dim=16, sinks=True, window=11)


@pytest.mark.parametrize("blocks", ["32,16", "16,32"])
def test_sinks_with_unequal_query_and_key_blocks(triton_backend, monkeypatch, blocks):
    monkeypatch.setenv("FASTSFT_ATTENTION_BLOCKS", blocks)
    check_parity([1, 31, 33, 70], sinks=True, window=19)


def test_sinks_with_a_padded_head_dim(triton_backend):
    check_parity([9, 17, 24], n_q_heads=2, n_kv_heads=1, head_dim=80, sinks=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", [{}, {"window": 9, "softcap": 5.0}], ids=["causal", "window+softcap"])
def test_sinks_low_precision_within_torch_error(triton_backend, dtype, options):
    check_parity([1, 16, 17, 40], dtype=dtype, head_dim=64, sinks=True, **options)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sinks_in_another_float_dtype(monkeypatch, backend):
    """The sinks may have any float dtype (a bf16 model's parameter, or fp32 master weights beside bf16
    activations): the math is in fp32 and their gradient comes back in their own dtype."""
    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    check_parity([1, 16, 17, 40], dtype=torch.bfloat16, head_dim=64, sinks=True, sinks_dtype=torch.float32)
    # bf16 sinks beside fp32 q/k/v: exactly the fp32 computation on the same (bf16-exact) values, with the
    # sinks' gradient rounded once to bf16 at the end.
    q, k, v, cu_seqlens = documents([1, 16, 17, 40], head_dim=32)
    grad = torch.randn_like(q)
    sinks = random_sinks(4, torch.bfloat16)
    results = []
    for sinks_dtype in (torch.bfloat16, torch.float32):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [sinks.to(sinks_dtype).requires_grad_()]
        out = varlen_attention(*leaves[:3], cu_seqlens, 40, sinks=leaves[3])
        results.append([out, *torch.autograd.grad(out, leaves, grad)])
    bf16_sinks, fp32_sinks = results
    assert bf16_sinks[4].dtype == torch.bfloat16 and fp32_sinks[4].dtype == torch.float32
    for a, b in zip(bf16_sinks[:4], fp32_sinks[:4], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(bf16_sinks[4], fp32_sinks[4].to(torch.bfloat16))


def _naive_attention_with_sinks(q, k, v, cu_seqlens, sinks, *, scale, causal=True, window=None, softcap=None):
    """Independent of reference.py: one document, one q head at a time, scores [S, S] from matmuls, the sink
    appended as a last column, softmax, the last column dropped. Returns (out [T, Hq, D], lse [Hq, T])."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=q.dtype)
    out_rows, lse_rows = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        n = end - start
        if n == 0:
            continue
        heads_out, heads_lse = [], []
        for h in range(q.shape[1]):
            scores = q[start:end, h] @ k[start:end, h // group].T * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            visible = (j <= i if causal else torch.ones(n, n, dtype=torch.bool)) & (
                (i - j < window) if window is not None else True
            )
            scores = torch.where(visible, scores, torch.tensor(float("-inf"), dtype=q.dtype))
            combined = torch.cat([scores, sinks[h].expand(n, 1)], dim=1)
            probs = torch.softmax(combined, dim=1)[:, :n]
            heads_out.append(probs @ v[start:end, h // group])
            heads_lse.append(torch.logsumexp(combined, dim=1))
        out_rows.append(torch.stack(heads_out, dim=1))
        lse_rows.append(torch.stack(heads_lse))
    out = torch.cat(out_rows) if out_rows else out
    lse = torch.cat(lse_rows, dim=1) if lse_rows else lse
    return out, lse


@pytest.mark.parametrize(
    "options",
    [{}, {"causal": False}, {"window": 3, "softcap": 2.0}, {"window": 1}],
    ids=_ids,
)
def test_reference_sinks_match_a_naive_per_document_softmax(options):
    """The oracle itself (float64): out, lse and every gradient (sinks' included) of reference.varlen_attention,
    and the hand-written backward varlen_attention_with_grads, against a naive softmax over [scores, sink]."""
    q, k, v, cu_seqlens = documents([1, 7, 0, 12, 1], n_q_heads=6, n_kv_heads=2, head_dim=8, dtype=torch.float64)
    sinks = random_sinks(6, torch.float64)
    scale = 8**-0.5
    grad = torch.randn_like(q)
    results = []
    for oracle in ("naive", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        if oracle == "naive":
            out, lse = _naive_attention_with_sinks(*leaves[:3], cu_seqlens, leaves[3], scale=scale, **options)
        else:
            out, lse = reference.varlen_attention(
                *leaves[:3], cu_seqlens, sinks=leaves[3], softmax_scale=scale, return_lse=True, **options
            )
        results.append([out.detach(), lse.detach(), *torch.autograd.grad(out, leaves, grad)])
    hand_written = reference.varlen_attention_with_grads(
        grad, q, k, v, cu_seqlens, sinks=sinks, softmax_scale=scale, **options
    )
    naive, ours = results
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")
    for name, actual, want in zip(names, ours, naive, strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    for name, actual, want in zip(names[2:], hand_written, naive[2:], strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    # The sinks' gradient in closed form: -sum_t P_sink(t) * rowsum(dO_t * O_t) per head.
    p_sink = torch.exp(sinks[:, None] - naive[1])  # [Hq, T]
    delta = (grad * naive[0]).sum(-1).T  # [Hq, T]
    torch.testing.assert_close(naive[5], -(p_sink * delta).sum(1), rtol=1e-12, atol=1e-12)


def test_sinks_gradient_against_finite_differences():
    """The closed form of the sinks' gradient, checked without autograd (float64 central differences)."""
    q, k, v, cu_seqlens = documents([4, 9], n_q_heads=2, n_kv_heads=1, head_dim=8, dtype=torch.float64)
    sinks = random_sinks(2, torch.float64)
    grad = torch.randn_like(q)
    dsinks = reference.varlen_attention_with_grads(grad, q, k, v, cu_seqlens, sinks=sinks, window=5)[3]
    for h in range(2):
        step = torch.zeros_like(sinks)
        step[h] = 1e-6
        plus = (reference.varlen_attention(q, k, v, cu_seqlens, sinks=sinks + step, window=5) * grad).sum()
        minus = (reference.varlen_attention(q, k, v, cu_seqlens, sinks=sinks - step, window=5) * grad).sum()
        assert abs(float(dsinks[h]) - float(plus - minus) / 2e-6) < 1e-7


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sinks_none_is_the_path_without_sinks(monkeypatch, backend):
    """sinks=None runs exactly the code without sinks: bitwise the same outputs, gradients and saved lse as a
    call that never names the option (the kernels' HAS_SINKS=False variant), and autograd saves no sinks."""
    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    q, k, v, cu_seqlens = documents([1, 16, 17, 30], head_dim=16)
    grad = torch.randn_like(q)
    results = []
    for kwargs in ({}, {"sinks": None}):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*leaves, cu_seqlens, 30, window=9, **kwargs)
        results.append([out, *torch.autograd.grad(out, leaves, grad)])
    for without, with_none in zip(*results, strict=True):
        assert torch.equal(without, with_none)
    lse_default = _attention_op(q, k, v, cu_seqlens, 30, True, 0.25, 9, None)[1]
    lse_none = _attention_op(q, k, v, cu_seqlens, 30, True, 0.25, 9, None, None)[1]
    assert torch.equal(lse_default, lse_none)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("sink", [-1e4, float("-inf")], ids=["-1e4", "-inf"])
def test_sinks_far_below_every_score_change_nothing(monkeypatch, backend, sink):
    """A sink of -1e4 (or -inf) holds no softmax mass in fp32: outputs and q/k/v gradients equal those without
    sinks (bitwise in the kernels: exp2 of the sink underflows to 0 and the rescale factor is exp2(0) = 1),
    and the sinks' gradient is 0."""
    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    q, k, v, cu_seqlens = documents(MIXED_LENGTHS, head_dim=16)
    grad = torch.randn_like(q)
    results = []
    for sinks in (None, torch.full((4,), sink, device=DEVICE, requires_grad=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*leaves, cu_seqlens, 47, window=20, softcap=4.0, sinks=sinks)
        grads = torch.autograd.grad(out, leaves + ([sinks] if sinks is not None else []), grad)
        results.append([out, *grads])
    without, with_sinks = results
    for a, b in zip(without, with_sinks[:4], strict=True):
        if backend == "triton":
            assert torch.equal(b, a)
        else:  # torch's softmax over one more column may sum in another order
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert torch.equal(with_sinks[4], torch.zeros(4, device=DEVICE))


def test_sinks_lse_and_output_of_the_kernels(triton_backend):
    """The saved log-sum-exp includes the sink (logaddexp(lse, sink)) and out is rescaled by exp(lse - lse')."""
    q, k, v, cu_seqlens = documents([3, 20, 1], head_dim=16)
    sinks = random_sinks(4)
    out, lse = _attention_op(q, k, v, cu_seqlens, 20, True, 0.25, None, None, sinks)
    plain_out, plain_lse = reference.varlen_attention(
        q.double(), k.double(), v.double(), cu_seqlens, softmax_scale=0.25, return_lse=True
    )
    want_lse = torch.logaddexp(plain_lse, sinks.double()[:, None])
    want_out = plain_out * torch.exp(plain_lse - want_lse).T[:, :, None]
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)


def test_sinks_gradients_are_deterministic(triton_backend):
    q, k, v, cu_seqlens = documents([37, 50], n_q_heads=8, n_kv_heads=2, head_dim=32)
    sinks = random_sinks(8)
    grad = torch.randn_like(q)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        out = varlen_attention(*leaves[:3], cu_seqlens, 50, window=30, sinks=leaves[3])
        return torch.autograd.grad(out, leaves, grad)

    for first, second in zip(grads(), grads(), strict=True):
        assert torch.equal(first, second)


def test_sinks_with_no_tokens(triton_backend):
    q, k, v, cu_seqlens = documents([0])
    sinks = random_sinks(4).requires_grad_()
    out = varlen_attention(q, k, v, cu_seqlens, 0, sinks=sinks)
    assert out.shape == (0, 4, 32)
    assert torch.equal(torch.autograd.grad(out.sum(), sinks)[0], torch.zeros(4))


def test_sinks_backward_saves_nothing_quadratic(triton_backend):
    q, k, v, cu_seqlens = documents([64, 64], head_dim=16)
    sinks = random_sinks(4).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        varlen_attention(q, k, v, cu_seqlens, 64, sinks=sinks)
    assert any(t is sinks for t in saved) and max(t.numel() for t in saved) <= q.numel()
    assert sum(t.numel() for t in saved) <= 2 * q.numel() + 2 * k.numel() + q.shape[0] * q.shape[1] + 3 + 4


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck_with_sinks(monkeypatch, backend):
    """Schema, fake (meta) implementation for torch.compile and the autograd registration with sinks."""
    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    q, k, v, cu_seqlens = documents([5, 11], head_dim=16)
    sinks = random_sinks(4)
    for t in (q, k, v, sinks):
        t.requires_grad_()
    torch.library.opcheck(_attention_op, (q, k, v, cu_seqlens, 11, True, 0.25, 4, 3.0, sinks))


@pytest.mark.parametrize("implementation", ["torch", "flash_attn"])
def test_sinks_are_refused_by_the_flash_implementations(implementation):
    """torch's varlen_attn and flash-attn have no sinks: an error naming the option, never ignored (raised
    before anything checks for CUDA or imports the backend)."""
    q, k, v, cu_seqlens = documents([3, 5], head_dim=16)
    with pytest.raises(NotImplementedError, match=rf"implementation='{implementation}'\): attention sinks \(sinks="):
        varlen_attention(q, k, v, cu_seqlens, 5, sinks=random_sinks(4), implementation=implementation)


# ---------------------------------------------------------------------------------------------------------
# The visited-block ranges: skipped blocks hold no visible pair, mask-free blocks need no mask.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _probe_ranges_kernel(
    OUT_ptr,
    seq_len,
    window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    KEYS: tl.constexpr,
):
    block = tl.program_id(0)
    if KEYS:
        lo, a, b, hi = kernels._key_ranges(block * BLOCK_M, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    else:
        lo, a, b, hi = kernels._query_ranges(block * BLOCK_N, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    tl.store(OUT_ptr + block * 4 + 0, lo)
    tl.store(OUT_ptr + block * 4 + 1, a)
    tl.store(OUT_ptr + block * 4 + 2, b)
    tl.store(OUT_ptr + block * 4 + 3, hi)


def _ranges(keys: bool, seq_len, window, block_m, block_n, causal):
    n_blocks = triton.cdiv(seq_len, block_m if keys else block_n)
    out = torch.full((n_blocks, 4), -1, dtype=torch.int32, device=DEVICE)
    _probe_ranges_kernel[(n_blocks,)](
        OUT_ptr=out,
        seq_len=seq_len,
        window=window or 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        KEYS=keys,
    )
    return out.tolist()


RANGE_CASES = [
    (seq_len, window, block_m, block_n, causal)
    for block_m, block_n in ((128, 64), (64, 128), (32, 32))
    for seq_len in (1, 31, 64, 65, 200, 257)
    for causal, window in ((True, None), (False, None), (True, 1), (True, 33), (True, 64), (True, 100))
]


@pytest.mark.parametrize("seq_len,window,block_m,block_n,causal", RANGE_CASES)
def test_visited_ranges_are_tight_and_mask_free_blocks_need_no_mask(seq_len, window, block_m, block_n, causal):
    allowed = reference.attention_allowed(seq_len, seq_len, causal=causal, window=window)
    for keys, step_inner, step_outer in ((True, block_n, block_m), (False, block_m, block_n)):
        for index, (lo, a, b, hi) in enumerate(_ranges(keys, seq_len, window, block_m, block_n, causal)):
            outer = slice(index * step_outer, min((index + 1) * step_outer, seq_len))
            # pairs[outer position, inner position]: key block x query rows, or query block x key columns
            pairs = allowed[outer] if keys else allowed[:, outer].T
            visible = pairs.any(0).nonzero().flatten().tolist()
            where = f"{'query' if keys else 'key'} block {index}: ranges {(lo, a, b, hi)}"
            assert lo <= a <= b <= hi, where
            # The loops step from lo, a and b: a and b are block starts (or the end of the range).
            assert all(x == hi or (x - lo) % step_inner == 0 for x in (a, b)), where
            # Every visible position is visited; every visited block holds a visible one (skipped, not masked).
            assert all(lo <= p < hi for p in visible), where
            visited = range(lo, hi, step_inner)
            assert all(pairs[:, s : s + step_inner].any() for s in visited), where
            # Mask-free blocks: every pair allowed; in the forward / dQ passes keys past the document count
            # as not allowed (they must be masked), in the dK/dV pass only positions in the document matter.
            for start in range(a, b, step_inner):
                block = pairs[:, start : start + step_inner]
                assert block.all(), f"{where}: block at {start} is mask-free but holds a masked pair"
                if keys:
                    assert start + step_inner <= seq_len, f"{where}: mask-free block at {start} overhangs the document"


# ---------------------------------------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------------------------------------


def _bad_call(**overrides):
    q, k, v, cu_seqlens = documents([3, 5], head_dim=16)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens, max_seqlen=5)
    args.update(overrides)
    names = ("causal", "softmax_scale", "window", "softcap", "sinks")
    options = {name: args.pop(name) for name in names if name in args}
    return varlen_attention(args["q"], args["k"], args["v"], args["cu_seqlens"], args["max_seqlen"], **options)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        ({"cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int64)}, TypeError, "int32"),
        ({"cu_seqlens": torch.tensor([1, 3, 8], dtype=torch.int32)}, ValueError, "start at 0"),
        ({"cu_seqlens": torch.tensor([0, 6, 3, 8], dtype=torch.int32)}, ValueError, "non-decreasing"),
        ({"cu_seqlens": torch.tensor([0, 3, 7], dtype=torch.int32)}, ValueError, r"cu_seqlens\[-1\] = 7"),
        ({"cu_seqlens": torch.tensor([[0, 3, 8]], dtype=torch.int32)}, TypeError, "1-D int32"),
        ({"max_seqlen": 4}, ValueError, "longest document"),
        ({"max_seqlen": 5.0}, TypeError, "max_seqlen"),
        ({"k": torch.randn(8, 3, 16), "v": torch.randn(8, 3, 16)}, ValueError, "multiple of the k/v heads"),
        ({"k": torch.randn(8, 2, 8), "v": torch.randn(8, 2, 8)}, ValueError, r"\[T, Hk, D\]"),
        ({"v": torch.randn(8, 2, 16, dtype=torch.float16)}, TypeError, "share dtype"),
        ({"q": torch.randn(8, 64)}, ValueError, r"3-D \[T, Hq, D\]"),
        ({"q": torch.randint(0, 3, (8, 4, 16))}, TypeError, "float16, bfloat16, float32"),
        ({"window": 0}, ValueError, "window"),
        ({"window": 4, "causal": False}, ValueError, "needs causal=True"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"softmax_scale": float("nan")}, ValueError, "softmax_scale"),
        ({"sinks": torch.zeros(5)}, ValueError, r"sinks must be \[Hq\] = \[4\].*shape \(5,\), dtype torch.float32"),
        ({"sinks": torch.zeros(1, 4)}, ValueError, r"sinks must be \[Hq\] = \[4\].*shape \(1, 4\)"),
        ({"sinks": torch.zeros(4, dtype=torch.int32)}, TypeError, r"sinks must be a floating-point.*torch.int32"),
        ({"sinks": [0.0, 0.0, 0.0, 0.0]}, TypeError, "sinks must be None or a float tensor"),
        ({"sinks": torch.zeros(4, device="meta")}, ValueError, "sinks is on meta"),
    ],
)
def test_invalid_arguments_raise_clear_errors(triton_backend, overrides, error, match):
    overrides = {
        k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v for k, v in overrides.items()
    }
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


def test_head_dim_over_256_is_refused_by_the_triton_backend(triton_backend):
    q, k, v, cu_seqlens = documents([4], n_q_heads=1, n_kv_heads=1, head_dim=272)
    with pytest.raises(ValueError, match="head dims up to 256"):
        varlen_attention(q, k, v, cu_seqlens, 4)


# ---------------------------------------------------------------------------------------------------------
# GPU: real sizes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------------


def _lognormal_lengths(n_tokens: int, low: int, high: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < n_tokens:
        length = int(torch.empty(1).log_normal_(math.log(1024), 1.0, generator=generator).clamp(low, high))
        length = min(length, n_tokens - total)
        lengths.append(length)
        total += length
    return lengths


def _check_documents_on_gpu(q, k, v, cu_seqlens, documents_to_check, grad, sinks=None, **options):
    """Outputs and gradients of the chosen documents against float64 (bound: 2x torch's own error). With
    sinks (their gradient sums over every document), every non-empty document must be checked, and the
    sinks' gradient is compared as the sum of the documents' float64 (and torch low-precision) gradients."""
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    for t in leaves:
        t.requires_grad_()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    out = varlen_attention(q, k, v, cu_seqlens, max(lengths), sinks=sinks, **options)
    dq, dk, dv, *dsinks = torch.autograd.grad(out, leaves, grad)
    if sinks is not None:
        assert set(documents_to_check) >= {doc for doc, n in enumerate(lengths) if n}, "sinks: check every document"
        summed = {"exact": 0.0, "torch": 0.0}
    for doc in documents_to_check:
        start, end = int(cu_seqlens[doc]), int(cu_seqlens[doc + 1])
        local = torch.tensor([0, end - start], dtype=torch.int32, device=q.device)
        pieces = [t[start:end].detach() for t in (q, k, v)] + ([sinks.detach()] if sinks is not None else [])
        results = {}
        for name, dtype, eager in (("exact", torch.float64, False), ("torch", q.dtype, True)):
            doc_leaves = [t.to(dtype).requires_grad_() for t in pieces]
            doc_sinks = doc_leaves[3] if sinks is not None else None
            o = reference.varlen_attention(*doc_leaves[:3], local, sinks=doc_sinks, eager_softmax=eager, **options)
            results[name] = [o, *torch.autograd.grad(o, doc_leaves, grad[start:end].to(dtype))]
            if sinks is not None:
                summed[name] = summed[name] + results[name].pop().double()
        ours = [out[start:end], dq[start:end], dk[start:end], dv[start:end]]
        compared = zip(("out", "dq", "dk", "dv"), ours, results["torch"], results["exact"], strict=True)
        for label, actual, torch_lowp, exact in compared:
            assert_within_torch_error(f"document {doc} {label}", actual, torch_lowp, exact)
    if sinks is not None:
        assert_within_torch_error("dsinks", dsinks[0], summed["torch"], summed["exact"])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_bf16_32k_token_batch(head_dim):
    lengths = _lognormal_lengths(32768, 128, 8192)
    q, k, v, cu_seqlens = documents(lengths, 32, 8, head_dim, torch.bfloat16)
    grad = torch.randn_like(q)
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    _check_documents_on_gpu(q, k, v, cu_seqlens, [0, longest, len(lengths) - 1], grad)


@pytest.mark.gpu
def test_gpu_32k_token_document_with_window_and_softcap():
    q, k, v, cu_seqlens = documents([32768], 8, 2, 128, torch.bfloat16)
    _check_documents_on_gpu(q, k, v, cu_seqlens, [0], torch.randn_like(q), window=4096, softcap=50.0)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 128], ids=["full", "window128"])
def test_gpu_bf16_sinks_gpt_oss_shape(window):
    """gpt_oss's attention: head dim 64, GQA 8:1, bf16 sink logits, full and 128-token sliding-window layers;
    outputs, q/k/v gradients per document and the sinks' gradient over the whole batch."""
    lengths = [1, 700, 4096, 33, 2500, 129]
    q, k, v, cu_seqlens = documents(lengths, 16, 2, 64, torch.bfloat16)
    sinks = random_sinks(16, torch.bfloat16)
    grad = torch.randn_like(q)
    _check_documents_on_gpu(q, k, v, cu_seqlens, range(len(lengths)), grad, sinks=sinks, window=window)


@pytest.mark.gpu
def test_gpu_bf16_sinks_32k_token_batch_head_dim_128():
    """Real batch sizes: many documents, head dim 128, fp32 sinks beside bf16 activations."""
    lengths = _lognormal_lengths(32768, 128, 4096)
    q, k, v, cu_seqlens = documents(lengths, 8, 2, 128, torch.bfloat16)
    sinks = random_sinks(8, torch.float32)
    _check_documents_on_gpu(q, k, v, cu_seqlens, range(len(lengths)), torch.randn_like(q), sinks=sinks)


@pytest.mark.gpu
def test_gpu_256k_tokens_need_64_bit_offsets():
    """T * Hq * D > 2^31: token offsets overflow int32 unless computed in int64."""
    lengths = [4096] * 64
    q, k, v, cu_seqlens = documents(lengths, 64, 8, 128, torch.bfloat16)
    assert q.numel() > 2**31
    _check_documents_on_gpu(q, k, v, cu_seqlens, [0, 63], torch.randn_like(q))


@pytest.mark.skipif(not HAS_CUDA, reason="checks CUDA-side validation")
def test_gpu_value_checks_run_in_debug_mode(monkeypatch):
    q, k, v, _ = documents([8], head_dim=16)
    bad = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
    monkeypatch.setenv("FASTSFT_DEBUG", "1")
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, bad, 8)


@pytest.mark.parametrize("value", ["32", "16,24", "8,16", "a,b"])
def test_block_override_is_validated(monkeypatch, value):
    monkeypatch.setenv("FASTSFT_ATTENTION_BLOCKS", value)
    with pytest.raises(ValueError, match="FASTSFT_ATTENTION_BLOCKS"):
        kernels.launch_config(128, "fwd", max_seqlen=1024)
