"""The vector index sink: one interface over Qdrant's data model, whatever engine holds it.

One collection (Qdrant collection / Edge shard) per rag_clean collection. Each chunk is one point:

* point id: `point_id(collection, chunk_id)`, the UUIDv5 the JSONL export already uses, so points loaded
  from an old export and points synced here are the same points;
* named dense vectors, cosine distance, each with its own dimension:
    "fused"                 the fused_embeddings row
    vector_name(<model>)    one per dense model of the ensemble (its stored dense_embeddings row)
* named sparse vectors (indices = term ids, values = weights), one per sparse model: vector_name(<model>);
* an HNSW graph for "fused" only (IndexSchema.graph, HNSW_M / HNSW_EF_CONSTRUCT), the vector search ranks by;
  the per-model vectors get m=0 (no graph: Qdrant searches them exactly, by brute force) since building a
  graph per model multiplied the build time (20k rows, 2 x 384-d + 768-d: commit 172 s with three graphs)
  for vectors that are read back, not searched approximately. Sparse vectors have their own inverted index.
  Approximate queries use hnsw_ef=SEARCH_HNSW_EF (recall@10 vs exact in docs/performance.md);
* payload: chunk_id, source_file, heading, section_path, chunk_index, content_hash, text, metadata (the
  chunk's original metadata, parsed from metadata_json), and `fingerprints`: {vector name: digest of what
  produced that vector (model fingerprint, fusion inputs)}. The payload is the index's own record of what
  it holds: the sync compares it with the stored assets on every run (rag_clean.index.sync).

vector_name(): the registry name where it is already a plain name (letters, digits, '.', '_', '-'), else
the same with every other character replaced by '_' ('BAAI/bge-m3' -> 'BAAI_bge-m3'): Qdrant Edge turns
vector names into folder names, so a '/' would nest folders. "fused" is reserved; two models that map to
one name are refused (IndexSchema).

Read side (used by rag_clean.search): dense_search / sparse_search return `Hit`s (chunk_id, score), best
first; retrieve() returns payloads and, on request, vectors. Scores: cosine for dense, dot product of the
term weights for sparse (what Qdrant computes for both).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import pyarrow as pa

FUSED = "fused"
# Fixed namespace: the same (collection, chunk_id) always gets the same point id, across runs and machines
# (the JSONL export imports point_id from here).
POINT_ID_NAMESPACE = uuid.UUID("5b0d7f3e-8f1c-4c55-9a57-3f1f4d2e6a10")
# Payload fields every point carries (besides `fingerprints`).
PAYLOAD_FIELDS = ("chunk_id", "source_file", "heading", "section_path", "chunk_index", "content_hash", "text",
                  "metadata")
FINGERPRINTS = "fingerprints"
# The fingerprint of the payload fields besides the text; vector names never start with "_" (vector_name
# strips it), so it cannot clash with one.
PAYLOAD_KEY = "_payload"
SINKS = ("qdrant-edge", "qdrant", "off")
# HNSW of the graph vectors (Qdrant's defaults for m / ef_construct) and the query-time beam: hnsw_ef=128
# reached recall@10 >= 0.98 against exact search on clustered 768-d vectors (benchmarks/bench_index.py).
# Both sinks create collections with these values and compare them: another value recreates the collection.
HNSW_M = 16
HNSW_EF_CONSTRUCT = 100
SEARCH_HNSW_EF = 128
# Segments below this size (KiB) are searched exactly (Qdrant's default).
HNSW_FULL_SCAN_KB = 10000

_PLAIN = re.compile(r"[^A-Za-z0-9._-]+")


class VectorIndexError(RuntimeError):
    """The index cannot be reached, or holds something the sync cannot reconcile; the message says which."""


def vector_lists(point: "IndexPoint") -> tuple[dict[str, list], dict[str, tuple[list, list]]]:
    """The point's dense and sparse vectors as the Python lists both sinks' clients take (lists pass as they are:
    the sync hands over lists made once per block, not one array per vector)."""
    def as_list(values, dtype) -> list:
        return values if isinstance(values, list) else np.asarray(values, dtype=dtype).tolist()

    return ({name: as_list(v, np.float32) for name, v in point.dense.items()},
            {name: (as_list(i, np.int64), as_list(w, np.float32)) for name, (i, w) in point.sparse.items()})


def require_vectors(index, names: Sequence[str]) -> None:
    """Refuse a query on a vector name the index does not have (both sinks: `_names`, `collection`, `location`)."""
    unknown = [n for n in names if n not in index._names]
    if unknown:
        raise VectorIndexError(f"index {index.collection!r} at {index.location} has no vector {unknown[0]!r}; "
                               f"it has {index._names}")


def point_id(collection: str, chunk_id: str) -> str:
    """Qdrant takes unsigned integers or UUIDs as point ids: a UUIDv5 of collection and chunk_id."""
    return str(uuid.uuid5(POINT_ID_NAMESPACE, f"{collection}/{chunk_id}"))


def vector_name(model: str) -> str:
    name = _PLAIN.sub("_", model).strip("._")
    if not name or ".." in name:
        raise ValueError(f"model name {model!r} gives no usable vector name")
    return name


@dataclass(frozen=True)
class IndexSchema:
    """The named vectors of a collection: dense (name -> dim, "fused" first) and sparse names; `graph`: the
    dense vectors with an HNSW graph, `hnsw`: its (m, ef_construct)."""

    dense: tuple[tuple[str, int], ...]
    sparse: tuple[str, ...] = ()
    graph: tuple[str, ...] = (FUSED,)
    hnsw: tuple[int, int] = (HNSW_M, HNSW_EF_CONSTRUCT)

    def __post_init__(self) -> None:
        names = [n for n, _ in self.dense] + list(self.sparse)
        if len(set(names)) != len(names):
            raise ValueError(f"vector names collide: {names} (two models map to one name, or one is named {FUSED!r})")
        for name, dim in self.dense:
            if int(dim) <= 0:
                raise ValueError(f"vector {name!r}: dimension {dim} must be > 0")
        dense = dict(self.dense)
        if any(name not in dense for name in self.graph):
            raise ValueError(f"HNSW graph for {list(self.graph)}: not all are dense vectors of {list(dense)}")

    def hnsw_m(self, name: str) -> int:
        """The HNSW m of a dense vector: 0 (no graph, exact search only) unless it is in `graph`."""
        return self.hnsw[0] if name in self.graph else 0

    @classmethod
    def build(cls, fused_dim: int, dense: Mapping[str, int], sparse: Sequence[str] = ()) -> "IndexSchema":
        """From registry model names (vector_name() applied here) and dims."""
        if any(vector_name(m) == FUSED for m in [*dense, *sparse]):
            raise ValueError(f"a model is named {FUSED!r}, the reserved name of the fused vector")
        return cls(((FUSED, int(fused_dim)), *((vector_name(m), int(d)) for m, d in dense.items())),
                   tuple(vector_name(m) for m in sparse))

    @property
    def dense_dims(self) -> dict[str, int]:
        return dict(self.dense)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.dense] + list(self.sparse)

    def to_dict(self) -> dict:
        return {"dense": [[n, d] for n, d in self.dense], "sparse": list(self.sparse), "graph": list(self.graph),
                "hnsw": list(self.hnsw)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "IndexSchema":
        # A schema stored before HNSW was configured reads as (no graph, (0, 0)): never equal to a current one,
        # so that index is rebuilt once with the current HNSW settings.
        return cls(tuple((str(n), int(d)) for n, d in data["dense"]), tuple(data["sparse"]),
                   tuple(data.get("graph", ())), tuple(int(x) for x in data.get("hnsw", (0, 0))))


@dataclass
class IndexPoint:
    """One point to write. `dense`: name -> float32 1-d vector; `sparse`: name -> (int indices, float values).
    For upsert() it carries every vector of the schema and the full payload; for update_vectors() only the
    vectors to rewrite (payload ignored) and their new fingerprints."""

    chunk_id: str
    payload: dict = field(default_factory=dict)
    dense: dict[str, np.ndarray | list] = field(default_factory=dict)
    sparse: dict[str, tuple[np.ndarray | list, np.ndarray | list]] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    score: float


def from_vector(value):
    """A stored vector as numpy: dense -> float32 array; sparse (indices + values) -> (int64 ids, float32 weights)."""
    if hasattr(value, "indices") and hasattr(value, "values"):
        return np.asarray(value.indices, dtype=np.int64), np.asarray(value.values, dtype=np.float32)
    return np.asarray(value, dtype=np.float32)


def payloads_in_order(ids: Sequence[str], records, with_vectors: Sequence[str] | None) -> list[dict]:
    """Retrieved records (each with .id, .payload, .vector) as payload dicts in the order of `ids` (ids the
    index lacks are left out), with the requested named vectors under "vectors"; both sinks return this."""
    by_id = {str(r.id): r for r in records}
    out = []
    for i in ids:
        record = by_id.get(i)
        if record is None:
            continue
        item = dict(record.payload or {})
        if with_vectors:
            vectors = record.vector if isinstance(record.vector, dict) else {}
            item["vectors"] = {n: from_vector(vectors[n]) for n in with_vectors if n in vectors}
        out.append(item)
    return out


def existing_schema(names: Sequence[str]) -> pa.Schema:
    """What existing() yields: chunk_id, content_hash, then one fingerprint column per vector name and one
    for the payload ("fingerprints.<name>", null where the point has none)."""
    return pa.schema([("chunk_id", pa.string()), ("content_hash", pa.string()),
                      *((f"{FINGERPRINTS}.{n}", pa.string()) for n in [*names, PAYLOAD_KEY])])


def existing_fields(fingerprints: bool) -> list[str]:
    """The payload fields existing() reads: without the fingerprints it reads a quarter of the bytes (a check
    that compares ids and hashes only: Edge, 20k points, 0.10 vs 0.46 s)."""
    return ["chunk_id", "content_hash", *([FINGERPRINTS] if fingerprints else [])]


def existing_batch(payloads: Sequence[Mapping], names: Sequence[str]) -> pa.RecordBatch:
    """existing()'s record batch from point payloads (both sinks build it here); fingerprint columns are null
    where the payloads were read without them."""
    names = [*names, PAYLOAD_KEY]
    fps = [p.get(FINGERPRINTS) or {} for p in payloads]
    columns = [pa.array([p.get("chunk_id") for p in payloads], pa.string()),
               pa.array([p.get("content_hash") for p in payloads], pa.string()),
               *(pa.array([f.get(n) for f in fps], pa.string()) for n in names)]
    return pa.RecordBatch.from_arrays(columns, schema=existing_schema(names[:-1]))


@runtime_checkable
class VectorIndex(Protocol):
    """A collection in a vector database. Writes are idempotent (upsert by point id, delete by id), so a
    sync killed midway is repaired by the next one (rag_clean.index.sync)."""

    sink: str          # "qdrant-edge" | "qdrant"
    collection: str
    location: str      # where it lives, never with credentials

    def ensure_schema(self, schema: IndexSchema, points: int = 0) -> bool:
        """Create the collection with these named vectors, or recreate it (empty) when it exists with other
        vectors or dims (Qdrant cannot add or resize a named vector in place). True when it was (re)created.
        `points`: the collection's size (Edge picks its shard count from it)."""

    def writer(self, points: int, spec):
        """Where the sync sends its writes (rag_clean.index.blocks): delete(chunk_ids), write(block batch),
        commit() -> BlockCounts, close(). `points`: how many points the sync will write."""

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Write whole points (every vector, payload with fingerprints); one call per block of rows."""

    def update_vectors(self, points: Sequence[IndexPoint]) -> None:
        """Rewrite only the vectors each point carries, and merge its fingerprints into the payload."""

    def delete(self, chunk_ids: Sequence[str]) -> None:
        """Remove the points of these chunks (absent ones are ignored)."""

    def existing(self, block: int = 4096, fingerprints: bool = True) -> Iterator[pa.RecordBatch]:
        """Every point's chunk_id, content_hash and per-vector fingerprints (existing_schema), streamed;
        `fingerprints=False` leaves those columns null (existing_fields)."""

    def count(self) -> int: ...

    def reserve_space(self, points: int, bytes_per_point: int) -> None:
        """Raise VectorIndexError (one line naming the location) when the index's disk cannot take this many
        points of about this raw size; called before the first write of a sync (no-op where the engine
        reports a full disk itself)."""

    def commit(self) -> None:
        """Make the writes durable and searchable (Edge: flush, then build the HNSW index)."""

    def dense_search(self, vector_name: str, query: np.ndarray, k: int, exact: bool = True) -> list[Hit]:
        """Top k by cosine of a float32 1-d query; exact=False uses the HNSW graph (hnsw_ef=SEARCH_HNSW_EF) where
        the vector has one (IndexSchema.graph), else it is exact anyway."""

    def sparse_search(self, vector_name: str, indices: np.ndarray, values: np.ndarray, k: int) -> list[Hit]:
        """Top k by dot product of term weights (exact: Qdrant's sparse index is an inverted index)."""

    def retrieve(self, chunk_ids: Sequence[str], with_vectors: Sequence[str] | None = None) -> list[dict]:
        """Payloads of the points of these chunks, in the given order (absent ones skipped). With
        `with_vectors`, each dict also has "vectors": {name: float32 array, or (indices, values) for sparse}."""

    def close(self) -> None: ...
