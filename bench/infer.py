"""Inference throughput of the engine (engine/engine.py): prefill and decode tokens per second.

    python -m bench.infer                          # depth 24, 32 requests of 512 prompt tokens, 128 new tokens
    python -m bench.infer --batch 1 --gen 256      # single-stream decode latency
    python -m bench.infer --dry-run                # CPU: depth 1, tiny requests, Triton in the interpreter

Random weights and random prompt tokens (throughput does not depend on them), greedy sampling, no stop tokens,
so every request generates exactly --gen tokens. Per variant (triton: impl="triton" model and the paged-attention
kernels; torch: the references), after one untimed warm-up request:
    prefill  all requests are queued at once and the engine steps until each has its first token;
             prefill tok/s = batch * prompt_len / that time (time to first token of the whole batch)
    decode   the steps after that, until every request has --gen tokens;
             decode tok/s = batch * (gen - 1) / that time; ms/step = that time / (gen - 1)
--prefill-chunk (default: the whole batch's prompts) lets one forward prefill every prompt together.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tritonchat.bench.common import Marks, sync, write_result

VARIANTS = ("triton", "torch")


def _engine_api():
    """engine.engine's Engine and SamplingParams, or SystemExit with what is missing."""
    try:
        from tritonchat.engine import engine as eng
    except ImportError as e:
        raise SystemExit(f"bench.infer: the inference engine (engine/engine.py) cannot be imported: {e}") from None
    missing = [n for n in ("Engine", "SamplingParams") if not hasattr(eng, n)]
    if missing:
        raise SystemExit(f"bench.infer: engine/engine.py does not provide {', '.join(missing)} yet; nothing measured")
    return eng.Engine, eng.SamplingParams


def measure(variant: str, args, device) -> dict:
    import torch
    from tritonchat.engine.gpt import GPTConfig, build_model

    Engine, SamplingParams = _engine_api()
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size)
    impl = "triton" if variant == "triton" else "torch"
    model = build_model(config, device=device, impl=impl).eval()
    engine = Engine(model, None, page_size=args.page_size, max_batch_size=args.batch,
                    max_seq_len=args.prompt_len + args.gen, prefill_chunk=args.prefill_chunk,
                    impl=impl)
    params = SamplingParams(max_tokens=args.gen, temperature=0.0, stop_tokens=[])
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    engine.generate([prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0.0, stop_tokens=[]))  # warm-up

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ids = [engine.add_request(p, params) for p in prompts]
    sync(device)
    marks = Marks(device)
    marks.mark()
    started: set[int] = set()
    produced, budget = 0, args.batch * (args.prompt_len + args.gen) + 8  # more steps than this: no progress
    while len(started) < len(ids):
        for ev in engine.step():
            if ev.token is not None:
                started.add(ev.request_id)
                produced += 1
        budget -= 1
        if budget < 0:
            raise RuntimeError(f"the engine started only {len(started)} of {len(ids)} requests")
    marks.mark()
    decode_start = produced
    while engine.has_work():
        produced += sum(ev.token is not None for ev in engine.step())
        budget -= 1
        if budget < 0:
            raise RuntimeError("the engine did not finish the requests")
    marks.mark()
    prefill_s, decode_s = marks.intervals()
    lengths = [len(engine.result(i).tokens) for i in ids]
    if lengths != [args.gen] * args.batch:
        raise RuntimeError(f"expected {args.gen} tokens per request, got {lengths}")
    decoded = produced - decode_start
    steps = max(1, args.gen - 1)
    return {"variant": variant, "prefill_s": prefill_s, "prefill_tok_s": args.batch * args.prompt_len / prefill_s,
            "decode_s": decode_s, "decode_tok_s": decoded / decode_s if decoded else None,
            "decode_ms_per_step": decode_s / steps * 1e3,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.infer", description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=None, help="default 24 (1 with --dry-run)")
    p.add_argument("--batch", type=int, default=None, help="concurrent requests (default 32; 2 dry)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per request (default 512; 12 dry)")
    p.add_argument("--gen", type=int, default=None, help="new tokens per request (default 128; 3 dry)")
    p.add_argument("--vocab-size", type=int, default=None, help="default 32768 (256 dry)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill forward (default: all prompts)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--out", default=None, help="results folder (default bench/results; --dry-run writes only here)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, Triton in the interpreter")
    args = p.parse_args(argv)
    for name, full, tiny in (("depth", 24, 1), ("batch", 32, 2), ("prompt_len", 512, 12), ("gen", 128, 3),
                             ("vocab_size", 32768, 256)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.dry_run else full)
    if args.prefill_chunk is None:
        args.prefill_chunk = args.batch * args.prompt_len
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants takes a comma-separated subset of {', '.join(VARIANTS)}")
    if min(args.depth, args.batch, args.prompt_len, args.gen, args.page_size, args.prefill_chunk) < 1:
        p.error("sizes must be >= 1")
    return args


def run(args, device) -> dict:
    """Measure every variant; the result payload."""
    rows = [measure(v, args, device) for v in args.variants]
    return {"depth": args.depth, "batch": args.batch, "prompt_len": args.prompt_len, "gen": args.gen,
            "page_size": args.page_size, "prefill_chunk": args.prefill_chunk, "runs": rows}


def print_table(payload: dict) -> None:
    print(f"\ndepth {payload['depth']}: {payload['batch']} requests x {payload['prompt_len']} prompt tokens, "
          f"{payload['gen']} new tokens each")
    print(f"{'variant':8} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>9} {'peak GiB':>9}")
    for r in payload["runs"]:
        peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        dec = "n/a" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:,.0f}"
        print(f"{r['variant']:8} {r['prefill_tok_s']:14,.0f} {dec:>13} {r['decode_ms_per_step']:9.2f} {peak:>9}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench.infer: no CUDA device here, so nothing was timed; --dry-run exercises the script on CPU")
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton on CPU tensors
    _engine_api()
    payload = run(args, torch.device("cpu" if args.dry_run else "cuda"))
    if not args.dry_run or args.out:
        print(f"wrote {write_result('infer', payload, Path(args.out) if args.out else None)}")
    print_table(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
