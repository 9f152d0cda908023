"""Preference objectives for patched models: DPO, IPO, SimPO and ORPO on packed pairs of sequences.

A packed row holds whole pairs, sequence 2j a pair's chosen reply (prompt + completion) and 2j + 1 its rejected
one. `sequence_logprobs` gives each sequence's summed completion log-prob (fused, no logits) and completion length;
`pair_losses` turns them into the objective's per-pair losses and rewards (fastsft.ops.preference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastsft._constants import IGNORE_INDEX
from fastsft.ops import per_sequence_sum
from fastsft.ops.preference import PreferenceLoss, dpo_loss, orpo_loss, simpo_loss

from .loss import label_logprobs

OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")
# Objectives comparing the policy with a reference model (the others are reference-free).
NEEDS_REFERENCE = ("dpo", "ipo")


@dataclass(frozen=True)
class PreferenceSettings:
    """objective: one of OBJECTIVES. beta: DPO / IPO's beta, SimPO's beta, ORPO's lambda. label_smoothing: the
    conservative-DPO / SimPO label noise eps. gamma: SimPO's target reward margin."""

    objective: str
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    @property
    def needs_reference(self) -> bool:
        return self.objective in NEEDS_REFERENCE


def sequence_logprobs(model, shift_labels, cu_seqlens, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [S], counts [S]) float32 for the S sequences of a packed row [1, T] (cu_seqlens int [S + 1]):
    each sequence's summed label log-probs under a patched model (label_logprobs, run on `inputs`) and its
    number of labelled tokens (its completion length). shift_labels [1, T]: shifted, -100 off the completions."""
    logprobs = label_logprobs(model, shift_labels, **inputs)
    cu_seqlens = cu_seqlens.to(logprobs.device)
    sums = per_sequence_sum(logprobs.float(), cu_seqlens)
    counts = per_sequence_sum((shift_labels.reshape(-1) != IGNORE_INDEX).float().to(logprobs.device), cu_seqlens)
    return sums, counts


def pair_losses(
    settings: PreferenceSettings, sums: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None
) -> PreferenceLoss:
    """The pairs' losses and rewards from their sequences' log-prob sums [2P] and completion lengths [2P]
    (chosen at even, rejected at odd indices); `reference`: the reference model's sums [2P] (DPO / IPO)."""
    chosen, rejected = sums[0::2], sums[1::2]
    chosen_len, rejected_len = counts[0::2].clamp_min(1.0), counts[1::2].clamp_min(1.0)
    objective, beta = settings.objective, settings.beta
    if objective == "dpo":
        return dpo_loss(
            chosen, rejected, reference[0::2], reference[1::2], beta=beta, label_smoothing=settings.label_smoothing
        )
    if objective == "ipo":  # IPO on per-token mean log-probs, as its authors' implementation and TRL do
        return dpo_loss(
            chosen / chosen_len,
            rejected / rejected_len,
            reference[0::2] / chosen_len,
            reference[1::2] / rejected_len,
            beta=beta,
            kind="ipo",
        )
    chosen_mean, rejected_mean = chosen / chosen_len, rejected / rejected_len
    if objective == "simpo":
        return simpo_loss(
            chosen_mean, rejected_mean, beta=beta, gamma=settings.gamma, label_smoothing=settings.label_smoothing
        )
    return orpo_loss(chosen_mean, rejected_mean, -chosen_mean, beta=beta)
