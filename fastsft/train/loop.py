"""The lean training loop behind `fastsft train`.

One optimizer step, as DESIGN.md lays it out:

1. The step's micro-batches (packed rows, nothing padded) come from `PackedLoader`; their supervised-token
   count is summed before the first forward (one all-reduce when distributed), on device.
2. Each micro-batch's loss is a SUM over its supervised tokens divided by that step-wide count
   (`num_items_in_batch`), so gradient accumulation and rank count do not change the gradients.
3. Backward through fastsft's ops, clip, a NaN/inf guard (a non-finite global gradient norm skips the step
   and is counted; too many in a row stop the run with a clear message), AdamW, the LR schedule. The guard
   reads the grad norm on the host: one small sync per step (losses are read only on log steps).
4. Metrics every `logging.every_steps` (loss, lr, grad norm, real and supervised tokens/s, MFU, peak memory)
   to the progress bar, `metrics.jsonl` and TensorBoard (metrics.py); eval (held-out loss, exact match) every
   `eval.every_steps`; atomic checkpoints every `checkpointing.every_steps` and at the end; a loss-curve PNG.

Several processes (torchrun): FSDP2 or DDP, see distributed.py; rank 0 tokenizes first and alone writes.

Precision: with dtype "bf16" the weights and AdamW states stay fp32 (master weights) and forward/backward
run under bf16 autocast; "fp32" is fp32 throughout ("auto": bf16 on a CUDA device that supports it).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import fastsft
from fastsft.data import PackedLoader, prepare_dataset

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .distributed import Distributed, clip_grad_norm, fingerprint
from .metrics import FlopCounter, MetricsLogger, model_flops_utilization, peak_flops, plot_loss_curves

# Sizes of the built-in synthetic data (the default job); eval uses the held-out split.
SYNTHETIC_TRAIN_RECORDS = 8000
SYNTHETIC_EVAL_RECORDS = 300
EXACT_MATCH_ITEMS = 300


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None = None
    exact_match_before: float | None = None
    exact_match_after: float | None = None
    skipped_steps: int = 0
    losses: list[float] = field(default_factory=list)  # every step's loss, from step losses_first_step on
    losses_first_step: int = 1  # 1: the whole run (a resume carries the earlier steps' losses in its checkpoint)
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, generated)
    plot: Path | None = None  # the loss-curve PNG


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------


def _compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.model.dtype == "fp32":
        return torch.float32
    if config.model.dtype == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def _run_dir(config: TrainConfig) -> Path:
    if config.output_dir:
        return Path(config.output_dir)
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _check_run_dir(run_dir: Path) -> None:
    """output_dir must be (or become) a directory: a file there, or on the way to it, is bad input said in one
    line before any work, not a traceback from mkdir."""
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == run_dir else f"lies inside {path}, which is a file"
            raise ConfigError(f"output_dir {run_dir} {where}: give a directory (new or existing)")
        if path.exists():
            return


def load_model_and_tokenizer(config: TrainConfig, *, device: str | None = None):
    """The model (fp32 master weights) and its tokenizer: the built-in tiny preset or a local HF directory.

    device="meta": the architecture only, no weights read or initialised (FSDP's sharded initialisation:
    the weights then come from rank 0, see Distributed.materialize)."""
    meta = device == "meta"
    if config.model.name_or_path == "tiny":
        from .tiny import tiny_model, tiny_tokenizer

        with torch.device("meta") if meta else nullcontext():
            return tiny_model(seed=config.seed), tiny_tokenizer()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(config.model.name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model.name_or_path={config.model.name_or_path!r} is neither 'tiny' nor a local model directory "
            "(fastsft loads local Hugging Face checkpoints: download one first, e.g. "
            "`hf download <repo> --local-dir DIR`)"
        )
    _check_model_dir(path, config.model.name_or_path)
    trust = config.model.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
        if meta:
            model_config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust, dtype=torch.float32)
            return model, tokenizer
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust, dtype=torch.float32, use_safetensors=True
        )
    except Exception as exc:  # OSError, ValueError, a truncated safetensors file, a tokenizer it cannot build...
        reason = ckpt.first_line(exc)
        raise ConfigError(f"model.name_or_path={path}: cannot be loaded as a Hugging Face causal LM: {reason}") from exc
    return model, tokenizer


def _check_model_dir(path: Path, given: str) -> None:
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


def _apply_lora(model, config: TrainConfig):
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


def data_settings(config: TrainConfig) -> dict:
    """prepare_dataset's keyword arguments from config.data (the same for training, eval and `fastsft eval`)."""
    data = config.data
    return dict(max_seq_len=data.max_seq_len, format=data.format, chat_template=data.chat_template,
                train_on_inputs=data.train_on_inputs, assistant_turns=data.assistant_turns,
                truncation=data.truncation, on_bad_record=data.on_bad_record, cache_dir=data.cache_dir)  # fmt: skip


