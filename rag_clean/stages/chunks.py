"""The chunks stage: a collection folder streamed into the chunks file, re-parsing only changed files.

The manifest (`StorageLayout.chunks_manifest_file`) lists, per input file, its sha256, the chunking
config and the rows it gave. It is published right after the chunks file it describes and names that
file's size and mtime, so a manifest left beside another chunks file (a crash between the two renames,
a copied storage root) is never trusted: the run then parses everything.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.chunking import CHUNK_SCHEMA, ChunkingConfig
from rag_clean.chunking.collection import MANIFEST_SCHEMA, PreviousChunks, stream_collection
from rag_clean.chunking.folder_version import FolderVersion
from rag_clean.encoders.chunk_tokens import PackingTokenizer, packing_specs, strictest_tokenizer
from rag_clean.telemetry.records import ChunksRecord, ReuseCount, skips_warning
from rag_clean.storage.arrow_io import ColumnSpool, read_arrow_table
from rag_clean.storage.errors import StorageError
from rag_clean.storage.parquet import TableWriter
from rag_clean.stages.context import Stage, StageContext, StageIO

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


REGISTRY = "registry"  # chunks_stage's default packing: the strictest tokenizer of the run plan's registry


def packing_config(config: ChunkingConfig, packing: PackingTokenizer | None) -> ChunkingConfig:
    """The chunking config with its budget at most the packing model's max length (special tokens included)."""
    if packing is None or config.max_tokens <= packing.max_length:
        return config
    budget = packing.max_length
    return replace(config, max_tokens=budget, overlap_tokens=min(config.overlap_tokens, budget // 2),
                   min_chunk_tokens=min(config.min_chunk_tokens, budget // 2))


def chunks_stage(ctx: StageContext, io: StageIO, config: ChunkingConfig, version: FolderVersion | None = None,
                 *, packing: PackingTokenizer | None | str = REGISTRY) -> tuple[ColumnSpool, ChunksRecord]:
    """Stream the collection folder (`ctx.folder`) into a staged chunks file; its manifest is staged too and
    published with it. `version`: the folder version just recorded (rag_clean.chunking.folder_version),
    whose file digests spare hashing every file again. Returns the spool (the IO manager publishes it) and
    the stage record with reused vs parsed files.

    `packing`: Markdown / text documents are packed by that tokenizer's real token count, within its max
    length; REGISTRY (the default): the strictest dense / sparse model of the plan's registry
    (encoders.chunk_tokens.strictest_tokenizer); None: the tokenizer-free estimate. Given chunk files and
    JSONL rows are kept as they are (the dense and sparse stages report any they truncate)."""
    notes: list[str] = []
    if packing == REGISTRY:
        packing, notes = strictest_tokenizer(packing_specs(ctx.plan.registry), ctx.plan.models)
    config = packing_config(config, packing)
    manifest_path = ctx.layout.chunks_manifest_file(ctx.collection)
    previous = load_previous_chunks(io.target, manifest_path) if ctx.plan.reuse_unchanged else None
    spool = io.stage(ColumnSpool(io.target, CHUNK_SCHEMA))  # run_stage aborts it (and what it attached) on error
    result = stream_collection(ctx.folder, spool, config, packing.counter() if packing is not None else None,
                               previous=previous, digests=version.file_digests if version is not None else None)
    stat = os.stat(spool.staged_path)
    manifest = result.manifest.replace_schema_metadata(
        {_SIZE: str(stat.st_size), _MTIME: str(stat.st_mtime_ns), b"chunks_sha256": spool.content_digest})
    side = TableWriter(manifest_path, manifest.schema)
    spool.attach(side)  # published right after the chunks file, aborted with it
    side.write(manifest)
    # One WARNING for all skips comes from the record (skips_warning: how many, the first three, where all
    # are); each skip on its own only at DEBUG, so a run with one skip does not say it twice.
    for skip in result.skipped:
        ctx.log.debug(f"skipped {skip.file}" + (f" #{skip.index}" if skip.index is not None else "") + f": {skip.reason}")
    record = ChunksRecord(rows=result.rows, files_read=len(result.files_read), device="cpu",
                          skips=[{"file": s.file, "index": s.index, "reason": s.reason} for s in result.skipped])
    record.reuse_counts["files"] = ReuseCount(result.files_reused, result.files_parsed, "files")
    record.packing = ({"model": packing.model, "max_length": packing.max_length, "identity": packing.identity,
                       "max_tokens": config.max_tokens} if packing is not None
                      else {"model": None, "identity": "estimate", "max_tokens": config.max_tokens})
    record.warnings += notes
    if skips_warning(record.skips):
        record.warnings.append(skips_warning(record.skips))
    return spool, record


CHUNKS = Stage("chunks", chunks_stage, asset=lambda *inputs: ["chunks"])
