"""The export's JSON files: `<collection>_metadata.json` (row order, models, fusion, every chunk's
metadata, streamed one chunk per line), `_stats.json` and the processing summary copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

import pyarrow as pa

from rag_clean.exports.files import POINT_ID_NAMESPACE, ExportError, ExportFiles, point_id
from rag_clean.storage.atomic import atomic_path
from rag_clean.storage.embeddings import EmbeddingSet


def chunk_metadata(row: Mapping) -> dict:
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


def row_blocks(chunks: pa.Table, block_rows: int) -> Iterator[tuple[int, list[dict]]]:
    for start in range(0, chunks.num_rows, block_rows):
        yield start, chunks.slice(start, block_rows).to_pylist()


def write_metadata(files: ExportFiles, chunks: pa.Table, dense: Mapping[str, EmbeddingSet], fused: EmbeddingSet,
                   model_files: Mapping[str, Path], sparse_names: Mapping[str, str], fusion: Mapping | None,
                   block_rows: int) -> Path:
    """Row order, models, fusion, which named vectors exist, then one chunk per line."""
    collection = files.collection
    head = {
        "collection": collection,
        "chunk_count": chunks.num_rows,
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
        for start, block in row_blocks(chunks, block_rows):
            for i, row in enumerate(block):
                entry = {"index": start + i, "id": point_id(collection, row["chunk_id"]),
                         "chunk_id": row["chunk_id"], "metadata": chunk_metadata(row)}
                fh.write(("" if first else ",\n") + "    " + json.dumps(entry, ensure_ascii=False))
                first = False
        fh.write("\n  ]\n}\n")
    return files.metadata
