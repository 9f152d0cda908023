"""Checkpoints: Hugging Face format plus the trainer's state, written atomically, the last K kept.

    <run_dir>/checkpoint-<step>/
        model.safetensors, config.json, generation_config.json   save_pretrained (or PEFT's adapter files)
        tokenizer files                                           tokenizer.save_pretrained
        trainer_state.pt      optimizer, scheduler, RNG states, data position (tensors and plain data only:
                              loaded with torch.load(weights_only=True), nothing is unpickled)
        trainer_state.json    step, epoch, step in epoch, counters (human-readable)
        fastsft.json          what the weights need to be used again: {"base_model", "seed", "lora",
                              "fastsft_version"} (`fastsft merge/generate/eval` rebuild a LoRA run's base
                              model from it; "seed" matters only for the built-in "tiny" preset)

A checkpoint is written into `.checkpoint-<step>.partial-<pid>` and renamed into place when complete, so a
run killed mid-save leaves the previous checkpoint intact and never a half-written one that `resume=auto`
would pick.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastsft._durable import publish_dir

STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
META_FILE = "fastsft.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Position:
    """Where training stands: `step` optimizer steps done; the next step is `step_in_epoch` of `epoch`."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_steps: int = 0
    tokens: int = 0  # real tokens trained on, all ranks
    supervised_tokens: int = 0  # of which carried loss
    layout: str = ""  # fingerprint of this epoch's micro-batches and step grouping (a mid-epoch resume checks it)


class ResumeError(ValueError):
    """A checkpoint cannot be resumed as asked (the message says why and what to do instead)."""


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint-<step> directory's name (-1 for any other name)."""
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else -1


def remove_stale_staging(run_dir: Path) -> None:
    """Clean up after a run killed mid-save or mid-prune: a `.checkpoint-N.retired-*` whose checkpoint-N is
    missing (killed between retiring the old copy of a step and publishing the new one) is put back; every
    other `.checkpoint-*.partial-*` / `.retired-*` / `.pruned-*` directory is half-written, superseded or
    half-deleted and is deleted. So is a visible checkpoint-N without its trainer state that is older than
    the newest complete checkpoint (a run before pruning became a rename, killed while deleting it)."""
    run_dir = Path(run_dir)
    for path in sorted(run_dir.glob(".checkpoint-*.retired-*")):
        final = run_dir / path.name[1:].split(".retired-")[0]
        if not final.exists() and (path / STATE_FILE).is_file():
            os.replace(path, final)
    for path in run_dir.glob(".checkpoint-*"):
        if any(tag in path.name for tag in (".partial-", ".retired-", ".pruned-")):
            shutil.rmtree(path, ignore_errors=True)
    complete = checkpoints(run_dir)
    newest = checkpoint_step(complete[-1]) if complete else -1
    for path in run_dir.glob("checkpoint-*"):
        if path.is_dir() and -1 < checkpoint_step(path) < newest and not (path / STATE_FILE).is_file():
            prune_checkpoint(path)


def prune_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint as atomically as it was written: one rename hides it from `checkpoints` and from
    resume, then the deletion; a kill during the deletion leaves a `.pruned-` folder the next start removes."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.pruned-{os.getpid()}")
    os.replace(checkpoint, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


@contextmanager
def _quiet_transformers():
    """No "Writing model shards" bar per checkpoint in the middle of the training's own output."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def rng_state() -> dict:
    """Every RNG the loop's results depend on, as tensors and plain data (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": [int(pos), int(has_gauss), float(cached)],
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    model,
    tokenizer,
    state: dict,
    position: Position,
    keep_last: int | None,
    meta: dict | None = None,
    *,
    model_state_dict: dict | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and delete all but the newest `keep_last` (None: keep all).

    state: the trainer state saved as trainer_state.pt ({"optimizer", "scheduler", "rng", ...}: tensors and
        plain data only); the position is added to it.
    meta: written as fastsft.json (see the module docstring).
    model_state_dict: the weights to save when `model`'s own state dict is not the whole model (FSDP shards),
        gathered beforehand. Returns the checkpoint's path."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{position.step}"
    staging = run_dir / f".checkpoint-{position.step}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with _quiet_transformers():
            if model_state_dict is not None:
                model.save_pretrained(staging, state_dict=model_state_dict, safe_serialization=True)
            else:
                model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        state = {**state, "position": asdict(position)}
        torch.save(state, staging / STATE_FILE)
        (staging / STATE_JSON).write_text(json.dumps(asdict(position), indent=1))
        if meta is not None:
            (staging / META_FILE).write_text(json.dumps(meta, indent=1))
        publish_dir(staging, final)  # the same step saved again (e.g. at the end) replaces the old copy
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Keep the newest keep_last, never the one just written (a directory holding newer checkpoints of
    # another run is refused before training, see outputs.resume_checkpoint).
    for old in checkpoints(run_dir)[:-keep_last] if keep_last else []:
        if old != final:
            prune_checkpoint(old)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def load_meta(checkpoint: Path) -> dict:
    """A checkpoint's fastsft.json ({} for a checkpoint written by something else)."""
    path = Path(checkpoint) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def first_line(error: BaseException) -> str:
    """An exception's message on one line (the CLI prints bad input as one line), "(...)" when cut."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] + (" (...)" if "\n" in text else "")


def _damaged(file: Path, error: BaseException) -> ResumeError:
    """A checkpoint file that cannot be read: named, with the way on (never torch's advice to unpickle)."""
    checkpoint = file.parent
    if isinstance(error, pickle.UnpicklingError):  # torch's message suggests weights_only=False: the unsafe path
        why = "holds objects other than tensors and plain data, which fastsft never unpickles (not written by fastsft?)"
    else:
        why = f"cannot be read ({first_line(error)}): damaged or cut short"
    earlier = [p for p in checkpoints(checkpoint.parent) if checkpoint_step(p) < checkpoint_step(checkpoint)]
    way = (
        f"resume from the previous one with checkpointing.resume={earlier[-1]}, or delete {checkpoint.name}"
        if earlier
        else f"delete {checkpoint.name} to start over"
    )
    return ResumeError(f"{file} {why}; {way}")


def load_trainer_state(checkpoint: Path) -> dict:
    """The trainer state of a checkpoint (weights_only: tensors and plain data, nothing unpickled)."""
    # mmap: every rank of a resumed run reads this file; mapped, the AdamW states are paged in as they are
    # copied into this rank's optimizer instead of each rank holding a whole copy.
    file = Path(checkpoint) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # UnpicklingError, RuntimeError (a cut zip), EOFError, ...
        raise _damaged(file, error) from None


def _read_safetensors(file: Path, load_file) -> dict:
    try:
        return load_file(file)
    except Exception as error:  # SafetensorError: invalid header length, incomplete file, ...
        raise _damaged(file, error) from None


def load_model_weights(model, checkpoint: Path) -> None:
    """Load a checkpoint's weights (safetensors) into `model` in place: full weights, or a PEFT adapter."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    adapter = checkpoint / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, _read_safetensors(adapter, load_file))
        return
    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no model*.safetensors")
    state = {}
    for file in files:
        state.update(_read_safetensors(file, load_file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied to the embeddings: not saved
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{checkpoint}: weights do not match the model (missing {missing}, unexpected {unexpected})")
