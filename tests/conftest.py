"""Test harness: Triton interpreter on CPU, seeds, the `gpu` marker, and the low-precision error bound.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter; this module sets
TRITON_INTERPRET=1 before anything imports triton (the interpreter is chosen when kernels are decorated).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns once per process unless this is set; the default (fusion on) is what we want.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (runs in the GPU suite)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_backend(monkeypatch):
    """Run fastsft ops through the Triton kernels (interpreted on CPU, compiled on CUDA)."""
    monkeypatch.setenv("FASTSFT_BACKEND", "triton")
    return DEVICE


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("FASTSFT_BACKEND", "reference")
    return DEVICE


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def assert_within_torch_error(name, actual, torch_lowp, exact, factor=2.0):
    """The kernel's error against an exact (fp64) result is at most `factor` x the error of torch's own
    computation in the same low precision, plus an fp32-rounding floor (so exact-zero cases compare)."""
    floor = torch.finfo(torch.float32).eps * (exact.double().abs().max().item() if exact.numel() else 0.0)
    err = max_abs_error(actual, exact)
    torch_err = max_abs_error(torch_lowp, exact)
    assert err <= factor * torch_err + floor, (
        f"{name}: max error {err:.3e} exceeds {factor} x torch's own {torch_lowp.dtype} error "
        f"{torch_err:.3e} (+ floor {floor:.1e})"
    )


def assert_close_fp32(name, actual, exact, rtol=2e-5):
    """fp32 parity: max error within rtol of the largest exact magnitude (~1e-5 relative)."""
    scale = max(exact.double().abs().max().item() if exact.numel() else 0.0, 1e-30)
    err = max_abs_error(actual, exact)
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol} x {scale:.3e}"
