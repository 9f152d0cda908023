"""Best-fit-decreasing packing and dealing micro-batches to ranks (fastsft/data/packing.py, fastsft._C).

The expected packings come from the rule as the docstring states it, re-implemented here independently: the
ordering and bin shuffle straight from the numpy recipe, and an O(N * B) best-fit packer that scans every
bin. The native packer must be built (CI always builds it): the native tests fail, never skip, without it.
"""

import math
import sys

import numpy as np
import pytest

from fastsft import _native
from fastsft.data.packing import Packing, Schedule, deal_to_ranks, pack_documents

BACKENDS = ("native", "python")


# --------------------------------------------------------------------------------------------------
# The rule, written independently
# --------------------------------------------------------------------------------------------------


def reference_best_fit(ordered_lengths, max_tokens):
    """Bins as lists of positions into ordered_lengths: each document into the bin with the least free
    space that fits it, ties to the bin whose free space changed last, else a new bin. O(N * B)."""
    bins = []  # [free, last_changed, positions]
    for clock, length in enumerate(ordered_lengths):
        fitting = [entry for entry in bins if entry[0] >= length]
        if fitting:
            best = min(fitting, key=lambda entry: (entry[0], -entry[1]))
        else:
            best = [max_tokens, -1, []]
            bins.append(best)
        best[0] -= length
        best[1] = clock
        best[2].append(clock)
    return [entry[2] for entry in bins]


def expected_bins(lengths, max_tokens, seed, epoch):
    """The packing the docstring promises, as a list of document-id lists in bin order."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    bins = reference_best_fit(lengths[order].tolist(), max_tokens)
    shuffle = rng.permutation(len(bins))
    return [[int(order[p]) for p in bins[k]] for k in shuffle]


def bins_of(packing):
    return [packing.bin(b).tolist() for b in range(len(packing))]


def make_packing(bins, lengths, max_tokens):
    """A Packing built by hand from document-id lists."""
    lengths = np.asarray(lengths, dtype=np.int64)
    doc_ids = np.array([d for docs in bins for d in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(docs) for docs in bins])]).astype(np.int64)
    bin_tokens = np.array([lengths[docs].sum() for docs in bins], dtype=np.int64)
    return Packing(offsets, doc_ids, lengths[doc_ids], bin_tokens, max_tokens)


def lognormal_lengths(rng, n, mean, sigma, low, high):
    return np.clip(np.round(rng.lognormal(mean, sigma, n)), low, high).astype(np.int64)


def assert_valid_packing(packing, lengths, max_tokens):
    lengths = np.asarray(lengths)
    n = len(lengths)
    offsets = packing.bin_offsets
    assert offsets.dtype == packing.doc_ids.dtype == packing.doc_tokens.dtype == packing.bin_tokens.dtype == np.int64
    assert offsets[0] == 0 and offsets[-1] == n and np.all(np.diff(offsets) >= 1), "empty bin or bad offsets"
    assert len(packing) == len(offsets) - 1 == len(packing.bin_tokens)
    assert np.array_equal(np.sort(packing.doc_ids), np.arange(n)), "a document is missing or packed twice"
    assert np.array_equal(packing.doc_tokens, lengths[packing.doc_ids])
    sums = [int(lengths[packing.bin(b)].sum()) for b in range(len(packing))]
    assert packing.bin_tokens.tolist() == sums
    assert max(sums) <= max_tokens, "a bin is over capacity"
    assert packing.max_tokens == max_tokens
    for b in range(len(packing)):
        in_bin = lengths[packing.bin(b)]
        assert np.all(np.diff(in_bin) <= 0), "documents enter a bin longest first"


def assert_same_packing(a, b):
    for name in ("bin_offsets", "doc_ids", "doc_tokens", "bin_tokens"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == np.int64, name
        assert np.array_equal(x, y), name
    assert a.max_tokens == b.max_tokens


@pytest.fixture
def native_module():
    module = _native.native_module()
    assert module is not None, f"the native packer must be built for these tests: {_native.load_error()}"
    return module


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend in turn; the native one must be built (CI builds it), so its tests fail without it."""
    if request.param == "native":
        assert _native.native_module() is not None, f"the native packer is not available: {_native.load_error()}"
    return request.param


