"""Progress lines for long encodes: done/total, rate and ETA, at most one line per interval.

The stages call `update` after every batch; a line is emitted when `interval_s` has passed since the
last one (and once at the end), so a 5-minute encode logs every 10 s instead of staying silent.
`emit` is any callable taking a string: Dagster's `context.log.info` in the assets, `print` elsewhere.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

DEFAULT_INTERVAL_S = 10.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _rate(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class ProgressLog:
    def __init__(self, label: str, total: int, emit: Callable[[str], None] | None, *, unit: str = "chunks",
                 interval_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.emit, self.unit = label, int(total), emit, unit
        self.interval_s = DEFAULT_INTERVAL_S if interval_s is None else interval_s
        self.clock = clock
        self.started = self.last = clock()
        self.done = 0
        self.tokens = 0

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.done / self.total:.1f}%)"
        parts.append(f"{_rate(rate)} {self.unit}/s")
        if self.tokens:
            parts.append(f"{_rate(self.tokens / elapsed)} tokens/s")
        if self.done < self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        else:
            parts.append(f"took {_duration(elapsed)}")
        return ", ".join(parts)

    def update(self, rows: int, tokens: int = 0) -> None:
        self.done += int(rows)
        self.tokens += int(tokens)
        now = self.clock()
        if self.emit is not None and now - self.last >= self.interval_s and self.done < self.total:
            self.last = now
            self.emit(self.line())

    def finish(self) -> None:
        if self.emit is not None and self.total:
            self.emit(self.line())


def track(batches: Iterable[tuple], progress: ProgressLog, stats=None) -> Iterator[tuple]:
    """Pass an encoder's (row indices, ...) batches through, counting rows (and the tokens its
    EncodeStats recorded since the last batch) into `progress`; the final line when done."""
    seen = 0
    for item in batches:
        tokens = 0
        if stats is not None:
            new = stats.batches[seen:]
            seen += len(new)
            tokens = sum(b.tokens for b in new)
        progress.update(len(item[0]), tokens)
        yield item
    progress.finish()
