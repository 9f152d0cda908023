"""One optimizer step, and the small state that lives across steps.

    outcome = train_step(model, step_batches, optimizer, scheduler, ...)   # forward/backward, clip, guard, step
    window.add(outcome)                                                     # device tensors, no host sync
    if log step: summary = window.reduce(dist, device)                      # the one sync of the window

`forward_backward` runs a step's micro-batches (the step-wide token count first, ARCHITECTURE.md "One step");
`NanGuard` skips steps whose global gradient norm is not finite and stops a run that keeps producing them;
`MetricsWindow` keeps what happened since the last log step on the device until the log step reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .distributed import Distributed, clip_grad_norm
from .evaluation import packed_loss


def forward_backward(model, step_batches, device, autocast_dtype, dist: Distributed | None = None):
    """Run one optimizer step's micro-batches on this rank.

    The step's supervised-token count (every micro-batch, every rank) is summed on device before the first
    forward; each micro-batch's loss is its summed token loss over that count, backpropagated times
    world_size (the ranks' gradients are averaged, see distributed.py), so the accumulated gradient is the
    one-big-batch gradient. Returns (this rank's summed micro-batch losses as a 0-d tensor: their sum over
    ranks is the step's loss; real tokens, supervised tokens on this rank).
    """
    dist = dist or Distributed()
    local_supervised = int(sum(mb.num_supervised for mb in step_batches))
    # An integer tensor: FSDP's mixed-precision policy casts floating inputs to bf16, which would round the
    # count (1001 -> 1000). The ranks' gradients are averaged, so the loss is scaled by world_size outside.
    num_items = dist.all_reduce_sum(torch.tensor(local_supervised, device=device, dtype=torch.int64))
    total_loss = torch.zeros((), device=device)
    tokens = 0
    for index, mb in enumerate(step_batches):
        mb = mb.to(device)
        with dist.accumulation_context(model, last_micro_batch=index == len(step_batches) - 1):
            loss = packed_loss(model, mb, num_items, device, autocast_dtype)
            (loss * dist.world_size if dist.world_size > 1 else loss).backward()
        total_loss += loss.detach()
        tokens += mb.num_tokens
    return total_loss, tokens, local_supervised


class NanGuard:
    """Skips a step whose global gradient norm is not finite; more than `max_skipped_steps` in a row stop the
    run. Every rank sees the same global norm, so every rank decides alike."""

    def __init__(self, max_skipped_steps: int):
        self.max_skipped_steps = max_skipped_steps
        self.consecutive = 0

    def allows(self, grad_norm: torch.Tensor) -> bool:
        """True: apply the step. False: skip it (FloatingPointError once too many in a row were skipped).
        Reads the norm on the host: the one small sync of every step."""
        if torch.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.consecutive += 1
        if self.consecutive > self.max_skipped_steps:
            raise FloatingPointError(
                f"{self.consecutive} steps in a row had non-finite gradients (limit "
                f"nan_guard.max_skipped_steps={self.max_skipped_steps}); lower optimizer.lr "
                "or check the data, then resume: the last checkpoint is intact and the config's "
                "optimizer settings apply on resume."
            )
        return False


@dataclass
class StepOutcome:
    """What one optimizer step did on this rank."""

    loss: torch.Tensor  # 0-d, on the device: this rank's share (the ranks' shares sum to the step's loss)
    tokens: int  # real tokens on this rank
    supervised: int  # supervised tokens on this rank
    flops: float  # model FLOPs of the step on this rank (host-side count)
    grad_norm: torch.Tensor | None  # before clipping; None when the step was skipped
    applied: bool  # False: a non-finite gradient norm, the optimizer did not step
    extras: torch.Tensor | None = None  # an objective's own metric sums (preference: see PREFERENCE_METRICS)


def train_step(
    model,
    step_batches,
    optimizer,
    scheduler,
    *,
    trainable,
    grad_clip: float | None,
    guard: NanGuard,
    device,
    autocast_dtype,
    dist: Distributed,
    count_flops,
    objective_forward_backward=None,
) -> StepOutcome:
    """Forward/backward over the step's micro-batches, clip, the NaN guard, AdamW, the LR schedule.
    `count_flops(cu_seqlens_diff, lm_head_tokens=)` is the run's FlopCounter (host-side lengths: no sync).
    `objective_forward_backward(model, step_batches, device, autocast_dtype, dist)`: another objective's forward
    and backward (preference tuning) returning (loss, tokens, supervised, metric sums); None: SFT's."""
    flops = sum(count_flops(mb.cu_seqlens.diff(), lm_head_tokens=mb.num_supervised) for mb in step_batches)
    extras = None
    if objective_forward_backward is None:
        loss, tokens, supervised = forward_backward(model, step_batches, device, autocast_dtype, dist)
    else:
        loss, tokens, supervised, extras = objective_forward_backward(model, step_batches, device, autocast_dtype, dist)
    grad_norm = clip_grad_norm(trainable, grad_clip)
    applied = guard.allows(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return StepOutcome(loss, tokens, supervised, flops, grad_norm if applied else None, applied, extras)


@dataclass
class WindowSummary:
    """The numbers of one log window, summed over ranks (read on the host at a log step)."""

    losses: list[float]  # each step's loss
    tokens: float
    supervised: float
    flops: float
    grad_norm: float  # mean over the applied steps (nan when none was applied)
    seconds: float  # training time (eval and checkpoints excluded)
    extras: list[float] | None = None  # the objective's metric sums over the window and the ranks (StepOutcome)


@dataclass
class MetricsWindow:
    """What happened since the last log step, kept on the device (no host sync) until `reduce` reads it.

    `unsynced_tokens` / `unsynced_supervised` are this rank's counts not yet added to the run's position (the
    position holds global counts: `sync_counts` all-reduces them, at log steps and before checkpoints)."""

    losses: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    supervised: int = 0
    flops: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    unsynced_tokens: int = 0
    unsynced_supervised: int = 0
    extras: torch.Tensor | None = None

    def add(self, outcome: StepOutcome) -> None:
        self.losses.append(outcome.loss)
        if outcome.extras is not None:
            self.extras = outcome.extras.detach() if self.extras is None else self.extras + outcome.extras.detach()
        if outcome.grad_norm is not None:
            self.norms.append(outcome.grad_norm)
        self.tokens += outcome.tokens
        self.supervised += outcome.supervised
        self.flops += outcome.flops
        self.unsynced_tokens += outcome.tokens
        self.unsynced_supervised += outcome.supervised

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (eval, a checkpoint) out of the window's training time."""
        self.started += seconds

    def pending_losses(self, dist: Distributed) -> list[float]:
        """The losses of the steps since the last log step, summed over ranks (a collective: every rank calls)."""
        if not self.losses:
            return []
        return dist.all_reduce_sum(torch.stack(self.losses).double()).tolist()

    def sync_counts(self, position, dist: Distributed, device) -> None:
        """Add every rank's unsynced token counts to `position` (a collective: every rank calls)."""
        counts = torch.tensor([self.unsynced_tokens, self.unsynced_supervised], dtype=torch.float64, device=device)
        tokens, supervised = dist.all_reduce_sum(counts).tolist()
        position.tokens += int(tokens)
        position.supervised_tokens += int(supervised)
        self.unsynced_tokens = self.unsynced_supervised = 0

    def reduce(self, dist: Distributed, device) -> WindowSummary:
        """The window's numbers over all ranks, in one host sync (and one all-reduce), then a fresh window."""
        counts = torch.tensor(
            [float(self.tokens), float(self.supervised), float(self.flops)], device=device, dtype=torch.float64
        )
        extras = [] if self.extras is None else [self.extras.double()]
        summed = dist.all_reduce_sum(torch.cat([torch.stack(self.losses).double(), *extras, counts])).tolist()
        norm = torch.stack(self.norms).mean().item() if self.norms else float("nan")
        n_extras = 0 if self.extras is None else self.extras.numel()
        summary = WindowSummary(
            summed[: len(self.losses)],
            *summed[-3:],
            grad_norm=norm,
            seconds=time.perf_counter() - self.started,
            extras=summed[len(self.losses) : len(self.losses) + n_extras] if n_extras else None,
        )
        self.losses, self.norms, self.extras = [], [], None
        self.tokens = self.supervised = 0
        self.flops = 0.0
        self.started = time.perf_counter()
        return summary
