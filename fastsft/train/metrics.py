"""What the training loop measures and where it goes: model FLOPs (for MFU), the device's peak FLOP/s, the
metrics.jsonl / TensorBoard writer, and the loss-curve plot.

    counter = FlopCounter.from_model(model)                  # once, after LoRA / patching
    flops = counter(mb.cu_seqlens.diff(), lm_head_tokens=mb.num_supervised, full_backward=not lora)
    peak = peak_flops(device, torch.bfloat16)                # FLOP/s, or None (CPU, unknown GPU)
    mfu = model_flops_utilization(flops_in_window, seconds, peak)
    with MetricsLogger(run_dir, jsonl=True, tensorboard="auto", enabled=rank == 0) as log:
        log.write({"step": 10, "loss": 1.2, "lr": 1e-3})
    plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss.png")

Counting conventions (ARCHITECTURE.md: "MFU uses 6*params*tokens + attention FLOPs"; throughput counts real
tokens only): FLOPs are those the model's math needs for one forward + backward, never what an implementation
happens to execute. So padding is not counted (there is none, and documents attend only within themselves),
and neither is recomputation (activation checkpointing, flash attention's backward recomputing the scores):
this is MFU, not hardware FLOPs utilisation. Elementwise work (norms, RoPE, softmax, activations, the loss) is
left out as well: it is O(hidden) per token against O(hidden^2) for the matmuls.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from fastsft._durable import atomic_write_bytes

__all__ = [
    "FlopCounter",
    "MetricsLogger",
    "attention_pairs",
    "config_matmul_params",
    "layer_windows",
    "matmul_params",
    "metric_series",
    "model_flops_utilization",
    "peak_flops",
    "plot_loss_curves",
    "read_metrics",
]

# ---------------------------------------------------------------------------------------------------------------
# Model FLOPs
# ---------------------------------------------------------------------------------------------------------------

# Model types whose MLP is up -> activation -> down (2 matrices) rather than gated (gate, up, down: 3).
_NON_GATED_MODEL_TYPES = frozenset(
    {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "codegen", "phi", "starcoder2", "opt", "bloom", "falcon"}
)
# Config attributes that mark a mixture-of-experts model (only the routed experts' share of the MLP runs per
# token, which neither count below knows).
_MOE_ATTRIBUTES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _text_config(config):
    """The decoder's config: multimodal configs (Gemma-3, Llava, ...) nest it as text_config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _reject_moe(config) -> None:
    for name in _MOE_ATTRIBUTES:
        if getattr(config, name, None):
            raise ValueError(
                f"{getattr(config, 'model_type', type(config).__name__)} is a mixture-of-experts model "
                f"(config.{name}={getattr(config, name)}): its per-token FLOPs depend on the routed experts, "
                "which this count does not model; pass FASTSFT_PEAK_TFLOPS and read throughput in tokens/s"
            )


def _head_dim(config) -> int:
    # config.head_dim where the family decouples it (Gemma: 256 with hidden 2304 / 8 heads), else hidden / heads.
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def config_matmul_params(config) -> int:
    """Weights of the matmuls every token goes through, counted from an HF config of a dense decoder.

    Per layer: q (hidden x heads*head_dim), k and v (hidden x kv_heads*head_dim each), o (heads*head_dim x
    hidden), and the MLP: gate, up, down (3 x hidden x intermediate; 2 for the few un-gated families). Plus the
    lm_head (vocab x hidden) once, tied to the embeddings or not: the embedding lookup itself is a gather, not a
    matmul, so it is not counted. Biases are additions, not matmul weights: not counted either.
    Equals `matmul_params(model)` for the Llama-style families (tests check llama, qwen2, gemma2, mistral).
    """
    c = _text_config(config)
    _reject_moe(c)
    hidden, heads = int(c.hidden_size), int(c.num_attention_heads)
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = _head_dim(c)
    intermediate = getattr(c, "intermediate_size", None)
    if not intermediate:
        raise ValueError(
            f"config.intermediate_size is {intermediate!r} for {getattr(c, 'model_type', type(c).__name__)}; "
            "count from the model instead: FlopCounter.from_model(model)"
        )
    mlp_matrices = 2 if getattr(c, "model_type", None) in _NON_GATED_MODEL_TYPES else 3
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o: heads; k and v: kv_heads
    mlp = mlp_matrices * hidden * int(intermediate)
    return int(c.num_hidden_layers) * (attention + mlp) + int(c.vocab_size) * hidden


