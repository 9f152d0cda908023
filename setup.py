"""Build script: maps kernels/ -> fastsft.kernels and builds the optional native extension fastsft._C.

Everything else (metadata, dependencies) lives in pyproject.toml.

fastsft._C is plain C++ against the CPython API (no torch headers, so it builds inside pip's isolated
build environment without pulling a torch wheel). It is optional twice over: `optional=True` makes a
failed compile a warning, and FASTSFT_NO_NATIVE=1 skips it; fastsft works without it (pure-Python
fallbacks, see fastsft/_native.py).
"""

import glob
import os

from setuptools import Extension, setup

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
        "fastsft.kernels",
    ],
    package_dir={"fastsft": "fastsft", "fastsft.kernels": "kernels"},
    ext_modules=ext_modules,
)
