"""The embedded default sink: Qdrant Edge (qdrant-edge-py, Qdrant's engine in-process), one shard folder
per collection under the storage root. No server, same data model and scoring as a Qdrant server.

Edge is beta (pinned in pyproject.toml). What this module relies on, checked against 0.9.0: named dense +
sparse vectors in one shard, upsert / update_vectors / set_payload(key=) / delete by UUID id, scroll with a
payload selection, exact and HNSW search, `optimize()` building the HNSW index in-process (Edge runs no
background optimizer), and the write-ahead log replaying unflushed updates on load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import qdrant_edge as qe

from rag_clean.index.base import (FINGERPRINTS, HNSW_FULL_SCAN_KB, SEARCH_HNSW_EF, Hit, IndexPoint, IndexSchema, payloads_in_order,
                                  VectorIndexError, existing_batch, point_id, require_vectors, vector_lists)

SINK = "qdrant-edge"
SCHEMA_FILE = "rag_clean_schema.json"   # our record of the schema, beside Edge's own files
# Edge writes through memory maps: on a full disk a write is a SIGBUS that kills the process with no error
# and no file named (measured on 2 and 24 MiB tmpfs roots), so free space is checked before Edge touches the
# disk. Opening a shard allocates a 32 MiB chunk per dense vector (its appendable segment's vector storage;
# measured: +98 MiB for 3 vectors), and writing may start the next chunk of each.
CHUNK_BYTES = 32 << 20
SLACK_BYTES = 8 << 20
# Disk bytes per raw byte of written points: the points, the write-ahead log, the optimizer's copy of a
# segment while it builds the HNSW graph, and the graph's links.
WRITE_FACTOR = 3


def _vectors(point: IndexPoint) -> dict:
    dense, sparse = vector_lists(point)
    return {**dense, **{name: qe.SparseVector(i, w) for name, (i, w) in sparse.items()}}


def _hnsw(schema: IndexSchema, name: str) -> qe.HnswIndexConfig:
    # m=0: no graph for this vector (Qdrant then searches it exactly); see rag_clean.index.base.
    return qe.HnswIndexConfig(m=schema.hnsw_m(name), ef_construct=schema.hnsw[1], full_scan_threshold=HNSW_FULL_SCAN_KB)


class EdgeIndex:
    sink = SINK

    def __init__(self, path: Path, collection: str):
        self.path = Path(path)
        self.collection = collection
        self.location = str(self.path)
        self._shard: qe.EdgeShard | None = None
        self._names: list[str] = []
        if (self.path / SCHEMA_FILE).exists():
            self._names = _stored_schema(self.path).names

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            if not (self.path / SCHEMA_FILE).exists():
                raise VectorIndexError(f"no index at {self.path}: materialize vector_index for "
                                       f"{self.collection!r} first")
            self._require_space(self._open_bytes(_stored_schema(self.path)), "opening it")
            self._shard = qe.EdgeShard.load(str(self.path))
        return self._shard

    def ensure_schema(self, schema: IndexSchema) -> bool:
        schema_file = self.path / SCHEMA_FILE
        if schema_file.exists() and _stored_schema(self.path) == schema:
            self._names = schema.names
            return False
        self.close()
        # Another set of vectors (a model added, removed or resized): Edge cannot change a shard's
        # vectors, so the shard is rebuilt from scratch (the sync then writes every point).
        if self.path.exists():
            shutil.rmtree(self.path)
        self._require_space(self._open_bytes(schema), "creating it")
        self.path.mkdir(parents=True)
        config = qe.EdgeConfig(
            vectors={name: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine, hnsw_config=_hnsw(schema, name))
                     for name, dim in schema.dense},
            sparse_vectors={name: qe.EdgeSparseVectorParams() for name in schema.sparse})
        self._shard = qe.EdgeShard.create(str(self.path), config)
        # Written last: a folder without it is a shard whose creation did not finish, recreated next time.
        tmp = schema_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(schema.to_dict(), sort_keys=True))
        tmp.replace(schema_file)
        self._names = schema.names
        return True

    def reserve_space(self, points: int, bytes_per_point: int) -> None:
        self._require_space(self._open_bytes(_stored_schema(self.path)) + WRITE_FACTOR * points * bytes_per_point,
                            f"writing {points} points")

    @staticmethod
    def _open_bytes(schema: IndexSchema) -> int:
        return CHUNK_BYTES * len(schema.dense) + SLACK_BYTES

    def _require_space(self, need: int, what: str) -> None:
        folder = self.path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if free < need:
            raise VectorIndexError(f"no space for the vector index at {self.location}: {what} needs about "
                                   f"{-(-need >> 20)} MiB, {free >> 20} MiB free there; free some space (or move the "
                                   "storage root) and run again")

    def commit(self) -> None:
        self.shard.flush()
        self.shard.optimize()  # builds HNSW segments once a segment passes Edge's indexing threshold

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    # -- writes --------------------------------------------------------------------------------

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        if points:
            self.shard.update(qe.UpdateOperation.upsert_points([
                qe.Point(point_id(self.collection, p.chunk_id), _vectors(p),
                         {**p.payload, FINGERPRINTS: dict(p.fingerprints)}) for p in points]))

    def update_vectors(self, points: Sequence[IndexPoint]) -> None:
        if not points:
            return
        ids = [point_id(self.collection, p.chunk_id) for p in points]
        self.shard.update(qe.UpdateOperation.update_vectors(
            [qe.PointVectors(i, _vectors(p)) for i, p in zip(ids, points)]))
        # One set_payload per distinct fingerprint set (usually one per block): merged under `fingerprints`.
        groups: dict[str, list[str]] = {}
        for i, p in zip(ids, points):
            groups.setdefault(json.dumps(p.fingerprints, sort_keys=True), []).append(i)
        for fps, members in groups.items():
            self.shard.update(qe.UpdateOperation.set_payload(members, json.loads(fps), key=FINGERPRINTS))

    def delete(self, chunk_ids: Sequence[str]) -> None:
        if chunk_ids:
            self.shard.update(qe.UpdateOperation.delete_points([point_id(self.collection, c) for c in chunk_ids]))

    # -- reads ---------------------------------------------------------------------------------

    def existing(self, block: int = 4096) -> Iterator[pa.RecordBatch]:
        offset = None
        while True:
            records, offset = self.shard.scroll(qe.ScrollRequest(
                offset=offset, limit=block, with_payload=["chunk_id", "content_hash", FINGERPRINTS], with_vector=False))
            if records:
                yield existing_batch([r.payload or {} for r in records], self._names)
            if offset is None:
                return

    def count(self) -> int:
        if not (self.path / SCHEMA_FILE).exists():
            return 0
        return int(self.shard.count(qe.CountRequest(exact=True)))

    def _hits(self, points) -> list[Hit]:
        return [Hit(p.payload["chunk_id"], float(p.score)) for p in points]

    def dense_search(self, vector_name: str, query: np.ndarray, k: int, exact: bool = True) -> list[Hit]:
        require_vectors(self, [vector_name])
        q = np.asarray(query, dtype=np.float32).reshape(-1).tolist()
        return self._hits(self.shard.query(qe.QueryRequest(
            limit=int(k), query=qe.Query.Nearest(q, using=vector_name), with_payload=["chunk_id"],
            params=qe.SearchParams(exact=bool(exact), hnsw_ef=None if exact else SEARCH_HNSW_EF))))

    def sparse_search(self, vector_name: str, indices: np.ndarray, values: np.ndarray, k: int) -> list[Hit]:
        require_vectors(self, [vector_name])
        vector = qe.SparseVector(np.asarray(indices, dtype=np.int64).tolist(), np.asarray(values, dtype=np.float32).tolist())
        return self._hits(self.shard.query(qe.QueryRequest(
            limit=int(k), query=qe.Query.Nearest(vector, using=vector_name), with_payload=["chunk_id"])))

    def retrieve(self, chunk_ids: Sequence[str], with_vectors: Sequence[str] | None = None) -> list[dict]:
        require_vectors(self, with_vectors or [])
        ids = [point_id(self.collection, c) for c in chunk_ids]
        records = self.shard.retrieve(ids, with_payload=True, with_vector=list(with_vectors) if with_vectors else False)
        return payloads_in_order(ids, records, with_vectors)


def _stored_schema(path: Path) -> IndexSchema:
    return IndexSchema.from_dict(json.loads((path / SCHEMA_FILE).read_text()))
