"""Arrow IPC tables with ONE record batch, memory-mapped: the format of `chunks` and every table a stage
reads whole.

`read_arrow_table` maps the file, so every column is one contiguous buffer over file pages: slices are
zero-copy and a 1M-chunk collection costs page cache, not anonymous memory. Stage code works on Arrow
columns and converts to Python objects only block by block, never a whole column.
`ColumnSpool` writes such a table from a stream of record batches without holding it: every column's
buffers (validity, offsets, data) are appended to scratch files; finishing maps them, assembles one record
batch over those buffers and writes the IPC file.
"""

from __future__ import annotations

from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from rag_clean.storage.digests import file_digest
from rag_clean.storage.errors import StorageError, naming_disk_full, unreadable
from rag_clean.storage.staged import Scratch, StagedFile, abort_on_error, names_disk_full


def read_arrow_table(path: Path) -> pa.Table:
    """Memory-map an Arrow IPC file: the table's buffers are the file's pages (zero-copy, no anon memory)."""
    path = Path(path)
    if not path.exists():
        raise StorageError(f"{path} does not exist: materialize the upstream asset first")
    try:
        return ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(path, "Arrow IPC file", exc) from exc


def as_string_array(values, what: str = "ids") -> pa.Array:
    """One Arrow string array from a list, an Arrow array or a chunked column (zero-copy when the column
    has one chunk, as every memory-mapped table of this project does)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.chunk(0) if values.num_chunks == 1 else (
            values.combine_chunks() if values.num_chunks else pa.array([], pa.string()))
    if isinstance(values, pa.Array):
        if values.type != pa.string():
            values = values.cast(pa.string())
        return values
    return pa.array(list(values), pa.string())


def ids_absent(wanted: set[str], ids: "pa.Array | pa.ChunkedArray") -> set[str]:
    """Which of a few wanted ids (cited by queries, rankings) the ids column (maybe millions) lacks, without a
    Python set of the column: Arrow matches the column against the small set."""
    if not wanted:
        return set()
    import pyarrow.compute as pc

    present = pc.unique(pc.filter(ids, pc.is_in(ids, value_set=pa.array(sorted(wanted), pa.string()))))
    return set(wanted) - set(present.to_pylist())


# ---------------------------------------------------------------- writing


def _mapped(path: Path, size: int) -> pa.Buffer:
    """A zero-copy buffer over a scratch file's pages (empty files cannot be mapped)."""
    if size == 0:
        return pa.py_buffer(b"")
    return pa.memory_map(str(path), "r").read_buffer(size)


