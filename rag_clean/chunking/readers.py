"""Readers for records that are already chunks: the old embedder's `*_chunks.json` and JSONL."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from .config import ChunkingError, SkipRecord
from .rows import make_row
from .tokens import CountTokens, count_many

_COUNT_BLOCK = 512  # rows whose token counts one batched tokenizer call fills


def _check_unicode(value: Any, where: str, field: str = "") -> None:
    """JSON can spell a lone surrogate ("\\ud800"); no UTF-8 can hold it, so hashing or writing the
    chunk would fail later with a bare UnicodeEncodeError. Name the record and the field instead."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ChunkingError(
                f"{where}: {f'field {field!r}' if field else 'a key'} holds a lone surrogate "
                f"\\u{ord(value[exc.start]):04x} at character {exc.start}, which is not valid Unicode: "
                f"fix that \\u escape in the file"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, where, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, where, f"{field}[{i}]")


def _mapped_fields(metadata: dict, where: str, heading_keys: tuple[str, ...]) -> dict:
    """Typed copies of the metadata fields that have their own column; wrong types are errors."""
    out: dict[str, Any] = {}
    for key in heading_keys:
        value = metadata.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ChunkingError(f"{where}: metadata {key!r} must be a string, got {type(value).__name__}")
        out["heading"] = value
        break
    path = metadata.get("section_path")
    if path is not None:
        if not isinstance(path, list) or not all(isinstance(p, str) for p in path):
            raise ChunkingError(f"{where}: metadata 'section_path' must be a list of strings")
        out["section_path"] = path
    for key in ("chunk_index", "token_count"):
        value = metadata.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ChunkingError(f"{where}: metadata {key!r} must be a non-negative integer, got {value!r}")
        out[key] = value
    return out