def data_source(config: TrainConfig, name: str, split: str):
    """What prepare_dataset reads for data.train / data.eval `name`: a path, or the built-in synthetic records
    (split "train" or "heldout")."""
    if name != "synthetic":
        return name
    from .synthetic import synthetic_records

    count = SYNTHETIC_TRAIN_RECORDS if split == "train" else SYNTHETIC_EVAL_RECORDS
    return synthetic_records(count, seed=config.seed, split=split)


def _datasets(config: TrainConfig, tokenizer):
    """(train TokenizedDataset, eval TokenizedDataset or None)."""
    settings = data_settings(config)
    train = prepare_dataset(data_source(config, config.data.train, "train"), tokenizer, **settings)
    eval_source = config.data.eval_source
    evaluation = None
    if eval_source is not None:
        evaluation = prepare_dataset(data_source(config, eval_source, "heldout"), tokenizer, **settings)
    return train, evaluation


def _schedule(optimizer, config: TrainConfig, total_steps: int):
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

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimizer(model, config: TrainConfig, device: torch.device):
    """AdamW; weight decay on the matrices only (norm weights and biases, 1-D, are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = config.optimizer.fused
    if fused == "auto":
        fused = device.type == "cuda"
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.optimizer.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "fastsft_decay": False},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=config.optimizer.lr,
        betas=tuple(config.optimizer.betas),
        eps=config.optimizer.eps,
        fused=bool(fused),
    )


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def _forward_backward(model, step_batches, device, autocast_dtype, dist: Distributed | None = None):
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
        context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with dist.accumulation_context(model, last_micro_batch=index == len(step_batches) - 1):
            with context:
                # labels too: an unpatched loss (kernels.cross_entropy=false) runs only when labels is set; it
                # then uses the already shifted shift_labels, as fastsft's does.
                out = model(**mb.model_inputs(), cu_seq_lens_q=mb.cu_seqlens, max_length_q=mb.max_seqlen,
                            labels=mb.labels, shift_labels=mb.labels, num_items_in_batch=num_items)  # fmt: skip
            (out.loss * dist.world_size if dist.world_size > 1 else out.loss).backward()
        total_loss += out.loss.detach()
        tokens += mb.num_tokens
    return total_loss, tokens, local_supervised


@torch.no_grad()
def evaluate_loss(model, loader: PackedLoader, device, autocast_dtype, max_batches: int | None,
                  dist: Distributed | None = None) -> float | None:  # fmt: skip
    """Mean loss per supervised token over the first `max_batches` micro-batches of `loader`'s epoch-0 packing
    (None: all of them).

    The micro-batches are the packing's whatever the number of ranks: rank r evaluates every world_size-th
    one and the sums are all-reduced, so the result does not depend on the world size (and equals `fastsft
    eval`'s). FSDP needs every rank to run the same number of forwards: a rank short of one runs a repeat
    whose loss is discarded."""
    from fastsft.data import build_micro_batch

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
        context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with context:
            out = model(**mb.model_inputs(), cu_seq_lens_q=mb.cu_seqlens, max_length_q=mb.max_seqlen,
                        labels=mb.labels, shift_labels=mb.labels, num_items_in_batch=1)  # fmt: skip
        if keep:
            sums[0] += out.loss.double()
            sums[1] += mb.num_supervised
    model.train(was_training)
    total, supervised = dist.all_reduce_sum(sums).tolist()
    return total / supervised if supervised else None


@torch.no_grad()
def exact_match(model, tokenizer, items, device, max_new_tokens: int = 12,
                chat_template: str | None = None) -> tuple[float, list[str]]:  # fmt: skip
    """Greedy answers to held-out items [(messages, answer)] and their exact-match score. Prompts are rendered
    with the template training used (`chat_template`: the run's data.chat_template, else the tokenizer's,
    else ChatML) and every end-of-reply token stops generation."""
    from .inference import render_prompt, stop_token_ids
    from .synthetic import score_exact_match

    was_training = model.training
    model.eval()
    predictions = []
    for messages, _ in items:
        prompt = render_prompt(tokenizer, messages, chat_template)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_token_ids(model, tokenizer, prompt, chat_template),
                             pad_token_id=pad)  # fmt: skip
        predictions.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    model.train(was_training)
    return score_exact_match(predictions, [answer for _, answer in items]), predictions


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or not sys.stderr.isatty():  # a log file gets metrics lines, not carriage-return bars
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)


def train(config: TrainConfig, *, log=print) -> TrainResult:
    """Run `config` to the end; returns what happened (the run directory holds the rest).

    Under torchrun every process calls this; rank 0 alone logs, writes metrics and checkpoints, and measures
    exact match (the returned TrainResult is complete on rank 0)."""
    dist = Distributed.from_env(config.distributed.strategy, config.distributed.timeout_minutes)
    try:
        return _train(config, dist, log if dist.is_main else (lambda *_args, **_kwargs: None))
    finally:
        dist.close()


def _build_model(config: TrainConfig, *, device: str | None = None):
    """(patched model in fp32 on the CPU, or weightless on device="meta"; tokenizer): the preset or local
    model, LoRA adapters, fastsft.patch."""
    model, tokenizer = load_model_and_tokenizer(config, device=device)
    with torch.device("meta") if device == "meta" else nullcontext():
        model = _apply_lora(model, config)
    kernels = config.kernels
    fastsft.patch(model, rms_norm=kernels.rms_norm, rope=kernels.rope, swiglu=kernels.swiglu,
                  attention=kernels.attention, cross_entropy=kernels.cross_entropy)  # fmt: skip
    return model, tokenizer


def _train(config: TrainConfig, dist: Distributed, log) -> TrainResult:
    torch.manual_seed(config.seed)  # the same on every rank: FSDP shards identical copies of the initial weights
    device = dist.device
    compute_dtype = _compute_dtype(config, device)
    autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
    if config.logging.plot is True and config.logging.jsonl:
        _require_matplotlib()  # now, not after hours of training
    run_dir = Path(dist.all_gather_object(str(_run_dir(config)))[0])  # rank 0's timestamp names the run
    _check_run_dir(run_dir)
    resume_from = _resume_checkpoint(config, run_dir)  # every rank: a bad resume setting fails everywhere alike
    dist.check_same("the checkpoint to resume from (is output_dir on a filesystem every rank sees?)", str(resume_from))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_staging(run_dir)  # left by a run killed mid-save
        _record_config(config, run_dir, resume_from)

    # FSDP: only rank 0 holds the whole model's weights (on the CPU); every rank shards a weightless copy and
    # receives its shards from rank 0, so CPU memory holds one model, not one per process.
    sharded_init = dist.enabled and dist.strategy == "fsdp"
    weights = None  # the model whose weights training starts from: every rank's own, or rank 0's alone
    if dist.is_main or not sharded_init:
        weights, tokenizer = _build_model(config)
    model = weights
    if sharded_init:
        model, skeleton_tokenizer = _build_model(config, device="meta")
        tokenizer = tokenizer if weights is not None else skeleton_tokenizer
    if config.model.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    with dist.main_first():  # rank 0 tokenizes and publishes the cache; the others then map it
        train_data, eval_data = _datasets(config, tokenizer)
    # Checkpoints carry the template training rendered with (data.chat_template, the tokenizer's, or the
    # ChatML fallback), so generation with them (fastsft generate, vLLM, HF pipelines) prompts the same way.
    from fastsft.data.templates import resolve_chat_template

    tokenizer.chat_template = resolve_chat_template(tokenizer, config.data.chat_template)
    data_fingerprint = fingerprint(train_data.tokens, train_data.trained, train_data.offsets)
    dist.check_same("the tokenized training data", data_fingerprint)
    log(f"data: {train_data.report.summary()}")
    grad_accum = config.distributed.grad_accum
    loader = PackedLoader(train_data, max_tokens=config.packing.max_tokens, seed=config.packing.seed,
                          world_size=dist.world_size, rank=dist.rank, grad_accum=grad_accum)  # fmt: skip
    # Eval: the whole held-out packing, the same whatever the number of ranks (evaluate_loss deals it).
    eval_loader = PackedLoader(eval_data, max_tokens=config.packing.max_tokens) if eval_data is not None else None
    steps_per_epoch = loader.num_steps(0)

    def layout(epoch: int) -> str:
        """What a mid-epoch position means: this epoch's micro-batches and their grouping into steps."""
        packing = loader.schedule(epoch).packing
        header = np.asarray([epoch, dist.world_size * grad_accum], dtype=np.int64)
        data = np.frombuffer(data_fingerprint.encode(), dtype=np.uint8)
        bins = [np.ascontiguousarray(packing.bin_offsets), np.ascontiguousarray(packing.doc_ids)]
        return fingerprint(header, data, *bins)

    position = ckpt.Position()
    state = None
    if resume_from is not None:
        if weights is not None:
            ckpt.load_model_weights(weights, resume_from)  # into the whole model, before it is sharded
        state = ckpt.load_trainer_state(resume_from)
        position = ckpt.Position(**state["position"])
        if position.step_in_epoch and position.layout and position.layout != layout(position.epoch):
            raise ckpt.ResumeError(
                f"{resume_from} stopped in the middle of epoch {position.epoch} (after its step "
                f"{position.step_in_epoch}), but this run packs that epoch differently (the data, "
                "packing.max_tokens, packing.seed, or the number of ranks x distributed.grad_accum changed), so the "
                "position would repeat or skip examples. Resume with the checkpoint's settings, or from a checkpoint "
                "at an epoch boundary"
            )
        log(f"resumed from {resume_from} at step {position.step}")
    total_steps = _total_steps(config, loader, position)
    ranks = f" on {dist.world_size} ranks ({dist.strategy})" if dist.enabled else ""
    efficiency = loader.efficiency(0)
    log(f"{steps_per_epoch} steps per epoch (packing efficiency {efficiency:.1%}){ranks}; {total_steps} steps")
    if resume_from is not None and position.step >= total_steps:
        log(f"{resume_from} is the end of this run ({total_steps} steps): nothing to do")
        return _finished_result(run_dir, position, state, config, dist, log)

    items = []
    result = TrainResult(run_dir, position.step, None)
    if state is not None:  # the earlier steps' losses (a checkpoint without them: this process's steps only)
        result.losses = list(state.get("losses", []))
        result.losses_first_step = int(state.get("losses_first_step", position.step + 1 if "losses" not in state
                                                 else 1))  # fmt: skip
    if config.eval.exact_match and config.data.eval_source == "synthetic":
        from .synthetic import exact_match_items

        items = exact_match_items(EXACT_MATCH_ITEMS, seed=config.seed + 1)
        if position.step == 0 and dist.is_main:  # before sharding: rank 0 generates alone
            result.exact_match_before, _ = exact_match(weights.to(device), tokenizer, items, device,
                                                       chat_template=config.data.chat_template)  # fmt: skip
            weights.cpu()
            log(f"held-out exact match before training: {result.exact_match_before:.1%}")
        dist.barrier()

    count_flops = FlopCounter.from_model(model)  # from the nn.Linear shapes, before sharding
    full_backward = not config.lora.enabled  # frozen weights get no weight gradient: 4N instead of 6N per token
    peak = peak_flops(device, compute_dtype)  # FLOP/s of one device; None on CPU / unknown GPUs: no MFU
    if sharded_init:
        model = dist.wrap(model, compute_dtype)
        dist.materialize(model, weights)  # allocate this rank's shards on the device, fill them from rank 0
    else:
        model = dist.wrap(model.to(device), compute_dtype)
    del weights
    model.train()
    optimizer = _optimizer(model, config, device)
    scheduler = _schedule(optimizer, config, total_steps)
    if state is not None:
        dist.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _apply_optimizer_config(optimizer, scheduler, config)  # the config's lr, betas, decay win over the state's
        per_rank = state.get("rng_per_rank")
        ckpt.set_rng_state(per_rank[dist.rank] if per_rank and len(per_rank) == dist.world_size else state["rng"])
        del state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # training's peak, not the set-up's

    unsynced = [0, 0]  # this rank's (tokens, supervised tokens) not yet added to position (global counts)

    def sync_counts() -> None:
        counts = dist.all_reduce_sum(torch.tensor(unsynced, dtype=torch.float64, device=device)).tolist()
        position.tokens += int(counts[0])
        position.supervised_tokens += int(counts[1])
        unsynced[:] = [0, 0]

    def save() -> Path:
        sync_counts()
        position.layout = layout(position.epoch)
        losses = list(result.losses)
        if pending_losses:  # steps since the last log step: their losses (summed over ranks) go in too
            losses += dist.all_reduce_sum(torch.stack(pending_losses).double()).tolist()
        return _save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, position, config, dist,
                                losses, result.losses_first_step)  # fmt: skip

    def evaluate() -> None:
        result.eval_loss = evaluate_loss(model, eval_loader, device, autocast_dtype, config.eval.max_batches, dist)
        metrics.write({"step": position.step, "eval_loss": result.eval_loss})
        evaluated_at[0] = position.step

    metrics = MetricsLogger(run_dir, config.logging.jsonl, config.logging.tensorboard, enabled=dist.is_main,
                            resume_step=position.step if resume_from is not None else None)  # fmt: skip
    bar = _progress(config.logging.progress_bar and dist.is_main, total_steps, position.step)
    window = {"tokens": 0, "supervised": 0, "flops": 0, "time": time.perf_counter()}
    pending_losses: list[torch.Tensor] = []
    pending_norms: list[torch.Tensor] = []
    evaluated_at = [-1]
    final_window_loss: list[float | None] = [None]
    report_every = max(config.logging.every_steps, total_steps // 20)
    next_report = [position.step + report_every]
    consecutive_skips = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        while position.step < total_steps:
            if position.step_in_epoch >= loader.num_steps(position.epoch):  # (a checkpoint of an older layout)
                position.epoch, position.step_in_epoch = position.epoch + 1, 0
            for step_batches in loader.steps(position.epoch, start_step=position.step_in_epoch):
                window["flops"] += sum(count_flops(mb.cu_seqlens.diff(), lm_head_tokens=mb.num_supervised,
                                                   full_backward=full_backward)
                                       for mb in step_batches)  # host-side lengths: no sync  # fmt: skip
                step_loss, tokens, supervised = _forward_backward(model, step_batches, device, autocast_dtype, dist)
                grad_norm = clip_grad_norm(trainable, config.optimizer.grad_clip)
                if not torch.isfinite(grad_norm):  # the same decision on every rank: the norm is global
                    optimizer.zero_grad(set_to_none=True)
                    position.skipped_steps += 1
                    consecutive_skips += 1
                    log(f"step {position.step}: non-finite gradient norm, step skipped ({position.skipped_steps})")
                    if consecutive_skips > config.nan_guard.max_skipped_steps:
                        raise FloatingPointError(
                            f"{consecutive_skips} steps in a row had non-finite gradients (limit "
                            f"nan_guard.max_skipped_steps={config.nan_guard.max_skipped_steps}); lower optimizer.lr "
                            "or check the data, then resume: the last checkpoint is intact and the config's "
                            "optimizer settings apply on resume."
                        )
                else:
                    consecutive_skips = 0
                    pending_norms.append(grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                position.step += 1
                position.step_in_epoch += 1
                if position.step_in_epoch == loader.num_steps(position.epoch):
                    # The epoch's last step: the position is the next epoch's start (so a checkpoint here is
                    # at an epoch boundary, which any layout can resume). The for loop ends by itself.
                    position.epoch, position.step_in_epoch = position.epoch + 1, 0
                unsynced[0] += tokens
                unsynced[1] += supervised
                pending_losses.append(step_loss)  # stays on the device until a log step
                window["tokens"] += tokens
                window["supervised"] += supervised
                if bar is not None:
                    bar.update(1)
                if position.step % config.logging.every_steps == 0 or position.step == total_steps:
                    # The one host sync (and, distributed, the one all-reduce) of the window's numbers.
                    counts = [float(window["tokens"]), float(window["supervised"]), float(window["flops"])]
                    summed = torch.cat([torch.stack(pending_losses).double(),
                                        torch.tensor(counts, device=device, dtype=torch.float64)])  # fmt: skip
                    summed = dist.all_reduce_sum(summed).tolist()
                    values = summed[:-3]  # each the step's loss: the ranks' shares summed
                    tokens_all, supervised_all, flops_all = summed[-3:]
                    norm = torch.stack(pending_norms).mean().item() if pending_norms else float("nan")
                    pending_losses.clear()
                    pending_norms.clear()
                    sync_counts()
                    result.losses.extend(values)
                    final_window_loss[0] = sum(values) / len(values)
                    if bar is not None:
                        bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    elapsed = time.perf_counter() - window["time"]
                    metrics.write({
                        "step": position.step,
                        "loss": sum(values) / len(values),  # the window's mean
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": norm,  # the window's mean over applied steps, before clipping
                        "tokens_per_s": tokens_all / elapsed,
                        "supervised_tokens_per_s": supervised_all / elapsed,
                        "tflops_per_s_per_device": flops_all / elapsed / dist.world_size / 1e12,
                        "mfu": model_flops_utilization(flops_all / dist.world_size, elapsed, peak),
                        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
                        if device.type == "cuda" else None,
                        "skipped_steps": position.skipped_steps,
                        "tokens_seen": position.tokens,
                    })  # fmt: skip
                    if bar is None and position.step >= next_report[0]:  # no terminal: a line per ~5% of the run
                        next_report[0] = position.step + report_every
                        log(f"step {position.step}/{total_steps}  loss {sum(values) / len(values):.4f}  "
                            f"lr {scheduler.get_last_lr()[0]:.2e}  {tokens_all / elapsed:,.0f} tokens/s")  # fmt: skip
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)  # each window reports its own peak
                    window = {"tokens": 0, "supervised": 0, "flops": 0, "time": time.perf_counter()}
                paused = time.perf_counter()  # eval and checkpoints are not training time (tokens/s, MFU)
                every_eval = config.eval.every_steps
                if eval_loader is not None and every_eval and position.step % every_eval == 0:
                    evaluate()
                every = config.checkpointing.every_steps
                if every and position.step % every == 0 and position.step < total_steps:
                    save()
                window["time"] += time.perf_counter() - paused
                if position.step >= total_steps:
                    break
    finally:
        if bar is not None:
            bar.close()
        if sys.exc_info()[0] is not None:
            metrics.close()  # flush TensorBoard on the way out of a crash (metrics.jsonl is flushed per line)

    if eval_loader is not None and evaluated_at[0] != position.step:
        evaluate()
    final = save()
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()  # AdamW's states are in the checkpoint; free them before generating
    if items and dist.is_main:
        result.exact_match_after, predictions = exact_match(
            _generation_model(config, model, final, dist, device), tokenizer, items, device,
            chat_template=config.data.chat_template,
        )  # fmt: skip
        metrics.write({"step": position.step, "exact_match": result.exact_match_after})
        for (messages, answer), predicted in list(zip(items, predictions, strict=True))[: config.eval.samples]:
            result.samples.append((messages[-1]["content"], answer, predicted))
    dist.barrier()
    metrics.close()
    if dist.is_main and config.logging.jsonl and config.logging.plot:
        result.plot = plot_loss_curves(
            run_dir / "metrics.jsonl", run_dir / "loss.png", required=config.logging.plot is True
        )
    result.steps = position.step
    result.skipped_steps = position.skipped_steps
    result.final_loss = final_window_loss[0]
    if dist.is_main:
        (run_dir / "result.json").write_text(json.dumps(_jsonable(result), indent=1))
    return result


def _total_steps(config: TrainConfig, loader: PackedLoader, position: ckpt.Position) -> int:
    """Optimizer steps of the whole run: schedule.max_steps, and/or schedule.epochs counted in this run's
    layout from where `position` stands (epochs can differ by a step as the packing changes; a resumed run
    may group micro-batches differently from the run that wrote its checkpoint)."""
    total = config.schedule.max_steps
    epochs = config.schedule.epochs
    if epochs is not None:
        whole, fraction = int(math.floor(epochs)), epochs - math.floor(epochs)
        by_epochs = position.step
        for epoch in range(position.epoch, whole + (1 if fraction > 0 else 0)):
            steps = loader.num_steps(epoch)
            end = steps if epoch < whole else math.ceil(fraction * steps)
            by_epochs += max(0, end - (position.step_in_epoch if epoch == position.epoch else 0))
        total = by_epochs if total is None else min(total, by_epochs)
    return total


def _finished_result(run_dir: Path, position: ckpt.Position, state: dict, config: TrainConfig, dist: Distributed,
                     log) -> TrainResult:  # fmt: skip
    """A resumed run with nothing left to train: what the run recorded. A run killed after its final checkpoint
    but before its last outputs is completed here: keep_last's pruning, result.json (from the checkpoint's
    losses and metrics.jsonl's evaluations) and loss.png; nothing that exists is rewritten."""
    result = TrainResult(run_dir, position.step, None, skipped_steps=position.skipped_steps)
    recorded = run_dir / "result.json"
    if recorded.is_file():
        data = json.loads(recorded.read_text())
        for key in ("final_loss", "eval_loss", "exact_match_before", "exact_match_after", "losses",
                    "losses_first_step"):  # fmt: skip
            setattr(result, key, data.get(key, getattr(result, key)))
        result.samples = [tuple(sample) for sample in data.get("samples", [])]
        return result
    if not dist.is_main:
        return result
    keep = config.checkpointing.keep_last
    for old in ckpt.checkpoints(run_dir)[:-keep] if keep else []:
        ckpt.prune_checkpoint(old)
    result.losses = list(state.get("losses", []))
    result.losses_first_step = int(state.get("losses_first_step", 1))
    for record in _metric_records(run_dir / "metrics.jsonl"):
        for key, attribute in (("loss", "final_loss"), ("eval_loss", "eval_loss"),
                               ("exact_match", "exact_match_after")):  # fmt: skip
            if key in record:
                setattr(result, attribute, record[key])
    if config.logging.jsonl and config.logging.plot and not (run_dir / "loss.png").is_file():
        result.plot = plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss.png",
                                       required=config.logging.plot is True)  # fmt: skip
    recorded.write_text(json.dumps(_jsonable(result), indent=1))
    log(f"completed the run's outputs: {recorded.name}" + (f", {result.plot.name}" if result.plot else ""))
    return result


