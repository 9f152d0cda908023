"""The `fastsft` command line: `fastsft train | info`."""

from __future__ import annotations

import argparse
import sys


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
    print(format_config(config))

    from fastsft.train.loop import train

    result = train(config)
    lines = [f"run directory: {result.run_dir}", f"steps: {result.steps}, final training loss {result.final_loss:.4f}"]
    if result.eval_loss is not None:
        lines.append(f"held-out loss: {result.eval_loss:.4f}")
    if result.exact_match_after is not None:
        lines.append(
            f"held-out exact match: {result.exact_match_before:.1%} before training -> "
            f"{result.exact_match_after:.1%} after"
        )
    for question, expected, generated in result.samples:
        lines.append(f"  Q: {question!r}  expected {expected!r}  model {generated!r}")
    print("\n".join(lines))
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
    info = sub.add_parser("info", help="versions, device, backend and native-extension status")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
