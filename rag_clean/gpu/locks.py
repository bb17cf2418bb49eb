"""Per-device lock files: exclusive across processes, dropped by the kernel when the holder dies.

- One lock file per physical device, locked with `filelock.UnixFileLock` (fcntl.flock). The kernel
  drops a flock when the holder's last descriptor closes, so a holder killed with SIGKILL can never
  leave a device stuck. Lock files are never deleted (deleting a flock file races with waiters).
- filelock (4.x) closes a held lock's descriptor in forked children (DataLoader workers, tokenizer
  pools), so a surviving child cannot keep a dead parent's device locked. (3.x releases with an
  explicit LOCK_UN, which frees the device when the parent releases, but not when it dies.)
- Not re-entrant: a second lock object on the same device in this process contends like any other
  (flock treats separate opens independently).
- Next to each lock, a JSON holder note (pid, host, owner, since) for humans and error messages.
  The lock is the truth: a stale note left by a killed holder is simply overwritten.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from filelock import Timeout, UnixFileLock

from rag_clean.storage.atomic import write_json


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


class DeviceLock:
    """The lock file and holder note of one device, taken without blocking."""

    def __init__(self, lock_dir: Path, index: int, key: str) -> None:
        self.index = index
        self.key = key
        self.device = f"cuda:{index}"
        self.lock_path = lock_dir / f"device-{_safe_name(key)}.lock"
        self.note_path = lock_dir / f"device-{_safe_name(key)}.holder.json"
        # Native flock only: a soft (marker-file) fallback would outlive a SIGKILLed holder.
        # thread_local=False: the lock belongs to its lease, not to a thread; with per-thread state a
        # release from another thread would see nothing held and leave the device locked.
        self._lock = UnixFileLock(
            self.lock_path, thread_local=False, blocking=False, fallback_to_soft=False, preserve_lock_file=True
        )

    def try_acquire(self) -> bool:
        try:
            self._lock.acquire()
        except Timeout:
            return False
        return True

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        self.note_path.unlink(missing_ok=True)
        self._lock.release()

    def write_note(self, note: dict) -> None:
        write_json(self.note_path, {**note, "device": self.device, "device_key": self.key})

    def read_note(self) -> dict | None:
        try:
            return json.loads(self.note_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def describe_holder(self) -> str:
        note = self.read_note()
        if note is None:
            return f"{self.device} held by an unknown process (no readable holder note at {self.note_path})"
        return (
            f"{self.device} held by pid {note.get('pid')} on {note.get('host')} "
            f"(owner {note.get('owner')!r}, since {note.get('since')})"
        )


def release_all(locks: list[DeviceLock]) -> None:
    for lk in locks:
        lk.release()


def try_acquire_n(locks: list[DeviceLock], n: int) -> tuple[list[DeviceLock], list[DeviceLock]]:
    """One pass over `locks` without blocking: (the first n free ones, []) or ([], the busy ones).

    All or nothing: when fewer than n are free, the ones taken are let go at once, so nobody holds a
    device while waiting and two n=2 requesters cannot deadlock.
    """
    got: list[DeviceLock] = []
    busy: list[DeviceLock] = []
    try:
        for lk in locks:
            if len(got) == n:
                break
            (got if lk.try_acquire() else busy).append(lk)
    except BaseException:
        release_all(got)
        raise
    if len(got) < n:
        release_all(got)
        return [], busy
    return got, []


def write_notes(locks: list[DeviceLock], note: dict) -> None:
    """Write the holder note beside every held lock; on failure let go of all of them."""
    try:
        for lk in locks:
            lk.write_note(note)
    except BaseException:
        release_all(locks)
        raise