def _metric_records(path: Path) -> list[dict]:
    """metrics.jsonl's records (a line cut by a kill is left out)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _record_config(config: TrainConfig, run_dir: Path, resume_from: Path | None) -> None:
    """config.yaml: written when new or changed; a resumed run with other settings keeps the earlier file as
    config-before-step-<N>.yaml, so the record of what trained the first N steps is not lost."""
    path = run_dir / "config.yaml"
    if path.is_file():
        if path.read_text().endswith(config.to_yaml()):  # the same settings (below the comment header)
            return
        step = ckpt.checkpoint_step(resume_from) if resume_from is not None else 0
        path.replace(run_dir / f"config-before-step-{max(step, 0)}.yaml")
    config.dump(run_dir)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("logging.plot=true needs matplotlib: pip install matplotlib (or logging.plot=auto)") from exc


def _apply_optimizer_config(optimizer, scheduler, config: TrainConfig) -> None:
    """After loading a checkpoint's optimizer and scheduler states (which carry the old run's lr, betas, eps
    and weight decay), put the config's values back: a resumed run follows its config."""
    opt = config.optimizer
    for group in optimizer.param_groups:
        for key in ("fused", "foreach", "capturable", "differentiable", "maximize", "amsgrad"):
            if key in optimizer.defaults:  # implementation flags: this run's, not the checkpoint's
                group[key] = optimizer.defaults[key]
        group["betas"], group["eps"] = tuple(opt.betas), opt.eps
        group["weight_decay"] = opt.weight_decay if group.get("fastsft_decay", True) else 0.0
        group["initial_lr"] = opt.lr
    scheduler.base_lrs = [opt.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = opt.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, position, config, dist: Distributed,
                     losses: list[float], losses_first_step: int) -> Path:  # fmt: skip
    """Gather the whole state (collectives under fsdp; every rank calls this), rank 0 writes it atomically.
    `losses` (every step's loss so far, from `losses_first_step`) travel with it, so a resumed run's
    result.json covers the whole run."""
    model_state = dist.full_model_state(model, trainable_only=config.lora.enabled)  # LoRA: adapters alone
    state = {"optimizer": dist.optimizer_state(model, optimizer), "scheduler": scheduler.state_dict(),
             "losses": [float(x) for x in losses], "losses_first_step": int(losses_first_step)}  # fmt: skip
    rngs = dist.all_gather_object(ckpt.rng_state())
    state["rng"], state["rng_per_rank"] = rngs[0], rngs
    path = run_dir / f"checkpoint-{position.step}"
    if dist.is_main:
        path = ckpt.save_checkpoint(run_dir, dist.unwrap(model), tokenizer, state, position,
                                    config.checkpointing.keep_last, _checkpoint_meta(config),
                                    model_state_dict=model_state)  # fmt: skip
    dist.barrier()  # nobody runs ahead (or resumes) before the checkpoint is published
    return path


