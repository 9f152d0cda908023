"""Build script: installs the top-level kernels/ folder as fastsft.kernels and builds the optional native
extension fastsft._C.

Everything else (metadata, dependencies) lives in pyproject.toml.

kernels/ has no __init__.py (so that a clone's root never shadows Hugging Face's `kernels` package); the
package `fastsft.kernels` is fastsft/kernels/__init__.py. A wheel or a regular install copies kernels/*.py
beside that __init__.py (`_BuildPyWithKernels`); an editable install copies nothing and the package's
__path__ reaches the clone's kernels/ folder (see fastsft/kernels/__init__.py).

fastsft._C is plain C++ against the CPython API (no torch headers, so it builds inside pip's isolated
build environment without pulling a torch wheel). It is optional twice over: `optional=True` makes a
failed compile a warning, and FASTSFT_NO_NATIVE=1 skips it; fastsft works without it (pure-Python
fallbacks, see fastsft/_native.py).
"""

import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

KERNELS_PACKAGE = "fastsft.kernels"
KERNEL_SOURCES = "kernels"


class _BuildPyWithKernels(build_py):
    """build_py that lists kernels/*.py as modules of fastsft.kernels (wheel, sdist and regular installs)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == KERNELS_PACKAGE:
            for path in sorted(glob.glob(os.path.join(KERNEL_SOURCES, "*.py"))):
                modules.append((package, os.path.splitext(os.path.basename(path))[0], path))
        return modules


native_sources = sorted(glob.glob("csrc/*.cpp"))
ext_modules = []
if native_sources and os.environ.get("FASTSFT_NO_NATIVE", "0") != "1":
    ext_modules.append(
        Extension(
            "fastsft._C",
            sources=native_sources,
            extra_compile_args=["-O3", "-std=c++17"],
            language="c++",
            optional=True,
        )
    )

setup(
    packages=[
        "fastsft",
        "fastsft.ops",
        "fastsft.patch",
        "fastsft.data",
        "fastsft.train",
        KERNELS_PACKAGE,
    ],
    cmdclass={"build_py": _BuildPyWithKernels},
    ext_modules=ext_modules,
)
