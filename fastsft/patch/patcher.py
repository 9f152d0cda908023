"""The generic patcher: one code path for every family, driven by `families.FAMILIES`.

What `patch(model)` swaps, per instance (other models of the same class are untouched):

* rms_norm: every `*RMSNorm` module -> `modules.RMSNorm` sharing its weight (offset measured, so Gemma's
  1 + w is right), including Qwen3/Gemma-3's per-head q/k norms.
* swiglu: every gated MLP (gate/up/down_proj) -> `modules.GatedMLP` (SwiGLU or GeGLU, measured).
* rope / attention: each attention module's forward -> `attention.attention_forward` (token rows, fused
  RoPE, varlen attention); the decoder's forward computes the document boundaries once per pass. The model
  gets its own copy of its config with `_attn_implementation = "fastsft"`, so HF builds no [S, S] masks and a
  model sharing the original config object keeps its own attention.
* cross_entropy: the causal LM's forward -> `loss.causal_lm_forward` (fused linear cross-entropy on the rows
  with a label; no logits).

Models outside the family table get the attention (through transformers' AttentionInterface) and the loss,
with a warning that lists the families. `unpatch` puts every original module, forward and config back.
"""

from __future__ import annotations

import copy
import inspect
import sys
import types
import warnings
from dataclasses import dataclass, field

from torch import nn

from . import attention as attention_patch
from . import loss as loss_patch
from .families import FAMILIES, Family, family_of
from .modules import GatedMLP, RMSNorm

OPTIONS = ("rms_norm", "rope", "swiglu", "attention", "cross_entropy")


@dataclass
class PatchReport:
    """What `fastsft.patch` did to one model: `patched[option]` = how many modules it swapped,
    `not_patched[option]` = why an option was left alone."""

    model_type: str
    family: str
    patched: dict[str, int] = field(default_factory=dict)
    not_patched: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        done = ", ".join(f"{name} x{count}" for name, count in self.patched.items()) or "nothing"
        lines = [f"fastsft.patch({self.model_type}, family {self.family}): {done}"]
        lines += [f"  not patched: {name}: {why}" for name, why in self.not_patched.items()]
        return "\n".join(lines)


@dataclass
class _AttentionState:
    family: Family
    rope: bool
    attention: bool
    original_forward: object
    eager_attention: object


