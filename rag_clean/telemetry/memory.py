"""Peak anonymous resident memory of this process, per stage window.

Anonymous RSS (`RssAnon` in /proc/self/status) is the heap: Python objects, numpy/Arrow allocations,
torch tensors on the CPU. It excludes memory-mapped file pages (the chunks and embedding files every
stage reads), which the kernel can drop and re-read, so it is the memory that must stay flat when a
collection grows. Linux keeps no high-water mark of it (VmHWM counts file pages too), so a daemon
thread samples it every 10 ms; `take()` adds a last sample, returns the peak since the previous
`take()` (or since the process started the probe) and starts a new window. A spike shorter than the
sampling interval can be missed.
"""

from __future__ import annotations

import os
import threading
import time

INTERVAL_S = 0.01


def rss_anon_bytes(pid: int | str = "self") -> int | None:
    """A process's anonymous RSS now (this one by default), or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRssAnon:
    """A sampler thread holding the peak anonymous RSS of the current window."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._peak = 0
        self._pid: int | None = None

    def _ensure_started(self) -> None:
        # After a fork the child has no sampler thread: start one for this pid.
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._peak = rss_anon_bytes() or 0
        threading.Thread(target=self._run, args=(self._pid,), name="rss-anon-probe", daemon=True).start()

    def _run(self, pid: int) -> None:
        while self._pid == pid:
            self.sample()
            time.sleep(self.interval_s)

    def sample(self) -> int | None:
        now = rss_anon_bytes()
        if now is not None:
            with self._lock:
                self._peak = max(self._peak, now)
        return now

    def start(self) -> "PeakRssAnon":
        self._ensure_started()
        return self

    def take(self) -> int | None:
        """Peak anonymous RSS since the previous take (then a new window starts at the current value)."""
        self._ensure_started()
        now = self.sample()
        if now is None:
            return None
        with self._lock:
            peak, self._peak = self._peak, now
        return int(peak)


# One per process: every stage of a run in this process reads its window from it.
PROBE = PeakRssAnon()
