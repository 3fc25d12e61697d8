"""Full training steps of the real model: tokens/s per GPU, MFU, peak memory and the projected time to GPT-2.

    python -m bench.train_step --depth=24                 # micro-batch 16 and 32, T=2048: triton, eager, compile
    python -m bench.train_step --depth=24 --batch-sizes 16 --variants triton,eager
    python -m bench.train_step --dry-run                  # CPU: depth 1, T=32, the same code path, nothing written

Variants, all on the same initial weights and the same random tokens:
    triton   engine.gpt.build_model(impl="triton") and MuonAdamW(impl="triton"): every Triton kernel
    eager    the PyTorch reference model and optimizer (impl="torch")
    compile  torch.compile of the reference model (the optimizer step stays eager, as in the reference recipe)

One step does what train.loop.train_step does at the speedrun's gradient accumulation: `accum` micro-batches of
forward + backward (loss / accum), then MuonAdamW.step() (train.optim) and zero_grad, with accum = the total
batch of the depth's recipe (2^20 tokens at depth 24) / (8 GPUs x B x T): 4 at B=16, 2 at B=32. So one step
handles the tokens one GPU contributes to one optimizer step of the 8-GPU run; forward+backward and optimizer
times are reported apart (CUDA events). Medians over --steps timed steps after --warmup untimed ones.

    tok/s per GPU  = accum * B * T / step time
    MFU            = flops_per_token * tok/s / bf16 peak of the GPU (SPEC §5: H100/H200 989e12)
    time to GPT-2  = recipe FLOPs / (flops_per_token * tok/s * 8 GPUs), recipe FLOPs = tokens of the reference
                     recipe for this depth (SPEC §7 at ratio 8: steps x batch) x flops_per_token;
                     depth 24: 5.84e9 tokens x 4.775e9 FLOPs/token = 2.79e19 FLOPs, against the 1.65 h record.
The projection assumes perfect scaling to 8 GPUs and charges every GPU the whole optimizer step (ZeRO-2 would
split that work 8 ways and add its reduce-scatter/all-gather time): it is an estimate, not a measured run.
On a GPU the result goes to bench/results/train_step_<device>_<time>.json (with the environment record and
the leaderboard fields: see bench/leaderboard.py).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tritonchat.bench.common import RECORD_GPUS, RECORD_HOURS, RECORD_LABEL, Marks, median, write_result

VARIANTS = ("triton", "eager", "compile")
SPEEDRUN_RATIO = 8.0  # tokens per scaling parameter of the speedrun recipe (SPEC §7)


# ---- the projection (pure) -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """The reference recipe's budget for one depth (SPEC §7), from train.config.configs_from_depth."""

    depth: int
    ratio: float
    scaling_params: int
    flops_per_token: int
    total_batch_size: int
    steps: int
    tokens: int  # steps * total_batch_size: what the recipe trains on
    total_flops: float  # tokens * flops_per_token


def recipe(depth: int, ratio: float = SPEEDRUN_RATIO, vocab_size: int = 32768, seq_len: int = 2048) -> Recipe:
    """Token horizon, batch, steps and FLOPs of the reference recipe at this depth (no allocation: meta model)."""
    from tritonchat.train.config import TrainConfig, configs_from_depth

    cfg = TrainConfig(depth=depth, target_param_data_ratio=ratio, device_batch_size=1, max_seq_len=seq_len)
    plan = configs_from_depth(cfg, vocab_size)
    tokens = plan.num_iterations * plan.total_batch_size
    return Recipe(depth, ratio, plan.scaling_params, plan.flops_per_token, plan.total_batch_size,
                  plan.num_iterations, tokens, float(tokens) * plan.flops_per_token)


