"""The run directory: where it is, what a run writes there and what a resumed run reads back.

    runs/x/config.yaml        the resolved config (record_config; an older one kept as config-before-step-N.yaml)
    runs/x/checkpoint-N/      weights, trainer state, the losses so far (save_checkpoint; checkpoint.py writes)
    runs/x/metrics.jsonl      per log step (metrics.MetricsLogger)
    runs/x/result.json        the TrainResult (write_result), loss.png (metrics.plot_loss_curves)

`resume_checkpoint` chooses the checkpoint to resume from and refuses to mix two runs; `finished_result`
answers a run that has nothing left to train, completing what a kill after its final checkpoint left out.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fastsft
from fastsft._durable import atomic_write_text

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .distributed import Distributed
from .metrics import plot_loss_curves

RESULT_FILE = "result.json"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None = None
    exact_match_before: float | None = None
    exact_match_after: float | None = None
    reward_accuracy_before: float | None = None  # preference objectives: held-out pairs whose chosen reply
    reward_accuracy_after: float | None = None  # gets the higher implicit reward
    likelihood_accuracy_before: float | None = None  # ... whose chosen reply the model finds more likely (per
    likelihood_accuracy_after: float | None = None  # token) than the rejected one
    skipped_steps: int = 0
    losses: list[float] = field(default_factory=list)  # every step's loss, from step losses_first_step on
    losses_first_step: int = 1  # 1: the whole run (a resume carries the earlier steps' losses in its checkpoint)
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, generated)
    plot: Path | None = None  # the loss-curve PNG

    def to_json(self) -> dict:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        data["plot"] = None if self.plot is None else str(self.plot)
        data["losses"] = [round(x, 6) for x in self.losses]
        return data


def write_result(result: TrainResult) -> None:
    """result.json, atomically (a kill while writing leaves no cut file)."""
    atomic_write_text(result.run_dir / RESULT_FILE, json.dumps(result.to_json(), indent=1))


def run_dir_of(config: TrainConfig) -> Path:
    """output_dir, or runs/<timestamp> when it is not set."""
    if config.output_dir:
        return Path(config.output_dir)
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def check_run_dir(run_dir: Path) -> None:
    """output_dir must be (or become) a directory: a file there, or on the way to it, is bad input said in one
    line before any work, not a traceback from mkdir."""
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == run_dir else f"lies inside {path}, which is a file"
            raise ConfigError(f"output_dir {run_dir} {where}: give a directory (new or existing)")
        if path.exists():
            return


def resume_checkpoint(config: TrainConfig, run_dir: Path) -> Path | None:
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


def record_config(config: TrainConfig, run_dir: Path, resume_from: Path | None) -> None:
    """config.yaml: written when new or changed; a resumed run with other settings keeps the earlier file as
    config-before-step-<N>.yaml, so the record of what trained the first N steps is not lost."""
    path = run_dir / "config.yaml"
    if path.is_file():
        if path.read_text().endswith(config.to_yaml()):  # the same settings (below the comment header)
            return
        step = ckpt.checkpoint_step(resume_from) if resume_from is not None else 0
        path.replace(run_dir / f"config-before-step-{max(step, 0)}.yaml")
    config.dump(run_dir)


def checkpoint_meta(config: TrainConfig) -> dict:
    """fastsft.json of the run's checkpoints: what `fastsft generate | eval | merge` need to find the base."""
    base = config.model.name_or_path
    base = base if base == "tiny" else str(Path(base).resolve())  # usable from any working directory
    return {
        "base_model": base,
        "seed": config.seed,
        "lora": config.lora.enabled,
        "fastsft_version": fastsft.__version__,
    }


def save_checkpoint(
    run_dir,
    model,
    tokenizer,
    optimizer,
    scheduler,
    position,
    config,
    dist: Distributed,
    losses: list[float],
    losses_first_step: int,
) -> Path:
    """Gather the whole state (collectives under fsdp; every rank calls this), rank 0 writes it atomically.
    `losses` (every step's loss so far, from `losses_first_step`) travel with it, so a resumed run's
    result.json covers the whole run."""
    model_state = dist.full_model_state(model, trainable_only=config.lora.enabled)  # LoRA: adapters alone
    # The scheduler's state is written for readers of the format; a resume rebuilds it from the step.
    state = {
        "optimizer": dist.optimizer_state(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "losses": [float(x) for x in losses],
        "losses_first_step": int(losses_first_step),
    }
    rngs = dist.all_gather_object(ckpt.rng_state())
    state["rng"], state["rng_per_rank"] = rngs[0], rngs
    path = run_dir / f"checkpoint-{position.step}"
    if dist.is_main:
        path = ckpt.save_checkpoint(
            run_dir,
            dist.unwrap(model),
            tokenizer,
            state,
            position,
            config.checkpointing.keep_last,
            checkpoint_meta(config),
            model_state_dict=model_state,
        )
    dist.barrier()  # nobody runs ahead (or resumes) before the checkpoint is published
    return path


def metric_records(path: Path) -> list[dict]:
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


def plot(config: TrainConfig, run_dir: Path) -> Path | None:
    """loss.png from metrics.jsonl, when logging.jsonl and logging.plot ask for it."""
    if not (config.logging.jsonl and config.logging.plot):
        return None
    return plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", required=config.logging.plot is True)


def finished_result(
    run_dir: Path, position: ckpt.Position, state: dict, config: TrainConfig, dist: Distributed, log
) -> TrainResult:
    """A resumed run with nothing left to train: what the run recorded. A run killed after its final checkpoint
    but before its last outputs is completed here: keep_last's pruning, result.json (from the checkpoint's
    losses and metrics.jsonl's evaluations) and loss.png; nothing that exists is rewritten."""
    result = TrainResult(run_dir, position.step, None, skipped_steps=position.skipped_steps)
    recorded = run_dir / RESULT_FILE
    if recorded.is_file():
        data = json.loads(recorded.read_text())
        for key in (
            "final_loss",
            "eval_loss",
            "exact_match_before",
            "exact_match_after",
            "reward_accuracy_before",
            "reward_accuracy_after",
            "likelihood_accuracy_before",
            "likelihood_accuracy_after",
            "losses",
            "losses_first_step",
        ):
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
    for record in metric_records(run_dir / "metrics.jsonl"):
        for key, attribute in (
            ("loss", "final_loss"),
            ("eval_loss", "eval_loss"),
            ("exact_match", "exact_match_after"),
            ("eval_reward_accuracy", "reward_accuracy_after"),
            ("eval_likelihood_accuracy", "likelihood_accuracy_after"),
        ):
            if key in record:
                setattr(result, attribute, record[key])
    if not (run_dir / "loss.png").is_file():
        result.plot = plot(config, run_dir)
    write_result(result)
    log(f"completed the run's outputs: {recorded.name}" + (f", {result.plot.name}" if result.plot else ""))
    return result