@pytest.fixture
def native_unavailable(monkeypatch):
    """fastsft._C as if it were not built (as test_packaging does), restored afterwards."""
    _native._reset_for_tests()
    monkeypatch.setitem(sys.modules, "fastsft._C", None)  # makes `import fastsft._C` raise ImportError
    yield
    _native._reset_for_tests()


# --------------------------------------------------------------------------------------------------
# pack_documents: the rule
# --------------------------------------------------------------------------------------------------


def test_matches_reference_rule_on_small_random_inputs(backend):
    rng = np.random.default_rng(1234)
    for trial in range(300):
        max_tokens = int(rng.integers(1, 40))
        n = int(rng.integers(1, 60))
        # Few distinct values, so ties (equal lengths, equally free bins) are common.
        lengths = rng.integers(1, max_tokens + 1, size=n) if trial % 2 else rng.choice([1, 2, 3, max_tokens], n)
        lengths = np.minimum(lengths, max_tokens)
        seed, epoch = int(rng.integers(0, 1000)), int(rng.integers(0, 5))
        packing = pack_documents(lengths, max_tokens, seed=seed, epoch=epoch, backend=backend)
        assert_valid_packing(packing, lengths, max_tokens)
        assert bins_of(packing) == expected_bins(lengths, max_tokens, seed, epoch), (trial, lengths.tolist())


def test_hand_worked_example(backend):
    # Decreasing: 6 (doc 0), 5 (doc 3), 4, 4 (docs 1, 4: order by the seeded permutation), 2, 1 (docs 2, 5).
    # max_tokens 8: 6 -> A (free 2); 5 -> B (free 3); first 4 -> C (free 4); second 4 -> C (free 0, the
    # exact fit, not a new bin); 2 -> A (free 2 is the least that fits; B has 3); 1 -> B (free 3, the only
    # bin left with room).
    lengths = [6, 4, 2, 5, 4, 1]
    packing = pack_documents(lengths, 8, seed=7, backend=backend)
    as_sets = sorted(sorted(docs) for docs in bins_of(packing))
    assert as_sets == [[0, 2], [1, 4], [3, 5]]
    assert sorted(packing.bin_tokens.tolist()) == [6, 8, 8]


def test_lifo_among_equally_free_bins(backend):
    # max 10, lengths 7,7,7 open bins A,B,C with free 3 each (pushed in that order); the next document (3)
    # goes to C, the bin that reached free 3 last; then the last 3 goes to B.
    lengths = [7, 7, 7, 3, 3]
    packing = pack_documents(lengths, 10, seed=3, backend=backend)
    rng = np.random.default_rng([3, 0])
    perm = rng.permutation(5)
    sevens = [int(d) for d in perm if lengths[d] == 7]  # the order the 7s were packed in
    threes = [int(d) for d in perm if lengths[d] == 3]
    with_three = {frozenset(docs) for docs in bins_of(packing) if len(docs) == 2}
    assert with_three == {frozenset({sevens[2], threes[0]}), frozenset({sevens[1], threes[1]})}


def test_packing_api(backend):
    # Decreasing 9, 7, 5, 3, 3, 2, 1 into 10: 9 | 7 | 5, the first 3 fits 7's bin exactly (free 3), the second
    # 3 and the 2 fill 5's bin, the 1 fills 9's. Which 3 comes first is the seeded permutation's choice.
    lengths = np.array([5, 3, 3, 9, 1, 7, 2])
    packing = pack_documents(lengths, 10, seed=4, backend=backend)
    assert_valid_packing(packing, lengths, 10)
    first_three, second_three = [int(d) for d in np.random.default_rng([4, 0]).permutation(7) if lengths[d] == 3]
    assert {frozenset(packing.bin(b).tolist()) for b in range(len(packing))} == {
        frozenset({3, 4}),
        frozenset({5, first_three}),
        frozenset({0, second_three, 6}),
    }
    assert len(packing) == 3 and packing.num_documents == 7 and packing.num_tokens == 30
    assert packing.bin_tokens.tolist() == [10, 10, 10]
    assert packing.efficiency == 1.0
    with pytest.raises(ValueError):
        packing.doc_ids[0] = 1  # read-only: a Packing is a value


