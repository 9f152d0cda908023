"""DPO training steps: fastsft's packed preference step against TRL's padded one (plain, and with Liger-Kernel).

Every row trains the same randomly initialised model (same seed, same weights) on the same preference pairs, in
the same order, against the same precomputed reference log-probs, with the same optimizer; only the way the step
is computed differs. Shapes and the training regime are bench_sft.py's (its module is imported for them).

Shapes: llama-3.2-1b and qwen3-0.6b (bench_sft.SHAPES: the real configs, random weights, nothing downloaded);
--dry-run: 2-layer versions of both (bench_sft.TINY: hidden 64, vocabulary 300).

Rows (run in this order):
  trl_padded        "trl padded": TRL's DPOTrainer step as TRL computed it up to its 0.2x releases (its
                    `_compute_loss` with precompute_ref_log_probs): each padded micro-batch holds `padded_pairs`
                    pairs as TRL's DataCollatorForPreference lays them out (chosen rows, then rejected rows, each
                    prompt + completion, right-padded to the longest of the batch, attention_mask, completion_mask);
                    the unpatched HF model (sdpa) materialises the [2B, T, V] logits; TRL's selective_log_softmax
                    gathers the label log-probs (its own Triton kernel on CUDA in TRL 1.x); the completion tokens'
                    log-probs are summed per sequence; the sigmoid DPO loss with the precomputed reference log-probs.
                    TRL's collator and selective_log_softmax are called when trl is importable, else the same
                    computation in plain PyTorch (the result file says which).
  fastsft_packed    "fastsft packed": fastsft.patch(model) (attention="fastsft") on fastsft.data.PackedLoader
                    micro-batches with group=2 (pairs whole, nothing padded), stepped by
                    fastsft.train.preference.preference_forward_backward (fused linear log-probs: no logits, prompt
                    rows never reach the lm_head) with the same precomputed reference log-probs.
  trl_padded_liger  "trl padded + liger": TRL's `use_liger_loss` path: the padded micro-batches, Liger's layer kernels
                    (RoPE, RMSNorm, SwiGLU; apply_liger_kernel_to_<family>(model=...), as transformers' Trainer
                    applies them), the backbone's hidden states into liger_kernel.chunked_loss.
                    LigerFusedLinearDPOLoss. Liger's DPO loss takes the reference MODEL's hidden states, not
                    precomputed log-probs, so this row holds the reference model and runs its backbone (no grad) on
                    every micro-batch, as TRL does: more work per step than the other rows. When liger-kernel is
                    not importable (or off CUDA) the row is "skipped: <why>".
  trl_fused_head    "trl padded, fused head": TRL 1.x's DPOTrainer step (installed trl, when it has
                    trl.trainer.utils.add_fused_lm_head): the same padded micro-batches, the model given TRL's fused
                    LM head (chunked log-probs of the completion positions only, no full logits), the per-sequence
                    sums of `outputs.log_probs`, the sigmoid DPO loss. Only the log-probs are requested (TRL's
                    trainer also asks for entropy / mean logits / top-1 for its metrics: a little more work).

Every row's micro-batch loss is the sum of its pairs' losses over the step's pair count (fastsft's normaliser),
so every row computes the same gradient (TRL's trainer takes each micro-batch's mean over its pairs over the
accumulation steps: the same when micro-batches hold equally many pairs). Then the bench_sft step tail: global
norm clipping at 1.0 with a NaN guard, AdamW as `fastsft train` builds it, zero_grad. Regime: fp32 master
weights and AdamW states, forward (and loss) under torch.autocast(bfloat16) on the GPU; --dry-run: fp32, CPU.

Reference log-probs: a second random model of the same shape (seed REF_SEED) stands in for the SFT reference;
its sequence log-probs are computed once per shape, before the rows, by fastsft.train.preference.
reference_logprobs (the precomputation `fastsft train` does; untimed), and every row is fed the same numbers.
A reference other than the policy's own initial weights makes every step's loss, the first included, depend on
how the policy's log-probs are computed (with the policy as its own reference the first loss is ln 2 however
they are computed).

Data (synthetic pairs, token ids generated directly, no tokenizer; numpy default_rng(seed)):
  lengths       a pair's chosen sequence (prompt + chosen completion) log-normal, median 512 tokens, sigma 1.0,
                clipped to [32, 2048]; the prompt a uniform [0.4, 0.6] share of it (the first tokens); the rejected
                completion the chosen one's length times log-normal(0, 0.5), clipped to [1, 2048 - prompt]: chosen
                and rejected completions of different lengths after the same prompt.
  token ids     Zipf(1.0) over the vocabulary (bench_sft's), prompt ids shared by the pair's two sequences.
  steps         PackedLoader(group=2) packs whole pairs into micro-batches of 8192 tokens, 4 per step (~32k real
                tokens); the padded rows take each step's pairs in stream order, `padded_pairs` = 8192 // (2 *
                2048) = 2 pairs per micro-batch (a padded micro-batch never holds more tokens than a packed one).
  --dry-run     median 8, sigma 0.6, clipped to [4, 16]; 64-token micro-batches, 1 per step.

Measured per row (bench_sft.measure: warm-up steps timed apart, then timed steps within the row's share of the
budget): real (non-pad) tokens/s, completion (supervised) tokens/s, pairs/s, step time, MFU (bench_sft's FLOP
count: 6 * matmul params * real tokens + causal attention within each sequence), peak CUDA memory over the timed
steps (absolute: weights, AdamW states, gradients, activations); ratios of each row to trl_padded.

Parity (after the rows, on the first shape): the DPO loss of fastsft's step on a set of pairs equals the trl padded
baseline's on the same pairs, from the same initial weights and the same reference log-probs, in float32 (no
autocast, on the run's device): the loss, each sequence's log-prob and every parameter's gradient are compared,
each within PARITY_TOLERANCE; the record's status is "ok" only when all three are.

Budget (--budget-s, default DEFAULT_BUDGET_S, from the process start to the result files): the rows until
1 - PARITY_SHARE of it, in order of value (the baseline, then fastsft), each an equal share of what is left when
it starts but at least MIN_ROW_S while that much is left (a short budget measures the first rows, not none); the
parity check in the rest (the speed numbers exist only on a GPU, the parity is also checked on the CPU by the
smoke test). SIGTERM (benchmarks/gpu_proof.py's time limit) stops the run where it is, keeps what was measured and
writes the files, the rest "out of time".

Results: dpo_<gpu>_<date>.{json,md,png} in --out.

    python benchmarks/bench_dpo.py                                  # H100: both shapes, every row
    python benchmarks/bench_dpo.py --shapes llama-3.2-1b --budget-s 60
    TRITON_INTERPRET=1 FASTSFT_BACKEND=triton python benchmarks/bench_dpo.py --dry-run --out /tmp/x
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import math
import os
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass

import _common
import bench_sft as sft
import numpy as np
import torch
import torch.nn.functional as F

import fastsft
from fastsft.data import PackedLoader
from fastsft.ops._backend import select_backend
from fastsft.train.metrics import FlopCounter, peak_flops
from fastsft.train.preference import (
    PreferenceSettings,
    preference_forward_backward,
    reference_logprobs,
    sequence_logprobs,
)

BENCHMARK = "dpo"
DEFAULT_BUDGET_S = 180.0
BETA = 0.1
SETTINGS = PreferenceSettings("dpo", beta=BETA)
SEED, REF_SEED = sft.SEED, sft.SEED + 1
WARMUP_STEPS, MIN_TIMED_STEPS, MAX_TIMED_STEPS = 2, 2, 8
MIN_ROW_S = 8.0  # a row with less than this left: "out of time" rather than a build and compile that overrun
PARITY_SHARE = 0.2
LR, DRY_RUN_LR = 1e-5, 1e-2
PAD_ID = sft.PAD_ID
# Parity in float32: the two computations differ only in summation order (and fastsft's kernels use IEEE fp32
# products, never TF32), ~1e-6 relative; a wrong token, a wrong mask or a wrong loss moves them by far more.
PARITY_TOLERANCE = {"loss": 1e-4, "logps": 1e-4, "grads": 1e-3}

# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str  # the row's name in tables
    layout: str  # "padded" (TRL's collator) | "packed" (fastsft.data, group=2)
    description: str


ROWS = {
    "trl_padded": Row(
        "trl padded",
        "padded",
        "TRL DPOTrainer step (<= 0.2x): padded pairs, HF logits materialised, selective_log_softmax, sigmoid DPO "
        "loss on precomputed reference log-probs",
    ),
    "fastsft_packed": Row(
        "fastsft packed",
        "packed",
        "fastsft.patch(model) + PackedLoader(group=2) + preference_forward_backward (precomputed reference log-probs)",
    ),
    "trl_padded_liger": Row(
        "trl padded + liger",
        "padded",
        "TRL's use_liger_loss step: padded pairs, Liger layer kernels + LigerFusedLinearDPOLoss (reference model's "
        "hidden states every micro-batch: Liger takes no precomputed log-probs)",
    ),
    "trl_fused_head": Row(
        "trl padded, fused head",
        "padded",
        "TRL 1.x DPOTrainer step: padded pairs, trl add_fused_lm_head (chunked log-probs, no logits), sigmoid DPO "
        "loss on precomputed reference log-probs",
    ),
}
BASELINE = "trl_padded"


def _trl_utils():
    try:
        from trl.trainer import utils
    except Exception:  # trl missing or broken: the padded rows fall back to plain PyTorch
        return None
    return utils


def unavailable(name: str, device: torch.device) -> str | None:
    """Why row `name` cannot run here (checked before any model is built), or None."""
    if name == "trl_padded_liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
        if device.type != "cuda":
            return "Liger-Kernel's Triton kernels run on CUDA tensors (dry run on CPU)"
    if name == "trl_fused_head":
        utils = _trl_utils()
        if utils is None or not hasattr(utils, "add_fused_lm_head"):
            version = _common.package_version("trl") or "not installed"
            return f"trl {version} has no trl.trainer.utils.add_fused_lm_head (TRL 1.x's fused LM head)"
    return None


# --------------------------------------------------------------------------------------------------
# Synthetic preference pairs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSpec:
    median_len: int  # a pair's chosen sequence: prompt + chosen completion
    sigma: float
    min_len: int
    max_len: int  # longest sequence (either side)
    prompt_share: tuple[float, float]
    rejected_sigma: float  # rejected completion length = chosen completion length * lognormal(0, rejected_sigma)
    zipf_exponent: float
    micro_batch_tokens: int  # packed micro-batch budget (a whole pair must fit: >= 2 * max_len)
    grad_accum: int
    parity_tokens: int  # the parity check's pairs: one packed micro-batch of at most this many tokens

    @property
    def padded_pairs(self) -> int:
        """Pairs per padded micro-batch: 2 * pairs sequences of at most max_len never exceed a packed micro-batch."""
        return max(1, self.micro_batch_tokens // (2 * self.max_len))


GPU_DATA = PairSpec(512, 1.0, 32, 2048, (0.4, 0.6), 0.5, 1.0, 8192, 4, 4096)
DRY_DATA = PairSpec(8, 0.6, 4, 16, (0.4, 0.6), 0.5, 1.0, 64, 1, 64)


class PairData(sft.InstructionData):
    """Pairs as fastsft.data reads a preference dataset: example 2i pair i's chosen sequence, 2i + 1 its rejected
    one, each prompt + completion (trained = the completion). `prompt_lengths` int64 [pairs]."""

    def __init__(self, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, tokens: np.ndarray):
        lengths = np.stack([prompt + chosen, prompt + rejected], axis=1).reshape(-1)
        super().__init__(lengths, np.repeat(prompt, 2), tokens)
        self.prompt_lengths = prompt

    @property
    def pairs(self) -> int:
        return len(self.prompt_lengths)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt ids, chosen completion ids, rejected completion ids) of pair i."""
        p = self.prompt_lengths[i]
        (chosen, _), (rejected, _) = self[2 * i], self[2 * i + 1]
        return chosen[:p], chosen[p:], rejected[p:]


