"""Pretraining data: find the files, read documents by row group, pack them into rows of tokens (SPEC §9).

The packing is the reference's (nanochat's BOS-aligned best fit) batch for batch on the same parquet shards, for
one rank and for several; everything below that the reference does not do (resuming exactly, bounded memory,
.txt files, errors that name the file) leaves its batches unchanged.

Files. A data folder holds parquet shards with a `text` column (`shard_00000.parquet`, ...), or, when it holds
no parquet file, `.txt` files. The files are taken in sorted order and the last one is the validation split.
A `.txt` file is read as UTF-8; one that is not valid UTF-8 is read as Latin-1 (every byte one character, nothing
replaced or dropped) with a warning naming the file: convert it (`iconv -f ENCODING -t UTF-8`) if it is another
encoding. A file that cannot be read (a corrupt page, no `text` column, a `text` column that is not strings, a
null text) raises a one-line ValueError naming the file and the row group.

Units and ranks. Reading is done in units: one parquet row group, or one whole `.txt` file. Rank r of W reads row
groups r, r+W, r+2W, ... of every parquet file, file after file (the reference's striding; a file with W or
fewer row groups gives some ranks nothing); `.txt` files, one unit each, are strided the same way over the list of
files. An epoch is one pass over the rank's units; the next starts again at the first file.

Documents. Every text of a unit is a document, an empty one included (it becomes the lone `<|bos|>`); each is
tokenized with `<|bos|>` prepended. A unit is taken in slices of SLICE_DOCS (128) documents, in row order.

Packing (best fit). The buffer is refilled, one slice at a time, until it holds at least `buffer_docs` (1000)
documents, before every placement. A row of T+1 tokens starts at a document boundary; of the buffered documents
that fit whole in what is left of the row, the longest is placed (the earliest buffered among equals), again and
again; when none fits, the shortest (the earliest among equals) is cropped to fill the row exactly and its
remainder is dropped. No padding, so every token is a real one. inputs = row[:-1], targets = row[1:].

Memory. A document longer than a row can only ever be placed cropped to at most T+1 tokens, so only its first T+1
tokens are kept (with its true length, which the shortest-document choice needs): the buffer holds at most
(buffer_docs + SLICE_DOCS - 1) * (T+1) tokens, int32. Texts are read READ_ROWS rows at a time, and a text longer
than LONG_DOC_CHARS is tokenized alone, in parts when the tokenizer offers `encode_head` (the engine's does), so
one million-character document costs a few MB, not a batch of them at once. `buffer_tokens` caps the buffer
further (stops a refill early); once it binds, the batches are no longer the reference's.

Resuming. `PackedLoader.state_dict()` is {"file_idx", "row_group_idx", "epoch", "row", "buffer"}: the unit of the
last slice read, how many of its rows have been read, and a reference [file_idx, row_group_idx, row] to every
document still buffered, in buffer order. A loader built with that state re-reads and re-tokenizes just those
documents, restores the buffer exactly and continues with the rest of that unit, then the rank's next unit: the
batch stream after a resume is identical to the uninterrupted one. Before any read the state is
{"file_idx": 0, "row_group_idx": -1, "epoch": 0, "row": None, "buffer": []} ("row" None: that unit is done).
A state of the reference ({"pq_idx", "rg_idx", "epoch"}, epochs from 1; every rank resumes from rank 0's)
resumes as the reference does: at row group (rg_idx // W + 1) * W + r of file pq_idx (or the next file), with an
empty buffer. So does one of ours without "row" (an older format), its buffer restored. Given the same files,
state and settings, two loaders yield identical batches.
"""

from __future__ import annotations

import os
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tritonchat.train.corpus import build_default_corpus, ensure_default_corpus

__all__ = ["build_default_corpus", "ensure_default_corpus", "list_data_files", "split_files", "iter_documents",
           "PackedLoader", "num_units", "estimate_tokens", "SLICE_DOCS", "BUFFER_DOCS"]

TXT_WHOLE_CHARS = 8192  # a .txt file up to this long is one document
TXT_DOC_CHARS = 4096  # a longer one is cut at blank lines into documents of about this many characters
SLICE_DOCS = 128  # the refill unit: documents of one unit taken at a time (the reference's tokenizer batch)
BUFFER_DOCS = 1000  # documents buffered before every placement (the reference's buffer_size)
READ_ROWS = 16  # parquet rows turned into Python strings at a time
LONG_DOC_CHARS = 1 << 15  # a longer text is tokenized alone (in parts, when the tokenizer can)


