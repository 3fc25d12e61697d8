"""Train the BPE tokenizer on pretraining text and save it.

    python -m scripts.tok_train --vocab-size 32768 --max-chars 2_000_000_000 --data DIR --out DIR

Reads the `text` column of every `*.parquet` in DIR (sorted; the last shard is validation and is left out
when there are several) and every `*.txt` file (one document per file). Prints the training time and the
compression (UTF-8 bytes per token) on a few held-out documents.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from collections.abc import Iterator

from engine.paths import get_base_dir
from engine.tokenizer import Tokenizer


def _data_files(data_dir: str) -> tuple[list[str], list[str]]:
    """(sorted *.parquet shards, sorted *.txt documents) directly inside data_dir."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist")
    parquets = sorted(glob.glob(os.path.join(data_dir, "*.parquet")))
    txts = sorted(glob.glob(os.path.join(data_dir, "*.txt")))
    if not parquets and not txts:
        raise FileNotFoundError(f"no *.parquet or *.txt files in {data_dir!r}")
    return parquets, txts


def _parquet_texts(path: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path!r} has no 'text' column (columns: {pf.schema_arrow.names})")
    for group in range(pf.num_row_groups):
        for text in pf.read_row_group(group, columns=["text"]).column("text").to_pylist():
            if text:
                yield text


def iter_texts(data_dir: str, max_chars: int, doc_cap: int = 10000) -> Iterator[str]:
    """Training documents from `data_dir`, each cut to `doc_cap` chars, `max_chars` chars in total.

    Parquet shards come first (sorted, the last one held out when there are several), then .txt files.
    """
    if max_chars <= 0 or doc_cap <= 0:
        raise ValueError(f"max_chars and doc_cap must be positive, got {max_chars} and {doc_cap}")
    parquets, txts = _data_files(data_dir)
    train_shards = parquets[:-1] if len(parquets) > 1 else parquets

    def documents() -> Iterator[str]:
        for path in train_shards:
            yield from _parquet_texts(path)
        for path in txts:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text:
                yield text

    remaining = max_chars
    for doc in documents():
        doc = doc[: min(doc_cap, remaining)]
        remaining -= len(doc)
        yield doc
        if remaining <= 0:
            return


def held_out_texts(data_dir: str, n: int = 8) -> tuple[list[str], bool]:
    """Up to n documents for measuring compression, and whether they were held out of training.

    The validation shard when there is one, else the first training documents.
    """
    parquets, _ = _data_files(data_dir)
    if len(parquets) > 1:
        docs = []
        for text in _parquet_texts(parquets[-1]):
            docs.append(text)
            if len(docs) == n:
                break
        return docs, True
    docs = []
    for text in iter_texts(data_dir, max_chars=10**9):
        docs.append(text)
        if len(docs) == n:
            break
    return docs, False


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes / tokens over `texts` (the compression ratio)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode(texts))
    return n_bytes / max(n_tokens, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the tritonchat BPE tokenizer.")
    parser.add_argument("--vocab-size", type=int, default=32768, help="total vocab incl. 256 bytes and 9 specials")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters of text to train on")
    parser.add_argument("--doc-cap", type=int, default=10000, help="characters kept per document")
    parser.add_argument("--data", default=None, help="folder of parquet shards / .txt files (default <base>/base_data)")
    parser.add_argument("--out", default=None, help="output folder (default <base>/tokenizer)")
    args = parser.parse_args(argv)

    data_dir = args.data or os.path.join(get_base_dir(), "base_data")
    out_dir = args.out or os.path.join(get_base_dir(), "tokenizer")
    _data_files(data_dir)  # fail before training if there is nothing to read

    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(iter_texts(data_dir, args.max_chars, args.doc_cap), args.vocab_size)
    elapsed = time.perf_counter() - t0
    tokenizer.save(out_dir)
    print(f"trained vocab {tokenizer.get_vocab_size()} in {elapsed:.2f}s, saved to {out_dir}")

    docs, held_out = held_out_texts(data_dir)
    if docs:
        label = "held-out" if held_out else "training (no validation shard)"
        print(f"compression on {len(docs)} {label} docs: {bytes_per_token(tokenizer, docs):.3f} bytes/token")


if __name__ == "__main__":
    main()
