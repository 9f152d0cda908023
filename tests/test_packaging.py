"""Packaging: kernels/ installs as fastsft.kernels (editable and wheel) without shadowing Hugging Face's
`kernels` package from a clone's root, the optional native extension builds and degrades cleanly, and the
command line answers."""

import importlib.machinery
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest

import fastsft
from fastsft import _native

REPO = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_maps_to_kernels_dir():
    import fastsft.kernels.linear_cross_entropy as module

    assert Path(module.__file__).resolve().parent.name == "kernels"


# --- The top-level kernels/ folder never stands in for Hugging Face's `kernels` (transformers >= 5.25
# imports it from transformers.integrations.hub_kernels). Each probe runs `python -c` from the repo root,
# where '' heads sys.path exactly as it does for `python -m pytest` or a user's script in a clone.

_PROBE = textwrap.dedent(
    """
    import json, sys, site
    for extra in sys.argv[1:]:
        site.addsitedir(extra)
    import kernels
    from transformers.utils import import_utils
    import transformers.integrations.hub_kernels  # what failed with `cannot import name 'CUDAProperties'`
    print(json.dumps({
        "kernels_file": getattr(kernels, "__file__", None),
        "available": import_utils.is_kernels_available(),
        "found": list(import_utils._is_package_available("kernels", return_version=True)),
    }))
    """
)


def _probe_from_repo_root(*site_dirs, isolated=False):
    """Run _PROBE from the clone's root; `isolated` starts without site-packages (-S), so only `site_dirs`
    provide packages (their .pth files, fastsft's editable finder among them, still run)."""
    import json

    command = [sys.executable, *(["-S"] if isolated else []), "-c", _PROBE, *map(str, site_dirs)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def site_without_hf_kernels(tmp_path):
    """A site directory holding every installed package except Hugging Face's `kernels` (links into this
    environment's site-packages): what a machine without that distribution looks like."""
    farm = tmp_path / "site_without_kernels"
    farm.mkdir()
    for packages in site.getsitepackages():
        for entry in Path(packages).iterdir():
            hidden = entry.name == "kernels" or (entry.name.startswith("kernels-") and entry.name.endswith("-info"))
            if not hidden and not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry)
    return farm


def _fake_hf_kernels_distribution(root: Path) -> Path:
    """A tiny installed `kernels` distribution (package + dist-info) at the version this transformers asks
    for; every name transformers imports from it is a placeholder class."""
    from transformers.utils.import_utils import KERNELS_MIN_VERSION

    package = root / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"__version__ = {KERNELS_MIN_VERSION!r}\n"
        "def __getattr__(name):\n"
        "    if name.startswith('__'):\n"
        "        raise AttributeError(name)\n"
        "    return type(name, (), {})\n"
    )
    info = root / f"kernels-{KERNELS_MIN_VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {KERNELS_MIN_VERSION}\n")
    (info / "top_level.txt").write_text("kernels\n")
    return root


def test_repo_root_does_not_shadow_an_installed_hf_kernels(tmp_path, site_without_hf_kernels):
    fake = _fake_hf_kernels_distribution(tmp_path / "fake_site")
    found = _probe_from_repo_root(site_without_hf_kernels, fake, isolated=True)
    assert found["kernels_file"] == str(fake / "kernels" / "__init__.py"), found
    assert found["available"] is True, found


def test_repo_root_does_not_pose_as_hf_kernels_when_it_is_absent(site_without_hf_kernels):
    found = _probe_from_repo_root(site_without_hf_kernels, isolated=True)
    # At most a PEP 420 namespace portion (no __file__), which transformers counts as not installed.
    assert found["kernels_file"] is None, found
    assert found["available"] is False and found["found"] == [False, "N/A"], found


def test_repo_root_with_this_environments_kernels():
    """This environment as it is: the newest transformers brings the real `kernels` (then it must be the one
    imported), an older one may not (then transformers must not see one)."""
    outside_repo = [p for p in sys.path if p and Path(p).resolve() != REPO]
    installed = importlib.machinery.PathFinder.find_spec("kernels", outside_repo)
    found = _probe_from_repo_root()
    if installed is not None and installed.origin:
        assert found["kernels_file"] == installed.origin, found
        assert not Path(found["kernels_file"]).resolve().is_relative_to(REPO / "kernels"), found
    else:
        assert found["kernels_file"] is None and found["available"] is False, found


