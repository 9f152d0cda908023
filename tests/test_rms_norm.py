"""rms_norm and add_rms_norm: forward and backward vs the float64 reference, wide rows, determinism, contract."""

import pytest
import torch
from _parity import assert_op_parity
from conftest import DEVICE, assert_close_fp32

from fastsft.ops import add_rms_norm, reference, rms_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def hf_rms_norm(x, weight, eps=1e-6, offset=0.0):
    """torch's own computation as Hugging Face writes it: LlamaRMSNorm (offset 0: fp32 statistics, the
    normalised x rounded to its dtype, then times the weight) or GemmaRMSNorm (offset 1: all in fp32,
    times (1 + w), then rounded)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def hf_add_rms_norm(x, residual, weight, eps=1e-6, offset=0.0):
    summed = x + residual
    return hf_rms_norm(summed, weight, eps, offset), summed


def _weight(width, dtype, offset):
    # Gemma stores w near 0 (the scale is 1 + w); Llama near 1.
    base = 0.0 if offset else 1.0
    return (base + 0.1 * torch.randn(width, device=DEVICE)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3), (7, 37), (3, 5, 64), (2, 300)], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_matches_reference(triton_backend, dtype, shape, offset):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    w = _weight(shape[-1], dtype, offset)
    assert_op_parity(
        f"rms_norm {shape} {dtype} offset={offset}",
        lambda x, w: rms_norm(x, w, 1e-6, offset=offset),
        lambda x, w: reference.rms_norm(x, w, 1e-6, offset=offset),
        [x, w],
        dtype,
        torch_lowp_op=lambda x, w: hf_rms_norm(x, w, 1e-6, offset),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (9, 37), (2, 3, 200)], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_add_rms_norm_matches_reference(triton_backend, dtype, shape, offset):
    x, residual = (torch.randn(shape, dtype=dtype, device=DEVICE) for _ in range(2))
    w = _weight(shape[-1], dtype, offset)
    assert_op_parity(
        f"add_rms_norm {shape} {dtype} offset={offset}",
        lambda x, r, w: add_rms_norm(x, r, w, 1e-5, offset=offset),
        lambda x, r, w: reference.add_rms_norm(x, r, w, 1e-5, offset=offset),
        [x, residual, w],
        dtype,
        torch_lowp_op=lambda x, r, w: hf_add_rms_norm(x, r, w, 1e-5, offset),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_sum_is_torchs_add_bit_for_bit(triton_backend, dtype):
    x, residual = (torch.randn(13, 100, dtype=dtype, device=DEVICE) * 10 for _ in range(2))
    _, summed = add_rms_norm(x, residual, torch.ones(100, dtype=dtype, device=DEVICE))
    assert torch.equal(summed, x + residual)


@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_take_the_chunked_path(triton_backend, monkeypatch, fused, dtype):
    """Rows wider than one tile (16k columns on the GPU; lowered here so the interpreter stays fast) are
    swept in column chunks: same results, including a width that is not a multiple of the chunk."""
    from fastsft.kernels import rms_norm as kernel

    monkeypatch.setenv("FASTSFT_RMS_NORM_MAX_TILE_COLS", "64")
    width = 203
    assert kernel._layout(width)["NUM_CHUNKS"] > 1
    x, residual = (torch.randn(5, width, dtype=dtype, device=DEVICE) for _ in range(2))
    w = _weight(width, dtype, 0.0)
    if fused:
        assert_op_parity(
            "chunked add_rms_norm",
            lambda x, r, w: add_rms_norm(x, r, w),
            reference.add_rms_norm,
            [x, residual, w],
            dtype,
            torch_lowp_op=hf_add_rms_norm,
        )
    else:
        assert_op_parity(
            "chunked rms_norm",
            lambda x, w: rms_norm(x, w),
            reference.rms_norm,
            [x, w],
            dtype,
            torch_lowp_op=hf_rms_norm,
        )


def test_mixed_precision_weight(triton_backend):
    """fp32 weights with bf16 activations: y and grad x in bf16, grad weight in fp32."""
    x = torch.randn(6, 48, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    w = _weight(48, torch.float32, 0.0).requires_grad_(True)
    y = rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    y.backward(torch.randn_like(y))
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    exact = reference.rms_norm(x.detach().double(), w.detach().double())
    assert (y.double() - exact).abs().max() <= 2 * 2**-8 * exact.abs().max()


def test_many_narrow_rows_per_head_norm(triton_backend):
    """Qwen3's per-head q/k norm: [T, H, 128] normalised over the head dim, many rows per program."""
    x = torch.randn(11, 6, 128, device=DEVICE)
    w = _weight(128, torch.float32, 0.0)
    assert_op_parity("per-head rms_norm", lambda x, w: rms_norm(x, w), reference.rms_norm, [x, w], torch.float32)


def test_non_contiguous_input(triton_backend):
    x = torch.randn(40, 12, device=DEVICE).t()  # [12, 40], column-major
    w = _weight(40, torch.float32, 0.0)
    assert_op_parity("transposed rms_norm", lambda x, w: rms_norm(x, w), reference.rms_norm, [x, w], torch.float32)


