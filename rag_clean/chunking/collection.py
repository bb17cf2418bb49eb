"""Walk a collection folder and read every supported file into one table (`read_collection`)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pyarrow as pa

from .config import ChunkingConfig, ChunkingError, ChunkingResult, SkipRecord
from .documents import chunk_markdown, chunk_plain_text
from .readers import read_chunk_file, read_jsonl
from .rows import CHUNK_SCHEMA
from .tokens import CountTokens, approx_token_count


def _file_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".json"):
        return "chunks"
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith((".md", ".markdown")):
        return "markdown"
    if lower.endswith(".txt"):
        return "text"
    return None


def _walk(folder: Path) -> list[str]:
    """Relative paths (forward slashes) of non-hidden files, sorted; symlinked folders not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                found.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(found)


def read_collection(
    folder: Path,
    config: ChunkingConfig = ChunkingConfig(),
    count_tokens: CountTokens | None = None,
) -> ChunkingResult:
    """Read every supported file under `folder` into one CHUNK_SCHEMA table.

    Rows are ordered by source file, then by position in the file (= chunk_index for documents
    and JSONL; chunk files keep their record order, their chunk_index comes from metadata).
    """
    count = count_tokens or approx_token_count
    folder = Path(folder)
    if not folder.is_dir():
        raise ChunkingError(f"collection folder {folder} does not exist or is not a directory")
    rows: list[dict] = []
    skipped: list[SkipRecord] = []
    files_read: list[str] = []
    first_seen: dict[str, str] = {}
    for rel in _walk(folder):
        name = rel.rsplit("/", 1)[-1]
        if name in config.exclude_names:
            continue
        kind = _file_kind(name) if any(fnmatch.fnmatch(name, g) for g in config.include_globs) else None
        if kind is None:
            skipped.append(SkipRecord(rel, None, "unsupported file type"))
            continue
        try:
            raw = (folder / rel).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ChunkingError(f"{rel}: not valid UTF-8 (byte offset {exc.start}: {exc.reason})") from exc
        except OSError as exc:  # unreadable file, broken symlink
            raise ChunkingError(f"{rel}: cannot be read: {exc.strerror or exc}") from exc
        files_read.append(rel)
        if kind == "chunks":
            located = read_chunk_file(raw, rel, count, skipped)
        elif kind == "jsonl":
            located = read_jsonl(raw, rel, count, skipped)
        else:
            if not raw.strip():
                skipped.append(SkipRecord(rel, None, "empty document"))
                continue
            chunker = chunk_markdown if kind == "markdown" else chunk_plain_text
            kwargs = {"skipped": skipped} if kind == "markdown" else {}
            located = [(row, f"{rel} chunk {row['chunk_index']}") for row in chunker(raw, rel, config, count, **kwargs)]
        for row, where in located:
            earlier = first_seen.get(row["chunk_id"])
            if earlier is not None:
                raise ChunkingError(f"duplicate chunk_id {row['chunk_id']!r}: in {earlier} and in {where}")
            first_seen[row["chunk_id"]] = where
            rows.append(row)
    if not rows:
        raise ChunkingError(
            f"collection folder {folder} yielded no chunks "
            f"({len(files_read)} files read, {len(skipped)} skipped)"
        )
    return ChunkingResult(table=pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA), skipped=skipped, files_read=files_read)
