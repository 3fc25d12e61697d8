"""The default pretraining corpus: documentation text from the running Python installation, no download.

Sources, in collection order: the `pydoc_data` help topics (the language reference), the docstrings of the
standard library's modules, classes and functions, and, optionally, the docstrings of the installed packages
(site-packages: numpy, torch, ... whatever is there). Docstrings are read by parsing the `.py` files with `ast`,
so nothing is imported or executed. One document per docstring or topic; shorter than `min_chars` is skipped,
exact duplicates are dropped. The corpus therefore depends on the Python version and the installed packages;
`manifest.json` records what it was built from.

Layout (SPEC §9): `shard_00000.parquet` ... with one `text` column, `rows_per_group` rows per row group. The
documents are shuffled with a fixed seed; the last shard is the validation split (`val_fraction` of the
documents), the others share the rest evenly. Every file is written to a temporary name and moved into place,
and `manifest.json` is written last: a folder without a valid manifest is rebuilt.
"""

from __future__ import annotations

import ast
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
FORMAT_VERSION = 1
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


def _file_docstrings(path: Path) -> list[str]:
    """The docstrings of a source file's module, classes and functions, in `ast.walk` order; [] if unparsable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes etc. in old sources raise SyntaxWarning
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError, OSError):
        return []
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


def _files_docstrings(paths: list[Path], workers: int) -> Iterator[list[str]]:
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


def _site_package_dirs() -> list[Path]:
    """The installed packages' folders of this interpreter (a virtual environment's own when in one)."""
    paths = sysconfig.get_paths()
    dirs: list[Path] = []
    for key in ("purelib", "platlib"):
        d = Path(paths[key]).resolve()
        if d.is_dir() and d not in dirs:
            dirs.append(d)
    return dirs


def collect_documents(min_chars: int = 64, include_site_packages: bool = True, max_docs: int | None = None,
                      workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Documentation texts of this Python installation, deduplicated, in a deterministic collection order.

    `max_docs` stops collecting after that many documents (the help topics come first, then the standard
    library in file order): a quick, small corpus for tests. `workers` processes parse the sources
    (default: up to 8, one per CPU). `progress(files_parsed, files_total)` is called after each source file.
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
    roots = [Path(sysconfig.get_paths()["stdlib"]).resolve()]
    if include_site_packages:
        roots += [d for d in _site_package_dirs() if d not in roots]
    paths = [p for root in roots for p in _python_files(root)]
    parsed = _files_docstrings(paths, workers)
    try:
        for i, file_docs in enumerate(parsed):
            if progress is not None:
                progress(i + 1, len(paths))
            if add(file_docs):
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


def build_default_corpus(out_dir: str | os.PathLike, num_shards: int = 8, rows_per_group: int = 1024,
                         val_fraction: float = 0.05, seed: int = 1337, min_chars: int = 64,
                         include_site_packages: bool = True, max_docs: int | None = None,
                         workers: int | None = None, verbose: bool = True,
                         progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Collect the documents (`collect_documents`), shuffle them with `seed` and write `num_shards` shards.

    The last shard holds the validation documents (`val_fraction`, at least one); the first `num_shards - 1`
    share the rest evenly. Any previous shards in `out_dir` are removed first. Returns the shard paths, sorted.
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
    docs = collect_documents(min_chars, include_site_packages, max_docs, workers, progress)
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
        "include_site_packages": include_site_packages,
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
    print(f"{CORPUS_NAME} corpus: {m['num_docs']:,} documents ({m['num_val_docs']:,} validation), "
          f"{m['num_chars'] / 1e6:.1f}M chars, {len(m['files'])} shards in {folder} (built in {seconds:.1f}s)")


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