def project(tok_s_per_gpu: float, flops_per_token: float, total_flops: float, gpus: int = RECORD_GPUS,
            peak_flops: float | None = None) -> dict:
    """What a measured per-GPU throughput implies for a full run on `gpus` GPUs.

    Returns flops_per_s_per_gpu (= flops_per_token * tok/s), mfu (against peak_flops; None without one),
    projected_hours (= total_flops / (flops_per_s_per_gpu * gpus) / 3600) and vs_record (projected / 1.65 h)."""
    for name, v in (("tok_s_per_gpu", tok_s_per_gpu), ("flops_per_token", flops_per_token),
                    ("total_flops", total_flops)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if type(gpus) is not int or gpus < 1:
        raise ValueError(f"gpus must be an int >= 1, got {gpus!r}")
    flops_s = tok_s_per_gpu * flops_per_token
    hours = total_flops / (flops_s * gpus) / 3600
    return {"flops_per_s_per_gpu": flops_s, "mfu": flops_s / peak_flops if peak_flops else None,
            "projected_hours": hours, "vs_record": hours / RECORD_HOURS}


def accumulation(total_batch: int, gpus: int, batch: int, seq_len: int) -> int:
    """Micro-batches per GPU per optimizer step: total batch / (gpus x B x T), at least 1."""
    return max(1, total_batch // (gpus * batch * seq_len))


# ---- measuring -----------------------------------------------------------------------------------------------
def measure(variant: str, config, batch: int, accum: int, steps: int, warmup: int, device, compile_backend: str,
            seed: int = 0) -> dict:
    """Build the model and optimizer for `variant`, run warmup + steps full training steps on random tokens,
    and return medians of the step, forward+backward and optimizer times (seconds), the first loss and the
    peak memory (GiB, CUDA only)."""
    import torch
    from tritonchat.engine.gpt import build_model
    from tritonchat.train.optim import MuonAdamW, build_param_groups

    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    impl = "triton" if variant == "triton" else "torch"
    model = build_model(config, device=device, impl=impl)
    groups = build_param_groups(model, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5,
                                matrix_weight_decay=0.28)
    opt = MuonAdamW(groups, impl=impl)
    forward = torch.compile(model, backend=compile_backend) if variant == "compile" else model
    g = torch.Generator(device=device).manual_seed(seed + 1)
    rows = torch.randint(0, config.vocab_size, (accum, batch, config.sequence_len + 1), device=device, generator=g)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step() -> tuple[float, float, float]:
        marks = Marks(device)
        marks.mark()
        loss0 = None
        for i in range(accum):
            loss = forward(rows[i, :, :-1], rows[i, :, 1:])
            (loss / accum).backward()
            loss0 = loss.detach() if loss0 is None else loss0
        marks.mark()
        opt.step()
        model.zero_grad(set_to_none=True)
        marks.mark()
        fb, op = marks.intervals()
        return fb, op, float(loss0)

    first_loss = None
    for _ in range(warmup):  # compilation, autotuning, allocator warm-up
        _, _, loss = step()
        first_loss = loss if first_loss is None else first_loss
    fbs, ops = [], []
    for _ in range(steps):
        fb, op, loss = step()
        first_loss = loss if first_loss is None else first_loss
        fbs.append(fb)
        ops.append(op)
    out = {"step_s": median([a + b for a, b in zip(fbs, ops)]), "fwd_bwd_s": median(fbs), "opt_s": median(ops),
           "first_loss": first_loss, "last_loss": loss,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    return out


def run(args) -> tuple[dict, list[str]]:
    """Measure every (variant, micro-batch) and return the result payload and the error lines."""
    import torch
    from tritonchat.engine.gpt import GPTConfig
    from tritonchat.train.loop import peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    config = GPTConfig.from_depth(args.depth, sequence_len=args.seq_len, vocab_size=args.vocab_size)
    rec = recipe(args.depth, args.ratio, args.vocab_size, args.seq_len)
    peak = peak_flops(device)
    total_batch = args.total_batch_size or rec.total_batch_size
    runs, errors = [], []
    for batch in args.batch_sizes:
        accum = accumulation(total_batch, args.gpus, batch, args.seq_len)
        for variant in args.variants:
            row = {"variant": variant, "batch": batch, "seq_len": args.seq_len, "accum": accum}
            print(f"{variant:8s} B={batch:<3d} accum={accum} ...", flush=True)
            try:
                row.update(measure(variant, config, batch, accum, args.steps, args.warmup, device,
                                   args.compile_backend))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as e:  # one failing variant must not hide the others' numbers
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                errors.append(f"{variant} B={batch}: {row['error']}")
            gc.collect()  # the model, optimizer and activations of this run go before the next is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if "step_s" in row:
                tok_s = accum * batch * args.seq_len / row["step_s"]
                row.update(tok_s_per_gpu=tok_s, **project(tok_s, rec.flops_per_token, rec.total_flops, args.gpus, peak))
            runs.append(row)
    ok = [r for r in runs if "tok_s_per_gpu" in r]
    best = max((r for r in ok if r["variant"] == "triton"), key=lambda r: r["tok_s_per_gpu"], default=None) or \
        max(ok, key=lambda r: r["tok_s_per_gpu"], default=None)
    payload = {
        "depth": args.depth, "seq_len": args.seq_len, "vocab_size": args.vocab_size, "gpus": args.gpus,
        "total_batch_size": total_batch, "model": config.to_dict(), "flops_per_token": rec.flops_per_token,
        "recipe": asdict(rec), "record": {"hours": RECORD_HOURS, "gpus": RECORD_GPUS, "label": RECORD_LABEL},
        "peak_flops": peak, "steps": args.steps, "warmup": args.warmup, "runs": runs,
        # The leaderboard's fields: the fastest impl="triton" run (or the fastest run when triton was not run).
        "headline": None if best is None else {"variant": best["variant"], "batch": best["batch"]},
        "tok_s_per_gpu": None if best is None else best["tok_s_per_gpu"],
        "mfu": None if best is None else best["mfu"],
        "projected_hours": None if best is None else best["projected_hours"],
        "val_bpb": None, "core": None,  # measured by a training run, not here
    }
    _check_losses(runs)
    return payload, errors


def _check_losses(runs: list[dict]) -> None:
    """Same weights, same tokens: every variant's first loss should agree (bf16 noise aside)."""
    firsts = [(r["variant"], r["batch"], r["first_loss"]) for r in runs if r.get("first_loss") is not None]
    for v, b, loss in firsts:
        ref = next((x for w, c, x in firsts if c == b and w == "eager"), None)
        if not math.isfinite(loss) or (ref is not None and abs(loss - ref) > 0.02 * abs(ref)):
            print(f"warning: {v} B={b} first loss {loss:.4f} differs from eager's {ref}", file=sys.stderr)


def print_table(payload: dict) -> None:
    rec = payload["recipe"]
    print(f"\ndepth {payload['depth']}, T={payload['seq_len']}: {payload['flops_per_token']:.4g} FLOPs/token; recipe "
          f"{rec['tokens']:.4g} tokens x {rec['flops_per_token']:.4g} = {rec['total_flops']:.4g} FLOPs on "
          f"{payload['gpus']} GPUs; record {RECORD_HOURS} h ({RECORD_LABEL})")
    print(f"{'variant':8} {'B':>3} {'acc':>3} {'step ms':>9} {'fwd+bwd':>9} {'optim':>8} {'tok/s/GPU':>10} "
          f"{'MFU':>6} {'peak GiB':>8} {'GPT-2 h':>8} {'x record':>8}")
    for r in payload["runs"]:
        head = f"{r['variant']:8} {r['batch']:>3} {r['accum']:>3}"
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(f"{head} {r['step_s'] * 1e3:9.1f} {r['fwd_bwd_s'] * 1e3:9.1f} {r['opt_s'] * 1e3:8.1f} "
              f"{r['tok_s_per_gpu']:10,.0f} {mfu:>6} {mem:>8} {r['projected_hours']:8.2f} {r['vs_record']:8.2f}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=None, help="model depth (default 24; 1 with --dry-run)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated micro-batches (default 16,32; 1 dry)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length T (default 2048; 32 dry)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 1 dry)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 dry)")
    p.add_argument("--vocab-size", type=int, default=None, help="default 32768 (256 dry)")
    p.add_argument("--ratio", type=float, default=SPEEDRUN_RATIO, help="tokens per scaling parameter of the recipe")
    p.add_argument("--gpus", type=int, default=RECORD_GPUS, help="GPUs of the projected run")
    p.add_argument("--total-batch-size", type=int, default=None,
                   help="tokens per optimizer step of the projected run, which sets the accumulation "
                        "(default: the recipe's batch for this depth, 2^20 at depth 24)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; eager dry)")
    p.add_argument("--out", default=None, help="results folder (default bench/results; --dry-run writes only here)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, Triton in the interpreter")
    args = p.parse_args(argv)
    dry = args.dry_run
    for name, full, tiny in (("depth", 24, 1), ("seq_len", 2048, 32), ("steps", 5, 1), ("warmup", 2, 1),
                             ("vocab_size", 32768, 256), ("compile_backend", "inductor", "eager")):
        if getattr(args, name) is None:
            setattr(args, name, tiny if dry else full)
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1" if dry else "16,32")).split(",")]
    if args.total_batch_size is None and dry:  # the dry run still accumulates two micro-batches
        args.total_batch_size = 2 * args.gpus * args.batch_sizes[0] * args.seq_len
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants takes a comma-separated subset of {', '.join(VARIANTS)}; got {bad or 'nothing'}")
    if args.depth < 1 or args.seq_len < 1 or args.steps < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--depth, --seq-len, --steps and --batch-sizes must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("bench.train_step: no CUDA device here, so nothing was timed; --dry-run exercises the script "
                  "on CPU with a tiny model")
            return 0
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: Triton on CPU tensors
    payload, errors = run(args)
    if not args.dry_run or args.out:
        print(f"wrote {write_result('train_step', payload, Path(args.out) if args.out else None)}")
    print_table(payload)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
