"""End-to-end supervised fine-tuning steps: fastsft against Hugging Face padded, packed and packed + Liger.

Every row trains the same randomly initialised model (same seed, same weights) on the same examples, in the
same order, with the same optimizer; only the way the step is computed differs.

Shapes (configs written below, weights random: nothing is downloaded):
  llama-3.2-1b   LlamaConfig of meta-llama/Llama-3.2-1B: 16 layers, hidden 2048, 32 heads / 8 KV heads of
                 64, MLP 8192, vocabulary 128256, tied embeddings, llama3 RoPE scaling (1.24B parameters).
  qwen3-0.6b     Qwen3Config of Qwen/Qwen3-0.6B: 28 layers, hidden 1024, 16 heads / 8 KV heads of 128
                 (q/k RMSNorm), MLP 3072, vocabulary 151936, tied embeddings (0.6B parameters).
  --dry-run uses 2-layer versions of both (hidden 64, 2 heads / 1 KV head of 32, vocabulary 300).

Rows:
  hf_padded           unpatched model, attn_implementation="sdpa". The step's examples in stream order,
                      data.padded_batch of them per micro-batch (= micro-batch tokens // max length, so that
                      a padded micro-batch never holds more tokens than a packed one), right-padded to the
                      longest with an attention_mask; labels in HF's unshifted convention, -100 on prompt and pad.
  hf_packed           unpatched, sdpa. Each packed micro-batch (the same documents as fastsft's) is one row
                      built by transformers' DataCollatorWithFlattening: input_ids, labels with -100 at each
                      document start, position_ids restarting per document; use_cache=False, so transformers
                      builds the block-diagonal mask from position_ids (ARCHITECTURE.md, "Known facts").
  hf_packed_liger     hf_packed after liger_kernel.transformers.apply_liger_kernel_to_{llama,qwen3}(model=...)
                      (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy), when liger-kernel is importable. Liger
                      also rebinds functions of transformers' modeling module; they are restored after the row.
  fastsft             fastsft.patch(model) (attention="fastsft": its Triton varlen kernels) on fastsft.data's
                      PackedLoader micro-batches, stepped by fastsft.train.step.forward_backward (the loop's
                      own step: step-wide supervised count on device, shift_labels, cu_seq_lens_q).
  fastsft_torch       the same with attention="torch" (torch.nn.attention.varlen.varlen_attn, CUDA only).
  fastsft_flash_attn  the same with attention="flash_attn" (when flash-attn is importable).
A row that cannot run here is "skipped: <why>"; one that fails is "oom" / "error: ..." (_common.classify_failure),
and the other rows go on.

One step, every row: forward + backward over the step's micro-batches (gradient accumulation), each
micro-batch's loss its summed token loss over the step's supervised-token count (`num_items_in_batch`), so
every row computes the same gradient; global-norm clipping at 1.0 with the loop's NaN guard (one host sync);
AdamW as `fastsft train` builds it (fastsft.train.build.optimizer: fused on CUDA, betas (0.9, 0.95), eps 1e-8,
no weight decay) at a constant learning rate (LR); zero_grad(set_to_none=True).
Regime (`fastsft train`'s bf16 mode, identical for every row): fp32 master weights and AdamW states,
forward under torch.autocast(bfloat16), backward outside it. --dry-run: fp32 throughout (CPU; Triton's
interpreter computes bf16 tl.dot wrongly).

Data (synthetic instruction mix, token ids generated directly, no tokenizer; numpy default_rng(seed)):
  lengths        log-normal, median 512 tokens, sigma 1.0 (mean ~780 after clipping, ~2% at the cap),
                 rounded and clipped to [32, 4096]: a long-tailed mix of short chats and long documents.
  prompt share   per example uniform in [0.4, 0.6] of its tokens (the first ones); the rest is the response,
                 the only tokens with loss (so ~50% of tokens are supervised).
  token ids      Zipf(1.0) over the shape's vocabulary (rank r has probability ~ 1/r; ranks mapped to ids by
                 a seeded permutation), so losses fall from ln(V) as the model learns the frequencies.
  steps          fastsft.data.PackedLoader (best-fit decreasing) packs the example pool into micro-batches of
                 8192 tokens; a step is 4 of them (~32k real tokens). Every row trains on the same steps'
                 examples in the same order; the HF rows lay them out their way (above).
  --dry-run      median 8, sigma 0.6, clipped to [4, 16]; 32-token micro-batches, 1 per step.

Measured per row:
  warm-up     the first WARMUP_STEPS steps (Triton JIT compilation, cuBLAS and allocator warm-up) are timed
              apart (`warmup_s`, `warmup_step_s`: compile time matters) and excluded from the throughput.
  step time   host wall time of each timed step, device synchronised before and after; timed steps run until
              the row's share of the budget is spent (at least MIN_TIMED_STEPS, at most MAX_TIMED_STEPS).
  tokens/s    real (non-pad) tokens of the timed steps / their total time; supervised tokens/s likewise for
              the tokens with loss. Padding counts nowhere (`input_tokens` says what the model was fed).
  MFU         model FLOPs / time / the GPU's dense bf16 peak (fastsft.train.metrics.peak_flops), with FLOPs
              from fastsft.train.metrics.FlopCounter, the same count for every row (real tokens, never padding
              or recomputation): 6 * matmul params * tokens + 12 * heads * head_dim * layers * sum over
              documents of L(L+1)/2 (causal attention within each document). `mfu` counts the lm_head on every
              real token (ARCHITECTURE.md's 6 * params * tokens); `mfu_loop` on supervised tokens only, as
              `fastsft train` reports it (fastsft's loss never projects prompt rows).
  memory      peak torch.cuda.max_memory_allocated over the timed steps, absolute (weights, AdamW states,
              gradients, activations); `static_gib` was allocated before them (weights + AdamW states).
  ratios      each row / hf_padded and / hf_packed_liger: tokens/s, step time, peak memory (None when that
              baseline did not run).
  losses      every step's loss (warm-up steps first): all rows start from the same weights and data, so the
              first losses agree up to precision.

Loss-curve parity: fastsft (patched) against the unpatched HF model (sdpa, packed, shift_labels) from the same
initial weights, both stepped by step.forward_backward on the same micro-batches (4096 tokens, one per
step), in lockstep, for --parity-steps steps (200 by default) or until the budget ends, on the qwen3-0.6b shape
(else the first shape). Reported: both loss curves, max |l_fastsft - l_hf| / |l_hf|, and a PNG of both curves.

Budget (--budget-s, default sized for ~4 minutes on an H100): the rows share 70% of it (each runnable row gets
an equal share of what is left when it starts), the parity run the rest. When time runs out the current step
finishes, what was measured is kept, and what was not is recorded as "out of time".

Targets (ARCHITECTURE.md, H100, bf16, the fastsft row on llama-3.2-1b): >= 2.5x hf_padded tokens/s, >= 1.3x
hf_packed_liger tokens/s, peak memory <= 0.6x hf_padded, MFU >= 45%.

Results: sft_<gpu>_<date>.{json,md,png} and sft_<gpu>_<date>_parity.png in --out.

    python benchmarks/bench_sft.py                                   # H100: both shapes, every row, parity
    python benchmarks/bench_sft.py --shapes llama-3.2-1b --rows hf_padded,fastsft --parity-steps 0
    TRITON_INTERPRET=1 FASTSFT_BACKEND=triton python benchmarks/bench_sft.py --dry-run --out /tmp/x
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import _common
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

import fastsft
from fastsft.data import IGNORE_INDEX, PackedLoader
from fastsft.ops._backend import select_backend
from fastsft.ops.attention import check_attention_implementation
from fastsft.train.build import optimizer as build_optimizer
from fastsft.train.config import OptimizerConfig, TrainConfig
from fastsft.train.distributed import clip_grad_norm
from fastsft.train.metrics import FlopCounter, peak_flops
from fastsft.train.step import forward_backward

BENCHMARK = "sft"
DEFAULT_BUDGET_S = 220.0  # from process start to the result files; with the Python start, ~4 min on an H100
WRITE_RESERVE_S = 5.0  # kept back from the budget for writing the JSON, markdown and PNGs
PARITY_SHARE = 0.3
PARITY_SHAPE = "qwen3-0.6b"
GRAD_CLIP = 1.0
# Steps per row on the GPU (--dry-run: 1 warm-up step, 1 timed step). Two warm-up steps: the first compiles,
# the second meets the micro-batch lengths' other integer specialisations and AdamW's fresh states.
WARMUP_STEPS, MIN_TIMED_STEPS, MAX_TIMED_STEPS = 2, 2, 10
MIN_ROW_S = 8.0  # less budget than this left for a row: "out of time" rather than a build and compile that overrun
LR, DRY_RUN_LR = 3e-4, 1e-2  # the dry run's few fp32 steps must move the loss, so parity also compares gradients
PAD_ID = 0  # pad positions are masked and labelled -100: their id never matters
SEED = 0

# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES = {
    "llama-3.2-1b": (
        transformers.LlamaConfig,
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters=LLAMA3_ROPE,
            tie_word_embeddings=True,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
    ),
    "qwen3-0.6b": (
        transformers.Qwen3Config,
        dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=151643,
            eos_token_id=151645,
        ),
    ),
}
# --dry-run: the same families at a size the Triton interpreter steps through in about two seconds. A hotter
# init than HF's 0.02 gives logits of order 1, so the loss depends on every layer: a kernel that went wrong (or
# attended across documents) moves the parity run's losses by percents, not by less than fp32's resolution.
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,
)


def model_config(shape: str, dry_run: bool):
    config_cls, kwargs = SHAPES[shape]
    kwargs = {**kwargs, **(TINY if dry_run else {})}
    return config_cls(**kwargs, attn_implementation="sdpa", use_cache=False, attention_dropout=0.0)


def build_model(config, device: torch.device, seed: int):
    """A random fp32 model built on `device`; the same seed gives the same weights for every row."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.train()


