"""fastsft.patch: Hugging Face integration.

`fastsft.patch(model)` is both this package and the public function (ARCHITECTURE.md's contract): the package
module is callable, so `fastsft.patch(model, ...)` works however and in whatever order `fastsft.patch`
and its submodules (e.g. `fastsft.patch.modules`, the HF drop-ins) are imported.
"""

from __future__ import annotations

import inspect
import sys
import types

from .families import UnsupportedModelError

__all__ = ["UnsupportedModelError", "label_logprobs", "patch", "unpatch"]


def patch(model, *, rms_norm=True, rope=True, swiglu=True, attention=True, cross_entropy=True, keep_logits=False):
    """Swap fastsft's kernels into a Hugging Face causal LM, in place and for this instance only; returns it.

    Same loss and gradients as the unpatched model, faster and leaner. Each option can be turned off:
    rms_norm (every RMSNorm), rope, swiglu (the gated MLP, SwiGLU or GeGLU), attention (packed-sequence
    varlen attention, registered as transformers attention "fastsft"; True / "fastsft": fastsft's Triton
    kernels, "torch": torch's varlen_attn (FlashAttention-2 in torch; no softcap), "flash_attn": the
    flash-attn package (FlashAttention-3 on Hopper when installed); a backend that is not installed is an
    ImportError here, and the last two run on CUDA in fp16 / bf16 only), cross_entropy (the loss from the
    hidden states with fused linear cross-entropy; `logits` is then None when labels are passed, unless
    keep_logits=True). `model.fastsft_report` says what was swapped and what was not, and why.

    Families in fastsft's table, `fastsft.patch.families.FAMILIES` (llama, mistral, ministral, qwen2/3,
    gemma2/3/4, phi3, olmo2/3, glm4, smollm3, exaone4, cohere/cohere2, granite, seed_oss, arcee, starcoder2,
    llama4, and the MoE families mixtral, qwen2/3-moe, olmoe, granitemoe, glm4_moe, phimoe, gpt-oss).
    Other decoder-only causal LMs get attention and the loss, with a warning; a model fastsft cannot run
    exactly raises UnsupportedModelError. Undo with `fastsft.unpatch(model)`.
    """
    from .patcher import patch_model

    return patch_model(
        model,
        rms_norm=rms_norm,
        rope=rope,
        swiglu=swiglu,
        attention=attention,
        cross_entropy=cross_entropy,
        keep_logits=keep_logits,
    )


def label_logprobs(model, shift_labels, **inputs):
    """Per-token log-probabilities [B * S] (float32, 0 where shift_labels is -100) of `shift_labels` [B, S]
    under a model patched with the fused loss, from its decoder run on `inputs` (input_ids, position_ids, ...)
    and its head as its own forward applies it, without the logits: the input of a preference loss (sum them
    per sequence with fastsft.ops.per_sequence_sum). See fastsft.patch.loss.label_logprobs."""
    from .loss import label_logprobs as _label_logprobs

    return _label_logprobs(model, shift_labels, **inputs)


def unpatch(model):
    """Restore a model patched by `fastsft.patch` to its exact original modules, forwards and config."""
    from .patcher import unpatch_model

    return unpatch_model(model)


class _CallableModule(types.ModuleType):
    """The `fastsft.patch` package, callable as the `patch` function."""

    def __call__(self, model, **options):
        return patch(model, **options)


__signature__ = inspect.signature(patch)
sys.modules[__name__].__class__ = _CallableModule
