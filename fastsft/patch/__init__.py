"""fastsft.patch: Hugging Face integration.

`fastsft.patch(model)` is both this package and the public function (DESIGN.md's contract): the package
module is callable, so `fastsft.patch(model, ...)` works however and in whatever order `fastsft.patch`
and its submodules (e.g. `fastsft.patch.modules`, the HF drop-ins) are imported.
"""

from __future__ import annotations

import inspect
import sys
import types


def patch(model, *, rms_norm=True, rope=True, swiglu=True, attention=True, cross_entropy=True):
    """Swap fastsft's kernels into a Hugging Face causal LM in place and return it.

    Not built yet: the patcher arrives with the `fastsft.patch(model)` issue (#6). Until then the ops are
    usable directly from `fastsft.ops`, and the drop-in modules from `fastsft.patch.modules`.
    """
    raise NotImplementedError(
        "fastsft.patch(model) arrives with the patching issue (#6); use fastsft.ops (fused_linear_cross_entropy, "
        "rms_norm, apply_rope, swiglu) and fastsft.patch.modules directly meanwhile"
    )


def unpatch(model):
    """Restore a model patched by `fastsft.patch` to its exact original behaviour (arrives with issue #6)."""
    raise NotImplementedError("fastsft.unpatch(model) arrives with the patching issue (#6)")


class _CallableModule(types.ModuleType):
    """The `fastsft.patch` package, callable as the `patch` function."""

    def __call__(self, model, **options):
        return patch(model, **options)


__signature__ = inspect.signature(patch)
sys.modules[__name__].__class__ = _CallableModule
