"""The CORE metric of a base checkpoint: 22 in-context tasks of the DCLM eval bundle, centered accuracy.

    python -m scripts.base_eval                                   # the newest checkpoint in <base>/base_checkpoints
    python -m scripts.base_eval --max-per-task=100                # quick, approximate
    torchrun --nproc_per_node=8 -m scripts.base_eval --checkpoint-dir=<base>/base_checkpoints/d24

The bundle is `<base>/eval_bundle/` (core.yaml, eval_meta_data.csv, eval_data/), downloaded and unzipped on first
use; `--bundle-dir` points at another copy. How the score is computed: `tasks/core.py`. The result is a JSON file
beside the checkpoint, `core_{step:06d}.json` (`core_{step:06d}_max{N}.json` with --max-per-task=N), holding the
CORE metric and each task's accuracy and centered accuracy.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
from tritonchat.engine.checkpoint import load_model, model_path
from tritonchat.engine.cli import HelpFormatter, UsageError, check_impl, command_name, resolve_device, run_main
from tritonchat.engine.paths import atomic_write, get_base_dir
from tritonchat.engine.report import update_report
from tritonchat.scripts.chat_cli import checkpoint_and_tokenizer
from tritonchat.tasks import core
from tritonchat.train.dist import barrier, destroy_distributed, init_distributed
from tritonchat.train.progress import Heartbeat

PROG = command_name("scripts.base_eval")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("-i", "--source", choices=["base", "sft", "rl"], default="base",
                   help="which checkpoints: base_checkpoints, chatsft_checkpoints or chatrl_checkpoints")
    p.add_argument("--checkpoint-dir", default=None,
                   help="a checkpoint folder (default: the newest complete checkpoint in <base>/base_checkpoints/*)")
    p.add_argument("--step", type=int, default=None, help="default: the last complete step in the folder")
    p.add_argument("--tokenizer-dir", default=None, help="default: <base>/tokenizer")
    p.add_argument("--base-dir", default=None,
                   help="default: $TRITONCHAT_BASE_DIR, else ./.tritonchat if it exists, else ~/.cache/tritonchat")
    p.add_argument("--bundle-dir", default=None, help=f"the eval bundle (default: <base>/{core.BUNDLE_DIR_NAME})")
    p.add_argument("--max-per-task", type=int, default=-1,
                   help="score the first N items of each task (after the seeded shuffle); -1: all")
    p.add_argument("--batch-tokens", type=int, default=core.DEFAULT_BATCH_TOKENS,
                   help="padded tokens per forward (the fp32 logits take batch-tokens x vocab x 4 bytes)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="keep the last N tokens of longer prompts (default: the model's rotary table length)")
    p.add_argument("--output", default=None, help="the result file (default: core_<step>.json beside the checkpoint)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"],
                   help="Triton kernels or PyTorch references (auto: kernels where they run)")
    args = p.parse_args(argv)
    if args.max_per_task == 0 or args.max_per_task < -1:
        p.error(f"--max-per-task must be positive, or -1 for all items; got {args.max_per_task}")
    if args.batch_tokens < 1:
        p.error(f"--batch-tokens must be positive, got {args.batch_tokens}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        p.error(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    return args


def result_path(args: argparse.Namespace, ckpt_dir: Path, step: int) -> Path:
    if args.output:
        return Path(args.output)
    suffix = f"_max{args.max_per_task}" if args.max_per_task > 0 else ""
    return ckpt_dir / f"core_{step:06d}{suffix}.json"


def _main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    check_impl(args.impl, device)
    base_dir = Path(args.base_dir or get_base_dir())
    ckpt_dir, step, tokenizer = checkpoint_and_tokenizer(args, base_dir)
    bundle_dir = Path(args.bundle_dir) if args.bundle_dir else base_dir / core.BUNDLE_DIR_NAME
    if args.bundle_dir and not core.bundle_ready(bundle_dir):
        raise UsageError(f"--bundle-dir {bundle_dir}: no core.yaml there")

    info = init_distributed(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    say = print if info.is_main else None
    try:
        if not core.bundle_ready(bundle_dir):
            if info.is_main:
                core.download_bundle(bundle_dir, say=say)
            barrier(info)
        core.load_bundle(bundle_dir)  # a malformed config fails before the model loads
        model, meta = load_model(ckpt_dir, step, device=device, impl=args.impl)
        model.eval()
        model.check_ids = device.type != "cuda"  # the tokenizer's ids are in range; skip the host sync
        max_seq_len = args.max_seq_len or model.rotary_seq_len
        if say:
            say(f"CORE of {model_path(ckpt_dir, step)} (step {meta.get('step', step)}) on {device}, impl "
                f"{model.impl}, {info.world_size} rank(s); bundle {bundle_dir}"
                + (f", at most {args.max_per_task} items per task" if args.max_per_task > 0 else ""))
        t0 = time.perf_counter()
        with Heartbeat(say) as hb:
            current = []

            def progress(label: str, detail: str) -> None:  # the heartbeat's clock runs per task
                if current != [label]:
                    current[:] = [label]
                    hb.doing(f"CORE {label}")
                hb.detail(detail)

            out = core.evaluate_core(
                functools.partial(core.losses_and_predictions, model), tokenizer, bundle_dir, device,
                max_per_task=args.max_per_task, batch_tokens=args.batch_tokens, max_seq_len=max_seq_len,
                info=info, say=hb.say, progress=progress,
            )
        seconds = time.perf_counter() - t0
        if info.is_main:
            record = {"core_metric": out["core_metric"], "step": meta.get("step", step),
                      "checkpoint": str(model_path(ckpt_dir, step)), "bundle": str(bundle_dir),
                      "max_per_task": args.max_per_task, "max_seq_len": max_seq_len, "device": str(device),
                      "impl": model.impl, "world_size": info.world_size, "seconds": round(seconds, 1), **out}
            path = result_path(args, ckpt_dir, step)
            atomic_write(path, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
            print(f"CORE metric: {out['core_metric']:.4f} ({len(out['results'])} tasks, {seconds:.0f}s); "
                  f"written to {path}")
            if (args.max_per_task is None or args.max_per_task < 0) and (ckpt_dir / "metrics.jsonl").is_file():
                # the run's metrics get the score of its checkpoint (a full evaluation only)
                with open(ckpt_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": meta.get("step", step), "core_metric": out["core_metric"]}) + "\n")
            update_report(base_dir)
    finally:
        destroy_distributed()
    return 0


def main(argv=None) -> int:
    """The command line; user mistakes end in one line on stderr and exit code 2, Ctrl-C in one line."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
