"""The typed configuration of `fastsft train`: a tree of frozen dataclasses, YAML files and key=value overrides.

    from fastsft.train.config import TrainConfig, load_config

    config = TrainConfig()                                    # the built-in default job (tiny model, synthetic data)
    config = load_config("job.yaml", ["optimizer.lr=3e-4", "lora.enabled=true", "lora.target_modules=[q_proj,v_proj]"])
    print(format_config(config))                              # what the run will use, changes marked
    config.dump(run_dir)                                      # <run_dir>/config.yaml: the job, re-runnable

Precedence: dataclass defaults < the YAML file < the overrides (later overrides win over earlier ones). Every
key has a dotted name (`optimizer.lr`, `seed`); `dotted_keys()` lists them and `describe_keys()` gives each
one's type, default and one-line help (`fastsft train --help-config`).

Values are checked when a config is built, from Python as much as from a file: a wrong type, a value outside
its range or choices, an unknown key (with the nearest valid key suggested) or two keys that contradict each
other raise `ConfigError` naming the dotted key, the value and what is allowed. A valid config is immutable;
derive a changed one with `dataclasses.replace` on a section (validated again) or `load_config`.

"auto" values are resolved by the training loop at start-up, where the device, the world size and the
installed packages are known; each field's help says how. The defaults are sized so that the default job
(the built-in "tiny" model on synthetic data) trains on 2 CPU cores in well under five minutes.

This module is a pure data layer: it imports neither torch nor transformers (PyYAML only, and only to read or
write YAML), so `fastsft train --help-config` and config errors come back instantly.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Union

CONFIG_FILE_NAME = "config.yaml"

# Spellings accepted for booleans (case-insensitive) in overrides and quoted YAML strings.
_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")
# Spellings of None for Optional keys in overrides (`data.eval=null`); quote the value to mean the string.
_NULL = ("null", "none", "~")

# Names other trainers use (HF TrainingArguments, TRL, Axolotl) -> our key. Only used for suggestions.
_ALIASES = {
    "learning_rate": "optimizer.lr",
    "max_grad_norm": "optimizer.grad_clip",
    "adam_beta1": "optimizer.betas",
    "adam_beta2": "optimizer.betas",
    "adam_epsilon": "optimizer.eps",
    "num_train_epochs": "schedule.epochs",
    "num_epochs": "schedule.epochs",
    "lr_scheduler_type": "schedule.kind",
    "gradient_accumulation_steps": "distributed.grad_accum",
    "gradient_checkpointing": "model.activation_checkpointing",
    "max_length": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len",
    "sequence_len": "data.max_seq_len",
    "save_steps": "checkpointing.every_steps",
    "save_total_limit": "checkpointing.keep_last",
    "logging_steps": "logging.every_steps",
    "eval_steps": "eval.every_steps",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "torch_dtype": "model.dtype",
    "model_name_or_path": "model.name_or_path",
}


class ConfigError(ValueError):
    """An invalid configuration. `key` is the dotted key at fault when there is one (else None)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # picklable (e.g. raised in a spawned rank) despite the keyword argument
        return (type(self), (self.args[0], self.key))


# --------------------------------------------------------------------------------------------------------------
# Fields: a default, one line of help, optional bounds (checked in __post_init__, shown by describe_keys)
# --------------------------------------------------------------------------------------------------------------


# fastsft.data.packing.MAX_SUPPORTED_MAX_TOKENS, written out so that reading a config imports no torch (a test
# keeps the two equal).
PACKER_MAX_TOKENS = 1 << 24


def _field(default: Any, help: str, *, gt=None, ge=None, lt=None, le=None) -> Any:
    """A dataclass field with its help line and numeric bounds (applied to each element of a tuple value)."""
    bounds = {name: value for name, value in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if value is not None}
    return field(default=default, metadata={"help": help, **bounds})


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


class _Section:
    """Base of every section: type-checks and normalises each field, applies bounds, then `_check()`.

    Subclasses are frozen dataclasses with a `SECTION` class variable: their name in TrainConfig, the prefix
    of their dotted keys (empty for TrainConfig itself).
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key = _join(self.SECTION, f.name)
            value = getattr(self, f.name)
            if _is_section_type(hints[f.name]):
                if not isinstance(value, hints[f.name]):
                    raise ConfigError(
                        f"{key}: expected a {hints[f.name].__name__}, got {_show(value)} ({type(value).__name__}); "
                        f"build it with {hints[f.name].__name__}(...) or load the config with load_config/from_dict",
                        key,
                    )
                continue
            normalised = _convert(value, hints[f.name], key, text=False)
            _check_bounds(normalised, f.metadata, key)
            if normalised is not value:
                object.__setattr__(self, f.name, normalised)  # frozen: int -> float, list -> tuple
        self._check()

    def _check(self) -> None:
        """Rules beyond a field's type and bounds (several fields together); raise ConfigError."""

    def _key(self, name: str) -> str:
        return _join(self.SECTION, name)