def test_accepts_any_integer_dtype_and_lists(backend):
    lengths = [4, 1, 3, 3, 2, 5]
    expected = pack_documents(np.array(lengths, dtype=np.int64), 6, seed=5, backend=backend)
    for variant in (lengths, np.array(lengths, np.int32), np.array(lengths, np.uint16), np.array(lengths)[::-1][::-1]):
        assert_same_packing(pack_documents(variant, 6, seed=5, backend=backend), expected)


# --------------------------------------------------------------------------------------------------
# pack_documents: native == python, bit for bit
# --------------------------------------------------------------------------------------------------


def _adversarial_cases():
    rng = np.random.default_rng(99)
    return {
        "all-equal": (np.full(5000, 100), 1000),
        "all-equal-odd-fit": (np.full(3001, 300), 1000),
        "all-max": (np.full(2000, 512), 512),
        "all-one": (np.ones(4000, dtype=np.int64), 64),
        "max-tokens-one": (np.ones(100, dtype=np.int64), 1),
        "n-one": (np.array([17]), 17),
        "many-duplicates": (rng.choice([1, 7, 500, 999, 1000], 20_000), 1000),
        "over-half": (rng.integers(501, 1001, 3000), 1000),
        "uniform": (rng.integers(1, 4097, 50_000), 4096),
        "wide-max-tokens": (rng.integers(1, 200_001, 20_000), 200_000),  # > 2^16: the int64 sort key
        "lognormal-1e5": (lognormal_lengths(rng, 100_000, 6.5, 1.0, 16, 4096), 16384),
    }


@pytest.mark.parametrize("case", list(_adversarial_cases()))
def test_native_equals_python(case, native_module):
    lengths, max_tokens = _adversarial_cases()[case]
    for seed, epoch in ((0, 0), (11, 3)):
        native = pack_documents(lengths, max_tokens, seed=seed, epoch=epoch, backend="native")
        python = pack_documents(lengths, max_tokens, seed=seed, epoch=epoch, backend="python")
        assert_same_packing(native, python)
    assert_valid_packing(native, lengths, max_tokens)


def test_auto_uses_native_when_built(native_module, monkeypatch):
    calls = []
    real = native_module.best_fit_pack
    monkeypatch.setattr(native_module, "best_fit_pack", lambda *args: calls.append(1) or real(*args))
    pack_documents([3, 2, 1], 4, backend="auto")
    assert calls == [1]


def test_python_backend_works_without_native(native_unavailable):
    assert _native.native_module() is None
    lengths = np.random.default_rng(5).integers(1, 30, 200)
    for backend in ("auto", "python"):
        packing = pack_documents(lengths, 30, seed=2, epoch=1, backend=backend)
        assert_valid_packing(packing, lengths, 30)
        assert bins_of(packing) == expected_bins(lengths, 30, 2, 1)
    with pytest.raises(RuntimeError, match="backend='native'.*fastsft._C is not built"):
        pack_documents(lengths, 30, backend="native")


# --------------------------------------------------------------------------------------------------
# pack_documents: determinism, epochs, efficiency
# --------------------------------------------------------------------------------------------------


def test_deterministic_given_seed_and_epoch_and_different_across_epochs(backend):
    lengths = np.random.default_rng(0).choice([64, 128, 256, 512, 1024], 3000)
    first = pack_documents(lengths, 2048, seed=1, epoch=0, backend=backend)
    assert_same_packing(first, pack_documents(lengths.copy(), 2048, seed=1, epoch=0, backend=backend))

    def groups(packing):  # which documents share a bin, regardless of bin order
        return {frozenset(docs) for docs in bins_of(packing)}

    for other in (dict(seed=1, epoch=1), dict(seed=2, epoch=0)):
        again = pack_documents(lengths, 2048, backend=backend, **other)
        assert_valid_packing(again, lengths, 2048)
        assert groups(again) != groups(first), other
        # The bins are shuffled too: the first bins differ, not only who shares a bin.
        assert bins_of(again)[:10] != bins_of(first)[:10]


