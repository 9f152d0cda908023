"""fused_linear_cross_entropy vs the float64 oracle: forward and every gradient, all options."""

import pytest
import torch
from _losses import (
    OPTION_SETS,
    exact_copies,
    loss_and_grads,
    make_labels,
    make_linear_inputs,
    torch_lowp_linear_cross_entropy,
)
from conftest import DEVICE, assert_close_fp32, assert_within_torch_error

from fastsft.ops import fused_linear_cross_entropy, reference

# (N, H, V): odd sizes that are multiples of no block size, a single row, a tiny vocabulary.
CPU_SHAPES = [(1, 16, 17), (37, 40, 75), (70, 33, 300), (19, 48, 1000)]
GPU_SHAPES = [
    pytest.param((4099, 1031, 32003), marks=pytest.mark.gpu),
    pytest.param((2051, 4096, 50257), marks=pytest.mark.gpu),
]


def _flce(labels, **options):
    return lambda h, w, b=None: fused_linear_cross_entropy(h, w, labels, bias=b, **options)


def _oracle(labels, **options):
    return lambda h, w, b=None: reference.fused_linear_cross_entropy(h, w, labels, bias=b, **options)


def _grad_out(reduction, n_rows):
    return torch.rand(n_rows, device=DEVICE) + 0.5 if reduction == "none" else None


def _check_fp32(n, h, v, ignored, reduction, options, with_bias):
    inputs = make_linear_inputs(n, h, v, torch.float32, DEVICE, with_bias=with_bias)
    labels = make_labels(n, v, ignored, DEVICE)
    grad_out = _grad_out(reduction, n)
    opts = dict(options, reduction=reduction)
    loss, grads = loss_and_grads(_flce(labels, **opts), inputs, grad_out)
    exact_loss, exact_grads = loss_and_grads(_oracle(labels, **opts), exact_copies(*inputs), grad_out)
    assert loss.dtype == torch.float32
    assert_close_fp32("loss", loss, exact_loss)
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, exact_grads, strict=False):
        assert got.dtype == torch.float32
        assert_close_fp32(name, got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", CPU_SHAPES + GPU_SHAPES)
def test_fp32_matches_float64_oracle(triton_backend, shape, ignored, reduction):
    _check_fp32(*shape, ignored, reduction, {}, with_bias=False)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_fp32_options_and_bias(triton_backend, option_set, reduction):
    _check_fp32(45, 40, 211, 0.5, reduction, OPTION_SETS[option_set], with_bias=True)


@pytest.mark.parametrize("option_set", ["plain", "all"])
@pytest.mark.parametrize("ignored", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(37, 64, 300), (70, 48, 1000)] + GPU_SHAPES)
def test_bf16_error_within_twice_torch_bf16_error(triton_backend, shape, ignored, option_set):
    n, h, v = shape
    inputs = make_linear_inputs(n, h, v, torch.bfloat16, DEVICE, with_bias=option_set == "all")
    labels = make_labels(n, v, ignored, DEVICE)
    opts = OPTION_SETS[option_set]
    loss, grads = loss_and_grads(_flce(labels, **opts), inputs)
    lowp_loss, lowp_grads = loss_and_grads(
        lambda h_, w_, b_=None: torch_lowp_linear_cross_entropy(h_, w_, labels, bias=b_, **opts),
        [t.detach().clone().requires_grad_() for t in inputs],
    )
    exact_loss, exact_grads = loss_and_grads(_oracle(labels, **opts), exact_copies(*inputs))
    assert_within_torch_error("loss", loss, lowp_loss, exact_loss)
    for name, got, lowp, want in zip(("d hidden", "d weight", "d bias"), grads, lowp_grads, exact_grads, strict=False):
        assert got.dtype == torch.bfloat16
        assert_within_torch_error(name, got, lowp, want)


