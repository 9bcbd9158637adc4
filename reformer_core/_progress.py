"""A tiny progress display for long commands: a redrawn bar on a terminal, a ticker otherwise.

No dependencies. On a TTY the bar is redrawn in place on one line; when the stream is not a
TTY (CI logs, pipes, files) steps print their own lines, throttled to one every
``min_interval`` seconds (the first and the last step always print, and a line says how many
steps it stands for), so a log shows what ran when without a line per step.

    with Progress(total=15, label="bench") as progress:
        for item in items:
            progress.step(f"numpy L={length} lsh x4")   # announces the step about to run
            ...
            progress.note("round 2/3")                   # news within a step (not counted)
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
        min_interval: in ticker mode (not a TTY), the fewest seconds between two printed lines
            (default 10; 0 prints every step). Notes print only when the interval has passed.
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
        min_interval: float = 10.0,
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
        self.min_interval = max(0.0, float(min_interval))
        self._last_line: float | None = None  # when ticker mode last printed
        self._unprinted = 0  # steps since the last printed line

    @property
    def elapsed(self) -> float:
        """Seconds since the display was created."""
        return self.clock() - self._start

    def step(self, message: str = "") -> None:
        """Announce that step ``count + 1`` (described by ``message``) is starting."""
        if not self.enabled or self._closed:
            return
        self.count += 1
        if self.tty:
            self._show(self.count, message)
            return
        self._unprinted += 1
        if self._due() or self.count == 1 or (self.total and self.count >= self.total):
            self._tick(message)

    def note(self, message: str) -> None:
        """News within the current step (a round, a phase); not counted. On a TTY it redraws the
        bar; in ticker mode it prints only when ``min_interval`` has passed since the last line."""
        if not self.enabled or self._closed:
            return
        if self.tty:
            self._show(self.count, message)
        elif self._due():
            self._tick(message, earlier=self._unprinted)

    def _due(self) -> bool:
        return self._last_line is None or self.clock() - self._last_line >= self.min_interval

    def _tick(self, message: str, earlier: int | None = None) -> None:
        skipped = self._unprinted - 1 if earlier is None else earlier
        extra = f" (+{skipped} earlier step{'s' if skipped > 1 else ''})" if skipped > 0 else ""
        self._write(f"{self._prefix(self.count)} {message}{extra}\n")
        self._last_line = self.clock()
        self._unprinted = 0

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
