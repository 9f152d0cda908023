"""PackedLoader(group=2): preference pairs packed whole (best-fit decreasing on the pair's combined length),
chosen then rejected, never split across micro-batches, steps or ranks."""

import numpy as np
import pytest

from fastsft.data import PackedLoader


class _Pairs:
    """A tokenized dataset of pairs: example 2i (chosen) and 2i + 1 (rejected); every token trained; token ids
    encode (example, position) so a micro-batch can be traced back."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.concatenate([np.full(n, i, dtype=np.int32) for i, n in enumerate(self.lengths)])
        self.trained = np.ones(len(self.tokens), dtype=np.uint8)

    def __len__(self):
        return len(self.lengths)


def _random_pairs(n_pairs, seed=0):
    rng = np.random.default_rng(seed)
    return _Pairs(rng.integers(2, 40, size=2 * n_pairs))


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (1, 3), (2, 2), (3, 1)])
def test_pairs_stay_whole_and_in_order_and_every_pair_is_trained_once(world_size, grad_accum):
    data = _random_pairs(57)
    seen = []
    for rank in range(world_size):
        loader = PackedLoader(data, max_tokens=96, world_size=world_size, rank=rank, grad_accum=grad_accum, group=2)
        for step in loader.steps(epoch=1):
            for mb in step:
                ids = mb.doc_ids
                assert len(ids) % 2 == 0
                assert (ids[0::2] % 2 == 0).all() and (ids[1::2] == ids[0::2] + 1).all()  # chosen, then its rejected
                assert mb.num_tokens <= 96
                # the row really holds those examples' tokens, in that order
                row = mb.input_ids[0].numpy()
                want = np.concatenate([np.full(data.lengths[i], i) for i in ids])
                assert (row == want).all()
                seen.extend(ids[0::2] // 2)
    assert sorted(seen) == list(range(57))


def test_pairs_are_packed_by_their_combined_length():
    # Four pairs of 30 + 30 tokens cannot share a 100-token micro-batch two by two (120 > 100), but each fits alone.
    data = _Pairs([30, 30] * 4)
    loader = PackedLoader(data, max_tokens=100, group=2)
    batches = [mb for step in loader.steps(0) for mb in step]
    assert len(batches) == 4 and all(mb.num_documents == 2 for mb in batches)
    with pytest.raises(ValueError):  # a pair longer than the budget is an error, not a split pair
        PackedLoader(_Pairs([60, 50]), max_tokens=100, group=2)


def test_a_dataset_that_is_not_whole_pairs_is_refused():
    with pytest.raises(ValueError, match="not a whole number of groups of 2"):
        PackedLoader(_Pairs([5, 6, 7]), max_tokens=100, group=2)
