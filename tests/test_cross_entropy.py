"""cross_entropy (on materialised logits) vs the float64 oracle and torch's own low precision."""

import pytest
import torch
from _losses import OPTION_SETS, exact_copies, loss_and_grads, make_labels, torch_lowp_cross_entropy
from conftest import DEVICE, assert_close_fp32, assert_within_torch_error

from fastsft.ops import cross_entropy, reference

CPU_SHAPES = [(1, 17), (37, 75), (64, 1000), (9, 50257)]
GPU_SHAPES = [pytest.param((4099, 128256), marks=pytest.mark.gpu), pytest.param((1000, 152064), marks=pytest.mark.gpu)]


def _logits(n, v, dtype):
    return (torch.randn(n, v, device=DEVICE) * 3.0).to(dtype).requires_grad_()


def _grad_out(reduction, n):
    return torch.rand(n, device=DEVICE) + 0.5 if reduction == "none" else None


def _check_fp32(n, v, ignored, reduction, options):
    logits = _logits(n, v, torch.float32)
    labels = make_labels(n, v, ignored, DEVICE)
    opts = dict(options, reduction=reduction)
    grad_out = _grad_out(reduction, n)
    loss, (grad,) = loss_and_grads(lambda x: cross_entropy(x, labels, **opts), [logits], grad_out)
    exact_loss, (exact_grad,) = loss_and_grads(
        lambda x: reference.cross_entropy(x, labels, **opts), exact_copies(logits), grad_out
    )
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_close_fp32("loss", loss, exact_loss)
    assert_close_fp32("d logits", grad, exact_grad)
    assert torch.count_nonzero(grad[labels == -100]) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", CPU_SHAPES[:3] + GPU_SHAPES)
def test_fp32_matches_float64_oracle(triton_backend, shape, ignored, reduction):
    _check_fp32(*shape, ignored, reduction, {})


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_fp32_options(triton_backend, option_set, reduction):
    _check_fp32(45, 300, 0.5, reduction, OPTION_SETS[option_set])


def test_large_vocabulary_fp32(triton_backend):
    n, v = CPU_SHAPES[3]
    logits = _logits(n, v, torch.float32)
    labels = make_labels(n, v, 0.3, DEVICE)
    loss, (grad,) = loss_and_grads(lambda x: cross_entropy(x, labels, z_loss=1e-4), [logits])
    exact_loss, (exact_grad,) = loss_and_grads(
        lambda x: reference.cross_entropy(x, labels, z_loss=1e-4), exact_copies(logits)
    )
    assert_close_fp32("loss", loss, exact_loss)
    assert_close_fp32("d logits", grad, exact_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option_set", ["plain", "label_smoothing", "softcap", "all"])
@pytest.mark.parametrize("shape", [(37, 75), (64, 1000)] + GPU_SHAPES)
def test_low_precision_error_within_twice_torch_error(triton_backend, shape, option_set, dtype):
    n, v = shape
    logits = _logits(n, v, dtype)
    labels = make_labels(n, v, 0.5, DEVICE)
    opts = OPTION_SETS[option_set]
    loss, (grad,) = loss_and_grads(lambda x: cross_entropy(x, labels, **opts), [logits])
    lowp_loss, (lowp_grad,) = loss_and_grads(
        lambda x: torch_lowp_cross_entropy(x, labels, **opts), [logits.detach().clone().requires_grad_()]
    )
    exact_loss, (exact_grad,) = loss_and_grads(
        lambda x: reference.cross_entropy(x, labels, **opts), exact_copies(logits)
    )
    assert grad.dtype == dtype
    assert_within_torch_error("loss", loss, lowp_loss, exact_loss)
    assert_within_torch_error("d logits", grad, lowp_grad, exact_grad)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_all_ignored_mean_is_zero_not_nan(backend, monkeypatch):
    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    logits = _logits(6, 40, torch.float32)
    labels = torch.full((6,), -100, device=DEVICE)
    loss, (grad,) = loss_and_grads(lambda x: cross_entropy(x, labels), [logits])
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_matches_torch_cross_entropy_semantics(triton_backend):
    """Same numbers as torch.nn.functional.cross_entropy (with label smoothing and ignore_index)."""
    logits = _logits(50, 300, torch.float32)
    labels = make_labels(50, 300, 0.4, DEVICE)
    ours = cross_entropy(logits, labels, label_smoothing=0.1)
    theirs = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert_close_fp32("loss", ours.detach(), theirs.detach().double())


def test_reference_backend_gradients_match_autograd(reference_backend):
    logits = _logits(30, 50, torch.float32)
    labels = make_labels(30, 50, 0.5, DEVICE)
    opts = dict(OPTION_SETS["all"], reduction="none")
    grad_out = _grad_out("none", 30)
    loss, (grad,) = loss_and_grads(lambda x: cross_entropy(x, labels, **opts), [logits], grad_out)
    exact_loss, (exact_grad,) = loss_and_grads(
        lambda x: reference.cross_entropy(x, labels, **opts), exact_copies(logits), grad_out
    )
    assert_close_fp32("loss", loss, exact_loss)
    assert_close_fp32("d logits", grad, exact_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reference_backend, reduction):
    logits = (torch.randn(6, 9, device=DEVICE, dtype=torch.float64) * 2).requires_grad_()
    labels = make_labels(6, 9, 0.3, DEVICE)
    fn = lambda x: cross_entropy(x, labels, reduction=reduction, **OPTION_SETS["all"])
    assert torch.autograd.gradcheck(fn, (logits,))
