"""The embedded default sink: Qdrant Edge (Qdrant's engine in-process), one index folder per collection under
the storage root, holding one Edge shard (small collections: the shard's files are the folder itself) or
`shards` of them (`shard-<k>/`), each point in the shard its UUID picks (`shard_of`).

Why several shards: Edge's Python API converts every vector element and payload field while holding the GIL
(~0.4 ms per 2,304-d point with its text), so one process writes ~3k points/s whatever the cores; separate
shards are written by separate processes (rag_clean.index.shard_writer) and build their HNSW graphs side by
side. Reads fan out to every shard and merge (exact search gives the same top k as one shard; approximate
search walks each shard's smaller graph). The shard count is chosen when the index is created (setting
`index_shards`, 0 = by collection size) and kept for its life; another explicit count recreates it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from rag_clean.index.base import (Hit, IndexPoint, IndexSchema, VectorIndexError, payloads_in_order, point_id,
                                  require_vectors)
from rag_clean.index.blocks import BlockSpec, InProcessWriter
from rag_clean.index.edge_shard import EdgeShardStore
from rag_clean.processes import usable_cores

SINK = "qdrant-edge"
SCHEMA_FILE = "rag_clean_schema.json"   # our record of the schema and shard count, beside Edge's own files
# Edge writes through memory maps: on a full disk a write is a SIGBUS that kills the process with no error
# and no file named (measured on 2 and 24 MiB tmpfs roots), so free space is checked before Edge touches the
# disk. Opening a shard allocates a 32 MiB chunk per dense vector (its appendable segment's vector storage;
# measured: +98 MiB for 3 vectors), and writing may start the next chunk of each.
CHUNK_BYTES = 32 << 20
SLACK_BYTES = 8 << 20
# Disk bytes per raw byte of written points: the points, the write-ahead log, the optimizer's copy of a
# segment while it builds the HNSW graph, and the graph's links.
WRITE_FACTOR = 3
# Automatic shard count: one per SHARD_ROWS chunks, at most MAX_SHARDS and half the usable cores (the HNSW
# build already uses every core: on 2 cores two shards built 20k points 1.12x slower than one,
# benchmarks/bench_index.py --shards 1,2); a shard costs ~100 MiB of disk for its open segments.
SHARD_ROWS = 12_500
MAX_SHARDS = 8
# Writes of fewer points stay in this process (starting writer processes costs ~1 s of imports each).
PARALLEL_MIN_POINTS = 8_000


def auto_shards(points: int) -> int:
    return max(1, min(MAX_SHARDS, usable_cores() // 2, points // SHARD_ROWS))


def shard_of(point_ids: Sequence[str], shards: int) -> np.ndarray:
    """The shard of each point: its UUID's first 32 bits modulo the shard count (UUIDv5 bits are uniform)."""
    if shards == 1:
        return np.zeros(len(point_ids), np.int64)
    return np.fromiter((int(i[:8], 16) % shards for i in point_ids), np.int64, len(point_ids))


def route(point_ids: Sequence[str], shards: int) -> list[np.ndarray]:
    """Per shard, the positions in `point_ids` of the points it holds."""
    shard = shard_of(point_ids, shards)
    return [np.flatnonzero(shard == k) for k in range(shards)]