def test_fp16(triton_backend):
    inputs = make_linear_inputs(33, 48, 257, torch.float16, DEVICE)
    labels = make_labels(33, 257, 0.3, DEVICE)
    loss, grads = loss_and_grads(_flce(labels), inputs)
    lowp_loss, lowp_grads = loss_and_grads(
        lambda h_, w_: torch_lowp_linear_cross_entropy(h_, w_, labels),
        [t.detach().clone().requires_grad_() for t in inputs],
    )
    exact_loss, exact_grads = loss_and_grads(_oracle(labels), exact_copies(*inputs))
    assert_within_torch_error("loss", loss, lowp_loss, exact_loss)
    for name, got, lowp, want in zip(("d hidden", "d weight"), grads, lowp_grads, exact_grads, strict=True):
        assert got.dtype == torch.float16
        assert_within_torch_error(name, got, lowp, want)


def test_large_vocabulary(triton_backend):
    """A GPT-2-sized vocabulary (the interpreter's slowest case; ~20 s on CPU)."""
    _check_fp32(24, 32, 50257, 0.5, "mean", {"softcap": 10.0}, with_bias=False)


def test_many_chunks_match_one_chunk(triton_backend, monkeypatch):
    """A workspace smaller than the rows forces many row chunks (and chunks holding only ignored rows)."""
    inputs = make_linear_inputs(70, 40, 130, torch.float32, DEVICE, with_bias=True)
    labels = make_labels(70, 130, 0.5, DEVICE)
    exact_loss, exact_grads = loss_and_grads(_oracle(labels, z_loss=1e-3), exact_copies(*inputs))
    monkeypatch.setenv("FASTSFT_FLCE_WORKSPACE_MB", str(16 * 130 * 4 / 2**20))  # one 16-row block per chunk
    loss, grads = loss_and_grads(_flce(labels, z_loss=1e-3), inputs)
    assert_close_fp32("loss", loss, exact_loss)
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, exact_grads, strict=True):
        assert_close_fp32(name, got, want)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ignored_rows_never_reach_the_matmul(backend, monkeypatch):
    """Prompt rows holding NaN/inf must not leak into anything: a row that reached the lm_head matmul,
    forward or backward, would poison the loss and the weight gradient."""
    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    hidden, weight = make_linear_inputs(41, 40, 150, torch.float32, DEVICE)
    labels = make_labels(41, 150, 0.5, DEVICE)
    ignored = labels == -100
    clean_loss, clean_grads = loss_and_grads(_flce(labels), [hidden, weight])
    poisoned = hidden.detach().clone()
    poisoned[ignored] = float("nan")
    poisoned[ignored.nonzero()[0]] = float("inf")
    poisoned.requires_grad_()
    loss, (grad_hidden, grad_weight) = loss_and_grads(_flce(labels), [poisoned, weight])
    assert torch.isfinite(loss) and torch.equal(loss, clean_loss)
    assert torch.equal(grad_weight, clean_grads[1])
    assert torch.equal(grad_hidden[~ignored], clean_grads[0][~ignored])
    assert torch.count_nonzero(grad_hidden[ignored]) == 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_supervised_rows_gives_zero_loss_and_zero_grads(backend, reduction, monkeypatch):
    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    inputs = make_linear_inputs(20, 32, 100, torch.float32, DEVICE, with_bias=True)
    labels = torch.full((20,), -100, device=DEVICE)
    loss, grads = loss_and_grads(_flce(labels, reduction=reduction, z_loss=1e-2), inputs, _grad_out(reduction, 20))
    assert not torch.isnan(loss).any() and torch.count_nonzero(loss) == 0
    for grad in grads:
        assert grad is not None and torch.count_nonzero(grad) == 0 and not torch.isnan(grad).any()


