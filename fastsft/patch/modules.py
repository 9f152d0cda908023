"""Drop-in replacements for Hugging Face building blocks, backed by fastsft.ops.

Names, attributes and parameters are Hugging Face's, so state dicts load unchanged and code that reads
`norm.variance_epsilon` or `mlp.gate_proj` keeps working:

* `RMSNorm`: LlamaRMSNorm / MistralRMSNorm / Qwen2/3RMSNorm (offset 0) and GemmaRMSNorm / Gemma2/3RMSNorm
  (offset 1: the scale is 1 + weight, weight initialised to 0). `RMSNorm.from_hf(module)` wraps an existing
  module's own Parameter (no copy, so optimizers and tied references stay valid).
* `GatedMLP`: LlamaMLP-style gate_proj / up_proj / down_proj with a SwiGLU or GeGLU activation.
* `apply_rotary_pos_emb`: HF's function of the same name and signature, on [B, H, S, D] tensors.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastsft.ops import add_rms_norm, geglu, reference, rms_norm, swiglu
from fastsft.ops.rope import apply_rope_batched

# Hugging Face activation names (config.hidden_act / hidden_activation) -> the gated op computing them.
# gelu_new / gelu_fast / gelu_pytorch_tanh are all the tanh approximation; exact "gelu" is not.
HF_GATED_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
}
_GATED_OPS = {"silu": swiglu, "gelu_tanh": geglu}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + weight) over the last dim (fastsft.ops.rms_norm).

    Args:
        hidden_size: H, the normalised width.
        eps: added to the mean square; stored as `variance_epsilon` (Llama's name) and readable as `eps`
            (Gemma's name).
        offset: 0.0 (Llama, Mistral, Qwen) or 1.0 (Gemma: weight is initialised to zeros, scale 1 + weight).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, offset: float = 0.0, device=None, dtype=None):
        super().__init__()
        init = torch.zeros if offset else torch.ones
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = float(eps)
        self.offset = float(offset)

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    @eps.setter
    def eps(self, value: float) -> None:
        self.variance_epsilon = float(value)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, offset=self.offset)

    def forward_with_residual(self, hidden_states: torch.Tensor, residual: torch.Tensor):
        """(norm(hidden_states + residual), hidden_states + residual) in one pass (fastsft.ops.add_rms_norm)."""
        return add_rms_norm(hidden_states, residual, self.weight, self.variance_epsilon, offset=self.offset)

    @classmethod
    def from_hf(cls, module: nn.Module, *, offset: float | None = None) -> RMSNorm:
        """Wrap an HF RMSNorm module, sharing its weight Parameter. Unless given, the offset (0: x_hat * w,
        1: x_hat * (1 + w)) is measured by running the module once on a fixed input: class names do not
        tell (Gemma3n's norm is x_hat * w, Qwen3-Next's is x_hat * (1 + w))."""
        eps, weight = _norm_eps_and_weight(module)
        if offset is None:
            offset = _probe_offset(module, weight, eps)
        norm = cls.__new__(cls)
        nn.Module.__init__(norm)
        norm.weight = weight
        norm.variance_epsilon = eps
        norm.offset = float(offset)
        return norm

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset}"


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) with the activation fused with the product
    (fastsft.ops.swiglu / geglu: the activation is recomputed in the backward, never stored).

    Args:
        hidden_size, intermediate_size: H and I.
        activation: an HF activation name (config.hidden_act): "silu"/"swish" (SwiGLU) or one of the tanh
            GELUs "gelu_pytorch_tanh"/"gelu_new"/"gelu_fast" (GeGLU).
        bias: whether the three projections have biases (config.mlp_bias).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        *,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = _gated_activation(activation)
        factory = dict(device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_GATED_OPS[self.activation](self.gate_proj(x), self.up_proj(x)))

    @classmethod
    def from_hf(cls, mlp: nn.Module, activation: str | None = None) -> GatedMLP:
        """Wrap an HF gated MLP (LlamaMLP, MistralMLP, Qwen2/3MLP, GemmaMLP, ...), reusing its three Linear
        modules. Unless given, the activation is identified by evaluating `mlp.act_fn` (the function the
        module really calls; config names differ between families) and must be silu or tanh-GELU."""
        missing = [
            name
            for name in ("gate_proj", "up_proj", "down_proj")
            if not isinstance(getattr(mlp, name, None), nn.Module)
        ]
        if missing:
            raise TypeError(
                f"GatedMLP.from_hf: {type(mlp).__name__} has no {', '.join(missing)}; "
                "only gate_proj/up_proj/down_proj MLPs can be replaced"
            )
        if activation is None:
            activation = _probe_activation(mlp)
        wrapped = cls.__new__(cls)
        nn.Module.__init__(wrapped)
        wrapped.gate_proj, wrapped.up_proj, wrapped.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        wrapped.hidden_size = mlp.gate_proj.in_features
        wrapped.intermediate_size = mlp.gate_proj.out_features
        wrapped.activation = _gated_activation(activation)
        return wrapped

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def _probe_offset(module: nn.Module, weight: torch.Tensor, eps: float) -> float:
    """0.0 or 1.0: which of x_hat * w and x_hat * (1 + w) the HF norm computes, from one no-grad call."""
    if weight.device.type == "meta":
        raise TypeError(f"RMSNorm.from_hf: {type(module).__name__}'s weight is on the meta device; pass offset=")
    with torch.no_grad():
        x = torch.linspace(-2.0, 3.0, weight.numel(), dtype=torch.float32, device=weight.device).unsqueeze(0)
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        out = module(x).float()
        w = weight.detach().float()
    tolerance = dict(rtol=2e-2, atol=2e-2)  # bf16 weights; the two forms differ by x_hat itself (~1)
    for offset in (0.0, 1.0):
        if torch.allclose(out, x_hat * (offset + w), **tolerance):
            return offset
    raise TypeError(
        f"RMSNorm.from_hf: {type(module).__name__} computes neither x_hat * w nor x_hat * (1 + w); "
        "it is not an RMSNorm fastsft can replace"
    )


def _probe_activation(mlp: nn.Module, attribute: str = "act_fn", projection: str = "gate_proj") -> str:
    """The HF activation name matching what mlp.<attribute> computes (silu or the tanh GELU)."""
    act_fn = getattr(mlp, attribute, None)
    if not callable(act_fn):
        raise TypeError(f"GatedMLP.from_hf: {type(mlp).__name__} has no {attribute}; pass activation=")
    device = getattr(mlp, projection).weight.device
    if device.type == "meta":  # act_fn holds no state: probe it on the CPU
        device = torch.device("cpu")
    with torch.no_grad():
        g = torch.linspace(-6.0, 6.0, 241, dtype=torch.float32, device=device)
        out = act_fn(g).float()
    candidates = {
        "silu": torch.nn.functional.silu(g),
        "gelu_pytorch_tanh": torch.nn.functional.gelu(g, approximate="tanh"),
    }
    for name, expected in candidates.items():
        if torch.allclose(out, expected, rtol=1e-5, atol=1e-5):
            return name
    raise ValueError(
        f"GatedMLP.from_hf: {type(mlp).__name__}.act_fn ({type(act_fn).__name__}) is neither silu nor "
        f"the tanh GELU; fastsft fuses {', '.join(sorted(HF_GATED_ACTIVATIONS))}"
    )


def _gated_activation(name) -> str:
    if not isinstance(name, str) or name not in HF_GATED_ACTIVATIONS:
        raise ValueError(
            f"gated MLP activation {name!r} is not supported; fastsft fuses {', '.join(sorted(HF_GATED_ACTIVATIONS))}"
        )
    return HF_GATED_ACTIVATIONS[name]


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's apply_rotary_pos_emb, same signature, through fastsft.ops (one launch for q and k).

    q [B, Hq, S, D] and k [B, Hk, S, D] (unsqueeze_dim=1, HF's default) or [B, S, H, D] (unsqueeze_dim=2);
    cos/sin [B or 1, S, R] as HF's rotary embedding returns them. Returns (q_embed, k_embed) in the
    layout of q and k (for unsqueeze_dim=1 as [B, H, S, D] views of contiguous [B, S, H, D] memory, which
    is the layout attention kernels read best).
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"apply_rotary_pos_emb: unsqueeze_dim must be 1 ([B, H, S, D]) or 2 ([B, S, H, D]), got {unsqueeze_dim}"
        )
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        raise ValueError(
            f"apply_rotary_pos_emb: expects 4-D q/k and 3-D cos/sin, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, cos {tuple(cos.shape)}"
        )
    if unsqueeze_dim == 1:
        q_out, k_out = apply_rope_batched(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return apply_rope_batched(q, k, cos, sin)


# --------------------------------------------------------------------------------------------------
# Forwards that fastsft.patch binds onto existing HF modules (the module tree, its classes, parameters and
# state-dict keys stay as they are, so PEFT, FSDP and checkpoints see the model they expect).
# --------------------------------------------------------------------------------------------------


def _norm_eps_and_weight(module: nn.Module) -> tuple[float, nn.Parameter]:
    """(eps, weight) of an HF RMSNorm module; TypeError for anything else (a LayerNorm has a bias)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    has_bias = getattr(module, "bias", None) is not None
    if eps is None or has_bias or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        raise TypeError(
            f"{type(module).__name__} has no 1-D `weight` Parameter and `variance_epsilon`/`eps` attribute, so it "
            "is not an RMSNorm fastsft can run"
        )
    return float(eps), weight


