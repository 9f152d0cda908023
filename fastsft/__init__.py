"""fastsft: fast, exact supervised fine-tuning (instruction tuning) of Hugging Face causal LMs.

    import fastsft
    fastsft.patch(model)      # drop-in kernels for a Hugging Face model
    from fastsft.ops import fused_linear_cross_entropy, rms_norm, apply_rope, swiglu
    fastsft.data.prepare_dataset(...), fastsft.data.PackedLoader(...)      # instruction data (imported on use)
    fastsft.train.train(fastsft.train.load_config("job.yaml", ["optimizer.lr=1e-5"]))   # what `fastsft train` runs

See README.md for the quick start.
"""

__version__ = "0.1.0"

# `patch` is the package fastsft/patch/, whose module object is callable as the patch function: one name
# for both, so importing fastsft.patch.modules can never shadow the function.
from . import patch  # noqa: E402
from .patch import unpatch  # noqa: E402

__all__ = ["__version__", "patch", "unpatch"]

_LAZY_SUBPACKAGES = ("data", "ops", "train")  # imported on first use: `import fastsft` stays light


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastsft' has no attribute {name!r}")
