"""Access to the optional native extension fastsft._C.

Only fastsft/data (the packer) uses native code, and only through this module (`fastsft info` reports
its status), so that a missing or stale build degrades to the pure-Python path instead of failing at
import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Must match kAbiVersion in csrc/fastsft_C.cpp.
EXPECTED_ABI_VERSION = 2

_module: ModuleType | None = None
_load_error: str | None = None
_loaded = False


def native_module() -> ModuleType | None:
    """Return fastsft._C if it was built and matches this Python code, else None (see `load_error`)."""
    global _module, _load_error, _loaded
    if _loaded:
        return _module
    _loaded = True
    try:
        mod = importlib.import_module("fastsft._C")
    except ImportError as exc:
        _load_error = f"fastsft._C is not built ({exc}); using the pure-Python fallbacks"
        return None
    version = mod.abi_version()
    if version != EXPECTED_ABI_VERSION:
        _load_error = (
            f"fastsft._C has ABI version {version} but this fastsft expects {EXPECTED_ABI_VERSION}; "
            "rebuild it with `pip install -e .` (using the pure-Python fallbacks meanwhile)"
        )
        return None
    _module = mod
    return mod


def load_error() -> str | None:
    """Why the native extension is unavailable, or None when it loaded."""
    native_module()
    return _load_error


def _reset_for_tests() -> None:
    global _module, _load_error, _loaded
    _module, _load_error, _loaded = None, None, False
