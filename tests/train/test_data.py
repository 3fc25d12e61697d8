"""Data loading: file discovery, unit iteration with rank sharding and resumption, best-fit packing, the corpus.

A byte-level stub tokenizer (ids 0..255 are bytes, 256 is <|bos|>) makes rows easy to take apart: a BOS id marks
every document start.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonchat.train import corpus, data

BOS = 256


class ByteTokenizer:
    """Bytes as ids plus <|bos|> = 256; remembers every text it encoded."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def get_bos_token_id(self) -> int:
        return BOS

    def encode(self, texts: list[str], prepend: int | None = None) -> list[list[int]]:
        self.seen.extend(texts)
        head = [] if prepend is None else [prepend]
        return [head + list(t.encode("utf-8")) for t in texts]


def write_parquet(path: Path, texts: list[str], rows_per_group: int) -> Path:
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=rows_per_group)
    return path


def unit_dataset(folder: Path, groups_per_file: list[int], rows_per_group: int = 8) -> list[Path]:
    """Parquet files whose documents name their unit: "f{file}g{group}d{row} " followed by filler."""
    rng = np.random.default_rng(0)
    files = []
    for fi, n_groups in enumerate(groups_per_file):
        texts = [f"f{fi}g{rg}d{d} " + "x" * int(rng.integers(1, 120))
                 for rg in range(n_groups) for d in range(rows_per_group)]
        files.append(write_parquet(folder / f"shard_{fi:05d}.parquet", texts, rows_per_group))
    return files


def unit_of(text: str) -> tuple[int, int]:
    head = text.split(" ", 1)[0]
    f, rest = head[1:].split("g")
    return int(f), int(rest.split("d")[0])


def segments(row: list[int]) -> list[list[int]]:
    """A packed row cut at every BOS."""
    starts = [i for i, t in enumerate(row) if t == BOS] + [len(row)]
    assert starts[0] == 0, "a row must start with BOS"
    return [row[a:b] for a, b in zip(starts[:-1], starts[1:])]


def collect(loader: data.PackedLoader, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


# ---- packing ----------------------------------------------------------------------------------
def test_best_fit_hand_checked(tmp_path):
    # lengths with BOS: a 6, b 5, c 4, d 3, e 12, f 11; rows of T+1 = 10 tokens
    docs = {"d": "dd", "e": "e" * 11, "b": "bbbb", "a": "aaaaa", "f": "f" * 10, "c": "ccc"}
    path = write_parquet(tmp_path / "one.parquet", list(docs.values()), rows_per_group=64)
    loader = data.PackedLoader(ByteTokenizer(), [path], batch_size=1, seq_len=9, loop=False)
    rows = [torch.cat([x[0], y[0, -1:]]).tolist() for x, y in loader]

    def tok(s: str) -> list[int]:
        return [BOS] + list(s.encode())

    assert rows == [
        tok(docs["a"]) + tok(docs["c"]),  # 6 is the largest that fits 10, then 4 fills the rest
        tok(docs["b"]) + tok(docs["d"]) + tok(docs["f"])[:2],  # nothing fits 2: crop the shortest (f, 11)
        tok(docs["e"])[:10],  # e alone is left and longer than a row: cropped
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=90), seq_len=st.integers(1, 40),
       batch_size=st.integers(1, 4), buffer_docs=st.integers(1, 40), rows_per_group=st.integers(1, 50))
