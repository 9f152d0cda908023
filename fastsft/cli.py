"""The `fastsft` command line: `fastsft train | info`."""

from __future__ import annotations

import argparse
import sys


def _cmd_train(args: argparse.Namespace) -> int:
    print(
        "fastsft train: the training loop and its default job arrive with the training-loop issue (#7).\n"
        "Available today:\n"
        "  fastsft.patch(model)    fused kernels in any Llama/Mistral/Qwen2/Qwen3/Gemma2/Gemma3 HF model,\n"
        "                          for your own loop, HF Trainer or TRL (README: fastsft.patch)\n"
        "  fastsft.data            your JSONL/JSON/Parquet records -> token-exact response masks ->\n"
        "                          packed micro-batches (prepare_dataset, PackedLoader)\n"
        "  fastsft.ops             fused_linear_cross_entropy, apply_rope, rms_norm, swiglu, varlen_attention\n"
        "Run `fastsft info` to see which backend and kernels this machine uses."
    )
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
    train = sub.add_parser("train", help="fine-tune a model (the built-in default job when run without options)")
    train.set_defaults(func=_cmd_train)
    info = sub.add_parser("info", help="versions, device, backend and native-extension status")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
