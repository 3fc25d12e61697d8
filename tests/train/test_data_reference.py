"""The loader against a plain restatement of the reference's packing (nanochat's BOS-aligned best fit, SPEC §9):
the same batches on the same shards for 1 and 2 ranks, with empty and very long documents; resuming from a
reference loader state; bounded memory with million-character documents.

`reference_slices` / `reference_batches` restate the reference's rules directly, with plain lists and linear
scans, and share no code with the loader:
- train files in order; rank r of W reads row groups r, r+W, ... of each file; every text of a row group (an
  empty one too) in slices of 128; after the last file the epoch (counted from 1) goes up and reading restarts;
- a resume state {pq_idx, rg_idx, epoch} restarts at row group (rg_idx // W + 1) * W + r of file pq_idx, or at
  the next file when that is past the end, with an empty buffer;
- before every placement, slices are tokenized (<|bos|> prepended) and appended to the buffer until it holds at
  least 1000 documents;
- a row of T+1 tokens takes the longest buffered document that fits whole (the first in buffer order among
  equal lengths), again and again; when none fits, the shortest (the first among equals) is cropped to fill it.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tritonchat.engine.tokenizer import Tokenizer
from tritonchat.train import data

WORDS = ("the a of to and in loader packs documents into rows best fit each row starts with bos token longest "
         "shortest crop buffer slice rank epoch shard").split()


def reference_slices(files: list[Path], rank: int, world: int, resume: dict | None = None, per_slice: int = 128):
    pq_start = resume["pq_idx"] if resume else 0
    rg_resume = resume["rg_idx"] if resume else None
    epoch = resume.get("epoch", 1) if resume else 1
    first_pass = True
    while True:
        for pq_idx in range(pq_start if first_pass else 0, len(files)):
            pf = pq.ParquetFile(files[pq_idx])
            if first_pass and rg_resume is not None and pq_idx == pq_start:
                rg_idx = (rg_resume // world + 1) * world + rank
            else:
                rg_idx = rank
            while rg_idx < pf.num_row_groups:
                texts = pf.read_row_group(rg_idx).column("text").to_pylist()
                for i in range(0, len(texts), per_slice):
                    yield texts[i:i + per_slice], (pq_idx, rg_idx, epoch)
                rg_idx += world
        first_pass = False
        epoch += 1


def reference_batches(tok, files, B: int, T: int, rank: int = 0, world: int = 1, resume: dict | None = None,
                      buffer_size: int = 1000):
    """Yield (rows as a (B, T+1) tensor, {pq_idx, rg_idx, epoch})."""
    slices = reference_slices(files, rank, world, resume)
    bos = tok.get_bos_token_id()
    buffer: list[list[int]] = []
    where = (0, 0, 1)
    while True:
        rows = []
        for _ in range(B):
            row: list[int] = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    texts, where = next(slices)
                    buffer.extend(tok.encode(texts, prepend=bos))
                room = T + 1 - len(row)
                best = -1
                for i, doc in enumerate(buffer):
                    if len(doc) <= room and (best < 0 or len(doc) > len(buffer[best])):
                        best = i
                if best >= 0:
                    row.extend(buffer.pop(best))
                else:
                    shortest = 0
                    for i, doc in enumerate(buffer):
                        if len(doc) < len(buffer[shortest]):
                            shortest = i
                    row.extend(buffer.pop(shortest)[:room])
            rows.append(row)
        yield torch.tensor(rows), {"pq_idx": where[0], "rg_idx": where[1], "epoch": where[2]}


def rows_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.cat([x, y[:, -1:]], dim=1)


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three files of 300-row row groups ([3, 2, 1] of them): word documents of many equal lengths, about 1 in 20
    empty, and a long one (40K-150K characters, past the tokenizer's part size) in about every other row group."""
    folder = tmp_path_factory.mktemp("shards")
    rng = random.Random(16)
    files = []
    for fi, groups in enumerate([3, 2, 1]):
        texts = []
        for g in range(groups):
            group = ["" if rng.random() < 0.05 else sentence(rng, rng.choice([3, 5, 5, 8, 12, 20, 40, 70]))
                     for _ in range(300)]
            if (fi + g) % 2 == 0:
                group[rng.randrange(300)] = sentence(rng, rng.randint(8_000, 30_000))
            texts += group
        path = folder / f"shard_{fi:05d}.parquet"
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=300)
        files.append(path)
    tok = Tokenizer.train_from_iterator(iter([sentence(rng, 50) for _ in range(200)]), vocab_size=300)
    assert max(len(t) for f in files for t in pq.read_table(f).column("text").to_pylist()) > data.LONG_DOC_CHARS
    return files, tok


