"""Sparse rows of one model, written in any order, read back in chunk order, in flat memory.

Encoders yield length-sorted batches and reused rows come from a previous file in its order, but
an incremental file must equal a full one: rows land in scratch memmaps ([n, top_k] term ids and
weights, plus a length per row) beside the output, and `blocks()` streams them out in chunk order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.storage import temp_path_for

BLOCK = 65536


def list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))


class SparseScratch:
    def __init__(self, beside: Path, n: int, top_k: int, label: str):
        self.n, self.top_k, self.label = int(n), max(int(top_k), 1), label
        base = Path(beside)
        base.parent.mkdir(parents=True, exist_ok=True)
        self._paths = [temp_path_for(base.with_name(f"{base.name}.{label}.{part}.npy")) for part in ("ids", "w", "len")]
        self.ids = np.lib.format.open_memmap(self._paths[0], mode="w+", dtype=np.int32, shape=(self.n, self.top_k))
        self.weights = np.lib.format.open_memmap(self._paths[1], mode="w+", dtype=np.float32, shape=(self.n, self.top_k))
        self.lengths = np.lib.format.open_memmap(self._paths[2], mode="w+", dtype=np.int32, shape=(self.n,))
        self.written = np.zeros(self.n, dtype=bool)

    def reset(self) -> None:
        """Forget every row (a model that failed midway is replaced whole)."""
        self.lengths[:] = 0
        self.written[:] = False

    def write(self, rows: np.ndarray, term_ids: Sequence, weights: Sequence) -> None:
        """Rows `rows` (chunk indices) get per-row term id / weight arrays."""
        for r, t, w in zip(np.asarray(rows, dtype=np.int64), term_ids, weights):
            t = np.asarray(t, dtype=np.int32)
            k = len(t)
            if k > self.top_k:
                raise ValueError(f"{self.label}: a row has {k} terms, more than top_k={self.top_k}")
            self.ids[r, :k] = t
            self.weights[r, :k] = np.asarray(w, dtype=np.float32)
            self.lengths[r] = k
        self.written[np.asarray(rows, dtype=np.int64)] = True

    def write_lists(self, rows: np.ndarray, term_ids: pa.Array, weights: pa.Array) -> None:
        """Rows from Arrow list columns (a previous file's), vectorized: no Python object per row."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        term_ids, weights = _flat_list(term_ids), _flat_list(weights)
        offsets = term_ids.offsets.to_numpy().astype(np.int64)
        lengths = np.diff(offsets)
        if lengths.max(initial=0) > self.top_k:
            raise ValueError(f"{self.label}: a stored row has {lengths.max()} terms, more than top_k={self.top_k}")
        start = offsets[0]
        ids = term_ids.values.to_numpy(zero_copy_only=False)[start:offsets[-1]]
        ws = weights.values.to_numpy(zero_copy_only=False)[start:offsets[-1]]
        row_of = np.repeat(rows, lengths)
        col_of = np.arange(len(ids), dtype=np.int64) - np.repeat(offsets[:-1] - start, lengths)
        self.ids[row_of, col_of] = ids
        self.weights[row_of, col_of] = ws
        self.lengths[rows] = lengths
        self.written[rows] = True

    def blocks(self) -> Iterator[tuple[int, int, pa.ListArray, pa.ListArray]]:
        """(start, stop, term_ids, weights) per block of rows, in chunk order."""
        missing = np.flatnonzero(~self.written)
        if len(missing):
            raise ValueError(f"{self.label}: {len(missing)} rows never written (first: row {missing[0]})")
        for start in range(0, self.n, BLOCK):
            stop = min(start + BLOCK, self.n)
            lengths = np.asarray(self.lengths[start:stop])
            mask = np.arange(self.top_k)[None, :] < lengths[:, None]
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            yield (start, stop, list_array(offsets, np.asarray(self.ids[start:stop])[mask], pa.int32()),
                   list_array(offsets, np.asarray(self.weights[start:stop])[mask], pa.float32()))

    def close(self) -> None:
        self.ids = self.weights = self.lengths = None  # unmaps
        for path in self._paths:
            path.unlink(missing_ok=True)


def _flat_list(column) -> pa.ListArray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def scatter_previous(scratch: SparseScratch, path: Path, current_rows: np.ndarray, file_rows: np.ndarray) -> None:
    """Copy rows `file_rows` of the Parquet file at `path` into `scratch` at `current_rows`, reading it
    row group by row group (never the whole file)."""
    if not len(current_rows):
        return
    order = np.argsort(file_rows, kind="stable")
    file_rows, current_rows = np.asarray(file_rows)[order], np.asarray(current_rows)[order]
    pf = pq.ParquetFile(str(path), memory_map=True)
    base = 0
    for g in range(pf.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        lo, hi = np.searchsorted(file_rows, [base, base + size])
        if hi > lo:
            group = pf.read_row_group(g, columns=["term_ids", "weights"])
            local = pa.array(file_rows[lo:hi] - base)
            scratch.write_lists(current_rows[lo:hi], group.column("term_ids").take(local),
                                group.column("weights").take(local))
        base += size