def test_efficiency_on_skewed_length_mix(backend):
    """20k log-normal lengths 16..4096 into 16384-token bins. ceil(total / max_tokens) bins is a lower bound
    for any packer; so many short documents fill the gaps that best-fit decreasing should come within one bin
    of it (of > 1200). One document per bin (efficiency ~ 0.06) and next-fit in arrival order (< 0.95 on
    this mix, checked below) fail the > 0.95 bound."""
    lengths = lognormal_lengths(np.random.default_rng(0), 20_000, 6.5, 1.0, 16, 4096)
    packing = pack_documents(lengths, 16384, backend=backend)
    lower_bound = math.ceil(lengths.sum() / 16384)
    assert lower_bound > 1200
    assert len(packing) <= lower_bound + 1
    assert packing.efficiency > 0.95
    assert lengths.sum() / (next_fit_bins(lengths, 16384) * 16384) < 0.95  # the bound has teeth


def next_fit_bins(lengths, max_tokens):
    bins, free = 0, -1
    for length in lengths.tolist():
        if length > free:
            bins, free = bins + 1, max_tokens
        free -= length
    return bins


def first_fit_bins(lengths, max_tokens):
    free = []
    for length in lengths.tolist():
        for k, room in enumerate(free):
            if room >= length:
                free[k] -= length
                break
        else:
            free.append(max_tokens - length)
    return len(free)


def test_beats_first_fit_in_arrival_order_on_long_documents(backend):
    """With most documents over half the budget, packing without sorting first wastes much more: the
    sorted pass puts the long documents in first and fills their gaps with short ones."""
    lengths = lognormal_lengths(np.random.default_rng(1), 4000, 8.0, 1.0, 16, 8192)
    packing = pack_documents(lengths, 8192, backend=backend)
    lower_bound = math.ceil(lengths.sum() / 8192)
    unsorted = first_fit_bins(lengths, 8192)
    assert len(packing) < unsorted, (len(packing), unsorted)
    # Over-half documents each need their own bin whatever the packer, so that count is a lower bound too.
    assert len(packing) >= max(lower_bound, int((lengths > 4096).sum()))
    assert len(packing) - lower_bound < (unsorted - lower_bound) / 4, (lower_bound, len(packing), unsorted)


# --------------------------------------------------------------------------------------------------
# pack_documents: errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ("auto", "python"))
@pytest.mark.parametrize(
    "lengths, max_tokens, message",
    [
        ([], 8192, "no documents to pack"),
        (np.zeros(0, np.int64), 8192, "no documents to pack"),
        ([5, 3, 0, 2], 8192, "document 2 has 0 tokens"),
        ([5, -4, 3], 8192, "document 1 has -4 tokens"),
        (
            [100] * 123 + [9000, 9001],
            8192,
            "document 123 has 9000 tokens but max_tokens is 8192; raise max_tokens or lower max_seq_len",
        ),
        ([1, 2], 0, "max_tokens must be >= 1, got 0"),
        ([1, 2], -5, "max_tokens must be >= 1, got -5"),
        ([1, 2], (1 << 24) + 1, "at most 16777216 is supported"),
        ([1.0, 2.0], 8, "integer dtype.*float64"),
        ([True, False], 8, "integer dtype.*bool"),
        ([[1, 2], [3, 4]], 8, "1-D"),
    ],
)
def test_invalid_inputs(lengths, max_tokens, message, backend):
    with pytest.raises(ValueError, match=message):
        pack_documents(lengths, max_tokens, backend=backend)


def test_invalid_options():
    with pytest.raises(ValueError, match="backend must be one of"):
        pack_documents([1], 2, backend="cuda")
    with pytest.raises(ValueError, match="seed must be >= 0"):
        pack_documents([1], 2, seed=-1)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        pack_documents([1], 2, epoch=-3)
    with pytest.raises(TypeError):
        pack_documents([1], 2.5)


