"""One sparse model's stored rows in chunk order, block by block (read by the exports and the vector index sync).

The sparse stage writes each model's rows in chunk order, so its Parquet file is streamed row group by row
group; a file or table in another order is put in order by an Arrow join on chunk_id (that model's rows
in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rag_clean.storage.errors import StorageError

SPARSE_COLUMNS = ["chunk_id", "term_ids", "weights", "fallback"]


@dataclass
class SparseModelRows:
    """One model's sparse rows in chunk order, handed out in blocks: from an in-memory table, or streamed
    from the Parquet file (row groups) when the file holds them in chunk order (what the sparse stage writes)."""

    model: str
    table: pa.Table | None = None
    file: pq.ParquetFile | None = None
    rows: int = 0

    def blocks(self, block_rows: int) -> Iterator[pa.Table]:
        if self.table is not None:
            for start in range(0, self.table.num_rows, block_rows):
                yield self.table.slice(start, block_rows)
            return
        pending: list[pa.Table] = []
        count = 0
        for sub in model_batches(self.file, self.model, SPARSE_COLUMNS, block_rows):
            pending.append(sub)
            count += sub.num_rows
            while count >= block_rows:
                joined = pa.concat_tables(pending)
                yield joined.slice(0, block_rows)
                rest = joined.slice(block_rows)
                pending, count = ([rest] if rest.num_rows else []), rest.num_rows
        if count:
            yield pa.concat_tables(pending)


def model_batches(file: pq.ParquetFile, model: str, columns: list[str], block_rows: int) -> Iterator[pa.Table]:
    for batch in file.iter_batches(batch_size=block_rows, columns=[*columns, "model"]):
        same = pc.equal(batch.column("model"), model)
        if not pc.any(same).as_py():
            continue
        sub = batch if pc.all(same).as_py() else batch.filter(same)
        yield pa.Table.from_batches([sub]).select(columns)


def in_chunk_order(file: pq.ParquetFile, model: str, chunks: pa.Table, block_rows: int) -> bool:
    """Whether the file holds exactly one row per chunk for `model`, in chunk order (ids only are read)."""
    ids, cursor = chunks.column("chunk_id").cast(pa.string()), 0
    for sub in model_batches(file, model, ["chunk_id"], block_rows):
        n = sub.num_rows
        if cursor + n > len(ids) or not sub.column("chunk_id").cast(pa.string()).equals(ids.slice(cursor, n)):
            return False
        cursor += n
    return cursor == len(ids)


def sparse_rows_by_model(sparse: "pa.Table | pq.ParquetFile", models: Sequence[str], chunks: pa.Table,
                         block_rows: int = 4096, *, error: type[Exception] = StorageError,
                         purpose: str = "first") -> list[SparseModelRows]:
    """Each model's rows in chunk order. A Parquet file whose rows are in chunk order is streamed; rows
    stored in another order are put in order by an Arrow join on chunk_id (that model's rows in memory)."""
    out = []
    ids = chunks.column("chunk_id").cast(pa.string())
    value_set = ids.combine_chunks()
    for model in models:
        if isinstance(sparse, pq.ParquetFile):
            if in_chunk_order(sparse, model, chunks, max(block_rows, 65536)):
                out.append(SparseModelRows(model, file=sparse, rows=len(ids)))
                continue
            parts = list(model_batches(sparse, model, SPARSE_COLUMNS, 65536))
            sub = pa.concat_tables(parts) if parts else pa.table(
                {c: pa.array([], sparse.schema_arrow.field(c).type) for c in SPARSE_COLUMNS})
        else:
            sub = sparse.filter(pc.equal(sparse.column("model"), model)).select(SPARSE_COLUMNS)
        if not (sub.num_rows == len(ids) and sub.column("chunk_id").cast(pa.string()).equals(ids)):
            position = pc.index_in(sub.column("chunk_id").cast(pa.string()), value_set=value_set)
            pos = position.fill_null(-1).to_numpy(zero_copy_only=False)
            covered = np.zeros(len(ids), bool)
            covered[pos[pos >= 0]] = True
            if not covered.all() or sub.num_rows != len(ids):
                missing = take_ids(chunks, np.flatnonzero(~covered)[:3])
                raise error(f"sparse_vectors for model {model!r} does not cover the current chunks "
                            f"(missing e.g. {missing}); rematerialize sparse_vectors {purpose}")
            sub = sub.take(pa.array(np.argsort(pos, kind="stable")))
        out.append(SparseModelRows(model, table=sub, rows=sub.num_rows))
    return out


def take_ids(chunks: pa.Table, rows) -> list[str]:
    return chunks.column("chunk_id").take(pa.array(np.asarray(rows, np.int64))).to_pylist() if len(rows) else []
