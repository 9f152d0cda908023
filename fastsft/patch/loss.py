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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsft.ops import fused_linear_cross_entropy

from .families import Family, final_softcap

IGNORE_INDEX = -100
# Arguments of the causal LM's forward that the base decoder does not take.
_HEAD_ONLY = ("labels", "logits_to_keep", "return_dict")


@dataclass
class LossState:
    original_forward: object
    signature: object
    decoder: torch.nn.Module
    family: Family | None
    keep_logits: bool


def causal_lm_forward(self, *args, **kwargs):
    state = self._fastsft_loss
    arguments = dict(state.signature.bind_partial(*args, **kwargs).arguments)
    extra = dict(arguments.pop("kwargs", {}))
    labels = arguments.get("labels")
    shift_labels = extra.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return state.original_forward(*args, **kwargs)
    num_items_in_batch = extra.pop("num_items_in_batch", None)
    for name in _HEAD_ONLY:
        arguments.pop(name, None)
    outputs = state.decoder(**arguments, **extra)
    hidden = outputs[0]
    if shift_labels is None:
        # HF's shift: the target of position t is labels[t + 1]; the last position has none.
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(shift_labels.shape)} do not match the tokens {tuple(hidden.shape[:-1])}"
        )
    head = self.get_output_embeddings()
    cap = final_softcap(state.family, self.config)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = shift_labels.reshape(-1).to(device=hidden.device)
    weight = head.weight
    if weight.dtype != flat_hidden.dtype:  # e.g. an fp32 head under autocast: compute in the head's dtype
        flat_hidden = flat_hidden.to(weight.dtype)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fused_linear_cross_entropy(
        flat_hidden, weight, flat_labels, bias=head.bias, reduction=reduction, softcap=cap
    )
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
    return CausalLMOutputWithPast(loss=loss, logits=logits, **carried)
