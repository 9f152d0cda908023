"""Per-family facts: the few ways supported model families differ, as data for one generic patcher.

Everything else is read from the modules themselves (head_dim, scaling, is_causal, the norms' offset and
epsilon, the MLP's activation), so a family entry only states what cannot be measured: where a layer's
sliding window comes from, whether attention logits are soft-capped, whether q/k get a per-head RMSNorm
before RoPE. (What the head does to the logits is measured too: loss.probe_head.)
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(NotImplementedError):
    """A model (or one of its modules) that fastsft cannot run exactly as asked, e.g. packed documents given
    to layers that cannot keep them apart. Raised instead of training on a different loss; the message names
    the model type, the module and what to do instead."""


@dataclass(frozen=True)
class Family:
    """What one model family's attention and head do beyond Llama's.

    window: where a layer's sliding window comes from: None (full causal attention everywhere), "config"
        (config.sliding_window on every layer: Mistral), "module" (the attention module's own
        `sliding_window`, None on full-attention layers: Qwen2/3, Gemma2/3 alternate them).
    attention_softcap: the attention module's `attn_logit_softcapping` caps the scores (Gemma-2).
    qk_norm: per-head RMSNorms `q_norm` / `k_norm` on queries and keys before RoPE (Qwen3, Gemma-3).
    """

    window: str | None = None
    attention_softcap: bool = False
    qk_norm: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(window="config"),
    "qwen2": Family(window="module"),
    "qwen3": Family(window="module", qk_norm=True),
    "gemma2": Family(window="module", attention_softcap=True),
    "gemma3_text": Family(window="module", qk_norm=True),
    # Llama-like attention and MLP (biases, multipliers and scalings are the modules' own, measured).
    "granite": Family(),
    "seed_oss": Family(),
    "arcee": Family(),  # a plain (ReLU^2) MLP: norms, rope and attention
    "ministral": Family(window="module"),
    "starcoder2": Family(window="config"),  # LayerNorm and a plain MLP: rope and attention only
    # MoE: attention, norms and the shared experts' gated MLPs; the routed experts stay HF's for now.
    "mixtral": Family(window="config"),
    "qwen2_moe": Family(window="module"),
    "qwen3_moe": Family(window="module", qk_norm=True),
    "glm4_moe": Family(),
    "phimoe": Family(window="config"),  # LayerNorm: rope and attention
}


def family_of(config) -> tuple[str, Family | None]:
    """(model_type, its Family or None when the family is not in the table)."""
    model_type = getattr(config, "model_type", None) or "unknown"
    return model_type, FAMILIES.get(model_type)


def sliding_window(family: Family, attention_module) -> int | None:
    """The layer's sliding window in HF's sense (query i sees keys i - window < j <= i), or None."""
    if family.window == "config":
        window = getattr(attention_module.config, "sliding_window", None)
    elif family.window == "module":
        window = getattr(attention_module, "sliding_window", None)
    else:
        window = None
    return int(window) if window else None


def attention_softcap(family: Family, attention_module) -> float | None:
    if not family.attention_softcap:
        return None
    cap = getattr(attention_module, "attn_logit_softcapping", None)
    return float(cap) if cap else None