@dataclass(frozen=True)
class MatmulParams:
    """Matmul weights (in_features x out_features of every nn.Linear), split by whether they get a weight
    gradient (requires_grad) and whether they are the lm_head (which may see fewer rows than the trunk)."""

    trunk_trainable: int
    trunk_frozen: int
    head_trainable: int
    head_frozen: int

    @property
    def total(self) -> int:
        return self.trunk_trainable + self.trunk_frozen + self.head_trainable + self.head_frozen


def _linears(module: nn.Module | None) -> list[nn.Linear]:
    return [] if module is None else [m for m in module.modules() if isinstance(m, nn.Linear)]


def matmul_params(model: nn.Module) -> MatmulParams:
    """Count the matmul weights of a model's decoder and lm_head from its nn.Linear modules.

    Each nn.Linear counts in_features * out_features (not weight.numel(), so 4-bit packed weights and sharded
    FSDP parameters count their full logical size); a module used once per token counts once, so a tied lm_head
    counts once and the embedding (nn.Embedding, a lookup) not at all.
    Only the decoder (model.get_decoder()) and the output embedding are searched, so a multimodal model's
    vision tower, which text tokens never pass through, is left out.
    PEFT LoRA: a lora.Linear holds its frozen base nn.Linear plus lora_A (r x in) and lora_B (out x r), all
    nn.Linear: the base counts as frozen and the adapters as trainable (every token goes through them too; r is
    small, so they add little). Not modelled: mixture-of-experts layers, PEFT modules_to_save copies.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head_linears = _linears(head)
    head_ids = {id(m) for m in head_linears}
    trunk_linears = [m for m in _linears(decoder if decoder is not None else model) if id(m) not in head_ids]
    counts = {"trunk_trainable": 0, "trunk_frozen": 0, "head_trainable": 0, "head_frozen": 0}
    for part, linears in (("trunk", trunk_linears), ("head", head_linears)):
        for linear in linears:
            trainable = getattr(linear.weight, "requires_grad", True)
            counts[f"{part}_{'trainable' if trainable else 'frozen'}"] += linear.in_features * linear.out_features
    return MatmulParams(**counts)


def layer_windows(config) -> tuple[int | None, ...]:
    """Each layer's sliding window w in HF's sense (query i sees keys i - w < j <= i), None for full causal.

    config.layer_types, where the family has it (Qwen2/3, Gemma-2/3, GPT-OSS), says which layers slide
    ("sliding_attention"); without it config.sliding_window applies to every layer (Mistral). Qwen2-style
    use_sliding_window=False switches windows off. Layer types other than "sliding_attention" count as full
    causal attention (the one other kind, Llama-4's chunked attention, comes with MoE, rejected above).
    """
    c = _text_config(config)
    window = getattr(c, "sliding_window", None)
    if getattr(c, "use_sliding_window", True) is False:
        window = None
    window = int(window) if window else None
    types = getattr(c, "layer_types", None)
    if types is None:
        return (window,) * int(c.num_hidden_layers)
    return tuple(window if kind == "sliding_attention" else None for kind in types)


def attention_pairs(doc_lengths, window: int | None = None) -> int:
    """Number of (query, key) pairs causal attention scores over a packed micro-batch.

    doc_lengths: int [B] host-side (list, numpy, or a CPU tensor such as cu_seqlens.diff()); documents attend
    only within themselves. A query at position p (0-based within its document) sees min(p + 1, w) keys, so a
    document of length L contributes L(L+1)/2 pairs without a window, and w(w+1)/2 + (L - w) * w when L > w.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64).reshape(-1)
    if (lengths < 0).any():
        raise ValueError(f"document lengths must be >= 0, got {lengths[lengths < 0][:4].tolist()}")
    full = lengths * (lengths + 1) // 2
    if window is None:
        return int(full.sum())
    w = int(window)
    windowed = w * (w + 1) // 2 + (lengths - w) * w
    return int(np.where(lengths <= w, full, windowed).sum())