class _ColumnFiles:
    """The buffers of one Arrow array (and its children), appended to scratch files.

    Supports what the project's tables hold: fixed-width primitives, string/binary (large ones too)
    and lists of those. Validity is spooled as one byte per row and bit-packed at finish."""

    def __init__(self, type_: pa.DataType, scratch: Scratch, name: str):
        self.type, self.name, self.length, self.null_count = type_, name, 0, 0
        self._files: dict[str, tuple[Path, object]] = {}
        self._open(scratch, "valid")
        self.child = None
        if pa.types.is_string(type_) or pa.types.is_binary(type_) or pa.types.is_list(type_):
            self._offset_dtype = np.int32
        elif pa.types.is_large_string(type_) or pa.types.is_large_binary(type_) or pa.types.is_large_list(type_):
            self._offset_dtype = np.int64
        elif pa.types.is_primitive(type_) and not pa.types.is_boolean(type_):
            self._offset_dtype = None
            self._width = type_.bit_width // 8
        else:
            raise TypeError(f"ColumnSpool: column {name!r} has unsupported type {type_}")
        if self._offset_dtype is not None:
            self._open(scratch, "offsets").write(np.zeros(1, self._offset_dtype).tobytes())
            self._end = 0  # data bytes (strings) or child rows (lists) so far
            if pa.types.is_list(type_) or pa.types.is_large_list(type_):
                self.child = _ColumnFiles(type_.value_type, scratch, name + ".item")
            else:
                self._open(scratch, "data")
        else:
            self._open(scratch, "data")

    def _open(self, scratch: Scratch, part: str):
        fh = scratch.open(f"{self.name}.{part}")
        self._files[part] = (Path(fh.name), fh)
        return fh

    def _fh(self, part: str):
        return self._files[part][1]

    def append(self, arr: pa.Array) -> None:
        n = len(arr)
        if n == 0:
            return
        if arr.null_count:
            self._fh("valid").write(np.asarray(arr.is_valid(), dtype=np.uint8).tobytes())
        else:
            self._fh("valid").write(b"\x01" * n)
        self.null_count += arr.null_count
        bufs = arr.buffers()
        if self._offset_dtype is None:
            start = arr.offset * self._width
            self._fh("data").write(memoryview(bufs[1])[start:start + n * self._width])
        else:
            offsets = np.frombuffer(bufs[1], dtype=self._offset_dtype, count=arr.offset + n + 1)[arr.offset:]
            first, last = int(offsets[0]), int(offsets[-1])
            rebased = offsets[1:] - first + self._end
            if self._offset_dtype is np.int32 and int(rebased[-1]) > np.iinfo(np.int32).max:
                raise ValueError(f"ColumnSpool: column {self.name!r} exceeds 2 GiB; declare it large_string/large_list")
            self._fh("offsets").write(rebased.astype(self._offset_dtype, copy=False).tobytes())
            if self.child is not None:
                self.child.append(arr.values.slice(first, last - first))
            elif last > first:
                self._fh("data").write(memoryview(bufs[2])[first:last])
            self._end += last - first
        self.length += n

    def close(self) -> None:
        for _, fh in self._files.values():
            if not fh.closed:
                fh.close()
        if self.child is not None:
            self.child.close()

    def array(self, scratch: Scratch) -> pa.Array:
        """The whole column as one Arrow array over memory-mapped scratch files."""
        self.close()
        validity = None
        if self.null_count:
            # One byte per row -> Arrow's bitmap (LSB first), blockwise so memory stays flat.
            src_path = self._files["valid"][0]
            fh = self._open(scratch, "bitmap")
            bitmap_path = self._files["bitmap"][0]
            src = np.memmap(src_path, dtype=np.uint8, mode="r", shape=(self.length,))
            for start in range(0, self.length, 1 << 23):
                fh.write(np.packbits(src[start:start + (1 << 23)], bitorder="little").tobytes())
            fh.close()
            del src
            validity = _mapped(bitmap_path, (self.length + 7) // 8)
        if self._offset_dtype is None:
            data = _mapped(self._files["data"][0], self.length * self._width)
            return pa.Array.from_buffers(self.type, self.length, [validity, data], null_count=self.null_count)
        width = np.dtype(self._offset_dtype).itemsize
        offsets = _mapped(self._files["offsets"][0], (self.length + 1) * width)
        if self.child is not None:
            return pa.Array.from_buffers(self.type, self.length, [validity, offsets], null_count=self.null_count,
                                         children=[self.child.array(scratch)])
        data = _mapped(self._files["data"][0], self._end)
        return pa.Array.from_buffers(self.type, self.length, [validity, offsets, data], null_count=self.null_count)


class ColumnSpool(StagedFile):
    """Streams record batches of one schema into a staged Arrow IPC file with ONE record batch.

    Anonymous memory stays flat in the number of rows: appended batches go to per-column scratch
    files; finishing assembles the record batch over those files memory-mapped and writes it
    (the copy reads file pages and writes file pages). Columns are `string` (int32 offsets): a column
    over 2 GiB of text raises, and would need `large_string` in the schema.
    """

    def __init__(self, path: Path, schema: pa.Schema, *, root: Path | None = None):
        super().__init__(path, root=root)
        self.schema = schema
        self.rows = 0
        self.content_digest: str | None = None  # sha256 of the staged file, set by finish()
        try:
            self._columns = [_ColumnFiles(f.type, self.scratch, f.name) for f in schema]
        except BaseException:
            self.abort()
            raise

    @names_disk_full
    def append(self, batch: pa.RecordBatch | pa.Table) -> None:
        if self.finished:
            raise ValueError(f"{self.path.name}: spool already finished")
        if not batch.schema.equals(self.schema, check_metadata=False):
            batch = batch.select(self.schema.names).cast(self.schema)
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        for b in batches:
            for col, arr in zip(self._columns, b.columns):
                col.append(arr)
            self.rows += b.num_rows

    def _complete(self) -> None:
        arrays = [col.array(self.scratch) for col in self._columns]
        record_batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        try:
            with pa.OSFile(str(self.staged_path), "wb") as sink:
                with ipc.new_file(sink, self.schema) as writer:
                    writer.write_batch(record_batch)
        finally:
            del record_batch, arrays
        self.content_digest = file_digest(self.staged_path)

    def read(self) -> pa.Table:
        """The staged table, memory-mapped (for checks before publishing)."""
        return read_arrow_table(self.finish())


class ArrowFileWriter(StagedFile):
    """Streams tables into a staged Arrow IPC file, one record batch per write (side files written in
    chunk order block by block, e.g. ColBERT vectors); `publish()` renames it into place."""

    def __init__(self, path: Path, schema: pa.Schema, *, root: Path | None = None):
        super().__init__(path, root=root)
        self.schema = schema
        self.rows = 0
        self._sink = self._writer = None
        with abort_on_error(self), naming_disk_full(self.path, root):
            self._sink = pa.OSFile(str(self.staged_path), "wb")
            self._writer = ipc.new_file(self._sink, schema)

    @names_disk_full
    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def _complete(self) -> None:
        self._close()

    def _close(self) -> None:
        writer, sink, self._writer, self._sink = self._writer, self._sink, None, None
        try:
            if writer is not None:
                writer.close()
        finally:
            if sink is not None:
                sink.close()


def write_arrow_table(table: pa.Table, path: Path) -> int:
    """Small-table convenience: one record batch, atomically; returns bytes written."""
    spool = ColumnSpool(path, table.schema)
    with abort_on_error(spool):
        spool.append(table)
    spool.publish()  # aborts itself on failure
    return Path(path).stat().st_size