def read_chunk_file(
    raw: str, rel: str, count_tokens: CountTokens, skipped: list[SkipRecord]
) -> list[tuple[dict, str]]:
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ChunkingError(f"{rel}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(records, list):
        raise ChunkingError(f"{rel}: expected a JSON list of chunk records, got {type(records).__name__}")
    if not records:
        skipped.append(SkipRecord(rel, None, "chunk file holds no records"))
    has_escapes = "\\u" in raw  # only a \u escape can make a surrogate: skip the walk otherwise
    rows = []
    for i, record in enumerate(records):
        where = f"{rel} record index {i}"
        if not isinstance(record, dict):
            raise ChunkingError(f"{where}: expected an object, got {type(record).__name__}")
        if has_escapes:
            _check_unicode(record, where)
        text = record.get("text")
        if not isinstance(text, str):
            raise ChunkingError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        metadata = record.get("metadata")
        if not isinstance(metadata, dict):
            raise ChunkingError(f"{where}: 'metadata' must be an object, got {type(metadata).__name__}")
        chunk_id = metadata.get("chunk_id")
        if not isinstance(chunk_id, str) or not chunk_id.strip():
            raise ChunkingError(f"{where}: metadata.chunk_id is missing or not a non-empty string")
        if not text.strip():
            skipped.append(SkipRecord(rel, i, f"empty text (chunk_id {chunk_id!r})"))
            continue
        mapped = _mapped_fields(metadata, where, ("heading_text",))
        # Other top-level keys of a record are metadata too: nothing is dropped.
        extra = {k: v for k, v in record.items() if k not in ("text", "metadata")}
        kept = {**metadata, **({"record_fields": extra} if extra else {})}
        row = make_row(
            chunk_id,
            text,
            rel,
            mapped.get("chunk_index", i),
            mapped.get("heading"),
            mapped.get("section_path", []),
            mapped.get("token_count"),
            kept,
        )
        rows.append((row, where))
    _fill_token_counts([row for row, _ in rows], count_tokens)
    return rows


def _fill_token_counts(rows: list[dict], count_tokens: CountTokens) -> None:
    """Token counts for the rows whose record gave none, counted in one batch."""
    missing = [row for row in rows if row["token_count"] is None]
    if missing:
        for row, n in zip(missing, count_many(count_tokens, [row["text"] for row in missing])):
            row["token_count"] = n


def read_jsonl(raw: str, rel: str, count_tokens: CountTokens, skipped: list[SkipRecord]) -> list[tuple[dict, str]]:
    return list(iter_jsonl(enumerate(raw.split("\n"), start=1), rel, count_tokens, skipped))


def jsonl_file_lines(path, rel: str, start: int = 0, end: int | None = None, first_line: int = 1,
                     block_bytes: int = 1 << 20) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSONL file read in blocks, never whole: the same lines as
    `data.decode("utf-8-sig").split("\n")` (a leading BOM dropped, "\r" kept for json to ignore).
    `start` / `end`: a byte range that begins at a line start (line `first_line`) and ends after a newline
    or at the end of the file (chunking.jsonl_pool reads a big file in such ranges)."""
    offset = start
    try:
        with open(path, "rb", buffering=block_bytes) as fh:
            fh.seek(start)
            for lineno, line in enumerate(fh, start=first_line):
                if end is not None and offset >= end:
                    break
                begin = offset
                offset += len(line)
                if begin == 0 and line.startswith(b"\xef\xbb\xbf"):
                    line, begin = line[3:], begin + 3
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ChunkingError(f"{rel}: not valid UTF-8 (byte offset {begin + exc.start}: {exc.reason})") from exc
                yield lineno, text[:-1] if text.endswith("\n") else text
    except OSError as exc:
        raise ChunkingError(f"{rel}: cannot be read: {exc.strerror or exc}") from exc


class JsonlPosition:
    """How many records (non-blank lines) a JSONL read has passed: the next record's chunk_index. A worker
    that reads a byte range starts at 0; the parent adds the records of the ranges before it."""

    def __init__(self) -> None:
        self.records = 0


def iter_jsonl(lines: Iterable[tuple[int, str]], rel: str, count_tokens: CountTokens,
               skipped: list[SkipRecord], position: JsonlPosition | None = None) -> Iterator[tuple[dict, str]]:
    """Rows of numbered JSONL lines, in blocks of _COUNT_BLOCK (a file of any size streams through;
    the token counts of a block are taken in one batched call)."""
    block: list[tuple[dict, str]] = []
    for located in _jsonl_rows(lines, rel, skipped, position or JsonlPosition()):
        block.append(located)
        if len(block) >= _COUNT_BLOCK:
            _fill_token_counts([row for row, _ in block], count_tokens)
            yield from block
            block.clear()
    _fill_token_counts([row for row, _ in block], count_tokens)
    yield from block


def _jsonl_rows(lines: Iterable[tuple[int, str]], rel: str, skipped: list[SkipRecord],
                position: JsonlPosition) -> Iterator[tuple[dict, str]]:
    """Rows of numbered JSONL lines, token_count None where the record gives none."""
    for lineno, line in lines:
        if not line.strip():
            continue
        where = f"{rel} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ChunkingError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise ChunkingError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "\\u" in line:  # only a \u escape can make a surrogate: skip the walk otherwise
            _check_unicode(record, where)
        text = record.get("text")
        if not isinstance(text, str):
            raise ChunkingError(f"{where}: 'text' is missing or not a string")
        index = position.records
        position.records += 1
        raw_id = record.get("id")
        if raw_id is None:
            chunk_id = f"{rel}:{lineno}"
        elif isinstance(raw_id, str) and raw_id.strip():
            chunk_id = raw_id
        elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
            chunk_id = str(raw_id)
        else:
            raise ChunkingError(f"{where}: 'id' must be a non-empty string or an integer, got {raw_id!r}")
        if not text.strip():
            skipped.append(SkipRecord(rel, lineno, f"empty text (chunk_id {chunk_id!r})"))
            continue
        metadata = {k: v for k, v in record.items() if k not in ("text", "id")}
        mapped = _mapped_fields(metadata, where, ("heading_text", "heading", "title"))
        row = make_row(
            chunk_id,
            text,
            rel,
            index,
            mapped.get("heading"),
            mapped.get("section_path", []),
            mapped.get("token_count"),
            metadata,
        )
        yield row, where