@dataclass
class _Undo:
    """Everything needed to put the model back exactly as it was."""

    modules: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, name, original)
    forwards: list[tuple[nn.Module, object]] = field(default_factory=list)  # (module, its own instance forward)
    configs: list[tuple[nn.Module, object]] = field(default_factory=list)  # (module, original config)
    state_attributes: list[tuple[nn.Module, str]] = field(default_factory=list)

    def replace_module(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self.modules.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    def replace_forward(self, module: nn.Module, function, state_name: str | None = None, state=None) -> None:
        self.forwards.append((module, module.__dict__.get("forward", _NO_INSTANCE_FORWARD)))
        module.forward = types.MethodType(function, module)
        if state_name is not None:
            setattr(module, state_name, state)
            self.state_attributes.append((module, state_name))

    def undo(self) -> None:
        for module, name in reversed(self.state_attributes):
            module.__dict__.pop(name, None)
        for module, previous in reversed(self.forwards):
            if previous is _NO_INSTANCE_FORWARD:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        for parent, name, original in reversed(self.modules):
            setattr(parent, name, original)
        for module, config in reversed(self.configs):
            module.config = config


_NO_INSTANCE_FORWARD = object()
STATE_ATTRIBUTE = "_fastsft_patch"


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


def _decoder(model: nn.Module) -> nn.Module | None:
    """The base decoder (the module the causal LM's forward calls: `model.model` for Llama-likes)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return base if isinstance(base, nn.Module) and base is not model else None


def _own_config(model: nn.Module, undo: _Undo):
    """Give the model (and each submodule that shares its config object) a private copy of the config."""
    shared = model.config
    private = copy.deepcopy(shared)
    for module in model.modules():
        if module.__dict__.get("config") is shared:
            undo.configs.append((module, shared))
            module.config = private
    return private


def _is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))


def patch_model(model, *, rms_norm=True, rope=True, swiglu=True, attention=True, cross_entropy=True,
                keep_logits=False):  # fmt: skip
    wrapper, model = model, _causal_lm(model)
    if STATE_ATTRIBUTE in model.__dict__:
        raise RuntimeError("this model is already patched by fastsft; call fastsft.unpatch(model) first")
    model_type, family = family_of(model.config)
    report = PatchReport(model_type, model_type if family is not None else "generic")
    undo = _Undo()
    try:
        _patch(model, family, report, undo, dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, attention=attention,
                                                 cross_entropy=cross_entropy), keep_logits)  # fmt: skip
    except BaseException:
        undo.undo()
        raise
    model.__dict__[STATE_ATTRIBUTE] = undo
    model.__dict__["fastsft_report"] = report
    if wrapper is not model:
        wrapper.__dict__["fastsft_report"] = report
    return wrapper


def _patch(model, family: Family | None, report: PatchReport, undo: _Undo, options: dict, keep_logits: bool):
    decoder = _decoder(model)
    if family is None:
        warnings.warn(
            f"fastsft.patch: model_type {report.model_type!r} is not one of the supported families "
            f"({', '.join(FAMILIES)}); patching only what works through transformers' interfaces: attention "
            "(AttentionInterface) and the loss (get_output_embeddings). See model.fastsft_report.",
            stacklevel=3,
        )
        for name in ("rms_norm", "rope", "swiglu"):
            if options[name]:
                report.not_patched[name] = "family not in fastsft's table"

    config = _own_config(model, undo) if options["attention"] else model.config
    attention_on = options["attention"]
    if attention_on and getattr(config, "attention_dropout", 0.0):
        report.not_patched["attention"] = f"config.attention_dropout={config.attention_dropout} (no dropout kernel)"
        attention_on = False
    if attention_on and decoder is None:
        report.not_patched["attention"] = "no base decoder module found to compute document boundaries once"
        attention_on = False

    if family is not None:
        if options["rms_norm"]:
            _swap_norms(model, report, undo)
        if options["swiglu"]:
            _swap_mlps(model, report, undo)
        if options["rope"] or attention_on:
            _swap_attention_forwards(model, family, options["rope"], attention_on, report, undo)
    if attention_on:
        attention_patch.register_attention()
        config._attn_implementation = attention_patch.ATTENTION_NAME
        decoder_state = attention_patch.DecoderState(decoder.forward, inspect.signature(decoder.forward))
        undo.replace_forward(decoder, attention_patch.decoder_forward, "_fastsft_decoder", decoder_state)
        if family is None:
            report.patched["attention"] = sum(1 for m in model.modules() if _is_attention(m)) or 1
    elif options["attention"] and "attention" not in report.not_patched:
        report.not_patched["attention"] = "disabled"

    if options["cross_entropy"]:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or decoder is None:
            report.not_patched["cross_entropy"] = f"the output embedding is {type(head).__name__}, not nn.Linear"
        else:
            state = loss_patch.LossState(model.forward, inspect.signature(model.forward), decoder, family, keep_logits)
            undo.replace_forward(model, loss_patch.causal_lm_forward, "_fastsft_loss", state)
            report.patched["cross_entropy"] = 1
    for name, enabled in options.items():
        if not enabled and name not in report.not_patched:
            report.not_patched[name] = "disabled"


def _swap_norms(model, report: PatchReport, undo: _Undo):
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RMSNorm") and not isinstance(child, RMSNorm):
                undo.replace_module(parent, name, RMSNorm.from_hf(child))
                count += 1
    report.patched["rms_norm"] = count


def _swap_mlps(model, report: PatchReport, undo: _Undo):
    count = 0
    for parent in list(model.modules()):
        mlp = parent._modules.get("mlp")
        if mlp is not None and not isinstance(mlp, GatedMLP) and hasattr(mlp, "gate_proj"):
            undo.replace_module(parent, "mlp", GatedMLP.from_hf(mlp))
            count += 1
    report.patched["swiglu"] = count


def _swap_attention_forwards(model, family: Family, rope: bool, attention: bool, report: PatchReport, undo: _Undo):
    count = 0
    for module in model.modules():
        if not _is_attention(module):
            continue
        if family.qk_norm and not (hasattr(module, "q_norm") and hasattr(module, "k_norm")):
            raise TypeError(f"{type(module).__name__} has no q_norm/k_norm, which its family's facts say it has")
        modeling = sys.modules[type(module).__module__]
        state = _AttentionState(
            family, rope, attention, module.forward, getattr(modeling, "eager_attention_forward", None)
        )
        undo.replace_forward(module, attention_patch.attention_forward, "_fastsft", state)
        count += 1
    if rope:
        report.patched["rope"] = count
    if attention:
        report.patched["attention"] = count


def unpatch_model(model):
    wrapper, model = model, _causal_lm(model)
    wrapper.__dict__.pop("fastsft_report", None)
    undo = model.__dict__.pop(STATE_ATTRIBUTE, None)
    if undo is None:
        raise ValueError("this model was not patched by fastsft (nothing to undo)")
    undo.undo()
    model.__dict__.pop("fastsft_report", None)
    return wrapper
