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


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _walk(folder: Path, boundary: Path, skipped: list[SkipRecord]) -> list[str]:
    """Relative paths (forward slashes) of the files to read, sorted; every entry left out is a skip.

    Hidden entries (name starts with "."): counted, not read: they are editor, VCS and OS litter
    (.git, ._AppleDouble, .#lock links) far more often than documents, and one of them could stop
    the run with a decode error. Symlinks are followed only while they resolve inside `boundary`
    (the data root): a link out of it could ingest any file the process can read. A folder reached
    a second time (a link loop, or a second link to it) is read once.
    """
    found: list[str] = []
    seen_dirs = {os.path.realpath(folder): "."}

    def visit(directory: str, prefix: str) -> None:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:  # like an unreadable file: stop, naming it, rather than drop the folder
            raise ChunkingError(f"{prefix.rstrip('/') or '.'}: folder cannot be read: {exc.strerror or exc}") from None
        for entry in entries:
            rel = prefix + entry.name
            is_dir = entry.is_dir()  # follows links
            if entry.name.startswith("."):
                what = "folder" if is_dir else "file"
                skipped.append(SkipRecord(rel, None, f"hidden {what} (name starts with '.'): not read"))
                continue
            if entry.is_symlink():
                target = Path(os.path.realpath(entry.path))
                if not _inside(target, boundary):
                    skipped.append(SkipRecord(
                        rel, None, f"symlink {rel} -> {target} resolves outside the data root {boundary}: not read"))
                    continue
            if is_dir:
                real = os.path.realpath(entry.path)
                if real in seen_dirs:
                    skipped.append(SkipRecord(
                        rel, None, f"folder {rel} -> {real} is already read as {seen_dirs[real]}: not read twice"))
                    continue
                seen_dirs[real] = rel
                visit(entry.path, rel + "/")
            else:
                found.append(rel)

    visit(str(folder), "")
    return sorted(found)


def read_collection(
    folder: Path,
    config: ChunkingConfig = ChunkingConfig(),
    count_tokens: CountTokens | None = None,
    root: Path | None = None,
) -> ChunkingResult:
    """Read every supported file under `folder` into one CHUNK_SCHEMA table.

    Rows are ordered by source file, then by position in the file (= chunk_index for documents
    and JSONL; chunk files keep their record order, their chunk_index comes from metadata).

    `root` is the data root: symlinks that resolve outside it are skipped (and counted). By default
    it is the folder's parent, which is the data root for every collection folder
    (`PathsResource.collection_dir` is `<data root>/<name>`, resolved).
    """
    count = count_tokens or approx_token_count
    folder = Path(folder)
    if not folder.is_dir():
        raise ChunkingError(f"collection folder {folder} does not exist or is not a directory")
    folder = folder.resolve()
    boundary = Path(root).resolve() if root is not None else folder.parent
    if not _inside(folder, boundary):
        raise ChunkingError(f"collection folder {folder} resolves outside the data root {boundary}")
    rows: list[dict] = []
    skipped: list[SkipRecord] = []
    files_read: list[str] = []
    first_seen: dict[str, str] = {}
    for rel in _walk(folder, boundary, skipped):
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
        if not located and not any(s.file == rel for s in skipped):
            # Whatever the cause, a file that was read and gave nothing is reported, not dropped.
            skipped.append(SkipRecord(rel, None, "no text to embed"))
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