def _generation_model(config: TrainConfig, model, checkpoint: Path, dist: Distributed, device):
    """A model rank 0 can generate with alone: the trained one, or (FSDP: it is sharded) a copy from the
    checkpoint just written."""
    if not (dist.enabled and dist.strategy == "fsdp"):
        return dist.unwrap(model)
    copy, _ = _build_model(config)
    ckpt.load_model_weights(copy, checkpoint)
    return copy.to(device)


def _checkpoint_meta(config: TrainConfig) -> dict:
    base = config.model.name_or_path
    base = base if base == "tiny" else str(Path(base).resolve())  # usable from any working directory
    return {"base_model": base, "seed": config.seed, "lora": config.lora.enabled,
            "fastsft_version": fastsft.__version__}  # fmt: skip


def _resume_checkpoint(config: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None. Refuses what would mix two runs' checkpoints in one directory
    (keep_last would then delete the wrong ones, and resume=auto would pick the other run's)."""
    resume = config.checkpointing.resume
    found = ckpt.checkpoints(run_dir)
    if resume == "never":
        if found:
            raise ckpt.ResumeError(
                f"output_dir {run_dir} already holds checkpoints ({found[-1].name} ...) and "
                "checkpointing.resume=never: choose another output_dir, delete them, or resume=auto to continue"
            )
        return None
    if resume == "auto":
        return found[-1] if found else None
    path = Path(resume)
    if not (path / ckpt.STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpointing.resume={resume!r} is not a checkpoint directory (no {ckpt.STATE_FILE})")
    step = ckpt.checkpoint_step(path)
    newer = [p.name for p in found if ckpt.checkpoint_step(p) > step]
    if newer:
        raise ckpt.ResumeError(
            f"checkpointing.resume={resume!r} is older than the checkpoints already in output_dir {run_dir} "
            f"({', '.join(newer)}): continuing there would mix two runs. Use another output_dir, or delete them"
        )
    return path


def _jsonable(result: TrainResult) -> dict:
    data = asdict(result)
    data["run_dir"] = str(result.run_dir)
    data["plot"] = None if result.plot is None else str(result.plot)
    data["losses"] = [round(x, 6) for x in result.losses]
    return data