def make_pairs(spec: PairSpec, vocab: int, min_tokens: int, seed: int) -> PairData:
    """Pairs from the module docstring's distribution until they hold at least `min_tokens` tokens."""
    rng = np.random.default_rng(seed)
    count = min_tokens // (2 * spec.median_len) + 16  # a pair's mean exceeds twice the median: always enough
    n = rng.lognormal(math.log(spec.median_len), spec.sigma, count).round().clip(spec.min_len, spec.max_len)
    n = n.astype(np.int64)
    prompt = (rng.uniform(*spec.prompt_share, count) * n).round().astype(np.int64).clip(1, n - 1)
    chosen = n - prompt
    rejected = (chosen * rng.lognormal(0.0, spec.rejected_sigma, count)).round().astype(np.int64)
    rejected = rejected.clip(1, spec.max_len - prompt)
    keep = int(np.searchsorted(np.cumsum(2 * prompt + chosen + rejected), min_tokens)) + 1
    prompt, chosen, rejected = prompt[:keep], chosen[:keep], rejected[:keep]
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-spec.zipf_exponent)
    drawn = np.searchsorted(cdf, rng.random(int((prompt + chosen + rejected).sum())) * cdf[-1]).clip(max=vocab - 1)
    ids = rng.permutation(vocab)[drawn].astype(np.int64)
    pieces, at = [], 0
    for p, c, r in zip(prompt, chosen, rejected, strict=True):
        prompt_ids, chosen_ids, rejected_ids = np.split(ids[at : at + p + c + r], [p, p + c])
        pieces += [prompt_ids, chosen_ids, prompt_ids, rejected_ids]
        at += p + c + r
    return PairData(prompt, chosen, rejected, np.concatenate(pieces))


