"""What a storage failure says: one line naming the file, what is wrong and what to do."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator


class StorageError(ValueError):
    """A stored file is missing, malformed, or a path would leave its root."""


class DiskFullError(StorageError):
    """The disk (or quota) filled up while a file was written; the previous files are intact."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def unreadable(path: Path, what: str, exc: Exception) -> StorageError:
    """A stored file that does not parse (a raw ArrowInvalid names neither the file nor the fix)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StorageError(
        f"{path} is not a valid {what} (truncated or corrupt: {detail}): rematerialize the asset that "
        f"writes it for this collection (its asset key is the folder path under the storage root)"
    )


def _mount_point(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def disk_full(path: Path, exc: OSError, root: Path | None = None) -> DiskFullError:
    """ENOSPC / EDQUOT while writing `path`, as one line naming the file, the storage root (when the
    writer knows it) and the filesystem that is full, with what is left on it."""
    mount = _mount_point(Path(path).parent)
    try:
        free = f"{shutil.disk_usage(mount).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    where = f"storage root {root}, " if root is not None else ""
    return DiskFullError(
        f"no space left on device while writing {path} ({where}filesystem at {mount}: {free}; "
        f"{os.strerror(exc.errno or errno.ENOSPC)}): free space there or point the storage root at a larger "
        f"disk; the previous files are intact and this write's temp files were removed"
    )


@contextlib.contextmanager
def naming_disk_full(path: Path, root: Path | None = None) -> Iterator[None]:
    """Turn a disk-full OSError raised inside into DiskFullError naming `path` (the cause kept)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full(path, exc, root) from exc
        raise