class EdgeIndex:
    sink = SINK

    def __init__(self, path: Path, collection: str, shards: int = 0):
        self.path = Path(path)
        self.collection = collection
        self.location = str(self.path)
        self.requested_shards = int(shards)   # 0: chosen by size at creation
        self._stores: list[EdgeShardStore] | None = None
        self._names: list[str] = []
        self.shards = 1
        if (self.path / SCHEMA_FILE).exists():
            schema, self.shards = _stored(self.path)
            self._names = schema.names

    # -- lifecycle -----------------------------------------------------------------------------

    def shard_path(self, k: int) -> Path:
        return self.path if self.shards == 1 else self.path / f"shard-{k}"

    @property
    def stores(self) -> list[EdgeShardStore]:
        if self._stores is None:
            if not (self.path / SCHEMA_FILE).exists():
                raise VectorIndexError(f"no index at {self.path}: materialize vector_index for "
                                       f"{self.collection!r} first")
            schema, self.shards = _stored(self.path)
            self._require_space(self._open_bytes(schema, self.shards), "opening it")
            self._stores = [EdgeShardStore.load(self.shard_path(k)) for k in range(self.shards)]
        return self._stores

    def ensure_schema(self, schema: IndexSchema, points: int = 0) -> bool:
        """`points`: the collection's size, which sets the shard count of a new index (index_shards = 0)."""
        schema_file = self.path / SCHEMA_FILE
        if schema_file.exists():
            stored, shards = _stored(self.path)
            if stored == schema and self.requested_shards in (0, shards):
                self._names, self.shards = schema.names, shards
                return False
        self.close()
        # Another set of vectors (a model added, removed or resized) or shard count: Edge cannot change a
        # shard's vectors, so the index is rebuilt from scratch (the sync then writes every point).
        if self.path.exists():
            shutil.rmtree(self.path)
        self.shards = self.requested_shards or auto_shards(points)
        self._require_space(self._open_bytes(schema, self.shards), "creating it")
        self.path.mkdir(parents=True)
        self._stores = []
        for k in range(self.shards):
            self.shard_path(k).mkdir(exist_ok=True)
            self._stores.append(EdgeShardStore.create(self.shard_path(k), schema, self.shards))
        # Written last: a folder without it is an index whose creation did not finish, recreated next time.
        tmp = schema_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**schema.to_dict(), "shards": self.shards}, sort_keys=True))
        tmp.replace(schema_file)
        self._names = schema.names
        return True

    def reserve_space(self, points: int, bytes_per_point: int) -> None:
        schema, shards = _stored(self.path)
        self._require_space(self._open_bytes(schema, shards) + WRITE_FACTOR * points * bytes_per_point,
                            f"writing {points} points")

    @staticmethod
    def _open_bytes(schema: IndexSchema, shards: int) -> int:
        return shards * CHUNK_BYTES * len(schema.dense) + SLACK_BYTES

    def _require_space(self, need: int, what: str) -> None:
        folder = self.path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if free < need:
            raise VectorIndexError(f"no space for the vector index at {self.location}: {what} needs about "
                                   f"{-(-need >> 20)} MiB, {free >> 20} MiB free there; free some space (or move the "
                                   "storage root) and run again")

    def writer(self, points: int, spec: BlockSpec):
        """Where the sync sends its blocks: shard writer processes when there are several shards and enough
        points to pay for starting them, else this process."""
        if self.shards > 1 and points >= PARALLEL_MIN_POINTS and usable_cores() > 1:
            from rag_clean.index.shard_writer import ShardWriterPool

            self.close()  # each shard is opened by its writer process alone
            return ShardWriterPool([self.shard_path(k) for k in range(self.shards)], self.collection, spec,
                                   self.location)
        return InProcessWriter(self, spec)

    def commit(self) -> None:
        for store in self.stores:
            store.commit()

    def close(self) -> None:
        for store in self._stores or []:
            store.close()
        self._stores = None

    # -- writes --------------------------------------------------------------------------------

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        ids = [point_id(self.collection, p.chunk_id) for p in points]
        for store, members in zip(self.stores, route(ids, self.shards)):
            store.upsert([ids[j] for j in members], [points[j] for j in members])

    def update_vectors(self, points: Sequence[IndexPoint]) -> None:
        ids = [point_id(self.collection, p.chunk_id) for p in points]
        for store, members in zip(self.stores, route(ids, self.shards)):
            store.update_vectors([ids[j] for j in members], [points[j] for j in members])

    def delete(self, chunk_ids: Sequence[str]) -> None:
        ids = [point_id(self.collection, c) for c in chunk_ids]
        for store, members in zip(self.stores, route(ids, self.shards)):
            store.delete([ids[j] for j in members])

    # -- reads ---------------------------------------------------------------------------------

    def existing(self, block: int = 4096, fingerprints: bool = True) -> Iterator[pa.RecordBatch]:
        for store in self.stores:
            yield from store.existing(self._names, block, fingerprints)

    def count(self) -> int:
        if not (self.path / SCHEMA_FILE).exists():
            return 0
        return sum(store.count() for store in self.stores)

    def dense_search(self, vector_name: str, query: np.ndarray, k: int, exact: bool = True) -> list[Hit]:
        require_vectors(self, [vector_name])
        q = np.asarray(query, dtype=np.float32).reshape(-1).tolist()
        return _merge([store.dense_search(vector_name, q, k, exact) for store in self.stores], k)

    def sparse_search(self, vector_name: str, indices: np.ndarray, values: np.ndarray, k: int) -> list[Hit]:
        require_vectors(self, [vector_name])
        return _merge([store.sparse_search(vector_name, indices, values, k) for store in self.stores], k)

    def retrieve(self, chunk_ids: Sequence[str], with_vectors: Sequence[str] | None = None) -> list[dict]:
        require_vectors(self, with_vectors or [])
        ids = [point_id(self.collection, c) for c in chunk_ids]
        records = []
        for store, members in zip(self.stores, route(ids, self.shards)):
            records.extend(store.retrieve([ids[j] for j in members], with_vectors))
        return payloads_in_order(ids, records, with_vectors)


def _merge(per_shard: list[list[Hit]], k: int) -> list[Hit]:
    if len(per_shard) == 1:
        return per_shard[0]
    # Best first; ties by chunk id so the order does not depend on which shard answered first.
    return sorted((h for hits in per_shard for h in hits), key=lambda h: (-h.score, h.chunk_id))[:k]


def _stored(path: Path) -> tuple[IndexSchema, int]:
    """The stored schema and shard count (an index made before shards has one, its files in the folder)."""
    data = json.loads((path / SCHEMA_FILE).read_text())
    return IndexSchema.from_dict(data), int(data.get("shards", 1))
