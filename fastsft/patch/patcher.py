"""The generic patcher: one code path for every family, driven by `families.FAMILIES`.

`patch(model)` changes behaviour, not structure: it binds new `forward`s onto this model's existing modules
(the module tree, classes, Parameters and state-dict keys stay as they are, so PEFT adapters added later,
FSDP wrapping and checkpoints see the model they expect), per instance (other models of the same class are
untouched):

* rms_norm: every `*RMSNorm` module runs fastsft.ops.rms_norm with its own weight (offset measured, so
  Gemma's 1 + w is right), including Qwen3/Gemma-3's per-head q/k norms.
* swiglu: every gated MLP (gate/up/down_proj) runs its activation fused with the product (SwiGLU or GeGLU,
  measured), calling its own projections.
* rope / attention: each attention module runs `attention.attention_forward` (token rows, fused RoPE,
  varlen attention); the decoder's forward works out the documents once per pass. The model gets its own
  copy of its config with `_attn_implementation = "fastsft"`, so HF builds no [S, S] masks and a model
  sharing the original config object keeps its own attention.
* cross_entropy: the causal LM's forward runs `loss.causal_lm_forward` (fused linear cross-entropy on the
  rows with a label; no logits).

Models outside the family table get the attention (through transformers' AttentionInterface) and the loss,
with a warning that lists the families. `unpatch` removes every bound forward and puts the config back.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from dataclasses import dataclass, field

from torch import nn

from fastsft.ops.attention import check_attention_implementation

from . import attention as attention_patch
from . import loss as loss_patch
from . import modules as module_patch
from .binding import Undo, base_decoder
from .families import FAMILIES, Family, attention_softcap, family_of, has_qk_norm

STATE_ATTRIBUTE = "_fastsft_patch"


@dataclass
class PatchReport:
    """What `fastsft.patch` did to one model: `patched[option]` = how many modules run fastsft's kernels,
    `not_patched[option]` = why an option was left alone."""

    model_type: str
    family: str
    patched: dict[str, int] = field(default_factory=dict)
    not_patched: dict[str, str] = field(default_factory=dict)
    attention_implementation: str | None = None  # whose kernels run the patched attention, when it is patched
    packing: str | None = None  # why packed rows (several documents per row) are refused; None: kept apart

    def __str__(self) -> str:
        done = (
            ", ".join(
                f"{name} x{count}" + (f" ({self.attention_implementation})" if name == "attention" else "")
                for name, count in self.patched.items()
            )
            or "nothing"
        )
        lines = [f"fastsft.patch({self.model_type}, family {self.family}): {done}"]
        lines += [f"  not patched: {name}: {why}" for name, why in self.not_patched.items()]
        if self.packing:
            lines.append(f"  packed documents refused: {self.packing}")
        return "\n".join(lines)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM to patch: the model itself, or the one inside a PEFT wrapper (LoRA layers stay in
    place: the patched forwards call the same q_proj / gate_proj / ... modules)."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and type(model).__module__.startswith("peft."):
        model = get_base_model()
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(
            f"fastsft.patch expects a Hugging Face causal LM (a PreTrainedModel with a config and an lm_head), "
            f"got {type(model).__name__}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"fastsft.patch supports decoder-only causal LMs; {type(model).__name__} is encoder-decoder")
    return model


def _check_unsharded(model: nn.Module) -> None:
    """Patching measures modules (norm offsets, activations) by running them: it needs whole parameters."""
    for name, p in model.named_parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise RuntimeError(f"{name} is sharded (DTensor): call fastsft.patch(model) before fully_shard / FSDP")
        if p.numel() == 0:
            raise RuntimeError(
                f"{name} has no elements (partitioned, e.g. by DeepSpeed ZeRO-3): call fastsft.patch(model) "
                "before the model is partitioned"
            )


def _own_config(model: nn.Module, undo: Undo):
    """Give the model a private copy of its config; every module holding the shared config, or one of its
    sub-configs, gets the matching copy."""
    shared = model.config
    memo: dict[int, object] = {}
    private = copy.deepcopy(shared, memo)
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and id(config) in memo:
            undo.configs.append((module, config))
            module.config = memo[id(config)]
    return private


def _is_attention(module: nn.Module) -> bool:
    """A self-attention module in HF's layout: separate q/k/v projections or one fused qkv_proj (Phi-3)."""
    projections = all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj")) or isinstance(
        getattr(module, "qkv_proj", None), nn.Module
    )
    return projections and all(hasattr(module, name) for name in ("o_proj", "head_dim", "scaling"))


