"""apply_rope: forward and backward vs the float64 reference, layouts, packed positions, contract."""

import pytest
import torch
from _parity import assert_op_parity
from conftest import DEVICE, assert_close_fp32

from fastsft.ops import apply_rope, reference


def positions_of(doc_lengths) -> torch.Tensor:
    """Packed position ids: 0..len-1 for each document in turn."""
    return torch.cat([torch.arange(n) for n in doc_lengths]).to(DEVICE)


def rope_tables(positions: torch.Tensor, rotary_dim: int, dtype, base: float = 10000.0):
    """HF's default rotary tables, one row per token: cos/sin [T, R] = cos/sin(cat(f, f)), f = pos * inv_freq."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device) / rotary_dim)
    freqs = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def hf_rope(q, k, cos, sin):
    """torch's own computation, as Hugging Face writes it (everything in the inputs' dtype), on [T, H, D]
    with partial rotary handled like HF's partial-rotary models."""
    rotary_dim = cos.shape[-1]

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def rotate(x):
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        c, s = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        return torch.cat((x_rot * c + rotate_half(x_rot) * s, x_pass), dim=-1)

    return rotate(q), rotate(k)


def _inputs(doc_lengths, n_q_heads, n_k_heads, head_dim, rotary_dim, dtype):
    positions = positions_of(doc_lengths)
    n_tokens = positions.numel()
    q = torch.randn(n_tokens, n_q_heads, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(n_tokens, n_k_heads, head_dim, dtype=dtype, device=DEVICE)
    cos, sin = rope_tables(positions, rotary_dim, dtype)
    return q, k, cos, sin


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_rope_matches_reference(triton_backend, dtype, head_dim):
    """Every supported head dim; GQA 3:1; packed documents incl. one-token ones, positions restarting at 0."""
    q, k, cos, sin = _inputs([1, 6, 1, 4], 6, 2, head_dim, head_dim, dtype)
    assert_op_parity(
        f"rope d={head_dim} {dtype}",
        apply_rope,
        reference.apply_rope,
        [q, k, cos, sin],
        dtype,
        differentiable=[True, True, False, False],
        torch_lowp_op=hf_rope,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim, rotary_dim", [(80, 32), (128, 64), (96, 94), (64, 2)])
def test_partial_rotary_passes_the_rest_through(triton_backend, dtype, head_dim, rotary_dim):
    q, k, cos, sin = _inputs([5, 2], 4, 4, head_dim, rotary_dim, dtype)
    assert_op_parity(
        f"partial rope {head_dim}/{rotary_dim}",
        apply_rope,
        reference.apply_rope,
        [q, k, cos, sin],
        dtype,
        differentiable=[True, True, False, False],
        torch_lowp_op=hf_rope,
    )
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
    assert torch.equal(k_out[..., rotary_dim:], k[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_any_tables_backward_is_the_exact_adjoint(triton_backend, dtype):
    """With tables whose halves differ (not HF's cat(f, f)), the backward must still be the exact transpose
    of the forward map, which autograd of the reference gives."""
    q, k, _, _ = _inputs([4, 3], 4, 2, 80, 48, dtype)
    cos, sin = (torch.randn(7, 48, dtype=dtype, device=DEVICE) for _ in range(2))
    assert_op_parity(
        "rope random tables",
        apply_rope,
        reference.apply_rope,
        [q, k, cos, sin],
        dtype,
        differentiable=[True, True, False, False],
        torch_lowp_op=hf_rope,
    )


@pytest.mark.parametrize("block_heads", [1, 2, 4])
def test_head_loop_with_gpu_sized_head_blocks(triton_backend, monkeypatch, block_heads):
    """On the GPU a program sweeps the heads in several [BLOCK_H, D/2] tiles (the interpreter normally takes
    them all at once): the multi-tile loop, with a partial last tile, gives the same result."""
    from fastsft.kernels import rope as kernel

    monkeypatch.setattr(kernel, "_block_heads", lambda n_heads, block_half: block_heads)
    q, k, cos, sin = _inputs([3, 2], 7, 3, 64, 64, torch.float32)
    assert_op_parity(
        f"rope head block {block_heads}",
        apply_rope,
        reference.apply_rope,
        [q, k, cos, sin],
        torch.float32,
        differentiable=[True, True, False, False],
    )


def test_double_backward(triton_backend):
    """RoPE is linear, so its backward is differentiable too (the same op, transposed)."""
    q, k, cos, sin = _inputs([4], 2, 2, 16, 16, torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_out, k_out = apply_rope(q, k, cos, sin)
    (grad_q,) = torch.autograd.grad((q_out * q_out).sum() + k_out.sum(), q, create_graph=True)
    (second,) = torch.autograd.grad(grad_q.sum(), q)
    qq = q.detach().double().requires_grad_(True)
    rq, _ = reference.apply_rope(qq, k.detach().double(), cos.double(), sin.double())
    (ref_grad,) = torch.autograd.grad((rq * rq).sum(), qq, create_graph=True)
    (ref_second,) = torch.autograd.grad(ref_grad.sum(), qq)
    assert_close_fp32("second derivative", second, ref_second)


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_gqa_ratios(triton_backend, ratio):
    q, k, cos, sin = _inputs([3, 1, 7], 2 * ratio, 2, 64, 64, torch.float32)
    assert_op_parity(
        f"rope gqa {ratio}",
        apply_rope,
        reference.apply_rope,
        [q, k, cos, sin],
        torch.float32,
        differentiable=[True, True, False, False],
    )


def test_packed_documents_equal_documents_run_alone(triton_backend):
    """A packed row with positions restarting at 0 rotates each document exactly as if it ran alone."""
    lengths = [1, 5, 3]
    q, k, cos, sin = _inputs(lengths, 4, 2, 64, 64, torch.float32)
    q_out, k_out = apply_rope(q, k, cos, sin)
    start = 0
    for n in lengths:
        piece = slice(start, start + n)
        c, s = rope_tables(torch.arange(n, device=DEVICE), 64, torch.float32)
        q_alone, k_alone = apply_rope(q[piece], k[piece], c, s)
        assert torch.equal(q_out[piece], q_alone) and torch.equal(k_out[piece], k_alone)
        start += n
    # A one-token document sits at position 0: cos = 1, sin = 0, so it is left exactly as it was.
    assert torch.equal(q_out[0], q[0]) and torch.equal(k_out[0], k[0])


def test_strided_views_are_read_in_place(triton_backend):
    """q/k as views of a fused qkv projection [T, (Hq + 2 Hk) * D] and of HF's [1, H, T, D] transpose give
    the same result as contiguous copies."""
    n_tokens, hq, hk, d = 9, 4, 2, 64
    qkv = torch.randn(n_tokens, (hq + 2 * hk) * d, device=DEVICE).view(n_tokens, hq + 2 * hk, d)
    q, k = qkv[:, :hq], qkv[:, hq : hq + hk]
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = rope_tables(positions_of([4, 5]), d, torch.float32)
    expected = apply_rope(q.contiguous(), k.contiguous(), cos, sin)
    for got, want in zip(apply_rope(q, k, cos, sin), expected, strict=True):
        assert torch.equal(got, want) and got.is_contiguous()

    q_bhsd = torch.randn(1, hq, n_tokens, d, device=DEVICE)  # HF's attention layout, batch 1
    k_bhsd = torch.randn(1, hk, n_tokens, d, device=DEVICE)
    q_view, k_view = q_bhsd[0].transpose(0, 1), k_bhsd[0].transpose(0, 1)
    expected = apply_rope(q_view.contiguous(), k_view.contiguous(), cos, sin)
    for got, want in zip(apply_rope(q_view, k_view, cos, sin), expected, strict=True):
        assert torch.equal(got, want)
    # cos/sin as a non-contiguous slice of a wider table ([1, T, R] squeezed, or a column slice).
    wide_cos, wide_sin = (torch.cat((t, t), dim=1) for t in (cos, sin))
    for got, want in zip(apply_rope(q_view, k_view, wide_cos[:, :d], wide_sin[:, :d]), expected, strict=True):
        assert torch.equal(got, want)


def test_backward_saves_only_cos_and_sin(triton_backend):
    """q and k are not kept alive for the backward: the only saved tensors are the [T, R] tables."""
    q, k, cos, sin = _inputs([4, 3], 4, 2, 64, 64, torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q_out, k_out = apply_rope(q, k, cos, sin)
    assert saved, "nothing saved: the hook did not see the op's saved tensors"
    assert all(t.shape[-2:] == cos.shape and t.numel() == cos.numel() for t in saved), [t.shape for t in saved]
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad is not None and k.grad is not None


def test_backward_inverts_the_rotation(triton_backend):
    """For HF's tables the backward's transposed rotation is the inverse: feeding the output back as the
    incoming gradient recovers the input."""
    q, k, cos, sin = _inputs([6, 2], 2, 2, 96, 96, torch.float32)
    q_out, k_out = apply_rope(q.requires_grad_(True), k.requires_grad_(True), cos, sin)
    grad_q, grad_k = torch.autograd.grad((q_out, k_out), (q, k), (q_out.detach(), k_out.detach()))
    assert_close_fp32("inverse q", grad_q, q.detach().double())
    assert_close_fp32("inverse k", grad_k, k.detach().double())


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(triton_backend, compile_backend):
    torch._dynamo.reset()
    q, k, cos, sin = _inputs([3, 4], 4, 2, 64, 64, torch.float32)

    def attention_inputs(q, k):
        q_out, k_out = apply_rope(q * 2.0, k, cos, sin)
        return (q_out * k_out.repeat_interleave(2, dim=1)).sum()

    compiled = torch.compile(attention_inputs, fullgraph=True, backend=compile_backend)
    leaves = [t.clone().requires_grad_(True) for t in (q, k)]
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    exact = [t.double().requires_grad_(True) for t in (q, k)]

    def reference_inputs(q, k):
        q_out, k_out = reference.apply_rope(q * 2.0, k, cos.double(), sin.double())
        return (q_out * k_out.repeat_interleave(2, dim=1)).sum()

    exact_grads = torch.autograd.grad(reference_inputs(*exact), exact)
    for name, got, want in zip(("d q", "d k"), grads, exact_grads, strict=True):
        assert_close_fp32(name, got, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(monkeypatch, backend):
    from fastsft.ops.rope import _rope_op

    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    q, k, cos, sin = _inputs([3, 2], 4, 2, 16, 8, torch.float32)
    q, k, cos, sin = (t.unsqueeze(0) for t in (q, k, cos, sin))
    for inverse in (False, True):
        torch.library.opcheck(_rope_op, (q.requires_grad_(True), k.requires_grad_(True), cos, sin, inverse))


@pytest.mark.parametrize(
    "mutate, error, words",
    [
        (lambda q, k, c, s: (q[0], k, c, s), ValueError, "q must be 3-D [T, Hq, D]"),
        (lambda q, k, c, s: (q, k[:, :, :8], c, s), ValueError, "k must be [T, Hk, D]"),
        (lambda q, k, c, s: (q, k.half(), c, s), TypeError, "share dtype"),
        (lambda q, k, c, s: (q, k, c[:-1], s[:-1]), ValueError, "one row per token"),
        (lambda q, k, c, s: (q, k, c[:, :7], s[:, :7]), ValueError, "must be even"),
        (lambda q, k, c, s: (q, k, c, s[:, :8]), ValueError, "same shape"),
        (lambda q, k, c, s: (q, k, c.clone().requires_grad_(True), s), ValueError, "cos requires grad"),
        (lambda q, k, c, s: (q.long(), k, c, s), TypeError, "float16, bfloat16, float32 or float64"),
    ],
)
def test_clear_errors(mutate, error, words):
    q, k, cos, sin = _inputs([5], 4, 2, 16, 16, torch.float32)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        apply_rope(*mutate(q, k, cos, sin))


def test_empty_input(triton_backend):
    q, k = torch.empty(0, 4, 16, device=DEVICE), torch.empty(0, 2, 16, device=DEVICE)
    cos, sin = torch.empty(0, 16, device=DEVICE), torch.empty(0, 16, device=DEVICE)
    q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_real_size_on_gpu(triton_backend, dtype):
    """Llama-3-8B attention shape, 4096 packed tokens of mixed lengths."""
    q, k, cos, sin = _inputs([2048, 1, 1023, 512, 512], 32, 8, 128, 128, dtype)
    assert_op_parity(
        "rope 8B",
        apply_rope,
        reference.apply_rope,
        [q, k, cos, sin],
        dtype,
        differentiable=[True, True, False, False],
        torch_lowp_op=hf_rope,
    )
