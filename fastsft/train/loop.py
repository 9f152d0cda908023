"""The lean training loop behind `fastsft train`: `train(config)` reads top to bottom.

One optimizer step (step.py; ARCHITECTURE.md, "One training step"):

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

import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastsft.data import PackedLoader

from . import build, evaluation, outputs, preference
from . import checkpoint as ckpt
from . import step as steps
from .config import TrainConfig
from .distributed import Distributed, fingerprint
from .metrics import FlopCounter, MetricsLogger, model_flops_utilization, peak_flops
from .outputs import TrainResult

__all__ = ["TrainResult", "train"]


def train(config: TrainConfig, *, log=print) -> TrainResult:
    """Run `config` to the end; returns what happened (the run directory holds the rest).

    Under torchrun every process calls this; rank 0 alone logs, writes metrics and checkpoints, and measures
    exact match (the returned TrainResult is complete on rank 0)."""
    dist = Distributed.from_env(config.distributed.strategy, config.distributed.timeout_minutes)
    try:
        return _train(config, dist, log if dist.is_main else (lambda *_args, **_kwargs: None))
    finally:
        dist.close()


def _train(config: TrainConfig, dist: Distributed, log) -> TrainResult:
    torch.manual_seed(config.seed)  # the same on every rank: FSDP shards identical copies of the initial weights
    device = dist.device
    compute_dtype = build.resolve_dtype(config.model.dtype, device)
    autocast_dtype = build.autocast_dtype(config, device)
    if config.logging.plot is True and config.logging.jsonl:
        _require_matplotlib()  # now, not after hours of training

    # The run directory, and the checkpoint to resume from.
    run_dir = Path(dist.all_gather_object(str(outputs.run_dir_of(config)))[0])  # rank 0's timestamp names it
    outputs.check_run_dir(run_dir)
    resume_from = outputs.resume_checkpoint(config, run_dir)  # every rank: a bad setting fails everywhere alike
    dist.check_same("the checkpoint to resume from (is output_dir on a filesystem every rank sees?)", str(resume_from))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_staging(run_dir)  # left by a run killed mid-save
        outputs.record_config(config, run_dir, resume_from)

    # The model. FSDP: only rank 0 holds the whole model's weights (on the CPU); every rank shards a weightless
    # copy and receives its shards from rank 0, so CPU memory holds one model, not one per process.
    sharded_init = dist.enabled and dist.strategy == "fsdp"
    weights, model, tokenizer = _models(config, dist, sharded_init)

    # The data: rank 0 tokenizes and publishes the cache, the others then map it.
    with dist.main_first():
        train_data, eval_data = build.datasets(config, tokenizer)
    # Checkpoints carry the template training rendered with (data.chat_template, the tokenizer's, or the
    # ChatML fallback), so generation with them (fastsft generate, vLLM, HF pipelines) prompts the same way.
    from fastsft.data.templates import resolve_chat_template

    tokenizer.chat_template = resolve_chat_template(tokenizer, config.data.chat_template)
    data_fingerprint = fingerprint(train_data.tokens, train_data.trained, train_data.offsets)
    dist.check_same("the tokenized training data", data_fingerprint)
    log(f"data: {train_data.report.summary()}")
    grad_accum = config.distributed.grad_accum
    group = 2 if config.is_preference else 1  # preference pairs: a pair's two sequences in one micro-batch
    loader = PackedLoader(
        train_data,
        max_tokens=config.packing.max_tokens,
        seed=config.packing.seed,
        world_size=dist.world_size,
        rank=dist.rank,
        grad_accum=grad_accum,
        group=group,
    )
    # Eval: the whole held-out packing, the same whatever the number of ranks (evaluate_loss deals it).
    eval_loader = (
        PackedLoader(eval_data, max_tokens=config.packing.max_tokens, group=group) if eval_data is not None else None
    )
    layout = functools.partial(_layout, loader, data_fingerprint, dist.world_size * grad_accum)

    # Preference objectives: the settings, and what names the reference log-probs (the initial weights).
    settings = preference.settings_of(config) if config.is_preference else None
    reference_key = None
    if settings is not None and settings.needs_reference:
        reference_key = dist.all_gather_object(preference.weights_fingerprint(weights) if weights is not None else None)
        reference_key = f"{reference_key[0]}-{data_fingerprint}"

    # Where the run stands.
    position, state = ckpt.Position(), None
    if resume_from is not None:
        if weights is not None:
            ckpt.load_model_weights(weights, resume_from)  # into the whole model, before it is sharded
        state = ckpt.load_trainer_state(resume_from)
        position = ckpt.Position(**state["position"])
        _check_layout(resume_from, position, layout)
        log(f"resumed from {resume_from} at step {position.step}")
    total_steps = _total_steps(config, loader, position)
    ranks = f" on {dist.world_size} ranks ({dist.strategy})" if dist.enabled else ""
    log(
        f"{loader.num_steps(0)} steps per epoch (packing efficiency {loader.efficiency(0):.1%}){ranks}; "
        f"{total_steps} steps"
    )
    if resume_from is not None and position.step >= total_steps:
        log(f"{resume_from} is the end of this run ({total_steps} steps): nothing to do")
        return outputs.finished_result(run_dir, position, state, config, dist, log)

    result = TrainResult(run_dir, position.step, None)
    if state is not None:  # the earlier steps' losses (a checkpoint without them: this process's steps only)
        result.losses = list(state.get("losses", []))
        first = position.step + 1 if "losses" not in state else 1
        result.losses_first_step = int(state.get("losses_first_step", first))
    items = evaluation.exact_match_items_for(config)
    if items and position.step == 0:
        if dist.is_main:  # before sharding: rank 0 generates alone
            result.exact_match_before, _ = evaluation.exact_match(
                weights.to(device), tokenizer, items, chat_template=config.data.chat_template
            )
            weights.cpu()
            log(f"held-out exact match before training: {result.exact_match_before:.1%}")
        dist.barrier()

    # Onto the device(s), then the optimizer and the schedule.
    # FLOPs from the nn.Linear shapes, before sharding; LoRA: frozen weights get no weight gradient, 4N not 6N.
    count_flops = functools.partial(FlopCounter.from_model(model), full_backward=not config.lora.enabled)
    if sharded_init:
        model = dist.wrap(model, compute_dtype)
        dist.materialize(model, weights)  # allocate this rank's shards on the device, fill them from rank 0
    else:
        model = dist.wrap(model.to(device), compute_dtype)
    del weights
    model.train()
    objective_step, references = None, {}
    if settings is not None:
        references = preference.references(
            model,
            settings,
            reference_key,
            {"train": train_data, "eval": eval_data},
            config,
            device,
            autocast_dtype,
            run_dir,
            resumed=resume_from is not None,
            dist=dist,
            log=log,
        )
        objective_step = preference.step_function(settings, references.get("train"))
        # FSDP: the reference pass's no-grad forwards leave the root unit unsharded; the optimizer must see the
        # sharded parameters (see Distributed.reshard).
        dist.reshard(model)
    optimizer = build.optimizer(model, config, device)
    if state is not None:
        dist.load_optimizer_state(model, optimizer, state["optimizer"])
        build.apply_optimizer_config(optimizer, config)  # the config's betas, eps, decay win over the state's
        per_rank = state.get("rng_per_rank")
        ckpt.set_rng_state(per_rank[dist.rank] if per_rank and len(per_rank) == dist.world_size else state["rng"])
        del state
    scheduler = build.schedule(optimizer, config, total_steps, start_step=position.step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # training's peak, not the set-up's

    metrics = MetricsLogger(
        run_dir,
        config.logging.jsonl,
        config.logging.tensorboard,
        enabled=dist.is_main,
        resume_step=position.step if resume_from is not None else None,
    )
    run = _Run(
        config=config,
        dist=dist,
        device=device,
        log=log,
        run_dir=run_dir,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        position=position,
        result=result,
        layout=layout,
        eval_loader=eval_loader,
        autocast_dtype=autocast_dtype,
        total_steps=total_steps,
        peak_flops=peak_flops(device, compute_dtype),
        metrics=metrics,
        preference=settings,
        references=references,
    )
    if settings is not None and eval_loader is not None and position.step == 0:
        run.evaluate(before_training=True)
        dist.reshard(model)  # no-grad forwards before the first training step: see Distributed.reshard
    guard = steps.NanGuard(config.nan_guard.max_skipped_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    bar = _progress(config.logging.progress_bar and dist.is_main, total_steps, position.step)
    try:
        while position.step < total_steps:
            if position.step_in_epoch >= loader.num_steps(position.epoch):  # (a checkpoint of an older layout)
                position.epoch, position.step_in_epoch = position.epoch + 1, 0
            for step_batches in loader.steps(position.epoch, start_step=position.step_in_epoch):
                outcome = steps.train_step(
                    model,
                    step_batches,
                    optimizer,
                    scheduler,
                    trainable=trainable,
                    grad_clip=config.optimizer.grad_clip,
                    guard=guard,
                    device=device,
                    autocast_dtype=autocast_dtype,
                    dist=dist,
                    count_flops=count_flops,
                    objective_forward_backward=objective_step,
                )
                if not outcome.applied:
                    position.skipped_steps += 1
                    log(f"step {position.step}: non-finite gradient norm, step skipped ({position.skipped_steps})")
                _advance(position, loader)
                run.window.add(outcome)  # the loss stays on the device until a log step
                if bar is not None:
                    bar.update(1)
                if position.step % config.logging.every_steps == 0 or position.step == total_steps:
                    run.log_window(bar)
                paused = time.perf_counter()  # eval and checkpoints are not training time (tokens/s, MFU)
                every_eval = config.eval.every_steps
                if eval_loader is not None and every_eval and position.step % every_eval == 0:
                    run.evaluate()
                every = config.checkpointing.every_steps
                if every and position.step % every == 0 and position.step < total_steps:
                    run.save()
                run.window.exclude(time.perf_counter() - paused)
                if position.step >= total_steps:
                    break
    finally:
        if bar is not None:
            bar.close()
        if sys.exc_info()[0] is not None:
            run.metrics.close()  # flush TensorBoard on the way out of a crash (metrics.jsonl is flushed per line)

    # The end: a last evaluation and checkpoint, exact match after training, the plot, result.json.
    if eval_loader is not None and run.evaluated_at != position.step:
        run.evaluate()
    final = run.save()
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()  # AdamW's states are in the checkpoint; free them before generating
    if items and dist.is_main:
        result.exact_match_after, predictions = evaluation.exact_match(
            _generation_model(config, model, final, dist, device),
            tokenizer,
            items,
            chat_template=config.data.chat_template,
        )
        run.metrics.write({"step": position.step, "exact_match": result.exact_match_after})
        for (messages, answer), predicted in list(zip(items, predictions, strict=True))[: config.eval.samples]:
            result.samples.append((messages[-1]["content"], answer, predicted))
    dist.barrier()
    run.metrics.close()
    if dist.is_main:
        result.plot = outputs.plot(config, run_dir)
    result.steps = position.step
    result.skipped_steps = position.skipped_steps
    if dist.is_main:
        outputs.write_result(result)
    return result


@dataclass
class _Run:
    """The state a running loop shares between its step, its log steps, its evaluations and its saves."""

    config: TrainConfig
    dist: Distributed
    device: torch.device
    log: object
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    position: ckpt.Position
    result: TrainResult
    layout: object  # epoch -> the fingerprint of that epoch's micro-batches and their grouping into steps
    eval_loader: PackedLoader | None
    autocast_dtype: torch.dtype | None
    total_steps: int
    peak_flops: float | None  # FLOP/s of one device; None on CPU / unknown GPUs: no MFU
    metrics: MetricsLogger
    preference: object = None  # PreferenceSettings of a preference objective, None for SFT
    references: dict = field(default_factory=dict)  # "train" / "eval" -> reference log-probs (DPO / IPO)
    evaluated_at: int = -1

    def __post_init__(self):
        self.window = steps.MetricsWindow()
        self.report_every = max(self.config.logging.every_steps, self.total_steps // 20)
        self.next_report = self.position.step + self.report_every

    def log_window(self, bar) -> None:
        """A log step: the window's numbers (one host sync, one all-reduce) to metrics, the bar or the log."""
        summary = self.window.reduce(self.dist, self.device)
        self.window.sync_counts(self.position, self.dist, self.device)
        self.result.losses.extend(summary.losses)
        mean_loss = sum(summary.losses) / len(summary.losses)
        self.result.final_loss = mean_loss
        lr = self.scheduler.get_last_lr()[0]
        if bar is not None:
            bar.set_postfix(loss=f"{summary.losses[-1]:.4f}", lr=f"{lr:.2e}")
        world = self.dist.world_size
        cuda = self.device.type == "cuda"
        self.metrics.write(
            {
                "step": self.position.step,
                "loss": mean_loss,  # the window's mean
                "lr": lr,
                "grad_norm": summary.grad_norm,  # the window's mean over applied steps, before clipping
                "tokens_per_s": summary.tokens / summary.seconds,
                "supervised_tokens_per_s": summary.supervised / summary.seconds,
                "tflops_per_s_per_device": summary.flops / summary.seconds / world / 1e12,
                "mfu": model_flops_utilization(summary.flops / world, summary.seconds, self.peak_flops),
                "peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None,
                "skipped_steps": self.position.skipped_steps,
                "tokens_seen": self.position.tokens,
                **preference.window_metrics(summary.extras),
            }
        )
        if bar is None and self.position.step >= self.next_report:  # no terminal: a line per ~5% of the run
            self.next_report = self.position.step + self.report_every
            self.log(
                f"step {self.position.step}/{self.total_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                f"{summary.tokens / summary.seconds:,.0f} tokens/s"
            )
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)  # each window reports its own peak

    def evaluate(self, *, before_training: bool = False) -> None:
        if self.preference is not None:
            held_out = preference.evaluate_preference(
                self.model,
                self.eval_loader,
                self.preference,
                self.references.get("eval"),
                self.device,
                self.autocast_dtype,
                self.config.eval.max_batches,
                self.dist,
            )
            held_out = held_out or {}
            if before_training:
                self.result.reward_accuracy_before = held_out.get("reward_accuracy")
                self.result.likelihood_accuracy_before = held_out.get("likelihood_accuracy")
                self.log(
                    f"held-out pairs before training: reward accuracy {held_out.get('reward_accuracy', 0.0):.1%}, "
                    f"chosen more likely than rejected {held_out.get('likelihood_accuracy', 0.0):.1%}"
                )
                return
            self.result.eval_loss = held_out.get("loss")
            self.result.reward_accuracy_after = held_out.get("reward_accuracy")
            self.result.likelihood_accuracy_after = held_out.get("likelihood_accuracy")
            extra = {f"eval_{key}": value for key, value in held_out.items() if key != "loss"}
        else:
            self.result.eval_loss = evaluation.evaluate_loss(
                self.model, self.eval_loader, self.device, self.autocast_dtype, self.config.eval.max_batches, self.dist
            )
            extra = {}
        self.metrics.write({"step": self.position.step, "eval_loss": self.result.eval_loss, **extra})
        self.evaluated_at = self.position.step

    def save(self) -> Path:
        """A checkpoint at the current position (every rank calls: collectives)."""
        self.window.sync_counts(self.position, self.dist, self.device)
        self.position.layout = self.layout(self.position.epoch)
        # Steps since the last log step: their losses (summed over ranks) go in too.
        losses = list(self.result.losses) + self.window.pending_losses(self.dist)
        return outputs.save_checkpoint(
            self.run_dir,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            self.position,
            self.config,
            self.dist,
            losses,
            self.result.losses_first_step,
        )


