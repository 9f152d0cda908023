"""The patched causal LM forward: the loss without the logits.

With `labels` (HF convention: unshifted, the model shifts) or `shift_labels` (already shifted, e.g. a
fastsft MicroBatch's labels), the final hidden states go straight into `fused_linear_cross_entropy` with
the lm_head weight: rows without a label never reach the vocabulary matmul and the [tokens, vocab] logits are
never built, so `logits` is None in the output (patch with keep_logits=True to get them as well).

Reduction follows HF's loss: the mean over supervised tokens, or, when the caller passes
`num_items_in_batch` (HF Trainer does, counted over the whole gradient-accumulation step), the sum divided
by it, so accumulation stays exact. Without labels the model's own forward runs unchanged.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsft._constants import IGNORE_INDEX
from fastsft.ops import fused_linear_cross_entropy, fused_linear_logprobs

from .attention import refuse_packed_call
from .binding import base_decoder, original_forward
from .families import UnsupportedModelError

# Arguments of the causal LM's forward that the base decoder does not take.
_HEAD_ONLY = ("labels", "logits_to_keep", "return_dict")


@dataclass(frozen=True)
class HeadTransform:
    """What the causal LM's forward does around its lm_head, measured (probe_head):
    logits = softcap(logit_scale * lm_head(hidden_scale * hidden)), softcap(x) = c * tanh(x / c) (None: none).
    Llama: (1, 1, None); Gemma-2/3: softcap = final_logit_softcapping; Cohere: logit_scale; Granite:
    1 / logits_scaling; MiniCPM3: hidden_scale = 1 / logits_scaling."""

    hidden_scale: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None


@dataclass
class LossState:
    head: HeadTransform
    keep_logits: bool
    router_aux_loss: object = None  # the model's load_balancing_loss_func when it adds a router aux loss (MoE)


# An MoE causal LM's forward adding its router auxiliary loss the standard HF way (28 families in transformers
# 5.25: Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, GLM-4-MoE, PhiMoE, gpt-oss, ...):
#     aux_loss = load_balancing_loss_func(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
#                                         attention_mask)
#     ... loss += self.router_aux_loss_coef * aux_loss
_STANDARD_AUX_LOSS = re.compile(
    r"load_balancing_loss_func\(\s*outputs\.router_logits,\s*self\.num_experts,\s*self\.num_experts_per_tok,"
    r"\s*attention_mask,?\s*\)"
)


def router_aux_loss(model, config=None) -> tuple[object, str]:
    """(load_balancing_loss_func, "") when the model adds its router aux loss the standard way (so the fused
    loss can add it exactly as HF does), (None, why) when it adds one some other way, (None, "") when it
    adds none. `config`: the model's (default model.config)."""
    config = model.config if config is None else config
    if not (hasattr(config, "router_aux_loss_coef") or hasattr(config, "output_router_logits")):
        return None, ""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        source = ""
    function = getattr(inspect.getmodule(type(model)), "load_balancing_loss_func", None)
    standard = _STANDARD_AUX_LOSS.search(source) and "self.router_aux_loss_coef * aux_loss" in source
    attributes = all(hasattr(model, name) for name in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef"))
    if standard and attributes and callable(function):
        return function, ""
    if "aux_loss" not in source:
        return None, ""
    return None, "the model adds a router auxiliary loss (MoE) in its own forward, not the standard HF way"


class _StubOutputs(dict):
    """What a stub decoder returns: last_hidden_state, and None for every other output a forward may read."""

    def __init__(self, hidden):
        super().__init__(last_hidden_state=hidden)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __getitem__(self, key):
        return self["last_hidden_state"] if key == 0 else super().__getitem__(key)


class _Stub(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *args, **kwargs):
        return self.function(*args, **kwargs)


def probe_head(model) -> tuple[HeadTransform | None, str]:
    """Measure what the causal LM's own forward does between its decoder and the logits: the forward runs once
    with the decoder replaced by a stub returning known hidden states and lm_head by a stub returning known
    logits (so it also works on a model on the meta device, and costs nothing). Recognised: a scale of the
    hidden states before lm_head, a scale of the logits, a softcap. (None, why) for anything else: then
    fastsft's fused loss is not used, the model's own loss runs."""
    head = model.get_output_embeddings()
    extra = sorted(n for n, _ in head.named_parameters() if n not in ("weight", "bias"))
    decoder_name, _ = base_decoder(model)
    decoder_name = decoder_name or ""
    outside = sorted(n for n, _ in model.named_parameters() if not n.startswith((decoder_name + ".", "lm_head.")))
    outside = [n for n in outside if not any(n.startswith(f"{c}.") for c, m in model.named_children() if m is head)]
    if extra or outside:  # a learned scale or such: the fused loss would train it as a constant
        names = ", ".join([f"lm_head.{n}" for n in extra] + outside)
        return None, f"the head has parameters of its own besides lm_head's weight and bias ({names})"
    head_name = next((name for name, child in model.named_children() if child is head), None)
    if not isinstance(getattr(model, decoder_name, None), torch.nn.Module) or head_name is None:
        return None, "no base decoder / lm_head child module to probe the head with"
    generator = torch.Generator().manual_seed(0)
    tokens = 5
    hidden = torch.randn(1, tokens, head.in_features, generator=generator)
    # Logits from near 0 (where a softcap is linear: the scale shows) to well into a softcap's saturation.
    logits = torch.randn(1, tokens, head.out_features, generator=generator) * torch.logspace(-3, 2, tokens)[:, None]
    head_inputs = []

    def stub_head(x):
        head_inputs.append(x.detach())
        return logits.clone()

    forward = original_forward(model)
    kwargs = {"input_ids": torch.zeros(1, tokens, dtype=torch.long), "use_cache": False, "return_dict": True}
    if "logits_to_keep" in inspect.signature(forward).parameters:
        kwargs["logits_to_keep"] = 0
    saved = model._modules[decoder_name], model._modules[head_name]
    model._modules[decoder_name] = _Stub(lambda *a, **k: _StubOutputs(hidden))
    model._modules[head_name] = _Stub(stub_head)
    try:
        with torch.no_grad():
            out = forward(**kwargs)
    except Exception as exc:  # a forward that needs more than the decoder's hidden states
        reason = (str(exc).strip().splitlines() or [""])[0]
        return None, f"its forward could not be measured around lm_head ({type(exc).__name__}: {reason})"
    finally:
        model._modules[decoder_name], model._modules[head_name] = saved
    if len(head_inputs) != 1 or head_inputs[0].shape != hidden.shape:
        return None, "its forward does not call lm_head once on the final hidden states"
    hidden_scale = _fit_scale(head_inputs[0], hidden)
    produced = out["logits"] if isinstance(out, dict) else getattr(out, "logits", None)
    if hidden_scale is None or not torch.is_tensor(produced) or produced.shape != logits.shape:
        return None, "its forward transforms the hidden states or the logits in a way fastsft does not recognise"
    produced = produced.float()
    scale = _fit_scale(produced, logits)
    if scale is not None:
        return HeadTransform(hidden_scale, scale), ""
    for cap in _softcap_candidates(model.config):
        # In a softcap's linear region logits ~ scale * x: the smallest logits give the scale.
        small = logits[0, 0]
        scale = float((produced[0, 0] * small).sum() / (small * small).sum())
        if torch.allclose(produced, cap * torch.tanh(scale * logits / cap), rtol=1e-4, atol=1e-5):
            return HeadTransform(hidden_scale, _round(scale), cap), ""
    return None, "its forward transforms the logits in a way fastsft does not recognise"


def _fit_scale(y: torch.Tensor, x: torch.Tensor) -> float | None:
    """s with y == s * x (to fp32 rounding), or None."""
    scale = float((y.double() * x.double()).sum() / (x.double() * x.double()).sum())
    return _round(scale) if torch.allclose(y.double(), scale * x.double(), rtol=1e-5, atol=1e-6) else None


def _round(scale: float) -> float:
    """A fitted scale with the noise of the fit removed (1.0000001 -> 1.0)."""
    return float(f"{scale:.6g}")


def _softcap_candidates(config) -> list[float]:
    """Positive numbers among the config's (and its text config's) attributes named *softcap* / *soft_cap*."""
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    found = []
    for cfg in configs:
        for name, value in vars(cfg).items():
            if ("softcap" in name or "soft_cap" in name) and isinstance(value, (int, float)) and value > 0:
                found.append(float(value))
    return sorted(set(found))


def _plain_linear_head(model) -> torch.nn.Module | None:
    """The lm_head when it is a plain Linear (FSDP's wrapped class included); None when something wraps it
    (e.g. a LoRA adapter added after patching), whose own forward must then run."""
    head = model.get_output_embeddings()
    return head if isinstance(head, torch.nn.Linear) else None


def _whole(t, name: str):
    """The lm_head's weight as a plain tensor. Under FSDP2 it is one while the unit holding it runs its
    forward (the root unit, with the rest of the model). A head sharded as its own unit stays a DTensor here:
    the fused loss reads its weight without calling it, so that unit's gather and gradient reduce-scatter
    would never run."""
    if t is not None and type(t).__name__ == "DTensor":
        raise RuntimeError(
            f"lm_head.{name} is still sharded (a DTensor) during the loss: fastsft's fused loss reads the weight "
            "without calling lm_head, so fully_shard(model.lm_head) as its own unit cannot gather it or "
            "reduce its gradient. Shard lm_head with the root module (fully_shard(model) without a separate "
            "fully_shard(model.lm_head)), or patch with cross_entropy=False."
        )
    return t


def _head_rows(head, transform: HeadTransform, hidden: torch.Tensor):
    """(rows [N, H], weight [V, H], bias [V] or None) for a fused op computing the model's own logits
    softcap(logit_scale * lm_head(hidden_scale * hidden)) from hidden [..., H]."""
    weight, bias = _whole(head.weight, "weight"), _whole(head.bias, "bias")
    rows = hidden.reshape(-1, hidden.shape[-1])
    # logit_scale * (W (a h) + bias) = W (a * logit_scale * h) + logit_scale * bias: both scales ride on the rows.
    row_scale = transform.hidden_scale * transform.logit_scale
    if row_scale != 1.0:
        rows = rows * row_scale
    if bias is not None and transform.logit_scale != 1.0:
        bias = bias * transform.logit_scale
    if weight.dtype != rows.dtype:  # e.g. an fp32 head under autocast: compute in the head's dtype
        rows = rows.to(weight.dtype)
    return rows, weight, bias


def _head_op(op, rows, weight, labels, bias, **options):
    """op(rows, weight, labels, bias=bias, **options), a fused lm_head op. Under autocast (an fp32 model with
    HF Trainer's bf16=True, fastsft train's bf16) the lm_head matmul runs in the autocast dtype as HF's would,
    the loss math in fp32 inside the op."""
    device_type = rows.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            bias = None if bias is None else bias.to(dtype)
            return op(rows.to(dtype), weight.to(dtype), labels, bias=bias, **options)
    return op(rows, weight, labels, bias=bias, **options)


# The patched causal LM's forward returns {"label_logprobs": [B * S] float32} instead of a loss when this keyword
# is True (label_logprobs below): the call goes through the model's own __call__, so FSDP's hooks (gathering the
# root unit's embeddings and lm_head, reducing their gradients) and PEFT's wrappers run as for a loss.
LOGPROBS_KWARG = "fastsft_label_logprobs"


def label_logprobs(model, shift_labels: torch.Tensor, **inputs) -> torch.Tensor:
    """Per-token log-probabilities of the labels under a causal LM patched by `fastsft.patch` (with its fused
    loss), for preference losses: the model's forward on `inputs` (input_ids [B, S], position_ids, ...) up to
    its final hidden states, then fastsft.ops.fused_linear_logprobs on the head exactly as the model's own
    forward applies it (the measured hidden / logit scale and softcap), without the [B * S, V] logits.

    shift_labels: [B, S] int, already shifted (the token each position predicts), -100 where no log-prob is
        wanted (prompt, document ends). Returns [B * S] float32, 0 at -100 positions, differentiable.
    """
    base = model
    while True:  # the causal LM inside DDP / DataParallel and PEFT wrappers (the call still goes through them)
        if isinstance(base, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            base = base.module
        elif type(base).__module__.startswith("peft.") and callable(getattr(base, "get_base_model", None)):
            base = base.get_base_model()
        else:
            break
    state = base.__dict__.get("_fastsft_loss")
    if state is None or _plain_linear_head(base) is None:
        why = "its lm_head is wrapped (e.g. a LoRA adapter on lm_head)" if state is not None else "it is not patched"
        raise UnsupportedModelError(
            f"label_logprobs needs a causal LM patched by fastsft.patch with its fused loss, but {why}; see "
            f"{type(base).__name__}.fastsft_report"
        )
    inputs.setdefault("use_cache", False)
    return model(**inputs, shift_labels=shift_labels, **{LOGPROBS_KWARG: True})["label_logprobs"]


def causal_lm_forward(self, *args, **kwargs):
    original = original_forward(self)
    state = self._fastsft_loss
    signature = inspect.signature(original)
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    extra = dict(arguments.pop("kwargs", {}))
    _refuse_packed(self, arguments, extra)
    labels = arguments.get("labels")
    shift_labels = extra.pop("shift_labels", None)
    want_logprobs = bool(extra.pop(LOGPROBS_KWARG, False))
    head = _plain_linear_head(self)
    if want_logprobs and (shift_labels is None or head is None):
        raise UnsupportedModelError("label log-probs need shift_labels and a plain lm_head (see label_logprobs)")
    if labels is None and shift_labels is None:
        return original(*args, **kwargs)
    if head is None:  # something wraps lm_head now (e.g. LoRA added after patching): the model's own loss
        return hf_loss_forward(self, *args, **kwargs)
    num_items_in_batch = extra.pop("num_items_in_batch", None)
    return_dict = arguments.get("return_dict", extra.pop("return_dict", None))
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    for name in _HEAD_ONLY:
        arguments.pop(name, None)
    if arguments.get("use_cache") is None and "use_cache" in signature.parameters:
        arguments["use_cache"] = False  # a loss forward needs no cache (and HF packs only without one)
    router = state.router_aux_loss is not None and "output_router_logits" in signature.parameters
    if router:  # resolved as HF's forward does, and asked of the decoder explicitly
        if arguments.get("output_router_logits") is None:
            arguments["output_router_logits"] = bool(getattr(self.config, "output_router_logits", False))
        router = arguments["output_router_logits"]
    if want_logprobs and router:  # an option that would be silently dropped: refuse it
        raise UnsupportedModelError(
            f"{type(self).__name__} adds a router auxiliary loss (output_router_logits=True), which fastsft's "
            "preference losses do not include; set config.output_router_logits=False to train without it"
        )
    _, decoder = base_decoder(self)
    outputs = decoder(**arguments, **extra, return_dict=True)
    hidden = outputs[0]
    if shift_labels is None:
        # HF's shift: the target of position t is labels[t + 1]; the last position has none.
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(shift_labels.shape)} do not match the tokens {tuple(hidden.shape[:-1])}"
        )
    transform = state.head
    cap = transform.softcap
    flat_hidden, weight, bias = _head_rows(head, transform, hidden)
    flat_labels = shift_labels.reshape(-1).to(device=hidden.device)
    if want_logprobs:
        return {"label_logprobs": _head_op(fused_linear_logprobs, flat_hidden, weight, flat_labels, bias, softcap=cap)}
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = _head_op(
        fused_linear_cross_entropy, flat_hidden, weight, flat_labels, bias, reduction=reduction, softcap=cap
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch

    logits = None
    if state.keep_logits:
        logits = head(hidden * transform.hidden_scale) * transform.logit_scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    output_class, aux_loss = CausalLMOutputWithPast, None
    if router:
        # Exactly HF's: the model's own function over the decoder's router logits (every real token of a
        # packed row: attention_mask is None there, as it is in HF's own packed forward), times the coefficient.
        aux_loss = state.router_aux_loss(
            outputs.router_logits, self.num_experts, self.num_experts_per_tok, arguments.get("attention_mask")
        )
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        output_class = MoeCausalLMOutputWithPast
    fields = output_class.__dataclass_fields__
    carried = {k: v for k, v in outputs.items() if k in fields and k not in ("loss", "logits", "last_hidden_state")}
    if aux_loss is not None:
        carried["aux_loss"] = aux_loss
    out = output_class(loss=loss, logits=logits, **carried)
    return out if return_dict else out.to_tuple()


def takes_shift_labels(model) -> bool:
    """Whether the causal LM's own forward computes HF's causal-LM loss through `self.loss_function(...,
    **kwargs)` (so a `shift_labels` kwarg reaches ForCausalLMLoss, which then ignores `labels`)."""
    if getattr(getattr(model, "loss_function", None), "__name__", "") != "ForCausalLMLoss":
        return False
    return _forward_passes_kwargs_to_loss(type(model))


@functools.cache
def _forward_passes_kwargs_to_loss(model_class) -> bool:
    """Read once per class: a training step may ask on every call."""
    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return False
    call = re.search(r"self\.loss_function\((.*?)\)\s*$", source, re.S | re.M)
    return call is not None and "**kwargs" in call.group(1)


def hf_loss_forward(self, *args, **kwargs):
    """Forward of a patched causal LM whose loss is the model's own (fastsft's fused loss is off or not safe for
    it, e.g. an MoE model adding its router auxiliary loss): the original forward, except that `shift_labels`
    alone also gets a loss. HF's forwards compute the loss only when `labels` is set; ForCausalLMLoss uses
    shift_labels when given and ignores labels, so labels is set to shift_labels as the "compute the loss"
    signal (the router aux loss is then added as HF adds it). A model that would not route shift_labels to
    its loss is refused rather than trained on unshifted labels; a loss asked for always comes back."""
    original = original_forward(self)
    arguments = dict(inspect.signature(original).bind_partial(*args, **kwargs).arguments)
    extra = dict(arguments.pop("kwargs", {}))
    _refuse_packed(self, arguments, extra)
    labels, shift_labels = arguments.get("labels"), extra.get("shift_labels")
    if labels is None and shift_labels is not None:
        if not takes_shift_labels(self):
            raise UnsupportedModelError(
                f"{type(self).__name__} computes its loss from `labels` only (its forward does not pass "
                "shift_labels to HF's causal-LM loss): pass labels (unshifted) instead of shift_labels"
            )
        arguments["labels"] = shift_labels
        out = original(**arguments, **extra)
    else:
        out = original(*args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", None)
    if (labels is not None or shift_labels is not None) and loss is None:
        raise UnsupportedModelError(f"{type(self).__name__} returned no loss for the labels it was given")
    return out


def _refuse_packed(model, arguments: dict, extra: dict) -> None:
    """Packed documents given to a model that cannot keep them apart are refused here too: a causal LM may drop
    position_ids before its decoder (whose guard would then see one document per row) receives them."""
    _, decoder = base_decoder(model)
    if decoder is not None:
        refuse_packed_call(decoder, arguments, extra)
