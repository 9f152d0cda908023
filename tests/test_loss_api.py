"""The loss ops' contract beyond numerics: torch.compile, clear errors, backend rule, no host sync."""

import re

import pytest
import torch
from _losses import exact_copies, loss_and_grads, make_labels, make_linear_inputs
from conftest import DEVICE, HAS_CUDA, assert_close_fp32

from fastsft.ops import cross_entropy, fused_linear_cross_entropy, reference
from fastsft.ops._backend import select_backend


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(triton_backend, compile_backend, reduction):
    """One graph through the custom ops, forward and backward, with the same numbers as eager."""
    torch._dynamo.reset()
    hidden, weight, bias = make_linear_inputs(29, 32, 70, torch.float32, DEVICE, with_bias=True)
    labels = make_labels(29, 70, 0.5, DEVICE)

    def step(h, w, b, y):
        loss = fused_linear_cross_entropy(h, w, y, bias=b, reduction=reduction, softcap=5.0)
        logits = (h[:3] @ w.T).detach()  # a materialised-logits loss in the same graph
        return loss.sum() + 0.5 * cross_entropy(logits, y[:3], label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    loss, grads = loss_and_grads(lambda h, w, b: compiled(h, w, b, labels), [hidden, weight, bias])
    exact_loss, exact_grads = loss_and_grads(
        lambda h, w, b: (
            reference.fused_linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, softcap=5.0).sum()
            + 0.5 * reference.cross_entropy((h[:3] @ w.T).detach(), labels[:3], label_smoothing=0.1)
        ),
        exact_copies(hidden, weight, bias),
    )
    assert_close_fp32("loss", loss, exact_loss)
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, exact_grads, strict=True):
        assert_close_fp32(name, got, want)


def test_compiled_backward_with_expanded_incoming_gradient(triton_backend):
    """Under compile the 'none' backward receives the grad of .sum(): an expanded, stride-0 tensor."""
    torch._dynamo.reset()
    hidden, weight = make_linear_inputs(21, 32, 50, torch.float32, DEVICE)
    labels = make_labels(21, 50, 0.3, DEVICE)
    compiled = torch.compile(
        lambda h, w: fused_linear_cross_entropy(h, w, labels, reduction="none").sum(), fullgraph=True
    )
    _, grads = loss_and_grads(compiled, [hidden, weight])
    _, exact = loss_and_grads(
        lambda h, w: reference.fused_linear_cross_entropy(h, w, labels, reduction="sum"), exact_copies(hidden, weight)
    )
    assert_close_fp32("d hidden", grads[0], exact[0])
    assert_close_fp32("d weight", grads[1], exact[1])


def _inputs():
    hidden, weight = make_linear_inputs(8, 16, 20, torch.float32, DEVICE)
    return hidden, weight, make_labels(8, 20, 0.0, DEVICE)


