"""Pretraining data: find the files, read documents by row group, pack them into rows of tokens (SPEC §9).

Files. A data folder holds parquet shards with a `text` column (`shard_00000.parquet`, ...), or, when it holds
no parquet file, `.txt` files. The files are taken in sorted order and the last one is the validation split.
A `.txt` file is read as UTF-8; one that is not valid UTF-8 is read as Latin-1 (every byte one character, nothing
replaced or dropped) with a warning naming the file: convert it (`iconv -f ENCODING -t UTF-8`) if it is another
encoding.

Units. Reading is done in units: one parquet row group, or one whole `.txt` file. A `.txt` file of up to 8 KiB is
one document; a longer one is cut at blank lines into documents of about 4 KiB (consecutive paragraphs joined).
The units of all files, in order, get a global index g; rank r of W reads the units with g % W == r, so ranks
read disjoint units that together cover the data. A position is a plain dict
{"file_idx", "row_group_idx", "epoch"} naming the last unit read (epochs count from 0); before any unit it is
{"file_idx": 0, "row_group_idx": -1, "epoch": 0}.

Packing (best fit). Every document is tokenized with `<|bos|>` prepended and kept in a buffer sorted by length.
A row of T+1 tokens starts at a document boundary; the largest buffered document that fits whole in what is left
of the row is placed, again and again; when none fits, the shortest buffered document is cropped to fill the row
exactly and its remainder is dropped. No padding, so every token is a real one. inputs = row[:-1],
targets = row[1:].

Resuming. `PackedLoader.state_dict()` is the position of the last unit read into the buffer plus a reference
(file, row group, row) to every document still buffered, in buffer order. A loader built with that state re-reads
and re-tokenizes just those documents, restores the buffer exactly and continues at the rank's next unit: the
batch stream after a resume is identical to the uninterrupted one, and no unit is read twice. Given the same
files, state and settings, two loaders yield identical batches.
"""

from __future__ import annotations

import os
import warnings
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
import torch
from tritonchat.train.corpus import build_default_corpus, ensure_default_corpus

__all__ = ["build_default_corpus", "ensure_default_corpus", "list_data_files", "split_files", "iter_documents",
           "PackedLoader", "num_units", "estimate_tokens"]

TXT_WHOLE_CHARS = 8192  # a .txt file up to this long is one document
TXT_DOC_CHARS = 4096  # a longer one is cut at blank lines into documents of about this many characters


class TokenizerLike(Protocol):
    def get_bos_token_id(self) -> int: ...

    def encode(self, text: list[str], prepend: int | None = None) -> list[list[int]]: ...


# ---- files -------------------------------------------------------------------------------------
def _check_parquet(path: Path) -> None:
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # any unreadable footer is reported the same way
        raise ValueError(f"{path} is not a readable parquet file: {e}") from e
    if "text" not in names:
        raise ValueError(f"{path} has no 'text' column (columns: {names})")


def list_data_files(data_dir: str | os.PathLike) -> list[Path]:
    """The data files in `data_dir`, sorted: every `*.parquet` (each must have a `text` column) or, when there is
    none, every `*.txt`. A path to a single such file gives [that file]. Hidden files are ignored.

    Raises FileNotFoundError when the path does not exist or holds no data file, ValueError for a parquet file
    without a `text` column.
    """
    path = Path(data_dir)
    if path.is_file() and path.suffix in (".parquet", ".txt"):
        files = [path]
    elif not path.is_dir():
        raise FileNotFoundError(f"data folder {path} does not exist")
    else:
        visible = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        parquets = [p for p in visible if p.suffix == ".parquet"]
        txts = [p for p in visible if p.suffix == ".txt"]
        if parquets and txts:
            warnings.warn(f"{path} holds both .parquet and .txt files: reading the parquet shards only", stacklevel=2)
        files = parquets or txts
        if not files:
            raise FileNotFoundError(f"no *.parquet or *.txt files in data folder {path}")
    for f in files:
        if f.suffix == ".parquet":
            _check_parquet(f)
    return files


