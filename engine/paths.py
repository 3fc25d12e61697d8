"""Where tritonchat keeps its data, tokenizer and checkpoints, and how it writes a file.

The base directory, first match wins:
    1. $TRITONCHAT_BASE_DIR, when set;
    2. `./.tritonchat` in the working directory, when that folder exists (`make demo` creates it in the checkout,
       so every command run from the checkout's root uses the demo's files);
    3. `~/.cache/tritonchat`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

LOCAL_BASE_DIR = ".tritonchat"


def get_base_dir() -> str:
    """The base directory (see the module docstring), as an absolute path.

    The environment and the working directory are read on every call (never at import), and nothing is created.
    """
    base = os.environ.get("TRITONCHAT_BASE_DIR")
    if base:
        return os.path.abspath(os.path.expanduser(base))
    if os.path.isdir(LOCAL_BASE_DIR):
        return os.path.abspath(LOCAL_BASE_DIR)
    return os.path.join(os.path.expanduser("~"), ".cache", "tritonchat")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through a temporary file in the same folder, then rename it into place.

    A reader never sees half a file, and an interrupted write leaves the previous file (or none) under the final
    name. The folder is created when missing. The file gets the permissions `open()` would give it (0o666 less
    the umask); `tempfile.mkstemp` would make it 0600, unreadable to anyone else.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # another writer drew the same name
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