def patch_model(model, *, rms_norm=True, rope=True, swiglu=True, attention=True, cross_entropy=True, keep_logits=False):
    wrapper, model = model, _causal_lm(model)
    if STATE_ATTRIBUTE in model.__dict__:
        raise RuntimeError("this model is already patched by fastsft; call fastsft.unpatch(model) first")
    _check_unsharded(model)
    model_type, family = family_of(model.config)
    report = PatchReport(model_type, model_type if family is not None else "generic")
    undo = Undo()
    if attention is not False and attention is not None:
        attention = check_attention_implementation(attention)  # True -> "fastsft"; a missing backend raises here
    options = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, attention=attention, cross_entropy=cross_entropy)
    try:
        _patch(model, family, report, undo, options, keep_logits)
    except BaseException:
        undo.undo()
        raise
    model.__dict__[STATE_ATTRIBUTE] = undo
    model.__dict__["fastsft_report"] = report
    if wrapper is not model:
        wrapper.__dict__["fastsft_report"] = report
    return wrapper


def _generic_blockers(model, config) -> dict[str, str]:
    """Options that are not safe on a model outside the family table, and why."""
    blockers = {}
    if getattr(config, "sub_configs", None):
        why = "composite (e.g. multimodal) config; load the text-only model class (e.g. Gemma3ForCausalLM)"
        blockers = {"attention": why, "cross_entropy": why}
    _, why = loss_patch.router_aux_loss(model, config)
    if why:
        blockers["cross_entropy"] = why
    if not getattr(model, "_supports_attention_backend", False):
        blockers.setdefault("attention", "the model does not dispatch attention through AttentionInterface")
    return blockers


