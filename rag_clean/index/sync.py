"""Incremental sync of one collection's stored assets into its vector index.

The index is its own state: every point's payload carries its chunk's content_hash and, under
`fingerprints`, a digest per named vector (what produced it: the dense model's fingerprint, the fusion
inputs, the sparse model's fingerprint) and one of its payload fields ("_payload"). Each sync:

1. plans: streams the index's (chunk_id, content_hash, fingerprints) with existing(), joins them to the
   chunks table on chunk_id (Arrow), and marks per chunk row: write the whole point (new chunk, changed
   text or payload), rewrite some of its vectors (their fingerprint changed), or nothing; points whose
   chunk is gone are deleted;
2. writes, block by block (BLOCK rows, one Arrow batch each: rag_clean.index.blocks): deletes, upserts,
   vector rewrites, then commit(); through the index's writer, which applies them in this process or, for
   a sharded Edge index, in one writer process per shard (rag_clean.index.shard_writer).

Nothing is written when nothing changed. There is no "in progress" marker: writes are idempotent (upsert
and delete by point id) and a point's vectors and the payload that describes them go in the same write
(or, for a vector rewrite, the vectors first and the fingerprint after), so a sync killed midway leaves
points that are either done or still look stale, and the next sync's plan redoes exactly those.

Memory: vectors are read memory-mapped and only the rows being written are gathered; the plan holds the
index's ids and hashes (Arrow strings) and a few bytes per row, not vectors.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rag_clean.index.base import FINGERPRINTS, FUSED, PAYLOAD_KEY, IndexSchema, VectorIndex, vector_name
from rag_clean.index.blocks import BlockSpec, make_block
from rag_clean.storage.arrow_io import as_string_array
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.storage.errors import StorageError
from rag_clean.storage.reuse import hash_keys
from rag_clean.storage.sparse_blocks import sparse_rows_by_model

BLOCK = 4096
FINGERPRINT_META = "fingerprint.{}"   # the sparse file's per-model fingerprint key (stages.sparse)


@dataclass
class SyncSources:
    """What one sync reads: the chunks table and the stored vectors (memory-mapped), keyed by registry
    model name. `sparse`: the sparse_vectors Parquet file, or None when no sparse model is indexed."""

    chunks: pa.Table
    fused: EmbeddingSet
    dense: Mapping[str, EmbeddingSet]
    sparse: pq.ParquetFile | None = None
    sparse_models: Sequence[str] = ()

    def schema(self) -> IndexSchema:
        return IndexSchema.build(self.fused.dim, {m: s.dim for m, s in self.dense.items()},
                                 list(self.sparse_models) if self.sparse is not None else [])

    def fingerprints(self) -> dict[str, str]:
        """Per vector name: a digest of what produced its vectors (the stored files' metadata)."""
        out = {FUSED: _digest(sorted(self.fused.metadata.items()))}
        for model, emb in self.dense.items():
            out[vector_name(model)] = _digest(sorted(emb.metadata.items()))
        if self.sparse is not None:
            meta = {k.decode(): v.decode() for k, v in (self.sparse.schema_arrow.metadata or {}).items()}
            for model in self.sparse_models:
                out[vector_name(model)] = _digest([model, meta.get(FINGERPRINT_META.format(model), "")])
        return out


@dataclass
class SyncResult:
    upserted: int = 0                  # whole points written (new chunks, changed text or payload)
    deleted: int = 0                   # points whose chunk is gone
    unchanged: int = 0                 # chunks whose point was left as it was
    rewritten: dict[str, int] = field(default_factory=dict)   # vector name -> points whose vector was rewritten
    recreated: bool = False            # the collection was (re)created: new, or its vectors changed
    points: int = 0                    # the index's point count after the sync
    blocks: int = 0
    scanned: int = 0                   # chunk rows gone through so far (progress: done of the chunks' rows)
    seconds: float = 0.0
    commit_seconds: float = 0.0        # of which commit(): Edge builds its HNSW index there

    @property
    def wrote(self) -> bool:
        return bool(self.upserted or self.deleted or any(self.rewritten.values()))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_aligned(name: str, emb: EmbeddingSet, chunks: pa.Table) -> None:
    if len(emb) != chunks.num_rows or not (
            as_string_array(chunks.column("chunk_id")).equals(emb.ids)
            and as_string_array(chunks.column("content_hash")).equals(emb.hashes)):
        raise StorageError(f"{name} was computed for other chunks than the current `chunks` ({len(emb)} rows vs "
                           f"{chunks.num_rows}); rematerialize it before the vector index")


def point_bytes(sources: SyncSources) -> int:
    """Raw bytes of one average point: its float32 dense vectors, sparse rows (the sparse file's uncompressed
    size per chunk), text and a payload allowance."""
    n = max(1, sources.chunks.num_rows)
    dense = 4 * (sources.fused.dim + sum(e.dim for e in sources.dense.values()))
    sparse = 0
    if sources.sparse is not None:
        meta = sources.sparse.metadata
        sparse = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) // n
    return dense + sparse + sources.chunks.column("text").nbytes // n + 512