def test_custom_ignore_index_and_int32_labels(triton_backend):
    hidden, weight = make_linear_inputs(30, 32, 90, torch.float32, DEVICE)
    labels = make_labels(30, 90, 0.4, DEVICE, ignore_index=-1).to(torch.int32)
    loss, grads = loss_and_grads(_flce(labels, ignore_index=-1), [hidden, weight])
    exact_loss, exact_grads = loss_and_grads(_oracle(labels.long(), ignore_index=-1), exact_copies(hidden, weight))
    assert_close_fp32("loss", loss, exact_loss)
    assert_close_fp32("d hidden", grads[0], exact_grads[0])


def test_incoming_gradient_scales_precomputed_grads(triton_backend):
    """mean/sum compute gradients in the forward; the backward must scale them by the real incoming grad."""
    hidden, weight = make_linear_inputs(25, 32, 80, torch.float32, DEVICE)
    labels = make_labels(25, 80, 0.2, DEVICE)
    _, grads = loss_and_grads(lambda h, w: 3.5 * _flce(labels)(h, w), [hidden, weight])
    _, exact = loss_and_grads(lambda h, w: 3.5 * _oracle(labels)(h, w), exact_copies(hidden, weight))
    assert_close_fp32("d hidden", grads[0], exact[0])
    assert_close_fp32("d weight", grads[1], exact[1])


def test_frozen_weight_and_no_grad(triton_backend):
    hidden, weight = make_linear_inputs(25, 32, 80, torch.float32, DEVICE)
    weight.requires_grad_(False)
    labels = make_labels(25, 80, 0.2, DEVICE)
    loss, (grad_hidden, grad_weight) = loss_and_grads(_flce(labels), [hidden, weight])
    assert grad_weight is None and grad_hidden is not None
    with torch.no_grad():
        assert torch.equal(_flce(labels)(hidden, weight), loss)


def test_non_contiguous_inputs(triton_backend):
    """Column-major hidden, a row-strided view of it, and a transposed-storage weight."""
    hidden, weight = make_linear_inputs(60, 64, 90, torch.float32, DEVICE)
    labels = make_labels(30, 90, 0.3, DEVICE)
    column_major = hidden.detach().t().contiguous().t().requires_grad_()
    weight_t = weight.detach().t().contiguous().t().requires_grad_()
    loss = fused_linear_cross_entropy(column_major[::2], weight_t, labels)
    loss.backward()
    exact_hidden, exact_weight = exact_copies(hidden.detach()[::2], weight)
    exact_loss, exact_grads = loss_and_grads(_oracle(labels), [exact_hidden, exact_weight])
    assert_close_fp32("loss", loss.detach(), exact_loss)
    assert_close_fp32("d hidden", column_major.grad[::2], exact_grads[0])
    assert torch.count_nonzero(column_major.grad[1::2]) == 0
    assert_close_fp32("d weight", weight_t.grad, exact_grads[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_backend_gradients_match_autograd(reference_backend, reduction):
    """The hand-written gradients of the reference backend (run inside the custom op) vs autograd."""
    inputs = make_linear_inputs(40, 24, 60, torch.float32, DEVICE, with_bias=True)
    labels = make_labels(40, 60, 0.5, DEVICE)
    opts = dict(OPTION_SETS["all"], reduction=reduction)
    grad_out = _grad_out(reduction, 40)
    loss, grads = loss_and_grads(_flce(labels, **opts), inputs, grad_out)
    exact_loss, exact_grads = loss_and_grads(_oracle(labels, **opts), exact_copies(*inputs), grad_out)
    assert_close_fp32("loss", loss, exact_loss)
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, exact_grads, strict=True):
        assert_close_fp32(name, got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reference_backend, reduction):
    """Finite differences through the custom op and its registered autograd (float64 runs on reference)."""
    hidden, weight, bias = exact_copies(*make_linear_inputs(7, 5, 11, torch.float32, DEVICE, with_bias=True))
    labels = make_labels(7, 11, 0.3, DEVICE)
    fn = _flce(labels, reduction=reduction, **OPTION_SETS["all"])
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