def _patch(model, family: Family | None, report: PatchReport, undo: Undo, options: dict, keep_logits: bool):
    _, decoder = base_decoder(model)
    blocked = {}
    if family is None:
        warnings.warn(
            f"fastsft.patch: model_type {report.model_type!r} is not one of the supported families "
            f"({', '.join(FAMILIES)}); patching only what works through transformers' interfaces: attention "
            "(AttentionInterface) and the loss (get_output_embeddings). See model.fastsft_report.",
            stacklevel=3,
        )
        blocked = {name: "family not in fastsft's table" for name in ("rms_norm", "rope", "swiglu")}
        blocked.update(_generic_blockers(model, model.config))
    if options["attention"] and getattr(model.config, "attention_dropout", 0.0):
        blocked["attention"] = f"config.attention_dropout={model.config.attention_dropout} (no dropout kernel)"
    if options["attention"] and getattr(model.config, "attention_chunk_size", None):
        # Llama-4: chunked layers see only their own chunk; fastsft's masks and kernels know causal and windows.
        blocked["attention"] = (
            f"chunked attention (config.attention_chunk_size={model.config.attention_chunk_size}) is not "
            "implemented by fastsft's attention"
        )
    if options["attention"] and decoder is None:
        blocked["attention"] = "no base decoder module found to compute document boundaries once"
    if options["cross_entropy"] and decoder is None:
        blocked["cross_entropy"] = "no base decoder module found"
    enabled = {name: on and name not in blocked for name, on in options.items()}

    if enabled["rms_norm"]:
        report.patched["rms_norm"] = _bind_norms(model, undo)
    if enabled["swiglu"]:
        report.patched["swiglu"] = _bind_mlps(model, undo)
    implementation = options["attention"] if enabled["attention"] else "fastsft"
    if enabled["attention"]:
        report.attention_implementation = implementation
        config = _own_config(model, undo)
        config._attn_implementation = attention_patch.register_attention(implementation)
        undo.bind(decoder, attention_patch.decoder_forward)
    if family is not None and not family.bound_attention and enabled["rope"]:
        blocked["rope"] = f"{report.model_type}'s attention modules keep their own forward (RoPE included)"
        enabled["rope"] = False
    if family is not None and family.bound_attention and (enabled["rope"] or enabled["attention"]):
        count = _bind_attention(model, family, enabled["rope"], bool(enabled["attention"]), implementation, undo)
        report.patched.update({name: count for name in ("rope", "attention") if enabled[name]})
    elif enabled["attention"]:  # through the AttentionInterface: every module calling it (Gemma-4's K/V-sharing
        # layers have no k_proj of their own)
        report.patched["attention"] = sum(1 for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "scaling"))
    if enabled["cross_entropy"]:
        head = model.get_output_embeddings()
        transform, why = loss_patch.probe_head(model) if isinstance(head, nn.Linear) else (None, "")
        aux, why_aux = loss_patch.router_aux_loss(model)
        if transform is not None and why_aux:
            transform, why = None, why_aux
        if transform is not None:
            state = loss_patch.LossState(transform, keep_logits, aux)
            undo.bind(model, loss_patch.causal_lm_forward, _fastsft_loss=state)
            report.patched["cross_entropy"] = 1
        else:
            blocked["cross_entropy"] = why or f"the output embedding is {type(head).__name__}, not nn.Linear"
    if "cross_entropy" not in report.patched:  # the model's own loss, which also answers shift_labels alone
        undo.bind(model, loss_patch.hf_loss_forward)
    report.packing = _packing_refusal(model, decoder, attention_patched="attention" in report.patched)
    if report.packing and decoder is not None:
        if "attention" in report.patched:  # decoder_forward is bound: it checks the plan it makes
            undo.set_state(decoder, _fastsft_packing=report.packing)
        else:
            undo.bind(decoder, attention_patch.packing_guard_forward, _fastsft_packing=report.packing)
    for name, on in options.items():
        if not on:
            report.not_patched[name] = "disabled"
        elif name in blocked:
            report.not_patched[name] = blocked[name]


# Class-name marks of token mixers other than softmax attention (state-space, linear-attention, recurrent and
# convolution layers): fastsft has no document-aware kernel for them, so packed documents would leak.
_TOKEN_MIXERS = re.compile(
    r"Mamba|Mixer|DeltaNet|ShortConv|Recurrent|Rglru|Lightning|LinearAttention|Rwkv|Lstm|Retention"
    # Sparse attention choosing its keys with an indexer (DeepSeek-V3.2's DSA, ...) needs an explicit mask;
    # cross-attention and byte patchers (BLT) mix the row's tokens outside self-attention.
    r"|Indexer|CrossAttention|Patcher"
)
# Functions of transformers.masking_utils that build block-diagonal masks from packed position_ids.
_PACKING_MASK_BUILDERS = (
    "create_causal_mask",
    "create_sliding_window_causal_mask",
    "create_chunked_causal_mask",
    "create_masks_for_generate",
)