def test_kernel_sources_stay_out_of_the_package_namespace():
    """kernels/ must not become a regular package again (that is what shadowed HF's `kernels`)."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "fastsft" / "kernels" / "__init__.py").is_file()


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_native_extension_was_built_and_matches():
    module = _native.native_module()
    assert module is not None, _native.load_error()
    assert module.abi_version() == _native.EXPECTED_ABI_VERSION


@pytest.fixture
def fresh_native_loader():
    """Forget what fastsft._native loaded, before and after the test (monkeypatch restores sys.modules)."""
    _native._reset_for_tests()
    yield
    _native._reset_for_tests()


def test_missing_native_extension_falls_back(fresh_native_loader, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastsft._C", None)  # makes `import fastsft._C` raise ImportError
    assert _native.native_module() is None
    assert "pure-Python fallbacks" in _native.load_error()


def test_stale_native_extension_is_refused(fresh_native_loader, monkeypatch):
    stale = types.ModuleType("fastsft._C")
    stale.abi_version = lambda: _native.EXPECTED_ABI_VERSION + 1
    monkeypatch.setitem(sys.modules, "fastsft._C", stale)
    assert _native.native_module() is None
    assert "rebuild it" in _native.load_error()


def test_wheel_contains_kernels_and_native_extension(tmp_path):
    """A regular (non-editable) build: the wheel holds fastsft/kernels/*.py and, with a compiler, _C; the
    installed copy imports from its own location."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("fastsft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastsft/kernels/linear_cross_entropy.py" in names and "fastsft/ops/reference.py" in names
    if shutil.which("c++") or shutil.which("g++"):
        assert any(n.startswith("fastsft/_C") and n.endswith(".so") for n in names), names
    assert not any(n.startswith("kernels/") for n in names)

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = "import fastsft, fastsft.kernels.cross_entropy as k; print(fastsft.__file__); print(k.__file__)"
    env = dict(os.environ, PYTHONPATH=str(target))
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(line.startswith(str(target)) for line in run.stdout.split()), run.stdout


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastsft.cli", *args], capture_output=True, text=True, timeout=timeout)


# Measured 2026-11-30 on the 2-core CPU: 0.0% -> 31.7% after 800 steps (69 s); the full default job (2000
# steps) reached 74.7%. The bar leaves room for run-to-run float differences between machines.
BAR_AFTER_800_STEPS = 15.0


def test_cli_train_default_job_learns_the_held_out_tasks(tmp_path):
    """The README's main job, shortened to stay fast in CI (the full default runs 2000 steps, ~2 min on 2
    cores): held-out exact match must rise from near zero to a clear share."""
    result = _cli(
        "train",
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "schedule.max_steps=800",
        "logging.progress_bar=false",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"held-out exact match: ([\d.]+)% before training -> ([\d.]+)% after", result.stdout)
    assert match, result.stdout[-3000:]
    before, after = float(match.group(1)), float(match.group(2))
    assert before <= 5.0 and after >= BAR_AFTER_800_STEPS, (before, after)
    assert (tmp_path / "run" / "checkpoint-800" / "model.safetensors").is_file()


def test_cli_info_reports_versions_and_backend():
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    assert f"fastsft       {fastsft.__version__}" in result.stdout and "backend" in result.stdout


def test_cli_rejects_unknown_command():
    result = _cli("fly")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_patch_is_not_silently_a_no_op():
    with pytest.raises(TypeError, match="expects a Hugging Face causal LM"):
        fastsft.patch(object())


def test_patch_stays_callable_whatever_is_imported_first():
    """fastsft.patch is both the package fastsft/patch/ and the public function: importing a submodule
    first (fastsft.patch.modules) must not replace the callable, nor the reverse."""
    code = (
        "import fastsft.patch.modules, fastsft, inspect\n"
        "assert callable(fastsft.patch), fastsft.patch\n"
        "assert 'rms_norm' in inspect.signature(fastsft.patch).parameters\n"
        "assert fastsft.patch.modules.RMSNorm\n"
        "try:\n"
        "    fastsft.patch(object(), rope=False)\n"
        "except TypeError:\n"
        "    print('raised')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "raised", done.stderr[-2000:]


def test_the_public_face_and_lazy_subpackages():
    """ARCHITECTURE.md: `fastsft` exposes patch, unpatch, __version__, and train/data on first use (importing
    fastsft alone does not import them)."""
    code = (
        "import sys, fastsft\n"
        "assert 'fastsft.train' not in sys.modules and 'fastsft.data' not in sys.modules\n"
        "assert callable(fastsft.patch) and callable(fastsft.unpatch) and fastsft.__version__\n"
        "assert callable(fastsft.train.train) and callable(fastsft.train.load_config)\n"
        "assert callable(fastsft.data.prepare_dataset) and callable(fastsft.data.PackedLoader)\n"
        "try:\n    fastsft.nope\nexcept AttributeError as e:\n    assert 'nope' in str(e)\n"
        "else:\n    raise SystemExit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