def test_native_function_validates_its_buffers(native_module):
    pack = native_module.best_fit_pack
    lengths = np.array([3, 2, 1], dtype=np.int64)
    offsets, positions = np.empty(4, np.int64), np.empty(3, np.int64)
    assert pack(lengths, 4, offsets, positions) == 2
    assert offsets[:3].tolist() == [0, 2, 3] and positions.tolist() == [0, 2, 1]  # 3+1 | 2

    with pytest.raises(TypeError, match="lengths must hold int64"):
        pack(lengths.astype(np.int32), 4, offsets, positions)
    with pytest.raises(TypeError, match="lengths must hold int64"):
        pack(lengths.astype(np.uint64), 4, offsets, positions)
    with pytest.raises(TypeError, match="lengths must hold int64"):
        pack(lengths.astype(np.float64), 4, offsets, positions)
    with pytest.raises(TypeError, match="lengths must be a C-contiguous int64 buffer"):
        pack(np.arange(6, dtype=np.int64)[::2], 4, offsets, positions)
    with pytest.raises(TypeError, match="lengths must be a C-contiguous int64 buffer"):
        pack([3, 2, 1], 4, offsets, positions)
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        pack(lengths.reshape(1, 3), 4, offsets, positions)
    read_only = np.empty(4, np.int64)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match="bin_offsets must be a C-contiguous writable int64 buffer"):
        pack(lengths, 4, read_only, positions)
    with pytest.raises(ValueError, match="bin_offsets must have 4 elements, got 3"):
        pack(lengths, 4, np.empty(3, np.int64), positions)
    with pytest.raises(ValueError, match="positions must have 3 elements, got 4"):
        pack(lengths, 4, offsets, np.empty(4, np.int64))
    with pytest.raises(ValueError, match=r"max_tokens must be in \[1, 16777216\], got 0"):
        pack(lengths, 0, offsets, positions)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 7 is outside \[1, max_tokens=4\]"):
        pack(np.array([3, 7, 1], dtype=np.int64), 4, offsets, positions)
    with pytest.raises(ValueError, match=r"lengths\[2\] = 0 is outside"):
        pack(np.array([3, 2, 0], dtype=np.int64), 4, offsets, positions)


# --------------------------------------------------------------------------------------------------
# deal_to_ranks
# --------------------------------------------------------------------------------------------------


def assert_valid_schedule(schedule, world_size, grad_accum):
    packing = schedule.packing
    group = world_size * grad_accum
    assert schedule.world_size == world_size and schedule.grad_accum == grad_accum
    assert len(packing) % world_size == 0
    assert len(schedule) == math.ceil(len(packing) / group)
    for s, step in enumerate(schedule.steps):
        assert len(step) == world_size
        per_rank = {len(bins) for bins in step}
        assert len(per_rank) == 1, f"step {s}: ranks get different numbers of micro-batches {per_rank}"
        dealt = sorted(b for bins in step for b in bins)
        # Consecutive groups of world_size * grad_accum bins in bin order.
        assert dealt == list(range(s * group, min((s + 1) * group, len(packing))))
        assert all(bins == sorted(bins) for bins in step)
        if s < len(schedule) - 1:
            assert per_rank == {grad_accum}
        # LPT: a rank's last bin went to the least-loaded open rank, so no rank ends more than the largest
        # bin of the group above any other.
        loads = [int(packing.bin_tokens[bins].sum()) for bins in step]
        assert max(loads) - min(loads) <= packing.bin_tokens[dealt].max()
    for rank in range(world_size):
        assert schedule.rank_steps(rank) == [step[rank] for step in schedule.steps]


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (1, 4), (2, 1), (3, 2), (8, 4), (7, 3), (16, 1)])
def test_deal_to_ranks_properties(world_size, grad_accum):
    lengths = lognormal_lengths(np.random.default_rng(world_size * 10 + grad_accum), 3000, 6.5, 1.0, 16, 4096)
    packing = pack_documents(lengths, 8192, seed=world_size)
    schedule = deal_to_ranks(packing, world_size=world_size, grad_accum=grad_accum)
    assert isinstance(schedule, Schedule)
    assert_valid_schedule(schedule, world_size, grad_accum)
    assert_valid_packing(schedule.packing, lengths, 8192)  # nothing dropped or duplicated by splitting
    assert len(schedule.packing) == math.ceil(len(packing) / world_size) * world_size
    if len(packing) % world_size == 0:
        assert schedule.packing is packing