@dataclass(frozen=True)
class FlopCounter:
    """FLOPs of one forward + backward over a packed micro-batch; build once, call per micro-batch.

    For a micro-batch of T tokens in documents of lengths L_1..L_B (T = sum L_b), of which R rows reach the
    lm_head (R = T unless given):

        matmuls:   6 * N_trunk * T + 6 * N_head * R
        attention: 12 * heads * head_dim * sum over layers l, documents b of pairs(L_b, w_l)

    A matmul with weight N (in x out) costs 2N FLOPs per row forward; backward computes the input gradient
    (2N) and the weight gradient (2N): 6N per row. Attention per layer: forward is Q K^T and P V, each
    2 * head_dim FLOPs per head per (query, key) pair: 4 * heads * head_dim * pairs; backward is twice that
    (dS -> dQ, dK and dP, dV: four matmuls), 12 * heads * head_dim * pairs per layer in all. pairs(L, w) is
    `attention_pairs` (L(L+1)/2 without a window: the sum of squares of document lengths, not the square of
    their sum). k/v have fewer heads under GQA, but every query head still scores every key it sees.

    full_backward=False (LoRA, frozen layers): a frozen weight gets no weight gradient, so it costs 4N per row
    instead of 6N; trainable weights (LoRA adapters) stay at 6N. The input gradient is still counted for every
    layer (it is needed to reach any trainable weight below; the bottom layers' is strictly unneeded, ignored).
    full_backward=True (default) counts 6N for every weight, the textbook number comparable with full fine-tuning.

    lm_head_tokens: how many rows go through the lm_head. fastsft's fused loss projects only the supervised
    rows (a prompt row's logits are never needed; ignored rows never reach its matmuls), so the loop passes
    the micro-batch's supervised-token count: MFU counts the FLOPs the model needs, not the textbook
    6 * N * T an unpatched model spends (None gives that).
    """

    params: MatmulParams
    attention_width: int  # num_attention_heads * head_dim
    windows: tuple[int | None, ...]  # per layer, see layer_windows

    @classmethod
    def from_config(cls, config) -> FlopCounter:
        """Counter from an HF config alone, before any model is built (benchmarks/bench_sft.py): every weight
        counts as trainable (full fine-tuning), so full_backward=False changes nothing; LoRA needs from_model."""
        c = _text_config(config)
        head = int(c.vocab_size) * int(c.hidden_size)
        params = MatmulParams(config_matmul_params(c) - head, 0, head, 0)
        return cls(params, int(c.num_attention_heads) * _head_dim(c), layer_windows(c))

    @classmethod
    def from_model(cls, model: nn.Module) -> FlopCounter:
        """Counter from the model's own nn.Linear modules (see matmul_params) and its config's attention shape."""
        c = _text_config(model.config)
        _reject_moe(c)
        return cls(matmul_params(model), int(c.num_attention_heads) * _head_dim(c), layer_windows(c))

    def __call__(self, doc_lengths, *, lm_head_tokens: int | None = None, full_backward: bool = True) -> int:
        """FLOPs of one forward + backward (formula in the class docstring). doc_lengths: int [B], host-side."""
        lengths = np.asarray(doc_lengths, dtype=np.int64).reshape(-1)
        tokens = int(lengths.sum())
        rows = tokens if lm_head_tokens is None else int(lm_head_tokens)
        if not 0 <= rows <= tokens:
            raise ValueError(f"lm_head_tokens={lm_head_tokens} is outside [0, {tokens}] (the micro-batch's tokens)")
        frozen = 6 if full_backward else 4
        p = self.params
        matmul = 6 * p.trunk_trainable * tokens + frozen * p.trunk_frozen * tokens
        matmul += 6 * p.head_trainable * rows + frozen * p.head_frozen * rows
        # Layers sharing a window share the pair count: one pass over the documents per distinct window.
        pairs = sum(self.windows.count(w) * attention_pairs(lengths, w) for w in set(self.windows))
        return matmul + 12 * self.attention_width * pairs


def model_flops_utilization(flops: float, seconds: float, peak_flops_per_s: float | None) -> float | None:
    """MFU = flops / seconds / peak, a fraction (0.45 = 45%); None without a peak or elapsed time."""
    if peak_flops_per_s is None or peak_flops_per_s <= 0 or seconds <= 0:
        return None
    return flops / seconds / peak_flops_per_s


# ---------------------------------------------------------------------------------------------------------------
# Device peak FLOP/s
# ---------------------------------------------------------------------------------------------------------------

PEAK_TFLOPS_ENV = "FASTSFT_PEAK_TFLOPS"

