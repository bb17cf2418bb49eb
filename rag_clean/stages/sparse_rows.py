"""Sparse rows of one model, written in any order, read back in chunk order, in flat memory.

Encoders yield length-sorted batches and reused rows come from a previous file in its order, but
an incremental file must equal a full one. Rows are appended to two scratch files beside the output
(term ids, weights: only the terms a row has, however large top_k is), with each row's start and
length in file-backed arrays; `blocks()` gathers them back in chunk order, block by block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.storage.errors import naming_disk_full
from rag_clean.storage.staged import Scratch

BLOCK = 16384  # rows per Parquet row group: the write of a block (Arrow lists + Parquet encoding) is the stage's largest transient


def list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))



def _block_gather(starts, lengths) -> tuple[np.ndarray, np.ndarray]:
    """A block's list offsets, and where each of its values lies in the scratch file (rows in chunk order)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, np.repeat(np.asarray(starts) - offsets[:-1], lengths) + np.arange(offsets[-1])


def _scratch_files(beside: Path, label: str, value_parts: tuple[str, ...], n: int):
    """Scratch files beside the output for a scratch's values, plus its per-row index: where each row's
    values start and how many (-1: not written yet). File-backed, so a million rows cost page cache, not
    anonymous memory. Returns (the Scratch that removes them all, open value files, starts, lengths)."""
    base = Path(beside)
    base.parent.mkdir(parents=True, exist_ok=True)
    scratch = Scratch(base)
    try:
        files = [scratch.open(f"{label}.{part}", "wb+") for part in value_parts]
        starts = scratch.matrix(f"{label}.start.npy", np.int64, (n,))
        lengths = scratch.matrix(f"{label}.len.npy", np.int32, (n,))
    except BaseException:
        scratch.drop()
        raise
    lengths[:] = -1
    return scratch, files, starts, lengths