@dataclass
class PairStep:
    packed: list  # fastsft.data.MicroBatch (group=2), host side
    pair_ids: np.ndarray  # the step's pairs, in stream order
    tokens: int
    supervised: int  # completion tokens
    flops: int  # bench_sft's count: lm_head on every real token
    flops_loop: int  # lm_head on the completion tokens only (what fastsft computes)

    @property
    def pairs(self) -> int:
        return len(self.pair_ids)


def make_steps(data: PairData, spec: PairSpec, count: int, counter: FlopCounter, seed: int) -> list[PairStep]:
    loader = PackedLoader(data, max_tokens=spec.micro_batch_tokens, seed=seed, grad_accum=spec.grad_accum, group=2)
    steps = []
    for batches in loader.steps(0):
        if len(steps) == count:
            break
        lengths = [mb.cu_seqlens.diff().numpy() for mb in batches]
        supervised = [mb.num_supervised for mb in batches]
        steps.append(
            PairStep(
                packed=batches,
                pair_ids=np.sort(np.concatenate([mb.doc_ids[0::2] // 2 for mb in batches])),
                tokens=sum(mb.num_tokens for mb in batches),
                supervised=sum(supervised),
                flops=sum(counter(n) for n in lengths),
                flops_loop=sum(counter(n, lm_head_tokens=r) for n, r in zip(lengths, supervised, strict=True)),
            )
        )
    if len(steps) < count:
        raise RuntimeError(f"the pairs made {len(steps)} steps, {count} needed")
    return steps


def pair_data(spec: PairSpec, vocab: int, steps: int, seed: int) -> PairData:
    # Packing fills ~99% of the micro-batches; 10% spare tokens always give `steps` full steps.
    return make_pairs(
        spec, vocab, int(1.1 * steps * spec.grad_accum * spec.micro_batch_tokens) + 4 * spec.max_len, seed
    )


def _plain_collate(examples: list[dict]) -> dict:
    """TRL 1.x's DataCollatorForPreference layout in plain PyTorch: chosen rows (prompt + chosen), then rejected
    rows, right-padded with PAD_ID; attention_mask; completion_mask 1 on the completions."""
    rows = [(e["prompt_ids"], e["chosen_ids"]) for e in examples] + [
        (e["prompt_ids"], e["rejected_ids"]) for e in examples
    ]
    width = max(len(p) + len(c) for p, c in rows)
    out = {key: torch.zeros((len(rows), width), dtype=torch.int64) for key in ("attention_mask", "completion_mask")}
    out["input_ids"] = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
    for r, (p, c) in enumerate(rows):
        out["input_ids"][r, : len(p) + len(c)] = torch.tensor(p + c)
        out["attention_mask"][r, : len(p) + len(c)] = 1
        out["completion_mask"][r, len(p) : len(p) + len(c)] = 1
    return out


def collator() -> tuple[object, str]:
    """(collate(examples) -> padded batch, which one): TRL's DataCollatorForPreference when it has TRL 1.x's
    prompt_ids / chosen_ids / rejected_ids interface, else _plain_collate."""
    try:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        collate = DataCollatorForPreference(pad_token_id=PAD_ID)
        probe = collate([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 4]}])
        if "completion_mask" in probe:
            return collate, "trl.trainer.dpo_trainer.DataCollatorForPreference"
    except Exception:  # an older or missing trl: the same layout in plain PyTorch
        pass
    return _plain_collate, "plain PyTorch (TRL 1.x's DataCollatorForPreference layout)"


def padded_batches(data: PairData, pair_ids: np.ndarray, per_batch: int, reference: np.ndarray, collate) -> list:
    """The pairs in stream order, `per_batch` per micro-batch, laid out by `collate`, with their reference
    log-probs (float32, as TRL's collator makes them) and pair count."""
    out = []
    for start in range(0, len(pair_ids), per_batch):
        ids = pair_ids[start : start + per_batch]
        examples = []
        for i in ids:
            prompt, chosen, rejected = data.pair(int(i))
            examples.append(
                {"prompt_ids": prompt.tolist(), "chosen_ids": chosen.tolist(), "rejected_ids": rejected.tolist()}
            )
        batch = {key: collate(examples)[key] for key in ("input_ids", "attention_mask", "completion_mask")}
        batch["ref_chosen_logps"] = torch.tensor(reference[2 * ids], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor(reference[2 * ids + 1], dtype=torch.float32)
        batch["pairs"] = len(ids)
        out.append(batch)
    return out


# --------------------------------------------------------------------------------------------------
# The padded steps (TRL's computations)
# --------------------------------------------------------------------------------------------------


def _selective_log_softmax():
    utils = _trl_utils()
    if utils is not None and hasattr(utils, "selective_log_softmax"):
        return utils.selective_log_softmax, "trl.trainer.utils.selective_log_softmax"
    gather = lambda logits, index: logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return gather, "log_softmax + gather (plain PyTorch; trl not importable)"


def trl_logits_logps(model, batch: dict) -> torch.Tensor:
    """[2B] summed completion log-probs, as TRL's `_compute_loss` computed them: the model's full logits, shifted,
    selective_log_softmax on the next tokens, zeroed off the completion, summed per row."""
    log_softmax_gather, _ = _selective_log_softmax()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    per_token = log_softmax_gather(logits[:, :-1].contiguous(), batch["input_ids"][:, 1:].contiguous())
    return per_token.masked_fill(batch["completion_mask"][:, 1:] == 0, 0.0).sum(dim=1)


def trl_fused_head_logps(model, batch: dict) -> torch.Tensor:
    """[2B] as TRL 1.x's DPOTrainer computes them: labels = input_ids off the completion masked with -100, the fused
    LM head (trl add_fused_lm_head, applied when the row's model is built) returns per-token log-probs."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
        labels=labels,
        fused_lm_head=True,
    )
    seq_len = batch["completion_mask"].shape[1] - 1
    return out.log_probs[:, -seq_len:].sum(dim=1)


def dpo_sigmoid_losses(logps: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """[B] TRL's "sigmoid" loss from [2B] policy log-probs (chosen rows first) and the reference's [B] + [B]."""
    chosen, rejected = logps.chunk(2, dim=0)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(BETA * delta)


def _on(device, batch: dict) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def padded_forward_backward(model, batches: list, pairs: int, ctx, logps_fn) -> torch.Tensor:
    """One step's micro-batches: each micro-batch's summed pair losses over the step's pair count, backward."""
    total = torch.zeros((), device=ctx.device)
    for batch in batches:
        batch = _on(ctx.device, batch)
        with ctx.autocast():
            losses = dpo_sigmoid_losses(logps_fn(model, batch), batch["ref_chosen_logps"], batch["ref_rejected_logps"])
            loss = losses.sum() / pairs
        loss.backward()
        total += loss.detach()
    return total


class LigerStep:
    """TRL's `_compute_loss_liger`: policy backbone -> hidden states [2B, T-1, H], the reference model's backbone
    (no grad) likewise, LigerFusedLinearDPOLoss over the lm_head weights with labels shifted and -100 off the
    completion. Liger's loss is the mean over the micro-batch's pairs: rescaled to the step's pair count."""

    def __init__(self, model, ref_model):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        wanted = {"ignore_index": -100, "beta": BETA, "compute_nll_loss": False, "use_ref_model": True}
        accepted = inspect.signature(LigerFusedLinearDPOLoss).parameters
        self.loss_fn = LigerFusedLinearDPOLoss(**{k: v for k, v in wanted.items() if k in accepted})
        self.model, self.ref_model = model, ref_model

    def __call__(self, batches: list, pairs: int, ctx) -> torch.Tensor:
        total = torch.zeros((), device=ctx.device)
        head, ref_head = self.model.get_output_embeddings(), self.ref_model.get_output_embeddings()
        for batch in batches:
            batch = _on(ctx.device, batch)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            labels = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
            with ctx.autocast():
                hidden = self.model.get_decoder()(**inputs).last_hidden_state[:, :-1].contiguous()
                with torch.no_grad():
                    ref_hidden = self.ref_model.get_decoder()(**inputs).last_hidden_state[:, :-1].contiguous()
                out = self.loss_fn(head.weight, hidden, labels, head.bias, ref_hidden, ref_head.weight, ref_head.bias)
                loss = (out[0] if isinstance(out, (tuple, list)) else out) * (batch["pairs"] / pairs)
            loss.backward()
            total += loss.detach()
        return total


# --------------------------------------------------------------------------------------------------
# One row, one shape
# --------------------------------------------------------------------------------------------------


def new_entry(shape: str, name: str) -> dict:
    row = ROWS[name]
    return {
        "shape": shape,
        "row": name,
        "label": row.label,
        "status": "not run",
        "description": row.description,
        "note": None,
        "patch": None,
        "fastsft_backend": None,
        "build_s": None,
        "warmup_steps": 0,
        "warmup_s": None,
        "warmup_step_s": [],
        "timed_steps": 0,
        "step_time_s": None,
        "step_time_s_median": None,
        "step_times_s": [],
        "tokens": None,
        "supervised_tokens": None,
        "pairs": None,
        "input_tokens": None,
        "padding_share": None,
        "micro_batches_per_step": None,
        "tokens_per_s": None,
        "supervised_tokens_per_s": None,
        "pairs_per_s": None,
        "tflops_per_s": None,
        "mfu": None,
        "mfu_loop": None,
        "static_gib": None,
        "peak_gib": None,
        "skipped_steps": 0,
        "losses": [],
        "warnings": [],
        "vs_trl_padded": None,
    }


def prepare(name: str, config, ctx, stack: ExitStack, entry: dict):
    """The row's model (same seed, same weights for every row) and its step_fn(batches, step) -> loss."""
    model = sft.build_model(config, ctx.device, SEED)
    if name == "fastsft_packed":
        fastsft.patch(model)
        report = model.fastsft_report
        entry["patch"] = {
            "summary": str(report),
            "patched": dict(report.patched),
            "attention_implementation": report.attention_implementation,
        }
        compute = torch.empty(0, device=ctx.device, dtype=ctx.autocast_dtype or torch.float32)
        entry["fastsft_backend"] = select_backend("varlen_attention", compute)
        reference = ctx.reference

        def forward_backward(batches, step):
            return preference_forward_backward(
                model, batches, SETTINGS, ctx.device, ctx.autocast_dtype, None, reference
            )[0]

        return model, forward_backward
    if name == "trl_padded_liger":
        from liger_kernel import transformers as liger

        stack.enter_context(sft.restored_module(sys.modules[type(model).__module__]))
        apply = sft.LIGER_APPLY.get(config.model_type)
        if apply is None or not hasattr(liger, apply):
            raise _common.Unavailable(f"this liger-kernel has no {apply or config.model_type} patch")
        getattr(liger, apply)(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
        )
        ref_model = sft.build_model(config, ctx.device, REF_SEED).eval().requires_grad_(False)
        liger_step = LigerStep(model, ref_model)
        version = _common.package_version(*_common.PACKAGES["liger_kernel"])
        entry["note"] = f"liger_kernel {version}: {apply}(model=...) + chunked_loss.LigerFusedLinearDPOLoss"
        return model, lambda batches, step: liger_step(batches, step.pairs, ctx)
    if name == "trl_fused_head":
        _trl_utils().add_fused_lm_head(model)
        logps_fn = trl_fused_head_logps
        entry["note"] = f"trl {_common.package_version('trl')}: trl.trainer.utils.add_fused_lm_head"
    else:
        logps_fn = trl_logits_logps
        entry["note"] = _selective_log_softmax()[1]
    entry["note"] += f"; collator: {ctx.collator_name}"
    return model, lambda batches, step: padded_forward_backward(model, batches, step.pairs, ctx, logps_fn)


def run_row(shape: str, name: str, config, layouts: list, steps: list, ctx, budget, row_end: float) -> dict:
    """Build, warm up and time one row; a failure becomes the entry's status, never an exception."""
    entry = new_entry(shape, name)
    with _common.failures_as_status(entry):
        _row_body(entry, name, config, layouts, steps, ctx, budget, row_end)
    _common.release_memory(ctx.device)
    return entry


def _row_body(entry: dict, name: str, config, layouts: list, steps: list, ctx, budget, row_end: float) -> None:
    with ExitStack() as stack, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        entry["micro_batches_per_step"] = sum(len(b) for b in layouts) / len(layouts)
        model, forward_backward = prepare(name, config, ctx, stack, entry)
        optimizer = ctx.optimizer(model)
        params = [p for p in model.parameters() if p.requires_grad]
        entry["build_s"] = time.perf_counter() - start
        skipped = [0]

        def step_fn(batches, step):
            loss = forward_backward(batches, step)
            skipped[0] += not sft.optimizer_step(params, optimizer)
            return loss

        try:
            sft.measure(entry, step_fn, layouts, steps, ctx, budget, row_end)
        finally:
            entry["skipped_steps"] = skipped[0]
            entry["warnings"] = _common.warning_lines(caught)
        if entry["status"] == "ok":
            timed = steps[ctx.warmup_steps : ctx.warmup_steps + entry["timed_steps"]]
            entry["pairs"] = sum(s.pairs for s in timed)
            entry["pairs_per_s"] = entry["pairs"] / sum(entry["step_times_s"])


def progress(entry: dict) -> str:
    parts = [f"{entry['shape']:<13}", f"{entry['label']:<23}", entry["status"]]
    if entry["build_s"] is not None:
        parts.append(f"build {entry['build_s']:.1f}s")
    if entry["warmup_s"] is not None:
        parts.append(f"warm-up {entry['warmup_steps']} steps {entry['warmup_s']:.1f}s")
    if entry["pairs_per_s"] is not None:
        parts.append(
            f"{entry['timed_steps']} timed steps, {entry['step_time_s']:.3f} s/step, "
            f"{entry['tokens_per_s']:,.0f} tokens/s, {entry['pairs_per_s']:,.1f} pairs/s"
        )
    if entry["peak_gib"] is not None:
        parts.append(f"peak {entry['peak_gib']:.1f} GiB")
    return "  ".join(parts)


@contextmanager
def auto_backend():
    """FASTSFT_BACKEND=auto for the untimed reference precomputation: what a GPU run uses anyway (Triton on CUDA),
    and on the CPU fastsft's PyTorch reference ops instead of seconds per micro-batch in Triton's interpreter."""
    saved = os.environ.get("FASTSFT_BACKEND")
    os.environ["FASTSFT_BACKEND"] = "auto"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["FASTSFT_BACKEND"]
        else:
            os.environ["FASTSFT_BACKEND"] = saved


def precompute_reference(config, data: PairData, max_tokens: int, ctx, autocast_dtype) -> np.ndarray:
    """float64 [sequences]: the reference model's (seed REF_SEED) summed completion log-probs of every sequence of
    `data`, by fastsft's one-pass precomputation (fastsft.train.preference.reference_logprobs)."""
    with auto_backend():
        ref_model = fastsft.patch(sft.build_model(config, ctx.device, REF_SEED))
        loader = PackedLoader(data, max_tokens=max_tokens, group=2)
        values = reference_logprobs(ref_model, loader, ctx.device, autocast_dtype)
    del ref_model
    _common.release_memory(ctx.device)
    return values


def _share(budget, remaining: int, ctx) -> float | None:
    """The next row's equal share of the rows' time left, at least MIN_ROW_S while that much is left (the rows
    run in order of value); None when too little is left to start a row."""
    left = budget.left(budget.rows_end)
    share = max(left / max(1, remaining), min(left, ctx.min_row_s))
    return None if share <= 0 or share < ctx.min_row_s else share


def run_rows(shapes: list[str], rows: list[str], ctx, budget, entries: list[dict], references: dict) -> None:
    """Every (shape, row), in order, appended to `entries`; each runnable row an equal share of the time left."""
    reasons = {name: unavailable(name, ctx.device) for name in rows}
    remaining = len(shapes) * sum(reason is None for reason in reasons.values())
    collate, ctx.collator_name = collator()
    for shape in shapes:
        if remaining and _share(budget, remaining, ctx) is None:  # not even the first row would start
            continue  # complete() records the shape's rows
        config = sft.model_config(shape, ctx.dry_run)
        count = ctx.warmup_steps + ctx.max_timed_steps
        data = pair_data(ctx.data, config.vocab_size, count, SEED)
        steps = make_steps(data, ctx.data, count, FlopCounter.from_config(config), SEED)
        start = time.perf_counter()
        ctx.reference = precompute_reference(config, data, ctx.data.micro_batch_tokens, ctx, ctx.autocast_dtype)
        references[shape] = {"pairs": data.pairs, "time_s": time.perf_counter() - start}
        sft.log(
            budget,
            f"{shape}: {count} steps of ~{np.mean([s.tokens for s in steps]):,.0f} tokens, "
            f"~{np.mean([s.pairs for s in steps]):.1f} pairs ({data.pairs} pairs in the pool); reference log-probs "
            f"in {references[shape]['time_s']:.1f}s",
        )
        padded = [padded_batches(data, s.pair_ids, ctx.data.padded_pairs, ctx.reference, collate) for s in steps]
        for name in rows:
            if reasons[name] is not None:
                entry = new_entry(shape, name)
                entry["status"] = f"skipped: {reasons[name]}"
            else:
                share = _share(budget, remaining, ctx)
                remaining -= 1
                if share is None:
                    entry = new_entry(shape, name)
                    entry["status"] = "out of time"
                else:
                    sft.log(budget, f"{shape} {name}: start (share {share:.1f}s)")
                    layouts = [s.packed for s in steps] if ROWS[name].layout == "packed" else padded
                    entry = run_row(shape, name, config, layouts, steps, ctx, budget, time.perf_counter() + share)
            sft.log(budget, progress(entry))
            entries.append(entry)


def complete(entries: list[dict], shapes: list[str], rows: list[str], device: torch.device) -> list[dict]:
    """Every (shape, row) in order: those an interruption left unmeasured are "out of time" (or "skipped")."""
    done = {(e["shape"], e["row"]): e for e in entries}
    out = []
    for shape in shapes:
        for name in rows:
            entry = done.get((shape, name))
            if entry is None:
                entry = new_entry(shape, name)
                reason = unavailable(name, device)
                entry["status"] = "out of time" if reason is None else f"skipped: {reason}"
            out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------
# Parity: fastsft's DPO loss, log-probs and gradients against the padded baseline's
# --------------------------------------------------------------------------------------------------


def parity_record(shape: str) -> dict:
    return {
        "shape": shape,
        "status": "not run",
        "passed": None,
        "precision": "float32, no autocast",
        "pairs": None,
        "tokens": None,
        "padded_micro_batches": None,
        "loss_trl_padded": None,
        "loss_fastsft": None,
        "loss_rel_diff": None,
        "logps_max_rel_diff": None,
        "grad_rel_diff": None,
        "grad_tensors": None,
        "tolerance": dict(PARITY_TOLERANCE),
        "reference": f"log-probs of a random model of the same shape (seed {REF_SEED}), fastsft reference_logprobs",
        "baseline": "the trl padded row's computation (padded pairs, logits, selective_log_softmax, sigmoid DPO)",
        "time_s": None,
    }


def run_parity(record: dict, ctx, budget) -> None:
    """Fill `record` (see parity_check); "out of time" when less than a row's minimum is left."""
    if budget.left(budget.end) <= ctx.min_row_s:
        record["status"] = "out of time"
        return
    start = time.perf_counter()
    try:
        with _common.failures_as_status(record):
            parity_check(record, ctx)
    finally:
        record["time_s"] = time.perf_counter() - start
    _common.release_memory(ctx.device)


def parity_check(record: dict, ctx) -> None:
    """One packed micro-batch of pairs (PackedLoader(group=2), at most data.parity_tokens tokens): the padded
    baseline's loss (sum of pair losses / pairs) and gradients on the unpatched model, fastsft's
    preference_forward_backward on a patched copy of the same weights, float32 on ctx.device, the same reference
    log-probs; the loss, each sequence's log-prob and every gradient compared within PARITY_TOLERANCE."""
    config = sft.model_config(record["shape"], ctx.dry_run)
    spec, device = ctx.data, ctx.device
    data = make_pairs(spec, config.vocab_size, spec.parity_tokens, SEED + 2)
    loader = PackedLoader(data, max_tokens=spec.parity_tokens, group=2)
    mb = next(loader.steps(0))[0]
    pair_ids = mb.doc_ids[0::2] // 2
    reference = precompute_reference(config, data, spec.parity_tokens, ctx, None)
    policy = sft.build_model(config, device, SEED)
    patched = fastsft.patch(copy.deepcopy(policy))
    pairs = len(pair_ids)
    batches = padded_batches(data, pair_ids, spec.padded_pairs, reference, collator()[0])
    record.update(pairs=pairs, tokens=mb.num_tokens, padded_micro_batches=len(batches))

    # The baseline: its loss through the trl padded row's own function, its sequence log-probs alongside.
    trl_logps = {}  # sequence index (2 * pair, + 1 for the rejected one) -> log-prob
    loss_padded = torch.zeros((), device=device, dtype=torch.float64)
    for at, batch in zip(range(0, pairs, spec.padded_pairs), batches, strict=True):
        on = _on(device, batch)
        logps = trl_logits_logps(policy, on)
        chosen, rejected = logps.detach().double().cpu().chunk(2)
        for j, i in enumerate(pair_ids[at : at + batch["pairs"]].tolist()):
            trl_logps[2 * i], trl_logps[2 * i + 1] = float(chosen[j]), float(rejected[j])
        loss = dpo_sigmoid_losses(logps, on["ref_chosen_logps"], on["ref_rejected_logps"]).sum() / pairs
        loss.backward()
        loss_padded += loss.detach().double()

    loss_fast, *_ = preference_forward_backward(patched, [mb], SETTINGS, device, None, None, reference)
    with torch.no_grad():
        sums, _ = sequence_logprobs(patched, mb.to(device), device, None)
    fast_logps = dict(zip(mb.doc_ids.tolist(), sums.double().cpu().tolist(), strict=True))

    lp, lf = float(loss_padded), float(loss_fast)
    order = sorted(trl_logps)
    expected = torch.tensor([trl_logps[k] for k in order], dtype=torch.float64)
    got = torch.tensor([fast_logps[k] for k in order], dtype=torch.float64)
    grads = dict(policy.named_parameters())
    named = [
        (n, p.grad, grads[n].grad)
        for n, p in patched.named_parameters()
        if n in grads and p.grad is not None and grads[n].grad is not None
    ]
    record.update(
        loss_trl_padded=lp,
        loss_fastsft=lf,
        loss_rel_diff=abs(lf - lp) / max(abs(lp), 1e-30),
        logps_max_rel_diff=float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)),
        grad_rel_diff=_common.rel_diff(tuple(g for _, g, _ in named), tuple(r for _, _, r in named)) if named else None,
        grad_tensors=len(named),
    )
    checks = {"loss": record["loss_rel_diff"], "logps": record["logps_max_rel_diff"], "grads": record["grad_rel_diff"]}
    over = [
        f"{k} {v:.2e} > {PARITY_TOLERANCE[k]:g}" for k, v in checks.items() if v is None or not v <= PARITY_TOLERANCE[k]
    ]
    if len(named) < sum(p.requires_grad for p in policy.parameters()):
        over.append(f"gradients of {len(named)} parameters compared, not all")
    record["passed"] = not over
    record["status"] = "ok" if not over else "failed: " + "; ".join(over)


