"""Where the task datasets live on disk and how their files are read.

Layout: every dataset has a folder `<base>/tasks_data/<name>/` (base: `engine.paths.get_base_dir()`), and a split
`S` of it is every file of that folder named `S.parquet`, `S-*.parquet`, `S.jsonl` or `S-*.jsonl`, read in name
order. These are the names the public datasets ship under: a Hugging Face parquet export
(`test-00000-of-00001.parquet`) or a JSONL file (`test.jsonl`) copies in as it is. A parquet file's columns and a
JSONL line's keys are the dataset's fields (nested ones, such as ARC's `choices` {text, label} or SmolTalk's
`messages`, as the dataset has them).

The folder names: smoltalk, mmlu, arc-easy, arc-challenge, gsm8k, humaneval (see each task's module);
`python -m scripts.download_tasks` fills them from the Hugging Face Hub.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

DATA_DIR_NAME = "tasks_data"


def task_data_dir(name: str, base_dir: str | os.PathLike | None = None) -> str:
    """`<base>/tasks_data/<name>`; base_dir defaults to engine.paths.get_base_dir()."""
    if base_dir is None:
        from tritonchat.engine.paths import get_base_dir

        base_dir = get_base_dir()
    return os.path.join(os.fspath(base_dir), DATA_DIR_NAME, name)


def split_files(folder: str | os.PathLike, split: str) -> list[str]:
    """The files of `split` in `folder`, in name order (see the module docstring)."""
    folder = os.fspath(folder)
    files = set()
    for ext in ("parquet", "jsonl"):
        for pattern in (f"{split}.{ext}", f"{split}-*.{ext}"):
            files.update(glob.glob(os.path.join(glob.escape(folder), pattern)))
    return sorted(files)


class Rows:
    """The rows of a split as dicts, read from parquet files (kept as Arrow tables, a row converted when asked) and
    JSONL files (parsed at load). `permutation` reorders them; `where(i)` names the file and row of row i."""

    def __init__(self, chunks: list[tuple[str, Any]], permutation: np.ndarray | None = None):
        self._chunks = chunks  # (file, pyarrow.Table | list[dict])
        self._starts = np.cumsum([0] + [len(rows) for _, rows in chunks])
        self._permutation = permutation

    def __len__(self) -> int:
        return int(self._starts[-1])

    def shuffle(self, seed: int) -> Rows:
        """The same rows in the order of `datasets.Dataset.shuffle(seed=seed)`: numpy's default_rng permutation."""
        return Rows(self._chunks, np.random.default_rng(seed).permutation(len(self)))

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        physical = index if self._permutation is None else int(self._permutation[index])
        chunk = int(np.searchsorted(self._starts, physical, side="right")) - 1
        return chunk, physical - int(self._starts[chunk])

    def __getitem__(self, index: int) -> dict:
        chunk, row = self._locate(index)
        rows = self._chunks[chunk][1]
        return dict(rows[row]) if isinstance(rows, list) else rows.slice(row, 1).to_pylist()[0]

    def where(self, index: int) -> str:
        """'file:row' (parquet, row counted from 0) or 'file:line' (JSONL, line counted from 1) of row `index`."""
        chunk, row = self._locate(index)
        file, rows = self._chunks[chunk]
        return f"{file}:{rows[row]['__line__'] if isinstance(rows, list) else row}"


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file; ValueError naming `path:line` for a line
    that is not JSON."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None


def _read_jsonl(file: str, columns: Sequence[str]) -> list[dict]:
    rows = []
    for line_no, row in iter_jsonl(file):
        if not isinstance(row, dict):
            raise ValueError(f"{file}:{line_no}: expected a JSON object, got {type(row).__name__}")
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"{file}:{line_no}: missing field(s) {missing} (has {sorted(row)})")
        row["__line__"] = line_no
        rows.append(row)
    return rows


def _read_parquet(file: str, columns: Sequence[str], optional: Sequence[str]):
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(file).names
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{file}: not a readable parquet file ({e})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{file}: missing column(s) {missing} (has {names})")
    return pq.read_table(file, columns=list(columns) + [c for c in optional if c in names])


def load_split(folder: str | os.PathLike, split: str, columns: Sequence[str], dataset: str,
               optional: Sequence[str] = ()) -> Rows:
    """Rows of `split` from `folder`, keeping `columns` (every file must have them) and those of `optional` that a
    parquet file has (a JSONL row keeps every key). A missing split is a
    FileNotFoundError in one line naming the folder, the file names looked for and where `dataset` comes from."""
    files = split_files(folder, split)
    if not files:
        raise FileNotFoundError(f"no {split!r} split in {os.fspath(folder)}/ (looked for {split}.parquet, "
                                f"{split}-*.parquet, {split}.jsonl, {split}-*.jsonl): put the files of {dataset} there")
    chunks = [(f, _read_parquet(f, columns, optional) if f.endswith(".parquet") else _read_jsonl(f, columns))
              for f in files]
    return Rows(chunks)


def open_split(name: str, split: str, columns: Sequence[str], dataset: str, data_dir: str | os.PathLike | None,
               base_dir: str | os.PathLike | None, shuffle_seed: int | None, optional: Sequence[str] = ()) -> Rows:
    """A task's rows: from `data_dir`, else `<base>/tasks_data/<name>/`, shuffled with `shuffle_seed` (None: file
    order). The reference shuffles every dataset with seed 42."""
    folder = task_data_dir(name, base_dir) if data_dir is None else os.fspath(data_dir)
    rows = load_split(folder, split, columns, dataset, optional)
    return rows if shuffle_seed is None else rows.shuffle(shuffle_seed)