def payload_digests(block: pa.Table) -> np.ndarray:
    """uint64 per row over the payload fields besides the text (its content_hash covers that): joined in
    Arrow, digested per row."""
    text = pa.string()
    joined = pc.binary_join_element_wise(
        block.column("chunk_id").cast(text), block.column("source_file").cast(text).fill_null("\x00"),
        block.column("heading").cast(text).fill_null("\x00"), pc.cast(block.column("chunk_index"), text).fill_null(""),
        pc.binary_join(block.column("section_path"), "\x1e").fill_null("\x00"),
        block.column("metadata_json").cast(text).fill_null(""), "\x1f")
    return hash_keys(pa.array([hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
                               for s in joined.to_pylist()], text))


@dataclass
class _Plan:
    full: np.ndarray                   # bool per chunk row: write the whole point
    stale: dict[str, np.ndarray]       # vector name -> bool per chunk row: rewrite this vector only
    payload: np.ndarray                # uint64 per chunk row (payload_digests)
    delete: list[str]


@dataclass
class _Scan:
    """The index's points joined to the chunk rows: chunk row i is point `pos[i]` of the scan (-1: absent)."""

    pos: np.ndarray
    ids: pa.Array
    same_hash: np.ndarray              # bool per chunk row: present with the same content_hash
    payload: np.ndarray                # uint64 per scanned point: its payload fingerprint
    fp_ok: dict[str, np.ndarray]       # vector name -> bool per scanned point: fingerprint is the current one

    def removed(self) -> list[str]:
        referenced = np.zeros(len(self.ids), bool)
        referenced[self.pos[self.pos >= 0]] = True
        return self.ids.filter(pa.array(~referenced)).to_pylist()


def _scan(index: VectorIndex, chunks: pa.Table, fps: Mapping[str, str] | None = None) -> _Scan:
    fps = fps or {}
    ids, hashes, payload_keys = [], [], []
    fp_ok: dict[str, list[np.ndarray]] = {name: [] for name in fps}
    for batch in index.existing(BLOCK, fingerprints=bool(fps)):
        batch = batch.filter(pc.is_valid(batch.column("chunk_id")))  # a point this sync did not write: left alone
        ids.append(batch.column("chunk_id"))
        hashes.append(batch.column("content_hash").fill_null(""))
        payload_keys.append(hash_keys(batch.column(f"{FINGERPRINTS}.{PAYLOAD_KEY}").fill_null("")))
        for name in fps:
            col = batch.column(f"{FINGERPRINTS}.{name}")
            fp_ok[name].append(pc.fill_null(pc.equal(col, fps[name]), False).to_numpy(zero_copy_only=False))
    ex_ids = pa.chunked_array(ids, pa.string()).combine_chunks() if ids else pa.array([], pa.string())
    pos = pc.index_in(chunks.column("chunk_id").cast(pa.string()), value_set=ex_ids).fill_null(-1)
    pos = pos.to_numpy(zero_copy_only=False).astype(np.int64)
    same = np.zeros(chunks.num_rows, bool)
    if len(ex_ids):
        taken = pa.chunked_array(hashes, pa.string()).take(pa.array(np.where(pos >= 0, pos, 0)))
        same = pc.fill_null(pc.equal(taken, chunks.column("content_hash").cast(pa.string())), False)
        same = same.to_numpy(zero_copy_only=False) & (pos >= 0)
    return _Scan(pos, ex_ids, same, np.concatenate(payload_keys) if payload_keys else np.zeros(0, np.uint64),
                 {name: (np.concatenate(v) if v else np.zeros(0, bool)) for name, v in fp_ok.items()})


def index_drift(index: VectorIndex, chunks: pa.Table) -> dict[str, int | list[str]]:
    """How the index's ids and content hashes differ from the chunks table: chunks without a point
    (missing), points without a chunk (extra), points with another content_hash (changed); first ids of each."""
    scan = _scan(index, chunks)
    ids = chunks.column("chunk_id")
    missing = np.flatnonzero(scan.pos < 0)
    changed = np.flatnonzero((scan.pos >= 0) & ~scan.same_hash)
    extra = scan.removed()
    return {"missing": len(missing), "extra": len(extra), "changed": len(changed), "points": len(scan.ids),
            "examples": [*ids.take(pa.array(missing[:3])).to_pylist(), *extra[:3],
                         *ids.take(pa.array(changed[:3])).to_pylist()]}