def split_files(files: Sequence[str | os.PathLike], split: str) -> list[Path]:
    """"train": every file but the last; "val": the last. With a single file, both splits are that file (the
    validation loss then measures data the model trains on; a warning says so)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no data files to split")
    if len(files) == 1:
        warnings.warn(f"a single data file ({files[0]}) serves as both the training and the validation split",
                      stacklevel=2)
        return files
    return files[:-1] if split == "train" else files[-1:]


# ---- documents by unit -------------------------------------------------------------------------
def _split_txt(text: str) -> list[str]:
    """One document, or for a long text, runs of whole paragraphs of about TXT_DOC_CHARS characters."""
    if len(text) <= TXT_WHOLE_CHARS:
        return [text] if text.strip() else []
    docs, current, size = [], [], 0
    for para in text.replace("\r\n", "\n").split("\n\n"):
        if not para.strip():
            continue
        current.append(para)
        size += len(para) + 2
        if size >= TXT_DOC_CHARS:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def _num_units(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_row_groups if path.suffix == ".parquet" else 1


def num_units(files: Sequence[str | os.PathLike]) -> int:
    """How many reading units (row groups or .txt files) the files hold in all."""
    return sum(_num_units(Path(f)) for f in files)


def _text_bytes(path: Path) -> int:
    """About how many bytes of text a file holds: the `text` column's uncompressed size, or the file's size."""
    if path.suffix != ".parquet":
        return path.stat().st_size
    meta = pq.ParquetFile(path).metadata
    col = meta.schema.to_arrow_schema().get_field_index("text")
    return sum(meta.row_group(i).column(col).total_uncompressed_size for i in range(meta.num_row_groups))


def estimate_tokens(files: Sequence[str | os.PathLike], tokenizer: TokenizerLike) -> int:
    """About how many tokens the files hold (one pass): their text bytes (parquet metadata, no reading) over the
    bytes per token of the first non-empty unit, which is tokenized. For warnings, not for exact counts."""
    files = [Path(f) for f in files]
    for f in files:
        for unit in range(_num_units(f)):
            texts = _read_unit(f, unit)
            if texts:
                ids = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())
                per_token = sum(len(t.encode("utf-8")) for t in texts) / max(1, sum(map(len, ids)))
                return int(sum(_text_bytes(p) for p in files) / max(per_token, 1e-9))
    return 0


def _read_unit(path: Path, row_group: int) -> list[str]:
    if path.suffix == ".parquet":
        texts = pq.ParquetFile(path).read_row_group(row_group, columns=["text"]).column("text").to_pylist()
        return [t for t in texts if t]
    return _split_txt(_read_txt(path))


def _read_txt(path: Path) -> str:
    """The text of a .txt file: UTF-8, or Latin-1 with a warning when it is not valid UTF-8 (never replacement
    characters, which would change the text silently); line ends become "\n", as in text mode."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        warnings.warn(f"{path} is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}): read as Latin-1",
                      stacklevel=3)
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_documents(files: Sequence[str | os.PathLike], rank: int = 0, world_size: int = 1,
                   start_state: dict | None = None, loop: bool = True) -> Iterator[tuple[list[str], dict]]:
    """Yield (texts, state) per unit (row group or .txt file) of this rank, starting after `start_state`.

    `state` = {"file_idx", "row_group_idx", "epoch"} names the unit just yielded; passing it as `start_state`
    continues with the rank's next unit. With `loop`, the data is read again from the start forever (epoch + 1);
    without, iteration ends after the last unit.
    """
    files = [Path(f) for f in files]
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    counts = [_num_units(f) for f in files]
    offsets = np.cumsum([0] + counts).tolist()
    total = offsets[-1]
    if total <= rank:
        raise ValueError(f"rank {rank} of {world_size} gets no data: only {total} row groups in {len(files)} files")
    unit_of = [(fi, rg) for fi, n in enumerate(counts) for rg in range(n)]

    last, epoch = -1, 0  # global index of the last unit read, -1: none yet
    if start_state is not None:
        fi, rg, epoch = int(start_state["file_idx"]), int(start_state["row_group_idx"]), int(start_state["epoch"])
        if not (0 <= fi < len(files) and -1 <= rg < counts[fi]):
            raise ValueError(f"loader state {start_state} does not match the data: {len(files)} files with "
                             f"{counts} row groups")
        last = offsets[fi] + rg
    g = last + 1 + (rank - (last + 1)) % world_size  # this rank's first unit after `last`
    whole_pass, any_text = g == rank, False  # an endless loop over units without a document must end
    while True:
        if g >= total:
            if not loop:
                return
            if whole_pass and not any_text:
                raise ValueError(f"rank {rank} of {world_size} found no non-empty document in {len(files)} files")
            epoch, g, whole_pass, any_text = epoch + 1, rank, True, False
        fi, rg = unit_of[g]
        texts = _read_unit(files[fi], rg)
        any_text = any_text or bool(texts)
        yield texts, {"file_idx": fi, "row_group_idx": rg, "epoch": epoch}
        g += world_size


