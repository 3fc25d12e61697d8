"""Train the BPE tokenizer on pretraining text and save it.

    python -m scripts.tok_train --vocab-size 32768 --max-chars 2_000_000_000 [--data DIR] [--out DIR]

Reads the training split of a data folder the way the trainer does (`train.data`: parquet shards with a
`text` column, the last one held out for validation, or `.txt` files); without `--data`, the embedded
corpus (built on first use). Prints the training time and the compression (UTF-8 bytes per token) on a few
held-out documents.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tritonchat.engine.cli import HelpFormatter, UsageError, command_name, run_main
from tritonchat.engine.paths import get_base_dir
from tritonchat.engine.tokenizer import SPECIAL_TOKENS, Tokenizer
from tritonchat.train import data

PROG = command_name("scripts.tok_train")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def _documents(data_dir, split: str) -> Iterator[str]:
    files = data.split_files(data.list_data_files(data_dir), split)
    for texts, _ in data.iter_documents(files, loop=False):
        yield from texts


def iter_texts(data_dir, max_chars: int, doc_cap: int = 10000) -> Iterator[str]:
    """Training-split documents of `data_dir`, each cut to `doc_cap` chars, `max_chars` chars in total."""
    if max_chars <= 0 or doc_cap <= 0:
        raise ValueError(f"max_chars and doc_cap must be positive, got {max_chars} and {doc_cap}")
    data.list_data_files(data_dir)  # fail now, not at the first next(), when there is nothing to read
    remaining = max_chars

    def gen() -> Iterator[str]:
        nonlocal remaining
        for doc in _documents(data_dir, "train"):
            doc = doc[: min(doc_cap, remaining)]
            remaining -= len(doc)
            yield doc
            if remaining <= 0:
                return

    return gen()


def held_out_texts(data_dir, n: int = 8) -> tuple[list[str], bool]:
    """Up to n documents of the validation split, and whether they are held out of training (there is more
    than one file)."""
    docs = []
    for text in _documents(data_dir, "val"):
        docs.append(text)
        if len(docs) == n:
            break
    return docs, len(data.list_data_files(data_dir)) > 1


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes / tokens over `texts` (the compression ratio)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode(texts))
    return n_bytes / max(n_tokens, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Train the tritonchat BPE tokenizer.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=32768, help="total vocab incl. 256 bytes and 9 specials")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters of text to train on")
    parser.add_argument("--doc-cap", type=int, default=10000, help="characters kept per document")
    parser.add_argument("--data", default=None, help="folder of parquet shards / .txt files (default: embedded corpus)")
    parser.add_argument("--out", default=None, help="output folder (default: <base>/tokenizer)")
    args = parser.parse_args(argv)
    # Checked before the corpus is built or read, so a typo costs nothing.
    if args.vocab_size < MIN_VOCAB:
        raise UsageError(f"--vocab-size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
                         f"tokens), got {args.vocab_size}")
    for flag in ("max_chars", "doc_cap"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.data is not None and not Path(args.data).exists():
        raise UsageError(f"--data {args.data}: no such file or folder")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    return args


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(get_base_dir())
    data_dir = Path(args.data) if args.data else data.ensure_default_corpus(base)
    out_dir = args.out or os.path.join(base, "tokenizer")
    texts = iter_texts(data_dir, args.max_chars, args.doc_cap)

    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size)
    elapsed = time.perf_counter() - t0
    tokenizer.save(out_dir)
    print(f"trained vocab {tokenizer.get_vocab_size()} in {elapsed:.2f}s, saved to {out_dir}")

    docs, held_out = held_out_texts(data_dir)
    if docs:
        label = "held-out" if held_out else "training (no validation shard)"
        print(f"compression on {len(docs)} {label} docs: {bytes_per_token(tokenizer, docs):.3f} bytes/token")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; user mistakes end in one line on stderr and exit code 2, Ctrl-C in one line."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