def test_deal_balances_tokens_far_better_than_dealing_in_order():
    # Documents over half the budget: one per bin, so bin tokens spread uniformly over 2049..4096.
    lengths = np.random.default_rng(3).integers(2049, 4097, 4000)
    packing = pack_documents(lengths, 4096)
    schedule = deal_to_ranks(packing, world_size=8, grad_accum=4)
    assert_valid_schedule(schedule, 8, 4)
    greedy, in_order = [], []
    for step in schedule.steps:
        loads = [packing.bin_tokens[bins].sum() for bins in step]
        greedy.append(max(loads) - min(loads))
        bins = sorted(b for rank_bins in step for b in rank_bins)
        loads = [packing.bin_tokens[bins[rank::8]].sum() for rank in range(8)]
        in_order.append(max(loads) - min(loads))
    # Dealt in order, a rank's load is a sum of 4 random bins (std 2 * 2048 / sqrt(12) ~ 1200 tokens), so
    # ranks end thousands of tokens apart; greedy by size evens that out.
    assert np.mean(greedy) < np.mean(in_order) / 5, (np.mean(greedy), np.mean(in_order))


def test_lpt_hand_worked_example():
    # Tokens in bin order 100, 90, 80, 10, 5, 1; two ranks, three slots each. Greedy by size: 100 -> r0,
    # 90 -> r1, 80 -> r1 (90 < 100), 10 -> r0 (100 < 170), 5 -> r0 (110 < 170), r0 is now full, 1 -> r1.
    tokens = [100, 90, 80, 10, 5, 1]
    packing = make_packing([[d] for d in range(6)], tokens, 100)
    schedule = deal_to_ranks(packing, world_size=2, grad_accum=3)
    assert schedule.steps == [[[0, 3, 4], [1, 2, 5]]]


def test_lpt_is_greedy_not_round_robin():
    # Bin order 10, 1, 10, 1 on two ranks: dealing in order would give 20 vs 2; LPT gives 11 and 11.
    packing = make_packing([[0], [1], [2], [3]], [10, 1, 10, 1], 10)
    (step,) = deal_to_ranks(packing, world_size=2, grad_accum=2).steps
    assert sorted(packing.bin_tokens[bins].sum() for bins in step) == [11, 11]


def test_last_step_is_a_smaller_multiple_of_world_size():
    packing = make_packing([[d] for d in range(10)], [5] * 10, 5)
    schedule = deal_to_ranks(packing, world_size=2, grad_accum=4)
    assert [[len(bins) for bins in step] for step in schedule.steps] == [[4, 4], [1, 1]]


def test_split_bins_alternately_most_documents_first():
    lengths = [9, 8, 7, 6, 5, 4, 3, 2]
    original = make_packing([[0, 1, 2, 3, 4], [5], [6, 7]], lengths, 100)

    assert deal_to_ranks(original, world_size=3).packing is original  # B = 3 already a multiple

    # One split (B 3 -> 4): the 5-document bin, alternately, halves in its place.
    split = deal_to_ranks(original, world_size=4).packing
    assert bins_of(split) == [[0, 2, 4], [1, 3], [5], [6, 7]]
    assert split.bin_tokens.tolist() == [21, 14, 4, 5]
    assert_valid_packing(split, lengths, 100)
    assert deal_to_ranks(original, world_size=2).packing.bin_tokens.tolist() == [21, 14, 4, 5]

    # Two splits (3 -> 5): then the 3-document half.
    assert bins_of(deal_to_ranks(original, world_size=5).packing) == [[0, 4], [2], [1, 3], [5], [6, 7]]
    # Down to one document a bin (3 -> 8): among equally large pieces the earliest splits first.
    assert bins_of(deal_to_ranks(original, world_size=8).packing) == [[0], [4], [2], [1], [3], [5], [6], [7]]