# ---- best-fit packing --------------------------------------------------------------------------
class PackedLoader:
    """Batches of packed token rows: iterate for (inputs, targets), each int64 (B, T) on `device`.

    `tokenizer` needs `get_bos_token_id()` and `encode(list_of_texts, prepend=bos_id) -> list[list[int]]`.
    `buffer_docs`: documents kept buffered for best-fit packing (more: less cropping, more memory). `state`: a
    `state_dict()` to resume from (see the module docstring for what resuming replays). `loop`: read the data
    again after the last unit; without, iteration stops when a batch can no longer be filled (the partial batch
    is dropped).
    """

    def __init__(self, tokenizer: TokenizerLike, files: Sequence[str | os.PathLike], batch_size: int, seq_len: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1, state: dict | None = None,
                 buffer_docs: int = 1000, loop: bool = True):
        if batch_size < 1 or seq_len < 1 or buffer_docs < 1:
            raise ValueError(f"need batch_size, seq_len, buffer_docs >= 1, got {batch_size}, {seq_len}, {buffer_docs}")
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len, self.buffer_docs = batch_size, seq_len, buffer_docs
        self.device = torch.device(device)
        self._bos = tokenizer.get_bos_token_id()
        self._files = [Path(f) for f in files]
        position = None if state is None else {k: state[k] for k in ("file_idx", "row_group_idx", "epoch")}
        self._units = iter_documents(self._files, rank, world_size, position, loop)
        self._state = position or {"file_idx": 0, "row_group_idx": -1, "epoch": 0}
        self._exhausted = False
        # The buffer, sorted by length: _lens[i] == len(_docs[i]); _refs[i] = (file_idx, row_group_idx, row) names
        # where _docs[i] came from, so a checkpoint can restore the buffer. Equal lengths keep arrival order.
        self._lens: list[int] = []
        self._docs: list[np.ndarray] = []
        self._refs: list[tuple[int, int, int]] = []
        if state is not None and state.get("buffer"):
            self._restore_buffer(state["buffer"])

    def state_dict(self) -> dict:
        """{"file_idx", "row_group_idx", "epoch"} of the last unit read, and "buffer": [[file_idx, row_group_idx,
        row], ...] for the documents still buffered (JSON-serializable)."""
        return {**self._state, "buffer": [list(r) for r in self._refs]}

    def _restore_buffer(self, refs: list) -> None:
        """Re-read and re-tokenize the buffered documents a state names, in the saved order."""
        refs = [tuple(int(v) for v in r) for r in refs]
        tokens: dict[tuple[int, int], list[list[int]]] = {}
        for fi, rg, _ in refs:
            if (fi, rg) not in tokens:
                if not 0 <= fi < len(self._files) or not 0 <= rg < _num_units(self._files[fi]):
                    raise ValueError(f"loader state names row group {rg} of file {fi}, which the data lacks")
                tokens[(fi, rg)] = self.tokenizer.encode(_read_unit(self._files[fi], rg), prepend=self._bos)
        for fi, rg, row in refs:
            unit = tokens[(fi, rg)]
            if not 0 <= row < len(unit):
                raise ValueError(f"loader state names row {row} of row group {rg} of file {fi}, which the data lacks")
            doc = np.asarray(unit[row], dtype=np.int32)
            self._lens.append(len(doc))
            self._docs.append(doc)
            self._refs.append((fi, rg, row))

    def _refill(self) -> None:
        """Read units until at least `buffer_docs` documents are buffered or the data ends."""
        while len(self._lens) < self.buffer_docs and not self._exhausted:
            try:
                texts, self._state = next(self._units)
            except StopIteration:
                self._exhausted = True
                return
            if not texts:
                continue
            fi, rg = self._state["file_idx"], self._state["row_group_idx"]
            for row, ids in enumerate(self.tokenizer.encode(texts, prepend=self._bos)):
                doc = np.asarray(ids, dtype=np.int32)
                i = bisect_right(self._lens, len(doc))
                self._lens.insert(i, len(doc))
                self._docs.insert(i, doc)
                self._refs.insert(i, (fi, rg, row))

    def _fill_row(self, row: np.ndarray) -> bool:
        """Pack one row (length T+1) in place; False when the data ran out first."""
        pos, n = 0, len(row)
        lens, docs, refs = self._lens, self._docs, self._refs
        while pos < n:
            if len(lens) < self.buffer_docs:
                self._refill()
                if not lens:
                    return False
            room = n - pos
            i = bisect_right(lens, room) - 1  # the largest document that fits whole
            if i >= 0:
                size = lens.pop(i)
                refs.pop(i)
                row[pos:pos + size] = docs.pop(i)
                pos += size
            else:  # none fits: crop the shortest to fill the row, drop its remainder
                lens.pop(0)
                refs.pop(0)
                row[pos:] = docs.pop(0)[:room]
                pos = n
        return True

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        rows = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            if not self._fill_row(rows[b]):
                raise StopIteration
        buf = torch.from_numpy(rows)  # (B, T+1)
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            buf = buf.to(self.device)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T) inputs, (B, T) targets
