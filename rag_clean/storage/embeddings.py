"""Embedding matrices: Arrow IPC files of (chunk_id, content_hash, embedding fixed_size_list<float32, dim>),
one record batch, memory-mapped on read (`vectors` is a zero-copy numpy view over the file).

`EmbeddingSet` holds `vectors` and `ids` / `hashes` (zero-copy Arrow string arrays); `chunk_ids` /
`content_hashes` are Python lists built on first use, for small callers and tests, not for stage code.
`EmbeddingWriter` takes ids and hashes as Arrow arrays (e.g. `chunks.column("chunk_id")`) or lists, and
streams rows (in any order) into a memory-mapped scratch matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from rag_clean.storage.arrow_io import as_string_array
from rag_clean.storage.columns import column
from rag_clean.storage.errors import StorageError, unreadable
from rag_clean.storage.staged import StagedFile, abort_on_error, names_disk_full

Strings = "Sequence[str] | pa.Array | pa.ChunkedArray"


class EmbeddingSet:
    """Row-aligned vectors for a collection.

    `vectors` is a read-only memory-mapped view; `ids` / `hashes` are zero-copy Arrow string arrays
    over the same file. `chunk_ids` / `content_hashes` are Python lists built on first use: for tests
    and small callers only (a 1M-row list costs ~100 MB); stage code compares with `ids.equals(...)`.
    """

    def __init__(self, chunk_ids=None, content_hashes=None, vectors: np.ndarray | None = None,
                 metadata: dict[str, str] | None = None, *, ids=None, hashes=None):
        self.ids = as_string_array(ids if ids is not None else (chunk_ids if chunk_ids is not None else []))
        self.hashes = as_string_array(hashes if hashes is not None else (content_hashes if content_hashes is not None else []))
        if len(self.ids) != len(self.hashes):
            raise ValueError("chunk ids and content hashes differ in length")
        self.vectors = vectors if vectors is not None else np.zeros((len(self.ids), 0), np.float32)
        self.metadata = dict(metadata or {})
        self._chunk_ids: list[str] | None = None
        self._content_hashes: list[str] | None = None

    @property
    def chunk_ids(self) -> list[str]:
        if self._chunk_ids is None:
            self._chunk_ids = self.ids.to_pylist()
        return self._chunk_ids

    @property
    def content_hashes(self) -> list[str]:
        if self._content_hashes is None:
            self._content_hashes = self.hashes.to_pylist()
        return self._content_hashes

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"EmbeddingSet(rows={len(self)}, dim={self.dim})"


def embedding_schema(dim: int | None, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """The stored file's schema. `dim` None: the columns as declared before a run, when the width is not
    known yet (fused_embeddings: it depends on the run's ensemble and fusion method); stored files always
    carry a fixed width."""
    vector = pa.list_(pa.float32(), dim) if dim is not None else pa.list_(pa.float32())
    return pa.schema(
        [
            column("chunk_id", pa.string(), "the chunk (chunks.chunk_id)"),
            column("content_hash", pa.string(), "sha256 of the chunk text this vector was computed from"),
            column("embedding", vector, "the chunk's L2-normalized vector (float32, one width per file)"),
        ],
        metadata={k: str(v) for k, v in (metadata or {}).items()},
    )


class EmbeddingWriter(StagedFile):
    """Streams batches of rows (in any order) into a staged Arrow IPC file.

    Batches land in a disk-backed scratch matrix, so host memory stays flat in collection size;
    `finish()` turns it into the Arrow file (still staged) and `publish()` renames it into place.
    Every row must be written exactly once before finish(). `chunk_ids` / `content_hashes` may be
    Arrow arrays or chunked columns (e.g. `chunks.column("chunk_id")`: written without Python lists)
    or lists.
    """

    def __init__(self, path: Path, chunk_ids: Strings, content_hashes: Strings, dim: int,
                 metadata: Mapping[str, str] | None = None, *, root: Path | None = None):
        self.ids = as_string_array(chunk_ids)
        self.hashes = as_string_array(content_hashes)
        if len(self.ids) != len(self.hashes):
            raise ValueError("chunk_ids and content_hashes differ in length")
        super().__init__(path, root=root)
        self.dim = int(dim)
        self.metadata = dict(metadata or {})
        n = len(self.ids)
        self._written = np.zeros(n, dtype=bool)
        with abort_on_error(self):
            self._matrix = self._reserve_matrix(n)

    @names_disk_full
    def _reserve_matrix(self, n: int) -> np.memmap:
        return self.scratch.matrix("matrix.npy", np.float32, (n, self.dim))

    @names_disk_full
    def write(self, row_indices: np.ndarray, vectors: np.ndarray) -> None:
        row_indices = np.asarray(row_indices, dtype=np.int64)
        if vectors.shape != (len(row_indices), self.dim):
            raise ValueError(f"batch shape {vectors.shape} != ({len(row_indices)}, {self.dim}) for {self.path.name}")
        if self._written[row_indices].any():
            raise ValueError(f"rows written twice into {self.path.name}")
        self._matrix[row_indices] = vectors
        self._written[row_indices] = True

    @property
    def rows_written(self) -> int:
        return int(self._written.sum())

    def finish(self) -> Path:
        if not self.finished:
            missing = np.flatnonzero(~self._written)
            if len(missing):
                raise ValueError(f"{len(missing)} rows never written into {self.path.name} "
                                 f"(first: {self.ids[int(missing[0])].as_py()})")
        return super().finish()

    def _complete(self) -> None:
        self._matrix.flush()
        flat = pa.array(self._matrix.reshape(-1), type=pa.float32())  # zero-copy over the memmap
        table = pa.table(
            {
                "chunk_id": self.ids,
                "content_hash": self.hashes,
                "embedding": pa.FixedSizeListArray.from_arrays(flat, self.dim),
            },
            schema=embedding_schema(self.dim, self.metadata),
        )
        with pa.OSFile(str(self.staged_path), "wb") as sink:
            # One record batch: readers get one contiguous buffer to memory-map.
            with ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(len(table), 1))
        del flat, table
        self._matrix = None  # dropping the last reference unmaps it

    def _close(self) -> None:
        self._matrix = None


def write_embeddings(path: Path, chunk_ids: Strings, content_hashes: Strings, vectors: np.ndarray,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Small-matrix convenience: write all rows at once, atomically."""
    writer = EmbeddingWriter(path, chunk_ids, content_hashes, vectors.shape[1], metadata)
    with abort_on_error(writer):
        writer.write(np.arange(len(writer.ids)), np.ascontiguousarray(vectors, dtype=np.float32))
    return writer.publish()


def read_embeddings(path: Path) -> EmbeddingSet:
    """Memory-map an embeddings file; `vectors` is a zero-copy read-only view."""
    path = Path(path)
    if not path.exists():
        raise StorageError(f"{path} does not exist: materialize the upstream asset first")
    try:
        source = pa.memory_map(str(path), "r")
        table = ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(path, "Arrow IPC embeddings file", exc) from exc
    names = table.schema.names
    if names[:3] != ["chunk_id", "content_hash", "embedding"]:
        raise StorageError(f"{path}: unexpected columns {names}")
    dim = table.schema.field("embedding").type.list_size
    column = table.column("embedding")
    if column.num_chunks == 1:
        values = column.chunk(0).values
    elif column.num_chunks == 0:  # a file of no rows has no record batch
        values = pa.array([], pa.float32())
    else:
        values = pa.concat_arrays([c.values for c in column.chunks])
    vectors = values.to_numpy(zero_copy_only=len(table) > 0 and column.num_chunks == 1).reshape(len(table), dim)
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return EmbeddingSet(ids=table.column("chunk_id"), hashes=table.column("content_hash"), vectors=vectors,
                        metadata=metadata)