class TokenizerLike(Protocol):
    def get_bos_token_id(self) -> int: ...

    def encode(self, text: list[str], prepend: int | None = None) -> list[list[int]]: ...


# ---- files -------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _open_parquet(path: Path) -> pq.ParquetFile:
    """The file, after checking its footer and that it has a `text` column of strings; ValueError otherwise."""
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as e:  # any unreadable footer is reported the same way
        raise ValueError(f"{path} is not a readable parquet file: {_one_line(e)}") from None
    if "text" not in schema.names:
        raise ValueError(f"{path} has no 'text' column (columns: {schema.names})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise ValueError(f"{path}: the 'text' column holds {kind}, not strings")
    return pf


def list_data_files(data_dir: str | os.PathLike) -> list[Path]:
    """The data files in `data_dir`, sorted: every `*.parquet` (each must have a `text` column of strings) or,
    when there is none, every `*.txt`. A path to a single such file gives [that file]. Hidden files are ignored.

    Raises FileNotFoundError when the path does not exist or holds no data file, ValueError for a parquet file
    that cannot be read or lacks a `text` column of strings.
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
            _open_parquet(f)
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
    return _open_parquet(path).metadata.num_row_groups if path.suffix == ".parquet" else 1


def num_units(files: Sequence[str | os.PathLike]) -> int:
    """How many reading units (row groups or .txt files) the files hold in all."""
    return sum(_num_units(Path(f)) for f in files)


def _text_bytes(path: Path) -> int:
    """About how many bytes of text a file holds: the `text` column's uncompressed size, or the file's size."""
    if path.suffix != ".parquet":
        return path.stat().st_size
    meta = _open_parquet(path).metadata
    col = meta.schema.to_arrow_schema().get_field_index("text")
    return sum(meta.row_group(i).column(col).total_uncompressed_size for i in range(meta.num_row_groups))


def estimate_tokens(files: Sequence[str | os.PathLike], tokenizer: TokenizerLike) -> int:
    """About how many tokens the files hold (one pass): their text bytes (parquet metadata, no reading) over the
    bytes per token of the first unit with text, which is tokenized. For warnings, not for exact counts."""
    files = [Path(f) for f in files]
    for f in files:
        for unit in range(_num_units(f)):
            texts = [t for t in _read_unit(f, unit) if t][:SLICE_DOCS]
            if texts:
                texts = [t[:LONG_DOC_CHARS] for t in texts]
                ids = tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())
                per_token = sum(len(t.encode("utf-8")) for t in texts) / max(1, sum(map(len, ids)))
                return int(sum(_text_bytes(p) for p in files) / max(per_token, 1e-9))
    return 0


def _iter_unit(path: Path, row_group: int, rows: int = READ_ROWS) -> Iterator[list[str]]:
    """The texts of one unit in row order, `rows` at a time (parquet) or all at once (.txt). Every text is a str
    (an empty one included); anything unreadable raises a one-line ValueError naming the file and row group."""
    if path.suffix != ".parquet":
        yield _split_txt(_read_txt(path))
        return
    pf = _open_parquet(path)
    where = f"{path}, row group {row_group}"
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=rows, row_groups=[row_group], columns=["text"],
                                     use_threads=False):
            texts = batch.column(0).to_pylist()
            if None in texts:
                raise ValueError(f"{where}, row {row + texts.index(None)}: the text is null")
            row += len(texts)
            yield texts
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{where}: cannot be read ({_one_line(e)})") from None


def _read_unit(path: Path, row_group: int) -> list[str]:
    return [t for texts in _iter_unit(path, row_group) for t in texts]


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


# ---- the rank's units, and where a state resumes ------------------------------------------------
def _rank_units(counts: list[int], parquet: bool, rank: int, world_size: int) -> list[tuple[int, int]]:
    """This rank's units in reading order: row groups rank, rank+W, ... of every parquet file; for .txt files
    (one unit each), files rank, rank+W, ..."""
    if parquet:
        return [(fi, rg) for fi, n in enumerate(counts) for rg in range(rank, n, world_size)]
    return [(fi, 0) for fi in range(rank, len(counts), world_size)]


def _position(state: dict | None) -> tuple[int, int, int, int | None, bool]:
    """(file_idx, row_group_idx, epoch, row, legacy) of a state of ours or of the reference. `row` None: that unit
    is done (resume at the rank's next one); `legacy`: buffer rows count only non-empty texts (older states)."""
    if state is None:
        return 0, -1, 0, None, False
    try:
        if "pq_idx" in state:  # the reference's: epochs count from 1, and the row group is done
            rg = state.get("rg_idx")
            return int(state["pq_idx"]), -1 if rg is None else int(rg), int(state.get("epoch", 1)) - 1, None, False
        row = state.get("row")
        return (int(state["file_idx"]), int(state["row_group_idx"]), int(state["epoch"]),
                None if row is None else int(row), "row" not in state)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"loader state {state} is neither ours ({{file_idx, row_group_idx, epoch, row, buffer}}) "
                         f"nor the reference's ({{pq_idx, rg_idx, epoch}})") from None


def _first_unit(units: list[tuple[int, int]], parquet: bool, fi: int, rg: int, rank: int, world_size: int) -> int:
    """Index in `units` of the rank's first unit after (fi, rg), the reference's way: row group
    (rg // W + 1) * W + rank of file fi, or the first unit of a later file (len(units): the epoch is over)."""
    if parquet:
        return bisect_left(units, (fi, (rg // world_size + 1) * world_size + rank))
    g = fi if rg >= 0 else fi - 1  # .txt: the files are the units
    return bisect_left(units, ((g // world_size + 1) * world_size + rank, 0))


class _Reader:
    """This rank's documents, slice by slice, endlessly (`loop`) or for one pass, from a position."""

    def __init__(self, files: list[Path], rank: int, world_size: int, state: dict | None, loop: bool):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.files, self.loop = files, loop
        self.parquet = bool(files) and files[0].suffix == ".parquet"
        counts = [_num_units(f) for f in files]
        self.units = _rank_units(counts, self.parquet, rank, world_size)
        if not self.units:
            raise ValueError(f"rank {rank} of {world_size} gets no data: {len(files)} files with {counts} row groups "
                             f"(rank r reads row groups r, r+{world_size}, ... of every file)")
        fi, rg, epoch, row, self.legacy = _position(state)
        if not (0 <= fi < len(files) and -1 <= rg < counts[fi]):
            raise ValueError(f"loader state {state} does not match the data: {len(files)} files with "
                             f"{counts} row groups")
        self.epoch, self.skip = epoch, 0
        self.next = _first_unit(self.units, self.parquet, fi, rg, rank, world_size)
        if row is not None and rg >= 0 and (fi, rg) in self.units and not self._done(fi, rg, row):
            self.next, self.skip = self.units.index((fi, rg)), row  # ours, inside a unit: read the rest of it
        self.rank, self.world_size = rank, world_size

    def _done(self, fi: int, rg: int, row: int) -> bool:
        path = self.files[fi]
        return path.suffix == ".parquet" and row >= _open_parquet(path).metadata.row_group(rg).num_rows

    def slices(self) -> Iterator[tuple[list[str], tuple[int, int, int, int, int]]]:
        """Yield (texts, (file_idx, row_group_idx, epoch, first_row, end_row)) per slice of SLICE_DOCS texts."""
        i, skip = self.next, self.skip
        any_text, whole_pass = False, i == 0 and skip == 0  # an endless loop over empty units must end
        while True:
            if i >= len(self.units):
                if not self.loop:
                    return
                if whole_pass and not any_text:
                    raise ValueError(f"rank {self.rank} of {self.world_size} found no document in "
                                     f"{len(self.files)} files")
                self.epoch, i, skip, whole_pass, any_text = self.epoch + 1, 0, 0, True, False
            fi, rg = self.units[i]
            pending, row = [], 0
            for texts in _iter_unit(self.files[fi], rg):
                for t in texts:
                    if row >= skip:
                        pending.append(t)
                    row += 1
                    if len(pending) == SLICE_DOCS:
                        yield pending, (fi, rg, self.epoch, row - SLICE_DOCS, row)
                        any_text, pending = True, []
            if pending:
                yield pending, (fi, rg, self.epoch, row - len(pending), row)
                any_text = True
            i, skip = i + 1, 0


def iter_documents(files: Sequence[str | os.PathLike], rank: int = 0, world_size: int = 1,
                   start_state: dict | None = None, loop: bool = True) -> Iterator[tuple[list[str], dict]]:
    """Yield (texts, state) per slice of at most SLICE_DOCS documents of this rank's units, starting after
    `start_state` (ours or the reference's, see the module docstring). Empty texts are documents too.

    `state` = {"file_idx", "row_group_idx", "epoch", "row"} names the unit of the slice and how many of its rows
    have been read; passing it as `start_state` continues just after the slice. With `loop`, the data is read
    again from the start forever (epoch + 1); without, iteration ends after the last unit.
    """
    reader = _Reader([Path(f) for f in files], rank, world_size, start_state, loop)
    for texts, (fi, rg, epoch, _, end) in reader.slices():
        yield texts, {"file_idx": fi, "row_group_idx": rg, "epoch": epoch, "row": end}


# ---- best-fit packing --------------------------------------------------------------------------
class PackedLoader:
    """Batches of packed token rows: iterate for (inputs, targets), each int64 (B, T) on `device`.

    `tokenizer` needs `get_bos_token_id()` and `encode(list_of_texts, prepend=bos_id) -> list[list[int]]`; an
    `encode_head(text, limit, prepend=bos_id) -> (ids[:limit], len(ids))` is used for long texts when present.
    `buffer_docs`: documents kept buffered for best-fit packing (the reference's 1000; more: less cropping).
    `buffer_tokens`: stop a refill once the buffer holds this many tokens (None: no cap beyond the one cropping
    gives, (buffer_docs + 127) * (T+1); a cap that binds departs from the reference's batches). `state`: a
    `state_dict()` of ours or the reference's to resume from (see the module docstring). `loop`: read the data
    again after the last unit; without, iteration stops when a batch can no longer be filled (the partial batch
    is dropped). `tokenizer_threads`: passed to `encode` as num_threads when given.
    """

    def __init__(self, tokenizer: TokenizerLike, files: Sequence[str | os.PathLike], batch_size: int, seq_len: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1, state: dict | None = None,
                 buffer_docs: int = BUFFER_DOCS, loop: bool = True, buffer_tokens: int | None = None,
                 tokenizer_threads: int | None = None):
        if batch_size < 1 or seq_len < 1 or buffer_docs < 1:
            raise ValueError(f"need batch_size, seq_len, buffer_docs >= 1, got {batch_size}, {seq_len}, {buffer_docs}")
        if buffer_tokens is not None and buffer_tokens < 1:
            raise ValueError(f"buffer_tokens must be positive, got {buffer_tokens}")
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len, self.buffer_docs = batch_size, seq_len, buffer_docs
        self.buffer_tokens = buffer_tokens
        self.device = torch.device(device)
        self._bos = tokenizer.get_bos_token_id()
        self._encode_kw = {} if tokenizer_threads is None else {"num_threads": tokenizer_threads}
        self._files = [Path(f) for f in files]
        self._reader = _Reader(self._files, rank, world_size, state, loop)
        self._slices = self._reader.slices()
        fi, rg, epoch, row, _ = _position(state)
        self._state = {"file_idx": fi, "row_group_idx": rg, "epoch": epoch, "row": row}  # row None: unit done
        self._exhausted = False
        # The buffer, sorted by true length, equal lengths in arrival order: _lens[i] is the length of document i,
        # _docs[i] its first min(_lens[i], T+1) tokens, _refs[i] = (file_idx, row_group_idx, row) where it came
        # from, so a checkpoint can restore the buffer. _tokens: sum of len(_docs[i]).
        self._lens: list[int] = []
        self._docs: list[np.ndarray] = []
        self._refs: list[tuple[int, int, int]] = []
        self._tokens = 0
        if state is not None and state.get("buffer"):
            self._restore_buffer(state["buffer"], self._reader.legacy)

    def state_dict(self) -> dict:
        """{"file_idx", "row_group_idx", "epoch", "row"} of the last slice read and "buffer": [[file_idx,
        row_group_idx, row], ...] for the documents still buffered (JSON-serializable)."""
        return {**self._state, "buffer": [list(r) for r in self._refs]}

    # ---- tokenizing, cropped to what a row can use ----
    def _tokenize(self, texts: list[str]) -> list[tuple[int, np.ndarray]]:
        """(true length, first T+1 tokens as int32) of each text with <|bos|> prepended, in order. Long texts go
        alone (and in parts through `encode_head` when the tokenizer has it), so that no batch of them is ever
        tokenized at once."""
        cap = self.seq_len + 1
        out: list[tuple[int, np.ndarray] | None] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= LONG_DOC_CHARS]
        if short:
            for i, ids in zip(short, self.tokenizer.encode([texts[i] for i in short], prepend=self._bos,
                                                           **self._encode_kw)):
                out[i] = (len(ids), np.asarray(ids[:cap], dtype=np.int32))
        head = getattr(self.tokenizer, "encode_head", None)
        for i, t in enumerate(texts):
            if out[i] is None:
                if head is not None:
                    ids, n = head(t, cap, prepend=self._bos)
                else:
                    ids = self.tokenizer.encode([t], prepend=self._bos)[0]
                    n = len(ids)
                out[i] = (n, np.asarray(ids[:cap], dtype=np.int32))
        return out  # type: ignore[return-value]

    def _add(self, n: int, doc: np.ndarray, ref: tuple[int, int, int]) -> None:
        i = bisect_right(self._lens, n)
        self._lens.insert(i, n)
        self._docs.insert(i, doc)
        self._refs.insert(i, ref)
        self._tokens += len(doc)

    def _take(self, i: int) -> np.ndarray:
        self._lens.pop(i)
        self._refs.pop(i)
        doc = self._docs.pop(i)
        self._tokens -= len(doc)
        return doc

    def _restore_buffer(self, refs: list, legacy: bool) -> None:
        """Re-read and re-tokenize the buffered documents a state names, in the saved order. `legacy`: rows count
        the non-empty texts only (the states of an older loader, which dropped empty texts)."""
        refs = [tuple(int(v) for v in r) for r in refs]
        wanted: dict[tuple[int, int], set[int]] = {}
        for fi, rg, row in refs:
            if not 0 <= fi < len(self._files) or not 0 <= rg < _num_units(self._files[fi]):
                raise ValueError(f"loader state names row group {rg} of file {fi}, which the data lacks")
            wanted.setdefault((fi, rg), set()).add(row)
        found: dict[tuple[int, int, int], tuple[int, np.ndarray]] = {}
        for (fi, rg), rows in wanted.items():
            row = 0
            for texts in _iter_unit(self._files[fi], rg):
                if legacy:
                    texts = [t for t in texts if t]
                keep = [(row + k, t) for k, t in enumerate(texts) if row + k in rows]
                row += len(texts)
                for (r, _), doc in zip(keep, self._tokenize([t for _, t in keep])):
                    found[(fi, rg, r)] = doc
        for ref in refs:
            if ref not in found:
                raise ValueError(f"loader state names row {ref[2]} of row group {ref[1]} of file {ref[0]}, which "
                                 f"the data lacks")
            n, doc = found[ref]
            self._lens.append(n)
            self._docs.append(doc)
            self._refs.append(ref)
            self._tokens += len(doc)

    def _refill(self) -> None:
        """Read slices until at least `buffer_docs` documents are buffered (or `buffer_tokens` tokens), or the data
        ends."""
        while len(self._lens) < self.buffer_docs and not self._exhausted:
            if self.buffer_tokens is not None and self._tokens >= self.buffer_tokens and self._lens:
                return
            try:
                texts, (fi, rg, epoch, first, end) = next(self._slices)
            except StopIteration:
                self._exhausted = True
                return
            self._state = {"file_idx": fi, "row_group_idx": rg, "epoch": epoch, "row": end}
            for k, (n, doc) in enumerate(self._tokenize(texts)):
                self._add(n, doc, (fi, rg, first + k))

    def _fill_row(self, row: np.ndarray) -> bool:
        """Pack one row (length T+1) in place; False when the data ran out first."""
        pos, n = 0, len(row)
        lens = self._lens
        while pos < n:
            if len(lens) < self.buffer_docs:
                self._refill()
                if not lens:
                    return False
            room = n - pos
            i = bisect_right(lens, room) - 1  # the longest length that fits whole ...
            if i >= 0:
                doc = self._take(bisect_left(lens, lens[i]))  # ... its earliest buffered document
                row[pos:pos + len(doc)] = doc
                pos += len(doc)
            else:  # none fits: crop the shortest (the earliest among equals) to fill the row, drop its remainder
                row[pos:] = self._take(0)[:room]
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
