"""The `fastsft` command line.

    fastsft train [config.yaml] [key=value ...]      fine-tune (the built-in default job with nothing given)
    fastsft generate CHECKPOINT [--prompt TEXT ...]  answer prompts with a checkpoint, or chat (stdin) without
    fastsft eval CHECKPOINT [config.yaml] [key=value ...] [--json PATH|-]
                                                     held-out loss (and exact match on the synthetic data)
    fastsft merge CHECKPOINT OUTPUT_DIR [--base DIR] fold a LoRA adapter into its base: a plain HF model
    fastsft info                                     versions, device, backend, native extension

A CHECKPOINT is a `<run_dir>/checkpoint-<step>/` directory (or any local HF model directory, or a merged one).
Errors in what was given (a path that is not a checkpoint, a bad config key) exit with status 2 and one line
on stderr. The logic behind generate/eval/merge is fastsft.train.inference.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from fastsft._durable import atomic_write_text


def _cmd_train(args: argparse.Namespace) -> int:
    """`fastsft train [config.yaml] [key=value ...]`: the built-in default job when given nothing."""
    from fastsft.train.config import ConfigError, format_config, format_keys, load_config

    if args.help_config:
        print(format_keys())
        return 0
    path, overrides = None, list(args.settings)
    if overrides and "=" not in overrides[0]:
        path = overrides.pop(0)
    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        print(f"fastsft train: {exc}", file=sys.stderr)
        return 2
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    if main_process:
        print(format_config(config))

    from fastsft.data import DataError
    from fastsft.patch import UnsupportedModelError
    from fastsft.train.checkpoint import ResumeError
    from fastsft.train.distributed import DistributedError
    from fastsft.train.loop import train

    who = "fastsft train" if "RANK" not in os.environ else f"fastsft train (rank {os.environ['RANK']})"
    try:
        result = train(config)
    except (DataError, FileNotFoundError, DistributedError, ResumeError, ConfigError, UnsupportedModelError) as exc:
        # bad input (a model fastsft cannot train exactly included): one line, exit 2
        print(f"{who}: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # the NaN guard gave up; its message says what to try
        print(f"{who}: {exc}", file=sys.stderr)
        return 1
    if not main_process:
        return 0
    lines = [f"run directory: {result.run_dir}", f"steps: {result.steps}"]
    if result.final_loss is not None:
        lines[-1] += f", final training loss {result.final_loss:.4f}"
    if result.eval_loss is not None:
        lines.append(f"held-out loss: {result.eval_loss:.4f}")
    for name, after, before in (
        ("reward accuracy", result.reward_accuracy_after, result.reward_accuracy_before),
        ("chosen more likely than rejected", result.likelihood_accuracy_after, result.likelihood_accuracy_before),
    ):
        if after is not None:
            before = "" if before is None else f"{before:.1%} before training -> "
            lines.append(f"held-out pairs, {name}: {before}{after:.1%} after")
    if result.exact_match_after is not None:
        before = "" if result.exact_match_before is None else f"{result.exact_match_before:.1%} before training -> "
        lines.append(f"held-out exact match: {before}{result.exact_match_after:.1%} after")
    for question, expected, generated in result.samples:
        lines.append(f"  Q: {question!r}  expected {expected!r}  model {generated!r}")
    print("\n".join(lines))
    return 0


def _fail(command: str, error: Exception | str) -> int:
    print(f"fastsft {command}: {error}", file=sys.stderr)
    return 2


def _cmd_generate(args: argparse.Namespace) -> int:
    """`fastsft generate CHECKPOINT [--prompt TEXT ...]`: one single-turn reply per --prompt, else a chat."""
    import torch

    from fastsft.train import inference

    if args.max_new_tokens < 1:
        return _fail("generate", f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0 and 0 < args.top_p <= 1):
        return _fail(
            "generate", f"need a finite --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature}, {args.top_p}"
        )
    if (error := _device_error(args.device)) is not None:
        return _fail("generate", error)
    try:
        model, tokenizer = inference.load_checkpoint(
            args.checkpoint, base=args.base, device=args.device, dtype=args.dtype
        )
    except inference.CheckpointError as exc:
        return _fail("generate", exc)
    generation = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        chat_template=inference.run_chat_template(args.checkpoint),
    )
    if args.seed is not None:
        torch.manual_seed(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if not args.prompt:
        inference.chat(model, tokenizer, system=args.system, **generation)
        return 0
    for i, prompt in enumerate(args.prompt):
        reply = inference.generate_reply(model, tokenizer, [*system, {"role": "user", "content": prompt}], **generation)
        if len(args.prompt) > 1:  # several answers: say which prompt each one answers
            print(f"{'' if i == 0 else chr(10)}> {prompt}")
        print(reply, flush=True)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """`fastsft eval CHECKPOINT [config.yaml] [key=value ...]`: the run's config.yaml is the default."""
    import json

    from fastsft.data import DataError
    from fastsft.train import inference
    from fastsft.train.config import ConfigError, load_config

    path, overrides = None, list(args.settings)
    if overrides and "=" not in overrides[0]:
        path = overrides.pop(0)
    elif (run_config := inference.run_config_path(args.checkpoint)) is not None:
        path = run_config  # the same data, template and seed settings the run was evaluated with
    if (error := _device_error(args.device)) is not None:
        return _fail("eval", error)
    if args.json not in (None, "-") and not Path(args.json).resolve().parent.is_dir():
        return _fail("eval", f"--json {args.json}: its directory does not exist")  # before evaluating, not after
    try:
        inference.inspect_checkpoint(args.checkpoint)  # before the config: a wrong path is the likelier mistake
        config = load_config(path, overrides)
        result = inference.evaluate_checkpoint(args.checkpoint, config, base=args.base, device=args.device)
    except (inference.CheckpointError, ConfigError, DataError, FileNotFoundError) as exc:
        return _fail("eval", exc)
    text = json.dumps(result.to_dict(), indent=1)
    if args.json == "-":
        print(text)
        return 0
    print((f"config: {path}\n" if path is not None else "") + result.summary())
    if args.json is not None:  # written whole or not at all
        atomic_write_text(Path(args.json), text + "\n")
    return 0


