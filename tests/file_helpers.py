"""Small file helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path


def write(folder: Path, rel: str, content: str | bytes) -> Path:
    """Write `content` (text as UTF-8, or bytes as they are) to folder/rel, creating folders."""
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path
