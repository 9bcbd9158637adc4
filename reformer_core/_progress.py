"""A tiny progress display for long commands: a redrawn bar on a terminal, a ticker otherwise.

No dependencies. On a TTY the bar is redrawn in place on one line; when the stream is not a
TTY (CI logs, pipes, files) every step prints its own line, so a log shows what ran when.

    with Progress(total=15, label="bench") as progress:
        for item in items:
            progress.step(f"numpy L={length} lsh x4")   # announces the step about to run
            ...
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

__all__ = ["Progress"]


def _clock_text(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class Progress:
    """Counts ``total`` steps on ``stream`` (default stderr).

    Args:
        total: number of steps expected (``step`` may be called fewer times).
        label: a short word shown before the counter.
        stream: where to write; default ``sys.stderr`` at construction time.
        enabled: ``False`` makes every method a no-op.
        tty: force bar (``True``) or ticker (``False``) mode; default ``stream.isatty()``.
        width: characters of the bar in TTY mode.
        clock: seconds since an arbitrary origin (for tests).
    """

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool = True,
        tty: bool | None = None,
        width: int = 24,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(0, int(total))
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.width = width
        self.clock = clock
        self.count = 0
        self._start = clock()
        self._last_width = 0
        self._closed = False

    @property
    def elapsed(self) -> float:
        """Seconds since the display was created."""
        return self.clock() - self._start

    def step(self, message: str = "") -> None:
        """Announce that step ``count + 1`` (described by ``message``) is starting."""
        if not self.enabled or self._closed:
            return
        self.count += 1
        self._show(self.count, message)

    def close(self, message: str = "done") -> None:
        """Finish the display (ends the TTY line); further calls do nothing."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self.tty:
            self._show(self.count, message, final=True)
        else:
            self._write(f"{self._prefix(self.count)} {message}\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close("interrupted" if exc_info[0] is not None else "done")

    # ---- drawing ----
    def _prefix(self, count: int) -> str:
        digits = len(str(self.total)) if self.total else 1
        label = f"{self.label} " if self.label else ""
        return f"{label}[{count:>{digits}}/{self.total} {_clock_text(self.elapsed)}]"

    def _show(self, count: int, message: str, final: bool = False) -> None:
        if not self.tty:
            self._write(f"{self._prefix(count)} {message}\n")
            return
        done = self.width if not self.total else min(self.width, self.width * max(count - (0 if final else 1), 0) // self.total)
        bar = "#" * done + "-" * (self.width - done)
        line = f"{self.label + ' ' if self.label else ''}[{bar}] {count}/{self.total} {_clock_text(self.elapsed)} {message}"
        padding = " " * max(0, self._last_width - len(line))
        self._last_width = len(line)
        self._write("\r" + line + padding + ("\n" if final else ""))

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # closed or broken stream: progress is never worth a crash
            self.enabled = False
