"""One parity check for every elementwise/row op: forward outputs and input gradients of the op under test
against a float64 reference, with the error bound of ARCHITECTURE.md (fp32: ~1e-5 relative; bf16/fp16: at most
2x the error of torch's own computation in that precision on the same inputs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from conftest import assert_close_fp32, assert_within_torch_error


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _run(fn: Callable, inputs: Sequence[torch.Tensor], differentiable: Sequence[bool], dtype, cotangents):
    """Outputs of fn on copies of `inputs` in `dtype`, and the gradients of sum(out_i * cotangent_i)
    with respect to the differentiable inputs."""
    leaves = [t.detach().to(dtype).requires_grad_(d) for t, d in zip(inputs, differentiable, strict=True)]
    outputs = _as_tuple(fn(*leaves))
    wanted = [leaf for leaf, d in zip(leaves, differentiable, strict=True) if d]
    total = sum((out.to(torch.float64) * c).sum() for out, c in zip(outputs, cotangents, strict=True))
    grads = torch.autograd.grad(total, wanted)
    return [out.detach() for out in outputs], [g.detach() for g in grads]


def assert_op_parity(
    name: str,
    op: Callable,
    reference_op: Callable,
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    *,
    differentiable: Sequence[bool] | None = None,
    torch_lowp_op: Callable | None = None,
    input_dtypes: Sequence[torch.dtype | None] | None = None,
    rtol: float = 2e-5,
) -> None:
    """Check op(*inputs in dtype) against reference_op(*inputs in float64), outputs and gradients.

    inputs: tensors whose values are exactly representable in `dtype` (make them in dtype, then compare).
    input_dtypes: per input, a dtype that overrides `dtype` for the op under test (e.g. fp32 weights with
        bf16 activations); None keeps `dtype`.
    torch_lowp_op: torch's own computation (as Hugging Face writes it) run in `dtype`; the bound for bf16 /
        fp16. Defaults to reference_op run in `dtype`.
    """
    differentiable = differentiable or [True] * len(inputs)
    input_dtypes = input_dtypes or [None] * len(inputs)
    exact_leaves = [t.detach().double().requires_grad_(d) for t, d in zip(inputs, differentiable, strict=True)]
    exact_outputs = _as_tuple(reference_op(*exact_leaves))
    # Cotangents representable in dtype, so the op under test sees exactly the same incoming gradients.
    cotangents = [torch.randn(o.shape, dtype=dtype, device=o.device).double() for o in exact_outputs]
    exact_grads = torch.autograd.grad(
        sum((o * c).sum() for o, c in zip(exact_outputs, cotangents, strict=True)),
        [leaf for leaf, d in zip(exact_leaves, differentiable, strict=True) if d],
    )

    def under_test(*leaves):
        cast = [leaf.to(d) if d is not None else leaf for leaf, d in zip(leaves, input_dtypes, strict=True)]
        return op(*cast)

    outputs, grads = _run(under_test, inputs, differentiable, dtype, cotangents)
    for i, (out, exact) in enumerate(zip(outputs, exact_outputs, strict=True)):
        assert out.shape == exact.shape, f"{name}: output {i} has shape {tuple(out.shape)}, want {tuple(exact.shape)}"
    assert len(grads) == len(exact_grads)
    labelled = [(f"{name} output {i}", a, e) for i, (a, e) in enumerate(zip(outputs, exact_outputs, strict=True))]
    labelled += [(f"{name} grad {i}", a, e) for i, (a, e) in enumerate(zip(grads, exact_grads, strict=True))]
    if dtype == torch.float32:
        for label, actual, exact in labelled:
            assert_close_fp32(label, actual, exact, rtol=rtol)
        return
    lowp_outputs, lowp_grads = _run(torch_lowp_op or reference_op, inputs, differentiable, dtype, cotangents)
    lowp = lowp_outputs + lowp_grads
    for (label, actual, exact), torch_lowp in zip(labelled, lowp, strict=True):
        assert_within_torch_error(label, actual, torch_lowp, exact)
