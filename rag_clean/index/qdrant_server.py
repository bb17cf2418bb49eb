"""The server sink: a Qdrant server through qdrant-client (pinned in pyproject.toml), the same schema as the
embedded sink (rag_clean.index.base).

No Qdrant server binary installs here, so tests run this class on qdrant-client's local mode
(`ServerIndex.local(path)`, QdrantClient(path=...)): the client takes the same calls it sends a server, but
its on-disk format is not the server's and it searches by brute force (no HNSW).
"""

from __future__ import annotations

import json
from typing import Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from rag_clean.index.base import (FINGERPRINTS, HNSW_FULL_SCAN_KB, SEARCH_HNSW_EF, Hit, IndexPoint, IndexSchema, payloads_in_order,
                                  VectorIndexError, existing_batch, existing_fields, point_id, require_vectors, vector_lists)
from rag_clean.index.blocks import BlockSpec, InProcessWriter

SINK = "qdrant"


def _vectors(point: IndexPoint) -> dict:
    dense, sparse = vector_lists(point)
    return {**dense, **{name: models.SparseVector(indices=i, values=w) for name, (i, w) in sparse.items()}}


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class ServerIndex:
    sink = SINK

    def __init__(self, client: QdrantClient, collection: str, location: str):
        self.client = client
        self.collection = collection
        self.location = location
        # Local mode searches by brute force and warns about search params: it gets none.
        self._local = location.startswith("local:")
        self._names: list[str] = []
        if client.collection_exists(collection):
            self._names = self._stored_schema().names

    @classmethod
    def connect(cls, url: str, collection: str, *, api_key: str | None = None, timeout_s: float = 5.0) -> "ServerIndex":
        """A server at `url`; one call is made now, so a URL that does not answer fails here, after
        `timeout_s`, with one line (never a hang)."""
        location = _without_credentials(url)
        try:
            client = QdrantClient(url=url, api_key=api_key, timeout=max(1, int(round(timeout_s))),
                                  check_compatibility=False)
            client.get_collections()
        except UnexpectedResponse as exc:  # something answered, not with a collection list (404, 401, 500)
            raise VectorIndexError(f"Qdrant at {location} answered HTTP {exc.status_code} {exc.reason_phrase}: "
                                   "check that the URL is a Qdrant server and the API key is right") from None
        except Exception as exc:  # connection refused, timeout, TLS: all one line naming the URL
            raise VectorIndexError(f"Qdrant at {location} did not answer within {timeout_s:g}s "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        return cls(client, collection, location)

    @classmethod
    def local(cls, path, collection: str) -> "ServerIndex":
        """qdrant-client's local mode (tests, no server): the same client calls."""
        return cls(QdrantClient(path=str(path)), collection, f"local:{path}")

    # -- lifecycle -----------------------------------------------------------------------------

    def _stored_schema(self) -> IndexSchema:
        params = self.client.get_collection(self.collection).config.params
        dense = params.vectors if isinstance(params.vectors, dict) else {}
        # The per-vector HNSW config this class sets; a collection made elsewhere (none set) reads as no graph.
        hnsw = {n: v.hnsw_config for n, v in dense.items() if v.hnsw_config is not None and (v.hnsw_config.m or 0) > 0}
        first = next(iter(hnsw.values()), None)
        return IndexSchema(tuple((n, int(v.size)) for n, v in dense.items()), tuple((params.sparse_vectors or {}).keys()),
                           tuple(hnsw), (int(first.m), int(first.ef_construct or 0)) if first else (0, 0))

    def _same(self, schema: IndexSchema) -> bool:
        stored = self._stored_schema()
        params = self.client.get_collection(self.collection).config.params
        cosine = all(v.distance == models.Distance.COSINE for v in (params.vectors or {}).values())
        return (cosine and stored.dense_dims == schema.dense_dims and set(stored.sparse) == set(schema.sparse)
                and set(stored.graph) == set(schema.graph) and stored.hnsw == schema.hnsw)

    def ensure_schema(self, schema: IndexSchema, points: int = 0) -> bool:
        if self.client.collection_exists(self.collection):
            if self._same(schema):
                self._names = schema.names
                return False
            # Qdrant cannot add or resize a named vector in place: recreate, then the sync writes every point.
            self.client.delete_collection(self.collection)
        self.client.create_collection(
            self.collection,
            vectors_config={n: models.VectorParams(size=d, distance=models.Distance.COSINE, hnsw_config=models.HnswConfigDiff(
                m=schema.hnsw_m(n), ef_construct=schema.hnsw[1], full_scan_threshold=HNSW_FULL_SCAN_KB))
                for n, d in schema.dense},
            sparse_vectors_config={n: models.SparseVectorParams() for n in schema.sparse})
        self._names = schema.names
        return True

    def writer(self, points: int, spec: BlockSpec) -> InProcessWriter:
        return InProcessWriter(self, spec)   # the server parallelizes its own writes

    def reserve_space(self, points: int, bytes_per_point: int) -> None:
        """The server's disk is its own: it answers a write it cannot store with an error (raised per call)."""

    def commit(self) -> None:
        """Writes are sent with wait=True: nothing is pending; the server indexes on its own."""

    def close(self) -> None:
        self.client.close()

    # -- writes --------------------------------------------------------------------------------

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        if points:
            self.client.upsert(self.collection, wait=True, points=[
                models.PointStruct(id=point_id(self.collection, p.chunk_id), vector=_vectors(p),
                                   payload={**p.payload, FINGERPRINTS: dict(p.fingerprints)}) for p in points])

    def update_vectors(self, points: Sequence[IndexPoint]) -> None:
        if not points:
            return
        ids = [point_id(self.collection, p.chunk_id) for p in points]
        self.client.update_vectors(self.collection, wait=True, points=[
            models.PointVectors(id=i, vector=_vectors(p)) for i, p in zip(ids, points)])
        groups: dict[str, list[str]] = {}
        for i, p in zip(ids, points):
            groups.setdefault(json.dumps(p.fingerprints, sort_keys=True), []).append(i)
        for fps, members in groups.items():
            self.client.set_payload(self.collection, payload=json.loads(fps), points=members, key=FINGERPRINTS, wait=True)

    def delete(self, chunk_ids: Sequence[str]) -> None:
        if chunk_ids:
            self.client.delete(self.collection, wait=True, points_selector=models.PointIdsList(
                points=[point_id(self.collection, c) for c in chunk_ids]))

    # -- reads ---------------------------------------------------------------------------------

    def existing(self, block: int = 4096, fingerprints: bool = True) -> Iterator[pa.RecordBatch]:
        if not self.client.collection_exists(self.collection):
            return
        offset = None
        while True:
            records, offset = self.client.scroll(self.collection, limit=block, offset=offset, with_vectors=False,
                                                 with_payload=existing_fields(fingerprints))
            if records:
                yield existing_batch([r.payload or {} for r in records], self._names)
            if offset is None:
                return

    def count(self) -> int:
        if not self.client.collection_exists(self.collection):
            return 0
        return int(self.client.count(self.collection, exact=True).count)

    def _hits(self, response) -> list[Hit]:
        return [Hit(p.payload["chunk_id"], float(p.score)) for p in response.points]

    def dense_search(self, vector_name: str, query: np.ndarray, k: int, exact: bool = True) -> list[Hit]:
        require_vectors(self, [vector_name])
        q = np.asarray(query, dtype=np.float32).reshape(-1).tolist()
        return self._hits(self.client.query_points(self.collection, query=q, using=vector_name, limit=int(k),
                                                   with_payload=["chunk_id"],
                                                   search_params=None if self._local else models.SearchParams(
                                                       exact=bool(exact), hnsw_ef=None if exact else SEARCH_HNSW_EF)))

    def sparse_search(self, vector_name: str, indices: np.ndarray, values: np.ndarray, k: int) -> list[Hit]:
        require_vectors(self, [vector_name])
        vector = models.SparseVector(indices=np.asarray(indices, dtype=np.int64).tolist(),
                                     values=np.asarray(values, dtype=np.float32).tolist())
        return self._hits(self.client.query_points(self.collection, query=vector, using=vector_name, limit=int(k),
                                                   with_payload=["chunk_id"]))

    def retrieve(self, chunk_ids: Sequence[str], with_vectors: Sequence[str] | None = None) -> list[dict]:
        require_vectors(self, with_vectors or [])
        ids = [point_id(self.collection, c) for c in chunk_ids]
        records = self.client.retrieve(self.collection, ids, with_payload=True,
                                       with_vectors=list(with_vectors) if with_vectors else False)
        return payloads_in_order(ids, records, with_vectors)
