"""Everything a run is built from, read off a TrainConfig: the model (tiny preset or a local HF directory, LoRA,
fastsft.patch), its tokenizer, the datasets, the optimizer and the LR schedule, and the precision.

The lowest floor of train/ that knows the config (ARCHITECTURE.md, "Layers"): loop.py, evaluation.py and
inference.py build through here, so `fastsft train`, `fastsft eval` and `fastsft generate` load models, read
data and choose dtypes one way.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch

import fastsft
from fastsft.data import prepare_dataset
from fastsft.patch import UnsupportedModelError

from .checkpoint import first_line
from .config import ConfigError, KernelsConfig, TrainConfig

# Sizes of the built-in synthetic data (the default job); eval uses the held-out split.
SYNTHETIC_TRAIN_RECORDS = 8000
SYNTHETIC_EVAL_RECORDS = 300

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None) -> torch.dtype:
    """The dtype `dtype` names: "auto" or None is bf16 on a CUDA device that supports it, else fp32;
    "fp32", "bf16", "fp16" or a torch.dtype as given. Training computes in it (model.dtype, under autocast over
    fp32 master weights); inference stores the weights in it (no master weights needed)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cuda = device is not None and device.type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward/backward (None: plain fp32, no autocast)."""
    compute = resolve_dtype(config.model.dtype, device)
    return None if compute == torch.float32 else compute


# --------------------------------------------------------------------------------------------------
# Model and tokenizer
# --------------------------------------------------------------------------------------------------


def load_pretrained(
    path: Path, *, trust_remote_code: bool = False, meta: bool = False, error=ConfigError, label: str | None = None
):
    """(AutoModelForCausalLM in fp32, AutoTokenizer) from a local HF directory, safetensors only.

    meta: the architecture alone, no weights read or initialised. Any failure (OSError, a size mismatch, a
    truncated safetensors file, a tokenizer it cannot build...) is raised as `error` in one line that starts
    with `label` (default: the path)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    label = str(path) if label is None else label
    options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
        if meta:
            model_config = AutoConfig.from_pretrained(path, **options)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    model_config, trust_remote_code=trust_remote_code, dtype=torch.float32
                )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32, **options)
    except Exception as exc:
        raise error(f"{label}: cannot be loaded as a Hugging Face causal LM: {first_line(exc)}") from exc
    return model, tokenizer


def load_tiny(seed: int, *, meta: bool = False):
    """(the built-in tiny preset, its tokenizer): the weights are a pure function of `seed`."""
    from .tiny import tiny_model, tiny_tokenizer

    with torch.device("meta") if meta else nullcontext():
        return tiny_model(seed=seed), tiny_tokenizer()


def load_model_and_tokenizer(config: TrainConfig, *, device: str | None = None):
    """The model (fp32 master weights) and its tokenizer: the built-in tiny preset or a local HF directory.

    device="meta": the architecture only, no weights read or initialised (FSDP's sharded initialisation:
    the weights then come from rank 0, see Distributed.materialize)."""
    meta = device == "meta"
    given = config.model.name_or_path
    if given == "tiny":
        return load_tiny(config.seed, meta=meta)
    path = Path(given)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model.name_or_path={given!r} is neither 'tiny' nor a local model directory "
            "(fastsft loads local Hugging Face checkpoints: download one first, e.g. "
            "`hf download <repo> --local-dir DIR`)"
        )
    check_model_dir(path, given)
    return load_pretrained(
        path, trust_remote_code=config.model.trust_remote_code, meta=meta, label=f"model.name_or_path={path}"
    )


def check_model_dir(path: Path, given: str) -> None:
    """A local model directory holds config.json and safetensors weights; say which is missing, in one line,
    before transformers tries (and talks of sentencepiece or tiktoken for an empty folder)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path={given!r}: no Hugging Face model here (no config.json)")
    if not any(path.glob("model*.safetensors")):
        pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
        if pickled:
            raise FileNotFoundError(
                f"model.name_or_path={given!r} holds only {pickled[0]} weights: fastsft loads safetensors only "
                "(a pickle can run code); save the model again with save_pretrained(DIR) (safetensors by default)"
            )
        raise FileNotFoundError(f"model.name_or_path={given!r}: no model*.safetensors weights in this directory")


def apply_lora(model, config: TrainConfig):
    """`model` with PEFT LoRA adapters on lora.target_modules (unchanged when lora.enabled is false)."""
    if not config.lora.enabled:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise RuntimeError("lora.enabled=true needs PEFT: pip install peft") from exc
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    wanted = set(config.lora.target_modules)
    names = [name for name, _ in model.named_modules()]
    if not any(name == key or name.endswith(f".{key}") for name in names for key in wanted):  # PEFT's rule
        # PEFT would raise its own traceback; say what this model's linear layers are called instead.
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"lora.target_modules={sorted(wanted)} matches no module of this model; its linear layers are named: "
            f"{', '.join(linear)}"
        )
    return get_peft_model(model, lora)


def patch(model, kernels: KernelsConfig):
    """fastsft.patch with the config's kernels.* choices (training and `fastsft eval` patch alike)."""
    return fastsft.patch(
        model,
        rms_norm=kernels.rms_norm,
        rope=kernels.rope,
        swiglu=kernels.swiglu,
        attention=kernels.attention,
        cross_entropy=kernels.cross_entropy,
    )


