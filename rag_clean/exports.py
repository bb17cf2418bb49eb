"""The old embedder's export files, written from stored assets (the `exports` stage).

Under `<export_dir>/<collection>/`:

  <collection>_embeddings.npy            fused vectors, float32 (chunks x fused dim), chunk order
  <collection>_<model>_embeddings.npy    one per dense model of the ensemble, float32
  <collection>_qdrant.jsonl              one {"id", "payload", "vectors"} per chunk, chunk order
  <collection>_sparse.jsonl              one {"chunk_id", "model", "indices", "values", "fallback"} per chunk
                                         and sparse model (only when the sparse stage ran)
  <collection>_metadata.json             chunk ids and metadata in row order, models, fusion, file list
  <collection>_stats.json                norms and sparsity per model
  <collection>_processing_summary.json   copy of the telemetry summary

Row i of every matrix is chunk i of the `chunks` table. Every file is written to a temp file beside
it and renamed into place. Matrices stream in row blocks from the memory-mapped stored vectors, so
host memory stays flat in collection size. No query text is ever read here.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag_clean.records import ExportsRecord
from rag_clean.storage import EmbeddingSet, StorageError, atomic_path, check_name, file_digest, path_under, write_json

TEXT_PREVIEW_CHARS = 500
EXPORT_BLOCK_ROWS = 4096
FUSED_VECTOR_NAME = "fused"
SPARSE_VECTOR_NAME = "sparse"
# Fixed namespace: the same (collection, chunk_id) always gets the same point id, across runs and machines.
POINT_ID_NAMESPACE = uuid.UUID("5b0d7f3e-8f1c-4c55-9a57-3f1f4d2e6a10")

FILES_SCHEMA = pa.schema([("name", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string())])


class ExportError(StorageError):
    """Stored assets do not line up (other chunks, other order) or a name cannot become a file name."""


def point_id(collection: str, chunk_id: str) -> str:
    """Qdrant accepts only unsigned integers or UUIDs as point ids: a UUIDv5 of collection and chunk_id."""
    return str(uuid.uuid5(POINT_ID_NAMESPACE, f"{collection}/{chunk_id}"))


def model_file_part(model: str) -> str:
    """A model name as it appears in a file name ('BAAI/bge-m3' -> 'BAAI_bge-m3')."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._")
    if not part:
        raise ExportError(f"model name {model!r} gives an empty file name part")
    return part


@dataclass(frozen=True)
class ExportFiles:
    """Where each export file of one collection goes."""

    folder: Path
    collection: str

    def _f(self, suffix: str) -> Path:
        return self.folder / f"{self.collection}_{suffix}"

    @property
    def fused(self) -> Path:
        return self._f("embeddings.npy")

    def model(self, name: str) -> Path:
        return self._f(f"{model_file_part(name)}_embeddings.npy")

    @property
    def qdrant(self) -> Path:
        return self._f("qdrant.jsonl")

    @property
    def sparse(self) -> Path:
        return self._f("sparse.jsonl")

    @property
    def metadata(self) -> Path:
        return self._f("metadata.json")

    @property
    def stats(self) -> Path:
        return self._f("stats.json")

    @property
    def summary(self) -> Path:
        return self._f("processing_summary.json")


def export_files(export_dir: Path, collection: str) -> ExportFiles:
    return ExportFiles(path_under(Path(export_dir), check_name(collection)), collection)


# ---------------------------------------------------------------- inputs


def _check_aligned(name: str, emb: EmbeddingSet, chunk_ids: list[str], hashes: list[str]) -> None:
    if emb.chunk_ids != chunk_ids or emb.content_hashes != hashes:
        raise ExportError(f"{name} was computed for other chunks than the current `chunks` "
                          f"({len(emb.chunk_ids)} rows vs {len(chunk_ids)}); rematerialize it before exporting")


@dataclass
class _SparseModelRows:
    model: str
    table: pa.Table  # rows of this model, in chunk order


def _sparse_by_model(sparse: pa.Table, models: Sequence[str], chunk_ids: list[str]) -> list[_SparseModelRows]:
    out = []
    position = {cid: i for i, cid in enumerate(chunk_ids)}
    for model in models:
        sub = sparse.filter(pc.equal(sparse.column("model"), model))
        ids = sub.column("chunk_id").to_pylist()
        if ids != chunk_ids:
            present = set(ids)
            missing = [c for c in chunk_ids if c not in present]
            if missing or len(ids) != len(chunk_ids):
                raise ExportError(f"sparse_vectors for model {model!r} does not cover the current chunks "
                                  f"(missing e.g. {missing[:3]}); rematerialize sparse_vectors before exporting")
            sub = sub.take(pa.array(np.argsort([position[c] for c in ids])))
        out.append(_SparseModelRows(model, sub))
    return out


# ---------------------------------------------------------------- writers


