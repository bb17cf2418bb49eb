"""Whether a process still runs: how a dead writer's temp files (storage.atomic) and a dead run's pool
slots (rag_clean_assets.instance) are told from a live one's. Linux /proc, else existence only."""

from __future__ import annotations

import os


def process_alive(pid: int, not_after: float | None = None) -> bool:
    """Whether `pid` runs and, given `not_after` (a wall-clock time it must have existed at), had started
    by then, so a pid the kernel reused for a newer process does not count. Zombies are dead."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return False
    if not_after is None:
        return True
    try:
        with open("/proc/stat") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime "))
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    return started <= not_after + 2.0  # btime has 1 s resolution


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's limit), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
