"""Evaluate a chat model on the chat tasks, and their ChatCORE.

    python -m scripts.chat_eval -i sft -a ARC-Easy,GSM8K          # the newest SFT checkpoint, two tasks
    python -m scripts.chat_eval -a all --max-problems 100          # every task, 100 items each
    torchrun --nproc_per_node=8 -m scripts.chat_eval -i sft -a all  # the items strided over the ranks

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) are scored from the logits of the answer letters at the position
after <|assistant_start|> (tasks.common: categorical_batch, predict_choice); generative ones (GSM8K, HumanEval,
SpellingBee) from a completion of the batched engine (greedy by default, the calculator on), judged by the task's
rule (HumanEval runs in tasks.execution's sandbox). ChatCORE is the mean over the evaluated tasks of the accuracy
centered by the task's random baseline, (acc - b) / (1 - b): b = 0.25 for the four-way multiple choice tasks, 0
for the generative ones, as the reference defines it. The result goes beside the checkpoint as
`chat_eval_{step:06d}.json` (atomically) and one line per task is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tritonchat.engine.checkpoint import load_model
from tritonchat.engine.cli import HelpFormatter, UsageError, check_impl, command_name, resolve_device, run_main
from tritonchat.engine.paths import atomic_write, get_base_dir
from tritonchat.engine.report import update_report
from tritonchat.scripts.chat_cli import SOURCES, checkpoint_and_tokenizer
from tritonchat.train.dist import all_reduce_sum, destroy_distributed, init_distributed

PROG = command_name("scripts.chat_eval")
# name -> (module, class, kwargs, random baseline of its accuracy)
TASKS = {
    "ARC-Easy": ("tritonchat.tasks.arc", "ARC", {"subset": "ARC-Easy", "split": "test"}, 0.25),
    "ARC-Challenge": ("tritonchat.tasks.arc", "ARC", {"subset": "ARC-Challenge", "split": "test"}, 0.25),
    "MMLU": ("tritonchat.tasks.mmlu", "MMLU", {"split": "test"}, 0.25),
    "GSM8K": ("tritonchat.tasks.gsm8k", "GSM8K", {"subset": "main", "split": "test"}, 0.0),
    "HumanEval": ("tritonchat.tasks.humaneval", "HumanEval", {}, 0.0),
    "SpellingBee": ("tritonchat.tasks.spellingbee", "SpellingBee", {"size": 256, "split": "test"}, 0.0),
}


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean over the tasks of (acc - baseline) / (1 - baseline)."""
    if not accuracies:
        raise ValueError("ChatCORE of no tasks")
    centered = [(acc - TASKS[name][3]) / (1 - TASKS[name][3]) for name, acc in accuracies.items()]
    return sum(centered) / len(centered)


def load_task(name: str, base_dir: Path):
    import importlib

    module, cls, kwargs, _ = TASKS[name]
    import inspect

    task_cls = getattr(importlib.import_module(module), cls)
    if "base_dir" in inspect.signature(task_cls.__init__).parameters:  # a generated task reads no files
        kwargs = {**kwargs, "base_dir": base_dir}
    return task_cls(**kwargs)


@torch.no_grad()
def evaluate_categorical(model, tokenizer, task, indices: list[int], batch_size: int, device) -> list[bool]:
    from tritonchat.tasks.common import answer_letter_ids, categorical_batch, predict_choice

    out = []
    for lo in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[lo:lo + batch_size]]
        ids, positions = categorical_batch(tokenizer, convs)
        logits = model(ids.to(device))
        for conv, row, pos in zip(convs, logits, positions):
            letters = conv["letters"]
            choice = predict_choice(row[pos].float(), answer_letter_ids(tokenizer, letters))
            out.append(bool(task.evaluate(conv, letters[choice])))
    return out


