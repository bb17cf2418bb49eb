"""One Qdrant Edge shard (qdrant-edge-py: Qdrant's engine in-process, one folder): the calls rag_clean makes
on it. A collection's index is one or more of these (rag_clean.index.qdrant_edge routes points to them).

Edge is beta (pinned in pyproject.toml). What this module relies on, checked against 0.9.0: named dense +
sparse vectors in one shard, upsert / update_vectors / set_payload(key=) / delete by UUID id, scroll with a
payload selection, exact and HNSW search, `optimize()` building the HNSW index in-process (Edge runs no
background optimizer), and the write-ahead log replaying unflushed updates on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import qdrant_edge as qe

from rag_clean.index.base import (FINGERPRINTS, HNSW_FULL_SCAN_KB, SEARCH_HNSW_EF, Hit, IndexPoint, IndexSchema,
                                  existing_batch, existing_fields, vector_lists)
from rag_clean.processes import usable_cores


def _vectors(point: IndexPoint) -> dict:
    dense, sparse = vector_lists(point)
    return {**dense, **{name: qe.SparseVector(i, w) for name, (i, w) in sparse.items()}}


def _hnsw(schema: IndexSchema, name: str, threads: int) -> qe.HnswIndexConfig:
    # m=0: no graph for this vector (Qdrant then searches it exactly); see rag_clean.index.base.
    return qe.HnswIndexConfig(m=schema.hnsw_m(name), ef_construct=schema.hnsw[1], full_scan_threshold=HNSW_FULL_SCAN_KB,
                              max_indexing_threads=threads)


class EdgeShardStore:
    """An open Edge shard. Point ids are given by the caller (rag_clean.index.base.point_id)."""

    def __init__(self, shard: qe.EdgeShard):
        self.shard = shard

    @classmethod
    def create(cls, path: Path, schema: IndexSchema, shards: int = 1) -> "EdgeShardStore":
        """A new shard; one of `shards` that build their graphs side by side, each on its share of the cores
        (0: all of them, Edge's default)."""
        threads = 0 if shards == 1 else max(1, usable_cores() // shards)
        config = qe.EdgeConfig(
            vectors={name: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine,
                                               hnsw_config=_hnsw(schema, name, threads))
                     for name, dim in schema.dense},
            sparse_vectors={name: qe.EdgeSparseVectorParams() for name in schema.sparse})
        return cls(qe.EdgeShard.create(str(path), config))

    @classmethod
    def load(cls, path: Path) -> "EdgeShardStore":
        return cls(qe.EdgeShard.load(str(path)))

    def commit(self) -> None:
        self.shard.flush()
        self.shard.optimize()  # builds HNSW segments once a segment passes Edge's indexing threshold

    def close(self) -> None:
        self.shard.close()

    # -- writes --------------------------------------------------------------------------------

    def upsert(self, ids: Sequence[str], points: Sequence[IndexPoint]) -> None:
        if points:
            self.shard.update(qe.UpdateOperation.upsert_points([
                qe.Point(i, _vectors(p), {**p.payload, FINGERPRINTS: dict(p.fingerprints)})
                for i, p in zip(ids, points)]))

    def update_vectors(self, ids: Sequence[str], points: Sequence[IndexPoint]) -> None:
        if not points:
            return
        self.shard.update(qe.UpdateOperation.update_vectors(
            [qe.PointVectors(i, _vectors(p)) for i, p in zip(ids, points)]))
        # One set_payload per distinct fingerprint set (usually one per block): merged under `fingerprints`.
        groups: dict[str, list[str]] = {}
        for i, p in zip(ids, points):
            groups.setdefault(json.dumps(p.fingerprints, sort_keys=True), []).append(i)
        for fps, members in groups.items():
            self.shard.update(qe.UpdateOperation.set_payload(members, json.loads(fps), key=FINGERPRINTS))

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self.shard.update(qe.UpdateOperation.delete_points(list(ids)))

    # -- reads ---------------------------------------------------------------------------------

    def existing(self, names: Sequence[str], block: int = 4096, fingerprints: bool = True) -> Iterator[pa.RecordBatch]:
        offset = None
        while True:
            records, offset = self.shard.scroll(qe.ScrollRequest(
                offset=offset, limit=block, with_payload=existing_fields(fingerprints), with_vector=False))
            if records:
                yield existing_batch([r.payload or {} for r in records], names)
            if offset is None:
                return

    def count(self) -> int:
        return int(self.shard.count(qe.CountRequest(exact=True)))

    def dense_search(self, vector_name: str, query: list, k: int, exact: bool) -> list[Hit]:
        return _hits(self.shard.query(qe.QueryRequest(
            limit=int(k), query=qe.Query.Nearest(query, using=vector_name), with_payload=["chunk_id"],
            params=qe.SearchParams(exact=bool(exact), hnsw_ef=None if exact else SEARCH_HNSW_EF))))

    def sparse_search(self, vector_name: str, indices: np.ndarray, values: np.ndarray, k: int) -> list[Hit]:
        vector = qe.SparseVector(np.asarray(indices, dtype=np.int64).tolist(), np.asarray(values, dtype=np.float32).tolist())
        return _hits(self.shard.query(qe.QueryRequest(
            limit=int(k), query=qe.Query.Nearest(vector, using=vector_name), with_payload=["chunk_id"])))

    def retrieve(self, ids: Sequence[str], with_vectors: Sequence[str] | None = None) -> list:
        if not ids:
            return []
        return self.shard.retrieve(list(ids), with_payload=True,
                                   with_vector=list(with_vectors) if with_vectors else False)


def _hits(points) -> list[Hit]:
    return [Hit(p.payload["chunk_id"], float(p.score)) for p in points]