def _models(config: TrainConfig, dist: Distributed, sharded_init: bool):
    """(the model whose weights training starts from: every rank's own, or rank 0's alone (None elsewhere);
    the model to train: that one, or a weightless copy to shard; the tokenizer)."""
    weights = tokenizer = None
    if dist.is_main or not sharded_init:
        weights, tokenizer = build.build_model(config)
    model = weights
    if sharded_init:
        model, skeleton_tokenizer = build.build_model(config, device="meta")
        tokenizer = tokenizer if weights is not None else skeleton_tokenizer
    if config.model.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return weights, model, tokenizer


def _layout(loader: PackedLoader, data_fingerprint: str, ranks_x_accum: int, epoch: int) -> str:
    """What a mid-epoch position means: this epoch's micro-batches and their grouping into steps."""
    packing = loader.schedule(epoch).packing
    header = np.asarray([epoch, ranks_x_accum], dtype=np.int64)
    data = np.frombuffer(data_fingerprint.encode(), dtype=np.uint8)
    bins = [np.ascontiguousarray(packing.bin_offsets), np.ascontiguousarray(packing.doc_ids)]
    return fingerprint(header, data, *bins)


def _check_layout(resume_from: Path, position: ckpt.Position, layout) -> None:
    if position.step_in_epoch and position.layout and position.layout != layout(position.epoch):
        raise ckpt.ResumeError(
            f"{resume_from} stopped in the middle of epoch {position.epoch} (after its step "
            f"{position.step_in_epoch}), but this run packs that epoch differently (the data, "
            "packing.max_tokens, packing.seed, or the number of ranks x distributed.grad_accum changed), so the "
            "position would repeat or skip examples. Resume with the checkpoint's settings, or from a checkpoint "
            "at an epoch boundary"
        )