# --------------------------------------------------------------------------------------------------
# Ratios and report
# --------------------------------------------------------------------------------------------------


def ratios(entry: dict, base: dict | None) -> dict | None:
    if base is None or base["status"] != "ok" or entry["status"] != "ok":
        return None
    return {
        "tokens_per_s": _common.quotient(entry["tokens_per_s"], base["tokens_per_s"]),
        "pairs_per_s": _common.quotient(entry["pairs_per_s"], base["pairs_per_s"]),
        "step_time": _common.quotient(entry["step_time_s"], base["step_time_s"]),
        "peak_memory": _common.quotient(entry["peak_gib"], base["peak_gib"]),
    }


def derive(entries: list[dict], shapes: list[str]) -> dict:
    """Per shape: every row's ratios to trl padded (written into the entries) and how far the rows' first losses
    (same weights, pairs and reference) lie apart."""
    derived = {}
    for shape in shapes:
        by_row = {e["row"]: e for e in entries if e["shape"] == shape}
        for entry in by_row.values():
            entry["vs_trl_padded"] = ratios(entry, by_row.get(BASELINE))
        # Liger's row computes its reference from the reference model itself, in the run's precision: left out.
        first = [e["losses"][0] for e in by_row.values() if e["losses"] and e["row"] != "trl_padded_liger"]
        spread = (max(first) - min(first)) / abs(first[0]) if len(first) > 1 and first[0] else None
        fast = (by_row.get("fastsft_packed") or {}).get("vs_trl_padded") or {}
        derived[shape] = {
            "first_loss_rel_spread": spread,
            "fastsft_vs_trl_padded": {k: fast.get(k) for k in ("tokens_per_s", "pairs_per_s", "peak_memory")},
        }
    return derived


