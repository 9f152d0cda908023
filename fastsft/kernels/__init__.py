"""fastsft.kernels: Triton kernels and their launchers on raw tensors.

No autograd, no nn.Module, no Hugging Face here: fastsft/ops is the only importer.

The kernel sources live in the repository's top-level `kernels/` folder (the product's layout). That folder
deliberately has no `__init__.py`: a regular package named `kernels` at the root of a clone would shadow
Hugging Face's `kernels` distribution (a dependency of transformers >= 5.25) for any Python started there,
`python -m pytest` included. Without one, the folder is at most a PEP 420 namespace portion, which the
import system ranks below any installed `kernels` and which transformers reports as "not installed".

How `fastsft.kernels.<name>` finds its modules:
- a wheel / non-editable install: setup.py copies kernels/*.py beside this file;
- a source checkout or an editable install: this package's `__path__` reaches the clone's kernels/ folder.
"""

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_here)), "kernels")
if not _os.path.isfile(_os.path.join(_here, "_common.py")) and _os.path.isfile(
    _os.path.join(_checkout_kernels, "_common.py")
):
    __path__.append(_checkout_kernels)  # noqa: F821 (the package's own __path__, set by the import system)
