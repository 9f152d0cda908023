"""fastsft.ops: the public ops (autograd-aware torch custom ops) and their backend dispatch.

This package is the only importer of fastsft.kernels (Triton) and fastsft._C (native); the backend
for each call follows FASTSFT_BACKEND (see fastsft/ops/_backend.py).
"""

from .cross_entropy import cross_entropy, fused_linear_cross_entropy

__all__ = ["cross_entropy", "fused_linear_cross_entropy"]