def build_model(config: TrainConfig, *, device: str | None = None):
    """(patched model in fp32 on the CPU, or weightless on device="meta"; tokenizer): the preset or local
    model, LoRA adapters, fastsft.patch."""
    model, tokenizer = load_model_and_tokenizer(config, device=device)
    with torch.device("meta") if device == "meta" else nullcontext():
        model = apply_lora(model, config)
    patch(model, config.kernels)
    refusal = model.fastsft_report.packing
    if refusal:  # fastsft train packs several documents per row: say so before any data is read
        raise UnsupportedModelError(
            f"model.name_or_path={config.model.name_or_path}: fastsft train packs several documents into each row, "
            f"but {refusal} (see fastsft.patch(model).fastsft_report)"
        )
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def data_settings(config: TrainConfig) -> dict:
    """prepare_dataset's keyword arguments from config.data (the same for training, eval and `fastsft eval`)."""
    data = config.data
    return {
        "max_seq_len": data.max_seq_len,
        "format": data.format,
        "chat_template": data.chat_template,
        "train_on_inputs": data.train_on_inputs,
        "assistant_turns": data.assistant_turns,
        "truncation": data.truncation,
        "on_bad_record": data.on_bad_record,
        "cache_dir": data.cache_dir,
    }


def data_source(config: TrainConfig, name: str, split: str):
    """What prepare_dataset (or, for preference objectives, prepare_preference_dataset) reads for data.train /
    data.eval `name`: a path, or the built-in synthetic records (split "train" or "heldout"): instruction
    dialogues, or preference pairs (the correct answer chosen, a near miss rejected)."""
    if name != "synthetic":
        return name
    from .synthetic import synthetic_preference_records, synthetic_records

    count = SYNTHETIC_TRAIN_RECORDS if split == "train" else SYNTHETIC_EVAL_RECORDS
    make = synthetic_preference_records if config.is_preference else synthetic_records
    return make(count, seed=config.seed, split=split)


def preference_data_settings(config: TrainConfig) -> dict:
    """prepare_preference_dataset's keyword arguments from config.data."""
    data = config.data
    return {
        "max_seq_len": data.max_seq_len,
        "chat_template": data.chat_template,
        "truncation": data.truncation,
        "on_bad_record": data.on_bad_record,
        "cache_dir": data.cache_dir,
    }


def _prepare(config: TrainConfig, tokenizer, source):
    if config.is_preference:
        from fastsft.data import prepare_preference_dataset

        return prepare_preference_dataset(source, tokenizer, **preference_data_settings(config))
    return prepare_dataset(source, tokenizer, **data_settings(config))


def eval_dataset(config: TrainConfig, tokenizer, source: str):
    """The held-out TokenizedDataset of data.eval `source`, exactly as training prepares it."""
    return _prepare(config, tokenizer, data_source(config, source, "heldout"))


def datasets(config: TrainConfig, tokenizer):
    """(train TokenizedDataset, eval TokenizedDataset or None); preference objectives: PreferenceDatasets."""
    train = _prepare(config, tokenizer, data_source(config, config.data.train, "train"))
    source = config.data.eval_source
    return train, (eval_dataset(config, tokenizer, source) if source is not None else None)


# --------------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------------


def optimizer(model, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices only (norm weights and biases, 1-D, are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = config.optimizer.fused
    if fused == "auto":
        fused = device.type == "cuda"
    # initial_lr (the schedule's base) from the start: a checkpoint's groups carry it, and FSDP's optimizer
    # state loading expects every saved key in the groups it loads into.
    lr = config.optimizer.lr
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.optimizer.weight_decay, "initial_lr": lr},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "fastsft_decay": False, "initial_lr": lr},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=lr,
        betas=tuple(config.optimizer.betas),
        eps=config.optimizer.eps,
        fused=bool(fused),
    )


def schedule(optimizer, config: TrainConfig, total_steps: int, *, start_step: int = 0):
    """The LR schedule (warmup, then constant / cosine / linear decay to min_lr_ratio) as a LambdaLR, standing
    at `start_step` (a resumed run: the schedule is a pure function of the step, so nothing else of the
    checkpoint's scheduler state is needed). Sets each group's lr to optimizer.lr x factor(start_step)."""
    warmup = config.schedule.warmup_for(total_steps)
    kind, floor = config.schedule.kind, config.schedule.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * decay

    for group in optimizer.param_groups:
        group["initial_lr"] = config.optimizer.lr  # the base LambdaLR scales: the config's, not a checkpoint's
    # LambdaLR's first (implicit) step moves last_epoch from start_step - 1 to start_step.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def apply_optimizer_config(optimizer, config: TrainConfig) -> None:
    """After loading a checkpoint's optimizer state (which carries the old run's betas, eps, weight decay and
    implementation flags), put this run's back: a resumed run follows its config. (The lr comes from the
    schedule, built after this.)"""
    opt = config.optimizer
    for group in optimizer.param_groups:
        for key in ("fused", "foreach", "capturable", "differentiable", "maximize", "amsgrad"):
            if key in optimizer.defaults:  # implementation flags: this run's, not the checkpoint's
                group[key] = optimizer.defaults[key]
        group["betas"], group["eps"] = tuple(opt.betas), opt.eps
        group["weight_decay"] = opt.weight_decay if group.get("fastsft_decay", True) else 0.0
