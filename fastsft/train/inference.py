"""Using a trained checkpoint: load it, chat with it, evaluate it, merge a LoRA adapter into its base.

    model, tokenizer = load_checkpoint("runs/x/checkpoint-2000")          # patched with fastsft, device auto
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "What is 23 + 41?"}])
    result = evaluate_checkpoint("runs/x/checkpoint-2000", config)       # held-out loss (+ exact match)
    merge_lora("runs/x/checkpoint-2000", "merged/")                      # plain HF model, no PEFT needed

These are what `fastsft generate | chat | eval | merge` run (fastsft/cli.py): this module holds the CLI verbs
only; models are loaded through build.py, replies come from generation.py, scores from evaluation.py.

A checkpoint is a directory holding either full weights (config.json + model*.safetensors, as written by
`fastsft train` or `merge_lora`, or any local HF model directory) or a PEFT LoRA adapter (adapter_config.json
+ adapter_model.safetensors). A LoRA checkpoint does not contain its base model: fastsft.json names it
("tiny": the built-in preset, rebuilt bit-exactly from the recorded seed; else a local HF directory), and
`base=` overrides that. Everything loads from local files only, safetensors only, without remote code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import fastsft
from fastsft._durable import publish_dir

from . import build, evaluation
from . import checkpoint as ckpt
from .build import resolve_dtype
from .generation import end_of_turn_id, generate_reply, render_prompt, stop_token_ids

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "EvalResult",
    "chat",
    "default_device",
    "end_of_turn_id",
    "evaluate_checkpoint",
    "generate_reply",
    "inspect_checkpoint",
    "load_checkpoint",
    "merge_lora",
    "render_prompt",
    "resolve_dtype",
    "run_chat_template",
    "run_config_path",
    "stop_token_ids",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: the message names the path and what to do."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory holds: `lora` True for a PEFT adapter, `meta` its fastsft.json ({} if none)."""

    path: Path
    lora: bool
    meta: dict


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Classify `path` as a full-weights or LoRA checkpoint; CheckpointError if it is neither."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (no such directory)")
    if (path / "adapter_config.json").is_file():
        if not (path / "adapter_model.safetensors").is_file():
            raise CheckpointError(f"{path}: LoRA checkpoint without adapter_model.safetensors (incomplete?)")
        return CheckpointInfo(path, True, ckpt.load_meta(path))
    if (path / "config.json").is_file() and any(path.glob("model*.safetensors")):
        return CheckpointInfo(path, False, ckpt.load_meta(path))
    hint = ""
    found = ckpt.checkpoints(path)
    if found:  # the run directory was given instead of one of its checkpoints
        hint = f"; it is a run directory, its newest checkpoint is {found[-1]}"
    raise CheckpointError(
        f"{path}: not a checkpoint directory (neither config.json with model*.safetensors nor a LoRA "
        f"adapter_config.json){hint}"
    )


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _peft(path: Path):
    try:
        import peft
    except ImportError:
        raise CheckpointError(f"{path} is a LoRA checkpoint: using it needs PEFT (pip install peft)") from None
    return peft


def _load_full(path: Path, *, trust_remote_code: bool = False):
    """AutoModelForCausalLM (fp32) + AutoTokenizer from a local HF directory, safetensors only."""
    return build.load_pretrained(path, trust_remote_code=trust_remote_code, error=CheckpointError)