@pytest.mark.parametrize("world,T,buffer_docs", [(1, 64, 1000), (2, 64, 1000), (1, 300, 60), (2, 300, 60)])
def test_batches_equal_the_references(shards, world, T, buffer_docs):
    files, tok = shards
    B, steps = 2, 50
    for rank in range(world):
        ours = data.PackedLoader(tok, files, B, T, rank=rank, world_size=world, buffer_docs=buffer_docs)
        ref = reference_batches(tok, files, B, T, rank, world, buffer_size=buffer_docs)
        epochs = set()
        for step in range(steps):
            want, state = next(ref)
            got = rows_of(next(ours))
            assert torch.equal(got, want), f"rank {rank} of {world}, step {step}"
            epochs.add(state["epoch"])
        if rank == 1 and buffer_docs == 1000:  # 600 documents: filling the buffer reads every epoch twice
            assert len(epochs) > 1, "the case meant to cross an epoch end did not"


@pytest.mark.parametrize("world", [1, 2])
def test_resume_from_a_reference_state(shards, world):
    files, tok = shards
    B, T = 2, 100
    ref0 = reference_batches(tok, files, B, T, 0, world, buffer_size=200)
    for _ in range(7):
        _, state = next(ref0)  # the reference saves rank 0's state; every rank resumes from it
    for rank in range(world):
        ours = data.PackedLoader(tok, files, B, T, rank=rank, world_size=world, state=dict(state), buffer_docs=200)
        ref = reference_batches(tok, files, B, T, rank, world, resume=state, buffer_size=200)
        for step in range(20):
            assert torch.equal(rows_of(next(ours)), next(ref)[0]), f"rank {rank} of {world}, step {step}"
        # and our own state from there resumes exactly
        saved = ours.state_dict()
        again = data.PackedLoader(tok, files, B, T, rank=rank, world_size=world, state=saved, buffer_docs=200)
        for _ in range(5):
            assert torch.equal(rows_of(next(again)), rows_of(next(ours)))


def test_million_character_documents_stay_in_bounds(tmp_path):
    """Six 1M-character documents among short ones: the loader's Python heap peaks below 24 MB (their text alone
    is 6 MB; tokenized whole, together, they would take about 50 MB) and the first batches come within 30 s."""
    rng = random.Random(1)
    tok = Tokenizer.train_from_iterator(iter([sentence(rng, 50) for _ in range(200)]), vocab_size=300)
    long_text = sentence(rng, 250_000)[:1_000_000]
    texts = [sentence(rng, rng.randint(1, 60)) for _ in range(200)]
    for k in range(6):
        texts[3 + 7 * k] = long_text[k:] + long_text[:k]
    path = tmp_path / "long.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=200)
    T = 2048
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        loader = data.PackedLoader(tok, [path], 2, T, buffer_docs=50)
        for _ in range(3):
            next(loader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 30
    print(f"peak {peak / 1e6:.1f} MB")
    assert peak < 24e6, f"peak {peak / 1e6:.1f} MB"
    assert max(len(d) for d in loader._docs) <= T + 1  # long documents are kept cropped
