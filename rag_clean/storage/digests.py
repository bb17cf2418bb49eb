"""File digests cached by (size, mtime_ns): the one implementation behind the model-weights digest
(config.models.ResolvedModel.weights_digest) and a collection folder's content version (folder_version).

Re-hashing gigabytes of weights or a large collection on every run or sensor tick would dominate an
incremental run, so each file's sha256 is kept with the size and mtime_ns it had; a file whose stat
still matches is not read. An edit changes size or mtime_ns (or both), so it is re-read. The cache
file (JSON, atomic writes) is only an accelerator: missing or unreadable, every file is hashed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rag_clean.storage.files import file_digest, write_json

CACHE_FORMAT = 3  # {"format": 3, "files": {key: [size, mtime_ns, sha256]}}


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
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("files"), dict):
            return {}
        return data["files"]

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