def test_weight_gradient_is_deterministic_across_programs(triton_backend):
    """The weight gradient sums per-program partials in a fixed order: two runs give the same bits, and the
    launch really splits the rows over several programs."""
    from fastsft.kernels import rms_norm as kernel

    n_rows, width = 64, 24
    layout = kernel._layout(width)
    assert kernel.backward_programs(n_rows, block_rows=layout["BLOCK_ROWS"], device=torch.device(DEVICE)) > 1
    x = torch.randn(n_rows, width, device=DEVICE, requires_grad=True)
    w = _weight(width, torch.float32, 0.0).requires_grad_(True)
    grad = torch.randn(n_rows, width, device=DEVICE)
    first = torch.autograd.grad(rms_norm(x, w), w, grad)[0]
    second = torch.autograd.grad(rms_norm(x, w), w, grad)[0]
    assert torch.equal(first, second)
    exact = torch.autograd.grad(reference.rms_norm(x.double(), w.double()), w, grad.double())[0]
    assert_close_fp32("d weight", first, exact)


def test_zero_row_is_finite(triton_backend):
    """An all-zero row (e.g. a zeroed padding embedding) normalises to 0 with a finite gradient."""
    x = torch.zeros(3, 32, device=DEVICE)
    x[1] = torch.randn(32, device=DEVICE)
    x.requires_grad_(True)
    w = _weight(32, torch.float32, 0.0).requires_grad_(True)
    y = rms_norm(x, w)
    y.backward(torch.ones_like(y))
    assert torch.equal(y[0], torch.zeros(32, device=DEVICE))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_weight_without_grad(triton_backend):
    x = torch.randn(4, 20, device=DEVICE, requires_grad=True)
    w = _weight(20, torch.float32, 0.0)
    rms_norm(x, w).sum().backward()
    assert x.grad is not None and w.grad is None


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(triton_backend, compile_backend):
    """A decoder-layer-like graph: add + norm, norm, per-head norm; forward and backward match eager."""
    torch._dynamo.reset()
    x, residual = (torch.randn(2, 5, 32, device=DEVICE) for _ in range(2))
    w1, w2 = _weight(32, torch.float32, 0.0), _weight(8, torch.float32, 1.0)

    def layer(ops, x, residual, w1, w2):
        y, summed = ops.add_rms_norm(x, residual, w1, 1e-6)
        heads = ops.rms_norm(y.view(2, 5, 4, 8), w2, 1e-6, offset=1.0)
        return (heads.sum(-1) * 3.0).sum() + summed.square().sum()

    import fastsft.ops as fast

    compiled = torch.compile(lambda *a: layer(fast, *a), fullgraph=True, backend=compile_backend)
    leaves = [t.clone().requires_grad_(True) for t in (x, residual, w1, w2)]
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    exact = [t.double().requires_grad_(True) for t in (x, residual, w1, w2)]
    exact_grads = torch.autograd.grad(layer(reference, *exact), exact)
    for i, (got, want) in enumerate(zip(grads, exact_grads, strict=True)):
        assert_close_fp32(f"grad {i}", got, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(monkeypatch, backend):
    from fastsft.ops.rms_norm import _add_rms_norm_op, _rms_norm_op

    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    x, r = (torch.randn(3, 4, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    w = _weight(16, torch.float32, 0.0).requires_grad_(True)
    torch.library.opcheck(_rms_norm_op, (x, w, 1e-6, 0.0))
    torch.library.opcheck(_add_rms_norm_op, (x, r, w, 1e-6, 1.0))


def test_double_backward_fails_loudly(triton_backend):
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    w = _weight(8, torch.float32, 0.0).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(rms_norm(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_x.sum().backward()


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda x, w: rms_norm(x, w[:-1]), ValueError, "x's last dim is H = 16"),
        (lambda x, w: rms_norm(x.long(), w), TypeError, "float16, bfloat16, float32 or float64"),
        (lambda x, w: rms_norm(x, w.view(4, 4)), ValueError, "weight must be 1-D"),
        (lambda x, w: rms_norm(x, w, eps=-1.0), ValueError, "eps must be a finite float >= 0"),
        (lambda x, w: rms_norm(x, w, eps=float("inf")), ValueError, "eps must be a finite float >= 0, got inf"),
        (lambda x, w: rms_norm(x, w, eps=float("nan")), ValueError, "eps must be a finite float >= 0, got nan"),
        (lambda x, w: rms_norm(x, w, offset=float("nan")), ValueError, "offset must be a finite float, got nan"),
        (lambda x, w: add_rms_norm(x, x, w, offset=float("inf")), ValueError, "offset must be a finite float"),
        (lambda x, w: add_rms_norm(x, x[:, :8], w), ValueError, "residual must match x"),
        (lambda x, w: add_rms_norm(x, x.half(), w), ValueError, "residual must match x"),
    ],
)
def test_clear_errors(call, error, words):
    x, w = torch.randn(3, 16, device=DEVICE), torch.ones(16, device=DEVICE)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        call(x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [2048, 4096, 16384, 20000])
def test_real_size_on_gpu(triton_backend, width):
    """Real widths up to 16k in one tile, and a wider one through the chunked path, in bf16."""
    x, residual = (torch.randn(1024, width, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    w = _weight(width, torch.bfloat16, 0.0)
    assert_op_parity(
        f"add_rms_norm H={width}",
        lambda x, r, w: add_rms_norm(x, r, w),
        reference.add_rms_norm,
        [x, residual, w],
        torch.bfloat16,
        torch_lowp_op=hf_add_rms_norm,
    )