def _write_npy(path: Path, emb: EmbeddingSet, block_rows: int) -> dict:
    """Stream a stored matrix into a .npy (temp file, then rename) and measure its norms on the way."""
    n, dim = len(emb), emb.dim
    norms = np.empty(n, dtype=np.float64)
    with atomic_path(path) as tmp:
        # np.save would add ".npy" to a temp name without that suffix; open_memmap writes exactly `tmp`.
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, block_rows):
            block = np.asarray(emb.vectors[start:start + block_rows], dtype=np.float32)
            out[start:start + len(block)] = block
            norms[start:start + len(block)] = np.linalg.norm(block.astype(np.float64), axis=1)
        out.flush()
        del out
    return {
        "rows": n,
        "dim": dim,
        "norm": {"min": float(norms.min()) if n else 0.0, "mean": float(norms.mean()) if n else 0.0,
                 "max": float(norms.max()) if n else 0.0},
    }


def _chunk_metadata(row: Mapping) -> dict:
    """The chunk's original metadata plus the fields the chunks table keeps in columns."""
    try:
        original = json.loads(row["metadata_json"] or "{}")
    except ValueError as exc:
        raise ExportError(f"chunk {row['chunk_id']!r}: metadata_json is not valid JSON: {exc}") from exc
    base = {
        "chunk_id": row["chunk_id"],
        "source_file": row["source_file"],
        "chunk_index": row["chunk_index"],
        "heading_text": row["heading"],
        "section_path": row["section_path"],
        "token_count": row["token_count"],
        "content_hash": row["content_hash"],
    }
    return {**base, **original} if isinstance(original, dict) else {**base, "original": original}


def _row_blocks(chunks: pa.Table, block_rows: int) -> Iterator[tuple[int, list[dict]]]:
    for start in range(0, chunks.num_rows, block_rows):
        yield start, chunks.slice(start, block_rows).to_pylist()


def _jsonl(fh: IO[str], obj: dict) -> None:
    fh.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


def _sparse_vector(term_ids: list[int], weights: list[float]) -> dict:
    return {"indices": [int(t) for t in term_ids], "values": [float(w) for w in weights]}


def _sparse_names(models: Sequence[str]) -> dict[str, str]:
    """Named sparse vector per model: "sparse" for a single model, "sparse_<model>" for several."""
    if len(models) == 1:
        return {models[0]: SPARSE_VECTOR_NAME}
    return {m: f"{SPARSE_VECTOR_NAME}_{model_file_part(m)}" for m in models}


