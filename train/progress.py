"""Progress lines for long phases, and Ctrl-C that never tears an optimizer step.

`Heartbeat`: through every long phase (corpus build, evaluation, sampling, a checkpoint write, a slow training
step) a line at least every few seconds, printed from a background thread whenever the command has been silent
that long, so a phase whose single unit of work takes a minute (one CPU forward of a depth-12 model) still shows
it is alive. Plain lines, no terminal control codes: they read the same in a log file.

`InterruptGuard`: while installed, Ctrl-C (SIGINT) raises KeyboardInterrupt at once, except inside
`deferred()` (the optimizer step), where it is remembered and `pending` is set; the loop then stops at the end
of that step, so a checkpoint always holds a whole step.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

PROGRESS_EVERY = 5.0  # seconds between progress lines of a long phase


def format_duration(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{seconds:.0f}s"


class Heartbeat:
    """One background thread for a whole command: whenever nothing was printed for `every` seconds, it prints
    what is going on ("  validation: batch 3/8 (12s)"). Print through `hb.say`; name the current activity
    with `hb.doing(label)` (restarts its clock) and its progress with `hb.detail(text)`. With `say=None`
    (quiet) nothing is printed and no thread runs."""

    def __init__(self, say: Callable[[str], None] | None, every: float = PROGRESS_EVERY):
        self._print, self.every = say, every
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = self._since = time.perf_counter()
        self._what: str | None = None
        self._detail = ""

    def say(self, text: str) -> None:
        if self._print is None:
            return
        with self._lock:
            self._print(text)
            self._last = time.perf_counter()

    def doing(self, what: str | None, detail: str = "") -> None:
        """The activity from now on (None: nothing worth reporting, e.g. between step lines)."""
        self._what, self._detail, self._since = what, detail, time.perf_counter()

    def detail(self, text: str) -> None:
        self._detail = text

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.every)):
            now = time.perf_counter()
            if self._what is None or now - self._last < self.every:
                continue
            detail = f": {self._detail}" if self._detail else ""
            self.say(f"  {self._what}{detail} ({format_duration(now - self._since)})")

    def __enter__(self) -> Heartbeat:
        if self._print is not None:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class InterruptGuard:
    """Installs a SIGINT handler for the `with` block (main thread only; elsewhere it does nothing)."""

    def __init__(self):
        self.pending = False
        self._deferring = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self._deferring:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self):
        """Ctrl-C inside this block only sets `pending` (checked by the caller when its unit of work is done)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def interrupt_after(hb, done: int, saved_step: int, out_dir: Path, save, distributed: bool) -> KeyboardInterrupt:
    """After Ctrl-C at step `done`: in a single process, `save()` (which returns the step it wrote) unless that step
    is already on disk, a second Ctrl-C abandoning it; returns the interrupt whose message says what is on disk."""
    hb.doing(None)
    if saved_step != done and done > 0 and not distributed:
        try:
            saved_step = save()
        except KeyboardInterrupt:
            pass
    return _interrupted_line(done, saved_step, out_dir)


def _interrupted_line(done: int, saved_step: int, out_dir: Path) -> KeyboardInterrupt:
    if saved_step == done and done > 0:
        return KeyboardInterrupt(f"interrupted after step {done}: its checkpoint is in {out_dir}; "
                                 f"continue with --resume-from-step={done}")
    return KeyboardInterrupt(f"interrupted after step {done}; no checkpoint written")