def _load_base(info: CheckpointInfo, base: str | os.PathLike | None, *, trust_remote_code: bool = False):
    """The base model (fp32) and tokenizer a LoRA checkpoint was trained on: `base`, else fastsft.json's."""
    if base is None:
        base = info.meta.get("base_model")
        if base is None:
            raise CheckpointError(
                f"{info.path}: LoRA checkpoint without fastsft.json naming its base model; pass --base DIR "
                "(the model directory the adapter was trained on)"
            )
        source = f"recorded in {info.path / ckpt.META_FILE}"
    else:
        source = "given with --base"
    if os.fspath(base) == "tiny":
        # The preset's weights are a pure function of the seed: this rebuilds the exact base of the run.
        return *build.load_tiny(int(info.meta.get("seed", 0))), "tiny"
    base_dir = Path(base)
    if not base_dir.is_dir():
        raise CheckpointError(
            f"{info.path}: base model directory {os.fspath(base)!r} ({source}) does not exist; "
            "pass --base DIR to point at it"
        )
    model, tokenizer = _load_full(base_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer, os.fspath(base_dir)


def _checkpoint_tokenizer(info: CheckpointInfo, fallback, *, trust_remote_code: bool = False):
    """The tokenizer saved with a LoRA checkpoint (it carries the run's chat template), else the base's."""
    if not (info.path / "tokenizer_config.json").is_file():
        return fallback
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(info.path, local_files_only=True, trust_remote_code=trust_remote_code)


def _load_unpatched(path, *, base=None, trust_remote_code: bool = False):
    """(model in fp32 on CPU, tokenizer, info, base name or None): a LoRA checkpoint as a PeftModel."""
    info = inspect_checkpoint(path)
    if not info.lora:
        if base is not None:
            raise CheckpointError(f"{info.path}: --base applies to LoRA checkpoints only; this one holds full weights")
        model, tokenizer = _load_full(info.path, trust_remote_code=trust_remote_code)
        return model, tokenizer, info, None
    peft = _peft(info.path)
    base_model, base_tokenizer, base_name = _load_base(info, base, trust_remote_code=trust_remote_code)
    try:
        model = peft.PeftModel.from_pretrained(base_model, info.path, is_trainable=False)
    except Exception as exc:  # e.g. --base pointing at another architecture: a multi-line size mismatch
        raise CheckpointError(
            f"{info.path}: the adapter does not fit the base model {base_name!r}: {ckpt.first_line(exc)}"
        ) from exc
    tokenizer = _checkpoint_tokenizer(info, base_tokenizer, trust_remote_code=trust_remote_code)
    return model, tokenizer, info, base_name


def load_checkpoint(
    path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    patch: bool = True,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) of a checkpoint, in eval mode on `device` (None: CUDA if available, else CPU).

    Full weights load with AutoModelForCausalLM; a LoRA checkpoint is its base model (`base`, else the one in
    fastsft.json) with the adapter attached (a peft.PeftModel, not merged). dtype: "auto" (bf16 on CUDA, fp32
    on CPU), "fp32", "bf16", "fp16" or a torch.dtype. patch: apply `fastsft.patch` (all kernels).
    Raises CheckpointError (a ValueError) naming the path when the checkpoint or its base cannot be used.
    """
    model, tokenizer, _, _ = _load_unpatched(path, base=base, trust_remote_code=trust_remote_code)
    device = torch.device(device) if device is not None else default_device()
    model.to(device=device, dtype=resolve_dtype(dtype, device))
    model.eval()
    if patch:
        fastsft.patch(model)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def chat(
    model,
    tokenizer,
    *,
    system: str | None = None,
    input=None,
    output=None,
    **generation,
) -> list[dict]:
    """An interactive multi-turn chat: each line read from `input` (default stdin) is a user turn, answered with
    the whole conversation so far as context. "/reset" forgets the conversation (the system prompt stays),
    "/exit" or end of input ends it. `generation`: generate_reply's keyword arguments. Returns the messages."""
    input = sys.stdin if input is None else input
    output = sys.stdout if output is None else output
    interactive = hasattr(input, "isatty") and input.isatty()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if interactive:
        print("fastsft chat: type a message; /reset clears the conversation, /exit or Ctrl-D ends.", file=output)
    while True:
        if interactive:
            print("> ", end="", file=output, flush=True)
        line = input.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=output, flush=True)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        reply = generate_reply(model, tokenizer, messages, **generation)
        messages.append({"role": "assistant", "content": reply})
        print(reply, file=output, flush=True)
    return messages


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    checkpoint: str
    eval_data: str
    loss: float | None  # mean loss per supervised token of the held-out data
    perplexity: float | None
    micro_batches: int  # how many held-out micro-batches the loss covers
    exact_match: float | None = None  # share of greedy replies equal to the reference (synthetic data only)
    exact_match_items: int = 0
    samples: list[dict] = field(default_factory=list)  # {"question", "expected", "generated"}

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"checkpoint: {self.checkpoint}", f"eval data: {self.eval_data}"]
        if self.loss is None:
            lines.append("held-out loss: n/a (no supervised tokens)")
        else:
            lines.append(
                f"held-out loss: {self.loss:.4f} per supervised token (perplexity {self.perplexity:.3f}, "
                f"{self.micro_batches} micro-batches)"
            )
        if self.exact_match is not None:
            lines.append(f"held-out exact match: {self.exact_match:.1%} of {self.exact_match_items} questions")
        for sample in self.samples:
            lines.append(f"  Q: {sample['question']!r}  expected {sample['expected']!r}  model {sample['generated']!r}")
        return "\n".join(lines)


def run_config_path(checkpoint: str | os.PathLike) -> Path | None:
    """The config.yaml of the run that wrote `checkpoint` (in its parent directory), if there is one."""
    from .config import CONFIG_FILE_NAME

    path = Path(checkpoint).parent / CONFIG_FILE_NAME
    return path if path.is_file() else None


def run_chat_template(checkpoint: str | os.PathLike) -> str | None:
    """The data.chat_template of the run that wrote `checkpoint` (None: the tokenizer's own was used, or there
    is no readable run config.yaml). Training renders with it, so generation must too."""
    from .config import ConfigError, load_config

    path = run_config_path(checkpoint)
    if path is None:
        return None
    try:
        return load_config(path).data.chat_template
    except ConfigError:
        return None  # a config this version cannot read: fall back to the tokenizer's template