def write_exports(
    export_dir: Path,
    collection: str,
    chunks: pa.Table,
    dense: Mapping[str, EmbeddingSet],
    fused: EmbeddingSet,
    *,
    fusion: Mapping | None = None,
    sparse: pa.Table | None = None,
    sparse_models: Sequence[str] = (),
    summary: Mapping | Callable[[dict], Mapping] | None = None,
    block_rows: int = EXPORT_BLOCK_ROWS,
) -> tuple[pa.Table, ExportsRecord]:
    """Write every export file of one collection; returns (files table: name, bytes, sha256; stage record).

    `dense` maps model name -> stored vectors (the fused ensemble, in fusion order); `sparse` is the
    stored sparse_vectors table, or None when the sparse stage did not run (then no sparse file is
    written and a stale one from an earlier export is removed, so the folder describes this run).
    `summary` is the processing summary to copy, or a function that gets this stage's record so far
    and returns it (so the copy can include the export span).
    """
    if block_rows <= 0:
        raise ValueError("block_rows must be > 0")
    files = export_files(export_dir, collection)
    files.folder.mkdir(parents=True, exist_ok=True)
    chunk_ids = chunks.column("chunk_id").to_pylist()
    hashes = chunks.column("content_hash").to_pylist()
    if len(set(chunk_ids)) != len(chunk_ids):
        raise ExportError(f"collection {collection!r}: chunk ids are not unique; cannot export")
    if not dense:
        raise ExportError(f"collection {collection!r}: no dense model vectors to export")
    for name, emb in dense.items():
        _check_aligned(f"dense_embeddings/{name}", emb, chunk_ids, hashes)
    _check_aligned("fused_embeddings", fused, chunk_ids, hashes)
    sparse_rows = _sparse_by_model(sparse, list(sparse_models), chunk_ids) if sparse is not None and sparse_models else []
    sparse_names = _sparse_names([s.model for s in sparse_rows]) if sparse_rows else {}
    collision = set(sparse_names.values()) & (set(dense) | {FUSED_VECTOR_NAME})
    if FUSED_VECTOR_NAME in dense or collision:
        raise ExportError(f"a model is named like a reserved vector name ({FUSED_VECTOR_NAME!r} / {sorted(collision)})")

    written: list[Path] = []
    stats: dict = {"collection": collection, "chunk_count": len(chunk_ids), "dense": {}, "fused": {}, "sparse": {}}

    # 1. Matrices.
    stats["fused"] = _write_npy(files.fused, fused, block_rows)
    written.append(files.fused)
    model_files = {}
    for name, emb in dense.items():
        path = files.model(name)
        if path in model_files.values() or path == files.fused:
            raise ExportError(f"model {name!r}: its export file name {path.name} collides with another file")
        stats["dense"][name] = _write_npy(path, emb, block_rows)
        model_files[name] = path
        written.append(path)

    # 2. Sparse rows, one line per (chunk, model).
    if sparse_rows:
        with atomic_path(files.sparse) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for rows in sparse_rows:
                nnz = []
                fallback_rows = 0
                for start in range(0, rows.table.num_rows, block_rows):
                    block = rows.table.slice(start, block_rows).to_pylist()
                    for r in block:
                        _jsonl(fh, {"chunk_id": r["chunk_id"], "model": rows.model,
                                    **_sparse_vector(r["term_ids"], r["weights"]), "fallback": bool(r["fallback"])})
                        nnz.append(len(r["term_ids"]))
                        fallback_rows += bool(r["fallback"])
                stats["sparse"][rows.model] = {
                    "rows": len(nnz), "available": int(sum(1 for k in nnz if k)),
                    "nnz_mean": float(np.mean(nnz)) if nnz else 0.0, "nnz_max": int(max(nnz)) if nnz else 0,
                    "fallback_rows": fallback_rows,
                }
        written.append(files.sparse)

    # 3. Qdrant points: one per chunk, named vectors per dense model + fused (+ sparse).
    with atomic_path(files.qdrant) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for start, block in _row_blocks(chunks, block_rows):
            stop = start + len(block)
            dense_blocks = {name: np.asarray(emb.vectors[start:stop]) for name, emb in dense.items()}
            fused_block = np.asarray(fused.vectors[start:stop])
            sparse_blocks = {s.model: s.table.slice(start, len(block)).select(["term_ids", "weights"]).to_pylist()
                             for s in sparse_rows}
            for i, row in enumerate(block):
                vectors = {name: vec[i].tolist() for name, vec in dense_blocks.items()}
                vectors[FUSED_VECTOR_NAME] = fused_block[i].tolist()
                for model, srows in sparse_blocks.items():
                    vectors[sparse_names[model]] = _sparse_vector(srows[i]["term_ids"], srows[i]["weights"])
                payload = {"chunk_id": row["chunk_id"], "collection": collection,
                           "text_preview": row["text"][:TEXT_PREVIEW_CHARS], "metadata": _chunk_metadata(row)}
                _jsonl(fh, {"id": point_id(collection, row["chunk_id"]), "payload": payload, "vectors": vectors})
    written.append(files.qdrant)

    # 4. Metadata: row order, models, fusion, which named vectors exist. Streamed: one chunk per line.
    head = {
        "collection": collection,
        "chunk_count": len(chunk_ids),
        "row_order": "row i of every .npy and line i of the qdrant file is chunks[i]",
        "fused": {"file": files.fused.name, "dim": fused.dim, **({k: fusion[k] for k in fusion} if fusion else {})},
        "models": {name: {"file": model_files[name].name, "dim": emb.dim, "vector_name": name}
                   for name, emb in dense.items()},
        "sparse": {m: {"file": files.sparse.name, "vector_name": v} for m, v in sparse_names.items()},
        "point_id": "uuid5(POINT_ID_NAMESPACE, '<collection>/<chunk_id>')",
        "point_id_namespace": str(POINT_ID_NAMESPACE),
    }
    with atomic_path(files.metadata) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(head, indent=2, ensure_ascii=False)[:-2] + ',\n  "chunks": [\n')
        first = True
        for start, block in _row_blocks(chunks, block_rows):
            for i, row in enumerate(block):
                entry = {"index": start + i, "id": point_id(collection, row["chunk_id"]),
                         "chunk_id": row["chunk_id"], "metadata": _chunk_metadata(row)}
                fh.write(("" if first else ",\n") + "    " + json.dumps(entry, ensure_ascii=False))
                first = False
        fh.write("\n  ]\n}\n")
    written.append(files.metadata)

    # 5. Stats, then the summary copy (last, so it can describe this export too).
    write_json(files.stats, stats)
    written.append(files.stats)
    record = ExportsRecord(rows=len(chunk_ids), export_dir=str(files.folder), models=list(dense),
                           sparse_models=[s.model for s in sparse_rows])
    if summary is not None:
        partial = dict(record.stage_fields(), stage=record.stage, rows=record.rows, status=record.status,
                       files=[p.name for p in written])
        content = summary(partial) if callable(summary) else summary
        write_json(files.summary, content)
        written.append(files.summary)

    record.removed_stale = _remove_stale(files, {p.name for p in written})
    table = pa.table({"name": [p.name for p in written], "bytes": [p.stat().st_size for p in written],
                      "sha256": [file_digest(p) for p in written]}, schema=FILES_SCHEMA)
    record.files = table.to_pylist()
    return table, record


def _remove_stale(files: ExportFiles, keep: set[str]) -> list[str]:
    """Drop export files of this collection that this run did not write (a model left the ensemble,
    sparse was turned off), so the folder never mixes two runs. Only our own file names are touched."""
    removed = []
    own = [f"{files.collection}_sparse.jsonl", f"{files.collection}_processing_summary.json"]
    candidates = [files.folder / n for n in own]
    candidates += [p for p in files.folder.glob(f"{files.collection}_*_embeddings.npy")]
    for path in candidates:
        if path.name not in keep and path.is_file():
            path.unlink()
            removed.append(path.name)
    return sorted(removed)