def _plan(index: VectorIndex, chunks: pa.Table, fps: Mapping[str, str], names: Sequence[str]) -> _Plan:
    n = chunks.num_rows
    scan = _scan(index, chunks, {name: fps[name] for name in names})
    safe = np.where(scan.pos >= 0, scan.pos, 0)
    payload = np.zeros(n, np.uint64)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        payload[start:stop] = payload_digests(chunks.slice(start, stop - start))
    full = ~scan.same_hash
    if len(scan.ids):
        full |= scan.payload[safe] != payload
    stale = {name: (~full & ~scan.fp_ok[name][safe]) if len(scan.ids) else np.zeros(n, bool) for name in names}
    return _Plan(full, stale, payload, scan.removed())


def sync_index(index: VectorIndex, sources: SyncSources, *, progress: Callable[[SyncResult], None] | None = None,
               phase: Callable[[str], None] | None = None) -> SyncResult:
    """Bring `index` to the state of `sources` (see the module docstring); `progress` is called after each
    block of chunk rows with the counts so far, `phase` with one line before the index is committed (where
    Edge builds its HNSW graph: the long part of a full build, with no progress of its own)."""
    t0 = time.perf_counter()
    chunks = sources.chunks
    n = chunks.num_rows
    _check_aligned("fused_embeddings", sources.fused, chunks)
    for model, emb in sources.dense.items():
        _check_aligned(f"dense_embeddings/{model}", emb, chunks)
    schema = sources.schema()
    fps = sources.fingerprints()
    names = schema.names
    result = SyncResult(recreated=index.ensure_schema(schema, n))
    plan = _plan(index, chunks, fps, names)
    dense = {FUSED: sources.fused, **{vector_name(m): e for m, e in sources.dense.items()}}
    sparse_names = {vector_name(m): m for m in (sources.sparse_models if sources.sparse is not None else [])}
    work = plan.full.copy()
    for mask in plan.stale.values():
        work |= mask
    if work.any():
        index.reserve_space(int(work.sum()), point_bytes(sources))

    spec = BlockSpec(fps, list(dense), list(sparse_names))
    writer = index.writer(int(work.sum()) + len(plan.delete), spec)
    try:
        for start in range(0, len(plan.delete), BLOCK):
            writer.delete(plan.delete[start:start + BLOCK])
            result.deleted += len(plan.delete[start:start + BLOCK])
        needs_sparse = bool(sparse_names) and bool(
            plan.full.any() or any(plan.stale[name].any() for name in sparse_names))
        sparse_iters = ([iter(r.blocks(BLOCK)) for r in sparse_rows_by_model(
            sources.sparse, list(sparse_names.values()), chunks, BLOCK, purpose="first")] if needs_sparse else [])
        for start in range(0, n, BLOCK):
            stop = min(start + BLOCK, n)
            sparse_blocks = [next(it) for it in sparse_iters]  # in step with the chunk blocks, whether used or not
            rows = start + np.flatnonzero(work[start:stop])
            result.scanned = stop
            if len(rows):
                local = pa.array(rows - start)
                writer.write(make_block(
                    chunks, rows, plan.full[rows], {name: plan.stale[name][rows] for name in names},
                    plan.payload[rows], {name: np.asarray(emb.vectors[rows], dtype=np.float32)
                                         for name, emb in dense.items()},
                    {name: block.select(["term_ids", "weights"]).take(local)
                     for name, block in zip(sparse_names, sparse_blocks)}))
                result.blocks += 1
            if progress is not None:
                progress(result)
        if work.any() or plan.delete:
            if phase is not None:
                phase(f"{int(work.sum())} points written in {time.perf_counter() - t0:.1f}s; committing (the sink "
                      f"builds the HNSW graph of {', '.join(schema.graph)} now)")
            t_commit = time.perf_counter()
            counts = writer.commit()
            result.commit_seconds = round(time.perf_counter() - t_commit, 6)
            result.upserted, result.rewritten = counts.upserted, dict(counts.rewritten)
    finally:
        writer.close()
    result.unchanged = int(n - (work.sum()))
    result.points = index.count()
    result.seconds = round(time.perf_counter() - t0, 6)
    return result

