"""File digests cached by (size, mtime_ns): the one implementation behind the model-weights digest
(config.models.ResolvedModel.weights_digest) and a collection folder's content version (folder_version).

Re-hashing gigabytes of weights or a large collection on every run or sensor tick would dominate an
incremental run, so each file's sha256 is kept with the size and mtime_ns it had; a file whose stat
still matches is not read. An edit changes size or mtime_ns (or both), so it is re-read. The cache
file (JSON, atomic writes) is only an accelerator: missing, every file is hashed; unreadable or of the
wrong shape, it is discarded with one warning (rag_clean.storage.caches) and every file is hashed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rag_clean.storage.atomic import write_json
from rag_clean.storage.caches import read_json_cache

def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


CACHE_FORMAT = 3  # {"format": 3, "files": {key: [size, mtime_ns, sha256]}}


def _cached_files(data) -> dict[str, list]:
    """The entries of a cache file of this format; another format is an older cache (ignored, rewritten);
    anything else raises (the file is discarded with a warning)."""
    if isinstance(data, dict) and data.get("format") != CACHE_FORMAT and "format" in data:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise TypeError("expected {\"format\": %d, \"files\": {...}}" % CACHE_FORMAT)
    for key, entry in data["files"].items():
        if not (isinstance(entry, list) and len(entry) == 3 and type(entry[0]) is int and type(entry[1]) is int
                and isinstance(entry[2], str) and len(entry[2]) == 64):
            raise ValueError(f"entry {key!r} is not [size, mtime_ns, sha256]")
    return data["files"]


class DigestCache:
    """`digest(key, path)` for many files, then `save()`. Keys are what the caller names files by
    (an absolute path for model files, the path relative to the collection folder for documents)."""

    def __init__(self, cache_file: Path | None, *, memo: dict[str, list] | None = None):
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self.memo = memo if memo is not None else {}   # a process-wide dict spares re-reading the file
        self.stored = self._load()
        self.used: dict[str, list] = {}
        self.hashed = 0

    def _load(self) -> dict[str, list]:
        if self.cache_file is None:
            return {}
        return read_json_cache(self.cache_file, _cached_files) or {}

    def digest(self, key: str, path: str | os.PathLike) -> str:
        """sha256 of the file (its stat follows symlinks); OSError if it cannot be read."""
        st = os.stat(path)
        entry = self.memo.get(key) or self.stored.get(key)
        if not (isinstance(entry, list) and len(entry) == 3 and entry[:2] == [st.st_size, st.st_mtime_ns]):
            entry = [st.st_size, st.st_mtime_ns, file_digest(Path(path))]
            self.hashed += 1
        self.memo[key] = self.used[key] = entry
        return entry[2]

    def save(self, *, keep_unused: bool = True) -> None:
        """Write the cache if anything changed. `keep_unused=False` drops entries this pass did not see
        (a collection's removed files); a shared cache (model files of many models) keeps them."""
        files = {**self.stored, **self.used} if keep_unused else dict(self.used)
        if self.cache_file is None or files == self.stored:
            return
        try:  # atomic: concurrent writers (sensor, steps) lose at most entries, never the file
            write_json(self.cache_file, {"format": CACHE_FORMAT, "files": files})
        except OSError:
            pass  # only a slower next run
        self.stored = files
