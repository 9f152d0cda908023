"""What a run and `fastsft eval` measure on held-out data: the loss per supervised token, and (on the built-in
synthetic tasks) the exact match of greedy replies.

Both are computed one way for training (loop.py, every eval.every_steps and at the end) and for `fastsft eval`
(inference.evaluate_checkpoint), so the figures agree; exact match answers with generation.generate_reply,
what `fastsft generate` answers with.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from fastsft.data import PackedLoader, build_micro_batch

from .config import TrainConfig
from .distributed import Distributed
from .generation import generate_reply
from .synthetic import exact_match_items, score_exact_match

# Held-out questions whose greedy answers are scored (the synthetic data only).
EXACT_MATCH_ITEMS = 300
# Every synthetic answer fits: the longest is a handful of characters plus the end-of-turn token.
EXACT_MATCH_MAX_NEW_TOKENS = 12


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The forward's autocast context (none for dtype None: plain fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def packed_loss(model, mb, num_items_in_batch, device: torch.device, autocast_dtype: torch.dtype | None):
    """The model's loss on one packed micro-batch (already on `device`): its summed token loss divided by
    `num_items_in_batch`. The documents are kept apart by cu_seqlens / position_ids, nothing is padded.
    labels too: an unpatched loss (kernels.cross_entropy=false) runs only when labels is set; it then uses the
    already shifted shift_labels, as fastsft's does."""
    with autocast(device, autocast_dtype):
        return model(
            **mb.model_inputs(),
            cu_seq_lens_q=mb.cu_seqlens,
            max_length_q=mb.max_seqlen,
            labels=mb.labels,
            shift_labels=mb.labels,
            num_items_in_batch=num_items_in_batch,
        ).loss


@torch.no_grad()
def evaluate_loss(
    model, loader: PackedLoader, device, autocast_dtype, max_batches: int | None, dist: Distributed | None = None
) -> float | None:
    """Mean loss per supervised token over the first `max_batches` micro-batches of `loader`'s epoch-0 packing
    (None: all of them); None when they hold no supervised token.

    The micro-batches are the packing's whatever the number of ranks: rank r evaluates every world_size-th
    one and the sums are all-reduced, so the result does not depend on the world size (and equals `fastsft
    eval`'s). FSDP needs every rank to run the same number of forwards: a rank short of one runs a repeat
    whose loss is discarded."""
    dist = dist or Distributed()
    packing = loader.schedule(0).packing
    count = len(packing) if max_batches is None else min(max_batches, len(packing))
    mine = list(range(dist.rank, count, dist.world_size))
    rounds = math.ceil(count / dist.world_size)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, supervised tokens)
    for i in range(rounds):
        keep = i < len(mine)
        mb = build_micro_batch(loader.dataset, packing.bin(mine[i] if keep else 0)).to(device)
        # num_items_in_batch=1: the loss comes back as the micro-batch's SUM, divided once at the end.
        loss = packed_loss(model, mb, 1, device, autocast_dtype)
        if keep:
            sums[0] += loss.double()
            sums[1] += mb.num_supervised
    model.train(was_training)
    total, supervised = dist.all_reduce_sum(sums).tolist()
    return total / supervised if supervised else None


def exact_match_items_for(config: TrainConfig) -> list[tuple[list[dict], str]]:
    """The held-out (messages, answer) items a run scores: [] unless eval.exact_match is on and the eval data
    is the synthetic one. Drawn from seed + 1, so `fastsft eval` with the run's config scores the same items."""
    if not (config.eval.exact_match and config.data.eval_source == "synthetic"):
        return []
    return exact_match_items(EXACT_MATCH_ITEMS, seed=config.seed + 1)


@torch.no_grad()
def exact_match(
    model, tokenizer, items, *, max_new_tokens: int = EXACT_MATCH_MAX_NEW_TOKENS, chat_template: str | None = None
) -> tuple[float, list[str]]:
    """Greedy answers to held-out items [(messages, answer)] and their exact-match score: each answer is
    generation.generate_reply's (temperature 0, the template training used, every end-of-reply token stops)."""
    was_training = model.training
    model.eval()
    predictions = [
        generate_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, chat_template=chat_template)
        for messages, _ in items
    ]
    model.train(was_training)
    return score_exact_match(predictions, [answer for _, answer in items]), predictions
