"""Download the reference's pretraining shards, in parallel, resumable, each one checked before it is kept.

    python -m scripts.download_data -n 170                      # 170 ClimbMix training shards + its validation shard
    python -m scripts.download_data -n 8 --dataset fineweb-edu  # the first 8 FineWeb-Edu shards
    python -m train --data ~/.cache/tritonchat/base_data_climbmix

Datasets (the reference's `nanochat/dataset.py`, now and before its switch to ClimbMix): parquet shards
`shard_00000.parquet` ... with a `text` column, in the reference's folders under the base directory, so a
nanochat base directory and ours can share them. `-n N` counts training shards as the reference does: ClimbMix
always adds its last shard, the validation split (the last file in sorted order, which is what `train.data` holds
out too); FineWeb-Edu is its first N shards. `-n -1` is every shard.

Each shard streams into `shard_XXXXX.parquet.part` beside its final name (neither `train.data` nor the
reference reads that name) and is renamed only when its size equals the server's length and its parquet footer
reads. A rerun passes over shards whose footer reads (no request for them) and continues a `.part` file with an
HTTP Range request, or from the start when the server ignores Range. Connection errors, timeouts, a short body,
HTTP 408/429/5xx and a corrupt file are retried with exponential backoff (a corrupt file from the start, since a
resumed one may have joined two versions of the shard); any other HTTP error (404: no such shard) stops at once.
The first shard that fails stops the whole download with one line naming its URL (exit 2); Ctrl-C ends it in one
line; either way every `.part` file is kept for the next run.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pyarrow.parquet as pq
from tritonchat.engine.cli import HelpFormatter, UsageError, command_name, run_main
from tritonchat.engine.paths import get_base_dir

PROG = command_name("scripts.download_data")
URL_ENV = "TRITONCHAT_DATA_URL"  # overrides the dataset's base URL (a mirror, a local server)
PART = ".part"  # suffix of a shard still being downloaded
CHUNK = 1 << 20  # bytes read and written at a time
USER_AGENT = "tritonchat-download-data/0.1"


@dataclass(frozen=True)
class Dataset:
    url: str  # base URL; shard i is at f"{url}/shard_{i:05d}.parquet"
    last_shard: int  # index of the last shard
    folder: str  # under the base directory, the reference's name
    pinned_val: bool  # the last shard (validation) is fetched whatever -n says


DATASETS = {
    "climbmix": Dataset("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
                        6542, "base_data_climbmix", pinned_val=True),
    "fineweb-edu": Dataset("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                           1822, "base_data", pinned_val=False),
}


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_indices(dataset: Dataset, num_files: int) -> list[int]:
    """The shards `-n num_files` names: every one for -1; else the first num_files (capped at what exists),
    plus the validation shard when the dataset pins it."""
    if num_files < 0:
        return list(range(dataset.last_shard + 1))
    if dataset.pinned_val:
        return list(range(min(num_files, dataset.last_shard))) + [dataset.last_shard]
    return list(range(min(num_files, dataset.last_shard + 1)))


class DownloadError(OSError):
    """A shard that cannot be fetched; the message is one line naming its URL."""


class _Retry(Exception):
    """A failure worth another attempt (the connection, the server's load, a damaged body)."""


class _Stopped(Exception):
    """The download is being stopped (another shard failed, or Ctrl-C)."""


def parquet_error(path: Path) -> str | None:
    """None when `path` is a file whose parquet footer reads, else why not."""
    try:
        with pq.ParquetFile(path) as f:  # reads the footer only
            f.metadata.num_rows  # noqa: B018 - the metadata parses
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged footer
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


class Progress:
    """Counters the workers update and the main thread reports: shards done, bytes fetched, rate."""

    def __init__(self, shards: int, log: TextIO):
        self.shards, self.log, self.t0 = shards, log, time.monotonic()
        self.lock = threading.Lock()
        self.done = self.present = self.nbytes = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.nbytes += n

    def finished(self, fetched: bool) -> None:
        with self.lock:
            self.done += 1
            self.present += not fetched

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        here = f" ({self.present} already here)" if self.present else ""
        return (f"{self.done}/{self.shards} shards{here}, {_size(self.nbytes)} fetched at "
                f"{_size(self.nbytes / max(elapsed, 1e-9))}/s, {elapsed:.0f} s")

    def report(self) -> None:
        print(f"download: {self.line()}", file=self.log, flush=True)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _reason(e: BaseException) -> str:
    """`Connection refused`, `Name or service not known`, `timed out`: the OS's words, without the errno."""
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else Exception(str(e.reason))
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length) of a Content-Range header, `bytes 10-99/100` or `bytes */100`."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