ROW_COLUMNS = {
    "real tokens/s": (lambda e: e["tokens_per_s"], ",.0f"),
    "pairs/s": (lambda e: e["pairs_per_s"], ",.2f"),
    "step s": (lambda e: e["step_time_s"], ".3f"),
    "peak GiB": (lambda e: e["peak_gib"], ".1f"),
    "MFU": (lambda e: e["mfu"], ".1%"),
    "padding": (lambda e: e["padding_share"], ".0%"),
    "x trl padded tok/s": (lambda e: (e["vs_trl_padded"] or {}).get("tokens_per_s"), ".2f"),
    "step / trl padded": (lambda e: (e["vs_trl_padded"] or {}).get("step_time"), ".2f"),
    "mem / trl padded": (lambda e: (e["vs_trl_padded"] or {}).get("peak_memory"), ".2f"),
    "warm-up s": (lambda e: e["warmup_s"], ".1f"),
    "first loss": (lambda e: e["losses"][0] if e["losses"] else None, ".4f"),
}


def row_table(entries: list[dict]) -> str:
    rows = []
    for e in entries:
        cells = [_common.num(value(e), fmt) for value, fmt in ROW_COLUMNS.values()]
        rows.append([e["label"], _common.short_status(e["status"]), *cells])
    return _common.markdown_table(["row", "status", *ROW_COLUMNS], rows)


