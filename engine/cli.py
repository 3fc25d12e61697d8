"""What the command lines share: user mistakes in one line with exit code 2, Ctrl-C in one line, help that
shows the defaults, and the checks of `--device` and `--impl` that must come before any work.

    def main(argv=None) -> int:
        return run_main(_main, argv, prog="python -m scripts.tok_train")

The trainer (`train/__main__.py`) reports its errors the same way; it can move onto `run_main` too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from tritonchat.kernels import resolve_impl

EXIT_USAGE = 2  # a user mistake, as argparse exits for a bad flag
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UsageError(ValueError):
    """A mistake in the command line or its files, reported as one line naming the flag or the file."""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (`prog: error: message`, exit code 2) without the usage dump."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with each option's default, except when it is None or False or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def command_name(module: str) -> str:
    """How the user called the command named by `module` ("train", "scripts.chat_cli"): its console script
    (`tritonchat-...`) when that is what runs, else its `python -m` form in a checkout (`python -m train`) or an
    installed package (`python -m tritonchat.train`). For usage lines and messages."""
    import os
    from pathlib import Path

    import tritonchat

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script.startswith("tritonchat-"):
        return script
    installed = (Path(tritonchat.__file__).parent / "kernels").is_dir()
    return f"python -m {'tritonchat.' if installed else ''}{module}"


def one_line(e: BaseException) -> str:
    """The exception's message on one line (the lines of a multi-line message joined with '; ')."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def add_training_runtime_flags(p: argparse.ArgumentParser) -> None:
    """Where a finetuning command's files are and what it runs on: --base-dir, --tokenizer-dir, --device, --dtype,
    --embedding-dtype, --impl (chat_sft, chat_rl, chat_pref)."""
    p.add_argument("--base-dir", default=None,
                   help="default: $TRITONCHAT_BASE_DIR, else ./.tritonchat if it exists, else ~/.cache/tritonchat")
    p.add_argument("--tokenizer-dir", default=None, help="default: <base>/tokenizer")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    p.add_argument("--embedding-dtype", default="auto",
                   help="storage of wte and value_embeds and their AdamW moments: auto (bf16 on every device), "
                        "bfloat16, float32")
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"],
                   help="Triton kernels or PyTorch references (auto: kernels where they run)")


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None, prog: str) -> int:
    """Run `main(argv)` and return its exit code. A ValueError (UsageError, CheckpointError, ...) or OSError
    (a missing or unreadable file) prints `prog: error: <message>` and returns 2; Ctrl-C prints
    `prog: <the interrupt's message>` (`interrupted` when it has none: a command raises KeyboardInterrupt("...")
    to say what is on disk) and returns 130. Anything else is a bug and keeps its traceback."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt as e:
        print(f"\n{prog}: {str(e) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def resolve_device(flag: str) -> torch.device:
    """The device `--device=<flag>` names: "auto" is the first CUDA GPU when there is one, else the CPU.

    Raises UsageError for a name torch does not know, a device other than cpu or cuda, and a CUDA device on a
    machine without CUDA (a torch built without it, or no GPU visible) or one past the last GPU.
    """
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device={flag}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device={flag}: CUDA is not available on this machine ({why}); use --device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device={flag}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise UsageError(f"--device={flag}: only cpu and cuda devices are supported")
    return device


def check_impl(impl: str, device: torch.device) -> None:
    """UsageError when `--impl=triton` asks for Triton kernels where none can run: a CPU without the Triton
    interpreter (TRITON_INTERPRET=1, which must be set before the program starts)."""
    if impl == "triton" and resolve_impl("auto", device) != "triton":
        raise UsageError(f"--impl=triton: Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run them in the "
                         f"Triton interpreter on the CPU (slow); the device is {device}: use --impl=auto or "
                         f"--impl=torch")
