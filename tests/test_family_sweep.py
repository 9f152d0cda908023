"""The family sweep (issue #19, item 5): every decoder-only causal LM of the installed transformers, patched by
fastsft on packed documents, is exact (the per-document unpatched loss and gradients, fp32) or refused with a
clear message; no third outcome. Types whose tiny model cannot be built are listed with the reason. The README's
support table is what tests/_family_sweep.py generates, so it cannot drift. See tests/_family_sweep.py."""

import difflib
import re
import warnings

import pytest
import transformers
from _family_sweep import (
    cases_to_run,
    enumerate_types,
    markdown,
    readme_table,
    readme_version,
    run_case,
)

from fastsft.patch.families import FAMILIES

KEPT, DROPPED = enumerate_types()
CASES = cases_to_run(KEPT)


def _id(model_type: str, router_aux: bool) -> str:
    return model_type + ("-router_aux" if router_aux else "")


@pytest.fixture(scope="module")
def sweep():
    """Each case runs once per module: `sweep(model_type, router_aux)` -> Case."""
    cache = {}

    def get(model_type: str, router_aux: bool = False):
        key = (model_type, router_aux)
        if key not in cache:
            cache[key] = run_case(model_type, KEPT[model_type], router_aux=router_aux)
        return cache[key]

    return get


def _names(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _names_the_model(message: str, model_type: str) -> bool:
    """The refusal names the model type, its class (without the head's suffix) or one of its modules."""
    stem = re.sub(r"(ForCausalLM|WithLMHeadModel|LMHeadModel|Decoder)$", "", KEPT[model_type])
    said = _names(message)
    return _names(model_type) in said or _names(stem) in said


@pytest.mark.parametrize(
    ("model_type", "router_aux"), [(t, aux) for t, _, aux in CASES], ids=[_id(t, aux) for t, _, aux in CASES]
)
def test_patched_packed_is_exact_or_refused(sweep, model_type, router_aux):
    """fastsft.patch(model) on 3 packed documents == the unpatched model on each document alone (loss and every
    gradient, fp32), or UnsupportedModelError naming the model and why. "wrong", "no loss" and "crash" fail.
    A type whose tiny model cannot be built passes here and is listed by test_unbuildable_types_have_a_reason."""
    case = sweep(model_type, router_aux)
    if case.outcome == "unbuildable":
        assert case.detail, f"{case.id}: unbuildable without a reason"
        return
    assert case.outcome in ("exact", "refused"), (
        f"{case.id}: {case.outcome}: {case.detail}\nfused: {case.fused}\n{case.report}"
    )
    if case.outcome == "refused":
        assert len(case.detail) >= 30 and _names_the_model(case.detail, model_type), (
            f"{case.id}: the refusal does not say which model or module it is about: {case.detail!r}"
        )


def test_unbuildable_types_have_a_reason(sweep):
    """Model types whose tiny model (or its unpatched per-document reference) cannot be built are not skipped
    silently: they are listed here, each with the exception's first line."""
    cases = [sweep(t, aux) for t, _, aux in CASES]
    unbuildable = [c for c in cases if c.outcome == "unbuildable"]
    if unbuildable:
        listing = "\n".join(f"  {c.id}: {c.detail}" for c in unbuildable)
        print(f"unbuildable model types ({len(unbuildable)}):\n{listing}")
        warnings.warn(f"family sweep: {len(unbuildable)} model type(s) unbuildable:\n{listing}", stacklevel=1)
    assert all(c.detail.strip() for c in unbuildable)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_table_families_are_exact(sweep, model_type):
    """The families fastsft.patch fully understands (families.FAMILIES) are never refused: exact. The one
    exception is a router-aux variant whose UNPATCHED reference cannot run under this transformers (HF's own
    forward fails, e.g. GraniteMoE's under 5.17): there is nothing to compare with, and the plain case is exact."""
    assert model_type in KEPT, (
        f"{model_type} is not a decoder-only causal LM of transformers {transformers.__version__}"
    )
    for _, _, router_aux in [c for c in CASES if c[0] == model_type]:
        case = sweep(model_type, router_aux)
        hf_fails = router_aux and case.outcome == "unbuildable" and case.detail.startswith("the unpatched reference")
        assert case.outcome == "exact" or hf_fails, f"{case.id}: {case.outcome}: {case.detail}\n{case.report}"


def test_dropped_types_say_why():
    """The enumeration drops only encoder-decoder and composite (multimodal) types, each with its reason, and
    never a family of the table."""
    assert all(why for why in DROPPED.values())
    assert not set(DROPPED) & set(FAMILIES)
    assert set(KEPT).isdisjoint(DROPPED)


def test_readme_support_table_is_generated(sweep):
    """README.md's "Model support (generated)" table equals `python tests/_family_sweep.py --markdown`.

    Compared only under the transformers version recorded in the table's first line (the enumeration is of the
    installed transformers, so another version has other model types); under other versions this test is
    skipped and the per-type tests above still run. Regenerate with
    `python tests/_family_sweep.py --markdown --write-readme`."""
    recorded = readme_version()
    assert recorded, "README.md has no generated family-support table (run tests/_family_sweep.py --write-readme)"
    if transformers.__version__ != recorded:
        pytest.skip(f"the README table is of transformers {recorded}; installed: {transformers.__version__}")
    expected = markdown([sweep(t, aux) for t, _, aux in CASES], DROPPED)
    actual = readme_table()
    if actual != expected:
        diff = "\n".join(
            difflib.unified_diff(actual.splitlines(), expected.splitlines(), "README", "sweep", lineterm="")
        )
        pytest.fail(
            "README.md's support table is out of date; regenerate it with "
            f"`python tests/_family_sweep.py --markdown --write-readme`:\n{diff}"
        )