def test_packing_invariants(lengths, seq_len, batch_size, buffer_docs, rows_per_group):
    # document k is one distinct ASCII character repeated: its id can be read off any token but the BOS
    texts = [chr(33 + k) * n for k, n in enumerate(lengths)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_parquet(Path(tmp) / "docs.parquet", texts, rows_per_group)
        loader = data.PackedLoader(ByteTokenizer(), [path], batch_size, seq_len, buffer_docs=buffer_docs, loop=False)
        batches = collect(loader)
    used: dict[int, int] = {}  # doc id -> number of segments it appears in
    bare_bos = 0  # cropped to its BOS alone: no id to read
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (batch_size, seq_len)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for b in range(batch_size):
            row = inputs[b].tolist() + targets[b, -1:].tolist()
            assert len(row) == seq_len + 1 and row[0] == BOS
            segs = segments(row)
            for j, seg in enumerate(segs):
                if len(seg) == 1 and j == len(segs) - 1:
                    bare_bos += 1
                    continue
                assert len(seg) >= 2 and len(set(seg[1:])) == 1
                k = seg[1] - 33
                used[k] = used.get(k, 0) + 1
                if j < len(segs) - 1:
                    assert len(seg) == lengths[k] + 1, "only the last document of a row may be cropped"
                else:
                    assert len(seg) <= lengths[k] + 1
    assert all(count == 1 for count in used.values()), "a document was placed twice"
    assert len(used) + bare_bos <= len(lengths)
    assert len(batches) * batch_size * (seq_len + 1) <= sum(n + 1 for n in lengths)


def test_targets_shift_and_devices(tmp_path):
    files = unit_dataset(tmp_path, [3])
    inputs, targets = next(iter(data.PackedLoader(ByteTokenizer(), files, 4, 32)))
    assert inputs.device.type == "cpu" and inputs.is_contiguous() and targets.is_contiguous()
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert (inputs[:, 0] == BOS).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches(tmp_path):
    files = unit_dataset(tmp_path, [3])
    cpu = next(iter(data.PackedLoader(ByteTokenizer(), files, 4, 32)))
    gpu = next(iter(data.PackedLoader(ByteTokenizer(), files, 4, 32, device="cuda")))
    assert gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


def test_deterministic(tmp_path):
    files = unit_dataset(tmp_path, [4, 3])
    a = collect(data.PackedLoader(ByteTokenizer(), files, 3, 40, buffer_docs=10), 12)
    b = collect(data.PackedLoader(ByteTokenizer(), files, 3, 40, buffer_docs=10), 12)
    assert len(a) == 12 and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2), (2, 3)])
def test_resume_from_state_dict(tmp_path, rank, world_size):
    files = unit_dataset(tmp_path, [5, 4, 6])
    first = data.PackedLoader(ByteTokenizer(), files, 2, 48, rank=rank, world_size=world_size, buffer_docs=12)
    collect(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    assert set(state) == {"file_idx", "row_group_idx", "epoch", "row", "buffer"} and state["buffer"]
    saved = (state["file_idx"], state["row_group_idx"])

    tokenizers = [ByteTokenizer(), ByteTokenizer()]
    resumed = [data.PackedLoader(tok, files, 2, 48, rank=rank, world_size=world_size, state=state, buffer_docs=12)
               for tok in tokenizers]
    restored = len(tokenizers[0].seen)  # texts re-read to restore the buffer
    a, b = collect(resumed[0], 6), collect(resumed[1], 6)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    # exact: the resumed stream is the uninterrupted one
    full = collect(data.PackedLoader(ByteTokenizer(), files, 2, 48, rank=rank, world_size=world_size,
                                     buffer_docs=12), 11)[5:]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, full))

    read = []  # units read after resuming, in order, without repeats
    for text in tokenizers[0].seen[restored:]:
        if not read or read[-1] != unit_of(text):
            read.append(unit_of(text))
    mine = [(f, g) for f, n in enumerate([5, 4, 6]) for g in range(rank, n, world_size)]  # strided per file
    expected = [u for u in mine if u > saved] + mine  # the rest of this epoch, then the next
    assert read == expected[:len(read)]


def test_state_before_any_read_resumes_at_start(tmp_path):
    files = unit_dataset(tmp_path, [2, 2])
    fresh = data.PackedLoader(ByteTokenizer(), files, 2, 16)
    state = fresh.state_dict()
    a = collect(fresh, 3)
    b = collect(data.PackedLoader(ByteTokenizer(), files, 2, 16, state=state), 3)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


# ---- units: resumption and rank sharding ------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_iter_documents_resume_never_repeats_or_skips(tmp_path, world_size):
    files = unit_dataset(tmp_path, [3, 1, 4], rows_per_group=2)
    for rank in range(world_size):
        states = [s for _, s in data.iter_documents(files, rank, world_size, loop=False)]
        for k, state in enumerate(states):
            rest = [s for _, s in data.iter_documents(files, rank, world_size, start_state=state, loop=False)]
            assert rest == states[k + 1:]


