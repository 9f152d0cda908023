"""Packed micro-batches for one rank, step by step, epoch by epoch.

    data = prepare_dataset("train.jsonl", tokenizer, max_seq_len=4096)
    loader = PackedLoader(data, max_tokens=16384, seed=0, world_size=1, rank=0, grad_accum=4)
    for epoch in range(2):
        for step in loader.steps(epoch):         # one optimizer step
            for mb in step:                      # grad_accum micro-batches (fewer in an epoch's last step)
                ...                              # mb.input_ids [1, T], mb.labels, mb.cu_seqlens, ...

Each epoch repacks with best-fit-decreasing from (seed, epoch), so the micro-batches differ between epochs
while every rank, given the same arguments, computes the same packing and takes its own share of it
(no communication needed to agree on the data).

Preference pairs (`group=2`, a dataset whose examples 2i and 2i + 1 are pair i's chosen and rejected sequences):
packing and dealing work on whole pairs (best-fit decreasing on their combined length), so a pair's two
sequences always sit next to each other, chosen first, in one micro-batch of one rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .batches import MicroBatch, build_micro_batch
from .packing import Schedule, deal_to_ranks, pack_documents


class PackedLoader:
    """Micro-batches of at most `max_tokens` tokens for rank `rank` of `world_size`.

    dataset: a TokenizedDataset (anything with `lengths`, `offsets`, `tokens`, `trained`).
    max_tokens: token budget of one micro-batch; must be >= the longest example (max_seq_len), or the longest
        group's combined length.
    group: examples kept together, in order, in one micro-batch: 1 (SFT), 2 (preference pairs).
    """

    def __init__(
        self,
        dataset,
        *,
        max_tokens: int,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        backend: str = "auto",
        pin_memory: bool = False,
        group: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not isinstance(group, int) or group < 1:
            raise ValueError(f"group must be a positive int, got {group!r}")
        if len(dataset.lengths) % group:
            raise ValueError(
                f"the dataset has {len(dataset.lengths)} examples, not a whole number of groups of {group} "
                "(a preference dataset holds each pair's chosen and rejected sequences)"
            )
        self.group = group
        self.dataset = dataset
        self.max_tokens = max_tokens
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.backend = backend
        self.pin_memory = pin_memory
        self._schedules: dict[int, Schedule] = {}
        self.schedule(0)  # validates everything (lengths vs max_tokens, enough documents for the ranks) now

    def schedule(self, epoch: int) -> Schedule:
        """The whole job's packing and dealing for `epoch` (identical on every rank)."""
        if epoch not in self._schedules:
            packing = pack_documents(
                self.group_lengths, self.max_tokens, seed=self.seed, epoch=epoch, backend=self.backend
            )
            self._schedules = {epoch: deal_to_ranks(packing, world_size=self.world_size, grad_accum=self.grad_accum)}
        return self._schedules[epoch]

    @property
    def group_lengths(self):
        """int64 [examples / group]: each group's combined length (the examples' lengths when group = 1)."""
        lengths = self.dataset.lengths
        return lengths if self.group == 1 else lengths.reshape(-1, self.group).sum(axis=1)

    def examples(self, groups) -> np.ndarray:
        """The dataset indices of `groups` (packed bins hold group indices), in order: group g is examples
        g * group ... g * group + group - 1."""
        groups = np.asarray(groups, dtype=np.int64)
        return (groups[:, None] * self.group + np.arange(self.group)).reshape(-1)

    def num_steps(self, epoch: int = 0) -> int:
        """Optimizer steps in `epoch` (can differ by a step or so between epochs as the packing changes)."""
        return len(self.schedule(epoch))

    def efficiency(self, epoch: int = 0) -> float:
        """Share of the micro-batches' token budget filled with real tokens."""
        return self.schedule(epoch).packing.efficiency

    def steps(self, epoch: int, *, start_step: int = 0) -> Iterator[list[MicroBatch]]:
        """This rank's micro-batches, one list per optimizer step, from `start_step` (to resume mid-epoch)."""
        schedule = self.schedule(epoch)
        packing = schedule.packing
        for step in schedule.rank_steps(self.rank)[start_step:]:
            yield [
                build_micro_batch(self.dataset, self.examples(packing.bin(b)), pin_memory=self.pin_memory) for b in step
            ]

    def __repr__(self) -> str:
        s = self.schedule(min(self._schedules))
        return (
            f"PackedLoader({len(self.dataset)} examples, max_tokens={self.max_tokens}, {len(s.packing)} "
            f"micro-batches, {len(s)} steps, efficiency {s.packing.efficiency:.1%}, rank {self.rank}/{self.world_size})"
        )