def _device_error(device: str | None) -> str | None:
    """Why --device is unusable (None when it is fine or not given)."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA device here"
    if parsed.type not in ("cpu", "cuda"):
        return f"--device {device}: only cpu and cuda are supported"
    return None


def _cmd_merge(args: argparse.Namespace) -> int:
    """`fastsft merge CHECKPOINT OUTPUT_DIR [--base DIR] [--force]`."""
    from fastsft.train import inference

    try:
        out = inference.merge_lora(args.checkpoint, args.output_dir, base=args.base, force=args.force, dtype=args.dtype)
    except inference.CheckpointError as exc:
        return _fail("merge", exc)
    print(f"merged {args.checkpoint} into {out} (loads with AutoModelForCausalLM.from_pretrained, no PEFT needed)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import fastsft
    from fastsft import _native
    from fastsft.ops._backend import requested_backend, select_backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = torch.empty(0, device=device)
    lines = [
        f"fastsft       {fastsft.__version__}",
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__}",
        f"triton        {triton_version}",
        f"transformers  {transformers.__version__}",
        f"device        {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (no CUDA device)'}",
        f"backend       FASTSFT_BACKEND={requested_backend()} -> {select_backend('info', probe)} on {device.type}",
        f"native        {'fastsft._C loaded' if _native.native_module() else _native.load_error()}",
    ]
    print("\n".join(lines))
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default=None,
        help="a LoRA checkpoint's base model directory (default: the one recorded in its fastsft.json)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsft", description="Fast, exact supervised fine-tuning of HF causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="fine-tune a model (the built-in default job when run without options)",
        description="fastsft train [config.yaml] [key=value ...]: dotted keys override the file and the defaults; "
        "with nothing given, the built-in tiny model learns the built-in synthetic instruction tasks.",
    )
    train.add_argument("settings", nargs="*", help="an optional YAML config file, then key=value overrides")
    train.add_argument("--help-config", action="store_true", help="list every config key with its default")
    train.set_defaults(func=_cmd_train)

    generate = sub.add_parser(
        "generate",
        help="answer prompts with a checkpoint, or chat with it",
        description="fastsft generate CHECKPOINT [--prompt TEXT ...]: each --prompt is answered as a single-turn "
        "chat; without --prompt, an interactive chat reads one message per line from stdin (the conversation is "
        "kept; /reset clears it; /exit or end of input ends). Greedy unless --temperature > 0.",
    )
    generate.add_argument("checkpoint", help="a checkpoint directory (full weights or a LoRA adapter)")
    generate.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    generate.add_argument("--system", default=None, help="a system prompt for every conversation")
    generate.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    generate.add_argument("--seed", type=int, default=None, help="seed torch first (reproducible sampling)")
    _add_model_options(generate)
    generate.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="weights dtype; auto: bf16 on CUDA, fp32 on CPU",
    )
    generate.set_defaults(func=_cmd_generate)

    evaluate = sub.add_parser(
        "eval",
        help="held-out loss (and exact match) of a checkpoint",
        description="fastsft eval CHECKPOINT [config.yaml] [key=value ...]: the held-out loss per supervised "
        "token on data.eval and, for the synthetic data with eval.exact_match on, the exact match of greedy "
        "replies. The config keys are fastsft train's; the run's own config.yaml (next to the checkpoint) is the "
        "default config file. Nothing is trained.",
    )
    evaluate.add_argument("checkpoint", help="a checkpoint directory (full weights or a LoRA adapter)")
    evaluate.add_argument("settings", nargs="*", help="an optional YAML config file, then key=value overrides")
    evaluate.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON (-: stdout)")
    _add_model_options(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    merge = sub.add_parser(
        "merge",
        help="merge a LoRA checkpoint into its base model (a plain HF model directory)",
        description="fastsft merge CHECKPOINT OUTPUT_DIR: fold the LoRA adapter into the base weights and write "
        "a Hugging Face model directory (safetensors + tokenizer) that loads without PEFT.",
    )
    merge.add_argument("checkpoint", help="a LoRA checkpoint directory")
    merge.add_argument("output_dir", help="where the merged model goes (must not exist or be empty)")
    merge.add_argument("--base", default=None, help="the base model directory (default: fastsft.json's base_model)")
    merge.add_argument("--force", action="store_true", help="replace a non-empty OUTPUT_DIR")
    merge.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="dtype of the saved weights; auto: the base model's own",
    )
    merge.set_defaults(func=_cmd_merge)

    info = sub.add_parser("info", help="versions, device, backend and native-extension status")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastsft.ops._backend import BackendError, check_backend_setting

    try:  # every command runs ops; a misspelt backend is bad input, said before any work
        check_backend_setting()
    except BackendError as exc:
        return _fail(args.command, exc)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