def _join(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _nonempty(section: _Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{section._key(name)}: must not be empty, got {value!r}", section._key(name))


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The model to fine-tune and how it is held in memory."""

    SECTION: ClassVar[str] = "model"

    name_or_path: str = _field(
        "tiny",
        'a built-in preset ("tiny": a small randomly initialised Llama-shaped model with its own tokenizer, '
        "for demos and tests) or the path of a local Hugging Face model directory (config, weights, tokenizer)",
    )
    dtype: Literal["auto", "bf16", "fp32"] = _field(
        "auto",
        "parameter and compute dtype; auto: bf16 on CUDA (when the GPU supports it), fp32 on CPU",
    )
    activation_checkpointing: bool = _field(
        False, "recompute each decoder layer's activations in the backward pass: less memory, ~30% more compute"
    )
    trust_remote_code: bool = _field(
        False, "allow the model directory's own Python code (transformers' trust_remote_code); only for code you trust"
    )

    def _check(self) -> None:
        _nonempty(self, "name_or_path")


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the examples come from and how they become token ids and response masks (fastsft.data)."""

    SECTION: ClassVar[str] = "data"

    train: str = _field(
        "synthetic",
        'training data: a .jsonl / .jsonl.gz / .json / .json.gz / .parquet file, or "synthetic" (a built-in '
        "task the tiny model learns in minutes)",
    )
    eval: str | None = _field(
        "auto",
        'evaluation data: a file like data.train, "synthetic", null (no evaluation), or auto: "synthetic" when '
        "data.train is synthetic, else none",
    )
    format: Literal["auto", "chat", "sharegpt", "prompt_completion", "alpaca", "tokenized", "text"] = _field(
        "auto", "record format (fastsft.data.formats); auto: detected from the first record's keys"
    )
    max_seq_len: int = _field(
        128,
        "longest example in tokens, after the chat template (longer ones are cut or dropped, see data.truncation); "
        "256 fits the synthetic task, real chat data wants 2048-8192",
        ge=2,
    )
    truncation: Literal["right", "drop"] = _field(
        "right", "an example longer than data.max_seq_len: right keeps its first max_seq_len tokens, drop drops it"
    )
    chat_template: str | None = _field(
        None, "a Jinja chat template used instead of the tokenizer's own; null: the tokenizer's (ChatML if it has none)"
    )
    train_on_inputs: bool = _field(
        False, "train on every token, prompts included (default: only the assistant replies are loss targets)"
    )
    assistant_turns: Literal["all", "last"] = _field(
        "all", "which assistant replies of a multi-turn conversation are trained: all of them, or the last only"
    )
    on_bad_record: Literal["error", "skip"] = _field(
        "error", "a malformed record: error stops with its location; skip leaves it out and counts it in the report"
    )
    cache_dir: str | None = _field(
        None, "where tokenized datasets are cached; null: $FASTSFT_CACHE_DIR, else ~/.cache/fastsft/tokenized"
    )

    def _check(self) -> None:
        _nonempty(self, "train", "eval", "chat_template", "cache_dir")

    @property
    def eval_source(self) -> str | None:
        """data.eval with "auto" resolved: "synthetic" when data.train is, else None; otherwise data.eval."""
        if self.eval == "auto":
            return "synthetic" if self.train == "synthetic" else None
        return self.eval


@dataclass(frozen=True)
class PackingConfig(_Section):
    """How tokenized examples are packed into micro-batches (best-fit decreasing, nothing padded)."""

    SECTION: ClassVar[str] = "packing"

    max_tokens: int = _field(
        1024,
        "token budget of one micro-batch (one packed row); must be >= data.max_seq_len. The main memory knob: "
        "on a GPU use as much as fits (e.g. 16384-65536)",
        ge=1,
        le=PACKER_MAX_TOKENS,  # the packer's bound: checked here, not after hours of tokenizing
    )
    seed: int = _field(0, "seed of the per-epoch shuffle of the packing order", ge=0)


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """AdamW and gradient clipping."""

    SECTION: ClassVar[str] = "optimizer"

    lr: float = _field(
        2e-3,
        "peak learning rate (after warmup); 2e-3 suits the tiny model from scratch; fine-tuning a pretrained "
        "model wants ~1e-5-5e-5 (full) or ~1e-4-3e-4 (LoRA)",
        gt=0,
    )
    weight_decay: float = _field(0.0, "AdamW decoupled weight decay (not applied to norms and biases)", ge=0)
    betas: tuple[float, float] = _field((0.9, 0.95), "AdamW (beta1, beta2), each in [0, 1)", ge=0, lt=1)
    eps: float = _field(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float | None = _field(1.0, "clip the global gradient norm to this value; null: no clipping", gt=0)
    fused: bool | Literal["auto"] = _field("auto", "torch's fused AdamW implementation; auto: on CUDA, off on CPU")


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """How long to train and the learning-rate curve: linear warmup, then decay to lr * min_lr_ratio.

    Length: `max_steps` (optimizer steps) and/or `epochs` (passes over data.train, fractions allowed); at least
    one must be set and, when both are, training stops at whichever comes first. In a file or override,
    setting `schedule.epochs` without mentioning `schedule.max_steps` clears max_steps's default (so
    `epochs=3` means three epochs, not "at most 2000 steps"); from Python pass `max_steps=None` yourself.

    Warmup: `warmup_steps` when set, else `warmup_ratio` of the total steps (see `warmup_for`).
    """

    SECTION: ClassVar[str] = "schedule"

    max_steps: int | None = _field(
        2000, "optimizer steps to train; null: use schedule.epochs (2000 train the tiny job in ~2 min on 2 cores)", ge=1
    )
    epochs: float | None = _field(
        None, "passes over data.train (fractions allowed); with max_steps also set, the first limit reached wins", gt=0
    )
    warmup_steps: int | None = _field(
        None, "linear warmup length in steps; overrides schedule.warmup_ratio when set", ge=0
    )
    warmup_ratio: float = _field(
        0.015, "linear warmup length as a share of the total steps (used when warmup_steps is null)", ge=0, lt=1
    )
    kind: Literal["cosine", "linear", "constant"] = _field(
        "cosine", "decay after warmup: cosine or linear down to lr * min_lr_ratio, or constant at lr"
    )
    min_lr_ratio: float = _field(0.0, "the final learning rate as a share of optimizer.lr", ge=0, le=1)

    def _check(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise ConfigError(
                "schedule.max_steps and schedule.epochs are both null: set at least one "
                "(e.g. schedule.max_steps=1000 or schedule.epochs=1)",
                "schedule.max_steps",
            )
        if self.warmup_steps is not None and self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"schedule.warmup_steps={self.warmup_steps} exceeds schedule.max_steps={self.max_steps}: "
                "the learning rate would never reach its peak",
                "schedule.warmup_steps",
            )

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` steps: warmup_steps if set, else round(warmup_ratio * total)."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return round(self.warmup_ratio * total_steps)


@dataclass(frozen=True)
class KernelsConfig(_Section):
    """Which fastsft kernels are swapped into the model: the options of `fastsft.patch(model, ...)`."""

    SECTION: ClassVar[str] = "kernels"

    rms_norm: bool = _field(True, "fused RMSNorm")
    rope: bool = _field(True, "fused rotary position embedding")
    swiglu: bool = _field(True, "fused gated MLP activation (SwiGLU / GeGLU)")
    attention: bool | Literal["fastsft", "torch", "flash_attn"] = _field(
        True,
        "packed-sequence (varlen) attention: documents never attend to each other; true = fastsft's Triton "
        "kernels, torch = torch's varlen_attn, flash_attn = the flash-attn package (both CUDA only)",
    )
    cross_entropy: bool = _field(
        True, "fused linear cross-entropy on the response rows only: the full logits never exist"
    )


@dataclass(frozen=True)
class LoraConfig(_Section):
    """LoRA adapters (PEFT); when disabled every parameter is trained."""

    SECTION: ClassVar[str] = "lora"

    enabled: bool = _field(False, "train LoRA adapters instead of every parameter (needs the peft package)")
    r: int = _field(16, "adapter rank", ge=1)
    alpha: float = _field(32.0, "adapter scale numerator: the update is scaled by alpha / r", gt=0)
    dropout: float = _field(0.0, "dropout on the adapter input, in [0, 1)", ge=0, lt=1)
    target_modules: tuple[str, ...] = _field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "names of the linear layers that get adapters (Llama/Qwen/Mistral/Gemma names); override as [a,b] or a,b",
    )

    def _check(self) -> None:
        if any(not name.strip() for name in self.target_modules):
            raise ConfigError(
                f"lora.target_modules: names must not be empty, got {list(self.target_modules)}", "lora.target_modules"
            )
        if self.enabled and not self.target_modules:
            raise ConfigError(
                "lora.target_modules: empty while lora.enabled=true; name the layers to adapt, e.g. [q_proj,v_proj]",
                "lora.target_modules",
            )


@dataclass(frozen=True)
class CheckpointingConfig(_Section):
    """Checkpoints, written atomically to <output_dir>/checkpoint-<N>/."""

    SECTION: ClassVar[str] = "checkpointing"

    every_steps: int | None = _field(500, "write a checkpoint every this many steps; null: only the final one", ge=1)
    keep_last: int | None = _field(2, "how many of the newest checkpoints to keep; null: keep all", ge=1)
    resume: str = _field(
        "auto",
        "auto: continue from the newest checkpoint in output_dir if there is one; never: start fresh; "
        "or the path of a checkpoint directory to start from",
    )

    def _check(self) -> None:
        _nonempty(self, "resume")


@dataclass(frozen=True)
class LoggingConfig(_Section):
    """What is reported while training, and where (all files go to output_dir)."""

    SECTION: ClassVar[str] = "logging"

    every_steps: int = _field(
        10, "log metrics every this many steps (the only steps that wait for the GPU to report numbers)", ge=1
    )
    jsonl: bool = _field(True, "append each logged step's metrics to <output_dir>/metrics.jsonl")
    tensorboard: bool | Literal["auto"] = _field(
        "auto", "write TensorBoard events to <output_dir>/tensorboard; auto: when tensorboard is installed"
    )
    progress_bar: bool = _field(True, "a progress bar on stderr (only when stderr is a terminal)")
    plot: bool | Literal["auto"] = _field(
        "auto", "draw the loss curves to <output_dir>/loss.png at the end; auto: when matplotlib is installed"
    )


@dataclass(frozen=True)
class EvalConfig(_Section):
    """Evaluation on data.eval: loss and perplexity, optionally exact match of greedy generations."""

    SECTION: ClassVar[str] = "eval"

    every_steps: int | None = _field(250, "evaluate every this many steps; null: only at the end", ge=1)
    max_batches: int | None = _field(
        20, "evaluate on at most this many micro-batches of data.eval; null: all of it", ge=1
    )
    exact_match: bool = _field(
        True,
        "also generate held-out replies greedily and report the share equal to the reference (built-in synthetic "
        "data only: it needs one short, checkable answer per prompt)",
    )
    samples: int = _field(3, "print this many (prompt, reference, generated) examples at the end of the run", ge=0)


@dataclass(frozen=True)
class DistributedConfig(_Section):
    """Data parallelism across processes (launch with torchrun) and gradient accumulation."""

    SECTION: ClassVar[str] = "distributed"

    strategy: Literal["auto", "fsdp", "ddp", "none"] = _field(
        "auto", "fsdp: FSDP2 (fully_shard); ddp: replicated model; none: one process; auto: none alone, else fsdp"
    )
    grad_accum: int = _field(
        1, "micro-batches per optimizer step on each rank (loss normalised over the whole step)", ge=1
    )
    timeout_minutes: float = _field(
        60.0,
        "how long a rank waits for the others (a collective) before the run is aborted; rank 0 alone tokenizes "
        "the data and writes checkpoints meanwhile, so raise it for very large datasets",
        gt=0,
    )


@dataclass(frozen=True)
class NanGuardConfig(_Section):
    """What happens on a non-finite loss or gradient norm: the step is skipped (no update) and counted."""

    SECTION: ClassVar[str] = "nan_guard"

    max_skipped_steps: int = _field(
        5, "stop with an error after this many consecutive skipped steps; 0: stop at the first", ge=0
    )


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Everything `fastsft train` needs. `TrainConfig()` is the built-in default job: the "tiny" preset learns a
    synthetic tasks on 2 CPU cores in about two minutes (2000 steps of 1024-token micro-batches).

    Top-level keys: output_dir, seed. Sections (dotted keys `<section>.<key>`): model, data, packing, optimizer,
    schedule, kernels, lora, checkpointing, logging, eval, distributed, nan_guard.
    """

    SECTION: ClassVar[str] = ""

    output_dir: str | None = _field(
        None,
        "the run directory (config.yaml, metrics.jsonl, tensorboard/, checkpoint-<N>/); null: runs/<date>-<time>, "
        "a fresh one per run (so checkpointing.resume=auto only resumes when output_dir is given)",
    )
    seed: int = _field(0, "seed of model initialisation (presets, LoRA), dropout and synthetic data", ge=0)
    model: ModelConfig = _section(ModelConfig, "the model to fine-tune")
    data: DataConfig = _section(DataConfig, "training and evaluation data, chat template, response masks")
    packing: PackingConfig = _section(PackingConfig, "micro-batch token budget and packing order")
    optimizer: OptimizerConfig = _section(OptimizerConfig, "AdamW and gradient clipping")
    schedule: ScheduleConfig = _section(ScheduleConfig, "training length, warmup and learning-rate decay")
    kernels: KernelsConfig = _section(KernelsConfig, "which fastsft kernels are patched into the model")
    lora: LoraConfig = _section(LoraConfig, "LoRA adapters")
    checkpointing: CheckpointingConfig = _section(CheckpointingConfig, "checkpoints and resuming")
    logging: LoggingConfig = _section(LoggingConfig, "metrics, TensorBoard, progress bar, plots")
    eval: EvalConfig = _section(EvalConfig, "evaluation during and after training")
    distributed: DistributedConfig = _section(DistributedConfig, "data parallelism and gradient accumulation")
    nan_guard: NanGuardConfig = _section(NanGuardConfig, "skipping steps with a non-finite loss or gradient")

    def _check(self) -> None:
        _nonempty(self, "output_dir")
        if self.packing.max_tokens < self.data.max_seq_len:
            raise ConfigError(
                f"packing.max_tokens={self.packing.max_tokens} is smaller than data.max_seq_len="
                f"{self.data.max_seq_len}: a micro-batch must hold the longest example; raise packing.max_tokens "
                "or lower data.max_seq_len",
                "packing.max_tokens",
            )

    # --- conversions ----------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "dict") -> TrainConfig:
        """Build a config from a nested mapping laid out like `to_dict()` (sections may be partial or None;
        `section.key` strings work as top-level keys too). Missing keys keep their defaults; unknown keys and
        bad values raise ConfigError prefixed with `source`."""
        values: dict[str, Any] = {}
        for key, value in _flatten(data, source):
            values[key] = _convert_at(key, value, source, text=False)
        return _build(values, {key: source for key in values})

    def to_dict(self) -> dict[str, Any]:
        """Nested plain data (dicts, lists, str, int, float, bool, None), in field order: the YAML layout."""
        return _plain(self)

    def to_yaml(self) -> str:
        """The whole config as YAML text; `load_config` of it gives back an equal config."""
        yaml = _yaml()

        class Dumper(yaml.SafeDumper):
            pass

        # Lists inline ([q_proj, v_proj]), mappings as blocks: one key per line.
        Dumper.add_representer(
            list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
        )
        chunks = []
        for name, value in self.to_dict().items():
            text = yaml.dump(
                {name: value}, Dumper=Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
            )
            if isinstance(value, dict):  # a section: a blank line and its one-line description first
                text = f"\n# {_hints(TrainConfig)[name].__doc__.splitlines()[0]}\n{text}"
            chunks.append(text)
        return "".join(chunks)

    def dump(self, run_dir: str | os.PathLike) -> Path:
        """Write the full config to `<run_dir>/config.yaml` (atomically, creating run_dir) and return its path.

        Dump the config the run really uses (e.g. with output_dir set to the chosen run directory): the file is
        a complete job description, `fastsft train <run_dir>/config.yaml` runs the same job again.
        """
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / CONFIG_FILE_NAME
        header = (
            "# fastsft train configuration, fully resolved (defaults < config file < key=value overrides).\n"
            f"# Run it again with: fastsft train {path}\n"
        )
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(header + self.to_yaml(), encoding="utf-8")
        os.replace(tmp, path)  # a reader never sees a half-written file
        return path

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. config.get("optimizer.lr"); ConfigError if there is no such key."""
        _check_key(key, "get")
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node


# --------------------------------------------------------------------------------------------------------------
# Schema: dotted keys, their types and help
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, _Section)


class _Leaf(NamedTuple):
    type: Any
    field: dataclasses.Field


@functools.cache
def _schema() -> tuple[dict[str, _Leaf], tuple[str, ...]]:
    """({dotted key: leaf}, section names), in field order."""
    leaves: dict[str, _Leaf] = {}
    sections: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        tp = _hints(TrainConfig)[f.name]
        if _is_section_type(tp):
            sections.append(f.name)
            for sub in dataclasses.fields(tp):
                leaves[f"{f.name}.{sub.name}"] = _Leaf(_hints(tp)[sub.name], sub)
        else:
            leaves[f.name] = _Leaf(tp, f)
    return leaves, tuple(sections)


def dotted_keys() -> list[str]:
    """Every valid key, in the order of the config tree: "output_dir", "seed", "model.name_or_path", ..."""
    return list(_schema()[0])


class KeyInfo(NamedTuple):
    """One key of describe_keys(): its dotted name, type (as text), default value and one-line help."""

    key: str
    type: str
    default: Any
    help: str


def describe_keys() -> list[KeyInfo]:
    """Every key with its type, default and help (the help text of `fastsft train --help-config`)."""
    defaults = TrainConfig()
    infos = []
    for key, leaf in _schema()[0].items():
        help = leaf.field.metadata["help"]
        bounds = _bounds_text(leaf.field.metadata)
        infos.append(KeyInfo(key, _type_text(leaf.type), defaults.get(key), f"{help} [{bounds}]" if bounds else help))
    return infos


def format_keys() -> str:
    """describe_keys() as readable text, grouped by section."""
    _, sections = _schema()
    doc = {name: _hints(TrainConfig)[name].__doc__.split("\n")[0] for name in sections}
    lines = ["fastsft train [config.yaml] [key=value ...]: every key, its type, default and meaning", ""]
    current = None
    for info in describe_keys():
        section = info.key.split(".")[0] if "." in info.key else ""
        if section != current:
            current = section
            lines.append(f"{section}: {doc[section]}" if section else "top level:")
        lines.append(f"  {info.key} ({info.type}, default {_show(info.default)})")
        lines.append(f"      {info.help}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Values: type-directed conversion of Python/YAML values and override text
# --------------------------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value that does not fit a type (internal; becomes a ConfigError naming the key)."""


def _members(tp: Any) -> tuple[Any, ...] | None:
    """The members of a Union type (X | Y, Optional[X]), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _convert(value: Any, tp: Any, key: str, *, text: bool) -> Any:
    """`value` as an instance of `tp`, or ConfigError naming key, value and the expected type.

    text=True: `value` is an override's text (every value is a string; null/none mean None for Optional
    keys; a quoted value is always the string inside the quotes). text=False: a Python or YAML value; strings
    are still parsed for non-string types (YAML reads 3e-4 as a string).
    """
    try:
        return _to(value, tp, text)
    except _Mismatch:
        shown = repr(value) if isinstance(value, str) else f"{_show(value)} ({type(value).__name__})"
        if _literal_only(tp):
            raise ConfigError(f"{key}: {shown} is not allowed; expected {_expected(tp)}", key) from None
        scalar = isinstance(value, (int, float)) and _accepts_str(tp)  # YAML read `2024` or `1e3` as a number
        hint = "; quote it in YAML to make it a string" if scalar else ""
        raise ConfigError(f"{key}: expected {_expected(tp)}, got {shown}{hint}", key) from None


def _to(value: Any, tp: Any, text: bool) -> Any:
    members = _members(tp)
    if members is not None:
        if value is None and type(None) in members:
            return None
        if text and type(None) in members and isinstance(value, str) and value.strip().lower() in _NULL:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _to(value, member, text)
            except _Mismatch:
                pass
        raise _Mismatch
    origin = typing.get_origin(tp)
    if text and isinstance(value, str) and (tp is str or origin is Literal):
        value = _unquote(value)
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin is tuple:
        return _to_tuple(value, tp, text)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(number):
            raise _Mismatch
        return number
    raise TypeError(f"fastsft.train.config: unsupported field type {tp!r}")  # a bug in this module


def _to_tuple(value: Any, tp: Any, text: bool) -> tuple:
    args = typing.get_args(tp)
    if isinstance(value, str):
        items: list[Any] = _split_list(value)
        text = True
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _Mismatch
    element_types = [args[0]] * len(items) if args[-1] is Ellipsis else list(args)
    if len(items) != len(element_types):
        raise _Mismatch
    return tuple(_to(item, element_type, text) for item, element_type in zip(items, element_types, strict=True))


def _split_list(text: str) -> list[str]:
    """ "[a, b]", "a,b", "[]" -> the items (whitespace around items ignored)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text.strip():
        return []
    return [item.strip() for item in text.split(",")]


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _accepts_str(tp: Any) -> bool:
    members = _members(tp)
    return tp is str or (members is not None and str in members)


def _literal_only(tp: Any) -> bool:
    members = _members(tp)
    candidates = [m for m in members if m is not type(None)] if members is not None else [tp]
    return all(typing.get_origin(m) is Literal for m in candidates)


def _expected(tp: Any) -> str:
    """How an error message names what a type accepts."""
    members = _members(tp)
    if members is not None:
        parts = [_expected(m) for m in members if m is not type(None)]
        if type(None) in members:
            parts.append("null")
        return " or ".join(parts)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            return f"a list of {_expected(args[0]).split(' ', 1)[1]}s, e.g. [a,b]"
        return f"a list of {len(args)} {_expected(args[0]).split(' ', 1)[1]}s, e.g. [x,y]"
    return {
        str: "a string",
        bool: "a boolean (true/false, 1/0, yes/no)",
        int: "an integer",
        float: "a finite float",
    }[tp]


def _type_text(tp: Any) -> str:
    """A type as describe_keys shows it: float, int | null, bool | 'auto', list[str], [float, float], ..."""
    members = _members(tp)
    if members is not None:
        return " | ".join("null" if m is type(None) else _type_text(m) for m in members)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            return f"list[{_type_text(args[0])}]"
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    return tp.__name__


_BOUND_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds_text(metadata: Mapping[str, Any]) -> str:
    return " and ".join(f"{_BOUND_SYMBOLS[name]} {metadata[name]}" for name in _BOUND_SYMBOLS if name in metadata)


def _check_bounds(value: Any, metadata: Mapping[str, Any], key: str) -> None:
    if value is None or not any(name in metadata for name in _BOUND_SYMBOLS):
        return
    for item in value if isinstance(value, tuple) else (value,):
        ok = (
            ("gt" not in metadata or item > metadata["gt"])
            and ("ge" not in metadata or item >= metadata["ge"])
            and ("lt" not in metadata or item < metadata["lt"])
            and ("le" not in metadata or item <= metadata["le"])
        )
        if not ok:
            each = "each value " if isinstance(value, tuple) else ""
            raise ConfigError(f"{key}: {each}must be {_bounds_text(metadata)}, got {_show(value)}", key)


def _plain(value: Any) -> Any:
    """Sections -> dicts, tuples -> lists (YAML/JSON-ready)."""
    if isinstance(value, _Section):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _show(value: Any) -> str:
    """A value as YAML would read it: null, true, 3e-4, [a, b], strings unquoted unless ambiguous."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, str):
        plain = value and value == value.strip() and "\n" not in value and value.lower() not in _NULL + _TRUE + _FALSE
        return value if plain else repr(value)
    return repr(value)


# --------------------------------------------------------------------------------------------------------------
# Keys: checking, suggestions, merging
# --------------------------------------------------------------------------------------------------------------


def _suggest(key: str) -> list[str]:
    """The valid dotted keys nearest to an unknown `key`: usually one, several when a key name is used by
    several sections (`every_steps`), none when nothing is close."""
    leaves, sections = _schema()
    keys = list(leaves)
    section, _, name = key.rpartition(".")
    if name in _ALIASES:
        return [_ALIASES[name]]
    if section and section not in sections:  # a misspelt section with a known key name
        fixed = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
        if fixed and f"{fixed[0]}.{name}" in leaves:
            return [f"{fixed[0]}.{name}"]
    same_name = [k for k in keys if k.rpartition(".")[2] == name]  # a known key in the wrong place: `lr`, `model.lr`
    if same_name:
        return same_name
    if section in sections:  # a typo of a key name of this section
        names = [k.rpartition(".")[2] for k in keys if k.startswith(section + ".")]
        match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if match:
            return [f"{section}.{match[0]}"]
    # Whole dotted keys (catches `optimizer.learning_rate` -> `optimizer.lr`), but a shared section prefix alone
    # must not make a match: the key names themselves have to be somewhat alike too.
    for match in difflib.get_close_matches(key, keys, n=5, cutoff=0.6):
        if difflib.SequenceMatcher(None, name, match.rpartition(".")[2]).ratio() >= 0.3:
            return [match]
    return []


def _unknown_key_error(key: str, source: str) -> ConfigError:
    leaves, sections = _schema()
    section = key.split(".")[0]
    what = (
        f"unknown section {section!r} in key {key!r}"
        if "." in key and section not in sections
        else f"unknown key {key!r}"
    )
    suggestions = _suggest(key)
    if len(suggestions) == 1:
        tail = f"; did you mean {suggestions[0]!r}?"
    elif suggestions:
        tail = f"; did you mean one of {', '.join(map(repr, suggestions))}?"
    elif section in sections:
        tail = f"; {section} has: {', '.join(k.split('.', 1)[1] for k in leaves if k.startswith(section + '.'))}"
    else:
        tops = [k for k in leaves if "." not in k]
        tail = f"; valid top-level keys: {', '.join(tops)}; sections: {', '.join(sections)}"
    return ConfigError(f"{source}: {what}{tail} (fastsft train --help-config lists every key)", key)


def _check_key(key: str, source: str) -> None:
    leaves, sections = _schema()
    if key in leaves:
        return
    if key in sections:
        example = next(k for k in leaves if k.startswith(key + "."))
        raise ConfigError(
            f"{source}: {key!r} is a section, not a key; set its keys one by one, e.g. {example}=...", key
        )
    raise _unknown_key_error(key, source)


def _convert_at(key: str, value: Any, source: str, *, text: bool) -> Any:
    leaf = _schema()[0][key]
    try:
        return _convert(value, leaf.type, key, text=text)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}", key) from None


def _flatten(data: Any, source: str, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """A nested mapping -> (dotted key, value) pairs, checking every key against the schema."""
    leaves, sections = _schema()
    if not isinstance(data, Mapping):
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(
            f"{source}: {where} must be a mapping of keys to values, got {_show(data)} ({type(data).__name__})",
            prefix or None,
        )
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{source}: keys must be strings, got {raw_key!r} in {prefix or 'the top level'}")
        key = _join(prefix, raw_key.strip())
        if key in sections:
            if value is not None:  # `lora:` with nothing under it keeps the section's defaults
                yield from _flatten(value, source, key)
        elif key in leaves:
            yield key, value
        elif isinstance(value, Mapping) and value:  # an unknown section: judge it by its first key (`optimiser.lr`)
            first = next(iter(value))
            raise _unknown_key_error(f"{key}.{first}" if isinstance(first, str) else key, source)
        else:
            raise _unknown_key_error(key, source)


def _build(values: Mapping[str, Any], origins: Mapping[str, str]) -> TrainConfig:
    """A TrainConfig from {dotted key: converted value} over the defaults. A validation error names where the
    offending key was set (the file or "override")."""
    leaves, sections = _schema()
    top: dict[str, Any] = {}
    per_section: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        (per_section[section] if section else top)[name] = value
    hints = _hints(TrainConfig)
    try:
        built = {name: hints[name](**per_section[name]) for name in sections}
        return TrainConfig(**top, **built)
    except ConfigError as error:
        origin = origins.get(error.key or "")
        if origin is None:
            raise
        raise ConfigError(f"{origin}: {error}", error.key) from None


def _yaml():
    try:
        import yaml
    except ImportError:  # transformers depends on PyYAML, so this means a broken or unusual environment
        raise ConfigError(
            "reading and writing config files needs PyYAML, which is not installed: pip install pyyaml"
        ) from None
    return yaml


def _read_yaml(path: str | os.PathLike) -> Any:
    yaml = _yaml()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {os.fspath(path)!r} cannot be read: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{os.fspath(path)}: not valid YAML: {error}") from None
    return {} if data is None else data  # an empty file (or only comments) keeps every default


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """The config of `fastsft train [path] [override ...]`: defaults < the YAML file at `path` < overrides.

    path:      a YAML file laid out like `TrainConfig.to_yaml()` (sections of keys; any subset; `section.key`
               also works as a top-level key), or None for the defaults alone.
    overrides: "dotted.key=value" strings, applied in order (a later one wins). The value is parsed by the key's
               type: bool true/false/1/0/yes/no/on/off; int; float (3e-4, 1e-3, 0.5); str as is (quote it, as
               in data.eval="'null'", to force a string); null/none for keys that allow null; lists as [a,b],
               a,b or [] (whitespace around items ignored); choices exactly as listed by describe_keys().

    Setting schedule.epochs (file or override) without mentioning schedule.max_steps clears max_steps's default.
    Raises ConfigError (a ValueError) for an unreadable file, an unknown key (naming the nearest valid key),
    an override without '=', a value of the wrong type, outside its range or choices, or contradicting keys.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        source = os.fspath(path)
        for key, value in _flatten(_read_yaml(path), source):
            values[key] = _convert_at(key, value, source, text=False)
            origins[key] = source
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. optimizer.lr=3e-4); "
                "only the first argument may be a config file",
                key or None,
            )
        _check_key(key, f"override {item!r}")
        values[key] = _convert_at(key, text, f"override {item!r}", text=True)
        origins[key] = f"override {item!r}"
    if values.get("schedule.epochs") is not None and "schedule.max_steps" not in values:
        values["schedule.max_steps"] = None  # epochs chosen, the default step limit yields (ScheduleConfig doc)
    return _build(values, origins)


# --------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------


def format_config(config: TrainConfig, *, max_width: int = 80) -> str:
    """Readable text of every key and value, one per line as `key  value`, values that differ from the default
    marked with '*' and the default shown; long strings (chat templates) are shortened to `max_width`."""
    defaults = TrainConfig()
    rows = []
    for key in dotted_keys():
        value, default = config.get(key), defaults.get(key)
        shown = _shorten(_show(value), max_width)
        if value != default:
            rows.append(("*", key, f"{shown}   (default {_shorten(_show(default), max_width)})"))
        else:
            rows.append((" ", key, shown))
    width = max(len(key) for _, key, _ in rows)
    changed = sum(mark == "*" for mark, _, _ in rows)
    lines = [f"fastsft train configuration ({changed} changed from the default, marked *):"]
    lines += [f"{mark} {key:<{width}}  {text}" for mark, key, text in rows]
    return "\n".join(lines)


def _shorten(text: str, max_width: int) -> str:
    return text if len(text) <= max_width else text[: max_width - 3] + "..."


__all__ = [
    "CONFIG_FILE_NAME",
    "CheckpointingConfig",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "KernelsConfig",
    "KeyInfo",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "NanGuardConfig",
    "OptimizerConfig",
    "PackingConfig",
    "ScheduleConfig",
    "TrainConfig",
    "describe_keys",
    "dotted_keys",
    "format_config",
    "format_keys",
    "load_config",
]
