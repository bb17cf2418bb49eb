"""The `exports` stage: every export file of one collection written from stored assets, in order:
matrices (`npy`), sparse and qdrant lines (`jsonl`, unchanged lines copied through the line index),
metadata, stats, then the summary copy (last, so it can describe this export too). Each file is written
beside its place and renamed; no query text is ever read here."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.chunking.duplicates import duplicate_id_rows
from rag_clean.exports.files import (EXPORT_BLOCK_ROWS, FILES_SCHEMA, FUSED_VECTOR_NAME, ExportError, export_files,
                                     remove_stale)
from rag_clean.exports.inputs import check_aligned, sparse_by_model
from rag_clean.exports.jsonl import sparse_names, write_qdrant_lines, write_sparse_lines
from rag_clean.exports.metadata import write_metadata
from rag_clean.exports.npy import write_npy
from rag_clean.storage.atomic import write_json
from rag_clean.storage.digests import file_digest
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.telemetry.downstream_records import ExportsRecord
from rag_clean.telemetry.records import ReuseCount


def write_exports(
    export_dir: Path,
    collection: str,
    chunks: pa.Table,
    dense: Mapping[str, EmbeddingSet],
    fused: EmbeddingSet,
    *,
    fusion: Mapping | None = None,
    sparse: "pa.Table | pq.ParquetFile | None" = None,
    sparse_models: Sequence[str] = (),
    summary: Mapping | Callable[[dict], Mapping] | None = None,
    block_rows: int = EXPORT_BLOCK_ROWS,
    line_index: Callable[[str], Path] | None = None,
) -> tuple[pa.Table, ExportsRecord]:
    """Write every export file of one collection; returns (files table: name, bytes, sha256; stage record).

    `dense` maps model name -> stored vectors (the fused ensemble, in fusion order); `sparse` is the
    stored sparse_vectors table, or None when the sparse stage did not run (then no sparse file is
    written and a stale one from an earlier export is removed, so the folder describes this run).
    `summary` is the processing summary to copy, or a function that gets this stage's record so far
    and returns it (so the copy can include the export span). `line_index(file kind)`: where the JSONL
    line index of "qdrant" / "sparse" lives (StorageLayout.export_line_index); None: no line reuse.
    """
    if block_rows <= 0:
        raise ValueError("block_rows must be > 0")
    files = export_files(export_dir, collection)
    files.folder.mkdir(parents=True, exist_ok=True)
    if duplicate_id_rows(chunks.column("chunk_id")):  # streaming check: no set of every id
        raise ExportError(f"collection {collection!r}: chunk ids are not unique; cannot export")
    if not dense:
        raise ExportError(f"collection {collection!r}: no dense model vectors to export")
    for name, emb in dense.items():
        check_aligned(f"dense_embeddings/{name}", emb, chunks)
    check_aligned("fused_embeddings", fused, chunks)
    sparse_rows = sparse_by_model(sparse, list(sparse_models), chunks, block_rows) \
        if sparse is not None and sparse_models else []
    names_of_sparse = sparse_names([s.model for s in sparse_rows]) if sparse_rows else {}
    collision = set(names_of_sparse.values()) & (set(dense) | {FUSED_VECTOR_NAME})
    if FUSED_VECTOR_NAME in dense or collision:
        raise ExportError(f"a model is named like a reserved vector name ({FUSED_VECTOR_NAME!r} / {sorted(collision)})")

    written: list[Path] = []
    reuse: dict[str, ReuseCount] = {}
    stats: dict = {"collection": collection, "chunk_count": chunks.num_rows, "dense": {}, "fused": {}, "sparse": {}}

    # 1. Matrices.
    stats["fused"] = write_npy(files.fused, fused, block_rows)
    written.append(files.fused)
    model_files = {}
    for name, emb in dense.items():
        path = files.model(name)
        if path in model_files.values() or path == files.fused:
            raise ExportError(f"model {name!r}: its export file name {path.name} collides with another file")
        stats["dense"][name] = write_npy(path, emb, block_rows)
        model_files[name] = path
        written.append(path)

    # 2. Sparse rows, one line per (chunk, model); 3. qdrant points, one per chunk.
    if sparse_rows:
        stats["sparse"], reuse["sparse_lines"] = write_sparse_lines(files, sparse_rows, block_rows, line_index)
        written.append(files.sparse)
    reuse["qdrant_lines"] = write_qdrant_lines(files, chunks, dense, fused, sparse_rows, names_of_sparse, block_rows,
                                               line_index)
    written.append(files.qdrant)

    # 4. Metadata; 5. stats, then the summary copy (last, so it can describe this export too).
    written.append(write_metadata(files, chunks, dense, fused, model_files, names_of_sparse, fusion, block_rows))
    write_json(files.stats, stats)
    written.append(files.stats)
    record = ExportsRecord(rows=chunks.num_rows, export_dir=str(files.folder), models=list(dense),
                           sparse_models=[s.model for s in sparse_rows], reuse_counts=reuse)
    if summary is not None:
        partial = dict(record.stage_fields(), stage=record.stage, rows=record.rows, status=record.status,
                       files=[p.name for p in written])
        content = summary(partial) if callable(summary) else summary
        write_json(files.summary, content)
        written.append(files.summary)

    record.removed_stale = remove_stale(files, {p.name for p in written})
    table = pa.table({"name": [p.name for p in written], "bytes": [p.stat().st_size for p in written],
                      "sha256": [file_digest(p) for p in written]}, schema=FILES_SCHEMA)
    record.files = table.to_pylist()
    return table, record