def test_iter_documents_loops_over_epochs(tmp_path):
    files = unit_dataset(tmp_path, [2, 1], rows_per_group=2)
    it = data.iter_documents(files, rank=1, world_size=2)
    states = [next(it)[1] for _ in range(3)]
    assert states == [{"file_idx": 0, "row_group_idx": 1, "epoch": e, "row": 2} for e in range(3)]
    texts, _ = next(data.iter_documents(files, start_state={"file_idx": 1, "row_group_idx": 0, "epoch": 4}))
    assert unit_of(texts[0]) == (0, 0)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_read_disjoint_units_covering_all(tmp_path, world_size):
    groups = [3, 2, 4]
    files = unit_dataset(tmp_path, groups, rows_per_group=2)
    seen = []
    for rank in range(world_size):
        units = [(s["file_idx"], s["row_group_idx"]) for _, s in data.iter_documents(files, rank, world_size,
                                                                                      loop=False)]
        assert units == sorted(units)
        seen.append(set(units))
    assert sum(map(len, seen)) == sum(groups)
    assert set().union(*seen) == {(f, g) for f, n in enumerate(groups) for g in range(n)}


def test_loader_ranks_read_disjoint_documents(tmp_path):
    files = unit_dataset(tmp_path, [3, 3])
    toks = [ByteTokenizer(), ByteTokenizer()]
    for rank, tok in enumerate(toks):
        collect(data.PackedLoader(tok, files, 2, 32, rank=rank, world_size=2, buffer_docs=4, loop=False))
    assert toks[0].seen and toks[1].seen and not set(toks[0].seen) & set(toks[1].seen)
    assert {unit_of(t) for t in toks[0].seen} == {(0, 0), (0, 2), (1, 0), (1, 2)}  # row groups 0, 2 of each file


def test_rank_without_data_and_bad_state(tmp_path):
    files = unit_dataset(tmp_path, [1, 1])
    with pytest.raises(ValueError, match="rank 2"):
        next(data.iter_documents(files, rank=2, world_size=3))
    with pytest.raises(ValueError, match="does not match"):
        next(data.iter_documents(files, start_state={"file_idx": 5, "row_group_idx": 0, "epoch": 0}))


def test_no_documents_is_an_error_not_a_hang(tmp_path):
    path = write_parquet(tmp_path / "none.parquet", [], rows_per_group=1)
    with pytest.raises(ValueError, match="no document"):
        next(iter(data.PackedLoader(ByteTokenizer(), [path], 1, 8)))
    assert collect(data.PackedLoader(ByteTokenizer(), [path], 1, 8, loop=False)) == []


def test_empty_texts_are_lone_bos_documents(tmp_path):
    path = write_parquet(tmp_path / "blank.parquet", ["", "ab", ""], rows_per_group=2)
    rows = [torch.cat([x[0], y[0, -1:]]).tolist() for x, y in
            data.PackedLoader(ByteTokenizer(), [path], 1, 4, buffer_docs=1, loop=False)]
    # the first slice (row group 0) buffers "" and "ab": the longer goes first, then "" (a lone <|bos|>), then the
    # refill brings the last ""
    assert rows == [[BOS, 97, 98, BOS, BOS]]


