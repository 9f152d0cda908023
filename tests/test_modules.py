"""HF drop-ins (fastsft.patch.modules): same parameters and state dicts as HF's modules, same outputs and
gradients, shared (not copied) Parameters when wrapping an existing module."""

import pytest
import torch
from conftest import DEVICE, assert_close_fp32
from transformers import GemmaConfig, LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

from fastsft.patch.modules import GatedMLP, RMSNorm, apply_rotary_pos_emb


def _outputs_and_grads(module, x):
    x = x.clone().requires_grad_(True)
    out = module(x)
    grad = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, [x, *params], grad)
    return out.detach(), grads


# Gemma3n's norm is x_hat * w and Qwen3-Next's is x_hat * (1 + w): the form is measured, not guessed from names.
@pytest.mark.parametrize(
    "hf_class, offset",
    [
        (LlamaRMSNorm, 0.0),
        (Qwen3RMSNorm, 0.0),
        (GemmaRMSNorm, 1.0),
        (Gemma3RMSNorm, 1.0),
        (Gemma3nRMSNorm, 0.0),
        (Qwen3NextRMSNorm, 1.0),
    ],
)
def test_rms_norm_replaces_hf_norms(triton_backend, hf_class, offset):
    hf = hf_class(48, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        hf.weight.add_(0.1 * torch.randn(48, device=DEVICE))
    ours = RMSNorm.from_hf(hf)
    assert ours.weight is hf.weight and ours.offset == offset and ours.eps == 1e-5
    x = torch.randn(3, 7, 48, device=DEVICE)
    (out, grads), (hf_out, hf_grads) = _outputs_and_grads(ours, x), _outputs_and_grads(hf, x)
    assert_close_fp32("norm output", out, hf_out.double())
    for got, want in zip(grads, hf_grads, strict=True):
        assert_close_fp32("norm grad", got, want.double())
    fresh = RMSNorm(48, eps=1e-5, offset=offset)
    assert torch.equal(fresh.weight, hf_class(48).weight)  # same initialisation: ones, or Gemma's zeros
    fresh.load_state_dict(hf.state_dict())  # identical keys: loads strictly
    assert torch.equal(fresh.weight, hf.weight)


def test_fused_residual_norm_matches_add_then_norm(triton_backend):
    norm = RMSNorm(32, eps=1e-6)
    x, residual = torch.randn(5, 32, device=DEVICE), torch.randn(5, 32, device=DEVICE)
    y, summed = norm.forward_with_residual(x, residual)
    assert torch.equal(summed, x + residual)
    assert_close_fp32("fused norm", y, norm(x + residual).double())


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_gated_mlp_replaces_hf_mlp(triton_backend, family):
    if family == "llama":
        hf = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act="silu")).to(DEVICE)
    else:  # Gemma's config carries both hidden_act and hidden_activation: the module's act_fn decides
        config = GemmaConfig(
            hidden_size=32, intermediate_size=88, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh"
        )
        hf = GemmaMLP(config)
    hf = hf.to(DEVICE)
    ours = GatedMLP.from_hf(hf)
    assert ours.gate_proj is hf.gate_proj and ours.activation == {"llama": "silu", "gemma": "gelu_tanh"}[family]
    x = torch.randn(2, 5, 32, device=DEVICE)
    (out, grads), (hf_out, hf_grads) = _outputs_and_grads(ours, x), _outputs_and_grads(hf, x)
    assert_close_fp32("mlp output", out, hf_out.double())
    for got, want in zip(grads, hf_grads, strict=True):
        assert_close_fp32("mlp grad", got, want.double())
    fresh = GatedMLP(32, 88, "silu")
    assert set(fresh.state_dict()) == set(hf.state_dict())
    fresh.load_state_dict(hf.state_dict())


@pytest.mark.parametrize("batch", [1, 3])
def test_apply_rotary_pos_emb_matches_hf(triton_backend, batch):
    """HF's signature and [B, H, S, D] layout, cos/sin from HF's own rotary embedding with packed positions
    (restarting at 0) in every batch row."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 4]], device=DEVICE).repeat(batch, 1)
    q = torch.randn(batch, 4, 9, 16, device=DEVICE)
    k = torch.randn(batch, 2, 9, 16, device=DEVICE)
    cos, sin = rotary(q, position_ids)
    want = hf_apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    for layout_dim in (1, 2):
        qi, ki = (q, k) if layout_dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))
        got = apply_rotary_pos_emb(qi, ki, cos, sin, unsqueeze_dim=layout_dim)
        for g, w in zip(got, want, strict=True):
            assert_close_fp32("rope", g if layout_dim == 1 else g.transpose(1, 2), w)
    # One table shared by every row ([1, S, R]) broadcasts like HF's.
    got = apply_rotary_pos_emb(q, k, cos[:1], sin[:1])
    assert_close_fp32("shared table", got[0], want[0])


def test_clear_errors():
    with pytest.raises(ValueError, match="'gelu' is not supported"):
        GatedMLP(8, 16, "gelu")
    with pytest.raises(TypeError, match="not an RMSNorm"):
        RMSNorm.from_hf(torch.nn.LayerNorm(8))

    class ScaledNorm(torch.nn.Module):  # has RMSNorm's attributes but computes something else
        def __init__(self):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, x):
            return 2 * x * self.weight

    with pytest.raises(TypeError, match="neither"):
        RMSNorm.from_hf(ScaledNorm())
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="gelu")
    exact_gelu_mlp = LlamaMLP(config)
    with pytest.raises(ValueError, match="neither silu nor"):
        GatedMLP.from_hf(exact_gelu_mlp)
    with pytest.raises(TypeError, match="has no gate_proj"):
        GatedMLP.from_hf(torch.nn.Linear(4, 4))
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="one row per token"):
        apply_rotary_pos_emb(q, q, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