def _fetch_into(url: str, part: Path, timeout: float, stop: threading.Event, progress: Progress | None) -> None:
    """One attempt: bring `part` up to the whole file, continuing what it holds when the server allows.

    Raises _Retry for a failure worth another attempt (the part file kept when it is a good prefix), DownloadError
    for one that is not, _Stopped when `stop` is set (the part file kept)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    # The opener is built per attempt so the proxy environment (http_proxy, no_proxy) is read now, not at import.
    try:
        resp = urllib.request.build_opener().open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:  # nothing after byte `have`: the part is whole, or longer than the shard
            if _content_range(e.headers.get("Content-Range"))[1] == have:
                return
            part.unlink()
            raise _Retry(f"the partial file ({have} bytes) does not match the shard's length") from None
        if e.code in (408, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        what = " (no such shard at this base URL)" if e.code == 404 else ""
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{what}") from None
    except (OSError, http.client.HTTPException) as e:  # refused, unreachable, DNS, timeout, reset
        raise _Retry(f"cannot connect to {urllib.parse.urlsplit(url).netloc}: {_reason(e)}") from None
    with resp:
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != have:  # start again from byte 0
                part.unlink()
                raise _Retry(f"the server resumed at byte {start}, not {have}")
            mode = "ab"
        else:  # 200: the whole file, whether or not Range was asked for
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as f:
            try:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:  # a write error (disk full) is not retried
                        raise _Retry(f"connection lost after {have} bytes: {_reason(e)}") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    have += len(chunk)
                    if progress is not None:
                        progress.add(len(chunk))
                    if stop.is_set():
                        raise _Stopped
            finally:
                f.flush()
                os.fsync(f.fileno())
    if total is not None and have < total:
        raise _Retry(f"connection closed after {have} of {total} bytes")
    if total is not None and have > total:
        part.unlink()
        raise _Retry(f"received {have} bytes, more than the {total} announced")


def fetch_shard(url: str, dest: str | os.PathLike, attempts: int = 5, retry_wait: float = 2.0,
                timeout: float = 30.0, stop: threading.Event | None = None, progress: Progress | None = None,
                log: TextIO | None = None) -> bool:
    """Make `dest` a complete copy of `url`: True when it was fetched, False when it was already there (its parquet
    footer reads, and nothing is requested). Waits retry_wait, 2 x retry_wait, ... between attempts.

    Raises DownloadError naming the URL after `attempts` failed attempts or at once for an error that a retry
    cannot mend (HTTP 404 and other 4xx); `dest.part` is kept for a later run to continue.
    """
    dest, stop = Path(dest), stop or threading.Event()
    why = parquet_error(dest)
    if why is None:
        return False
    if why != "missing" and log is not None:
        print(f"download: {dest} is not a readable parquet file ({why}): fetching it again", file=log)
    part = dest.with_name(dest.name + PART)
    for attempt in range(1, attempts + 1):
        try:
            _fetch_into(url, part, timeout, stop, progress)
            why = parquet_error(part)
            if why is None:
                os.replace(part, dest)
                return True
            part.unlink()
            raise _Retry(f"not a readable parquet file ({why})")
        except _Retry as e:
            last = str(e)
        if attempt < attempts:
            pause = retry_wait * 2 ** (attempt - 1)
            if log is not None:
                print(f"download: {url}: {last}; attempt {attempt + 1}/{attempts} in {pause:g} s", file=log)
            if stop.wait(pause):
                raise _Stopped
    raise DownloadError(f"{url}: {last} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})")


def download(base_url: str, out_dir: str | os.PathLike, names: list[str], workers: int = 4, attempts: int = 5,
             retry_wait: float = 2.0, timeout: float = 30.0, progress_every: float = 5.0,
             log: TextIO | None = None) -> Progress:
    """Fetch `names` from `base_url` into `out_dir` (see download_files)."""
    base_url = base_url.rstrip("/")
    return download_files([(f"{base_url}/{name}", name) for name in names], out_dir, workers, attempts, retry_wait,
                          timeout, progress_every, log)


def download_files(files: list[tuple[str, str]], out_dir: str | os.PathLike, workers: int = 4, attempts: int = 5,
                   retry_wait: float = 2.0, timeout: float = 30.0, progress_every: float = 5.0,
                   log: TextIO | None = None) -> Progress:
    """Fetch each (url, name) of `files` into `out_dir / name` with `workers` threads, a progress line on `log`
    (default: stderr) every `progress_every` seconds. The first failure (DownloadError) or Ctrl-C stops the other
    threads after their current chunk (every thread has ended when this returns or raises); part files are kept."""
    out_dir, log = Path(out_dir), log or sys.stderr
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(files), log)
    todo, errors = deque(files), []
    stop, wake = threading.Event(), threading.Event()  # stop: the threads end; wake: the main thread looks
    running = [0]

    def worker() -> None:
        try:
            while not stop.is_set():
                try:
                    url, name = todo.popleft()
                except IndexError:
                    return
                progress.finished(fetch_shard(url, out_dir / name, attempts, retry_wait, timeout, stop, progress,
                                              log))
        except _Stopped:
            pass
        except BaseException as e:  # a DownloadError, or a bug: the main thread re-raises it
            errors.append(e)
            stop.set()
        finally:
            with progress.lock:
                running[0] -= 1
                if not running[0]:
                    wake.set()
            if stop.is_set():
                wake.set()

    # Threads are listed before they start and joined when alive, so a Ctrl-C at any point leaves none behind.
    threads = [threading.Thread(target=worker, name=f"download-{i}") for i in range(min(workers, len(files)))]
    running[0] = len(threads)
    try:
        for t in threads:
            t.start()
        while threads and not wake.wait(progress_every):
            progress.report()
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
    if errors:
        raise errors[0]
    return progress


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the epilog's lines (the datasets' URLs) kept whole."""


