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
    """What one model family's attention does beyond Llama's: only what cannot be measured on the modules.

    Measured, not stated: the projections (separate q/k/v_proj or one fused qkv_proj), where the q/k norms
    act (per head when their weight's last dim is head_dim, else over the whole projection: OLMo-2),
    how the model's own apply_rotary_pos_emb reads its cos/sin table (attention.RopeLayout: partial,
    half-width and interleaved layouts), the norms' offset and the MLP's activation.

    window: where a layer's sliding window comes from: None (full causal attention everywhere), "config"
        (config.sliding_window on every layer: Mistral), "module" (the attention module's own
        `sliding_window`, None on full-attention layers: Qwen2/3, Gemma2/3 alternate them), "is_sliding"
        (config.sliding_window on the layers whose module says `is_sliding`: EXAONE-4 keeps the window on
        every module and applies it only there).
    attention_softcap: the attention module's `attn_logit_softcapping` caps the scores (Gemma-2).
    qk_norm: the attention module's `q_norm` / `k_norm` normalise queries and keys before RoPE: True (every
        module has them: Qwen3, Gemma-3, OLMo-2), "if_present" (a config option decides: Cohere's
        use_qk_norm), False.
    clip_qkv: q, k and v are clamped to +-config.clip_qkv after the projections (OLMoE), when it is set.
    rope_layers: which layers rotate q and k: "all", "use_rope" (the module's `use_rope` flag: SmolLM3's
        NoPE layers), "sliding" (only sliding-window layers: Cohere-2), "sliding_if_hybrid" (every layer
        when the model has no sliding window, else only the sliding ones: EXAONE-4).
    sinks: the module's `sinks` (one learned logit per query head) join every softmax denominator (gpt-oss).
    bound_attention: fastsft binds its own forward onto the attention modules (projections, norms, fused RoPE,
        varlen attention on token rows). False: the modules keep their own forward, RoPE included, which calls
        fastsft's varlen attention through transformers' AttentionInterface (Gemma-4: layers share K/V,
        values are normalised, some layers use keys as values).
    """

    window: str | None = None
    attention_softcap: bool = False
    qk_norm: bool | str = False
    clip_qkv: bool = False
    rope_layers: str = "all"
    sinks: bool = False
    bound_attention: bool = True


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(window="config"),
    "qwen2": Family(window="module"),
    "qwen3": Family(window="module", qk_norm=True),
    "gemma2": Family(window="module", attention_softcap=True),
    "gemma3_text": Family(window="module", qk_norm=True),
    "gemma4_text": Family(window="module", qk_norm=True, bound_attention=False),
    # Llama-like attention and MLP (biases, multipliers and scalings are the modules' own, measured).
    "granite": Family(),
    "seed_oss": Family(),
    "arcee": Family(),  # a plain (ReLU^2) MLP: norms, rope and attention
    "ministral": Family(window="module"),
    "starcoder2": Family(window="config"),  # LayerNorm and a plain MLP: rope and attention only
    "phi3": Family(window="config"),  # fused qkv_proj and gate_up_proj; partial rotary (Phi-4-mini)
    "olmo2": Family(qk_norm=True),  # q/k norms over the whole projection
    "olmo3": Family(window="module", qk_norm=True),
    "glm4": Family(),  # interleaved partial rotary, fused gate_up_proj, extra post-norms
    "smollm3": Family(window="module", rope_layers="use_rope"),
    "exaone4": Family(window="is_sliding", qk_norm=True, rope_layers="sliding_if_hybrid"),
    "cohere": Family(qk_norm="if_present"),  # LayerNorms (left to HF), interleaved rotary, scaled logits
    "cohere2": Family(window="module", rope_layers="sliding"),
    # MoE: attention, norms and the shared experts' gated MLPs; the routed experts stay HF's for now.
    "mixtral": Family(window="config"),
    "qwen2_moe": Family(window="module"),
    "qwen3_moe": Family(window="module", qk_norm=True),
    "glm4_moe": Family(),
    "phimoe": Family(window="config"),  # LayerNorm: rope and attention
    "olmoe": Family(window="config", qk_norm=True, clip_qkv=True),
    "granitemoe": Family(),
    # Chunked attention and complex-valued RoPE stay HF's: norms, the shared expert's MLP and the loss.
    "llama4_text": Family(bound_attention=False),
    "gpt_oss": Family(window="module", sinks=True),  # half-width rotary table, attention sinks
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
    elif family.window == "is_sliding":
        window = attention_module.config.sliding_window if getattr(attention_module, "is_sliding", False) else None
    else:
        window = None
    return int(window) if window else None


def applies_rope(family: Family, attention_module) -> bool:
    """Whether this layer rotates its queries and keys (family.rope_layers)."""
    if family.rope_layers == "use_rope":
        return bool(attention_module.use_rope)
    if family.rope_layers == "sliding":
        return getattr(attention_module, "sliding_window", None) is not None
    if family.rope_layers == "sliding_if_hybrid":
        return getattr(attention_module, "sliding_window", None) is None or bool(attention_module.is_sliding)
    return True


def has_qk_norm(family: Family, attention_module) -> bool:
    """Whether this layer's q/k norms run (family.qk_norm); a module the family says has them must."""
    present = hasattr(attention_module, "q_norm") and hasattr(attention_module, "k_norm")
    if family.qk_norm is True and not present:
        raise TypeError(f"{type(attention_module).__name__} has no q_norm/k_norm, which its family's facts say it has")
    return bool(family.qk_norm) and present


def attention_softcap(family: Family, attention_module) -> float | None:
    if not family.attention_softcap:
        return None
    cap = getattr(attention_module, "attn_logit_softcapping", None)
    return float(cap) if cap else None