class SparseScratch:
    def __init__(self, beside: Path, n: int, top_k: int, label: str):
        self.n, self.top_k, self.label = int(n), int(top_k), label
        self._scratch, (self._ids, self._weights), self.starts, self.lengths = _scratch_files(
            beside, label, ("ids.bin", "w.bin"), self.n)
        self._count = 0

    def reset(self) -> None:
        """Forget every row (a model that failed midway is replaced whole)."""
        for fh in (self._ids, self._weights):
            fh.seek(0)
            fh.truncate()
        self.lengths[:] = -1
        self._count = 0

    def _append(self, rows: np.ndarray, lengths: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        if len(lengths) and lengths.max() > self.top_k:
            raise ValueError(f"{self.label}: a row has {lengths.max()} terms, more than top_k={self.top_k}")
        if len(ids) != len(weights) or len(ids) != int(lengths.sum()):
            raise ValueError(f"{self.label}: term ids and weights differ in length")
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        with naming_disk_full(self._scratch.beside):
            self._ids.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
            self._weights.write(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
        self.starts[rows] = starts + self._count
        self.lengths[rows] = lengths
        self._count += int(lengths.sum())

    def write(self, rows: np.ndarray, term_ids: Sequence, weights: Sequence) -> None:
        """Rows `rows` (chunk indices) get per-row term id / weight arrays."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        term_ids = [np.asarray(t, dtype=np.int32) for t in term_ids]
        weights = [np.asarray(w, dtype=np.float32) for w in weights]
        lengths = np.fromiter((len(t) for t in term_ids), dtype=np.int64, count=len(term_ids))
        if any(len(t) != len(w) for t, w in zip(term_ids, weights)):
            raise ValueError(f"{self.label}: term ids and weights differ in length")
        self._append(rows, lengths, np.concatenate(term_ids), np.concatenate(weights))

    def write_lists(self, rows: np.ndarray, term_ids: pa.Array, weights: pa.Array) -> None:
        """Rows from Arrow list columns (a previous file's), vectorized: no Python object per row."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        term_ids, weights = _flat_list(term_ids), _flat_list(weights)
        offsets = term_ids.offsets.to_numpy().astype(np.int64)
        w_offsets = weights.offsets.to_numpy().astype(np.int64)
        ids = term_ids.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        ws = weights.values.to_numpy(zero_copy_only=False)[w_offsets[0]:w_offsets[-1]]
        self._append(rows, np.diff(offsets), ids, ws)

    def blocks(self) -> Iterator[tuple[int, int, pa.ListArray, pa.ListArray]]:
        """(start, stop, term_ids, weights) per block of rows, in chunk order."""
        missing = np.flatnonzero(np.asarray(self.lengths) < 0)
        if len(missing):
            raise ValueError(f"{self.label}: {len(missing)} rows never written (first: row {missing[0]})")
        for fh in (self._ids, self._weights):
            fh.flush()
        ids = np.memmap(self._ids.name, dtype=np.int32, mode="r") if self._count else np.zeros(0, np.int32)
        ws = np.memmap(self._weights.name, dtype=np.float32, mode="r") if self._count else np.zeros(0, np.float32)
        for start in range(0, self.n, BLOCK):
            stop = min(start + BLOCK, self.n)
            offsets, gather = _block_gather(self.starts[start:stop], self.lengths[start:stop])
            yield (start, stop, list_array(offsets, ids[gather], pa.int32()),
                   list_array(offsets, ws[gather], pa.float32()))
        del ids, ws

    @property
    def rows_with_terms(self) -> int:
        return int(np.count_nonzero(np.asarray(self.lengths) > 0))

    def close(self) -> None:
        """Remove the scratch files (also after a failed write: closing on a full disk raises, ignored)."""
        self.starts = self.lengths = None  # unmaps
        self._scratch.drop()


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


class VectorRowsScratch:
    """Like SparseScratch, for rows of token vectors ([tokens, dim] float32 per row: ColBERT)."""

    def __init__(self, beside: Path, n: int, dim: int, label: str):
        self.n, self.dim, self.label = int(n), int(dim), label
        self._scratch, (self._values,), self.starts, self.lengths = _scratch_files(beside, label, ("vec.bin",), self.n)
        self._count = 0  # token vectors written

    def _append(self, rows: np.ndarray, lengths: np.ndarray, flat: np.ndarray) -> None:
        if flat.size != int(lengths.sum()) * self.dim:
            raise ValueError(f"{self.label}: token vectors are not {self.dim}-d")
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        with naming_disk_full(self._scratch.beside):
            self._values.write(np.ascontiguousarray(flat, dtype=np.float32).tobytes())
        self.starts[rows] = starts + self._count
        self.lengths[rows] = lengths
        self._count += int(lengths.sum())

    def write(self, rows: np.ndarray, vectors: Sequence[np.ndarray]) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        vectors = [np.asarray(v, dtype=np.float32).reshape(-1, self.dim) for v in vectors]
        lengths = np.fromiter((len(v) for v in vectors), dtype=np.int64, count=len(vectors))
        self._append(rows, lengths, np.concatenate(vectors).reshape(-1))

    def write_lists(self, rows: np.ndarray, column) -> None:
        """Rows from a stored list<fixed_size_list<float32, dim>> column."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        column = _flat_list(column)
        offsets = column.offsets.to_numpy().astype(np.int64)
        inner = column.values.values.to_numpy(zero_copy_only=False)
        base = column.values.offset * self.dim
        self._append(rows, np.diff(offsets), inner[base + offsets[0] * self.dim: base + offsets[-1] * self.dim])

    def blocks(self) -> Iterator[tuple[int, int, pa.ListArray]]:
        missing = np.flatnonzero(np.asarray(self.lengths) < 0)
        if len(missing):
            raise ValueError(f"{self.label}: {len(missing)} rows never written (first: row {missing[0]})")
        self._values.flush()
        values = (np.memmap(self._values.name, dtype=np.float32, mode="r").reshape(-1, self.dim) if self._count
                  else np.zeros((0, self.dim), np.float32))
        for start in range(0, self.n, BLOCK):
            stop = min(start + BLOCK, self.n)
            offsets, gather = _block_gather(self.starts[start:stop], self.lengths[start:stop])
            inner = pa.FixedSizeListArray.from_arrays(pa.array(values[gather].reshape(-1), pa.float32()), self.dim)
            yield start, stop, pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)
        del values

    def close(self) -> None:
        self.starts = self.lengths = None
        self._scratch.drop()
