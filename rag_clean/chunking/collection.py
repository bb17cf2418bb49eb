"""Walk a collection folder and stream every supported file into the chunks file (`stream_collection`),
re-parsing only files whose bytes changed since the previous run (its manifest says which rows each gave)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pyarrow as pa

from rag_clean.chunking.duplicates import duplicate_id_rows
from rag_clean.storage.arrow_io import ColumnSpool
from rag_clean.storage.digests import file_digest

from .config import ChunkingConfig, ChunkingError, ChunkingResult, SkipRecord
from .documents import chunk_markdown, chunk_plain_text
from .jsonl_pool import JsonlPlan, JsonlReader
from .readers import iter_jsonl, jsonl_file_lines, read_chunk_file, read_jsonl
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


# Bump when parsing or chunking logic changes which rows a file gives: the manifest then no longer
# matches, and every file is parsed again.
CHUNKER_VERSION = "1"

MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()),        # relative to the collection folder, forward slashes
    ("sha256", pa.string()),      # of the file's bytes
    ("size", pa.int64()),
    ("config", pa.string()),      # chunking config + chunker version + token counter
    ("first_row", pa.int64()),    # its rows in the chunks file: [first_row, first_row + rows)
    ("rows", pa.int64()),
    ("skips_json", pa.string()),  # its skips ([[index, reason], ...]), replayed when it is reused
])
_FLUSH_ROWS = 8192  # parsed rows buffered before they go to the spool


@dataclass
class PreviousChunks:
    """The last published chunks file and its manifest: rows of unchanged files are copied from it."""

    table: pa.Table  # memory-mapped
    entries: dict[str, dict]  # path -> manifest row


@dataclass
class StreamedChunks:
    rows: int
    skipped: list[SkipRecord]
    files_read: list[str]
    files_reused: int
    files_parsed: int
    manifest: pa.Table


def config_key(config: ChunkingConfig, count: CountTokens) -> str:
    """What must match for a file's previous rows to be reused (besides its bytes and path)."""
    return json.dumps({"chunker": CHUNKER_VERSION, "max_tokens": config.max_tokens,
                       "overlap_tokens": config.overlap_tokens, "min_chunk_tokens": config.min_chunk_tokens,
                       # A real tokenizer's counter carries its identity (chunking.tokens.TokenCounter.key).
                      "count_tokens": getattr(count, "key", None)
                      or f"{count.__module__}.{getattr(count, '__qualname__', repr(count))}"},
                      sort_keys=True)


def _files_to_read(folder: Path, boundary: Path, config: ChunkingConfig, skipped: list[SkipRecord]):
    """(relative path, kind) of every supported file, in row order; the rest are skips."""
    for rel in _walk(folder, boundary, skipped):
        name = rel.rsplit("/", 1)[-1]
        if name in config.exclude_names:
            continue
        kind = _file_kind(name) if any(fnmatch.fnmatch(name, g) for g in config.include_globs) else None
        if kind is None:
            skipped.append(SkipRecord(rel, None, "unsupported file type"))
            continue
        yield rel, kind


def _read_bytes(folder: Path, rel: str) -> bytes:
    try:
        return (folder / rel).read_bytes()
    except OSError as exc:  # unreadable file, broken symlink
        raise ChunkingError(f"{rel}: cannot be read: {exc.strerror or exc}") from exc


def _parse(data: bytes, rel: str, kind: str, config: ChunkingConfig, count: CountTokens,
           skipped: list[SkipRecord]) -> list[tuple[dict, str]]:
    """One file's rows, each with where it came from ("a.jsonl line 3"); its skips go to `skipped`."""
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ChunkingError(f"{rel}: not valid UTF-8 (byte offset {exc.start}: {exc.reason})") from exc
    if kind == "chunks":
        located = read_chunk_file(raw, rel, count, skipped)
    elif kind == "jsonl":
        located = read_jsonl(raw, rel, count, skipped)
    elif not raw.strip():
        skipped.append(SkipRecord(rel, None, "empty document"))
        return []
    else:
        chunker = chunk_markdown if kind == "markdown" else chunk_plain_text
        kwargs = {"skipped": skipped} if kind == "markdown" else {}
        located = [(row, f"{rel} chunk {row['chunk_index']}") for row in chunker(raw, rel, config, count, **kwargs)]
    return located


def _digest(folder: Path, rel: str) -> str:
    try:
        return file_digest(folder / rel)
    except OSError as exc:  # unreadable file, broken symlink
        raise ChunkingError(f"{rel}: cannot be read: {exc.strerror or exc}") from exc


def _check_unique_ids(table: pa.Table, folder: Path, config: ChunkingConfig, count: CountTokens) -> None:
    """Raise on the first duplicate chunk_id (by its second occurrence), naming both places.

    Streaming: 64-bit hashes of the ids are sorted on disk (`duplicate_id_rows`); only rows whose hashes
    collide are compared exactly, and only the two files involved are parsed again to say where."""
    groups = duplicate_id_rows(table.column("chunk_id"))
    if not groups:
        return
    first, second = (int(r) for r in groups[0][:2])
    chunk_id = table.column("chunk_id")[first].as_py()
    places: list[str] = []
    for rel in dict.fromkeys(table.column("source_file")[r].as_py() for r in (first, second)):
        kind = _file_kind(rel.rsplit("/", 1)[-1])
        located = _parse(_read_bytes(folder, rel), rel, kind, config, count, [])
        places += [where for row, where in located if row["chunk_id"] == chunk_id]
    earlier, where = (places + ["?", "?"])[:2]
    raise ChunkingError(f"duplicate chunk_id {chunk_id!r}: in {earlier} and in {where}")


