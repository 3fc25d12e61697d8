"""The console commands (pyproject's [project.scripts]). Each imports its module only when it runs, inside the
Ctrl-C handling, so an interrupt while torch is still loading ends in one line too, like one during the work."""

from __future__ import annotations

import importlib
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the commands themselves exit on Ctrl-C


def _run(module: str, prog: str) -> int:
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return main()


def train() -> int:
    return _run("tritonchat.train.__main__", "tritonchat-train")


def tok_train() -> int:
    return _run("tritonchat.scripts.tok_train", "tritonchat-tok-train")


def download_data() -> int:
    return _run("tritonchat.scripts.download_data", "tritonchat-download-data")


def download_tasks() -> int:
    return _run("tritonchat.scripts.download_tasks", "tritonchat-download-tasks")


def chat() -> int:
    return _run("tritonchat.scripts.chat_cli", "tritonchat-chat")


def chat_sft() -> int:
    return _run("tritonchat.scripts.chat_sft", "tritonchat-chat-sft")


def chat_rl() -> int:
    return _run("tritonchat.scripts.chat_rl", "tritonchat-chat-rl")


def chat_pref() -> int:
    return _run("tritonchat.scripts.chat_pref", "tritonchat-chat-pref")


def base_eval() -> int:
    return _run("tritonchat.scripts.base_eval", "tritonchat-base-eval")


def chat_eval() -> int:
    return _run("tritonchat.scripts.chat_eval", "tritonchat-chat-eval")


def bench() -> int:
    return _run("tritonchat.bench.suite", "tritonchat-bench")


def compile_report() -> int:
    return _run("tritonchat.bench.compile_report", "tritonchat-compile-report")


def chat_web() -> int:
    return _run("tritonchat.scripts.chat_web", "tritonchat-chat-web")
