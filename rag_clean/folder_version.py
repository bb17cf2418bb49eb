"""The content version of a collection folder: what Dagster observes to know the folder changed.

    digest = sha256 over (relative path, sha256 of the file's bytes) of every file the collection
    walk would visit (rag_clean.chunking.collection: hidden entries skipped, symlinks only inside the
    data root), sorted by path.

Hashing every byte of a big collection on every sensor tick would be wasteful, so file digests are
cached per collection under the storage layout's state folder, keyed by (relative path, size, mtime_ns):
an unchanged file is stat'ed, not read. An edit changes size or mtime_ns (or both), so it is re-read.
The cache is only an accelerator: a missing or unreadable cache file means every file is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from rag_clean.chunking.collection import _walk as walk_collection_files
from rag_clean.storage import write_json

CACHE_FORMAT = 2  # 2: keyed by the path relative to the collection folder
_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class FolderVersion:
    digest: str      # the data version: 24 hex chars, like table_data_version
    files: int       # files covered
    hashed: int      # files read this time (the rest came from the cache)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _load_cache(cache_file: Path | None) -> dict:
    if cache_file is None:
        return {}
    try:
        data = json.loads(Path(cache_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def folder_version(folder: Path, cache_file: Path | None = None, root: Path | None = None) -> FolderVersion:
    """The folder's content version (see the module docstring). `root` is the data root (symlink
    boundary), by default the folder's parent, as in `read_collection`."""
    folder = Path(folder).resolve()
    boundary = Path(root).resolve() if root is not None else folder.parent
    cache = _load_cache(cache_file)
    fresh: dict[str, list] = {}
    hashed = 0
    overall = hashlib.sha256()
    rels = walk_collection_files(folder, boundary, [])
    for rel in rels:
        path = os.path.join(folder, rel)
        try:
            st = os.stat(path)  # follows a symlink: the target's size and mtime
        except OSError:  # vanished or a broken link: part of the version as such, so it is seen
            overall.update(f"{rel}\0<unreadable>\n".encode("utf-8", "surrogateescape"))
            continue
        entry = cache.get(rel)
        if isinstance(entry, list) and len(entry) == 3 and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            digest = entry[2]
        else:
            try:
                digest = _file_sha256(path)
            except OSError:
                overall.update(f"{rel}\0<unreadable>\n".encode("utf-8", "surrogateescape"))
                continue
            hashed += 1
        fresh[rel] = [st.st_size, st.st_mtime_ns, digest]
        overall.update(f"{rel}\0{digest}\n".encode("utf-8", "surrogateescape"))
    if cache_file is not None and (hashed or len(fresh) != len(cache)):
        try:  # atomic: concurrent writers (sensor, chunks steps) lose at most entries, never the file
            write_json(Path(cache_file), {"format": CACHE_FORMAT, "files": fresh})
        except OSError:
            pass
    return FolderVersion(overall.hexdigest()[:24], len(rels), hashed)
