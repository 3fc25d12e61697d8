"""Pretraining loader throughput (train/data.py): packed tokens per second on the CPU, against a GPU's appetite.

    python -m bench.loader                       # B 32 x T 2048, 1 and up to 4 tokenizer threads, synthetic data
    python -m bench.loader --data DIR --tokenizer DIR   # your shards and tokenizer (e.g. the reference's)
    python -m bench.loader --dry-run             # tiny: B 2 x T 64, a 300-token vocabulary; writes only with --out

Per thread count, a fresh `PackedLoader` (the reference's 1000-document buffer) packs --batches batches after one
untimed batch (the first fills the buffer); tok/s = batches * B * T / the median of --reps timings. These are
tokens the GPU receives; the loader reads about a third more, which cropping drops.

The bar: one GPU of the reference's GPT-2 run (depth 24, SPEC §12) trains RECORD_TOK_S_PER_GPU = 122.9K tok/s, so
its step of 2^20 tokens over 8 GPUs (131,072 per GPU) takes about 1.07 s; each rank runs its own loader, so a rank's
loader keeps up when its tok/s >= 122.9K (headroom = loader tok/s / 122.9K; the next batch is packed while the GPU
runs the step). With 8 ranks a node's cores are shared 8 ways: compare the 1-thread figure.

Synthetic shards: English-like documents (pseudo-words, lognormal lengths around 300 words, about 1 in 50 empty),
128-row row groups, and a BPE tokenizer trained on them (--vocab-size, default 4096: the synthetic text supports
no more merges than that usefully). Tokenizer speed per byte depends on the text and vocabulary, so a result on
real shards with the real tokenizer is the one to quote.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tritonchat.bench.common import RECORD_GPUS, RECORD_TOK_S_PER_GPU, median, write_result

RECORD_STEP_TOKENS = 2**20  # the reference d24 run's total batch (SPEC §12)


def synthetic_texts(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "ve", "do", "pa", "gri", "sto", "an", "el", "or", "th"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1 / (k + 1) for k in range(len(words))]  # Zipf-like word frequencies
    texts = []
    for _ in range(n_docs):
        if rng.random() < 0.02:
            texts.append("")
            continue
        n = max(1, int(rng.lognormvariate(math.log(300), 0.8)))
        body = rng.choices(words, weights, k=n)
        sentences = [" ".join(body[i:i + 15]).capitalize() + "." for i in range(0, n, 15)]
        texts.append(" ".join(sentences))
    return texts


def build_inputs(folder: Path, n_docs: int, vocab_size: int):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tritonchat.engine.tokenizer import Tokenizer

    texts = synthetic_texts(n_docs)
    path = folder / "shard_00000.parquet"
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=128)
    tok = Tokenizer.train_from_iterator(iter(texts[:2000]), vocab_size=vocab_size)
    return [path], tok


def measure(tok, files, batch: int, seq_len: int, threads: int, batches: int, reps: int) -> dict:
    from tritonchat.train.data import PackedLoader

    times = []
    for _ in range(reps):
        loader = PackedLoader(tok, files, batch, seq_len, tokenizer_threads=threads)
        t0 = time.perf_counter()
        next(loader)  # fills the 1000-document buffer
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            next(loader)
        times.append(time.perf_counter() - t0)
    tok_s = batches * batch * seq_len / median(times)
    return {"threads": threads, "tok_s": tok_s, "first_batch_s": first, "seconds": times,
            "headroom_vs_d24_gpu": tok_s / RECORD_TOK_S_PER_GPU}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None, help="rows per batch (default 32; 2 dry)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; 64 dry)")
    p.add_argument("--batches", type=int, default=None, help="timed batches per run (default 20; 3 dry)")
    p.add_argument("--reps", type=int, default=None, help="runs per thread count, median taken (default 3; 1 dry)")
    p.add_argument("--threads", default=None, help="tokenizer threads, comma-separated (default 1,min(4,CPUs))")
    p.add_argument("--docs", type=int, default=None, help="synthetic documents (default 6000; 1200 dry)")
    p.add_argument("--vocab-size", type=int, default=None, help="synthetic tokenizer's vocab (default 4096; 300 dry)")
    p.add_argument("--data", default=None, help="a folder of parquet shards (its training split) instead of synthetic")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (tokenizer.pkl) instead of a trained one")
    p.add_argument("--out", default=None, help="results folder (default bench/results; --dry-run writes only here)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, a quick check of the script")
    args = p.parse_args(argv)
    for name, full, tiny in (("batch", 32, 2), ("seq_len", 2048, 64), ("batches", 20, 3), ("reps", 3, 1),
                             ("docs", 6000, 1200), ("vocab_size", 4096, 300)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.dry_run else full)
    if args.threads is None:
        args.threads = f"1,{min(2 if args.dry_run else 4, os.cpu_count() or 1)}"
    try:
        args.threads = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    except ValueError:
        p.error("--threads takes comma-separated integers")
    if not args.threads or min(args.threads) < 1:
        p.error("--threads takes integers >= 1")
    if min(args.batch, args.seq_len, args.batches, args.reps, args.docs) < 1:
        p.error("sizes must be >= 1")
    return args


def run(args) -> dict:
    from tritonchat.engine.tokenizer import Tokenizer
    from tritonchat.train import data

    with tempfile.TemporaryDirectory() as tmp:
        files, tok = build_inputs(Path(tmp), args.docs, args.vocab_size)
        if args.data:
            files = data.split_files(data.list_data_files(args.data), "train")
        if args.tokenizer:
            tok = Tokenizer.from_directory(args.tokenizer)
        runs = [measure(tok, files, args.batch, args.seq_len, t, args.batches, args.reps) for t in args.threads]
    per_gpu_step_tokens = RECORD_STEP_TOKENS // RECORD_GPUS
    return {"batch": args.batch, "seq_len": args.seq_len, "batches": args.batches, "reps": args.reps,
            "data": args.data or f"synthetic, {args.docs} documents", "vocab_size": tok.get_vocab_size(),
            "cpu_count": os.cpu_count(), "runs": runs,
            "gpu_bar": {"tok_s_per_gpu": RECORD_TOK_S_PER_GPU, "step_tokens_per_gpu": per_gpu_step_tokens,
                        "step_s": per_gpu_step_tokens / RECORD_TOK_S_PER_GPU,
                        "source": "reference d24 run, SPEC §12"}}


def print_table(payload: dict) -> None:
    bar = payload["gpu_bar"]
    print(f"\nloader: B {payload['batch']} x T {payload['seq_len']}, {payload['data']}, vocab {payload['vocab_size']}")
    print(f"bar: a d24 GPU step takes {bar['step_s']:.2f} s for {bar['step_tokens_per_gpu']:,} tokens "
          f"({bar['tok_s_per_gpu']:,.0f} tok/s per GPU)")
    print(f"{'threads':>7} {'tok/s':>12} {'first batch s':>14} {'x GPU need':>11} {'s per d24 step':>15}")
    for r in payload["runs"]:
        step = bar["step_tokens_per_gpu"] / r["tok_s"]
        print(f"{r['threads']:7d} {r['tok_s']:12,.0f} {r['first_batch_s']:14.2f} {r['headroom_vs_d24_gpu']:11.2f} "
              f"{step:15.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    if not args.dry_run or args.out:
        print(f"wrote {write_result('loader', payload, Path(args.out) if args.out else None)}")
    print_table(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
