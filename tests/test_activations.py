"""swiglu and geglu: forward and backward vs the float64 reference, layouts, saturation, contract."""

import pytest
import torch
import torch.nn.functional as F
from _parity import assert_op_parity
from conftest import DEVICE, assert_close_fp32

from fastsft.ops import geglu, reference, swiglu

OPS = {
    "swiglu": (swiglu, reference.swiglu, lambda g, u: F.silu(g) * u),
    "geglu": (geglu, reference.geglu, lambda g, u: F.gelu(g, approximate="tanh") * u),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (2, 3, 130)], ids=str)
def test_matches_reference(triton_backend, name, dtype, shape):
    op, ref, torch_op = OPS[name]
    gate = torch.randn(shape, dtype=dtype, device=DEVICE) * 3  # reaches well into both tails
    up = torch.randn(shape, dtype=dtype, device=DEVICE)
    assert_op_parity(f"{name} {shape} {dtype}", op, ref, [gate, up], dtype, torch_lowp_op=torch_op)


@pytest.mark.parametrize("name", OPS)
def test_reference_backward_is_autograd_of_torchs_activation(name):
    """The hand-written derivative in the reference (run by the reference backend and mirrored by the
    kernel) equals autograd of torch's own silu / tanh-gelu in float64, far into the tails."""
    gate = torch.linspace(-30, 30, 601, dtype=torch.float64, device=DEVICE).requires_grad_(True)
    up = torch.randn(601, dtype=torch.float64, device=DEVICE).requires_grad_(True)
    grad_out = torch.randn(601, dtype=torch.float64, device=DEVICE)
    torch_op = OPS[name][2]
    exact = torch.autograd.grad(torch_op(gate, up), (gate, up), grad_out)
    activation = "silu" if name == "swiglu" else "gelu_tanh"
    written = reference.gated_activation_with_grads(grad_out, gate.detach(), up.detach(), activation)
    for got, want in zip(written, exact, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("name", OPS)
def test_saturated_gates_stay_finite(triton_backend, name):
    """Gates of +-100 and +-1e4 (sigmoid saturates; exp overflows to inf) give exact limits, no NaN."""
    op, _, torch_op = OPS[name]
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]], device=DEVICE, requires_grad=True)
    up = torch.full_like(gate, 2.0, requires_grad=True)
    out = op(gate, up)
    grad_gate, grad_up = torch.autograd.grad(out, (gate, up), torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(grad_gate).all() and torch.isfinite(grad_up).all()
    expected = torch_op(gate.detach().double(), up.detach().double())
    assert_close_fp32("saturated out", out, expected)
    assert grad_gate[0, 0] == 0 and grad_gate[0, -1] == 2.0  # act'(-inf) = 0, act'(+inf) = 1


@pytest.mark.parametrize("name", OPS)
def test_halves_of_a_fused_gate_up_projection(triton_backend, name):
    """gate/up as the two halves of one [..., 2I] projection output (non-contiguous views) equal the
    contiguous computation, gradients included."""
    op = OPS[name][0]
    gate_up = torch.randn(3, 4, 2 * 50, device=DEVICE, requires_grad=True)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    out = op(gate, up)
    (grad_gate_up,) = torch.autograd.grad(out, gate_up, torch.ones_like(out))
    g2, u2 = (t.detach().contiguous().requires_grad_(True) for t in (gate, up))
    out2 = op(g2, u2)
    grads2 = torch.autograd.grad(out2, (g2, u2), torch.ones_like(out2))
    assert torch.equal(out, out2)
    assert torch.equal(grad_gate_up, torch.cat(grads2, dim=-1))


@pytest.mark.parametrize("name", OPS)
def test_backward_saves_only_gate_and_up(triton_backend, name):
    """The activation is recomputed in the backward: the saved tensors are exactly the two inputs."""
    op = OPS[name][0]
    gate, up = (torch.randn(4, 24, device=DEVICE, requires_grad=True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        op(gate, up)
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(triton_backend, compile_backend):
    torch._dynamo.reset()
    gate, up = (torch.randn(3, 40, device=DEVICE) for _ in range(2))

    def mlp(ops, gate, up):
        return (ops.swiglu(gate, up) * 2.0).sum() + ops.geglu(up, gate).square().sum()

    import fastsft.ops as fast

    compiled = torch.compile(lambda g, u: mlp(fast, g, u), fullgraph=True, backend=compile_backend)
    leaves = [t.clone().requires_grad_(True) for t in (gate, up)]
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    exact = [t.double().requires_grad_(True) for t in (gate, up)]
    exact_grads = torch.autograd.grad(mlp(reference, *exact), exact)
    for i, (got, want) in enumerate(zip(grads, exact_grads, strict=True)):
        assert_close_fp32(f"grad {i}", got, want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(monkeypatch, backend):
    from fastsft.ops.activations import _gated_op

    monkeypatch.setenv("FASTSFT_BACKEND", backend)
    gate, up = (torch.randn(3, 5, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    for activation in ("silu", "gelu_tanh"):
        torch.library.opcheck(_gated_op, (gate, up, activation))


@pytest.mark.parametrize("shape", [(0, 16), (4, 0), (2, 0, 3)], ids=str)
def test_empty_input(triton_backend, shape):
    gate = torch.empty(shape, device=DEVICE, requires_grad=True)
    out = swiglu(gate, torch.empty(shape, device=DEVICE))
    out.sum().backward()
    assert out.shape == shape and gate.grad.shape == shape


def test_double_backward_fails_loudly(triton_backend):
    gate, up = (torch.randn(3, 8, device=DEVICE, requires_grad=True) for _ in range(2))
    (grad_gate,) = torch.autograd.grad(swiglu(gate, up).sum(), gate, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_gate.sum().backward()


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda g: swiglu(g, g[:, :3]), ValueError, "gate and up must match"),
        (lambda g: geglu(g, g.half()), ValueError, "gate and up must match"),
        (lambda g: swiglu(g.long(), g.long()), TypeError, "float16, bfloat16, float32 or float64"),
    ],
)
def test_clear_errors(call, error, words):
    with pytest.raises(error, match=words):
        call(torch.randn(2, 8, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPS)
def test_real_size_on_gpu(triton_backend, name):
    """Llama-3-8B MLP width, 2048 tokens, bf16."""
    op, ref, torch_op = OPS[name]
    gate, up = (torch.randn(2048, 14336, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    assert_op_parity(f"{name} 8B", op, ref, [gate, up], torch.bfloat16, torch_lowp_op=torch_op)
