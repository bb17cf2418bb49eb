"""Match the current rows to a previous output's rows by content hash, in flat memory.

A Python dict of every hash costs ~150 MB at a million rows; here each hex sha256 becomes one uint64
key (its first 16 hex digits, parsed block by block from the Arrow column's bytes), the previous keys
are argsorted once and the current ones looked up with searchsorted. Every match is then confirmed by
comparing the full hash strings (blockwise, in Arrow), so a 64-bit collision can cost a recompute but
never reuse a wrong row.

    current_rows, previous_rows = match_rows(chunks.column("content_hash"), previous_hashes)

Used by the dense, sparse and bge-m3 side-file stages; any stage keyed by content hash can use it.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BLOCK = 65536

# ASCII -> nibble; 255 marks a byte that is not a hex digit.
_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i
_SHIFTS = np.arange(60, -1, -4, dtype=np.uint64)  # 16 nibbles, most significant first


HashColumn = pa.Array | pa.ChunkedArray | Sequence[str]


def as_string_array(hashes: HashColumn) -> pa.ChunkedArray:
    """An Arrow view of a hash column (Arrow columns pass through; a Python list is converted once)."""
    if isinstance(hashes, pa.ChunkedArray):
        arr = hashes
    elif isinstance(hashes, pa.Array):
        arr = pa.chunked_array([hashes])
    else:
        arr = pa.chunked_array([pa.array(list(hashes), pa.string())], pa.string())
    if arr.type == pa.large_string():
        arr = arr.cast(pa.string())
    if arr.type != pa.string():
        raise TypeError(f"content hashes must be strings, got {arr.type}")
    return arr


def _scalar_key(value: str | None) -> int:
    """The key of one string, by the same rule as the vectorized path: its first 16 hex digits when it
    starts with 16 hex digits, else a blake2b of the whole string."""
    value = value or ""
    head = value[:16]
    if len(head) == 16 and all(c in "0123456789abcdefABCDEF" for c in head):
        return int(head, 16)
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int(np.frombuffer(digest, dtype=np.uint64)[0])


def _block_keys(block: pa.StringArray) -> np.ndarray:
    """uint64 keys of one block (see _scalar_key); fixed-width strings (hex digests) are parsed in numpy."""
    n = len(block)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    if block.null_count == 0:
        offsets = np.frombuffer(block.buffers()[1], dtype=np.int32, count=n + 1, offset=block.offset * 4)
        widths = np.diff(offsets)
        if widths[0] >= 16 and (widths == widths[0]).all():
            width = int(widths[0])
            data = np.frombuffer(block.buffers()[2], dtype=np.uint8, count=n * width, offset=int(offsets[0]))
            nibbles = _NIBBLE[data.reshape(n, width)[:, :16]]
            keys = (nibbles.astype(np.uint64) << _SHIFTS).sum(axis=1, dtype=np.uint64)
            for i in np.flatnonzero((nibbles == 255).any(axis=1)):  # rare: not a hex digest
                keys[i] = _scalar_key(block[int(i)].as_py())
            return keys
    return np.fromiter((_scalar_key(v) for v in block.to_pylist()), dtype=np.uint64, count=n)


def hash_keys(hashes: HashColumn) -> np.ndarray:
    """One uint64 key per row, computed block by block from the Arrow column."""
    arr = as_string_array(hashes)
    parts = []
    for chunk in arr.chunks:
        for start in range(0, len(chunk), BLOCK):
            parts.append(_block_keys(chunk.slice(start, BLOCK)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def match_rows(current: HashColumn, previous: HashColumn) -> tuple[np.ndarray, np.ndarray]:
    """(current_rows, previous_rows), int64, ascending in current_rows: every current row whose content
    hash is found among the previous rows, with one previous row holding that same hash."""
    cur, prev = as_string_array(current), as_string_array(previous)
    empty = np.zeros(0, dtype=np.int64)
    if len(cur) == 0 or len(prev) == 0:
        return empty, empty.copy()
    prev_keys = hash_keys(prev)
    order = np.argsort(prev_keys, kind="stable")
    sorted_keys = prev_keys[order]
    del prev_keys
    cur_rows, prev_rows = [], []
    start = 0
    for chunk in cur.chunks:
        for off in range(0, len(chunk), BLOCK):
            block = chunk.slice(off, BLOCK)
            keys = _block_keys(block)
            pos = np.searchsorted(sorted_keys, keys)
            pos_ok = pos < len(sorted_keys)
            hit = np.zeros(len(keys), dtype=bool)
            hit[pos_ok] = sorted_keys[pos[pos_ok]] == keys[pos_ok]
            local = np.flatnonzero(hit)
            if len(local):
                candidates = order[pos[local]].astype(np.int64)
                # Exact check of the full strings: a key collision is a recompute, never a wrong reuse.
                same = pc.equal(block.take(pa.array(local)), prev.take(pa.array(candidates)))
                same = np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
                cur_rows.append(local[same] + start + off)
                prev_rows.append(candidates[same])
        start += len(chunk)
    if not cur_rows:
        return empty, empty.copy()
    return np.concatenate(cur_rows).astype(np.int64), np.concatenate(prev_rows).astype(np.int64)


def match_parquet(current: HashColumn, path, *, keep: Callable[[pa.RecordBatch], np.ndarray] | None = None,
                  columns: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """match_rows against the `content_hash` column of a Parquet file, read row group by row group twice
    (keys, then the exact check), so memory holds 16 bytes per stored row instead of the strings.

    `keep(batch)` -> bool mask limits which stored rows may match (its batch also has `columns`).
    Returns (current_rows, file_rows): file_rows are row numbers in the file."""
    import pyarrow.parquet as pq

    cur = as_string_array(current)
    empty = np.zeros(0, dtype=np.int64)
    pf = pq.ParquetFile(str(path), memory_map=True)
    wanted = ["content_hash", *[c for c in columns if c != "content_hash"]]

    def groups():
        base = 0
        for g in range(pf.num_row_groups):
            batch = pf.read_row_group(g, columns=wanted)
            yield base, batch
            base += batch.num_rows

    keys, positions = [], []
    for base, batch in groups():
        rows = np.arange(batch.num_rows, dtype=np.int64)
        if keep is not None:
            rows = rows[np.asarray(keep(batch), dtype=bool)]
        if len(rows):
            keys.append(hash_keys(batch.column("content_hash").take(pa.array(rows))))
            positions.append(rows + base)
    if not keys or len(cur) == 0:
        return empty, empty.copy()
    file_keys, file_pos = np.concatenate(keys), np.concatenate(positions)
    del keys, positions
    order = np.argsort(file_keys, kind="stable")
    sorted_keys, sorted_pos = file_keys[order], file_pos[order]
    del file_keys, file_pos, order
    cand_cur, cand_file = [], []
    start = 0
    for chunk in cur.chunks:
        for off in range(0, len(chunk), BLOCK):
            k = _block_keys(chunk.slice(off, BLOCK))
            pos = np.searchsorted(sorted_keys, k)
            ok = pos < len(sorted_keys)
            hit = np.zeros(len(k), dtype=bool)
            hit[ok] = sorted_keys[pos[ok]] == k[ok]
            local = np.flatnonzero(hit)
            cand_cur.append(local + start + off)
            cand_file.append(sorted_pos[pos[local]])
        start += len(chunk)
    cand_cur, cand_file = np.concatenate(cand_cur), np.concatenate(cand_file)
    # Exact check, file row group by row group: a key collision is a recompute, never a wrong reuse.
    by_file = np.argsort(cand_file, kind="stable")
    cand_cur, cand_file = cand_cur[by_file], cand_file[by_file]
    same = np.zeros(len(cand_cur), dtype=bool)
    for base, batch in groups():
        lo, hi = np.searchsorted(cand_file, [base, base + batch.num_rows])
        if hi > lo:
            stored = batch.column("content_hash").take(pa.array(cand_file[lo:hi] - base))
            now = cur.take(pa.array(cand_cur[lo:hi]))
            same[lo:hi] = np.asarray(pc.equal(stored, now).to_numpy(zero_copy_only=False), dtype=bool)
    cand_cur, cand_file = cand_cur[same], cand_file[same]
    back = np.argsort(cand_cur, kind="stable")
    return cand_cur[back].astype(np.int64), cand_file[back].astype(np.int64)


def complement(rows: np.ndarray, n: int) -> np.ndarray:
    """Rows of range(n) not in `rows` (int64, ascending): the rows to compute."""
    mask = np.ones(n, dtype=bool)
    mask[np.asarray(rows, dtype=np.int64)] = False
    return np.flatnonzero(mask).astype(np.int64)


class ArrowTexts(Sequence[str]):
    """A lazy sequence of the texts at `rows` of an Arrow string column.

    Encoders slice their input window by window (rag_clean.encoders.tokenize), so only one window of
    Python strings exists at a time; indexing one item or iterating works too (block by block).
    """

    def __init__(self, column: pa.Array | pa.ChunkedArray, rows: np.ndarray | None = None):
        self.column = column
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.column) if self.rows is None else len(self.rows)

    def _take(self, start: int, stop: int) -> list[str]:
        if self.rows is None:
            return self.column.slice(start, stop - start).to_pylist()
        return self.column.take(pa.array(self.rows[start:stop])).to_pylist()

    def __getitem__(self, item):
        n = len(self)
        if isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step != 1:
                return self._take(0, n)[item]
            return self._take(start, max(start, stop))
        i = int(item)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._take(i, i + 1)[0]

    def __iter__(self):
        for start in range(0, len(self), BLOCK):
            yield from self._take(start, min(start + BLOCK, len(self)))
