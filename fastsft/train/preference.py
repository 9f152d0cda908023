"""Preference tuning on the SFT engine: DPO, IPO, SimPO and ORPO over packed pairs, nothing padded, no logits.

    settings = PreferenceSettings("dpo", beta=0.1)
    loader = PackedLoader(pairs, max_tokens=16384, grad_accum=4, group=2)     # pairs whole, chosen then rejected
    reference = reference_logprobs(model, loader, device, None)              # DPO / IPO: [2P], once, no grad
    for step in loader.steps(epoch):
        result = preference_forward_backward(model, step, settings, device, None, dist, reference)

Layout (fastsft.data.PackedLoader with group=2): a micro-batch's packed row holds whole pairs, sequence 2j its
pair's chosen reply (prompt + completion) and 2j + 1 the rejected one; labels are shifted, -100 on the prompt
and at each sequence's end. Each sequence's log-probability is the sum of its completion tokens' log-probs
(fastsft.patch.label_logprobs: the fused linear log-probs, no [T, V] logits), reduced by cu_seqlens on the device.

The reference model of DPO / IPO is not held in memory: its sequence log-probs are computed once, before
training, by the same model (`reference_logprobs`, with LoRA adapters disabled when the model has them, which
is the base model whatever the adapters have learned), and looked up by example index during training.

Normaliser: a step's loss is the SUM of its pairs' losses over the number of pairs in the whole step (every
micro-batch, every rank; one all-reduce before the first forward), so gradient accumulation and the number of
ranks do not change the gradients, as for SFT's supervised-token count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from fastsft.patch.preference import OBJECTIVES, PreferenceSettings, pair_losses
from fastsft.patch.preference import sequence_logprobs as _sequence_logprobs

from .distributed import Distributed
from .evaluation import autocast

__all__ = ["OBJECTIVES", "PreferenceSettings", "preference_forward_backward", "reference_logprobs"]


def sequence_logprobs(model, mb, device, autocast_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [S], counts [S]) float32 for the sequences of micro-batch `mb` (already on `device`)."""
    with autocast(device, autocast_dtype):
        return _sequence_logprobs(
            model,
            mb.labels,
            mb.cu_seqlens,
            **mb.model_inputs(),
            cu_seq_lens_q=mb.cu_seqlens,
            max_length_q=mb.max_seqlen,
        )


def _reference_of(mb, reference: np.ndarray | None, device) -> torch.Tensor | None:
    if reference is None:
        return None
    return torch.from_numpy(np.asarray(reference[mb.doc_ids], dtype=np.float32)).to(device)


@dataclass
class PreferenceStepResult:
    """One step's preference training on this rank (device tensors: no host sync)."""

    loss: torch.Tensor  # 0-d: this rank's share of the step's loss (the ranks' shares sum to it)
    tokens: int  # real tokens on this rank
    pairs: int  # pairs on this rank
    # sums over this rank's pairs: [accuracy, margin, chosen reward, rejected reward]
    metric_sums: torch.Tensor


def preference_forward_backward(
    model,
    step_batches,
    settings: PreferenceSettings,
    device,
    autocast_dtype,
    dist: Distributed | None = None,
    reference: np.ndarray | None = None,
) -> PreferenceStepResult:
    """Forward and backward over one optimizer step's micro-batches of pairs (see the module docstring for the
    normaliser); `reference`: float64 [examples] reference log-prob sums by example index (DPO / IPO)."""
    dist = dist or Distributed()
    if settings.needs_reference and reference is None:
        raise ValueError(f"{settings.objective} needs the reference model's log-probs (reference_logprobs)")
    local_pairs = int(sum(mb.num_documents // 2 for mb in step_batches))
    num_pairs = dist.all_reduce_sum(torch.tensor(local_pairs, device=device, dtype=torch.int64))
    total = torch.zeros((), device=device)
    metric_sums = torch.zeros(4, device=device)
    tokens = 0
    for index, mb in enumerate(step_batches):
        mb = mb.to(device)
        with dist.accumulation_context(model, last_micro_batch=index == len(step_batches) - 1):
            sums, counts = sequence_logprobs(model, mb, device, autocast_dtype)
            result = pair_losses(settings, sums, counts, _reference_of(mb, reference, device))
            loss = result.losses.sum() / num_pairs
            (loss * dist.world_size if dist.world_size > 1 else loss).backward()
        total += loss.detach()
        metric_sums += torch.stack(
            [r.sum() for r in (result.accuracies, result.margins, result.chosen_rewards, result.rejected_rewards)]
        )
        tokens += mb.num_tokens
    return PreferenceStepResult(total, tokens, local_pairs, metric_sums)


def _adapters_disabled(model):
    """A context with the model's LoRA adapters off (PEFT), so it computes the base model; else nothing."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


@torch.no_grad()
def reference_logprobs(model, loader, device, autocast_dtype, *, epoch: int = 0) -> np.ndarray:
    """float64 [examples]: every example's summed completion log-prob under the model as it is now (the
    reference, before training; with LoRA adapters disabled, i.e. the base model), from one pass over `loader`'s
    packing (all ranks' micro-batches: `loader` should be a single-rank loader over the whole dataset)."""
    was_training = model.training
    model.eval()
    out = np.full(len(loader.dataset), np.nan, dtype=np.float64)
    try:
        with _adapters_disabled(model):
            for step in loader.steps(epoch):
                for mb in step:
                    sums, _ = sequence_logprobs(model, mb.to(device), device, autocast_dtype)
                    out[mb.doc_ids] = sums.double().cpu().numpy()
    finally:
        model.train(was_training)
    if np.isnan(out).any():
        raise RuntimeError(f"{int(np.isnan(out).sum())} examples got no reference log-prob (the loader skipped them)")
    return out
