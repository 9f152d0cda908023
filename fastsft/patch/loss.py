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

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsft._constants import IGNORE_INDEX
from fastsft.ops import fused_linear_cross_entropy

from .binding import original_forward
from .families import Family, final_softcap

# Arguments of the causal LM's forward that the base decoder does not take.
_HEAD_ONLY = ("labels", "logits_to_keep", "return_dict")


@dataclass
class LossState:
    family: Family | None
    keep_logits: bool


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


def causal_lm_forward(self, *args, **kwargs):
    original = original_forward(self)
    state = self._fastsft_loss
    signature = inspect.signature(original)
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    extra = dict(arguments.pop("kwargs", {}))
    labels = arguments.get("labels")
    shift_labels = extra.pop("shift_labels", None)
    head = _plain_linear_head(self)
    if (labels is None and shift_labels is None) or head is None:
        return original(*args, **kwargs)
    num_items_in_batch = extra.pop("num_items_in_batch", None)
    return_dict = arguments.get("return_dict", extra.pop("return_dict", None))
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    for name in _HEAD_ONLY:
        arguments.pop(name, None)
    if arguments.get("use_cache") is None and "use_cache" in signature.parameters:
        arguments["use_cache"] = False  # a loss forward needs no cache (and HF packs only without one)
    decoder = getattr(self, self.base_model_prefix)
    outputs = decoder(**arguments, **extra, return_dict=True)
    hidden = outputs[0]
    if shift_labels is None:
        # HF's shift: the target of position t is labels[t + 1]; the last position has none.
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(shift_labels.shape)} do not match the tokens {tuple(hidden.shape[:-1])}"
        )
    cap = final_softcap(state.family, self.config)
    weight, bias = _whole(head.weight, "weight"), _whole(head.bias, "bias")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if weight.dtype != flat_hidden.dtype:  # e.g. an fp32 head under autocast: compute in the head's dtype
        flat_hidden = flat_hidden.to(weight.dtype)
    flat_labels = shift_labels.reshape(-1).to(device=hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    device_type = flat_hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Mixed precision (an fp32 model under autocast, e.g. HF Trainer's bf16=True on fp32 weights): the
        # lm_head matmul runs in the autocast dtype as HF's would, the loss math in fp32 inside the op.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            loss = fused_linear_cross_entropy(
                flat_hidden.to(dtype),
                weight.to(dtype),
                flat_labels,
                bias=None if bias is None else bias.to(dtype),
                reduction=reduction,
                softcap=cap,
            )
    else:
        loss = fused_linear_cross_entropy(flat_hidden, weight, flat_labels, bias=bias, reduction=reduction, softcap=cap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch

    logits = None
    if state.keep_logits:
        logits = head(hidden)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    carried = {k: v for k, v in outputs.items() if k in fields and k not in ("loss", "logits", "last_hidden_state")}
    out = CausalLMOutputWithPast(loss=loss, logits=logits, **carried)
    return out if return_dict else out.to_tuple()