def parity_lines(record: dict) -> list[str]:
    if record["passed"] is None:  # not run, out of time, or failed before both losses were computed
        return [f"- {record['shape']}: {record['status']}"]
    tol = record["tolerance"]
    grad = _common.num(record["grad_rel_diff"], ".2e")
    return [
        f"- shape {record['shape']}, {record['pairs']} pairs ({record['tokens']} tokens packed, "
        f"{record['padded_micro_batches']} padded micro-batches), {record['precision']}: **{record['status']}**",
        f"- DPO loss: trl padded {record['loss_trl_padded']:.6f}, fastsft {record['loss_fastsft']:.6f}, relative "
        f"difference {record['loss_rel_diff']:.2e} (tolerance {tol['loss']:g})",
        f"- sequence log-probs: max difference {record['logps_max_rel_diff']:.2e} of the largest (tolerance "
        f"{tol['logps']:g}); gradients ({record['grad_tensors']} tensors): relative L2 difference {grad} "
        f"(tolerance {tol['grads']:g})",
        f"- reference: {record['reference']}; baseline: {record['baseline']}",
    ]


def render_markdown(payload: dict) -> str:
    s, meta = payload["settings"], payload["metadata"]
    d = s["data"]
    parts = [
        "# DPO training step: fastsft packed vs TRL padded (plain, + Liger, fused head)",
        "",
        *_common.metadata_lines(meta),
        f"- trl {meta.get('trl') or 'not installed'}",
        f"- regime: {s['regime']}; {s['optimizer']}; DPO sigmoid loss, beta {s['beta']:g}",
        f"- data: {s['data_description']}; packed micro-batches of {d['micro_batch_tokens']} tokens, "
        f"{d['grad_accum']} per step; padded rows: {d['padded_pairs']} pairs per micro-batch",
        f"- reference log-probs: {s['reference']}",
        f"- padded rows' collator: {s['collator']}",
        f"- timing: {s['warmup_steps']} warm-up steps per row (timed apart), then {s['min_timed_steps']}.."
        f"{s['max_timed_steps']} timed steps within the row's share of the budget; tokens/s count real tokens only, "
        "pairs/s whole pairs",
        f"- budget {s['budget_s']:.0f} s, used {payload['timing']['total_s']:.1f} s"
        + (
            " — **dry run: tiny CPU models, fp32; the numbers are a smoke test, no speed data**" if s["dry_run"] else ""
        ),
        "",
    ]
    for shape in s["shapes"]:
        info = payload["shapes"][shape]
        spread = payload["derived"][shape]["first_loss_rel_spread"]
        parts += [
            f"## {shape} ({info['layers']} layers, hidden {info['hidden']}, {info['heads']}/{info['kv_heads']} "
            f"heads of {info['head_dim']}, vocab {info['vocab']}, {info['matmul_params'] / 1e6:,.1f}M matmul params)",
            "",
            row_table([e for e in payload["results"] if e["shape"] == shape]),
            "",
        ]
        if spread is not None:
            parts += [f"Rows' first losses (same weights, pairs and reference) agree to {spread:.1e}.", ""]
    names = list(dict.fromkeys(e["row"] for e in payload["results"]))
    lead = {name: f"{ROWS[name].label}: {ROWS[name].description}" for name in names}
    notes = _common.implementation_notes(
        payload["results"],
        names,
        key="row",
        lead=lead,
        details=lambda e: (e["note"], e["patch"] and e["patch"]["summary"]),
    )
    for heading, lines in (
        ("Parity: fastsft's DPO loss vs the padded baseline's", parity_lines(payload["parity"])),
        ("Rows", notes),
    ):
        parts += [f"## {heading}", "", *lines, ""]
    return "\n".join(parts)