def shape_summary(config) -> dict:
    counter = FlopCounter.from_config(config)
    return {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
        "tied_embeddings": config.tie_word_embeddings,
        "matmul_params": counter.params.total,
    }


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    layout: str  # "padded" | "flattened" (DataCollatorWithFlattening) | "fastsft" (MicroBatch)
    description: str
    liger: bool = False
    attention: str | None = None  # fastsft.patch(attention=...) for the fastsft rows


ROWS = {
    "hf_padded": Row(
        "padded", "HF unpatched, sdpa, micro-batches of data.padded_batch examples right-padded + attention_mask"
    ),
    "hf_packed": Row(
        "flattened",
        "HF unpatched, sdpa, one packed row per micro-batch (DataCollatorWithFlattening position_ids), use_cache=False",
    ),
    "hf_packed_liger": Row(
        "flattened", "hf_packed + Liger-Kernel (RoPE, RMSNorm, SwiGLU, fused linear CE)", liger=True
    ),
    "fastsft": Row(
        "fastsft", "fastsft.patch(model) + fastsft.data packing + step.forward_backward", attention="fastsft"
    ),
    "fastsft_torch": Row("fastsft", "fastsft with attention='torch' (torch varlen_attn)", attention="torch"),
    "fastsft_flash_attn": Row("fastsft", "fastsft with attention='flash_attn' (flash-attn)", attention="flash_attn"),
}
LIGER_APPLY = {"llama": "apply_liger_kernel_to_llama", "qwen3": "apply_liger_kernel_to_qwen3"}


def _first_clause(text: str, limit: int = 120) -> str:
    """The first clause of an error message: what is missing, without the install instructions."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(" (")[0].split(". ")[0][:limit]


def unavailable(row: Row, device: torch.device) -> str | None:
    """Why `row` cannot run here (checked before any model is built), or None."""
    if row.liger:
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
        if device.type != "cuda":
            return "Liger-Kernel's Triton kernels run on CUDA tensors (dry run on CPU)"
    if row.attention in ("torch", "flash_attn"):
        try:
            check_attention_implementation(row.attention)
        except ImportError as exc:
            return _first_clause(str(exc))
        if device.type != "cuda":
            return f"attention={row.attention!r} runs FlashAttention CUDA kernels only (device is {device.type})"
    return None


@contextmanager
def restored_module(module):
    """Undo what Liger rebinds at module level (apply_rotary_pos_emb, the RMSNorm / MLP classes, class
    forwards), so that the rows and the parity run after a Liger row see transformers' own code."""
    saved = dict(vars(module))
    classes = {
        name: dict(vars(obj))
        for name, obj in saved.items()
        if isinstance(obj, type) and obj.__module__ == module.__name__
    }
    try:
        yield
    finally:
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        for name in set(vars(module)) - set(saved):
            delattr(module, name)
        for name, attrs in classes.items():
            cls = saved[name]
            for key, value in attrs.items():
                if not key.startswith("__") and vars(cls).get(key) is not value:
                    setattr(cls, key, value)
            for key in set(vars(cls)) - set(attrs):
                if not key.startswith("__"):
                    delattr(cls, key)


def apply_liger(model, stack: ExitStack) -> str:
    from liger_kernel import transformers as liger

    stack.enter_context(restored_module(sys.modules[type(model).__module__]))
    name = LIGER_APPLY.get(model.config.model_type)
    if name is None or not hasattr(liger, name):
        raise RuntimeError(f"this liger-kernel has no {name or model.config.model_type} patch")
    getattr(liger, name)(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model
    )
    version = _common.package_version(*_common.PACKAGES["liger_kernel"])
    return f"liger_kernel.transformers.{name}(model=...) {version}"


