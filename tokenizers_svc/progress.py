"""Progress of long operations: counts, rate and ETA, readable on a terminal and in a log.

On a terminal it is a tqdm bar; anywhere else (CI, ``ray job logs``, a redirected stderr) tqdm's
carriage-return updates would make one unreadable line, so it writes a plain line at most every
``interval_s`` seconds and one when done: ``encode: 3/10 files (30%), 0.52 files/s, ETA 13 s``
(``, loss=0.0123`` appended when :meth:`set_postfix` gave values).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """``update(n)`` as work completes; ``total=None`` when the amount is not known up front."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str,
        *,
        stream: TextIO | None = None,
        interval_s: float = LOG_INTERVAL_S,
        nested: bool = False,
        quiet: bool = False,
        initial: int = 0,
        also: str | None = None,
    ) -> None:
        """``nested``: a second bar below another one (it disappears when done). ``quiet``: count
        without showing anything (e.g. one file); :meth:`write` still prints. ``initial``: work
        already done before this run (a resumed job); the rate counts only this run's. ``also``: the
        unit of a second count that :meth:`update` adds to (e.g. the items cut from files), shown
        after the counts with its own rate."""
        self.desc, self.total, self.unit = desc, total, unit
        self.also, self.also_done = also, 0
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.quiet = quiet
        self.done = self.initial = initial
        self.postfix: dict[str, str] = {}
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if self.stream.isatty() and not quiet:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=self.stream,
                position=int(nested),
                leave=not nested,
            )

    def update(self, n: int = 1, also: int = 0) -> None:
        self.done += n
        self.also_done += also
        if self.bar is not None:
            self.bar.update(n)
            if self.also:
                self.bar.set_postfix({**self.postfix, f"{self.also}s": self._also_text(time.monotonic())})
            return
        now = time.monotonic()
        if self.quiet:
            return
        if now - self.last_line >= self.interval_s or self.done == self.total:
            self.last_line = now
            print(self.line(now), file=self.stream, flush=True)

    def set_postfix(self, **values: str) -> None:
        """Values shown after the counts (e.g. the latest loss), on the bar and in the log lines."""
        self.postfix = {key: str(value) for key, value in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)

    def line(self, now: float | None = None) -> str:
        """``desc: done/total units (pct%), rate units/s, ETA`` (no total: count, rate, elapsed),
        then the postfix values."""
        now = now or time.monotonic()
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        count = f"{self.done} {self.unit}s"
        also = f", {self._also_text(now)}" if self.also else ""
        extra = "".join(f", {key}={value}" for key, value in self.postfix.items())
        if not self.total:
            return (
                f"{self.desc}: {count}, {rate:.2f} {self.unit}/s{also}, elapsed {_duration(elapsed)}{extra}"
            )
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = _duration(left) if left != float("inf") else "unknown"
        percent = 100 * self.done / self.total
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit}s ({percent:.0f}%), "
            f"{rate:.2f} {self.unit}/s{also}, ETA {eta}{extra}"
        )

    def _also_text(self, now: float) -> str:
        """``12 items (3.40 item/s)``: the second count and its rate in this run."""
        rate = self.also_done / max(now - self.started, 1e-9)
        return f"{self.also_done} {self.also}s ({rate:.2f} {self.also}/s)"

    def write(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