def add_download_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `download_files`: workers, attempts, backoff, timeout, progress cadence."""
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--attempts", type=int, default=5, help="tries per file before giving up")
    parser.add_argument("--retry-wait", type=float, default=2.0, help="seconds before the 2nd try, doubled after")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a try fails")
    parser.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")


def check_download_flags(args: argparse.Namespace) -> None:
    """A UsageError naming the first of add_download_flags' flags out of its range."""
    for flag in ("num_workers", "attempts"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("timeout", "progress_every"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not args.retry_wait >= 0:
        raise UsageError(f"--retry-wait must be at least 0, got {args.retry_wait}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    base = get_base_dir()
    datasets = "\n".join(f"  {k}: shards 0-{d.last_shard} at {d.url}\n    into {base}/{d.folder}"
                          for k, d in DATASETS.items())
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=_Formatter,
                                     description="Download pretraining shards (parquet, a `text` column) for "
                                                 "`python -m train --data DIR`.", epilog=f"datasets:\n{datasets}")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help="training shards to fetch, -1 = all; climbmix adds its validation shard (the last)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="climbmix", help="which dataset")
    parser.add_argument("--base-url", default=None,
                        help=f"where the shards are (default: ${URL_ENV} when set, else the dataset's URL below)")
    parser.add_argument("--out", default=None, help="folder for the shards (default: the dataset's folder, below)")
    add_download_flags(parser)
    args = parser.parse_args(argv)
    if args.num_files < -1:
        raise UsageError(f"--num-files must be -1 (all) or at least 0, got {args.num_files}")
    check_download_flags(args)
    where = "--base-url" if args.base_url else f"${URL_ENV}"
    args.base_url = args.base_url or os.environ.get(URL_ENV) or DATASETS[args.dataset].url
    if not re.match(r"https?://", args.base_url):
        raise UsageError(f"{where}={args.base_url}: not an http:// or https:// URL")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    return args


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset = DATASETS[args.dataset]
    out_dir = Path(args.out) if args.out else Path(get_base_dir()) / dataset.folder
    names = [shard_name(i) for i in shard_indices(dataset, args.num_files)]
    what = f"{len(names)} {args.dataset} shards"
    if dataset.pinned_val and args.num_files >= 0:
        what += f" ({len(names) - 1} for training + {names[-1]}, the validation shard)"
    print(f"download: {what} from {args.base_url} into {out_dir}, {args.num_workers} at a time", file=sys.stderr,
          flush=True)
    progress = download(args.base_url, out_dir, names, args.num_workers, args.attempts, args.retry_wait,
                        args.timeout, args.progress_every)
    print(f"{progress.line()}; {out_dir} is ready: python -m train --data {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; a shard that cannot be fetched ends in one line on stderr and exit code 2, Ctrl-C in one
    line, the partial files kept for the next run."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
