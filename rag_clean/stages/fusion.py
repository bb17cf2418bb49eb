"""Fusion stage: weighted fusion of the stored per-model matrices, block by block."""

from __future__ import annotations

import json
import logging
import time
from typing import Mapping

import numpy as np
import pyarrow as pa

from rag_clean.retrieval.fusion import fuse_block, fused_dim
from rag_clean.telemetry.records import FusedRecord, ReuseCount
from rag_clean.storage.embeddings import EmbeddingSet, EmbeddingWriter
from rag_clean.storage.errors import StorageError
from rag_clean.storage.previous import read_previous
from rag_clean.storage.reuse import complement
from rag_clean.stages.common import ROW_BLOCK
from rag_clean.stages.context import Stage, StageContext, StageIO

log = logging.getLogger(__name__)


def fusion_stage(ctx: StageContext, io: StageIO, chunks: pa.Table,
                 dense_sets: Mapping[str, EmbeddingSet | None]) -> tuple[EmbeddingWriter, FusedRecord]:
    """Weighted fusion, row block by row block, of the plan's dense models' stored (memory-mapped) vectors.

    `dense_sets`: each dense model's stored matrix by its asset name (ModelSpec.asset_name). Rows of
    unchanged chunks are copied from the previous fused file when it was fused with the same method,
    models, weights and dense model fingerprints; only the other rows are fused. Copying a row is cheaper
    than fusing it (benchmarks/bench_fusion_reuse.py, docs/performance.md)."""
    plan = ctx.plan
    missing = [s.name for s in plan.dense if dense_sets.get(s.asset_name) is None]
    if missing:
        raise ValueError(f"dense_embeddings of {missing} have no stored file for {ctx.collection!r}: "
                         "materialize them first (or leave them out of ensemble_models)")
    sets = {s.name: dense_sets[s.asset_name] for s in plan.dense}
    weights, method, staging_path = plan.fusion_weights, plan.fusion_method, io.target
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
    prior = read_previous(io.previous, metadata, hashes, dim=dim)
    if prior.why == "unreadable":
        ctx.log.warning(f"previous fused vectors unreadable, fusing every row: {prior.error}")
    previous, reuse_dst, reuse_src = prior.opened, prior.current, prior.stored
    todo = complement(reuse_dst, rows)
    writer = io.stage(EmbeddingWriter(staging_path, chunk_ids, hashes, dim, metadata))
    t0 = time.perf_counter()
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
    total = float(sum(w))
    record = FusedRecord(method=method, models=names, weights={m: round(weights[m] / total, 6) for m in names},
                         rows=rows, dim=dim, fuse_seconds=round(time.perf_counter() - t0, 6))
    record.reuse_counts["fused"] = ReuseCount(int(len(reuse_dst)), int(len(todo)), "chunks")
    return writer, record


FUSION = Stage("fusion", fusion_stage, asset=lambda *inputs: ["fused_embeddings"])


def _same(stored: pa.Array, current: pa.ChunkedArray) -> bool:
    """Column equality in Arrow, no Python list of ids."""
    return len(stored) == len(current) and pa.chunked_array([stored]).equals(current.cast(pa.string()))
