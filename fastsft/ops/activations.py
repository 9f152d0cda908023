"""swiglu and geglu: the gated MLP activations as one torch custom op (Triton or reference backend).

forward  out = act(gate) * up                     act = silu (SwiGLU) or tanh-approximated GELU (GeGLU)
backward d_gate = dout * up * act'(gate),  d_up = dout * act(gate)
The backward recomputes act from gate: only gate and up are saved (the MLP holds them anyway), never
act(gate).
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import check_float, describe, forbid_double_backward, select_backend

_OP_NAMES = {"silu": "swiglu", "gelu_tanh": "geglu"}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [R, C] with unit column stride; a view for contiguous tensors and for the halves of a
    fused [..., 2C] gate_up projection."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


@torch.library.custom_op("fastsft::gated_activation", mutates_args=())
def _gated_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if select_backend(_OP_NAMES[activation], gate) == "reference":
        return reference.gated_activation(gate, up, activation).contiguous()
    from fastsft.kernels.activations import gated_forward

    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    gated_forward(_rows(gate), _rows(up), out.view(-1, gate.shape[-1]), activation=activation)
    return out


@_gated_op.register_fake
def _gated_fake(gate, up, activation):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fastsft::gated_activation_backward", mutates_args=())
def _gated_backward_op(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if select_backend(_OP_NAMES[activation], gate) == "reference":
        grad_gate, grad_up = reference.gated_activation_with_grads(grad_out, gate, up, activation)
        return grad_gate.to(gate.dtype).contiguous(), grad_up.to(up.dtype).contiguous()
    from fastsft.kernels.activations import gated_backward

    grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grad_up = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if grad_gate.numel() == 0:
        return grad_gate, grad_up
    width = gate.shape[-1]
    gated_backward(
        _rows(grad_out),
        _rows(gate),
        _rows(up),
        grad_gate.view(-1, width),
        grad_up.view(-1, width),
        activation=activation,
    )
    return grad_gate, grad_up


@_gated_backward_op.register_fake
def _gated_backward_fake(grad_out, gate, up, activation):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


forbid_double_backward(_gated_backward_op, "swiglu/geglu")


def _gated_setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _gated_backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = _gated_backward_op(grad_out, gate, up, ctx.activation)
    return grad_gate, grad_up, None


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup_context)


def _gated(op: str, gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if not isinstance(gate, torch.Tensor) or gate.dim() < 1:
        raise ValueError(f"{op}: gate must be a tensor [..., I], got {gate!r:.80}")
    check_float(op, "gate", gate, gate.dim(), "[..., I]")
    check_float(op, "up", up, up.dim(), "[..., I]")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(
            f"{op}: gate and up must match in shape, dtype and device; gate: {describe(gate)}; up: {describe(up)}"
        )
    return _gated_op(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of a gated MLP (Llama, Mistral, Qwen): silu(gate) * up.

    gate, up: [..., I] float16 / bfloat16 / float32 (float64: reference backend), same shape, dtype and
    device; any layout with unit stride along the last dim is read in place (e.g. the two halves of a fused
    gate_up projection). Returns [..., I] in gate's dtype, computed in fp32 with one rounding. The backward
    recomputes silu(gate) instead of storing it.
    """
    return _gated("swiglu", gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU activation of a gated MLP (Gemma): gelu(gate, approximate="tanh") * up. Same contract as
    `swiglu`."""
    return _gated("geglu", gate, up, "gelu_tanh")
