"""Progress lines for long encodes: done/total, rate and ETA, at most one line per interval.

The stages call `update` after every batch; a line is emitted when `interval_s` has passed since the
last one, or when the rows done cross the next `step_fraction` (5%) of the total at least a second after
the last line, and once at the end unless the whole loop took under a second and said nothing before
(12 queries encoded in 0.2 s need no "12/12, took 0s" line):
a 5-minute encode logs every 10 s, a fast one at most ~20 lines, an instant one none. `emit` is any callable taking a
string: Dagster's `context.log.info` in the assets, `print` elsewhere. `parse_line` reads a line back
(the `rag-clean` progress bars follow the run log through it).
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable, Iterable, Iterator, NamedTuple

DEFAULT_INTERVAL_S = 10.0
DEFAULT_STEP_FRACTION = 0.05
# A 5% mark gives a line only this long after the previous one: a loop that finishes in a second (12
# queries, one per forward) says it once, at the end, instead of once per item.
MIN_STEP_GAP_S = 1.0
# "<label>: <done>/<total> <unit>..." -- the head of every line `ProgressLog.line` writes.
_LINE = re.compile(r"^(?P<label>.+?): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\S+)")
# Said just before a model loads: loading takes seconds to tens of seconds before the first progress line,
# and a display (rag-clean's bars) shows this phase instead of a bar sitting at 0.
_LOADING = "loading model "


def loading_line(model: str) -> str:
    return f"{_LOADING}{model}"


def announce_loading(emit: Callable[[str], None] | None, model: str) -> None:
    """`emit` (a stage's progress callable) gets "loading model <model>"; None: nothing to say it to."""
    if emit is not None:
        emit(loading_line(model))


def parse_loading(text: str) -> str | None:
    """The model name of a loading_line; None for any other text."""
    return text[len(_LOADING):] if text.startswith(_LOADING) else None


class ProgressUpdate(NamedTuple):
    label: str
    done: int
    total: int
    unit: str


def parse_line(text: str) -> ProgressUpdate | None:
    """The (label, done, total, unit) of a progress line; None for any other text."""
    match = _LINE.match(text)
    if match is None:
        return None
    return ProgressUpdate(match["label"], int(match["done"]), int(match["total"]), match["unit"])


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
                 interval_s: float | None = None, step_fraction: float | None = DEFAULT_STEP_FRACTION,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.emit, self.unit = label, int(total), emit, unit
        self.interval_s = DEFAULT_INTERVAL_S if interval_s is None else interval_s
        # Rows per step (5% of the total, at least one row); None: time only.
        self.step_rows = max(1, math.ceil(self.total * step_fraction)) if step_fraction and self.total else None
        self.next_mark = self.step_rows
        self.clock = clock
        self.started = self.last = clock()
        self.said = False  # a line was emitted already
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
        crossed = self.next_mark is not None and self.done >= self.next_mark
        if crossed:  # the next mark above what is done: a big batch crossing several marks gives one line
            self.next_mark = (self.done // self.step_rows + 1) * self.step_rows
        due = (crossed and now - self.last >= MIN_STEP_GAP_S) or now - self.last >= self.interval_s
        if self.emit is not None and self.done < self.total and due:
            self.last, self.said = now, True
            self.emit(self.line())

    def finish(self) -> None:
        if self.emit is not None and self.total and (self.said or self.clock() - self.started >= MIN_STEP_GAP_S):
            self.emit(self.line())


def track(batches: Iterable, progress: ProgressLog, stats=None) -> Iterator:
    """Pass an encoder's batches (rag_clean.encoders.base.Encoded) through, counting rows (and the tokens its
    EncodeStats recorded since the last batch) into `progress`; the final line when done."""
    seen = 0
    for item in batches:
        tokens = 0
        if stats is not None:
            new = stats.batches[seen:]
            seen += len(new)
            tokens = sum(b.tokens for b in new)
        progress.update(len(item.rows), tokens)
        yield item
    progress.finish()
