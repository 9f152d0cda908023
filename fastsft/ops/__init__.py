"""fastsft.ops: the public ops (autograd-aware torch custom ops) and their backend dispatch.

This package is the only importer of fastsft.kernels (Triton); the backend for each call follows
FASTSFT_BACKEND (see fastsft/ops/_backend.py).
"""

from .activations import geglu, swiglu
from .attention import varlen_attention
from .cross_entropy import cross_entropy, fused_linear_cross_entropy
from .logprobs import fused_linear_logprobs, per_sequence_sum
from .preference import PreferenceLoss, dpo_loss, orpo_loss, simpo_loss
from .rms_norm import add_rms_norm, rms_norm
from .rope import apply_rope

__all__ = [
    "PreferenceLoss",
    "add_rms_norm",
    "apply_rope",
    "cross_entropy",
    "dpo_loss",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "geglu",
    "orpo_loss",
    "per_sequence_sum",
    "rms_norm",
    "simpo_loss",
    "swiglu",
    "varlen_attention",
]
