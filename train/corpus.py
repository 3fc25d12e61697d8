"""The default pretraining corpus: documentation text of the Python standard library, no download.

Sources, in collection order: the `pydoc_data` help topics (the language reference), then the docstrings of the
standard library's modules, classes and functions, file by file in sorted path order. Only the standard
library's own files are read (the `stdlib` folder of `sysconfig`, without its site-packages / dist-packages):
installed packages never enter, so the corpus depends on the Python version alone, not on the environment.
Docstrings are read by parsing the `.py` files with `ast`, so nothing is imported or executed; a file that does
not parse, or that is not in its declared encoding (UTF-8 unless a PEP 263 coding line says otherwise), is
skipped whole and counted (`manifest.json`'s `skipped_files`, and the build's report), never decoded with
replacement characters. One document per docstring or topic; shorter than `min_chars` is skipped, exact
duplicates are dropped. `manifest.json` records the Python version, the folder read and a digest of the text.

Layout (SPEC §9): `shard_00000.parquet` ... with one `text` column, `rows_per_group` rows per row group. The
documents are shuffled with a fixed seed; the last shard is the validation split (`val_fraction` of the
documents), the others share the rest evenly. Every file is written to a temporary name and moved into place,
and `manifest.json` is written last: a folder without a valid manifest is rebuilt.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the standard library only (1 also read site-packages)
CORPUS_NAME = "pydocs"

# Folders never read: tests, GUI demos, vendored copies and caches.
_SKIP_DIRS = {"test", "tests", "testing", "benchmarks", "idlelib", "tkinter", "turtledemo", "__pycache__",
              "_vendor", "vendor", "site-packages", "dist-packages"}
_SKIP_FILES = {"antigravity.py", "this.py", "turtle.py"}


def _python_files(root: Path) -> list[Path]:
    """Every `.py` under root outside the skipped folders, sorted (a deterministic order)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP_DIRS and not d.startswith(".") and not d.startswith("config-")
                       and not d.endswith((".dist-info", ".egg-info"))]
        for name in filenames:
            if (name.endswith(".py") and name not in _SKIP_FILES
                    and not name.startswith("test_") and not name.endswith("_test.py")):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _file_docstrings(path: Path) -> list[str] | None:
    """The docstrings of a source file's module, classes and functions, in `ast.walk` order; None when the file
    cannot be read, decoded or parsed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes etc. in old sources raise SyntaxWarning
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError, OSError):  # UnicodeDecodeError is a ValueError
        return None
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return docs


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (it stops the pool), not a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _files_docstrings(paths: list[Path], workers: int) -> Iterator[list[str] | None]:
    """`_file_docstrings` of each path, in order; parsed by `workers` processes when there are many files.

    Worker processes are spawned, not forked (forking a process that already runs threads can deadlock).
    """
    if workers <= 1 or len(paths) < 64:
        yield from map(_file_docstrings, paths)
        return
    try:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_ignore_sigint)
    except (OSError, ValueError, NotImplementedError):
        yield from map(_file_docstrings, paths)
        return
    try:
        yield from pool.map(_file_docstrings, paths, chunksize=16)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stdlib_dir() -> Path:
    """The standard library's folder of this interpreter (the base installation's, also in a virtual env)."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def collect_documents(min_chars: int = 64, max_docs: int | None = None, workers: int | None = None,
                      skipped: list[str] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Documentation texts of this Python's standard library, deduplicated, in a deterministic collection order.

    `max_docs` stops collecting after that many documents (the help topics come first, then the standard
    library in file order): a quick, small corpus for tests. `workers` processes parse the sources
    (default: up to 8, one per CPU). `skipped`, when given, receives the paths (relative to the standard
    library's folder) of the files that could not be read, decoded or parsed. `progress(files_parsed,
    files_total)` is called after each source file.
    """
    from pydoc_data.topics import topics

    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    seen: set[str] = set()
    docs: list[str] = []

    def add(texts: Iterable[str]) -> bool:
        """Append the new, long enough, UTF-8-encodable texts; True once max_docs is reached."""
        for text in texts:
            text = text.strip()
            if len(text) < min_chars or text in seen:
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from escapes in a string literal
                continue
            seen.add(text)
            docs.append(text)
            if max_docs is not None and len(docs) >= max_docs:
                return True
        return False

    if add(topics[key] for key in sorted(topics)):
        return docs
    root = stdlib_dir()
    paths = _python_files(root)
    parsed = _files_docstrings(paths, workers)
    try:
        for i, (path, file_docs) in enumerate(zip(paths, parsed)):
            if progress is not None:
                progress(i + 1, len(paths))
            if file_docs is None:
                if skipped is not None:
                    skipped.append(path.relative_to(root).as_posix())
            elif add(file_docs):
                break
    finally:
        parsed.close()  # stops the worker processes now, not when the generator is collected
    return docs


def _atomic_write_table(table: pa.Table, path: Path, rows_per_group: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, row_group_size=rows_per_group, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_default_corpus(out_dir: str | os.PathLike, num_shards: int = 8, rows_per_group: int = 128,
                         val_fraction: float = 0.05, seed: int = 1337, min_chars: int = 64,
                         max_docs: int | None = None, workers: int | None = None, verbose: bool = True,
                         progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Collect the documents (`collect_documents`), shuffle them with `seed` and write `num_shards` shards.

    The last shard holds the validation documents (`val_fraction`, at least one); the first `num_shards - 1`
    share the rest evenly. Any previous shards in `out_dir` are removed first. Returns the shard paths, sorted.
    Row groups are the loader's reading units, shared out among ranks: 128 rows still make ~35 training and 2
    validation units of the standard library's ~4,000 documents.
    `progress(files_parsed, files_total)` follows the parsing; without it, `verbose` prints a line every few
    seconds.
    """
    if num_shards < 2:
        raise ValueError(f"num_shards must be at least 2 (training shards + the validation shard), got {num_shards}")
    if rows_per_group < 1 or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"need rows_per_group >= 1 and 0 < val_fraction < 1, got {rows_per_group}, {val_fraction}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # invalid until the last shard is in place
    for old in out.glob("shard_*.parquet"):
        old.unlink()

    if progress is None and verbose:
        progress = _throttled_report(out)
    skipped: list[str] = []
    docs = collect_documents(min_chars, max_docs, workers, skipped, progress)
    digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()  # of the collection order, before the shuffle
    random.Random(seed).shuffle(docs)
    n_val = max(1, round(val_fraction * len(docs)))
    n_train = len(docs) - n_val
    if n_train < num_shards - 1:
        raise ValueError(f"only {len(docs)} documents: too few for {num_shards} shards")

    # Training shard i takes documents [bounds[i], bounds[i+1]); the validation shard the last n_val.
    bounds = [n_train * i // (num_shards - 1) for i in range(num_shards)] + [len(docs)]
    paths = []
    for i in range(num_shards):
        path = out / f"shard_{i:05d}.parquet"
        table = pa.table({"text": pa.array(docs[bounds[i]:bounds[i + 1]], type=pa.string())})
        _atomic_write_table(table, path, rows_per_group)
        paths.append(path)

    num_chars = sum(map(len, docs))
    _atomic_write_json({
        "format": FORMAT_VERSION,
        "name": CORPUS_NAME,
        "python": sys.version,
        "stdlib": str(stdlib_dir()),
        "sha256": digest,
        "skipped_files": skipped,
        "max_docs": max_docs,
        "min_chars": min_chars,
        "seed": seed,
        "rows_per_group": rows_per_group,
        "num_docs": len(docs),
        "num_val_docs": n_val,
        "num_chars": num_chars,
        "files": [p.name for p in paths],
    }, out / MANIFEST)
    if verbose:
        _report(out, time.perf_counter() - start)
    return paths


def _throttled_report(folder: Path, every: float = 5.0) -> Callable[[int, int], None]:
    """A progress callback printing "building the corpus in ...: i/n source files" at most every `every` s."""
    last = time.perf_counter()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every:
            print(f"building the {CORPUS_NAME} corpus in {folder}: {done:,}/{total:,} source files parsed",
                  flush=True)
            last = now

    return report


def _report(folder: Path, seconds: float) -> None:
    m = json.loads((folder / MANIFEST).read_text())
    skipped = m.get("skipped_files") or []
    note = f"; {len(skipped)} source files skipped, not parsable in their encoding" if skipped else ""
    print(f"{CORPUS_NAME} corpus: {m['num_docs']:,} documents ({m['num_val_docs']:,} validation), "
          f"{m['num_chars'] / 1e6:.1f}M chars, {len(m['files'])} shards in {folder} (built in {seconds:.1f}s{note})")


def corpus_is_complete(folder: str | os.PathLike) -> bool:
    """True when `folder` holds a manifest of the current format and every shard it lists."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return (manifest.get("format") == FORMAT_VERSION and bool(files)
            and all((folder / name).is_file() for name in files))


def ensure_default_corpus(base_dir: str | os.PathLike, **build_kwargs) -> Path:
    """The default corpus folder `<base_dir>/data/pydocs/`, built on the first call (see `build_default_corpus`).

    Later calls only check the manifest. The corpus is built in a private temporary folder and renamed into
    place, so processes racing to build it never see a partial one; still, in a multi-process run, build on
    one rank and wait at a barrier before the others read it.
    """
    folder = Path(base_dir) / "data" / CORPUS_NAME
    if corpus_is_complete(folder):
        return folder
    start = time.perf_counter()
    verbose = build_kwargs.pop("verbose", True)
    tmp = folder.with_name(f".{CORPUS_NAME}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if verbose and build_kwargs.get("progress") is None:
        build_kwargs["progress"] = _throttled_report(folder)
    try:
        build_default_corpus(tmp, verbose=False, **build_kwargs)
        if corpus_is_complete(folder):  # another process finished first
            return folder
        if folder.exists():
            shutil.rmtree(folder)  # stale or half-built
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        _report(folder, time.perf_counter() - start)
    return folder
