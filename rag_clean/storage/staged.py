"""The staged-file protocol every writer implements: open (the constructor) -> write -> publish / abort.

    writer = SomeWriter(path, ...)   # stages a temp file (and scratch files) beside `path`
    writer.write(...)                # the writer's own methods
    writer.publish()                 # finish, fsync, rename onto `path`; then its attached side files
    writer.abort()                   # remove every temp and scratch file; `path` keeps the previous file

`Staged` is the protocol (what the IO manager and the stage runner dispatch on); `StagedFile` writes the
lifecycle once: a subclass only says how the staged file is completed (`_complete`) and which handles it
holds open (`_close`). Side files (a manifest, bge-m3 lexical rows, ColBERT vectors) are staged files
`attach`ed to the main one: published right after it (a side file never describes a file that was not
published) and aborted with it, so there is one way to publish them.

Clean-up must not depend on the disk: closing a buffered file flushes it, and on a full disk that raises
ENOSPC again, so `abort` closes with errors suppressed and unlinks in `finally`. A writer dropped without
publish or abort (a bug, or an exception before the caller's try) is removed when it is collected.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from pathlib import Path
from typing import IO, Iterator, Protocol, runtime_checkable

import numpy as np

from rag_clean.storage.atomic import publish_file, reclaim_stale_temps, remove_temp, temp_path_for
from rag_clean.storage.errors import DISK_FULL_ERRNOS, naming_disk_full


@runtime_checkable
class Staged(Protocol):
    """A file written beside `path` and renamed onto it by `publish()`; `abort()` leaves no trace."""

    path: Path

    def publish(self) -> Path: ...

    def abort(self) -> None: ...


class Scratch:
    """Temp files beside one output (spooled columns, scratch matrices), removed together even when
    closing them fails."""

    def __init__(self, beside: Path):
        self.beside = Path(beside)
        self.paths: list[Path] = []
        self.handles: list[IO] = []

    def path(self, part: str) -> Path:
        path = temp_path_for(self.beside.with_name(f"{self.beside.name}.{part}"))
        self.paths.append(path)
        return path

    def open(self, part: str, mode: str = "wb") -> IO:
        path = self.path(part)
        fh = open(path, mode)
        self.handles.append(fh)
        return fh

    def matrix(self, part: str, dtype, shape: tuple[int, ...]) -> np.memmap:
        """A .npy scratch array, memory-mapped, its blocks reserved up front: a write through a map onto a
        full disk is a SIGBUS that kills the process, a failed reservation an OSError the writer reports."""
        path = self.path(part)
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        try:
            _reserve(path)
        except BaseException:
            del array  # unmapped now, not when the traceback is dropped
            raise
        return array

    def drop(self) -> None:
        try:
            for fh in self.handles:
                with contextlib.suppress(OSError, ValueError):  # close flushes: ENOSPC again on a full disk
                    fh.close()
        finally:
            paths, self.paths, self.handles = self.paths, [], []
            for path in paths:
                with contextlib.suppress(OSError):
                    remove_temp(path)  # a mapped file stays readable until unmapped


def _reserve(path: Path) -> None:
    size = os.path.getsize(path)
    if size and hasattr(os, "posix_fallocate"):
        with open(path, "rb+") as fh:
            try:
                os.posix_fallocate(fh.fileno(), 0, size)
            except OSError as exc:
                if exc.errno in DISK_FULL_ERRNOS:
                    raise
                # EOPNOTSUPP / EINVAL: a filesystem without fallocate is written as before


def _discard(scratch: Scratch, staged: list) -> None:
    """Finalizer of a writer collected while still staged."""
    scratch.drop()
    for path in staged:
        with contextlib.suppress(OSError):
            remove_temp(path)


def names_disk_full(method):
    """Decorate a writer method: a full disk raises DiskFullError naming the writer's file."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with naming_disk_full(self.path, self.root):
            return method(self, *args, **kwargs)
    return wrapper


class StagedFile:
    """Base of every staged writer. `staged_path` is the temp file beside `path` the writer fills;
    `scratch` holds its other temp files (dropped once the staged file is complete)."""

    def __init__(self, path: Path, *, root: Path | None = None):
        self.path = Path(path)
        self.root = root  # the storage root, named in a disk-full error when the opener knows it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale_temps(self.path.parent)  # a killed run's staged and scratch files (as large as outputs)
        self.staged_path: Path | None = temp_path_for(self.path)
        self.scratch = Scratch(self.path)
        self.finished = False
        self._sides: list[Staged] = []
        self._staged = [self.staged_path]
        self._finalizer = weakref.finalize(self, _discard, self.scratch, self._staged)

    # ---- what a subclass says

    def _complete(self) -> None:
        """Write the staged file from what was written (its scratch files are dropped afterwards)."""

    def _close(self) -> None:
        """Close handles the writer holds on its staged file (errors here never stop the clean-up)."""

    # ---- the lifecycle, once

    def attach(self, side: Staged) -> None:
        """Publish `side` right after this file, abort it with this file."""
        self._sides.append(side)

    def finish(self) -> Path:
        """Complete the staged file (not yet visible at `path`); idempotent."""
        if self.staged_path is None:
            raise ValueError(f"{self.path.name}: already published or aborted")
        if not self.finished:
            try:
                with naming_disk_full(self.path, self.root):
                    self._complete()
            finally:
                self.scratch.drop()
            self.finished = True
        return self.staged_path

    def publish(self) -> Path:
        """Finish, then rename onto `path`, then publish attached side files. On failure everything
        staged is removed (the previous files stay) and the error names the file."""
        try:
            self.finish()
            for side in self._sides:
                finish = getattr(side, "finish", None)
                if finish is not None:
                    finish()  # every side file complete before anything is renamed
            with naming_disk_full(self.path, self.root):
                publish_file(self.staged_path, self.path)
            self.staged_path = None
            self._staged.clear()
            for side in self._sides:
                side.publish()
        except BaseException:
            self.abort()
            raise
        self._sides = []
        self._finalizer.detach()
        return self.path

    def abort(self) -> None:
        """Remove every temp and scratch file of this writer and its side files; never raises for I/O."""
        try:
            with contextlib.suppress(OSError, ValueError):
                self._close()
        finally:
            try:
                self.scratch.drop()
                if self.staged_path is not None:
                    with contextlib.suppress(OSError):
                        remove_temp(self.staged_path)
                    self.staged_path = None
                    self._staged.clear()
            finally:
                sides, self._sides = self._sides, []
                for side in sides:
                    with contextlib.suppress(Exception):
                        side.abort()
                self._finalizer.detach()


@contextlib.contextmanager
def abort_on_error(*writers: "Staged | None") -> Iterator[None]:
    """Abort the given writers (None skipped) if the block raises, then re-raise."""
    try:
        yield
    except BaseException:
        for writer in writers:
            if writer is not None:
                writer.abort()
        raise