def evaluate_generative(engine, tokenizer, task, indices: list[int], batch_size: int, params) -> list[bool]:
    out = []
    for lo in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[lo:lo + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        for conv, gen in zip(convs, engine.generate(prompts, params)):
            out.append(bool(task.evaluate(conv, gen.text)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("-i", "--source", choices=sorted(SOURCES), default=None,
                   help="which checkpoints (default: sft when one exists, else base)")
    p.add_argument("-a", "--tasks", default="all", help=f"comma-separated, of {', '.join(TASKS)}, or all")
    p.add_argument("--max-problems", type=int, default=None, help="items per task at most (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per forward / per engine batch")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generated tokens per answer at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of generative tasks")
    p.add_argument("--checkpoint-dir", default=None, help="a checkpoint folder instead of --source")
    p.add_argument("--step", type=int, default=None, help="default: the folder's last complete step")
    p.add_argument("--base-dir", default=None, help="default: $TRITONCHAT_BASE_DIR, else ./.tritonchat if it "
                   "exists, else ~/.cache/tritonchat")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--impl", choices=["auto", "torch", "triton"], default="auto", help="kernels or references")
    args = p.parse_args(argv)
    names = list(TASKS) if args.tasks.strip() == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UsageError(f"--tasks: unknown {unknown or 'nothing'}; choose from {', '.join(TASKS)} or all")
    args.tasks = names
    for flag in ("max_problems", "batch_size", "max_new_tokens"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    return args


def _main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    check_impl(args.impl, device)
    impl = args.impl
    info = init_distributed(device.type)  # under torchrun the items are strided over the ranks
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    try:
        return _evaluate(args, device, impl, info)
    finally:
        destroy_distributed()


def _evaluate(args, device, impl, info) -> int:
    base_dir = Path(args.base_dir) if args.base_dir else Path(get_base_dir())
    # chat_cli's rule: --checkpoint-dir, else -i (default sft when there is one); the vocabularies must agree
    ckpt_dir, step, tokenizer = checkpoint_and_tokenizer(args, base_dir)
    model, meta = load_model(ckpt_dir, step, device=device, impl=impl)
    model.eval()
    if info.is_main:
        print(f"{PROG}: {ckpt_dir} step {step} on {device}, impl {impl}, {info.world_size} rank(s)", file=sys.stderr)
    from tritonchat.engine.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer, impl=impl, max_batch_size=args.batch_size)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)
    results = {}
    for name in args.tasks:
        task = load_task(name, base_dir)
        n = len(task) if args.max_problems is None else min(len(task), args.max_problems)
        t0 = time.perf_counter()
        indices = list(range(info.rank, n, info.world_size))
        if task.eval_type == "categorical":
            ok = evaluate_categorical(model, tokenizer, task, indices, args.batch_size, device)
        else:
            ok = evaluate_generative(engine, tokenizer, task, indices, args.batch_size, params)
        counts = all_reduce_sum(torch.tensor([sum(ok), len(ok)], dtype=torch.float64, device=device), info)
        correct, total = int(counts[0].item()), int(counts[1].item())
        acc = correct / max(1, total)
        results[name] = {"accuracy": acc, "correct": correct, "total": total, "eval_type": task.eval_type,
                         "baseline": TASKS[name][3], "seconds": time.perf_counter() - t0}
        if info.is_main:
            print(f"{name}: {acc:.4f} ({correct}/{total}, {task.eval_type}, {results[name]['seconds']:.1f} s)")
    score = chatcore({k: v["accuracy"] for k, v in results.items()})
    if not info.is_main:
        return 0
    print(f"ChatCORE: {score:.4f} over {len(results)} task(s)")
    out = ckpt_dir / f"chat_eval_{step:06d}.json"
    data = json.dumps({"checkpoint": str(ckpt_dir), "step": step, "chatcore": score, "tasks": results,
                       "world_size": info.world_size,
                       "max_problems": args.max_problems, "temperature": args.temperature}, indent=2).encode()
    atomic_write(out, lambda f: f.write(data))
    print(f"wrote {out}", file=sys.stderr)
    update_report(base_dir)
    return 0


def main(argv=None) -> int:
    """The command line; user mistakes end in one line on stderr and exit code 2, Ctrl-C in one line."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
