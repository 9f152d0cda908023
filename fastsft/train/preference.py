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
import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from fastsft.data import build_micro_batch
from fastsft.patch.preference import OBJECTIVES, PreferenceSettings, pair_losses
from fastsft.patch.preference import sequence_logprobs as _sequence_logprobs

from .distributed import Distributed
from .evaluation import autocast

__all__ = [
    "OBJECTIVES",
    "PREFERENCE_METRICS",
    "PreferenceSettings",
    "evaluate_preference",
    "preference_forward_backward",
    "reference_for",
    "reference_logprobs",
]


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


# What a preference step adds to the SFT metrics, as sums over pairs (step.MetricsWindow sums them over steps and
# ranks; the log step divides by the pairs).
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def preference_forward_backward(
    model,
    step_batches,
    settings: PreferenceSettings,
    device,
    autocast_dtype,
    dist: Distributed | None = None,
    reference: np.ndarray | None = None,
):
    """Forward and backward over one optimizer step's micro-batches of pairs (see the module docstring for the
    normaliser); `reference`: float64 [examples] reference log-prob sums by example index (DPO / IPO).

    Returns (this rank's share of the step's loss (0-d; the ranks' shares sum to it), real tokens, supervised
    (completion) tokens, metric sums [len(PREFERENCE_METRICS) + 1]: the PREFERENCE_METRICS summed over this
    rank's pairs, then the pair count), all on the device: no host sync."""
    dist = dist or Distributed()
    if settings.needs_reference and reference is None:
        raise ValueError(f"{settings.objective} needs the reference model's log-probs (reference_logprobs)")
    local_pairs = int(sum(mb.num_documents // 2 for mb in step_batches))
    num_pairs = dist.all_reduce_sum(torch.tensor(local_pairs, device=device, dtype=torch.int64))
    total = torch.zeros((), device=device)
    metric_sums = torch.zeros(len(PREFERENCE_METRICS) + 1, device=device)
    metric_sums[-1] = local_pairs
    tokens = supervised = 0
    for index, mb in enumerate(step_batches):
        mb = mb.to(device)
        with dist.accumulation_context(model, last_micro_batch=index == len(step_batches) - 1):
            sums, counts = sequence_logprobs(model, mb, device, autocast_dtype)
            result = pair_losses(settings, sums, counts, _reference_of(mb, reference, device))
            loss = result.losses.sum() / num_pairs
            (loss * dist.world_size if dist.world_size > 1 else loss).backward()
        total += loss.detach()
        metric_sums[:-1] += torch.stack(
            [r.sum() for r in (result.accuracies, result.margins, result.chosen_rewards, result.rejected_rewards)]
        ).float()
        tokens += mb.num_tokens
        supervised += mb.num_supervised
    return total, tokens, supervised, metric_sums


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


@torch.no_grad()
def evaluate_preference(
    model,
    loader,
    settings: PreferenceSettings,
    reference: np.ndarray | None,
    device,
    autocast_dtype,
    max_batches: int | None,
    dist: Distributed | None = None,
) -> dict[str, float] | None:
    """Held-out preference metrics over the first `max_batches` micro-batches of `loader`'s epoch-0 packing
    (dealt over the ranks and all-reduced, so the numbers do not depend on the world size): the mean pair loss,
    reward accuracy (the share of pairs whose chosen reply gets the higher reward) and reward margin. None when
    there are no pairs. Also the likelihood accuracy: the share of pairs whose chosen reply the model finds more
    likely per token than the rejected one."""
    dist = dist or Distributed()
    packing = loader.schedule(0).packing
    count = len(packing) if max_batches is None else min(max_batches, len(packing))
    mine = list(range(dist.rank, count, dist.world_size))
    rounds = -(-count // dist.world_size)
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, accuracy, margin, likelihood accuracy, pairs
    for i in range(rounds):
        keep = i < len(mine)
        # FSDP: every rank runs the same number of forwards; a rank short of one repeats a micro-batch, discarded.
        mb = build_micro_batch(loader.dataset, loader.examples(packing.bin(mine[i] if keep else 0))).to(device)
        logprob_sums, counts = sequence_logprobs(model, mb, device, autocast_dtype)
        result = pair_losses(settings, logprob_sums, counts, _reference_of(mb, reference, device))
        # The model's own preference: is the chosen reply more likely per token than the rejected one? (DPO's
        # implicit reward is 0 for both before training; this is not.)
        means = logprob_sums / counts.clamp_min(1.0)
        likelihood = (means[0::2] > means[1::2]).double().sum()
        if keep:
            sums[:4] += torch.stack(
                [result.losses.sum(), result.accuracies.sum(), result.margins.sum(), likelihood.float()]
            ).double()
            sums[4] += mb.num_documents // 2
    model.train(was_training)
    loss, accuracy, margin, likelihood, pairs = dist.all_reduce_sum(sums).tolist()
    if not pairs:
        return None
    return {
        "loss": loss / pairs,
        "reward_accuracy": accuracy / pairs,
        "reward_margin": margin / pairs,
        "likelihood_accuracy": likelihood / pairs,
    }


def weights_fingerprint(model) -> str:
    """A short hash of a model's weights that names its reference log-probs: every parameter's name, shape and
    dtype and a strided sample of its values (up to ~64k per tensor, so hashing a billion-parameter model takes a
    moment, not a pass over all its bytes). Any training step changes every sampled weight matrix."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not torch.is_tensor(tensor) or tensor.device.type == "meta":
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 65536)
        digest.update(flat[::stride].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def settings_of(config) -> PreferenceSettings:
    """The PreferenceSettings of a TrainConfig with a preference objective."""
    section = config.preference
    return PreferenceSettings(
        config.objective,
        beta=section.beta_for(config.objective),
        label_smoothing=section.label_smoothing,
        gamma=section.gamma,
    )


def step_function(settings: PreferenceSettings, reference: np.ndarray | None):
    """The objective's forward/backward in the form step.train_step takes."""

    def forward_backward(model, step_batches, device, autocast_dtype, dist):
        return preference_forward_backward(model, step_batches, settings, device, autocast_dtype, dist, reference)

    return forward_backward


def window_metrics(extras: list[float] | None) -> dict[str, float]:
    """A log window's preference metrics (means over its pairs) from its summed PREFERENCE_METRICS and pairs."""
    if not extras or not extras[-1]:
        return {}
    pairs = extras[-1]
    return {name: value / pairs for name, value in zip(PREFERENCE_METRICS, extras[:-1], strict=True)}


def references(
    model, settings, key, datasets: dict, config, device, autocast_dtype, run_dir, *, resumed, dist, log
) -> dict[str, np.ndarray]:
    """{"train": ..., "eval": ...} reference log-probs of the datasets given (None ones skipped) for DPO / IPO
    (empty for the reference-free objectives). A fresh run computes them with the model as it is (the initial
    weights: call before the first step) or reads those an earlier run computed for the same weights and data;
    a resumed run reads its own run directory's copies (its model already holds trained weights)."""
    if not settings.needs_reference:
        return {}
    out = {}
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        run_file = Path(run_dir) / f"reference_logprobs_{name}.npy"
        if resumed:
            if not run_file.is_file():
                raise FileNotFoundError(
                    f"{run_file} is missing: a resumed {settings.objective} run needs the reference log-probs its "
                    "first start computed from the initial weights (the model now holds trained ones). Restore the "
                    "file, or start the run afresh (checkpointing.resume=never)"
                )
            out[name] = np.load(run_file)
            continue
        out[name] = reference_for(
            model,
            dataset,
            key=key,
            max_tokens=config.packing.max_tokens,
            device=device,
            autocast_dtype=autocast_dtype,
            run_file=run_file,
            dist=dist,
            log=log,
        )
    return out


def reference_for(model, dataset, *, key: str, max_tokens: int, device, autocast_dtype, run_file, dist, log):
    """The reference log-probs of `dataset`'s sequences (float64 [examples]) under the model as it is now, named
    by `key` (the initial weights' fingerprint): read from the dataset's cache directory when an earlier run
    computed them for the same weights and data, else computed (every rank runs the pass: FSDP needs them all)
    and written there by rank 0, atomically. `run_file` (in the run directory) gets a copy, which a resumed run
    reads."""
    from fastsft._durable import atomic_write_bytes

    cached = Path(dataset.path) / f"reference-{key}.npy"
    if cached.is_file():
        values = np.load(cached)
        if values.shape == (len(dataset),):
            log(f"reference log-probs: {cached} (computed by an earlier run from the same weights and data)")
            _write_array(run_file, values, dist, atomic_write_bytes)
            return values
    from fastsft.data import PackedLoader

    log(f"reference log-probs: one pass over {len(dataset) // 2} pairs with the initial model")
    values = reference_logprobs(model, PackedLoader(dataset, max_tokens=max_tokens, group=2), device, autocast_dtype)
    _write_array(cached, values, dist, atomic_write_bytes)
    _write_array(run_file, values, dist, atomic_write_bytes)
    return values


def _write_array(path, values: np.ndarray, dist: Distributed, write) -> None:
    if dist.is_main:
        buffer = io.BytesIO()
        np.save(buffer, values)
        write(Path(path), buffer.getvalue())