@pytest.mark.parametrize(
    "mutate, error, words",
    [
        (lambda h, w, y: (h[0], w, y), ValueError, "hidden must be 2-D [N, H]"),
        (lambda h, w, y: (h, w[:, :5], y), ValueError, "H differs"),
        (lambda h, w, y: (h, w.double(), y), TypeError, "weight dtype torch.float64 differs"),
        (lambda h, w, y: (h.int(), w, y), TypeError, "hidden must be float16, bfloat16, float32"),
        (lambda h, w, y: (h, w, y[:5]), ValueError, "labels must be [N] with N = 8"),
        (lambda h, w, y: (h, w, y.float()), TypeError, "labels must be an integer tensor"),
        (lambda h, w, y: (h, w, torch.where(y == y[0], 20, y)), ValueError, "is outside [0, 20)"),
        (lambda h, w, y: (h, w, torch.where(y == y[0], -5, y)), ValueError, "labels[0] = -5"),
        (lambda h, w, y: (h, w[:0], y), ValueError, "empty vocabulary"),
        (lambda h, w, y: (h, w.to("meta"), y), ValueError, "weight is on meta but hidden is on cpu"),
        (lambda h, w, y: (h, w, y.to("meta")), ValueError, "labels is on meta but the inputs are on cpu"),
    ],
)
def test_fused_linear_cross_entropy_errors(mutate, error, words):
    hidden, weight, labels = mutate(*_inputs())
    with pytest.raises(error, match=None) as info:
        fused_linear_cross_entropy(hidden, weight, labels)
    assert words in str(info.value) and "fused_linear_cross_entropy" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"reduction": "avg"}, "reduction must be 'mean', 'sum' or 'none'"),
        ({"label_smoothing": 1.5}, "label_smoothing must be in [0, 1]"),
        ({"z_loss": -1.0}, "z_loss must be a finite float >= 0"),
        ({"z_loss": float("nan")}, "z_loss must be a finite float >= 0"),
        ({"z_loss": float("inf")}, "z_loss must be a finite float >= 0"),
        ({"softcap": 0.0}, "softcap must be None or a finite float > 0"),
        ({"softcap": float("inf")}, "softcap must be None or a finite float > 0"),
        ({"label_smoothing": float("nan")}, "label_smoothing must be in [0, 1]"),
        ({"bias": torch.zeros(7)}, "bias must be [V] = [20]"),
    ],
)
def test_option_errors(kwargs, words):
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError) as info:
        fused_linear_cross_entropy(hidden, weight, labels, **kwargs)
    assert words in str(info.value)
    if "bias" not in kwargs:  # the logits op takes the same options and the same checks
        with pytest.raises(ValueError, match=re.escape(words)):
            cross_entropy(hidden @ weight.T, labels, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_custom_ops(reference_backend, reduction):
    """torch.library.opcheck: schema, fake (meta) implementations and autograd registration agree."""
    from fastsft.ops.cross_entropy import _ce_op, _flce_op

    hidden, weight, bias = make_linear_inputs(9, 8, 13, torch.float32, DEVICE, with_bias=True)
    labels = make_labels(9, 13, 0.3, DEVICE)
    torch.library.opcheck(_flce_op, (hidden, weight, labels, bias, -100, reduction, 0.1, 1e-3, 5.0, True, True, True))
    logits = (torch.randn(9, 13, device=DEVICE)).requires_grad_()
    torch.library.opcheck(_ce_op, (logits, labels, -100, reduction, 0.1, 1e-3, 5.0))


def test_cross_entropy_errors():
    with pytest.raises(ValueError, match=r"logits must be 2-D \[N, V\]"):
        cross_entropy(torch.zeros(3, 4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels\[1\] = 9 is outside \[0, 5\)"):
        cross_entropy(torch.zeros(3, 5), torch.tensor([0, 9, -100]))


def test_backend_rule(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("FASTSFT_BACKEND", "auto")
    assert select_backend("op", cpu) == "reference"
    monkeypatch.setenv("FASTSFT_BACKEND", "reference")
    assert select_backend("op", cpu) == "reference"
    monkeypatch.setenv("FASTSFT_BACKEND", "triton")
    assert select_backend("op", cpu) == "triton"  # the interpreter is on in the CPU suite
    with pytest.raises(TypeError, match="float64 runs with FASTSFT_BACKEND=reference"):
        select_backend("op", cpu.double())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="needs the Triton interpreter"):
            select_backend("op", cpu)
    monkeypatch.setenv("FASTSFT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTSFT_BACKEND='fast' is not one of auto, triton, reference$"):
        select_backend("op", cpu)
    monkeypatch.setenv("FASTSFT_BACKEND", "cuda")  # no native CUDA kernel exists, so no such backend either
    with pytest.raises(ValueError, match="FASTSFT_BACKEND='cuda' is not one of auto, triton, reference$"):
        select_backend("op", cpu)


@pytest.mark.gpu
def test_auto_uses_triton_on_cuda(monkeypatch):
    monkeypatch.setenv("FASTSFT_BACKEND", "auto")
    assert select_backend("op", torch.zeros(1, device="cuda")) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_on_cuda(triton_backend, reduction):
    """The whole forward and backward runs with CUDA's sync debug mode set to raise on any host sync."""
    hidden, weight = make_linear_inputs(4099, 1024, 32003, torch.bfloat16, DEVICE)
    labels = make_labels(4099, 32003, 0.5, DEVICE)
    grad_out = torch.rand(4099, device=DEVICE) if reduction == "none" else None
    fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)  # warm-up: compile kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
        loss.backward(grad_out) if grad_out is not None else loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(hidden.grad.float()).all()


@pytest.mark.gpu
def test_int64_offsets(triton_backend):
    """V * H > 2^31 elements: every weight / workspace offset must be computed in 64 bits."""
    n, h, v = 67, 16400, 131101
    hidden, weight = make_linear_inputs(n, h, v, torch.bfloat16, DEVICE)
    labels = make_labels(n, v, 0.3, DEVICE)
    labels[0] = v - 1  # a target in the last rows of the weight
    loss, (grad_hidden, grad_weight) = loss_and_grads(
        lambda a, b: fused_linear_cross_entropy(a, b, labels), [hidden, weight]
    )
    exact = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    exact_loss, exact_grads = loss_and_grads(lambda a, b: reference.fused_linear_cross_entropy(a, b, labels), exact)
    assert abs(loss.item() - exact_loss.item()) <= 1e-3 * abs(exact_loss.item())
    for got, want in zip((grad_hidden, grad_weight), exact_grads, strict=True):
        rel = (got.float() - want).norm() / want.norm()
        assert rel < 1e-2, f"relative error {rel:.2e}"


@pytest.mark.gpu
def test_memory_stays_within_the_stated_bound(triton_backend):
    """Peak extra memory of forward+backward <= workspace + fp32 grad_weight + outputs + O(N) stats, far
    below the [N, V] logits a plain implementation would hold."""
    n, h, v = 16384, 2048, 128256
    hidden, weight = make_linear_inputs(n, h, v, torch.bfloat16, DEVICE)
    labels = make_labels(n, v, 0.5, DEVICE)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    peak = torch.cuda.max_memory_allocated() - base
    workspace = 512 * 2**20 + 128 * v * 4
    bound = workspace + v * h * (4 + 2 + 2) + n * h * 2 * 2 + n * 64
    assert peak <= bound, f"peak {peak / 2**30:.2f} GiB > bound {bound / 2**30:.2f} GiB"
    assert peak < n * v * 2  # less than one bf16 copy of the logits


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fp16_with_a_loss_scaler(backend, monkeypatch):
    """GradScaler multiplies the loss by 2^16: fp16 gradients must stay finite and as accurate as torch's
    own fp16 path (unit-scale gradients computed in the forward would underflow before the scale)."""
    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    from _losses import torch_lowp_linear_cross_entropy

    hidden, weight = make_linear_inputs(300, 32, 400, torch.float16, DEVICE, logit_scale=0.5)
    labels = make_labels(300, 400, 0.3, DEVICE)
    scale = 65536.0
    _, grads = loss_and_grads(lambda h, w: fused_linear_cross_entropy(h, w, labels) * scale, [hidden, weight])
    _, torch_grads = loss_and_grads(
        lambda h, w: torch_lowp_linear_cross_entropy(h, w, labels) * scale,
        [t.detach().clone().requires_grad_() for t in (hidden, weight)],
    )
    _, exact = loss_and_grads(
        lambda h, w: reference.fused_linear_cross_entropy(h, w, labels) * scale, exact_copies(hidden, weight)
    )
    for got, theirs, want in zip(grads, torch_grads, exact, strict=True):
        assert torch.isfinite(got).all()
        err = (got.double() - want).norm() / want.norm()
        torch_err = (theirs.double() - want).norm() / want.norm()
        assert err <= 2 * torch_err + 1e-6, f"relative error {err:.2e} vs torch fp16 {torch_err:.2e}"


def test_incoming_gradient_is_applied_in_fp32():
    """bf16 gradients times 1/3 (a loss divided by a token count) are rounded once, not twice."""
    from fastsft.ops.cross_entropy import _scaled

    grad = torch.randn(1000, 7).to(torch.bfloat16)
    factor = torch.tensor(1.0 / 3.0)
    assert torch.equal(_scaled(grad, factor, slice_elements=999), (grad.float() * factor).to(torch.bfloat16))


def test_double_backward_fails_loudly(reference_backend):
    hidden, weight = make_linear_inputs(8, 4, 10, torch.float32, DEVICE)
    labels = make_labels(8, 10, 0.0, DEVICE)
    (grad_hidden,) = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, labels), hidden, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad_hidden.pow(2).sum(), hidden)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_masked_vocabulary_with_minus_inf_logits(backend, monkeypatch):
    """-inf logits (a masked vocabulary, including a whole first slice) give torch's finite loss, not NaN."""
    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    logits = torch.randn(12, 200, device=DEVICE)
    logits[:, :150] = float("-inf")
    labels = torch.randint(150, 200, (12,), device=DEVICE)
    ours = cross_entropy(logits, labels)
    theirs = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.isfinite(ours) and abs(ours.item() - theirs.item()) < 1e-5


def test_compile_with_non_contiguous_logits_on_the_reference_backend(reference_backend):
    torch._dynamo.reset()
    logits = torch.randn(20, 9, device=DEVICE).t().requires_grad_()  # [9, 20], column-major
    labels = make_labels(9, 20, 0.2, DEVICE)
    compiled = torch.compile(lambda x: cross_entropy(x, labels), fullgraph=True, backend="aot_eager")
    loss, (grad,) = loss_and_grads(compiled, [logits])
    exact_loss, (exact_grad,) = loss_and_grads(lambda x: reference.cross_entropy(x, labels), exact_copies(logits))
    assert_close_fp32("loss", loss, exact_loss)
    assert_close_fp32("d logits", grad, exact_grad)


def test_narrow_label_dtypes_are_rejected():
    hidden, weight, labels = _inputs()
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fused_linear_cross_entropy(hidden, weight, labels.to(torch.uint8))
