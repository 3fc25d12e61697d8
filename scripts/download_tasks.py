"""Download the chat tasks' public datasets into the folders the task loaders read (tasks/datafiles.py).

    python -m scripts.download_tasks                     # every dataset below
    python -m scripts.download_tasks gsm8k arc-easy      # some of them
    python -m scripts.chat_eval -i sft -a GSM8K

Each dataset is a Hugging Face dataset repository, one of its configs and its splits, the ones the reference's
tasks load. The files are the Hub's parquet export of each split: one request to the dataset viewer's listing
(`https://datasets-server.huggingface.co/parquet?dataset=REPO`) names them with their sizes, and split `S`'s files
land as `S-00000.parquet`, `S-00001.parquet`, ... in `<base>/tasks_data/<name>/`, which is what every loader reads.

The files come through the pretraining downloader (scripts/download_data.py): in parallel, each one streamed into
a `.part` file, resumed with HTTP Range after a dropped connection, retried with backoff, renamed into place only
when its length is the one announced and its parquet footer reads; a rerun skips the files that are complete.
Without a network (or with the listing unreachable) the command ends in one line naming what it could not reach;
the files can then be copied in by hand under the names above (a Hugging Face parquet export or a JSONL file per
split, see tasks/datafiles.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tritonchat.engine.cli import HelpFormatter, UsageError, command_name, run_main
from tritonchat.engine.paths import get_base_dir
from tritonchat.scripts.download_data import (
    USER_AGENT,
    DownloadError,
    _reason,
    add_download_flags,
    check_download_flags,
    download_files,
)
from tritonchat.tasks.datafiles import DATA_DIR_NAME

PROG = command_name("scripts.download_tasks")
LISTING_ENV = "TRITONCHAT_TASKS_LISTING"  # overrides the listing URL (a mirror, a local server)
LISTING_URL = "https://datasets-server.huggingface.co/parquet?dataset={repo}"


@dataclass(frozen=True)
class TaskData:
    repo: str  # Hugging Face dataset repository
    config: str  # its config (subset)
    splits: tuple[str, ...]  # the splits the loaders read


TASK_DATA = {
    "smoltalk": TaskData("HuggingFaceTB/smol-smoltalk", "default", ("train", "test")),
    "mmlu": TaskData("cais/mmlu", "all", ("auxiliary_train", "validation", "dev", "test")),
    "arc-easy": TaskData("allenai/ai2_arc", "ARC-Easy", ("train", "validation", "test")),
    "arc-challenge": TaskData("allenai/ai2_arc", "ARC-Challenge", ("train", "validation", "test")),
    "gsm8k": TaskData("openai/gsm8k", "main", ("train", "test")),
    "gsm8k-socratic": TaskData("openai/gsm8k", "socratic", ("train", "test")),
    "humaneval": TaskData("openai/openai_humaneval", "openai_humaneval", ("test",)),
}
DEFAULT = ("smoltalk", "mmlu", "arc-easy", "arc-challenge", "gsm8k", "humaneval")


def listing(url: str, timeout: float) -> list[dict]:
    """The listing's `parquet_files` entries ({config, split, url, filename, size}); DownloadError in one line."""
    host = urllib.parse.urlsplit(url).netloc
    try:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
        with urllib.request.build_opener().open(req, timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        e.close()
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (OSError, ValueError) as e:
        raise DownloadError(f"cannot read the file listing from {host}: {_reason(e)} ({url})") from None
    files = body.get("parquet_files") if isinstance(body, dict) else None
    if not isinstance(files, list):
        raise DownloadError(f"{url}: not a parquet file listing (no 'parquet_files' list)")
    return [f for f in files if isinstance(f, dict)]


def plan(data: TaskData, entries: list[dict], source: str) -> list[tuple[str, str]]:
    """(url, local name) for every file of data's splits in `entries`, split S's files in name order as
    S-00000.parquet, S-00001.parquet, ...; a split with no file is a DownloadError naming it."""
    files = []
    for split in data.splits:
        mine = sorted((e for e in entries if e.get("config") == data.config and e.get("split") == split),
                      key=lambda e: (str(e.get("filename", "")), str(e.get("url", ""))))
        if not mine:
            raise DownloadError(f"{source}: no parquet files for {data.repo} config {data.config!r} split {split!r}")
        for i, e in enumerate(mine):
            url = str(e.get("url", ""))
            if not re.match(r"https?://", url):
                raise DownloadError(f"{source}: a file of {data.repo} {split} has no http(s) URL ({url!r})")
            files.append((url, f"{split}-{i:05d}.parquet"))
    return files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    table = "\n".join(f"  {k}: {d.repo} ({d.config}) {', '.join(d.splits)}" for k, d in TASK_DATA.items())
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=_Formatter,
                                     description="Download the chat tasks' datasets (parquet) into "
                                                 "<base>/tasks_data/<name>/.", epilog=f"datasets:\n{table}")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"datasets to fetch (default: {' '.join(DEFAULT)})")
    parser.add_argument("--base-dir", default=None,
                        help="default: $TRITONCHAT_BASE_DIR, else ./.tritonchat if it exists, else ~/.cache/tritonchat")
    parser.add_argument("--listing-url", default=None,
                        help=f"the file listing, {{repo}} replaced by the repository (default: ${LISTING_ENV} when "
                             f"set, else {LISTING_URL})")
    add_download_flags(parser)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in TASK_DATA]
    if unknown:
        raise UsageError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(TASK_DATA)}")
    args.names = list(dict.fromkeys(args.names)) or list(DEFAULT)
    check_download_flags(args)
    where = "--listing-url" if args.listing_url else f"${LISTING_ENV}"
    args.listing_url = args.listing_url or os.environ.get(LISTING_ENV) or LISTING_URL
    if not re.match(r"https?://", args.listing_url) or "{repo}" not in args.listing_url:
        raise UsageError(f"{where}={args.listing_url}: not an http(s) URL with {{repo}} in it")
    return args


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the epilog's lines kept whole."""


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.base_dir or get_base_dir()) / DATA_DIR_NAME
    listings: dict[str, list[dict]] = {}
    for name in args.names:
        data = TASK_DATA[name]
        url = args.listing_url.replace("{repo}", urllib.parse.quote(data.repo, safe="/"))
        if data.repo not in listings:
            print(f"download: listing the files of {data.repo}", file=sys.stderr, flush=True)
            listings[data.repo] = listing(url, args.timeout)
        files = plan(data, listings[data.repo], url)
        out = root / name
        print(f"download: {name}: {len(files)} files of {data.repo} ({data.config}) into {out}", file=sys.stderr,
              flush=True)
        progress = download_files(files, out, args.num_workers, args.attempts, args.retry_wait, args.timeout,
                                  args.progress_every)
        print(f"download: {name}: {progress.line()}", file=sys.stderr, flush=True)
    print(f"{len(args.names)} dataset(s) ready in {root}: {', '.join(args.names)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; a listing or file that cannot be fetched ends in one line on stderr and exit code 2,
    Ctrl-C in one line, the partial files kept for the next run."""
    return run_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