def panels(payload: dict) -> list[list[_common.BarPanel]]:
    shapes = payload["settings"]["shapes"]
    by = {(e["shape"], e["row"]): e for e in payload["results"]}
    labels = {name: ROWS[name].label for name in payload["settings"]["rows"]}

    def series(key):
        return {label: [by[(s, n)][key] for s in shapes] for n, label in labels.items()}

    cells = (((labels[n], i), by[(s, n)]) for i, s in enumerate(shapes) for n in labels)
    marks = _common.failure_marks(cells, also=("out of time",))
    return [
        [
            _common.BarPanel(
                "real tokens/s (higher is better)", "tokens/s", shapes, series("tokens_per_s"), False, marks
            ),
            _common.BarPanel("pairs/s (higher is better)", "pairs/s", shapes, series("pairs_per_s"), False, marks),
            _common.BarPanel("peak memory (lower is better)", "GiB", shapes, series("peak_gib"), False, marks),
        ]
    ]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DPO training steps: fastsft packed vs TRL padded (plain, + Liger, fused head); loss parity.",
        epilog="Writes dpo_<gpu>_<date>.{json,md,png} into --out.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny models on the CPU, fp32, a few steps (with TRITON_INTERPRET=1 FASTSFT_BACKEND=triton: fastsft's "
        "Triton kernels in the interpreter); checks the script, not speed",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"wall-clock budget from the process start to the result files (default {DEFAULT_BUDGET_S:g})",
    )
    _common.add_out_option(parser)
    parser.add_argument("--shapes", default=",".join(sft.SHAPES), help=f"comma-separated, from {', '.join(sft.SHAPES)}")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check")
    args = parser.parse_args(argv)
    args.shapes = sft._names(args.shapes, sft.SHAPES, "shapes", parser)
    args.rows = sft._names(args.rows, ROWS, "rows", parser)
    if args.budget_s < 0:
        parser.error("--budget-s must be >= 0")
    return args


