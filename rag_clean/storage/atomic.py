"""Atomic publishing: temp names beside the target, fsync + rename, and the clean-up of temp files that
dead writers (or this process's given-up writes) left behind.

Temp names carry the writer's pid and a host tag, so a later writer can tell a dead writer's leftovers
(kill -9 skips every clean-up) from a live writer's file: ".<name>.<pid>@<host>.<hex>.tmp". This process
also keeps the names of the temp files it still writes (`temp_path_for` registers, `release_temp`
forgets), so one long process running many collections (rag-clean) reclaims its own leftovers too: a
file with this pid that no writer of this process holds is one whose clean-up failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from rag_clean.processes import process_alive
from rag_clean.storage.errors import naming_disk_full

_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[0-9a-f]{6})\.[0-9a-f]{8}\.tmp$")
_LIVE: set[str] = set()           # names of temp files a writer of this process still holds
_LIVE_LOCK = threading.Lock()


def temp_path_for(path: Path) -> Path:
    """A fresh temp name beside `path`, held by this process until `release_temp` (or removal)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}@{_HOST_TAG}.{uuid.uuid4().hex[:8]}.tmp")
    with _LIVE_LOCK:
        _LIVE.add(tmp.name)
    return tmp


def release_temp(tmp: Path) -> None:
    """This process no longer writes `tmp` (renamed into place, removed, or given up)."""
    with _LIVE_LOCK:
        _LIVE.discard(Path(tmp).name)


def remove_temp(tmp: Path) -> None:
    """Unlink a temp file (absent is fine); released even if the unlink fails, so a later writer in the
    folder reclaims it."""
    try:
        Path(tmp).unlink(missing_ok=True)
    finally:
        release_temp(tmp)


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _held_by_this_process(name: str) -> bool:
    with _LIVE_LOCK:
        return name in _LIVE


def reclaim_stale_temps(folder: Path) -> list[Path]:
    """Remove temp/scratch files in `folder` left by writers on this host whose process is gone, and this
    process's own that no writer holds any more. A live writer's file (its pid runs and is older than the
    file's last write, or a writer of this process holds it) is never touched."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = _TEMP_NAME.match(entry.name)
            if not match or match["host"] != _HOST_TAG:
                continue
            if int(match["pid"]) == os.getpid():
                if _held_by_this_process(entry.name):
                    continue
            else:
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if process_alive(int(match["pid"]), not_after=mtime):
                    continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def publish_file(temp: Path, final: Path) -> None:
    """fsync `temp`, then atomically rename it onto `final`."""
    with open(temp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(temp, final)
    release_temp(temp)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_path(path: Path, root: Path | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed (a full disk
    is reported as DiskFullError naming `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stale_temps(path.parent)
    tmp = temp_path_for(path)
    try:
        with naming_disk_full(path, root):
            yield tmp
            publish_file(tmp, path)
    except BaseException:
        remove_temp(tmp)
        raise


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
