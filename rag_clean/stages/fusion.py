"""Fusion stage: weighted fusion of the stored per-model matrices, block by block."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa

from rag_clean.fusion import fuse_block, fused_dim
from rag_clean.records import FusedRecord, ReuseCount
from rag_clean.storage import EmbeddingSet, EmbeddingWriter, StorageError
from rag_clean.stages.common import ROW_BLOCK

log = logging.getLogger(__name__)


def run_fusion_stage(sets: Mapping[str, EmbeddingSet], weights: Mapping[str, float], method: str,
                     staging_path: Path, chunks: pa.Table) -> tuple[EmbeddingWriter, FusedRecord]:
    """Weighted fusion, row block by row block, of the models' stored (memory-mapped) vectors."""
    names = list(sets)
    if not names:
        raise ValueError("fusion needs at least one dense model")
    chunk_ids = chunks.column("chunk_id")
    hashes = chunks.column("content_hash")
    for name in names:
        if not (_same(sets[name].ids, chunk_ids) and _same(sets[name].hashes, hashes)):
            raise StorageError(
                f"dense_embeddings/{name} was computed for other chunks than the current `chunks`; rematerialize it first"
            )
    dims = [sets[n].dim for n in names]
    dim = fused_dim(dims, method)
    w = [weights[n] for n in names]
    writer = EmbeddingWriter(staging_path, chunk_ids, hashes, dim,
                             {"method": method, "models": json.dumps(names), "weights": json.dumps(w), "normalized": "l2"})
    t0 = time.perf_counter()
    try:
        rows = len(chunks)
        for start in range(0, rows, ROW_BLOCK):
            stop = min(start + ROW_BLOCK, rows)
            block = fuse_block([np.asarray(sets[n].vectors[start:stop]) for n in names], w, method)
            writer.write(np.arange(start, stop), block)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    total = float(sum(w))
    record = FusedRecord(method=method, models=names, weights={m: round(weights[m] / total, 6) for m in names},
                         rows=len(chunks), dim=dim, fuse_seconds=round(time.perf_counter() - t0, 6))
    # Every row is fused again: the stage reads every dense row and writes the whole file either way, and
    # fusing a row costs less than copying it from the previous file (docs/performance.md, bench_fusion_reuse.py).
    record.reuse_counts["fused"] = ReuseCount(0, len(chunks), "chunks")
    return writer, record


def _same(stored: pa.Array, current: pa.ChunkedArray) -> bool:
    """Column equality in Arrow, no Python list of ids."""
    return len(stored) == len(current) and pa.chunked_array([stored]).equals(current.cast(pa.string()))
