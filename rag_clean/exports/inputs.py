"""The stored inputs of an export, checked and put in chunk order: vectors aligned with `chunks`, and each
sparse model's rows in chunk order (streamed from the Parquet file when it already is, else joined on
chunk_id)."""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.exports.files import EXPORT_BLOCK_ROWS, ExportError
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.storage.sparse_blocks import SPARSE_COLUMNS, SparseModelRows, sparse_rows_by_model, take_ids  # noqa: F401 (re-exported)


def _ids(emb: EmbeddingSet, column: str) -> pa.ChunkedArray:
    arrow = getattr(emb, "ids" if column == "chunk_id" else "hashes", None)  # zero-copy where EmbeddingSet has them
    if arrow is None:
        arrow = pa.array(emb.chunk_ids if column == "chunk_id" else emb.content_hashes, pa.string())
    arrow = arrow if isinstance(arrow, pa.ChunkedArray) else pa.chunked_array([arrow])
    return arrow.cast(pa.string())


def check_aligned(name: str, emb: EmbeddingSet, chunks: pa.Table) -> None:
    if len(emb) != chunks.num_rows or not all(
            _ids(emb, c).equals(chunks.column(c).cast(pa.string())) for c in ("chunk_id", "content_hash")):
        raise ExportError(f"{name} was computed for other chunks than the current `chunks` "
                          f"({len(emb)} rows vs {chunks.num_rows}); rematerialize it before exporting")


def sparse_by_model(sparse: "pa.Table | pq.ParquetFile", models: Sequence[str], chunks: pa.Table,
                    block_rows: int = EXPORT_BLOCK_ROWS) -> list[SparseModelRows]:
    """Each model's rows in chunk order (rag_clean.storage.sparse_blocks, shared with the vector index)."""
    return sparse_rows_by_model(sparse, models, chunks, block_rows, error=ExportError, purpose="before exporting")
