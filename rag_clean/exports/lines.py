"""Copying unchanged JSONL lines from the previous export: the line-copy index.

Formatting floats is what JSONL lines cost. Each qdrant/sparse line gets a key, a hash of everything the
line is made of (point id, payload, the bytes of every vector in it); a line index side file
(`StorageLayout.export_line_index`) keeps each key's byte range in the file written last. A line whose
key is there is copied from the previous file instead of formatted: the output is byte for byte what a
full export writes. The index is trusted only while that file has the size and mtime it recorded; it is
a cache: unreadable or of the wrong shape, it is discarded with one warning and every line is formatted.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.storage.caches import CACHE_ERRORS, describe, discard_cache
from rag_clean.storage.parquet import write_table

LINE_KEY_BYTES = 16
LINE_INDEX_VERSION = "export-lines/1"


class _PreviousLines:
    """The lines of the previous export of one file, by key: sorted keys and byte ranges (numpy, not a
    Python dict), the old file memory-mapped for copying. Empty when the index is absent, unreadable, or
    does not describe the file as it is now (size and mtime)."""

    def __init__(self, index_path: Path | None, file: Path):
        self.keys = np.zeros(0, f"S{LINE_KEY_BYTES}")
        self.offsets = self.lengths = np.zeros(0, np.int64)
        self._map = None
        self._fh = None
        if index_path is None or not Path(index_path).exists() or not file.exists():
            return
        try:
            table = pq.read_table(index_path)
            meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
            st = file.stat()
            if meta.get("version") != LINE_INDEX_VERSION or meta.get("file") != file.name or \
                    meta.get("size") != str(st.st_size) or meta.get("mtime_ns") != str(st.st_mtime_ns) or not st.st_size:
                return  # describes another file (or another state of it): the lines are formatted again
            keys = table.column("key").combine_chunks()
            if keys.type != pa.binary(LINE_KEY_BYTES):
                raise TypeError(f"key column is {keys.type}, not binary({LINE_KEY_BYTES})")
            raw = np.frombuffer(keys.buffers()[1], dtype=f"S{LINE_KEY_BYTES}", count=len(keys),
                                offset=keys.offset * LINE_KEY_BYTES)
            offsets = table.column("offset").to_numpy()
            lengths = table.column("length").to_numpy()
            if len(offsets) != len(raw) or len(lengths) != len(raw) or \
                    (len(raw) and (offsets.min() < 0 or lengths.min() < 0 or (offsets + lengths).max() > st.st_size)):
                raise ValueError("byte ranges outside the export file")
        except (pa.ArrowException, *CACHE_ERRORS) as exc:
            discard_cache(index_path, f"unreadable export line index ({describe(exc)})")
            return
        order = np.argsort(raw, kind="stable")
        self.keys = raw[order]
        self.offsets = offsets[order]
        self.lengths = lengths[order]
        self._fh = open(file, "rb")
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Position in this index of each key, -1 where absent."""
        if not len(self.keys):
            return np.full(len(keys), -1, np.int64)
        pos = np.searchsorted(self.keys, keys)
        pos[pos >= len(self.keys)] = 0
        return np.where(self.keys[pos] == keys, pos, -1)

    def line(self, pos: int) -> bytes:
        off = int(self.offsets[pos])
        return self._map[off:off + int(self.lengths[pos])]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._fh.close()
            self._map = self._fh = None


class LineFile:
    """Writes one JSONL export file line by line, copying lines whose key the previous export has, and
    records the new file's line index."""

    def __init__(self, path: Path, index_path: Path | None):
        self.path, self.index_path = path, index_path
        self.previous = _PreviousLines(index_path, path)
        self.keys: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.reused = self.computed = 0

    def write_block(self, fh, keys: list[bytes], make_line: Callable[[int], str]) -> None:
        keys_arr = np.array(keys, dtype=f"S{LINE_KEY_BYTES}")
        hits = self.previous.lookup(keys_arr)
        lengths = np.empty(len(keys), np.int64)
        for i, pos in enumerate(hits.tolist()):
            if pos >= 0:
                data = self.previous.line(pos)
                self.reused += 1
            else:
                data = (make_line(i) + "\n").encode("utf-8")
                self.computed += 1
            fh.write(data)
            lengths[i] = len(data)
        self.keys.append(keys_arr)
        self.lengths.append(lengths)

    def finish(self) -> None:
        """After the file is published: write its index (size and mtime of the published file)."""
        self.previous.close()
        if self.index_path is None:
            return
        keys = np.concatenate(self.keys) if self.keys else np.zeros(0, f"S{LINE_KEY_BYTES}")
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
        st = self.path.stat()
        schema = pa.schema([("key", pa.binary(LINE_KEY_BYTES)), ("offset", pa.int64()), ("length", pa.int64())],
                           metadata={"version": LINE_INDEX_VERSION, "file": self.path.name, "size": str(st.st_size),
                                     "mtime_ns": str(st.st_mtime_ns)})
        key_array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(LINE_KEY_BYTES), len(keys),
                                                         [None, pa.py_buffer(keys.tobytes())])
        Path(self.index_path).parent.mkdir(parents=True, exist_ok=True)
        write_table(pa.table([key_array, pa.array(offsets), pa.array(lengths)], schema=schema), Path(self.index_path))

    def abort(self) -> None:
        self.previous.close()


def line_key(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=LINE_KEY_BYTES)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()