def _advance(position: ckpt.Position, loader: PackedLoader) -> None:
    position.step += 1
    position.step_in_epoch += 1
    if position.step_in_epoch == loader.num_steps(position.epoch):
        # The epoch's last step: the position is the next epoch's start (so a checkpoint here is at an epoch
        # boundary, which any layout can resume). The for loop ends by itself.
        position.epoch, position.step_in_epoch = position.epoch + 1, 0


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
            count = loader.num_steps(epoch)
            end = count if epoch < whole else math.ceil(fraction * count)
            by_epochs += max(0, end - (position.step_in_epoch if epoch == position.epoch else 0))
        total = by_epochs if total is None else min(total, by_epochs)
    return total


def _generation_model(config: TrainConfig, model, checkpoint: Path, dist: Distributed, device):
    """A model rank 0 can generate with alone: the trained one, or (FSDP: it is sharded) a copy from the
    checkpoint just written."""
    if not (dist.enabled and dist.strategy == "fsdp"):
        return dist.unwrap(model)
    copy, _ = build.build_model(config)
    ckpt.load_model_weights(copy, checkpoint)
    return copy.to(device)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or not sys.stderr.isatty():  # a log file gets metrics lines, not carriage-return bars
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("logging.plot=true needs matplotlib: pip install matplotlib (or logging.plot=auto)") from exc
