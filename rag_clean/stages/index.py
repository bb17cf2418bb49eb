"""vector_index stage: sync the stored assets of one collection into its vector index (rag_clean.index.sync)."""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import pyarrow as pa

from rag_clean.config.plan import RunPlan
from rag_clean.index.base import VectorIndex
from rag_clean.index.sync import SyncSources, sync_index
from rag_clean.stages.context import EmbeddedChunks, Stage, StageContext, StageIO
from rag_clean.storage.errors import StorageError
from rag_clean.telemetry.downstream_records import IndexRecord
from rag_clean.telemetry.progress import ProgressLog
from rag_clean.telemetry.records import ReuseCount

# The asset's stored value: one row saying where the index is and which state of the assets it holds.
INDEX_TABLE_SCHEMA = pa.schema([("sink", pa.string()), ("location", pa.string()), ("collection", pa.string()),
                                ("vectors", pa.string()), ("points", pa.int64()), ("state", pa.string())])


def source_state(sources: SyncSources) -> str:
    """A digest of what the index was synced from: chunk ids and hashes (their Arrow bytes, in blocks) and
    each vector's fingerprint; equal sources give equal digests, so a no-op sync keeps the data version."""
    h = hashlib.sha256(json.dumps(sources.fingerprints(), sort_keys=True).encode())
    for name in ("chunk_id", "content_hash"):
        for chunk in sources.chunks.column(name).cast(pa.string()).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.hexdigest()


def run_index_stage(index: VectorIndex, sources: SyncSources, *,
                    progress: Callable[[str], None] | None = None) -> tuple[pa.Table, IndexRecord]:
    """Sync `sources` into `index` (upsert what changed, delete what was removed); the table says where the
    index is, the record what the sync wrote. `progress` gets done/total, rate and ETA lines over the chunk
    rows, then one line when the commit (the HNSW build) starts."""
    schema = sources.schema()
    meter = ProgressLog("vector_index", sources.chunks.num_rows, progress)
    result = sync_index(index, sources, progress=lambda r: meter.update(r.scanned - meter.done), phase=progress)
    record = IndexRecord(rows=sources.chunks.num_rows, device="cpu", sink=index.sink, location=index.location,
                         upserted=result.upserted, deleted=result.deleted, unchanged=result.unchanged,
                         rewritten=dict(result.rewritten), recreated=result.recreated, index_rows=result.points,
                         vectors=schema.to_dict(), write_s=round(result.seconds - result.commit_seconds, 3),
                         commit_s=round(result.commit_seconds, 3))
    record.reuse_counts["points"] = ReuseCount(result.unchanged, result.upserted, "chunks")
    table = pa.table({"sink": [index.sink], "location": [index.location], "collection": [index.collection],
                      "vectors": [json.dumps(schema.to_dict())], "points": [result.points],
                      "state": [source_state(sources)]}, schema=INDEX_TABLE_SCHEMA)
    return table, record


def index_stage(ctx: StageContext, io: StageIO, inputs: EmbeddedChunks) -> tuple[pa.Table, IndexRecord]:
    """Open the collection's index where the settings say and sync the stored assets into it."""
    from rag_clean.index import open_collection_index

    plan = ctx.plan
    missing = [s.name for s in plan.dense if inputs.dense_sets.get(s.asset_name) is None]
    if missing or (plan.sparse and inputs.sparse is None):
        raise StorageError(f"vector_index for {ctx.collection!r}: no stored file for "
                           f"{missing or 'sparse_vectors'}: materialize it first")
    sources = SyncSources(inputs.chunks, inputs.fused, {s.name: inputs.dense_sets[s.asset_name] for s in plan.dense},
                          inputs.sparse if plan.sparse else None, [s.name for s in plan.sparse])
    index = open_collection_index(plan.settings, ctx.layout, ctx.collection)
    try:
        table, record = run_index_stage(index, sources, progress=ctx.progress)
    finally:
        index.close()
    ctx.log.info(f"vector_index ({record.sink}, {record.location}): {record.upserted} upserted, "
                 f"{record.deleted} deleted, {record.unchanged} unchanged, rewritten {record.rewritten}; "
                 f"{record.index_rows} points")
    return table, record


def _disabled(plan: RunPlan, *inputs) -> IndexRecord | None:
    reason = plan.index_disabled_reason()
    return None if reason is None else IndexRecord(status="disabled", reason=f"vector_index skipped: {reason}")


INDEX = Stage("vector_index", index_stage, disabled=_disabled)
