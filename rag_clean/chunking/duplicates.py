"""Repeated chunk ids, found without a Python set of every id (chunks stage, exports, checks)."""

from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa

from rag_clean.storage.arrow_io import as_string_array


def duplicate_id_rows(ids: "pa.Array | pa.ChunkedArray", block: int = 65536) -> list[np.ndarray]:
    """Rows of every id that occurs more than once, one sorted array per id, ordered by each id's second
    occurrence (the first duplicate a reader meets comes first). Empty when all ids are unique.

    Streaming, without a Python set of every id: per row a 64-bit key (high bits: the id's hash, low
    bits: the row) goes into a scratch file that is sorted in place (its pages are file-backed, not
    anonymous memory); only rows whose hashes collide are compared exactly.
    """
    ids = as_string_array(ids)
    n = len(ids)
    if n < 2:
        return []
    bits = max(1, (n - 1).bit_length())
    if bits > 40:
        raise ValueError(f"duplicate_id_rows: {n} rows is more than this check supports")
    row_mask = np.uint64((1 << bits) - 1)
    with tempfile.TemporaryFile(prefix="rag_clean_ids_") as fh:
        keys = np.memmap(fh, dtype=np.uint64, mode="w+", shape=(n,))
        for start in range(0, n, block):
            values = ids.slice(start, block).to_pylist()
            hashed = np.fromiter((hash(v) for v in values), dtype=np.int64, count=len(values)).view(np.uint64)
            keys[start:start + len(values)] = (hashed & ~row_mask) | np.arange(start, start + len(values), dtype=np.uint64)
        keys.sort()
        candidates: list[np.ndarray] = []
        for start in range(0, n - 1, block):
            window = np.asarray(keys[start:start + block + 1])
            high = window & ~row_mask
            same = np.flatnonzero(high[1:] == high[:-1])
            if len(same):
                candidates.append(np.unique(np.concatenate([window[same], window[same + 1]]) & row_mask))
        del keys
    if not candidates:
        return []
    rows = np.unique(np.concatenate(candidates)).astype(np.int64)
    by_id: dict[str, list[int]] = {}
    for row, value in zip(rows.tolist(), ids.take(pa.array(rows)).to_pylist()):
        by_id.setdefault(value, []).append(row)
    groups = [np.array(sorted(r), dtype=np.int64) for r in by_id.values() if len(r) > 1]
    return sorted(groups, key=lambda g: int(g[1]))
