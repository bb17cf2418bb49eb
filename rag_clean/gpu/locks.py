"""Per-device lock files: exclusive across processes, dropped by the kernel when the holder dies.

- One lock file per physical device, locked with `fcntl.flock`. The kernel drops a flock when the
  holder's last descriptor closes, so a holder killed with SIGKILL can never leave a device stuck.
  Lock files are never deleted (deleting a flock file races with waiters).
- Forked children (DataLoader workers, tokenizer pools) close inherited lock descriptors right after
  fork, so a surviving child cannot keep a dead parent's device locked.
- Not re-entrant: a second lock object on the same device in this process contends like any other
  (flock treats separate opens independently).
- Next to each lock, a JSON holder note (pid, host, owner, since) for humans and error messages.
  The lock is the truth: a stale note left by a killed holder is simply overwritten.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from pathlib import Path

from rag_clean.storage import write_json


_held_lock_fds: set[int] = set()
_held_lock_fds_guard = threading.Lock()


def _close_lock_fds_in_forked_child() -> None:
    # The child's copies share the parent's open file description; closing them in the child
    # leaves the parent's lock intact but stops a long-lived child from pinning it after the parent dies.
    for fd in list(_held_lock_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_lock_fds.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_forked_child)


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
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        with _held_lock_fds_guard:
            _held_lock_fds.add(fd)
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            self.note_path.unlink()
        except FileNotFoundError:
            pass
        with _held_lock_fds_guard:
            _held_lock_fds.discard(fd)
        os.close(fd)  # closing the last descriptor drops the flock

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