# --------------------------------------------------------------------------------------------------
# Synthetic instruction data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    median_len: int
    sigma: float
    min_len: int
    max_len: int
    prompt_share: tuple[float, float]
    zipf_exponent: float
    micro_batch_tokens: int  # packed micro-batch budget (fastsft, hf_packed)
    grad_accum: int  # packed micro-batches per step
    parity_micro_batch_tokens: int  # one micro-batch per parity step

    @property
    def padded_batch(self) -> int:
        """hf_padded's examples per micro-batch: never more tokens than a packed micro-batch, even padded."""
        return max(1, self.micro_batch_tokens // self.max_len)


GPU_DATA = DataSpec(512, 1.0, 32, 4096, (0.4, 0.6), 1.0, 8192, 4, 4096)
DRY_DATA = DataSpec(8, 0.6, 4, 16, (0.4, 0.6), 1.0, 32, 1, 32)


class InstructionData:
    """Examples as flat arrays, the interface fastsft.data's packing reads (like TokenizedDataset):
    offsets int64 [N + 1], tokens int64 [total], trained bool [total] (response tokens), lengths int64 [N]."""

    def __init__(self, lengths: np.ndarray, prompt_lengths: np.ndarray, tokens: np.ndarray):
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.tokens = tokens
        position = np.arange(len(tokens)) - np.repeat(self.offsets[:-1], lengths)
        self.trained = position >= np.repeat(prompt_lengths, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.trained[lo:hi]


def make_data(spec: DataSpec, vocab: int, min_tokens: int, seed: int) -> InstructionData:
    """Examples from the module docstring's distribution until they hold at least `min_tokens` tokens."""
    rng = np.random.default_rng(seed)
    count = 2 * min_tokens // spec.median_len + 16  # the mean length exceeds the median: always enough
    lengths = rng.lognormal(math.log(spec.median_len), spec.sigma, count).round()
    lengths = lengths.clip(spec.min_len, spec.max_len).astype(np.int64)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), min_tokens)) + 1]
    share = rng.uniform(*spec.prompt_share, len(lengths))
    prompt = (share * lengths).round().astype(np.int64).clip(1, lengths - 1)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-spec.zipf_exponent)
    rank_of = np.searchsorted(cdf, rng.random(int(lengths.sum())) * cdf[-1]).clip(max=vocab - 1)
    tokens = rng.permutation(vocab)[rank_of].astype(np.int64)
    return InstructionData(lengths, prompt, tokens)


@dataclass
class Step:
    packed: list  # fastsft.data.MicroBatch, host side
    doc_ids: np.ndarray  # the step's examples
    tokens: int
    supervised: int
    flops: int  # ARCHITECTURE.md: lm_head on every token
    flops_loop: int  # fastsft train's count: lm_head on supervised tokens


def make_steps(data: InstructionData, spec: DataSpec, count: int, counter: FlopCounter, seed: int) -> list[Step]:
    loader = PackedLoader(data, max_tokens=spec.micro_batch_tokens, seed=seed, grad_accum=spec.grad_accum)
    steps = []
    for batches in loader.steps(0):
        if len(steps) == count:
            break
        lengths = [mb.cu_seqlens.diff().numpy() for mb in batches]  # host side: no sync
        supervised = [mb.num_supervised for mb in batches]
        steps.append(
            Step(
                packed=batches,
                doc_ids=np.concatenate([mb.doc_ids for mb in batches]),
                tokens=sum(mb.num_tokens for mb in batches),
                supervised=sum(supervised),
                flops=sum(counter(n) for n in lengths),
                flops_loop=sum(counter(n, lm_head_tokens=r) for n, r in zip(lengths, supervised, strict=True)),
            )
        )
    if len(steps) < count:
        raise RuntimeError(f"the data made {len(steps)} steps, {count} needed")
    return steps


def step_data(spec: DataSpec, vocab: int, steps: int, micro_batch_tokens: int, grad_accum: int, seed: int):
    # Packing fills ~99% of the micro-batches; 10% spare tokens always give `steps` full steps.
    return make_data(spec, vocab, int(1.1 * steps * grad_accum * micro_batch_tokens) + spec.max_len, seed)


def hf_labels(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """HF's convention (the model shifts): labels[t] = ids[t] on response tokens, -100 elsewhere and at the
    first token (nothing predicts it)."""
    labels = np.where(trained, ids, IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    return labels


def padded_batches(data: InstructionData, step: Step, batch: int) -> list[dict]:
    """The step's examples in stream order, `batch` per micro-batch, right-padded to the longest."""
    docs = np.sort(step.doc_ids)
    out = []
    for start in range(0, len(docs), batch):
        examples = [data[i] for i in docs[start : start + batch]]
        width = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.int64)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.int64)
        for r, (ids, trained) in enumerate(examples):
            input_ids[r, : len(ids)] = torch.from_numpy(ids)
            labels[r, : len(ids)] = torch.from_numpy(hf_labels(ids, trained))
            attention_mask[r, : len(ids)] = 1
        out.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return out


def flattened_batches(data: InstructionData, step: Step, collator) -> list[dict]:
    """Each packed micro-batch's documents through DataCollatorWithFlattening: the same row as fastsft's."""
    out = []
    for mb in step.packed:
        features = [{"input_ids": data[i][0].tolist(), "labels": hf_labels(*data[i]).tolist()} for i in mb.doc_ids]
        batch = collator(features, return_tensors="pt")
        if not torch.equal(batch["input_ids"], mb.input_ids):
            raise RuntimeError("DataCollatorWithFlattening laid out the documents differently from fastsft.data")
        out.append({key: batch[key] for key in ("input_ids", "labels", "position_ids")})
    return out


def hf_supervised(batches: list[dict]) -> int:
    return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)


# --------------------------------------------------------------------------------------------------
# Steps and the time budget
# --------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: torch.device
    dry_run: bool
    autocast_dtype: torch.dtype | None
    data: DataSpec
    lr: float
    warmup_steps: int
    min_timed_steps: int
    max_timed_steps: int
    min_row_s: float  # a row needs at least this much of the budget to start (model build + warm-up)
    peak: float | None  # dense peak FLOP/s, None on CPU

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def optimizer(self, model):
        return build_optimizer(model, TrainConfig(optimizer=OptimizerConfig(lr=self.lr)), self.device)


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 where unknown): Python's start and the imports
    (torch, transformers, triton: seconds) count against the budget too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, clock ticks after boot
    except (OSError, ValueError, IndexError):
        return 0.0
    return age if 0.0 <= age < 600.0 else 0.0  # anything else is a clock this reading cannot trust


