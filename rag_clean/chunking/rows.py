"""The output table: its schema and how one row of it is built."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from rag_clean.storage.columns import column

CHUNK_SCHEMA = pa.schema(
    [
        column("chunk_id", pa.string(), "stable id: the same input gives the same id"),
        column("text", pa.string(), "the text that gets embedded"),
        column("content_hash", pa.string(), "sha256 hex of text: keys reuse of vectors of unchanged chunks"),
        column("source_file", pa.string(), "the input file, relative to the collection folder, forward slashes"),
        column("chunk_index", pa.int32(), "index of the chunk within its source file"),
        column("heading", pa.string(), "nearest heading text (null when the chunk has none)"),
        column("section_path", pa.list_(pa.string()), "heading trail, outermost first"),
        column("token_count", pa.int32(), "tokens of text under the chunking tokenizer (special tokens included)"),
        column("metadata_json", pa.string(), "every original metadata field as JSON (sorted keys)"),
    ]
)


def content_hash(text: str) -> str:
    """sha256 hex digest of the UTF-8 bytes of `text`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_row(chunk_id, text, source_file, index, heading, section_path, tokens, metadata) -> dict:
    """One CHUNK_SCHEMA row as a dict; every reader builds rows here so hashing and JSON stay alike."""
    return {
        "chunk_id": chunk_id,
        "text": text,
        "content_hash": content_hash(text),
        "source_file": source_file,
        "chunk_index": index,
        "heading": heading,
        "section_path": list(section_path),
        "token_count": tokens,
        # "{}" is what json.dumps gives for no metadata (most JSONL rows), at a tenth of its cost.
        "metadata_json": json.dumps(metadata, sort_keys=True, ensure_ascii=False) if metadata else "{}",
    }
