"""Progress lines for long steps: counts, rate and ETA, logged every so often.

Every step that can run for minutes (Spark chunks, activation caching, epochs, scoring,
Grad-CAM, predict) reports through :class:`Progress`, so an Airflow task log shows where a
run is::

    preprocess chunks: 12/40 (30%), 0.41/s, ETA 1m08s

A line is logged for the first update (the first rate and ETA), then at most once every
``every_seconds``, and always for the last item. With ``bar=True`` and a terminal on stderr,
an interactive command shows a ``rich`` progress bar instead, when ``rich`` is installed.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``7s``, ``2m57s``, ``1h04m``: short enough for a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``total`` items of ``what``; call :meth:`advance` (or :meth:`update`) as they finish.

    ``log``: where the lines go (a logger's ``info``, by default this module's logger).
    ``clock``: seconds, monotonic (tests pass their own, so nothing depends on real time).
    """

    def __init__(
        self,
        total: int,
        what: str,
        log: Callable[[str], None] | None = None,
        every_seconds: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        bar: bool = False,
    ) -> None:
        self.total, self.what, self.every_seconds, self.clock = int(total), what, every_seconds, clock
        self.log = log or logging.getLogger(__name__).info
        self.done = 0
        self.started = clock()
        self.logged_at: float | None = None
        self.bar = _rich_bar(what, self.total) if bar else None

    def rate(self) -> float:
        """Items per second since the start (0 before the first one)."""
        elapsed = self.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def status(self) -> str:
        """``1200/8528 (14%), 41.2/s, ETA 2m57s`` (no ETA before the first item or after the last)."""
        percent = f" ({100 * self.done // self.total}%)" if self.total else ""
        rate = self.rate()
        # Slow items (epochs, Spark chunks) read better as seconds each than as 0.0521/s.
        speed = f"{rate:.3g}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g}s each"
        text = f"{self.done}/{self.total}{percent}, {speed}"
        if self.done >= self.total:
            return f"{text}, done in {format_seconds(self.clock() - self.started)}"
        if rate > 0:
            text += f", ETA {format_seconds((self.total - self.done) / rate)}"
        return text

    def update(self, done: int, detail: str = "") -> None:
        """``done`` items finished so far (a count polled from elsewhere, e.g. Spark's tracker).

        ``detail``: appended to the line when one is logged (e.g. an epoch's metrics).
        """
        if done == self.done and self.logged_at is not None:
            return
        self.done = min(int(done), self.total)
        if self.bar is not None:
            self.bar.update(self.done)
            return
        now = self.clock()
        if self.logged_at is None or self.done >= self.total or now - self.logged_at >= self.every_seconds:
            self.logged_at = now
            self.log(f"{self.what}: {self.status()}" + (f"; {detail}" if detail else ""))

    def advance(self, count: int = 1, detail: str = "") -> None:
        """``count`` more items finished."""
        self.update(self.done + count, detail)

    def close(self) -> None:
        """Stop the bar, if any (the log lines need no closing)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _RichBar:
    def __init__(self, what: str, total: int, rich_progress, console) -> None:
        self.progress = rich_progress.Progress(
            rich_progress.TextColumn("{task.description}"),
            rich_progress.BarColumn(),
            rich_progress.MofNCompleteColumn(),
            rich_progress.TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task(what, total=total)
        self.progress.start()

    def update(self, done: int) -> None:
        self.progress.update(self.task, completed=done)

    def close(self) -> None:
        self.progress.stop()


def _rich_bar(what: str, total: int) -> _RichBar | None:
    """A bar on an interactive terminal, when ``rich`` is installed; None otherwise (log lines then)."""
    if not sys.stderr.isatty():
        return None
    try:
        # Optional and lazy: the training image need not have rich; log lines are the fallback.
        import rich.console
        import rich.progress
    except ImportError:
        return None
    return _RichBar(what, total, rich.progress, rich.console.Console(stderr=True))
