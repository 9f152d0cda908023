"""fastsft: fast, exact supervised fine-tuning (instruction tuning) of Hugging Face causal LMs.

    import fastsft
    fastsft.patch(model)      # drop-in kernels for a Hugging Face model (arrives with issue #6)
    from fastsft.ops import fused_linear_cross_entropy, rms_norm, apply_rope, swiglu

See README.md for the quick start.
"""

__version__ = "0.1.0"

# `patch` is the package fastsft/patch/, whose module object is callable as the patch function: one name
# for both, so importing fastsft.patch.modules can never shadow the function.
from . import patch  # noqa: E402
from .patch import unpatch  # noqa: E402

__all__ = ["__version__", "patch", "unpatch"]
