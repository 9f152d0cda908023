"""fastsft: fast, exact supervised fine-tuning (instruction tuning) of Hugging Face causal LMs.

    import fastsft
    fastsft.patch(model)      # drop-in kernels for a Hugging Face model (arrives with issue #6)
    from fastsft.ops import fused_linear_cross_entropy, cross_entropy

See README.md for the quick start.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "patch", "unpatch"]


def patch(model, *, rms_norm=True, rope=True, swiglu=True, attention=True, cross_entropy=True):
    """Swap fastsft's kernels into a Hugging Face causal LM in place and return it.

    Not built yet: the patcher arrives with the `fastsft.patch(model)` issue (#6). Until then the ops are
    usable directly from `fastsft.ops`.
    """
    raise NotImplementedError(
        "fastsft.patch(model) arrives with the patching issue (#6); use fastsft.ops.fused_linear_cross_entropy "
        "directly meanwhile"
    )


def unpatch(model):
    """Restore a model patched by `fastsft.patch` to its exact original behaviour (arrives with issue #6)."""
    raise NotImplementedError("fastsft.unpatch(model) arrives with the patching issue (#6)")
