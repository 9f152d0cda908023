"""The configuration of `fastsft train`: every key, its default, bounds and help, and the rules between keys.

    from fastsft.train.config import TrainConfig, load_config

    config = TrainConfig()                                    # the built-in default job (tiny model, synthetic data)
    config = load_config("job.yaml", ["optimizer.lr=3e-4", "lora.enabled=true", "lora.target_modules=[q_proj,v_proj]"])
    print(format_config(config))                              # what the run will use, changes marked
    config.dump(run_dir)                                      # <run_dir>/config.yaml: the job, re-runnable

The config is a tree of frozen dataclasses: TrainConfig holds the top-level keys and one section per topic
(ModelConfig, DataConfig, ...). Precedence: dataclass defaults < the YAML file < the overrides (later overrides
win over earlier ones). Every key has a dotted name (`optimizer.lr`, `seed`); `dotted_keys()` lists them and
`describe_keys()` gives each one's type, default and one-line help (`fastsft train --help-config`).

Values are checked when a config is built, from Python as much as from a file: a wrong type, a value outside
its range or choices, an unknown key (with the nearest valid key suggested) or two keys that contradict each
other raise `ConfigError` naming the dotted key, the value and what is allowed. A valid config is immutable;
derive a changed one with `dataclasses.replace` on a section (validated again) or `load_config`.

"auto" values are resolved by the training loop at start-up, where the device, the world size and the
installed packages are known; each field's help says how. The defaults are sized so that the default job
(the built-in "tiny" model on synthetic data) trains on 2 CPU cores in well under five minutes.

This module is the schema; the machinery (type checks and conversion, YAML, overrides, error messages, help
text) is the generic fastsft.train.typed_config. Neither imports torch nor transformers (PyYAML only, and only
to read or write YAML), so `fastsft train --help-config` and config errors come back instantly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from fastsft._durable import atomic_write_text

from . import typed_config
from .typed_config import ConfigError, ConfigRoot, KeyInfo, Section, nonempty, setting, subsection

CONFIG_FILE_NAME = "config.yaml"

# fastsft.data.packing.MAX_SUPPORTED_MAX_TOKENS, written out so that reading a config imports no torch (a test
# keeps the two equal).
PACKER_MAX_TOKENS = 1 << 24


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig(Section):
    """The model to fine-tune and how it is held in memory."""

    SECTION: ClassVar[str] = "model"

    name_or_path: str = setting(
        "tiny",
        'a built-in preset ("tiny": a small randomly initialised Llama-shaped model with its own tokenizer, '
        "for demos and tests) or the path of a local Hugging Face model directory (config, weights, tokenizer)",
    )
    dtype: Literal["auto", "bf16", "fp32"] = setting(
        "auto",
        "parameter and compute dtype; auto: bf16 on CUDA (when the GPU supports it), fp32 on CPU",
    )
    activation_checkpointing: bool = setting(
        False, "recompute each decoder layer's activations in the backward pass: less memory, ~30% more compute"
    )
    trust_remote_code: bool = setting(
        False, "allow the model directory's own Python code (transformers' trust_remote_code); only for code you trust"
    )

    def _check(self) -> None:
        nonempty(self, "name_or_path")


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the examples come from and how they become token ids and response masks (fastsft.data)."""

    SECTION: ClassVar[str] = "data"

    train: str = setting(
        "synthetic",
        'training data: a .jsonl / .jsonl.gz / .json / .json.gz / .parquet file, or "synthetic" (a built-in '
        "task the tiny model learns in minutes)",
    )
    eval: str | None = setting(
        "auto",
        'evaluation data: a file like data.train, "synthetic", null (no evaluation), or auto: "synthetic" when '
        "data.train is synthetic, else none",
    )
    format: Literal["auto", "chat", "sharegpt", "prompt_completion", "alpaca", "tokenized", "text"] = setting(
        "auto", "record format (fastsft.data.formats); auto: detected from the first record's keys"
    )
    max_seq_len: int = setting(
        128,
        "longest example in tokens, after the chat template (longer ones are cut or dropped, see data.truncation); "
        "256 fits the synthetic task, real chat data wants 2048-8192",
        ge=2,
    )
    truncation: Literal["right", "drop"] = setting(
        "right", "an example longer than data.max_seq_len: right keeps its first max_seq_len tokens, drop drops it"
    )
    chat_template: str | None = setting(
        None, "a Jinja chat template used instead of the tokenizer's own; null: the tokenizer's (ChatML if it has none)"
    )
    train_on_inputs: bool = setting(
        False, "train on every token, prompts included (default: only the assistant replies are loss targets)"
    )
    assistant_turns: Literal["all", "last"] = setting(
        "all", "which assistant replies of a multi-turn conversation are trained: all of them, or the last only"
    )
    on_bad_record: Literal["error", "skip"] = setting(
        "error", "a malformed record: error stops with its location; skip leaves it out and counts it in the report"
    )
    cache_dir: str | None = setting(
        None, "where tokenized datasets are cached; null: $FASTSFT_CACHE_DIR, else ~/.cache/fastsft/tokenized"
    )

    def _check(self) -> None:
        nonempty(self, "train", "eval", "chat_template", "cache_dir")

    @property
    def eval_source(self) -> str | None:
        """data.eval with "auto" resolved: "synthetic" when data.train is, else None; otherwise data.eval."""
        if self.eval == "auto":
            return "synthetic" if self.train == "synthetic" else None
        return self.eval