class Budget:
    """Wall-clock deadlines from the process start: the rows until `rows_end`, the parity run until `end`;
    WRITE_RESERVE_S before the budget's end is left for the result files."""

    def __init__(self, seconds: float, parity_share: float):
        self.seconds = seconds
        self.startup_s = process_age_s()
        self.start = time.perf_counter() - self.startup_s
        usable = max(0.0, seconds - WRITE_RESERVE_S)
        self.end = self.start + usable
        self.rows_end = self.start + usable * (1.0 - parity_share)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @staticmethod
    def left(until: float) -> float:
        return until - time.perf_counter()


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():7.1f}s] {message}", flush=True)


def hf_forward_backward(model, batches: list[dict], num_items: int, ctx: Context) -> torch.Tensor:
    """HF's way (what Trainer does): each micro-batch under autocast, loss = sum / num_items_in_batch."""
    total = torch.zeros((), device=ctx.device)
    for batch in batches:
        inputs = {key: value.to(ctx.device, non_blocking=True) for key, value in batch.items()}
        with ctx.autocast():
            out = model(**inputs, use_cache=False, num_items_in_batch=num_items)
        out.loss.backward()
        total += out.loss.detach()
    return total


def optimizer_step(params: list, optimizer) -> bool:
    """The loop's tail: clip, NaN guard (a host sync, as in `fastsft train`), AdamW, zero_grad."""
    norm = clip_grad_norm(params, GRAD_CLIP)
    finite = bool(torch.isfinite(norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def make_step_fn(row: Row, model, optimizer, ctx: Context):
    """(step_fn(batches, step) -> the step's loss as a 0-d tensor, [count of steps the NaN guard skipped])."""
    params = [p for p in model.parameters() if p.requires_grad]
    skipped = [0]

    def step_fn(batches, step: Step) -> torch.Tensor:
        if row.layout == "fastsft":
            loss, _, _ = forward_backward(model, batches, ctx.device, ctx.autocast_dtype)
        else:
            loss = hf_forward_backward(model, batches, step.supervised, ctx)
        skipped[0] += not optimizer_step(params, optimizer)
        return loss

    return step_fn, skipped


def measure(
    entry: dict, step_fn, layouts: list, steps: list[Step], ctx: Context, budget: Budget, row_end: float
) -> None:
    """Warm-up steps, then timed steps until the row's share is spent; fills `entry`."""
    device, losses, warm = ctx.device, [], []
    for i in range(ctx.warmup_steps):
        if budget.left(budget.end) <= 0:
            entry["status"] = "out of time"
            break
        seconds, loss = _common.timed(lambda i=i: step_fn(layouts[i], steps[i]), device)
        warm.append(seconds)
        losses.append(loss)
    entry.update(warmup_steps=len(warm), warmup_s=sum(warm), warmup_step_s=warm)
    if warm:
        log(
            budget,
            f"{entry['shape']} {entry['row']}: warm-up {len(warm)} steps {sum(warm):.1f}s (first {warm[0]:.1f}s)",
        )
    if entry["status"] == "out of time":
        entry["losses"] = [float(x) for x in losses]
        return
    if device.type == "cuda":
        entry["static_gib"] = torch.cuda.memory_allocated(device) / _common.GIB
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    for i in range(ctx.warmup_steps, ctx.warmup_steps + ctx.max_timed_steps):
        expected = times[-1] if times else (warm[-1] if warm else 0.0)
        share_spent = len(times) >= ctx.min_timed_steps and budget.left(row_end) < expected
        if share_spent or budget.left(budget.end) < expected:
            break
        seconds, loss = _common.timed(lambda i=i: step_fn(layouts[i], steps[i]), device)
        times.append(seconds)
        losses.append(loss)
    entry["losses"] = [float(x) for x in losses]
    if not times:
        entry["status"] = "out of time"
        return
    fill_throughput(entry, steps[ctx.warmup_steps : ctx.warmup_steps + len(times)], times, ctx)
    entry["input_tokens"] = sum(_input_tokens(b) for b in layouts[ctx.warmup_steps : ctx.warmup_steps + len(times)])
    entry["padding_share"] = 1.0 - entry["tokens"] / entry["input_tokens"]
    if device.type == "cuda":
        entry["peak_gib"] = torch.cuda.max_memory_allocated(device) / _common.GIB
    entry["status"] = "ok"


def _input_tokens(batches: list) -> int:
    """Tokens the model was fed, padding included."""
    return sum((b.input_ids if hasattr(b, "input_ids") else b["input_ids"]).numel() for b in batches)


def fill_throughput(entry: dict, steps: list[Step], times: list[float], ctx: Context) -> None:
    seconds = sum(times)
    tokens, supervised = sum(s.tokens for s in steps), sum(s.supervised for s in steps)
    flops, flops_loop = sum(s.flops for s in steps), sum(s.flops_loop for s in steps)
    entry.update(
        timed_steps=len(times),
        step_time_s=seconds / len(times),
        step_time_s_median=float(np.median(times)),
        step_times_s=times,
        tokens=tokens,
        supervised_tokens=supervised,
        tokens_per_s=tokens / seconds,
        supervised_tokens_per_s=supervised / seconds,
        tflops_per_s=flops / seconds / 1e12,
        mfu=flops / seconds / ctx.peak if ctx.peak else None,
        mfu_loop=flops_loop / seconds / ctx.peak if ctx.peak else None,
    )


# --------------------------------------------------------------------------------------------------
# One row, one shape
# --------------------------------------------------------------------------------------------------


def new_entry(shape: str, name: str) -> dict:
    row = ROWS[name]
    return {
        "shape": shape,
        "row": name,
        "status": "not run",
        "description": row.description,
        "note": None,
        "attention": row.attention or "sdpa",
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
        "input_tokens": None,
        "padding_share": None,
        "micro_batches_per_step": None,
        "tokens_per_s": None,
        "supervised_tokens_per_s": None,
        "tflops_per_s": None,
        "mfu": None,
        "mfu_loop": None,
        "static_gib": None,
        "peak_gib": None,
        "skipped_steps": 0,
        "losses": [],
        "warnings": [],
        "vs_hf_padded": None,
        "vs_hf_packed_liger": None,
    }


def layouts_for(row: Row, data: InstructionData, steps: list[Step], spec: DataSpec) -> list:
    """Each step's micro-batches as this row feeds them (host side, built before any timing)."""
    if row.layout == "fastsft":
        return [s.packed for s in steps]
    if row.layout == "padded":
        layouts = [padded_batches(data, s, spec.padded_batch) for s in steps]
    else:
        collator = DataCollatorWithFlattening()
        layouts = [flattened_batches(data, s, collator) for s in steps]
    for batches, step in zip(layouts, steps, strict=True):
        if hf_supervised(batches) != step.supervised:  # every row must train on exactly the same targets
            raise RuntimeError(f"{row.layout} batches supervise {hf_supervised(batches)} tokens, not {step.supervised}")
    return layouts


def prepare_model(row: Row, config, ctx: Context, stack: ExitStack, entry: dict):
    model = build_model(config, ctx.device, SEED)
    if row.liger:
        entry["note"] = apply_liger(model, stack)
    elif row.layout == "fastsft":
        fastsft.patch(model, attention=row.attention)
        report = model.fastsft_report
        entry["patch"] = {
            "summary": str(report),
            "patched": dict(report.patched),
            "attention_implementation": report.attention_implementation,
        }
        compute = torch.empty(0, device=ctx.device, dtype=ctx.autocast_dtype or torch.float32)
        entry["fastsft_backend"] = select_backend("varlen_attention", compute)  # what the patched ops dispatch to
    return model


def run_row(shape: str, name: str, config, data, steps, ctx: Context, budget: Budget, row_end: float) -> dict:
    """Build, warm up and time one row; a failure becomes the entry's status, never an exception."""
    entry = new_entry(shape, name)
    with _common.failures_as_status(entry):
        _row_body(entry, ROWS[name], config, data, steps, ctx, budget, row_end)
    # The model, optimizer and batches lived in _row_body's frame (and the traceback's): gone now.
    _common.release_memory(ctx.device)
    return entry


def _row_body(entry: dict, row: Row, config, data, steps, ctx: Context, budget: Budget, row_end: float) -> None:
    with ExitStack() as stack, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        layouts = layouts_for(row, data, steps, ctx.data)
        entry["micro_batches_per_step"] = sum(len(b) for b in layouts) / len(layouts)
        model = prepare_model(row, config, ctx, stack, entry)
        optimizer = ctx.optimizer(model)
        entry["build_s"] = time.perf_counter() - start
        step_fn, skipped = make_step_fn(row, model, optimizer, ctx)
        try:
            measure(entry, step_fn, layouts, steps, ctx, budget, row_end)
        finally:
            entry["skipped_steps"] = skipped[0]
            entry["warnings"] = _common.warning_lines(caught)


def progress(entry: dict) -> str:
    parts = [f"{entry['shape']:<13}", f"{entry['row']:<19}", entry["status"]]
    if entry["build_s"] is not None:
        parts.append(f"build {entry['build_s']:.1f}s")
    if entry["warmup_s"] is not None:
        parts.append(f"warm-up {entry['warmup_steps']} steps {entry['warmup_s']:.1f}s")
    if entry["tokens_per_s"] is not None:
        parts.append(
            f"{entry['timed_steps']} timed steps, {entry['step_time_s']:.3f} s/step, "
            f"{entry['tokens_per_s']:,.0f} tokens/s"
        )
    if entry["mfu"] is not None:
        parts.append(f"MFU {entry['mfu']:.1%}")
    if entry["peak_gib"] is not None:
        parts.append(f"peak {entry['peak_gib']:.1f} GiB")
    return "  ".join(parts)


def run_rows(shapes: list[str], rows: list[str], ctx: Context, budget: Budget, entries: list[dict]) -> None:
    """Every (shape, row), in order, appended to `entries`; each runnable row gets an equal share of the rows'
    time left."""
    reasons = {name: unavailable(ROWS[name], ctx.device) for name in rows}
    remaining = len(shapes) * sum(reason is None for reason in reasons.values())
    for shape in shapes:
        config = model_config(shape, ctx.dry_run)
        counter = FlopCounter.from_config(config)
        count = ctx.warmup_steps + ctx.max_timed_steps
        data = step_data(ctx.data, config.vocab_size, count, ctx.data.micro_batch_tokens, ctx.data.grad_accum, SEED)
        steps = make_steps(data, ctx.data, count, counter, SEED)
        log(
            budget,
            f"{shape}: {count} steps of ~{np.mean([s.tokens for s in steps]):,.0f} tokens "
            f"({len(data)} examples in the pool)",
        )
        for name in rows:
            if reasons[name] is not None:
                entry = new_entry(shape, name)
                entry["status"] = f"skipped: {reasons[name]}"
            else:
                share = budget.left(budget.rows_end) / max(1, remaining)
                remaining -= 1
                if share <= 0 or share < ctx.min_row_s:
                    entry = new_entry(shape, name)
                    entry["status"] = "out of time"
                else:
                    log(budget, f"{shape} {name}: start (share {share:.1f}s)")
                    entry = run_row(shape, name, config, data, steps, ctx, budget, time.perf_counter() + share)
            log(budget, progress(entry))
            entries.append(entry)


def complete(entries: list[dict], shapes: list[str], rows: list[str], device: torch.device) -> list[dict]:
    """Every (shape, row) in order: those an interruption left unmeasured are "out of time" (or "skipped" when
    they could not have run here anyway)."""
    done = {(e["shape"], e["row"]): e for e in entries}
    out = []
    for shape in shapes:
        for name in rows:
            entry = done.get((shape, name))
            if entry is None:
                entry = new_entry(shape, name)
                reason = unavailable(ROWS[name], device)
                entry["status"] = "out of time" if reason is None else f"skipped: {reason}"
            out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------
# Loss-curve parity
# --------------------------------------------------------------------------------------------------


def parity_record(shape: str, requested: int, ctx: Context) -> dict:
    return {
        "shape": shape,
        "status": "not run" if requested > 0 else "skipped: --parity-steps 0",
        "steps": 0,
        "steps_requested": requested,
        "micro_batch_tokens": ctx.data.parity_micro_batch_tokens,
        "max_rel_diff": None,
        "max_rel_diff_step": None,
        "mean_rel_diff": None,
        "final_rel_diff": None,
        "losses_hf": [],
        "losses_fastsft": [],
        "rel_diff": [],
        "time_s": None,
        "patch": None,
        "reference": "unpatched HF model, sdpa, packed rows (position_ids, use_cache=False), shift_labels",
        "plot": None,
    }


def run_parity(record: dict, ctx: Context, budget: Budget) -> None:
    """fastsft vs the unpatched model from the same weights on the same micro-batches, in lockstep; fills
    `record` (its loss lists grow step by step, so an interruption keeps the steps done)."""
    if record["steps_requested"] <= 0:
        return
    if budget.left(budget.end) <= max(0.0, ctx.min_row_s):
        record["status"] = "out of time"
        return
    start = time.perf_counter()
    try:
        with _common.failures_as_status(record):
            _parity_steps(record, ctx, budget)
            fill_parity(record)
    finally:
        record["time_s"] = time.perf_counter() - start
    _common.release_memory(ctx.device)


def _parity_steps(record: dict, ctx: Context, budget: Budget) -> None:
    """Step both models until the requested steps are done or the budget ends."""
    config = model_config(record["shape"], ctx.dry_run)
    tokens, requested = ctx.data.parity_micro_batch_tokens, record["steps_requested"]
    data = step_data(ctx.data, config.vocab_size, requested, tokens, 1, SEED + 1)
    loader = PackedLoader(data, max_tokens=tokens, seed=SEED)
    reference = build_model(config, ctx.device, SEED)
    patched = fastsft.patch(copy.deepcopy(reference))
    record["patch"] = str(patched.fastsft_report)
    runs = [
        (model, ctx.optimizer(model), [p for p in model.parameters() if p.requires_grad], curve)
        for model, curve in ((reference, record["losses_hf"]), (patched, record["losses_fastsft"]))
    ]
    last = 0.0
    for step, batches in enumerate(loader.steps(0)):
        if step == requested or budget.left(budget.end) < last:
            break
        step_start = time.perf_counter()
        losses = []
        for model, optimizer, params, _ in runs:
            loss, _, _ = forward_backward(model, batches, ctx.device, ctx.autocast_dtype)
            optimizer_step(params, optimizer)
            losses.append(loss)
        losses = [float(x) for x in losses]  # the step's one sync (the NaN guard synced already)
        for (*_, curve), loss in zip(runs, losses, strict=True):
            curve.append(loss)
        last = time.perf_counter() - step_start


def fill_parity(record: dict) -> None:
    """Relative differences and status from the loss lists (complete or cut short)."""
    hf, fast = record["losses_hf"], record["losses_fastsft"]
    n = min(len(hf), len(fast))  # an interruption between the two models' steps leaves one a step ahead
    del hf[n:], fast[n:]
    rel = [abs(f - h) / max(abs(h), 1e-30) for h, f in zip(hf, fast, strict=True)]
    record.update(steps=n, rel_diff=rel)
    if rel:
        worst = int(np.argmax(rel))
        record.update(
            max_rel_diff=rel[worst],
            max_rel_diff_step=worst + 1,
            mean_rel_diff=float(np.mean(rel)),
            final_rel_diff=rel[-1],
        )
    record["status"] = "ok" if n == record["steps_requested"] else "out of time"


REL_DIFF_FLOOR = 1e-9


def plot_parity(path: Path, record: dict, title: str) -> Path:
    """Both loss curves (top) and their relative difference (bottom, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax, ax_rel) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), height_ratios=(3, 1), layout="constrained")
    steps = range(1, record["steps"] + 1)
    if record["steps"]:
        ax.plot(steps, record["losses_hf"], color="tab:blue", linewidth=1.6, label="HF unpatched (sdpa, packed)")
        ax.plot(steps, record["losses_fastsft"], color="tab:orange", linewidth=1.0, linestyle="--", label="fastsft")
        # Equal losses (a difference of exactly 0) are drawn at the floor of the log scale.
        ax_rel.semilogy(steps, [max(r, REL_DIFF_FLOOR) for r in record["rel_diff"]], color="tab:red", linewidth=1.0)
        ax_rel.set_ylim(bottom=REL_DIFF_FLOOR / 2)
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, record["status"], transform=ax.transAxes, ha="center", va="center", color="gray")
    worst = record["max_rel_diff"]
    ax.set_title(title + (f"\nmax relative difference {worst:.2e}" if worst is not None else ""), fontsize=10)
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax_rel.set_ylabel(f"|fastsft - HF| / HF\n(0 drawn at {REL_DIFF_FLOOR:g})", fontsize=8)
    ax_rel.set_xlabel("optimizer step")
    ax_rel.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_rel.grid(True, alpha=0.3, which="both")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Ratios and targets
# --------------------------------------------------------------------------------------------------

TARGET_SHAPE, TARGET_ROW = "llama-3.2-1b", "fastsft"
TARGETS = {  # ARCHITECTURE.md, "Performance targets": (comparison, limit)
    "tokens_per_s_vs_hf_padded": (">=", 2.5),
    "tokens_per_s_vs_hf_packed_liger": (">=", 1.3),
    "peak_memory_vs_hf_padded": ("<=", 0.6),
    "mfu": (">=", 0.45),
}


def ratios(entry: dict, base: dict | None) -> dict | None:
    if base is None or base["status"] != "ok" or entry["status"] != "ok":
        return None
    return {
        "tokens_per_s": _common.quotient(entry["tokens_per_s"], base["tokens_per_s"]),
        "step_time": _common.quotient(entry["step_time_s"], base["step_time_s"]),
        "peak_memory": _common.quotient(entry["peak_gib"], base["peak_gib"]),
    }


def derive(entries: list[dict], shapes: list[str], dry_run: bool) -> dict:
    """Per shape: every row's ratios (written into the entries), the targets, the fastest attention backend."""
    derived = {}
    for shape in shapes:
        by_row = {e["row"]: e for e in entries if e["shape"] == shape}
        for entry in by_row.values():
            entry["vs_hf_padded"] = ratios(entry, by_row.get("hf_padded"))
            entry["vs_hf_packed_liger"] = ratios(entry, by_row.get("hf_packed_liger"))
        fast = by_row.get(TARGET_ROW) or {}
        padded, liger = fast.get("vs_hf_padded") or {}, fast.get("vs_hf_packed_liger") or {}
        values = {
            "tokens_per_s_vs_hf_padded": padded.get("tokens_per_s"),
            "tokens_per_s_vs_hf_packed_liger": liger.get("tokens_per_s"),
            "peak_memory_vs_hf_padded": padded.get("peak_memory"),
            "mfu": fast.get("mfu"),
        }
        targets = {}
        for key, (op, limit) in TARGETS.items():
            value = values[key]
            met = None
            if value is not None and shape == TARGET_SHAPE and not dry_run:
                met = _common.meets(value, op, limit)
            targets[key] = {"value": value, "op": op, "limit": limit, "applies": shape == TARGET_SHAPE, "met": met}
        ran = [e for e in by_row.values() if e["row"].startswith("fastsft") and e["status"] == "ok"]
        best = max(ran, key=lambda e: e["tokens_per_s"], default=None)
        # Same weights, same first step: the rows' first losses differ only by precision (bf16 on the GPU).
        first = [e["losses"][0] for e in by_row.values() if e["losses"]]
        spread = (max(first) - min(first)) / abs(first[0]) if len(first) > 1 and first[0] else None
        fastest = None
        if best is not None:
            fastest = {"row": best["row"], "attention": best["attention"], "tokens_per_s": best["tokens_per_s"]}
        derived[shape] = {"targets": targets, "first_loss_rel_spread": spread, "fastest_fastsft_attention": fastest}
    return derived


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


# The row table's columns after the row's name and status: header -> (an entry's value, format).
ROW_COLUMNS = {
    "real tokens/s": (lambda e: e["tokens_per_s"], ",.0f"),
    "supervised tokens/s": (lambda e: e["supervised_tokens_per_s"], ",.0f"),
    "step s": (lambda e: e["step_time_s"], ".3f"),
    "MFU": (lambda e: e["mfu"], ".1%"),
    "MFU (loop)": (lambda e: e["mfu_loop"], ".1%"),
    "TFLOP/s": (lambda e: e["tflops_per_s"], ".1f"),
    "peak GiB": (lambda e: e["peak_gib"], ".1f"),
    "warm-up s": (lambda e: e["warmup_s"], ".1f"),
    "x hf_padded tok/s": (lambda e: (e["vs_hf_padded"] or {}).get("tokens_per_s"), ".2f"),
    "x hf_packed_liger tok/s": (lambda e: (e["vs_hf_packed_liger"] or {}).get("tokens_per_s"), ".2f"),
    "mem / hf_padded": (lambda e: (e["vs_hf_padded"] or {}).get("peak_memory"), ".2f"),
    "mem / hf_packed_liger": (lambda e: (e["vs_hf_packed_liger"] or {}).get("peak_memory"), ".2f"),
    "first loss": (lambda e: e["losses"][0] if e["losses"] else None, ".4f"),
}


def row_table(entries: list[dict]) -> str:
    rows = []
    for e in entries:
        cells = [_common.num(value(e), fmt) for value, fmt in ROW_COLUMNS.values()]
        rows.append([e["row"], _common.short_status(e["status"]), *cells])
    return _common.markdown_table(["row", "status", *ROW_COLUMNS], rows)


def target_lines(derived: dict) -> list[str]:
    lines = []
    for shape, d in derived.items():
        marks = []
        for key, t in d["targets"].items():
            value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
            marks.append(f"{key} {value} ({t['op']} {t['limit']}){_common.check_mark(t['met'])}")
        best = d["fastest_fastsft_attention"]
        if best is not None:
            marks.append(f"fastest fastsft attention: {best['attention']} ({best['tokens_per_s']:,.0f} tokens/s)")
        if d["first_loss_rel_spread"] is not None:
            marks.append(f"rows' first losses agree to {d['first_loss_rel_spread']:.1e} (same weights, same step)")
        where = " [target shape]" if shape == TARGET_SHAPE else ""
        lines.append(f"- **{shape}** (fastsft row){where}: " + "; ".join(marks))
    return lines


def parity_lines(record: dict) -> list[str]:
    if record["steps"] == 0:
        return [f"- {record['shape']}: {record['status']}"]
    return [
        f"- shape {record['shape']}, {record['steps']} of {record['steps_requested']} steps "
        f"({record['micro_batch_tokens']}-token micro-batches), status {record['status']}, {record['time_s']:.1f} s",
        f"- reference: {record['reference']}",
        f"- max relative loss difference {record['max_rel_diff']:.3e} (step {record['max_rel_diff_step']}), "
        f"mean {record['mean_rel_diff']:.3e}, final {record['final_rel_diff']:.3e}",
        f"- loss: step 1 HF {record['losses_hf'][0]:.4f} / fastsft {record['losses_fastsft'][0]:.4f}; last step HF "
        f"{record['losses_hf'][-1]:.4f} / fastsft {record['losses_fastsft'][-1]:.4f}",
        f"- plot: `{record['plot']}`",
    ]


def notes(entries: list[dict]) -> list[str]:
    """One line per row: its description, Liger's note or fastsft's patch summary, its problems."""
    names = list(dict.fromkeys(e["row"] for e in entries))
    lead = {name: ROWS[name].description for name in names}
    return _common.implementation_notes(
        entries, names, key="row", lead=lead, details=lambda e: (e["note"], e["patch"] and e["patch"]["summary"])
    )


def render_markdown(payload: dict) -> str:
    s, meta = payload["settings"], payload["metadata"]
    data = s["data"]
    parts = [
        "# End-to-end SFT step: fastsft vs Hugging Face padded / packed / packed + Liger",
        "",
        *_common.metadata_lines(meta),
        f"- regime: {s['regime']}; {s['optimizer']}",
        f"- data: {s['data_description']}; micro-batches of {data['micro_batch_tokens']} tokens, "
        f"{data['grad_accum']} per step; hf_padded: {data['padded_batch']} examples per micro-batch",
        f"- timing: {s['warmup_steps']} warm-up steps per row (timed apart), then {s['min_timed_steps']}.."
        f"{s['max_timed_steps']} timed steps within the row's share of the budget; tokens/s count real tokens only",
        f"- MFU: {s['flops_formula']}; peak {_common.num(s['peak_tflops'], '.1f') or 'n/a (no GPU)'} TFLOP/s",
        f"- budget {s['budget_s']:.0f} s, used {payload['timing']['total_s']:.1f} s"
        + (" — **dry run: tiny CPU models, no speed data**" if s["dry_run"] else ""),
        "",
    ]
    for shape in s["shapes"]:
        info = payload["shapes"][shape]
        parts += [
            f"## {shape} ({info['layers']} layers, hidden {info['hidden']}, {info['heads']}/{info['kv_heads']} "
            f"heads of {info['head_dim']}, vocab {info['vocab']}, {info['matmul_params'] / 1e6:,.1f}M matmul params)",
            "",
            row_table([e for e in payload["results"] if e["shape"] == shape]),
            "",
        ]
    sections = [
        ("Targets (ARCHITECTURE.md, H100 bf16, fastsft row on llama-3.2-1b)", target_lines(payload["derived"])),
        ("Loss-curve parity: fastsft vs unpatched HF", parity_lines(payload["parity"])),
        ("Rows", notes(payload["results"])),
    ]
    for heading, lines in sections:
        parts += [f"## {heading}", "", *lines, ""]
    return "\n".join(parts)


def panels(payload: dict) -> list[list[_common.BarPanel]]:
    shapes, names = payload["settings"]["shapes"], payload["settings"]["rows"]
    by = {(e["shape"], e["row"]): e for e in payload["results"]}

    def series(key):
        return {n: [by[(s, n)][key] for s in shapes] for n in names}

    cells = (((n, i), by[(s, n)]) for i, s in enumerate(shapes) for n in names)
    marks = _common.failure_marks(cells, also=("out of time",))
    row = [
        _common.BarPanel("real tokens/s (higher is better)", "tokens/s", shapes, series("tokens_per_s"), False, marks),
        _common.BarPanel("peak memory (lower is better)", "GiB", shapes, series("peak_gib"), False, marks),
        _common.BarPanel("warm-up (compile) time", "s", shapes, series("warmup_s"), False, marks),
    ]
    return [row]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _names(text: str, known, what: str, parser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"--{what}: unknown or empty {unknown or text!r}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="End-to-end SFT steps: fastsft vs HF padded, HF packed, HF packed + Liger; loss-curve parity.",
        epilog="Writes sft_<gpu>_<date>.{json,md,png} and sft_<gpu>_<date>_parity.png into --out.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny models on the CPU, a few steps (with TRITON_INTERPRET=1 FASTSFT_BACKEND=triton: fastsft's "
        "Triton kernels in the interpreter); checks the script, not speed",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"wall-clock budget for the rows and the parity run (default {DEFAULT_BUDGET_S:g})",
    )
    _common.add_out_option(parser)
    parser.add_argument(
        "--parity-steps",
        type=int,
        default=None,
        help="loss-parity steps (default 200; 3 with --dry-run; 0 skips the parity run)",
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    args = parser.parse_args(argv)
    args.shapes = _names(args.shapes, SHAPES, "shapes", parser)
    args.rows = _names(args.rows, ROWS, "rows", parser)
    if args.parity_steps is None:
        args.parity_steps = 3 if args.dry_run else 200
    if args.budget_s < 0 or args.parity_steps < 0:
        parser.error("--budget-s and --parity-steps must be >= 0")
    return args


def make_context(args: argparse.Namespace) -> Context:
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes on a small shared machine: threads only contend
        return Context(
            torch.device("cpu"),
            True,
            None,
            DRY_DATA,
            lr=DRY_RUN_LR,
            warmup_steps=1,
            min_timed_steps=1,
            max_timed_steps=1,
            min_row_s=0.0,
            peak=None,
        )
    device = torch.device("cuda", torch.cuda.current_device())
    return Context(
        device,
        False,
        torch.bfloat16,
        GPU_DATA,
        lr=LR,
        warmup_steps=WARMUP_STEPS,
        min_timed_steps=MIN_TIMED_STEPS,
        max_timed_steps=MAX_TIMED_STEPS,
        min_row_s=MIN_ROW_S,
        peak=peak_flops(device, torch.bfloat16),
    )


def settings(args: argparse.Namespace, ctx: Context) -> dict:
    d = ctx.data
    regime = (
        "fp32 weights, AdamW states and compute (dry run on CPU)"
        if ctx.autocast_dtype is None
        else "fp32 master weights and AdamW states, forward under torch.autocast(bfloat16), backward outside "
        "(fastsft train's bf16 mode)"
    )
    return {
        "device": ctx.device.type,
        "dry_run": ctx.dry_run,
        "budget_s": args.budget_s,
        "shapes": args.shapes,
        "rows": args.rows,
        "seed": SEED,
        "regime": regime,
        "compute_dtype": "bfloat16" if ctx.autocast_dtype else "float32",
        "optimizer": f"AdamW (fastsft.train.build.optimizer: fused={ctx.device.type == 'cuda'}, betas (0.9, 0.95), "
        f"eps 1e-8, weight decay 0), constant lr {ctx.lr:g}, grad clip {GRAD_CLIP:g}",
        "lr": ctx.lr,
        "grad_clip": GRAD_CLIP,
        "warmup_steps": ctx.warmup_steps,
        "min_timed_steps": ctx.min_timed_steps,
        "max_timed_steps": ctx.max_timed_steps,
        "data": {**asdict(d), "prompt_share": list(d.prompt_share), "padded_batch": d.padded_batch},
        "data_description": f"log-normal lengths (median {d.median_len}, sigma {d.sigma:g}) clipped to "
        f"[{d.min_len}, {d.max_len}], prompt share uniform in [{d.prompt_share[0]:g}, "
        f"{d.prompt_share[1]:g}], Zipf({d.zipf_exponent:g}) token ids, seed {SEED}",
        "flops_formula": "6 * matmul params * real tokens + 12 * heads * head_dim * layers * sum_docs L(L+1)/2 "
        "(mfu: lm_head on every token; mfu_loop: on supervised tokens, as fastsft train)",
        "peak_tflops": ctx.peak / 1e12 if ctx.peak else None,
        "fastsft_backend_env": os.environ.get("FASTSFT_BACKEND", "auto"),
        "parity_steps": args.parity_steps,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_run = "pass --dry-run for tiny CPU models that check the script only"
    if not args.dry_run and _common.cuda_missing("bench_sft.py", cpu_run):
        return 2
    ctx = make_context(args)
    parity_shape = PARITY_SHAPE if PARITY_SHAPE in args.shapes else args.shapes[0]
    budget = Budget(args.budget_s, PARITY_SHARE if args.parity_steps > 0 else 0.0)
    log(budget, f"{len(args.shapes)} shapes x {len(args.rows)} rows on {_common.gpu_name()}, budget {args.budget_s:g}s")
    _common.stop_on_sigterm()
    entries, parity, rows_s = [], parity_record(parity_shape, args.parity_steps, ctx), None
    try:
        run_rows(args.shapes, args.rows, ctx, budget, entries)
        rows_s = budget.elapsed()
        log(budget, f"parity on {parity_shape}: {args.parity_steps} steps requested")
        run_parity(parity, ctx, budget)
    except _common.OutOfTime:
        log(budget, "SIGTERM: stopping here; writing what was measured")
        if parity["status"] == "not run":  # interrupted before or during the parity run: keep its steps
            fill_parity(parity)
    _common.ignore_sigterm()  # a few seconds more to write the files (SIGKILL follows)
    entries = complete(entries, args.shapes, args.rows, ctx.device)
    log(
        budget,
        f"parity: {parity['status']}, {parity['steps']} steps, max relative difference "
        f"{_common.num(parity['max_rel_diff'], '.3e')}",
    )
    metadata = _common.collect_metadata()
    stem = _common.result_stem(BENCHMARK, metadata)
    payload = {
        "benchmark": BENCHMARK,
        "description": "end-to-end SFT steps and loss-curve parity (see bench_sft.py's docstring)",
        "metadata": metadata,
        "settings": settings(args, ctx),
        "shapes": {shape: shape_summary(model_config(shape, ctx.dry_run)) for shape in args.shapes},
        "results": entries,
        "derived": derive(entries, args.shapes, ctx.dry_run),
        "targets": {
            key: {"op": op, "limit": limit, "shape": TARGET_SHAPE, "row": TARGET_ROW}
            for key, (op, limit) in TARGETS.items()
        },
        "parity": parity,
        "timing": {
            "total_s": budget.elapsed(),
            "startup_s": budget.startup_s,
            "rows_s": rows_s,
            "parity_s": parity["time_s"],
        },
        "files": {ext: f"{stem}.{ext}" for ext in ("json", "md", "png")} | {"parity_png": f"{stem}_parity.png"},
    }
    parity["plot"] = payload["files"]["parity_png"]
    title = f"loss parity on {parity_shape}: fastsft vs HF, {metadata['gpu']}, git {metadata['git_revision']}"
    paths = [plot_parity(args.out / payload["files"]["parity_png"], parity, title)]
    payload["timing"]["total_s"] = budget.elapsed()
    dtype = payload["settings"]["compute_dtype"]
    title = f"end-to-end SFT step: {metadata['gpu']}, {dtype}, git {metadata['git_revision']}"
    paths += _common.write_result_files(payload, args.out, render_markdown(payload), panels(payload), title)
    log(budget, "wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