# Dense (no 2:4 sparsity) peak TFLOP/s per GPU, from the vendors' datasheets, which mostly print the sparse
# figure (2x) with a footnote: halved here. Keys: "bf16" / "fp16" tensor-core math with FP32 accumulation (what
# autocast training runs), "tf32" (fp32 training with TF32 matmuls allowed), "fp32" (plain FP32, CUDA cores).
# A missing key means the device has no such tensor-core path (V100 / T4: no bf16), and peak_flops returns None.
# Patterns match torch.cuda.get_device_name(), lower-cased, first match wins: variants before the family
# (H100 SXM reports as e.g. "NVIDIA H100 80GB HBM3", without "SXM"; \b keeps "a10" from matching "a100"/"a10g").
_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM / NVL columns, the latter per GPU) and Hopper whitepaper (SXM5:
    # BF16 989.4, TF32 494.7, FP32 66.9; PCIe: 756 / 378 / 51.2).
    (r"\bh100\b.*\bpcie\b", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"\bh100\b.*\bnvl\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bh100\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    # NVIDIA H200 datasheet: H200 SXM as H100 SXM; H200 NVL 1,671 / 835 sparse, FP32 60. GH200 datasheet:
    # the Hopper GPU of Grace Hopper at H100 SXM rates.
    (r"\bh200\b.*\bnvl\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bg?h200\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    # NVIDIA H800 datasheet: the export variant of H100 (SXM and PCIe) at the same tensor-core rates.
    (r"\bh800\b.*\bpcie\b", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"\bh800\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    # NVIDIA A100 datasheet (40/80 GB, SXM and PCIe alike; the A800 export variant matches): 312 / 156 / 19.5.
    (r"\ba[18]00\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # A10G is AWS's variant of the A10 and has no NVIDIA datasheet; these are the A10 datasheet's (BF16 125,
    # TF32 62.5, FP32 31.2). Measured A10G bf16 matmuls reach well under 125, so its MFU reads low:
    # set FASTSFT_PEAK_TFLOPS for a measured ceiling.
    (r"\ba10g?\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    # NVIDIA A40 datasheet: BF16 149.7, TF32 74.8, FP32 37.4.
    (r"\ba40\b", {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    # NVIDIA RTX A6000 datasheet: BF16/FP16 (FP32 accumulate) 154.8, TF32 77.4, FP32 38.7.
    (r"\brtx a6000\b", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    # NVIDIA L40S datasheet: BF16 362.05, TF32 183, FP32 91.6; L40 datasheet: 181.05 / 90.5 / 90.5;
    # L4 datasheet: 121 / 60 / 30.3.
    (r"\bl40s\b", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bl40\b", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bl4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP16/BF16 with FP32 accumulate 165.2 (GeForce
    # runs FP32 accumulation at half the FP16-accumulate rate), TF32 82.6, FP32 82.6. Not the cut-down 4090 D.
    (r"\brtx 4090\b(?! d\b)", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    # NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090: FP16/BF16 with FP32 accumulate 71, TF32 35.6, FP32 35.6.
    (r"\brtx 3090\b(?! ti\b)", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    # NVIDIA V100 datasheet: FP16 tensor 125 (SXM2) / 112 (PCIe) / 130 (V100S), FP32 15.7 / 14 / 16.4; no bf16,
    # no TF32. T4 datasheet: FP16 65, FP32 8.1.
    (r"\bv100s\b", {"fp16": 130.0, "fp32": 16.4}),
    (r"\bv100\b.*\bpcie\b", {"fp16": 112.0, "fp32": 14.0}),
    (r"\bv100\b", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bt4\b", {"fp16": 65.0, "fp32": 8.1}),
    # AMD Instinct MI300X / MI325X datasheets (ROCm reports through torch.cuda): BF16/FP16 1307.4, TF32 653.7,
    # FP32 matrix 163.4.
    (r"\bmi3(00|25)x\b", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
)


def _peak_from_env() -> float | None:
    raw = os.environ.get(PEAK_TFLOPS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{PEAK_TFLOPS_ENV} must be a positive number of TFLOP/s (e.g. 989.4), got {raw!r}")
    return value * 1e12


def _dtype_key(dtype: torch.dtype | str) -> str:
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    key = names.get(dtype, dtype) if isinstance(dtype, torch.dtype) else str(dtype).lower()
    key = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(key, key)
    if key not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"peak_flops: compute dtype must be bfloat16, float16 or float32, got {dtype!r}")
    return key


def peak_flops(device: torch.device | str | int, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s of `device` for matmuls in the compute dtype (bf16 / fp16 / fp32), or None.

    FASTSFT_PEAK_TFLOPS (TFLOP/s, e.g. "989.4") overrides everything: unknown GPUs, power-capped ones, or a
    measured ceiling. Otherwise CUDA devices are looked up by name in the datasheet table above; fp32 uses the
    TF32 tensor-core rate when torch.backends.cuda.matmul.allow_tf32 is on (torch.set_float32_matmul_precision
    ("high") turns it on) and the device has TF32, the plain FP32 rate otherwise. None on CPU, on unknown
    devices, and for a dtype the device has no tensor cores for (bf16 on V100 / T4).
    """
    key = _dtype_key(dtype)
    override = _peak_from_env()
    if override is not None:
        return override
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for pattern, rates in _PEAK_TFLOPS:
        if re.search(pattern, name):
            if key == "fp32" and torch.backends.cuda.matmul.allow_tf32 and "tf32" in rates:
                key = "tf32"
            return rates[key] * 1e12 if key in rates else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard
# ---------------------------------------------------------------------------------------------------------------

# Record keys that are evaluation results: TensorBoard tag "eval/<key>"; everything else is "train/<key>".
EVAL_KEYS = frozenset({"eval_loss", "exact_match"})


def _plain(value):
    """numpy / other Real scalars -> int or float, so json.dumps and TensorBoard take them; others unchanged."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _summary_writer_class(required: bool):
    """torch's SummaryWriter, or None when TensorBoard is not installed and not required."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if required:
            raise RuntimeError(
                "logging.tensorboard=true but TensorBoard is not installed: pip install tensorboard "
                "(or set logging.tensorboard=auto / false)"
            ) from exc
        return None
    return SummaryWriter


class MetricsLogger:
    """Writes metrics records to <run_dir>/metrics.jsonl and <run_dir>/tensorboard.

    run_dir: the run directory (created if needed). jsonl: append one JSON object per record to metrics.jsonl,
    flushed at once, so a crash loses nothing written. tensorboard: True (error unless TensorBoard is installed),
    "auto" (when installed), False. enabled: False on every rank but 0 of a distributed run: nothing is written
    (with tensorboard=True the installation is still checked, so that every rank fails alike instead of rank 0
    failing while the others wait in a collective). resume_step: the step a resumed run restarts from (its
    checkpoint's); TensorBoard then hides what the interrupted run logged after it (SummaryWriter's purge_step).
    metrics.jsonl is appended to on resume, never truncated: readers keep the last record per step (see
    metric_series). A torn last line left by a crash is closed with a newline before appending.

    write(record): record = {"step": int, <name>: number, ...}, e.g. {"step": 10, "loss": 1.2, "lr": 1e-3} or
    {"step": 250, "eval_loss": 0.4}. TensorBoard gets every numeric field but "step" as a scalar at that step,
    tagged "eval/<key>" for evaluation keys (eval_loss, exact_match, eval_*) and "train/<key>" otherwise;
    None and non-numeric fields go to the JSONL only.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        jsonl: bool = True,
        tensorboard: bool | Literal["auto"] = "auto",
        *,
        enabled: bool = True,
        resume_step: int | None = None,
    ):
        if tensorboard not in (True, False, "auto"):
            raise ValueError(f"tensorboard must be true, false or 'auto', got {tensorboard!r}")
        self.run_dir = Path(run_dir)
        self._file = None
        self._writer = None
        writer_class = _summary_writer_class(required=True) if tensorboard is True else None
        if not enabled:
            return
        if tensorboard == "auto":
            writer_class = _summary_writer_class(required=False)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            path = self.run_dir / "metrics.jsonl"
            torn = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- lives as long as the logger
            if torn:
                self._file.write("\n")
        if writer_class is not None:
            purge_step = None if resume_step is None else resume_step + 1
            self._writer = writer_class(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)

    @property
    def tensorboard_enabled(self) -> bool:
        return self._writer is not None

    def write(self, record: dict) -> None:
        if "step" not in record:
            raise ValueError(f"a metrics record needs a 'step', got keys {sorted(record)}")
        record = {key: _plain(value) for key, value in record.items()}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and _is_number(value):
                    group = "eval" if key in EVAL_KEYS or key.startswith("eval_") else "train"
                    self._writer.add_scalar(f"{group}/{key}", value, global_step=step)
            self._writer.flush()  # log steps are seconds apart: keep TensorBoard current and crash-safe

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl in file order. Lines that are not a JSON object are skipped: a crash can
    tear the line being written (and a resumed run appends after it)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and _is_number(record.get("step")):
                records.append(record)
    return records


def metric_series(records: Sequence[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} of every numeric field, steps increasing, one value per step.

    A resumed run logs again the steps after its last checkpoint, so a key's step can go back: a record at step
    s replaces everything that key had at steps >= s (the later record wins; the interrupted run's steps past
    s belong to a timeline that was abandoned). None and non-numeric values are skipped.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        step = int(record["step"])
        for key, value in record.items():
            if key == "step" or not _is_number(value):
                continue
            points = series.setdefault(key, [])
            while points and points[-1][0] >= step:
                points.pop()
            points.append((step, float(value)))
    return {key: ([s for s, _ in points], [v for _, v in points]) for key, points in series.items()}


# ---------------------------------------------------------------------------------------------------------------
# Loss-curve plot
# ---------------------------------------------------------------------------------------------------------------


def _smoothed(values: list[float], span: float) -> list[float]:
    """Centred moving average over about `span` points, the window shrinking symmetrically at the ends (so the
    first and last points are the raw ones). Centred, not exponential: a trailing average lags a falling loss
    curve and draws it above the raw points."""
    half = max(0, int(span) // 2)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
    out = []
    for i in range(len(values)):
        reach = min(half, i, len(values) - 1 - i)
        lo, hi = i - reach, i + reach + 1
        out.append(float((prefix[hi] - prefix[lo]) / (hi - lo)))
    return out


def plot_loss_curves(
    metrics_jsonl: str | os.PathLike,
    png_path: str | os.PathLike,
    *,
    required: bool = False,
    title: str | None = None,
) -> Path | None:
    """Draw training loss (raw and smoothed), eval loss and the learning rate from a metrics.jsonl to a PNG.

    Top panel: loss vs step; bottom panel: lr (when logged). Repeated steps from a resume keep their last
    record (metric_series); a torn line is skipped (read_metrics). Drawn with matplotlib's Agg canvas on a
    Figure of its own, never pyplot, so the caller's backend and open figures are untouched. The PNG is written
    to a temporary file and renamed over png_path, so a reader never sees half a file.
    Returns png_path; None when there is nothing to draw (no file, no loss) or matplotlib is missing and not
    `required` (required=True raises RuntimeError with the install command instead).
    """
    try:
        import matplotlib  # noqa: F401 -- first, so that a missing matplotlib fails here even if submodules load
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        if required:
            raise RuntimeError(
                "logging.plot=true but matplotlib is not installed: pip install matplotlib "
                "(or set logging.plot=auto / false)"
            ) from exc
        return None
    metrics_jsonl, png_path = Path(metrics_jsonl), Path(png_path)
    if not metrics_jsonl.exists():
        return None
    series = metric_series(read_metrics(metrics_jsonl))
    if "loss" not in series and "eval_loss" not in series:
        return None

    lr = series.get("lr")
    fig = Figure(figsize=(8, 6) if lr else (8, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if lr:
        ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    else:
        ax, ax_lr = fig.subplots(1, 1), None
    if "loss" in series:
        steps, values = series["loss"]
        span = min(50.0, len(values) / 10)
        raw_style = {"alpha": 0.35, "linewidth": 0.9} if span >= 2 else {"linewidth": 1.5}
        ax.plot(steps, values, color="tab:blue", label="train loss", **raw_style)
        if span >= 2:
            ax.plot(steps, _smoothed(values, span), color="tab:blue", linewidth=1.8, label="train loss (smoothed)")
    if "eval_loss" in series:
        steps, values = series["eval_loss"]
        ax.plot(steps, values, color="tab:orange", marker="o", markersize=4, linewidth=1.2, label="eval loss")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    heading = title or "loss"
    if "exact_match" in series:
        steps, values = series["exact_match"]
        heading += f" (held-out exact match {values[-1]:.1%} at step {steps[-1]})"
    ax.set_title(heading)
    if ax_lr is not None:
        ax_lr.plot(lr[0], lr[1], color="tab:green", linewidth=1.2)
        ax_lr.set_ylabel("lr")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.grid(True, alpha=0.3)
    (ax_lr if ax_lr is not None else ax).set_xlabel("step")

    png_path.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format="png")
    atomic_write_bytes(png_path, image.getvalue())
    return png_path