def stream_collection(
    folder: Path,
    spool: ColumnSpool,
    config: ChunkingConfig = ChunkingConfig(),
    count_tokens: CountTokens | None = None,
    root: Path | None = None,
    previous: PreviousChunks | None = None,
    digests: Mapping[str, str] | None = None,
    jsonl: JsonlPlan = JsonlPlan(),
) -> StreamedChunks:
    """Read every supported file under `folder` into `spool` (CHUNK_SCHEMA rows), file by file.

    Rows are ordered by source file, then by position in the file (= chunk_index for documents and
    JSONL; chunk files keep their record order, their chunk_index comes from metadata). A file whose
    bytes, path and chunking config match `previous`'s manifest is not parsed: its rows are copied from
    the previous chunks file (zero-copy slices of the memory-mapped table) and its skips replayed, so
    the result is byte-identical to parsing everything. Anonymous memory holds one file's rows at a
    time. Finishes the spool (staged file) and returns the new manifest; on error the spool is aborted.

    `digests` (relative path -> sha256, FolderVersion.file_digests) are the files' digests just taken for
    the folder's version: a file listed there is not hashed a second time.

    `jsonl`: when a big JSONL file is read in byte ranges on worker processes (chunking.jsonl_pool; by
    default one per core, files of 32 MiB and more); the rows are the same either way.

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
    key = config_key(config, count)
    old = previous.entries if previous is not None else {}
    skipped: list[SkipRecord] = []
    files_read: list[str] = []
    manifest: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    pending: list[dict] = []
    rows = reused = parsed = 0
    jsonl_reader = JsonlReader(count, jsonl)

    def flush() -> None:
        if pending:
            spool.append(pa.Table.from_pylist(pending, schema=CHUNK_SCHEMA))
            pending.clear()

    try:
        for rel, kind in _files_to_read(folder, boundary, config, skipped):
            # JSONL files can be any size (one file per collection is common): hashed and parsed in
            # blocks, never held whole. Documents are chunked as a whole text, so they are read whole.
            streamed = kind == "jsonl"
            known = (digests or {}).get(rel)
            entry = old.get(rel)
            digest = known if known is not None else (_digest(folder, rel) if streamed else None)
            # An unchanged file's rows are copied: its bytes are never read (its digest came with the version).
            reuse = digest is not None and entry is not None and entry["sha256"] == digest and entry["config"] == key
            data = None if streamed or reuse else _read_bytes(folder, rel)
            if digest is None:
                digest = hashlib.sha256(data).hexdigest()
            files_read.append(rel)
            if entry is not None and entry["sha256"] == digest and entry["config"] == key:
                flush()
                n = int(entry["rows"])
                if n:
                    spool.append(previous.table.slice(int(entry["first_row"]), n))
                file_skips = [SkipRecord(rel, index, reason) for index, reason in json.loads(entry["skips_json"])]
                skipped += file_skips
                reused += 1
            else:
                before = len(skipped)
                n = 0
                if streamed and jsonl_reader.parallel(folder / rel):
                    flush()
                    for table in jsonl_reader.tables(folder / rel, rel, skipped):
                        spool.append(table)
                        n += table.num_rows
                else:
                    located = (iter_jsonl(jsonl_file_lines(folder / rel, rel), rel, count, skipped) if streamed
                               else _parse(data, rel, kind, config, count, skipped))
                    del data
                    for row, _ in located:
                        pending.append(row)
                        n += 1
                        if len(pending) >= _FLUSH_ROWS:
                            flush()
                    del located
                if not n and not any(s.file == rel for s in skipped):
                    # Whatever the cause, a file that was read and gave nothing is reported, not dropped.
                    skipped.append(SkipRecord(rel, None, "no text to embed"))
                file_skips = skipped[before:]
                parsed += 1
            for name, value in (("path", rel), ("sha256", digest), ("size", (folder / rel).stat().st_size),
                                ("config", key), ("first_row", rows), ("rows", n),
                                ("skips_json", json.dumps([[s.index, s.reason] for s in file_skips]))):
                manifest[name].append(value)
            rows += n
        flush()
        if not rows:
            raise ChunkingError(
                f"collection folder {folder} yielded no chunks "
                f"({len(files_read)} files read, {len(skipped)} skipped)"
            )
        _check_unique_ids(spool.read(), folder, config, count)
    except BaseException:
        spool.abort()
        raise
    finally:
        jsonl_reader.close()
    return StreamedChunks(rows=rows, skipped=skipped, files_read=files_read, files_reused=reused,
                          files_parsed=parsed, manifest=pa.table(manifest, schema=MANIFEST_SCHEMA))


def read_collection(
    folder: Path,
    config: ChunkingConfig = ChunkingConfig(),
    count_tokens: CountTokens | None = None,
    root: Path | None = None,
) -> ChunkingResult:
    """`stream_collection` into a scratch file, returned as one memory-mapped table (small callers, tests)."""
    with tempfile.TemporaryDirectory(prefix="rag_clean_chunks_") as scratch:
        spool = ColumnSpool(Path(scratch) / "chunks.arrow", CHUNK_SCHEMA)
        result = stream_collection(folder, spool, config, count_tokens, root)
        table = spool.read()  # mapped: stays readable after the folder is removed
        spool.abort()
    return ChunkingResult(table=table, skipped=result.skipped, files_read=result.files_read)
