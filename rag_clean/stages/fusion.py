"""Fusion stage: weighted fusion of the stored per-model matrices, block by block."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa

from rag_clean.retrieval.fusion import fuse_block, fused_dim
from rag_clean.telemetry.records import FusedRecord, ReuseCount
from rag_clean.storage.embeddings import EmbeddingSet, EmbeddingWriter
from rag_clean.storage.errors import StorageError
from rag_clean.storage.reuse import complement, match_rows
from rag_clean.stages.common import ROW_BLOCK

log = logging.getLogger(__name__)


def run_fusion_stage(sets: Mapping[str, EmbeddingSet], weights: Mapping[str, float], method: str,
                     staging_path: Path, chunks: pa.Table, *, previous: EmbeddingSet | None = None,
                     ) -> tuple[EmbeddingWriter, FusedRecord]:
    """Weighted fusion, row block by row block, of the models' stored (memory-mapped) vectors.

    With `previous` (the stored fused file), rows of unchanged chunks are copied from it when it was fused
    with the same method, models, weights and dense model fingerprints; only the other rows are fused.
    Copying a row is cheaper than fusing it (benchmarks/bench_fusion_reuse.py, docs/performance.md)."""
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
    # What a fused row depends on besides its chunk's text: a previous row is reused only if all match.
    inputs = json.dumps({n: sets[n].metadata.get("fingerprint", "") for n in names}, sort_keys=True)
    metadata = {"method": method, "models": json.dumps(names), "weights": json.dumps(w), "normalized": "l2",
                "inputs": inputs}
    rows = len(chunks)
    reuse_dst = reuse_src = np.zeros(0, dtype=np.int64)
    if (previous is not None and previous.dim == dim
            and all(previous.metadata.get(k) == v for k, v in metadata.items())):
        reuse_dst, reuse_src = match_rows(hashes, previous.hashes)
    todo = complement(reuse_dst, rows)
    writer = EmbeddingWriter(staging_path, chunk_ids, hashes, dim, metadata)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(reuse_dst), ROW_BLOCK):
            writer.write(reuse_dst[start:start + ROW_BLOCK],
                         np.asarray(previous.vectors[reuse_src[start:start + ROW_BLOCK]]))
        if len(todo) == rows:  # contiguous blocks: slices of the memory maps, no gather
            for start in range(0, rows, ROW_BLOCK):
                stop = min(start + ROW_BLOCK, rows)
                writer.write(np.arange(start, stop), fuse_block([np.asarray(sets[m].vectors[start:stop]) for m in names],
                                                                w, method))
        else:
            for start in range(0, len(todo), ROW_BLOCK):
                block = todo[start:start + ROW_BLOCK]
                writer.write(block, fuse_block([np.asarray(sets[m].vectors[block]) for m in names], w, method))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    total = float(sum(w))
    record = FusedRecord(method=method, models=names, weights={m: round(weights[m] / total, 6) for m in names},
                         rows=rows, dim=dim, fuse_seconds=round(time.perf_counter() - t0, 6))
    record.reuse_counts["fused"] = ReuseCount(int(len(reuse_dst)), int(len(todo)), "chunks")
    return writer, record


def _same(stored: pa.Array, current: pa.ChunkedArray) -> bool:
    """Column equality in Arrow, no Python list of ids."""
    return len(stored) == len(current) and pa.chunked_array([stored]).equals(current.cast(pa.string()))