def test_split_takes_the_bins_with_most_documents_and_balances_halves():
    lengths = lognormal_lengths(np.random.default_rng(8), 2000, 6.0, 1.0, 16, 4096)
    packing = pack_documents(lengths, 16384)
    world_size = len(packing) + 3  # B -> world_size: three splits
    split = deal_to_ranks(packing, world_size=world_size).packing
    assert len(split) == world_size
    assert_valid_packing(split, lengths, 16384)

    assert bins_of(split) == reference_split(bins_of(packing), 3)
    # Documents enter a bin longest first, so dealing them alternately gives the first half at least the
    # tokens of the second and at most its longest document more.
    kept = {frozenset(docs) for docs in bins_of(packing)}
    halves = [b for b in range(len(split)) if frozenset(split.bin(b).tolist()) not in kept]
    assert len(halves) >= 2
    for b in range(len(split) - 1):
        pair = np.concatenate([split.bin(b), split.bin(b + 1)])
        if frozenset(pair.tolist()) in kept:  # b, b + 1 are the halves of a bin split once
            assert 0 <= split.bin_tokens[b] - split.bin_tokens[b + 1] <= lengths[pair].max()


def reference_split(bins, num_splits):
    """The splitting rule, plainly: the bin with the most documents (ties: the earliest) becomes its
    even-position and odd-position documents, in its place; repeat."""
    bins = [list(docs) for docs in bins]
    for _ in range(num_splits):
        k = max(range(len(bins)), key=lambda i: (len(bins[i]), -i))
        bins[k : k + 1] = [bins[k][0::2], bins[k][1::2]]
    return bins


def test_split_matches_reference_rule_on_random_packings():
    rng = np.random.default_rng(21)
    for _ in range(50):
        n = int(rng.integers(2, 80))
        lengths = rng.integers(1, 20, n)
        packing = pack_documents(lengths, int(rng.integers(20, 120)), seed=int(rng.integers(100)))
        world_size = int(rng.integers(1, n + 1))
        target = math.ceil(len(packing) / world_size) * world_size
        if target > n:
            continue
        schedule = deal_to_ranks(packing, world_size=world_size, grad_accum=int(rng.integers(1, 4)))
        assert bins_of(schedule.packing) == reference_split(bins_of(packing), target - len(packing))
        assert_valid_schedule(schedule, world_size, schedule.grad_accum)


def test_deal_errors():
    packing = make_packing([[0, 1], [2]], [3, 2, 1], 10)
    with pytest.raises(ValueError, match="cannot deal 3 documents to 4 ranks"):
        deal_to_ranks(packing, world_size=4)
    # 5 one-document bins on 4 ranks: the next multiple (8) needs 8 documents; nothing can be split.
    singles = make_packing([[d] for d in range(5)], [4] * 5, 4)
    with pytest.raises(ValueError, match="needs 8 micro-batches but there are only 5 documents"):
        deal_to_ranks(singles, world_size=4)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        deal_to_ranks(packing, world_size=0)
    with pytest.raises(ValueError, match="grad_accum must be >= 1, got -1"):
        deal_to_ranks(packing, grad_accum=-1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        deal_to_ranks(packing, world_size=2).rank_steps(2)


def test_deal_uses_every_document_when_documents_equal_world_size():
    lengths = [5, 4, 3, 2, 1, 1]
    packing = pack_documents(lengths, 16)  # one bin holds everything
    schedule = deal_to_ranks(packing, world_size=6, grad_accum=2)
    assert len(schedule.packing) == 6 and sorted(schedule.packing.bin_tokens.tolist()) == sorted(lengths)
    assert_valid_schedule(schedule, 6, 2)