def make_context(args: argparse.Namespace) -> sft.Context:
    """bench_sft's Context with this benchmark's data and step counts; .reference and .collator_name are set as
    the run goes (the current shape's reference log-probs, the padded rows' collator)."""
    if args.dry_run:
        ctx = sft.Context(torch.device("cpu"), True, None, DRY_DATA, DRY_RUN_LR, 1, 1, 1, 0.0, None)
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        peak = peak_flops(device, torch.bfloat16)
        ctx = sft.Context(
            device, False, torch.bfloat16, GPU_DATA, LR, WARMUP_STEPS, MIN_TIMED_STEPS, MAX_TIMED_STEPS, MIN_ROW_S, peak
        )
    ctx.reference, ctx.collator_name = None, collator()[1]
    return ctx


def settings(args: argparse.Namespace, ctx) -> dict:
    d = ctx.data
    regime = (
        "fp32 weights, AdamW states and compute (dry run on CPU)"
        if ctx.autocast_dtype is None
        else "fp32 master weights and AdamW states, forward and loss under torch.autocast(bfloat16), backward outside"
    )
    return {
        "device": ctx.device.type,
        "dry_run": ctx.dry_run,
        "budget_s": args.budget_s,
        "shapes": args.shapes,
        "rows": args.rows,
        "row_labels": {name: ROWS[name].label for name in args.rows},
        "seed": SEED,
        "reference_seed": REF_SEED,
        "beta": BETA,
        "loss": "sigmoid DPO: -logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))), summed over a "
        "micro-batch's pairs, divided by the step's pair count",
        "regime": regime,
        "compute_dtype": "bfloat16" if ctx.autocast_dtype else "float32",
        "optimizer": f"AdamW (fastsft.train.build.optimizer: fused={ctx.device.type == 'cuda'}, betas (0.9, 0.95), "
        f"eps 1e-8, weight decay 0), constant lr {ctx.lr:g}, grad clip {sft.GRAD_CLIP:g}",
        "lr": ctx.lr,
        "warmup_steps": ctx.warmup_steps,
        "min_timed_steps": ctx.min_timed_steps,
        "max_timed_steps": ctx.max_timed_steps,
        "data": {**asdict(d), "prompt_share": list(d.prompt_share), "padded_pairs": d.padded_pairs},
        "data_description": f"pairs: chosen sequence length log-normal (median {d.median_len}, sigma {d.sigma:g}) "
        f"clipped to [{d.min_len}, {d.max_len}], prompt share uniform in [{d.prompt_share[0]:g}, "
        f"{d.prompt_share[1]:g}], rejected completion = chosen completion x lognormal(0, {d.rejected_sigma:g}), "
        f"Zipf({d.zipf_exponent:g}) token ids, seed {SEED}",
        "reference": f"a random model of the same shape (seed {REF_SEED}), its sequence log-probs precomputed once "
        "per shape by fastsft.train.preference.reference_logprobs (untimed) and fed to every row; the liger row runs "
        "that model's backbone itself on every micro-batch",
        "collator": ctx.collator_name,
        "trl_log_softmax": _selective_log_softmax()[1],
        "flops_formula": "6 * matmul params * real tokens + 12 * heads * head_dim * layers * sum_seqs L(L+1)/2 "
        "(mfu: lm_head on every token; mfu_loop: on completion tokens)",
        "peak_tflops": ctx.peak / 1e12 if ctx.peak else None,
        "fastsft_backend_env": os.environ.get("FASTSFT_BACKEND", "auto"),
        "parity": not args.no_parity,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and _common.cuda_missing(
        "bench_dpo.py", "pass --dry-run for tiny CPU models that check the script only"
    ):
        return 2
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes on a small shared machine: threads only contend
    ctx = make_context(args)
    budget = sft.Budget(args.budget_s, 0.0 if args.no_parity else PARITY_SHARE)
    sft.log(
        budget, f"{len(args.shapes)} shapes x {len(args.rows)} rows on {_common.gpu_name()}, budget {args.budget_s:g}s"
    )
    _common.stop_on_sigterm()
    entries, references, rows_s = [], {}, None
    parity = parity_record(args.shapes[0])
    if args.no_parity:
        parity["status"] = "skipped: --no-parity"
    try:
        rows_start = budget.elapsed()
        run_rows(args.shapes, args.rows, ctx, budget, entries, references)
        rows_s = budget.elapsed() - rows_start
        if not args.no_parity:
            sft.log(budget, f"parity on {parity['shape']}: fastsft vs trl padded, float32")
            run_parity(parity, ctx, budget)
            sft.log(budget, f"parity: {parity['status']}")
    except _common.OutOfTime:
        sft.log(budget, "SIGTERM: stopping here; writing what was measured")
        if parity["status"] == "not run":
            parity["status"] = "out of time"
    _common.ignore_sigterm()  # a few seconds more to write the files (SIGKILL follows)
    entries = complete(entries, args.shapes, args.rows, ctx.device)
    metadata = _common.collect_metadata()
    metadata["trl"] = _common.package_version("trl")
    stem = _common.result_stem(BENCHMARK, metadata)
    payload = {
        "benchmark": BENCHMARK,
        "description": "DPO training steps and loss parity (see bench_dpo.py's docstring)",
        "metadata": metadata,
        "settings": settings(args, ctx),
        "shapes": {shape: sft.shape_summary(sft.model_config(shape, ctx.dry_run)) for shape in args.shapes},
        "results": entries,
        "derived": derive(entries, args.shapes),
        "parity": parity,
        "references": references,
        "timing": {
            "total_s": budget.elapsed(),
            "startup_s": budget.startup_s,
            "rows_s": rows_s,
            "parity_s": parity["time_s"],
        },
        "files": {ext: f"{stem}.{ext}" for ext in ("json", "md", "png")},
    }
    dtype = payload["settings"]["compute_dtype"]
    title = f"DPO training step: {metadata['gpu']}, {dtype}, git {metadata['git_revision']}"
    paths = _common.write_result_files(payload, args.out, render_markdown(payload), panels(payload), title)
    sft.log(budget, "wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
