"""fused_linear_logprobs and per_sequence_sum vs the float64 oracles: forward and every gradient, odd shapes,
ignored rows, per-row incoming gradients (a preference loss weighs each sequence differently)."""

import pytest
import torch
from _losses import exact_copies, loss_and_grads, make_labels, make_linear_inputs
from conftest import DEVICE, assert_close_fp32, assert_within_torch_error

from fastsft.ops import fused_linear_logprobs, per_sequence_sum, reference

CPU_SHAPES = [(1, 16, 17), (37, 40, 75), (70, 33, 300)]
GPU_SHAPES = [pytest.param((4099, 1031, 32003), marks=pytest.mark.gpu)]


def _logprobs(labels, **options):
    return lambda h, w, b=None: fused_linear_logprobs(h, w, labels, bias=b, **options)


def _oracle(labels, **options):
    return lambda h, w, b=None: reference.fused_linear_logprobs(h, w, labels, bias=b, **options)


def _row_grads(n_rows):
    """Incoming gradients of both signs and different sizes per row, as a DPO loss sends."""
    return torch.randn(n_rows, device=DEVICE)


@pytest.mark.parametrize("softcap", [None, 7.5])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("ignored", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", CPU_SHAPES + GPU_SHAPES)
def test_fp32_matches_float64_oracle(triton_backend, shape, ignored, with_bias, softcap):
    n, h, v = shape
    inputs = make_linear_inputs(n, h, v, torch.float32, DEVICE, with_bias=with_bias)
    labels = make_labels(n, v, ignored, DEVICE)
    grad_out = _row_grads(n)
    got, grads = loss_and_grads(_logprobs(labels, softcap=softcap), inputs, grad_out)
    want, exact_grads = loss_and_grads(_oracle(labels, softcap=softcap), exact_copies(*inputs), grad_out)
    assert got.shape == (n,) and got.dtype == torch.float32
    assert_close_fp32("log-probs", got, want)
    assert bool((got <= 0).all())
    assert bool((got[labels == -100] == 0).all())
    for name, g, w in zip(("d hidden", "d weight", "d bias"), grads, exact_grads, strict=False):
        assert_close_fp32(name, g, w)


@pytest.mark.parametrize("shape", [(37, 64, 300)] + GPU_SHAPES)
def test_bf16_error_within_twice_torch_bf16_error(triton_backend, shape):
    n, h, v = shape
    inputs = make_linear_inputs(n, h, v, torch.bfloat16, DEVICE)
    labels = make_labels(n, v, 0.3, DEVICE)
    grad_out = _row_grads(n)

    def torch_lowp(hidden, weight, bias=None):  # what a user gets in plain torch: bf16 logits, fp32 log_softmax
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        targets = labels.clamp_min(0)
        picked = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        return torch.where(labels != -100, picked, torch.zeros_like(picked))

    got, grads = loss_and_grads(_logprobs(labels), inputs, grad_out)
    lowp, lowp_grads = loss_and_grads(torch_lowp, [t.detach().clone().requires_grad_() for t in inputs], grad_out)
    want, exact_grads = loss_and_grads(_oracle(labels), exact_copies(*inputs), grad_out)
    assert_within_torch_error("log-probs", got, lowp, want)
    for name, g, lp, w in zip(("d hidden", "d weight"), grads, lowp_grads, exact_grads, strict=False):
        assert g.dtype == torch.bfloat16
        assert_within_torch_error(name, g, lp, w)


def test_ignored_rows_get_zero_gradient_and_a_positive_zero(triton_backend):
    inputs = make_linear_inputs(9, 16, 40, torch.float32, DEVICE)
    labels = make_labels(9, 40, 0.5, DEVICE)
    out, (grad_hidden, _) = loss_and_grads(_logprobs(labels), inputs, torch.ones(9, device=DEVICE))
    ignored = labels == -100
    assert bool(ignored.any())
    assert bool((grad_hidden[ignored] == 0).all())
    assert not bool(torch.signbit(out[ignored]).any())  # +0.0: sums and prints read as zero, not -0


def test_logprobs_are_minus_the_per_row_cross_entropy(reference_backend):
    """The identity the kernel rests on, against torch's own cross-entropy (not fastsft's)."""
    hidden, weight = (t.detach().double() for t in make_linear_inputs(23, 12, 31, torch.float32, DEVICE))
    labels = make_labels(23, 31, 0.25, DEVICE)
    logits = hidden @ weight.T
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(fused_linear_logprobs(hidden, weight, labels), -ce)


def test_per_sequence_sum_matches_the_oracle_and_its_gradient(reference_backend):
    values = torch.randn(20, dtype=torch.float64, device=DEVICE, requires_grad=True)
    # An empty sequence, a one-token one and uneven lengths.
    cu_seqlens = torch.tensor([0, 3, 3, 4, 11, 20], dtype=torch.int32, device=DEVICE)
    got = per_sequence_sum(values, cu_seqlens)
    want = reference.per_sequence_sum(values, cu_seqlens)
    torch.testing.assert_close(got, want)
    weights = torch.randn(5, dtype=torch.float64, device=DEVICE)
    (grad,) = torch.autograd.grad((got * weights).sum(), values)
    (want_grad,) = torch.autograd.grad((reference.per_sequence_sum(values, cu_seqlens) * weights).sum(), values)
    torch.testing.assert_close(grad, want_grad)
    assert per_sequence_sum(values, torch.tensor([0], device=DEVICE)).shape == (0,)


def test_sequence_logprobs_of_a_packed_row_equal_each_sequence_alone(triton_backend):
    """Packing several sequences into one row changes nothing: the per-sequence sums are the sums each sequence
    gets on its own (rows are independent; documents end with an ignored row, as the packer writes them)."""
    hidden, weight = make_linear_inputs(30, 24, 50, torch.float32, DEVICE)
    labels = make_labels(30, 50, 0.3, DEVICE)
    cu_seqlens = torch.tensor([0, 8, 19, 30], device=DEVICE)
    for end in cu_seqlens[1:]:
        labels[int(end) - 1] = -100
    packed = per_sequence_sum(fused_linear_logprobs(hidden, weight, labels), cu_seqlens)
    for s in range(3):
        a, b = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
        alone = fused_linear_logprobs(hidden[a:b], weight, labels[a:b]).sum()
        torch.testing.assert_close(packed[s], alone, rtol=1e-6, atol=1e-6)


def test_bad_input_names_the_op_and_the_tensor():
    hidden = torch.randn(4, 8)
    weight = torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"fused_linear_logprobs: hidden is \[N, H\] = \(4, 8\) but weight"):
        fused_linear_logprobs(hidden, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="fused_linear_logprobs: weight dtype"):
        fused_linear_logprobs(hidden, weight.double(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="fused_linear_logprobs"):
        fused_linear_logprobs(hidden, weight, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="per_sequence_sum: cu_seqlens"):
        per_sequence_sum(torch.randn(4), torch.tensor([0.0, 4.0]))
    with pytest.raises(ValueError, match="per_sequence_sum: values"):
        per_sequence_sum(torch.arange(4), torch.tensor([0, 4]))


def test_compiles_without_graph_breaks(reference_backend):
    hidden, weight = (t.detach() for t in make_linear_inputs(12, 16, 20, torch.float32, DEVICE))
    labels = make_labels(12, 20, 0.25, DEVICE)
    cu_seqlens = torch.tensor([0, 5, 12], device=DEVICE)

    def sums(h, w):
        return per_sequence_sum(fused_linear_logprobs(h, w, labels), cu_seqlens)

    compiled = torch.compile(sums, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(hidden, weight), sums(hidden, weight))