# ---- files --------------------------------------------------------------------------------------
def test_missing_and_empty_folders(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.list_data_files(missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not data")
    with pytest.raises(FileNotFoundError, match="empty"):
        data.list_data_files(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad" / "shard_00000.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        data.list_data_files(tmp_path / "bad")


def test_split_files(tmp_path):
    files = unit_dataset(tmp_path, [1, 1, 1])
    assert data.list_data_files(tmp_path) == files
    assert data.split_files(files, "train") == files[:2] and data.split_files(files, "val") == files[2:]
    with pytest.warns(UserWarning, match="both"):
        assert data.split_files(files[:1], "val") == files[:1]
    with pytest.raises(ValueError):
        data.split_files(files, "test")


def test_txt_folder(tmp_path):
    (tmp_path / "a.txt").write_text("A short document about packing.\n")
    paragraphs = [f"Paragraph {i}. " + "words " * 60 for i in range(60)]
    (tmp_path / "b.txt").write_text("\n\n".join(paragraphs))
    files = data.list_data_files(tmp_path)
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    long_docs = [t for t, _ in data.iter_documents(files[1:], loop=False)][0]
    assert len(long_docs) > 1 and "\n\n".join(long_docs) == "\n\n".join(paragraphs)
    assert all(len(d) < data.TXT_DOC_CHARS + 500 for d in long_docs)
    tok = ByteTokenizer()
    inputs, targets = next(iter(data.PackedLoader(tok, data.split_files(files, "train"), 2, 16)))
    assert inputs.shape == (2, 16) and set(tok.seen) == {"A short document about packing.\n"}


def test_txt_that_is_not_utf8_is_read_as_latin1_with_a_warning(tmp_path):
    (tmp_path / "a.txt").write_bytes("Caf\u00e9 cr\u00e8me,\r\nna\u00efve.".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"a.txt is not UTF-8 \(byte 0xe9 at offset 3\): read as Latin-1"):
        docs = [t for t, _ in data.iter_documents(data.list_data_files(tmp_path), loop=False)]
    assert docs == [["Caf\u00e9 cr\u00e8me,\nna\u00efve."]]  # every character kept, no U+FFFD


# ---- the default corpus ---------------------------------------------------------------------------
def test_build_default_corpus(tmp_path, capsys):
    kwargs = dict(num_shards=3, rows_per_group=32, max_docs=300, workers=1)
    paths = corpus.build_default_corpus(tmp_path / "c", **kwargs)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert "300 documents" in capsys.readouterr().out
    files = data.list_data_files(tmp_path / "c")
    assert files == paths
    tables = [pq.read_table(p) for p in paths]
    sizes = [t.num_rows for t in tables]
    assert sum(sizes) == 300 and sizes[-1] == 15 and sizes[-1] < min(sizes[:-1])
    assert all(pq.ParquetFile(p).num_row_groups >= 2 for p in paths[:-1])
    texts = [x for t in tables for x in t.column("text").to_pylist()]
    assert len(set(texts)) == 300 and min(map(len, texts)) >= 64
    # deterministic
    again = corpus.build_default_corpus(tmp_path / "d", verbose=False, **kwargs)
    assert [pq.read_table(p).column("text").to_pylist() for p in again] == [t.column("text").to_pylist()
                                                                           for t in tables]


def test_ensure_default_corpus_builds_once(tmp_path, monkeypatch):
    kwargs = dict(num_shards=2, rows_per_group=64, max_docs=120, workers=1,
                  verbose=False)
    folder = data.ensure_default_corpus(tmp_path, **kwargs)
    assert folder == tmp_path / "data" / "pydocs" and corpus.corpus_is_complete(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "shard_00000.parquet", "shard_00001.parquet"]

    def fail(*args, **kw):
        raise AssertionError("rebuilt a complete corpus")

    monkeypatch.setattr(corpus, "build_default_corpus", fail)
    assert data.ensure_default_corpus(tmp_path) == folder
    monkeypatch.undo()

    (folder / "shard_00001.parquet").unlink()  # a half-built corpus is rebuilt
    assert not corpus.corpus_is_complete(folder)
    assert data.ensure_default_corpus(tmp_path, **kwargs) == folder and corpus.corpus_is_complete(folder)
    assert not list((tmp_path / "data").glob(".pydocs*"))


def test_state_naming_missing_rows_is_rejected(tmp_path):
    files = unit_dataset(tmp_path, [2, 2])
    loader = data.PackedLoader(ByteTokenizer(), files, 2, 16)
    collect(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        data.PackedLoader(ByteTokenizer(), files, 2, 16, state={**state, "buffer": [[0, 0, 10_000]]})
    with pytest.raises(ValueError, match="lacks"):
        data.PackedLoader(ByteTokenizer(), files, 2, 16, state={**state, "buffer": [[7, 0, 0]]})


def test_corpus_reads_the_standard_library_only(tmp_path, monkeypatch):
    """Installed packages never enter; a file that is not in its declared encoding is skipped and counted."""
    root = tmp_path / "lib"
    texts = {}
    for sub in ("", "json", "site-packages/numpy", "dist-packages/torch"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        texts[sub] = f"The {sub or 'top'} module docstring, long enough to be kept in the corpus for sure."
        (root / sub / "mod.py").write_text(f'"""{texts[sub]}"""\n')
    doc = "A Latin-1 docstring declared as such: caf\u00e9, cr\u00e8me br\u00fbl\u00e9e, well over the minimum."
    (root / "declared.py").write_bytes(f'# -*- coding: latin-1 -*-\n"""{doc}"""\n'.encode("latin-1"))
    (root / "undeclared.py").write_bytes(f'"""{doc}"""\n'.encode("latin-1"))  # not UTF-8, no coding line
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: root)
    skipped = []
    docs = corpus.collect_documents(workers=1, skipped=skipped)
    from pydoc_data.topics import topics

    assert docs[len(docs) - 3:] == [doc, texts["json"], texts[""]]  # sorted path order
    assert len(docs) - 3 <= len(topics)
    assert texts["site-packages/numpy"] not in docs and texts["dist-packages/torch"] not in docs
    assert skipped == ["undeclared.py"] and not any("\ufffd" in d for d in docs)


def test_corpus_manifest_records_its_source(tmp_path):
    corpus.build_default_corpus(tmp_path, num_shards=2, max_docs=100, workers=1, verbose=False)
    manifest = json.loads((tmp_path / corpus.MANIFEST).read_text())
    assert manifest["stdlib"] == str(corpus.stdlib_dir()) and isinstance(manifest["skipped_files"], list)
    assert len(manifest["sha256"]) == 64 and "include_site_packages" not in manifest
    assert all("site-packages" not in p.parts and "dist-packages" not in p.parts
               for p in corpus._python_files(corpus.stdlib_dir()))


# ---- data errors: one line, naming the file and row group -----------------------------------------
def test_corrupt_page_names_file_and_row_group(tmp_path):
    path = write_parquet(tmp_path / "shard_00000.parquet", [f"document {i} " * 20 for i in range(64)], 16)
    meta = pq.ParquetFile(path).metadata.row_group(2).column(0)
    raw = bytearray(path.read_bytes())
    start = meta.data_page_offset
    raw[start:start + 64] = b"\xff" * 64  # the page header of row group 2
    path.write_bytes(bytes(raw))
    loader = data.PackedLoader(ByteTokenizer(), [path], 1, 8, buffer_docs=40)
    with pytest.raises(ValueError) as err:
        collect(loader, 200)
    message = str(err.value)
    assert str(path) in message and "row group 2" in message and "\n" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.parametrize("column,match", [(pa.array([1, 2, 3]), "holds int64, not strings"),
                                          (pa.array(["a", None, "c"]), "row group 0, row 1: the text is null")])
def test_bad_text_column_names_the_file(tmp_path, column, match):
    path = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"text": column}), path)
    with pytest.raises(ValueError, match=match) as err:
        next(iter(data.PackedLoader(ByteTokenizer(), [path], 1, 8)))
    assert str(path) in str(err.value)


def test_equal_lengths_go_in_buffer_order(tmp_path):
    # four documents of 3 tokens; rows of 7 take two whole ones (the earliest first) and crop the next earliest
    path = write_parquet(tmp_path / "ties.parquet", ["ab", "cd", "ef", "gh", "ijklmnop"], rows_per_group=8)
    rows = [torch.cat([x[0], y[0, -1:]]).tolist() for x, y in
            data.PackedLoader(ByteTokenizer(), [path], 1, 6, loop=False)]
    a, c, e, g = ([BOS, ord(s), ord(s) + 1] for s in "aceg")
    assert rows[0] == a + c + e[:1]
    assert rows[1] == g + [BOS] + list(b"ijk")  # then the shortest (9 tokens, the only one left) is cropped


def test_older_state_without_row_restores_its_buffer(tmp_path):
    # older loaders dropped empty texts, so their buffer rows count the non-empty texts of a row group
    path = write_parquet(tmp_path / "shard_00000.parquet", ["", "ab", "", "cde", "f"], rows_per_group=5)
    old = {"file_idx": 0, "row_group_idx": 0, "epoch": 0, "buffer": [[0, 0, 2], [0, 0, 0], [0, 0, 1]]}
    loader = data.PackedLoader(ByteTokenizer(), [path], 1, 2, state=old, loop=False)
    assert [d.tolist() for d in loader._docs] == [[BOS, 102], [BOS, 97, 98], [BOS, 99, 100]]
    assert loader._lens == [2, 3, 4] and collect(loader)  # the row group is done: nothing more is read
