"""The export's JSONL files, block by block: `<collection>_sparse.jsonl` (one line per chunk and sparse
model) and `<collection>_qdrant.jsonl` (one point per chunk: named dense, fused and sparse vectors). Every
line has a key (`lines.line_key`) so an unchanged line is copied from the previous export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag_clean.exports.files import (FUSED_VECTOR_NAME, SPARSE_VECTOR_NAME, TEXT_PREVIEW_CHARS, ExportFiles,
                                     model_file_part, point_id)
from rag_clean.exports.inputs import SparseModelRows
from rag_clean.exports.lines import LineFile, line_key
from rag_clean.exports.metadata import chunk_metadata, row_blocks
from rag_clean.storage.atomic import atomic_path
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.telemetry.records import ReuseCount

LineIndex = Callable[[str], Path] | None


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sparse_vector(term_ids: list[int], weights: list[float]) -> dict:
    return {"indices": [int(t) for t in term_ids], "values": [float(w) for w in weights]}


def sparse_names(models: Sequence[str]) -> dict[str, str]:
    """Named sparse vector per model: "sparse" for a single model, "sparse_<model>" for several."""
    if len(models) == 1:
        return {models[0]: SPARSE_VECTOR_NAME}
    return {m: f"{SPARSE_VECTOR_NAME}_{model_file_part(m)}" for m in models}


class _FlatLists:
    """A block of list<...> rows as flat numpy values + offsets: row i's raw bytes without Python lists."""

    def __init__(self, column):
        lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        self.lengths = lengths

    def row_bytes(self, i: int) -> bytes:
        return self.values[self.offsets[i]:self.offsets[i + 1]].tobytes()


def write_sparse_lines(files: ExportFiles, sparse_rows: Sequence[SparseModelRows], block_rows: int,
                       line_index: LineIndex) -> tuple[dict, ReuseCount]:
    """One line per (chunk, model); returns (stats per model, lines reused vs formatted)."""
    stats: dict = {}
    lines = LineFile(files.sparse, line_index("sparse") if line_index else None)
    try:
        with atomic_path(files.sparse) as tmp, open(tmp, "wb") as fh:
            for rows in sparse_rows:
                nnz_total = nnz_max = available = fallback_rows = 0
                for block in rows.blocks(block_rows):
                    terms, weights = _FlatLists(block.column("term_ids")), _FlatLists(block.column("weights"))
                    fallback = block.column("fallback").to_numpy(zero_copy_only=False).astype(bool)
                    ids = block.column("chunk_id").to_pylist()
                    model = rows.model.encode()
                    keys = [line_key(b"sparse", ids[i].encode(), model, terms.row_bytes(i), weights.row_bytes(i),
                                     bytes([int(fallback[i])])) for i in range(block.num_rows)]
                    pylist: list = []

                    def line(i, block=block, pylist=pylist, model=rows.model, ids=ids, fallback=fallback):
                        if not pylist:  # formatted only when some line of the block is not reused
                            pylist.extend(block.select(["term_ids", "weights"]).to_pylist())
                        return dumps({"chunk_id": ids[i], "model": model,
                                      **_sparse_vector(pylist[i]["term_ids"], pylist[i]["weights"]),
                                      "fallback": bool(fallback[i])})
                    lines.write_block(fh, keys, line)
                    nnz_total += int(terms.lengths.sum())
                    nnz_max = max(nnz_max, int(terms.lengths.max()) if len(terms.lengths) else 0)
                    available += int((terms.lengths > 0).sum())
                    fallback_rows += int(fallback.sum())
                n_rows = rows.rows
                stats[rows.model] = {
                    "rows": n_rows, "available": available,
                    "nnz_mean": float(nnz_total / n_rows) if n_rows else 0.0, "nnz_max": nnz_max,
                    "fallback_rows": fallback_rows,
                }
    except BaseException:
        lines.abort()
        raise
    lines.finish()
    return stats, ReuseCount(lines.reused, lines.computed, "lines")


def write_qdrant_lines(files: ExportFiles, chunks: pa.Table, dense: Mapping[str, EmbeddingSet], fused: EmbeddingSet,
                       sparse_rows: Sequence[SparseModelRows], names_of_sparse: Mapping[str, str], block_rows: int,
                       line_index: LineIndex) -> ReuseCount:
    """One point per chunk: named vectors per dense model + fused (+ sparse); returns lines reused vs formatted."""
    collection = files.collection
    lines = LineFile(files.qdrant, line_index("qdrant") if line_index else None)
    names = [n.encode() for n in dense] + [FUSED_VECTOR_NAME.encode()]
    try:
        with atomic_path(files.qdrant) as tmp, open(tmp, "wb") as fh:
            sparse_iters = [s.blocks(block_rows) for s in sparse_rows]  # one reader per model, in step
            for start, block in row_blocks(chunks, block_rows):
                sparse_blocks = [next(it) for it in sparse_iters]
                stop = start + len(block)
                vector_blocks = [np.ascontiguousarray(emb.vectors[start:stop], dtype="<f4") for emb in dense.values()]
                vector_blocks.append(np.ascontiguousarray(fused.vectors[start:stop], dtype="<f4"))
                sparse_flat = [(names_of_sparse[s.model].encode(), _FlatLists(b.column("term_ids")),
                                _FlatLists(b.column("weights"))) for s, b in zip(sparse_rows, sparse_blocks)]
                heads, keys = [], []
                for i, row in enumerate(block):
                    payload = {"chunk_id": row["chunk_id"], "collection": collection,
                               "text_preview": row["text"][:TEXT_PREVIEW_CHARS], "metadata": chunk_metadata(row)}
                    head = '{"id":' + dumps(point_id(collection, row["chunk_id"])) + ',"payload":' + dumps(payload)
                    heads.append(head)
                    parts = [b"qdrant", head.encode()]
                    for name, vec in zip(names, vector_blocks):
                        parts += [name, vec[i].tobytes()]
                    for name, t, w in sparse_flat:
                        parts += [name, t.row_bytes(i), w.row_bytes(i)]
                    keys.append(line_key(*parts))

                sparse_lists: dict = {}

                def line(i, heads=heads, vector_blocks=vector_blocks, lists=sparse_lists, sblocks=sparse_blocks):
                    vectors = {name: vec[i].tolist() for name, vec in zip(dense, vector_blocks)}
                    vectors[FUSED_VECTOR_NAME] = vector_blocks[-1][i].tolist()
                    for s, b in zip(sparse_rows, sblocks):
                        if s.model not in lists:  # read only when some line of the block is formatted
                            lists[s.model] = b.select(["term_ids", "weights"]).to_pylist()
                        r = lists[s.model][i]
                        vectors[names_of_sparse[s.model]] = _sparse_vector(r["term_ids"], r["weights"])
                    return heads[i] + ',"vectors":' + dumps(vectors) + "}"
                lines.write_block(fh, keys, line)
    except BaseException:
        lines.abort()
        raise
    lines.finish()
    return ReuseCount(lines.reused, lines.computed, "lines")
