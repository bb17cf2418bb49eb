"""vector_index stage: sync the stored assets of one collection into its vector index (rag_clean.index.sync)."""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import pyarrow as pa

from rag_clean.index.base import VectorIndex
from rag_clean.index.sync import SyncResult, SyncSources, sync_index
from rag_clean.telemetry.records import IndexRecord, ReuseCount

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
                    progress: Callable[[SyncResult], None] | None = None) -> tuple[pa.Table, IndexRecord]:
    """Sync `sources` into `index` (upsert what changed, delete what was removed); the table says where the
    index is, the record what the sync wrote."""
    schema = sources.schema()
    result = sync_index(index, sources, progress=progress)
    record = IndexRecord(rows=sources.chunks.num_rows, device="cpu", sink=index.sink, location=index.location,
                         upserted=result.upserted, deleted=result.deleted, unchanged=result.unchanged,
                         rewritten=dict(result.rewritten), recreated=result.recreated, index_rows=result.points,
                         vectors=schema.to_dict())
    record.reuse_counts["points"] = ReuseCount(result.unchanged, result.upserted, "chunks")
    table = pa.table({"sink": [index.sink], "location": [index.location], "collection": [index.collection],
                      "vectors": [json.dumps(schema.to_dict())], "points": [result.points],
                      "state": [source_state(sources)]}, schema=INDEX_TABLE_SCHEMA)
    return table, record