def _packing_refusal(model, decoder, attention_patched: bool) -> str | None:
    """Why this model cannot keep packed documents (several per row) apart, or None when it can: a token mixer
    other than attention in its layers, or attention left unpatched in a decoder that does not build its
    masks from position_ids. Static rules; the suite's family sweep checks every model type numerically."""
    # The layers' own modules: the model, decoder, block and norm classes carry the family's name too (Mamba...).
    wrappers = ("Model", "ForCausalLM", "Block", "DecoderLayer", "Norm", "RMSNorm")
    mixers = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if _TOKEN_MIXERS.search(type(m).__name__) and not type(m).__name__.endswith(wrappers)
        }
    )
    if mixers:
        return f"its layers mix tokens with {', '.join(mixers)}, which have no document-aware kernel in fastsft"
    layer_types = sorted({t for t in getattr(model.config, "layer_types", None) or [] if isinstance(t, str)})
    unknown = [t for t in layer_types if "attention" not in t or "linear" in t]
    if unknown:
        return f"config.layer_types has {', '.join(unknown)} layers, which fastsft does not keep documents apart in"
    module_source = _source(inspect.getmodule(type(model)))
    if "create_position_ids_from_input_ids" in module_source:
        return "its positions start after the padding index (RoBERTa-style), not at 0 as packed position_ids do"
    if not attention_patched:
        source = _source(type(decoder).forward) if decoder is not None else ""
        takes_positions = decoder is not None and "position_ids" in inspect.signature(decoder.forward).parameters
        builds = any(builder in source for builder in _PACKING_MASK_BUILDERS)
        # ... and hands the mask builder the position_ids (a `create_causal_mask(...)` or `mask_function(...)`
        # call with position_ids among its arguments): without them HF cannot see the documents.
        passes = re.search(r"mask\w*\((?:[^()]|\([^()]*\))*\bposition_ids\b", source) is not None
        # ... or a dict of the builders' arguments holding them (Llama-4's `mask_kwargs = {..., "position_ids": ...}`)
        passes = passes or re.search(r"mask\w*\s*=\s*\{[^{}]*[\"']position_ids[\"']\s*:", source) is not None
        if not (takes_positions and builds and passes):
            return "its attention is not fastsft's and its decoder does not build masks from position_ids"
    return None


def _source(obj) -> str:
    try:
        return inspect.getsource(obj) if obj is not None else ""
    except (OSError, TypeError):
        return ""


def _bind_norms(model, undo: Undo) -> int:
    # A norm without a weight (Gemma-4's value norm, Llama-4's q/k norm) stays HF's: fastsft's kernel scales.
    norms = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)
    ]
    for norm in norms:
        undo.bind(norm, module_patch.rms_norm_forward, _fastsft_norm=module_patch.probe_norm(norm))
    return len(norms)


def _bind_mlps(model, undo: Undo) -> int:
    count = 0
    for mlp in model.modules():
        if isinstance(mlp._modules.get("gate_proj"), nn.Module) and module_patch.activation_attribute(mlp):
            probe, forward = module_patch.probe_mlp, module_patch.gated_mlp_forward
        elif module_patch.is_fused_gated_mlp(mlp):
            probe, forward = module_patch.probe_fused_mlp, module_patch.fused_gated_mlp_forward
        else:
            continue
        try:
            activation = probe(mlp)
        except (TypeError, ValueError):  # it computes something else (another activation, halves swapped): HF's own
            continue
        undo.bind(mlp, forward, _fastsft_activation=activation)
        count += 1
    return count


def _bind_attention(model, family: Family, rope: bool, attention: bool, implementation: str, undo: Undo) -> int:
    modules = [m for m in model.modules() if _is_attention(m)]
    if attention and implementation == "torch" and any(attention_softcap(family, m) for m in modules):
        raise ValueError(
            f"fastsft.patch(attention='torch'): {model.config.model_type} soft-caps its attention logits "
            "(attn_logit_softcapping), which torch's varlen_attn does not implement; use attention=True "
            "(fastsft's kernels) or 'flash_attn'"
        )
    rope_layouts: dict = {}  # measured on the first forward, once per table width, for all the model's layers
    for module in modules:
        has_qk_norm(family, module)  # a module without the norms its family has is refused here, not mid-training
        state = attention_patch.AttentionState(family, rope, attention, implementation, rope_layouts)
        undo.bind(module, attention_patch.attention_forward, _fastsft=state)
    return len(modules)


def unpatch_model(model):
    wrapper, model = model, _causal_lm(model)
    undo = model.__dict__.pop(STATE_ATTRIBUTE, None)
    if undo is None:
        raise ValueError("this model was not patched by fastsft (nothing to undo)")
    undo.undo()
    model.__dict__.pop("fastsft_report", None)
    wrapper.__dict__.pop("fastsft_report", None)
    return wrapper
