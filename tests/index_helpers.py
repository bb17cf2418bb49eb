"""Stored assets of one collection, written like the stages leave them, for the vector index tests (no models):
a chunks table, per-model dense and fused Arrow matrices, a sparse Parquet file with fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.chunking.rows import CHUNK_SCHEMA, make_row
from rag_clean.index.sync import SyncSources
from rag_clean.retrieval.fusion import fuse_block
from rag_clean.stages.sparse import SPARSE_SCHEMA, sparse_schema
from rag_clean.storage.embeddings import read_embeddings, write_embeddings

DENSE = {"model-a": 8, "org/model-b": 12}
SPARSE = ["splade"]
VECTOR_NAMES = ["fused", "model-a", "org_model-b", "splade"]   # vector_name() of each


def unit(rng, n, dim):
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Store:
    """Rows keyed by chunk_id; `write()` stores them in the given order, with per-model fingerprints."""

    def __init__(self, root: Path, n: int, seed: int = 0):
        self.root = root
        self.rng = np.random.default_rng(seed)
        self.rows: dict[str, dict] = {}
        self.fingerprints = {**{m: "fp-1" for m in DENSE}, **{m: "sp-1" for m in SPARSE}}
        for i in range(n):
            self.put(f"c{i}", f"text number {i} about vectors")
        self.version = 0

    def put(self, chunk_id: str, text: str, heading: str = "Head", **meta) -> None:
        row = make_row(chunk_id, text, "doc.md", len(self.rows), heading, ["Doc", heading], 5, {"k": chunk_id, **meta})
        row["dense"] = {m: unit(self.rng, 1, d)[0] for m, d in DENSE.items()}
        terms = np.sort(self.rng.choice(1000, size=int(self.rng.integers(0, 6)), replace=False))
        row["sparse"] = {m: (terms.tolist(), self.rng.random(len(terms)).astype(np.float32).tolist()) for m in SPARSE}
        self.rows[chunk_id] = row

    def reencode(self, model: str, fingerprint: str) -> None:
        """The model changed: new vectors for every row, a new fingerprint."""
        self.fingerprints[model] = fingerprint
        for row in self.rows.values():
            if model in DENSE:
                row["dense"][model] = unit(self.rng, 1, DENSE[model])[0]
            else:
                n = len(row["sparse"][model][0])
                row["sparse"][model] = (row["sparse"][model][0], self.rng.random(n).astype(np.float32).tolist())

    def write(self) -> SyncSources:
        self.version += 1
        folder = self.root / f"v{self.version}"
        folder.mkdir(parents=True)
        rows = list(self.rows.values())
        chunks = pa.Table.from_pylist([{k: r[k] for k in CHUNK_SCHEMA.names} for r in rows], schema=CHUNK_SCHEMA)
        ids = chunks.column("chunk_id")
        hashes = chunks.column("content_hash")
        dense = {}
        for m in DENSE:
            vecs = np.stack([r["dense"][m] for r in rows])
            dense[m] = read_embeddings(write_embeddings(folder / f"{m.replace('/', '_')}.arrow", ids, hashes, vecs,
                                                        {"model": m, "fingerprint": self.fingerprints[m]}))
        fused = fuse_block([dense[m].vectors for m in DENSE], [0.5, 0.5], "concat")
        fused_set = read_embeddings(write_embeddings(folder / "fused.arrow", ids, hashes, fused, {
            "method": "concat", "inputs": json.dumps({m: self.fingerprints[m] for m in DENSE}, sort_keys=True)}))
        table = pa.Table.from_pylist([
            {"chunk_id": r["chunk_id"], "content_hash": r["content_hash"], "model": m, "term_ids": r["sparse"][m][0],
             "weights": r["sparse"][m][1], "fallback": False} for m in SPARSE for r in rows],
            schema=sparse_schema({m: self.fingerprints[m] for m in SPARSE}))
        assert table.schema.names == SPARSE_SCHEMA.names
        pq.write_table(table, folder / "sparse.parquet", row_group_size=7)
        return SyncSources(chunks, fused_set, dense, pq.ParquetFile(folder / "sparse.parquet"), SPARSE)


def snapshot(index, chunk_ids) -> dict:
    """Every point of the index: payload and vectors (sparse as a term -> weight dict), by chunk id."""
    names = VECTOR_NAMES
    out = {}
    for item in index.retrieve(sorted(chunk_ids), with_vectors=names):
        vectors = {}
        for name, v in item.pop("vectors").items():
            vectors[name] = dict(zip(v[0].tolist(), v[1].tolist())) if isinstance(v, tuple) else v
        out[item["chunk_id"]] = (item, vectors)
    return out


def assert_same_index(a, b, chunk_ids) -> None:
    sa, sb = snapshot(a, chunk_ids), snapshot(b, chunk_ids)
    assert a.count() == b.count() == len(chunk_ids)
    assert sorted(sa) == sorted(sb) == sorted(chunk_ids)
    for cid in sa:
        (pa_, va), (pb, vb) = sa[cid], sb[cid]
        assert pa_ == pb, cid
        assert sorted(va) == sorted(vb), cid
        for name in va:
            if isinstance(va[name], dict):
                assert va[name].keys() == vb[name].keys(), (cid, name)
                assert np.allclose(list(va[name].values()), list(vb[name].values()), atol=1e-6), (cid, name)
            else:
                assert np.abs(va[name] - vb[name]).max() <= 1e-6, (cid, name)