def probe_norm(module: nn.Module) -> tuple[float, float]:
    """(eps, offset) of an HF RMSNorm module, the offset measured as in RMSNorm.from_hf."""
    eps, weight = _norm_eps_and_weight(module)
    if weight.device.type == "meta":  # a model built on the meta device (sharded initialisation): probe a CPU copy
        stand_in = copy.deepcopy(module).to_empty(device="cpu")
        with torch.no_grad():
            stand_in.weight.fill_(0.25)  # any finite weight tells x_hat * w from x_hat * (1 + w)
        return eps, _probe_offset(stand_in, stand_in.weight, eps)
    return eps, _probe_offset(module, weight, eps)


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """forward of a patched HF RMSNorm: fastsft.ops.rms_norm with the module's own weight."""
    eps, offset = self._fastsft_norm
    return rms_norm(hidden_states, self.weight, eps, offset=offset)


def activation_attribute(mlp: nn.Module) -> str | None:
    """The name under which an HF MLP keeps its activation: `act_fn` (Llama) or `activation_fn` (Phi-3, Llama-4)."""
    return next((name for name in ("act_fn", "activation_fn") if callable(getattr(mlp, name, None))), None)


def probe_mlp(mlp: nn.Module) -> str:
    """The gated op ("silu" or "gelu_tanh") an HF gate/up/down MLP computes: its activation measured, and its
    own forward checked once on a random input against down_proj(act(gate_proj(x)) * up_proj(x)).
    TypeError / ValueError otherwise."""
    if not all(isinstance(getattr(mlp, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj")):
        raise TypeError(f"{type(mlp).__name__} has no gate_proj/up_proj/down_proj")
    activation = _gated_activation(_probe_activation(mlp, activation_attribute(mlp) or "act_fn"))
    _check_mlp_form(mlp, "gate_proj", lambda module, x: (module.gate_proj(x), module.up_proj(x)), activation)
    return activation


def _check_mlp_form(mlp: nn.Module, projection: str, gate_and_up, activation: str) -> None:
    """TypeError unless the MLP's own forward equals down_proj(act(gate) * up) for (gate, up) =
    gate_and_up(module, x), on one random input. An MLP on the meta device (sharded initialisation) is checked
    through a CPU copy with random weights: the form does not depend on the values."""
    generator = torch.Generator().manual_seed(0)
    module = mlp
    if any(p.device.type == "meta" for p in mlp.parameters()):
        module = copy.deepcopy(mlp).to_empty(device="cpu")
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    weight = getattr(module, projection).weight
    x = torch.randn(3, weight.shape[1], generator=generator).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        expected = type(module).forward(module, x).float()
        # The reference op: this checks the module's form, and launches no kernel at patch time.
        ours = module.down_proj(reference.gated_activation(*gate_and_up(module, x), activation)).float()
    # Relative to the output's size, loose enough for bf16 weights; a wrong form is off by O(1).
    scale = expected.abs().max().clamp_min(1e-6)
    if not torch.allclose(ours / scale, expected / scale, rtol=0.0, atol=2e-2):
        raise TypeError(f"{type(mlp).__name__}'s forward is not down_proj(act(gate) * up)")


def gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """forward of a patched HF gated MLP: the activation fused with the product (its projections, LoRA
    adapters included, are the module's own)."""
    return self.down_proj(_GATED_OPS[self._fastsft_activation](self.gate_proj(x), self.up_proj(x)))


def is_fused_gated_mlp(module: nn.Module) -> bool:
    """An MLP with one fused gate_up_proj (gate and up side by side), a down_proj and an activation_fn (Phi-3,
    GLM-4)."""
    return (
        isinstance(module._modules.get("gate_up_proj"), nn.Module)
        and isinstance(module._modules.get("down_proj"), nn.Module)
        and callable(getattr(module, "activation_fn", None))
    )


def probe_fused_mlp(mlp: nn.Module) -> str:
    """The gated op ("silu" or "gelu_tanh") of a fused gate_up_proj MLP computing
    down_proj(act(gate) * up) with gate, up = gate_up_proj(x).chunk(2, -1); TypeError when the module's own
    forward (run once on a random input) computes anything else, e.g. the halves the other way round."""
    activation = _gated_activation(_probe_activation(mlp, "activation_fn", "gate_up_proj"))
    _check_mlp_form(mlp, "gate_up_proj", lambda module, x: module.gate_up_proj(x).chunk(2, dim=-1), activation)
    return activation


def fused_gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """forward of a patched fused-gate_up MLP: the activation fused with the product, read from the two halves of
    gate_up_proj's output in place (no copy)."""
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(_GATED_OPS[self._fastsft_activation](gate, up))
