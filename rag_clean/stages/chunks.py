"""The chunks stage: a collection folder streamed into the chunks file, re-parsing only changed files.

The manifest (`StorageLayout.chunks_manifest_file`) lists, per input file, its sha256, the chunking
config and the rows it gave. It is published right after the chunks file it describes and names that
file's size and mtime, so a manifest left beside another chunks file (a crash between the two renames,
a copied storage root) is never trusted: the run then parses everything.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.chunking import CHUNK_SCHEMA, ChunkingConfig
from rag_clean.encoders.chunk_tokens import PackingTokenizer
from rag_clean.chunking.collection import MANIFEST_SCHEMA, PreviousChunks, StreamedChunks, stream_collection
from rag_clean.telemetry.records import ChunksRecord, ReuseCount, skips_warning
from rag_clean.storage.files import ColumnSpool, StorageError, read_arrow_table, temp_path_for

_SIZE, _MTIME = b"chunks_file_size", b"chunks_file_mtime_ns"


def load_previous_chunks(chunks_path: Path, manifest_path: Path) -> PreviousChunks | None:
    """The previous chunks file (memory-mapped) and its manifest, when they belong together."""
    if not (chunks_path.exists() and manifest_path.exists()):
        return None
    try:
        manifest = pq.read_table(manifest_path)
        meta = manifest.schema.metadata or {}
        stat = chunks_path.stat()
        if meta.get(_SIZE) != str(stat.st_size).encode() or meta.get(_MTIME) != str(stat.st_mtime_ns).encode():
            return None
        table = read_arrow_table(chunks_path)
    except (pa.ArrowException, OSError, StorageError):
        return None  # unreadable: parse everything (the new run rewrites both)
    if not table.schema.equals(CHUNK_SCHEMA, check_metadata=False) or \
            not manifest.schema.equals(MANIFEST_SCHEMA, check_metadata=False):
        return None
    entries = {row["path"]: row for row in manifest.to_pylist()}  # one row per file, not per chunk
    if sum(int(e["rows"]) for e in entries.values()) != table.num_rows:
        return None
    return PreviousChunks(table=table, entries=entries)


def packing_config(config: ChunkingConfig, packing: PackingTokenizer | None) -> ChunkingConfig:
    """The chunking config with its budget at most the packing model's max length (special tokens included)."""
    if packing is None or config.max_tokens <= packing.max_length:
        return config
    budget = packing.max_length
    return replace(config, max_tokens=budget, overlap_tokens=min(config.overlap_tokens, budget // 2),
                   min_chunk_tokens=min(config.min_chunk_tokens, budget // 2))


def run_chunks_stage(folder: Path, chunks_path: Path, manifest_path: Path, config: ChunkingConfig,
                     reuse: bool = True, packing: PackingTokenizer | None = None,
                     ) -> tuple[ColumnSpool, StreamedChunks, ChunksRecord]:
    """Stream the collection into a staged chunks file; its manifest is staged too and published with it.

    `packing` (encoders.chunk_tokens.strictest_tokenizer): Markdown / text documents are packed by that
    model's real token count, within its max length; None: by the tokenizer-free estimate. Given chunk files
    and JSONL rows are kept as they are (the dense and sparse stages report any they truncate).
    Returns the spool (the IO manager publishes it), what was read, and the stage record with reused vs
    parsed files."""
    previous = load_previous_chunks(chunks_path, manifest_path) if reuse else None
    spool = ColumnSpool(chunks_path, CHUNK_SCHEMA)
    config = packing_config(config, packing)
    result = stream_collection(folder, spool, config, packing.counter() if packing is not None else None,
                               previous=previous)
    try:
        stat = os.stat(spool.staged_path)
        manifest = result.manifest.replace_schema_metadata(
            {_SIZE: str(stat.st_size), _MTIME: str(stat.st_mtime_ns), b"chunks_sha256": spool.content_digest})
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        staged = temp_path_for(manifest_path)
        pq.write_table(manifest, staged, compression="zstd")
        spool.add_side_file(staged, manifest_path)
    except BaseException:
        spool.abort()
        with contextlib.suppress(NameError):
            staged.unlink(missing_ok=True)
        raise
    record = ChunksRecord(rows=result.rows, files_read=len(result.files_read), device="cpu",
                          skips=[{"file": s.file, "index": s.index, "reason": s.reason} for s in result.skipped])
    record.reuse_counts["files"] = ReuseCount(result.files_reused, result.files_parsed, "files")
    record.packing = ({"model": packing.model, "max_length": packing.max_length, "identity": packing.identity,
                       "max_tokens": config.max_tokens} if packing is not None
                      else {"model": None, "identity": "estimate", "max_tokens": config.max_tokens})
    if skips_warning(record.skips):
        record.warnings.append(skips_warning(record.skips))
    return spool, result, record
