"""The content version of a collection folder: what Dagster observes to know the folder changed.

    digest = sha256 over (relative path, sha256 of the file's bytes) of every file the collection
    walk would visit (rag_clean.chunking.collection: hidden entries skipped, symlinks only inside the
    data root), sorted by path.

Hashing every byte of a big collection on every sensor tick would be wasteful, so file digests are
cached per collection under the storage layout's state folder (rag_clean.storage.digests, keyed by relative path,
checked against size and mtime_ns): an unchanged file is stat'ed, not read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from rag_clean.chunking.collection import _walk as walk_collection_files
from rag_clean.storage.digests import DigestCache


@dataclass(frozen=True)
class FolderVersion:
    digest: str      # the data version: 24 hex chars, like table_data_version
    files: int       # files covered
    hashed: int      # files read this time (the rest came from the cache)
    # relative path -> sha256 of each file: the chunks stage takes them instead of hashing every file again
    file_digests: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


def folder_version(folder: Path, cache_file: Path | None = None, root: Path | None = None) -> FolderVersion:
    """The folder's content version (see the module docstring). `root` is the data root (symlink
    boundary), by default the folder's parent, as in `read_collection`."""
    folder = Path(folder).resolve()
    boundary = Path(root).resolve() if root is not None else folder.parent
    digests = DigestCache(cache_file)
    overall = hashlib.sha256()
    rels = walk_collection_files(folder, boundary, [])
    file_digests = {}
    for rel in rels:
        try:
            digest = digests.digest(rel, os.path.join(folder, rel))
        except OSError:  # vanished or a broken link: part of the version as such, so it is seen
            digest = "<unreadable>"
        else:
            file_digests[rel] = digest
        overall.update(f"{rel}\0{digest}\n".encode("utf-8", "surrogateescape"))
    digests.save(keep_unused=False)
    return FolderVersion(overall.hexdigest()[:24], len(rels), digests.hashed, file_digests)