@dataclass(frozen=True)
class PackingConfig(Section):
    """How tokenized examples are packed into micro-batches (best-fit decreasing, nothing padded)."""

    SECTION: ClassVar[str] = "packing"

    max_tokens: int = setting(
        1024,
        "token budget of one micro-batch (one packed row); must be >= data.max_seq_len. The main memory knob: "
        "on a GPU use as much as fits (e.g. 16384-65536)",
        ge=1,
        le=PACKER_MAX_TOKENS,  # the packer's bound: checked here, not after hours of tokenizing
    )
    seed: int = setting(0, "seed of the per-epoch shuffle of the packing order", ge=0)


@dataclass(frozen=True)
class OptimizerConfig(Section):
    """AdamW and gradient clipping."""

    SECTION: ClassVar[str] = "optimizer"

    lr: float = setting(
        2e-3,
        "peak learning rate (after warmup); 2e-3 suits the tiny model from scratch; fine-tuning a pretrained "
        "model wants ~1e-5-5e-5 (full) or ~1e-4-3e-4 (LoRA)",
        gt=0,
    )
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay (not applied to norms and biases)", ge=0)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW (beta1, beta2), each in [0, 1)", ge=0, lt=1)
    eps: float = setting(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float | None = setting(1.0, "clip the global gradient norm to this value; null: no clipping", gt=0)
    fused: bool | Literal["auto"] = setting("auto", "torch's fused AdamW implementation; auto: on CUDA, off on CPU")


@dataclass(frozen=True)
class ScheduleConfig(Section):
    """How long to train and the learning-rate curve: linear warmup, then decay to lr * min_lr_ratio.

    Length: `max_steps` (optimizer steps) and/or `epochs` (passes over data.train, fractions allowed); at least
    one must be set and, when both are, training stops at whichever comes first. In a file or override,
    setting `schedule.epochs` without mentioning `schedule.max_steps` clears max_steps's default (so
    `epochs=3` means three epochs, not "at most 2000 steps"); from Python pass `max_steps=None` yourself.

    Warmup: `warmup_steps` when set, else `warmup_ratio` of the total steps (see `warmup_for`).
    """

    SECTION: ClassVar[str] = "schedule"

    max_steps: int | None = setting(
        2000, "optimizer steps to train; null: use schedule.epochs (2000 train the tiny job in ~2 min on 2 cores)", ge=1
    )
    epochs: float | None = setting(
        None, "passes over data.train (fractions allowed); with max_steps also set, the first limit reached wins", gt=0
    )
    warmup_steps: int | None = setting(
        None, "linear warmup length in steps; overrides schedule.warmup_ratio when set", ge=0
    )
    warmup_ratio: float = setting(
        0.015, "linear warmup length as a share of the total steps (used when warmup_steps is null)", ge=0, lt=1
    )
    kind: Literal["cosine", "linear", "constant"] = setting(
        "cosine", "decay after warmup: cosine or linear down to lr * min_lr_ratio, or constant at lr"
    )
    min_lr_ratio: float = setting(0.0, "the final learning rate as a share of optimizer.lr", ge=0, le=1)

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
class KernelsConfig(Section):
    """Which fastsft kernels are swapped into the model: the options of `fastsft.patch(model, ...)`."""

    SECTION: ClassVar[str] = "kernels"

    rms_norm: bool = setting(True, "fused RMSNorm")
    rope: bool = setting(True, "fused rotary position embedding")
    swiglu: bool = setting(True, "fused gated MLP activation (SwiGLU / GeGLU)")
    attention: bool | Literal["fastsft", "torch", "flash_attn"] = setting(
        True,
        "packed-sequence (varlen) attention: documents never attend to each other; true = fastsft's Triton "
        "kernels, torch = torch's varlen_attn, flash_attn = the flash-attn package (both CUDA only)",
    )
    cross_entropy: bool = setting(
        True, "fused linear cross-entropy on the response rows only: the full logits never exist"
    )


@dataclass(frozen=True)
class LoraConfig(Section):
    """LoRA adapters (PEFT); when disabled every parameter is trained."""

    SECTION: ClassVar[str] = "lora"

    enabled: bool = setting(False, "train LoRA adapters instead of every parameter (needs the peft package)")
    r: int = setting(16, "adapter rank", ge=1)
    alpha: float = setting(32.0, "adapter scale numerator: the update is scaled by alpha / r", gt=0)
    dropout: float = setting(0.0, "dropout on the adapter input, in [0, 1)", ge=0, lt=1)
    target_modules: tuple[str, ...] = setting(
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
class CheckpointingConfig(Section):
    """Checkpoints, written atomically to <output_dir>/checkpoint-<N>/."""

    SECTION: ClassVar[str] = "checkpointing"

    every_steps: int | None = setting(500, "write a checkpoint every this many steps; null: only the final one", ge=1)
    keep_last: int | None = setting(2, "how many of the newest checkpoints to keep; null: keep all", ge=1)
    resume: str = setting(
        "auto",
        "auto: continue from the newest checkpoint in output_dir if there is one; never: start fresh; "
        "or the path of a checkpoint directory to start from",
    )

    def _check(self) -> None:
        nonempty(self, "resume")


@dataclass(frozen=True)
class LoggingConfig(Section):
    """What is reported while training, and where (all files go to output_dir)."""

    SECTION: ClassVar[str] = "logging"

    every_steps: int = setting(
        10, "log metrics every this many steps (the only steps that wait for the GPU to report numbers)", ge=1
    )
    jsonl: bool = setting(True, "append each logged step's metrics to <output_dir>/metrics.jsonl")
    tensorboard: bool | Literal["auto"] = setting(
        "auto", "write TensorBoard events to <output_dir>/tensorboard; auto: when tensorboard is installed"
    )
    progress_bar: bool = setting(True, "a progress bar on stderr (only when stderr is a terminal)")
    plot: bool | Literal["auto"] = setting(
        "auto", "draw the loss curves to <output_dir>/loss.png at the end; auto: when matplotlib is installed"
    )


@dataclass(frozen=True)
class EvalConfig(Section):
    """Evaluation on data.eval: loss and perplexity, optionally exact match of greedy generations."""

    SECTION: ClassVar[str] = "eval"

    every_steps: int | None = setting(250, "evaluate every this many steps; null: only at the end", ge=1)
    max_batches: int | None = setting(
        20, "evaluate on at most this many micro-batches of data.eval; null: all of it", ge=1
    )
    exact_match: bool = setting(
        True,
        "also generate held-out replies greedily and report the share equal to the reference (built-in synthetic "
        "data only: it needs one short, checkable answer per prompt)",
    )
    samples: int = setting(3, "print this many (prompt, reference, generated) examples at the end of the run", ge=0)


# Each preference objective's usual beta (DPO, IPO, ORPO's lambda: TRL's defaults; SimPO: its paper's range).
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}


@dataclass(frozen=True)
class PreferenceConfig(Section):
    """Preference tuning (objective dpo / ipo / simpo / orpo): data.train holds (prompt, chosen, rejected) pairs in
    TRL's formats; only the chosen and rejected completions are scored. DPO and IPO compare with a reference model:
    the model as it is before training (with LoRA: the base model), whose log-probs are computed once."""

    SECTION: ClassVar[str] = "preference"

    beta: float | None = setting(
        None,
        "dpo / ipo: strength of the pull towards the reference; simpo: the reward scale; orpo: the odds-ratio "
        "term's weight (lambda); null: 0.1 (dpo, ipo, orpo) or 2.0 (simpo)",
        gt=0,
    )
    label_smoothing: float = setting(
        0.0, "dpo / simpo: the assumed probability that a preference label is flipped (conservative DPO)", ge=0, le=0.5
    )
    gamma: float = setting(0.5, "simpo: the target reward margin between chosen and rejected", ge=0)

    def beta_for(self, objective: str) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[objective]


@dataclass(frozen=True)
class DistributedConfig(Section):
    """Data parallelism across processes (launch with torchrun) and gradient accumulation."""

    SECTION: ClassVar[str] = "distributed"

    strategy: Literal["auto", "fsdp", "ddp", "none"] = setting(
        "auto", "fsdp: FSDP2 (fully_shard); ddp: replicated model; none: one process; auto: none alone, else fsdp"
    )
    grad_accum: int = setting(
        1, "micro-batches per optimizer step on each rank (loss normalised over the whole step)", ge=1
    )
    timeout_minutes: float = setting(
        60.0,
        "how long a rank waits for the others (a collective) before the run is aborted; rank 0 alone tokenizes "
        "the data and writes checkpoints meanwhile, so raise it for very large datasets",
        gt=0,
    )


@dataclass(frozen=True)
class NanGuardConfig(Section):
    """What happens on a non-finite loss or gradient norm: the step is skipped (no update) and counted."""

    SECTION: ClassVar[str] = "nan_guard"

    max_skipped_steps: int = setting(
        5, "stop with an error after this many consecutive skipped steps; 0: stop at the first", ge=0
    )


# --------------------------------------------------------------------------------------------------------------
# The whole config: top-level keys and sections
# --------------------------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class TrainConfig(ConfigRoot):
    """Everything `fastsft train` needs. `TrainConfig()` is the built-in default job: the "tiny" preset learns a
    synthetic task on 2 CPU cores in about two minutes (2000 steps of 1024-token micro-batches).

    Top-level keys: output_dir, seed, objective. Sections (dotted keys `<section>.<key>`): model, data, packing,
    optimizer, schedule, kernels, lora, checkpointing, logging, eval, distributed, nan_guard, preference.
    """

    # What the config errors say besides the keys themselves (see typed_config.ConfigRoot).
    ALIASES: ClassVar[Mapping[str, str]] = _ALIASES
    KEYS_HELP: ClassVar[str] = "fastsft train --help-config lists every key"
    LOADERS: ClassVar[str] = "load_config/from_dict"

    output_dir: str | None = setting(
        None,
        "the run directory (config.yaml, metrics.jsonl, tensorboard/, checkpoint-<N>/); null: runs/<date>-<time>, "
        "a fresh one per run (so checkpointing.resume=auto only resumes when output_dir is given)",
    )
    seed: int = setting(0, "seed of model initialisation (presets, LoRA), dropout and synthetic data", ge=0)
    objective: Literal["sft", "dpo", "ipo", "simpo", "orpo"] = setting(
        "sft",
        "sft: instruction tuning on the replies; dpo / ipo / simpo / orpo: preference tuning on (prompt, chosen, "
        "rejected) pairs (see the preference section; data.train=synthetic gives built-in pairs)",
    )
    model: ModelConfig = subsection(ModelConfig, "the model to fine-tune")
    data: DataConfig = subsection(DataConfig, "training and evaluation data, chat template, response masks")
    packing: PackingConfig = subsection(PackingConfig, "micro-batch token budget and packing order")
    optimizer: OptimizerConfig = subsection(OptimizerConfig, "AdamW and gradient clipping")
    schedule: ScheduleConfig = subsection(ScheduleConfig, "training length, warmup and learning-rate decay")
    kernels: KernelsConfig = subsection(KernelsConfig, "which fastsft kernels are patched into the model")
    lora: LoraConfig = subsection(LoraConfig, "LoRA adapters")
    checkpointing: CheckpointingConfig = subsection(CheckpointingConfig, "checkpoints and resuming")
    logging: LoggingConfig = subsection(LoggingConfig, "metrics, TensorBoard, progress bar, plots")
    eval: EvalConfig = subsection(EvalConfig, "evaluation during and after training")
    distributed: DistributedConfig = subsection(DistributedConfig, "data parallelism and gradient accumulation")
    nan_guard: NanGuardConfig = subsection(NanGuardConfig, "skipping steps with a non-finite loss or gradient")
    preference: PreferenceConfig = subsection(PreferenceConfig, "preference tuning (objective dpo, ipo, simpo, orpo)")

    @property
    def is_preference(self) -> bool:
        return self.objective != "sft"

    def _check(self) -> None:
        nonempty(self, "output_dir")
        if self.is_preference and self.data.format != "auto":
            raise ConfigError(
                f"data.format={self.data.format} is an instruction format; objective={self.objective} reads "
                "preference pairs (prompt / chosen / rejected), detected from their keys: leave data.format=auto",
                "data.format",
            )
        if self.objective in ("ipo", "orpo") and self.preference.label_smoothing:
            raise ConfigError(
                f"preference.label_smoothing={self.preference.label_smoothing} applies to dpo and simpo, not "
                f"objective={self.objective}",
                "preference.label_smoothing",
            )
        if self.is_preference and self.kernels.cross_entropy is False:
            raise ConfigError(
                f"objective={self.objective} scores sequences with fastsft's fused log-probs, which come with the "
                "fused loss: leave kernels.cross_entropy=true",
                "kernels.cross_entropy",
            )
        if self.packing.max_tokens < self.data.max_seq_len:
            raise ConfigError(
                f"packing.max_tokens={self.packing.max_tokens} is smaller than data.max_seq_len="
                f"{self.data.max_seq_len}: a micro-batch must hold the longest example; raise packing.max_tokens "
                "or lower data.max_seq_len",
                "packing.max_tokens",
            )

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
        atomic_write_text(path, header + self.to_yaml())  # a reader (or a resume after a crash) sees a whole file
        return path


# --------------------------------------------------------------------------------------------------------------
# Loading and printing
# --------------------------------------------------------------------------------------------------------------


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
        values, origins = typed_config.read_file(TrainConfig, path)
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
        values[key] = typed_config.read_override(TrainConfig, key, text, f"override {item!r}")
        origins[key] = f"override {item!r}"
    if values.get("schedule.epochs") is not None and "schedule.max_steps" not in values:
        values["schedule.max_steps"] = None  # epochs chosen, the default step limit yields (ScheduleConfig doc)
    return typed_config.build(TrainConfig, values, origins)


def dotted_keys() -> list[str]:
    """Every valid key, in the order of the config tree: "output_dir", "seed", "model.name_or_path", ..."""
    return typed_config.dotted_keys(TrainConfig)


def describe_keys() -> list[KeyInfo]:
    """Every key with its type, default and help (the help text of `fastsft train --help-config`)."""
    return typed_config.describe_keys(TrainConfig)


def format_keys() -> str:
    """describe_keys() as readable text, grouped by section: what `fastsft train --help-config` prints."""
    return typed_config.format_keys(
        TrainConfig, "fastsft train [config.yaml] [key=value ...]: every key, its type, default and meaning"
    )


def format_config(config: TrainConfig, *, max_width: int = 80) -> str:
    """Readable text of every key and value, one per line as `key  value`, values that differ from the default
    marked with '*' and the default shown; long strings (chat templates) are shortened to `max_width`."""
    return typed_config.format_config(config, title="fastsft train configuration", max_width=max_width)


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
    "PreferenceConfig",
    "ScheduleConfig",
    "TrainConfig",
    "describe_keys",
    "dotted_keys",
    "format_config",
    "format_keys",
    "load_config",
]
