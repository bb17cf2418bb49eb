"""Names that become path components, and paths that must stay under their root."""

from __future__ import annotations

import re
from pathlib import Path

from rag_clean.storage.errors import StorageError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str = "collection") -> str:
    """Collection and model names become path components: keep them plain."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise StorageError(
            f"{what} name {name!r} is not allowed: use letters, digits, '.', '_' or '-' (no path separators, no '..')"
        )
    return name


def path_under(root: Path, *parts: str) -> Path:
    """Join parts under root and refuse anything that resolves outside it."""
    root = Path(root).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise StorageError(f"path {path} escapes its root {root}")
    return path
