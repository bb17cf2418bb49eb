"""Parquet tables (zstd): atomic whole-table writes, a streaming staged writer, a reader naming bad files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.storage.atomic import atomic_path
from rag_clean.storage.errors import StorageError, naming_disk_full, unreadable
from rag_clean.storage.staged import StagedFile, names_disk_full


def write_table(table: pa.Table, path: Path) -> int:
    """Write a Parquet table atomically; returns bytes written."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path).stat().st_size


def read_table(path: Path) -> pa.Table:
    if not Path(path).exists():
        raise StorageError(f"{path} does not exist: materialize the upstream asset first")
    try:
        return pq.read_table(path, memory_map=True)
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid / ArrowIOError: bad footer, short read
        raise unreadable(path, "Parquet file", exc) from exc


class TableWriter(StagedFile):
    """Streams tables into a staged Parquet file beside `path`; `publish()` renames it into place.

    Host memory holds one written table at a time, whatever the total size.
    """

    def __init__(self, path: Path, schema: pa.Schema, *, root: Path | None = None):
        super().__init__(path, root=root)
        self.schema = schema
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        try:
            with naming_disk_full(self.path, root):
                self._writer = pq.ParquetWriter(str(self.staged_path), schema, compression="zstd")
        except BaseException:
            self.abort()
            raise

    @names_disk_full
    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            raise ValueError(f"{self.path.name}: writer already closed")
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))
        self.rows += len(table)

    def _complete(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def read(self) -> pa.Table:
        return pq.read_table(self.finish())