def evaluate_checkpoint(checkpoint: str | os.PathLike, config, *, base=None, device=None) -> EvalResult:
    """Held-out loss of a checkpoint on `config`'s data.eval (data.eval "auto" means synthetic when data.train
    is) and, when that is the synthetic data and eval.exact_match is on, exact match of greedy replies.

    Computed as `fastsft train` does at the end of a run: the same data settings, packing.max_tokens,
    eval.max_batches (null: all), model.dtype (fp32 weights, bf16 autocast on CUDA for "auto") and kernels.
    The synthetic items are drawn from config.seed as in training, so use the run's own config.
    """
    from fastsft.data import PackedLoader

    source = config.data.eval_source
    if source is None:
        raise CheckpointError(
            f"{checkpoint}: no evaluation data: data.eval is null (or auto with a file as data.train); "
            "set data.eval=FILE or data.eval=synthetic"
        )
    device = torch.device(device) if device is not None else default_device()
    model, tokenizer, _, _ = _load_unpatched(checkpoint, base=base, trust_remote_code=config.model.trust_remote_code)
    build.patch(model, config.kernels)
    model.to(device)  # fp32 weights, as in training: the loss is the one the run reported
    model.eval()
    data = build.eval_dataset(config, tokenizer, source)
    loader = PackedLoader(data, max_tokens=config.packing.max_tokens)
    loss = evaluation.evaluate_loss(
        model, loader, device, build.autocast_dtype(config, device), config.eval.max_batches
    )
    available = len(loader.schedule(0).packing)
    result = EvalResult(
        checkpoint=os.fspath(checkpoint),
        eval_data=source,
        loss=loss,
        perplexity=math.exp(loss) if loss is not None and loss < 700 else (math.inf if loss is not None else None),
        micro_batches=available if config.eval.max_batches is None else min(config.eval.max_batches, available),
    )
    items = evaluation.exact_match_items_for(config)  # the run's items
    if items:
        result.exact_match, predictions = evaluation.exact_match(
            model, tokenizer, items, chat_template=config.data.chat_template
        )
        result.exact_match_items = len(items)
        for (messages, answer), predicted in list(zip(items, predictions, strict=True))[: config.eval.samples]:
            result.samples.append({"question": messages[-1]["content"], "expected": answer, "generated": predicted})
    return result


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


def merge_lora(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    force: bool = False,
    dtype: str | torch.dtype | None = "auto",
) -> Path:
    """Fold a LoRA checkpoint's adapter into its base weights (W + scale * B @ A, PEFT's merge_and_unload) and
    write a plain Hugging Face model directory (safetensors, config, generation config, tokenizer, fastsft.json)
    that AutoModelForCausalLM loads without PEFT. Returns output_dir.

    base: the base model directory (default: fastsft.json's base_model). The merge runs in fp32; dtype "auto"
    saves in the base's own dtype (its config.json's, fp32 for the tiny preset), else "fp32"/"bf16"/"fp16".
    An existing non-empty output_dir is refused unless force=True (then replaced). Written into a temporary
    sibling directory and renamed into place, so an interrupted merge never leaves a half-written model.
    """
    info = inspect_checkpoint(checkpoint)
    if not info.lora:
        raise CheckpointError(
            f"{info.path}: holds full weights, not a LoRA adapter: there is nothing to merge (it already loads "
            "with AutoModelForCausalLM.from_pretrained)"
        )
    output_dir = Path(output_dir)
    out, source = output_dir.resolve(), info.path.resolve()
    if out == source or out in source.parents or source in out.parents:
        raise CheckpointError(
            f"{output_dir}: the output directory must not be, contain or lie inside the checkpoint {info.path} "
            "(replacing it would delete what is being merged)"
        )
    if output_dir.exists():
        if not output_dir.is_dir():
            raise CheckpointError(f"{output_dir}: exists and is not a directory")
        if any(output_dir.iterdir()) and not force:
            raise CheckpointError(f"{output_dir}: exists and is not empty; pass --force to replace it")

    model, tokenizer, info, base_name = _load_unpatched(info.path, base=base)
    saved_dtype = _stored_dtype(base_name) if dtype in (None, "auto") else resolve_dtype(dtype, None)
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of writing them
    merged.to(saved_dtype)
    template = run_chat_template(info.path)
    if template is not None:  # the run trained with its own template: ship it with the merged model
        tokenizer.chat_template = template

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        meta = {
            "base_model": base_name,
            "seed": info.meta.get("seed"),
            "lora": False,
            "merged_from": os.fspath(info.path),
            "fastsft_version": fastsft.__version__,
        }
        (staging / ckpt.META_FILE).write_text(json.dumps(meta, indent=1))
        publish_dir(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _stored_dtype(base_name: str) -> torch.dtype:
    """The dtype a base model is stored in: its config.json's "dtype" ("torch_dtype" before transformers 5),
    fp32 for the tiny preset or when it says nothing. Read from the file: the loaded model is fp32 by now."""
    if base_name == "tiny":
        return torch.float32
    try:
        config = json.loads((Path(base_name) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    value = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, value, None) if isinstance(value, str) else None
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32
