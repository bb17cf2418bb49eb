"""On-disk formats and atomic writes: the contract the stages build on.

* Data that flows between stages is file-backed. `chunks` and the embedding matrices are
  uncompressed Arrow IPC files with ONE record batch; readers memory-map them
  (`read_arrow_table`, `read_embeddings`), so every column is one contiguous buffer over file pages:
  slices are zero-copy and a 1M-chunk collection costs page cache, not anonymous memory. Stage code
  works on Arrow columns (slices, `take`, `pyarrow.compute`, numpy views) and converts to Python
  objects only block by block, never a whole column (`.to_pylist()` of a 1M-row column is ~100 MB).
* `ColumnSpool` writes such a table from a stream of record batches without holding it: every
  column's buffers (validity, offsets, data) are appended to scratch files; `finish()` memory-maps
  them, assembles one record batch over those buffers and writes the IPC file.
* `EmbeddingSet` holds `vectors` (zero-copy numpy over the file) and `ids` / `hashes` (zero-copy
  Arrow string arrays); `chunk_ids` / `content_hashes` are Python lists built on first use, kept for
  small callers and tests, not for stage code. `EmbeddingWriter` takes ids and hashes as Arrow arrays
  (e.g. `chunks.column("chunk_id")`) or lists, and streams rows into a memory-mapped scratch matrix.
* Other tables are Parquet (`TableWriter` streams row groups). Nothing is pickled.
* Every write goes to a temp file in the target folder, is fsynced, then renamed: a killed run never
  leaves a half file where a reader looks, and the previous materialization survives until the rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StorageError(ValueError):
    """A stored file is missing, malformed, or a path would leave its root."""


def check_name(name: str, what: str = "collection") -> str:
    """Collection and model names become path components: keep them plain."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise StorageError(
            f"{what} name {name!r} is not allowed: use letters, digits, '.', '_' or '-' (no path separators, no '..')"
        )
    return name


def path_under(root: Path, *parts: str) -> Path:
    """Join parts under root and refuse anything that resolves outside it."""
    root = Path(root).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise StorageError(f"path {path} escapes its root {root}")
    return path


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Temp names carry the writer's pid and a host tag, so a later writer can tell a dead writer's
# leftovers (kill -9 skips every cleanup) from a live writer's file: ".<name>.<pid>@<host>.<hex>.tmp".
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[0-9a-f]{6})\.[0-9a-f]{8}\.tmp$")


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}@{_HOST_TAG}.{uuid.uuid4().hex[:8]}.tmp")


def process_alive(pid: int, not_after: float | None = None) -> bool:
    """Whether `pid` runs and, given `not_after` (a wall-clock time it must have existed at), had started
    by then, so a pid the kernel reused for a newer process does not count. Zombies are dead."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return False
    if not_after is None:
        return True
    try:
        with open("/proc/stat") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime "))
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    return started <= not_after + 2.0  # btime has 1 s resolution


def reclaim_stale_temps(folder: Path) -> list[Path]:
    """Remove temp/scratch files in `folder` left by writers on this host whose process is gone.
    A live writer's file (its pid runs and is older than the file's last write) is never touched."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = _TEMP_NAME.match(entry.name)
            if not match or match["host"] != _HOST_TAG or int(match["pid"]) == os.getpid():
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if not process_alive(int(match["pid"]), not_after=mtime):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def publish(temp: Path, final: Path) -> None:
    """fsync `temp`, then atomically rename it onto `final`."""
    with open(temp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(temp, final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stale_temps(path.parent)
    tmp = temp_path_for(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_table(table: pa.Table, path: Path) -> int:
    """Write a Parquet table atomically; returns bytes written."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path.stat().st_size


def _unreadable(path: Path, what: str, exc: Exception) -> StorageError:
    """One line naming the file, what is wrong and what to do (a raw ArrowInvalid says none of it)."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StorageError(
        f"{path} is not a valid {what} (truncated or corrupt: {detail}): rematerialize the asset that "
        f"writes it for this collection (its asset key is the folder path under the storage root)"
    )


def read_table(path: Path) -> pa.Table:
    if not Path(path).exists():
        raise StorageError(f"{path} does not exist: materialize the upstream asset first")
    try:
        return pq.read_table(path, memory_map=True)
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid / ArrowIOError: bad footer, short read
        raise _unreadable(path, "Parquet file", exc) from exc


class TableWriter:
    """Streams tables into a staged Parquet file beside `final_path`; `publish()` renames it into place.

    Host memory holds one written table at a time, whatever the total size.
    """

    def __init__(self, final_path: Path, schema: pa.Schema):
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale_temps(self.final_path.parent)
        self.schema = schema
        self.staged_path: Path | None = temp_path_for(self.final_path)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(str(self.staged_path), schema, compression="zstd")
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            raise ValueError(f"{self.final_path.name}: writer already closed")
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))
        self.rows += len(table)

    def append_file(self, other: "TableWriter") -> None:
        """Copy another writer's rows in (row group by row group), then remove its file."""
        other.finish()
        for batch in pq.ParquetFile(str(other.staged_path)).iter_batches():
            self._writer.write_batch(batch)
        self.rows += other.rows
        other.abort()

    def finish(self) -> Path:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.staged_path

    def read(self) -> pa.Table:
        return pq.read_table(self.finish())

    def publish(self) -> Path:
        publish(self.finish(), self.final_path)
        self.staged_path = None
        return self.final_path

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.staged_path is not None:
            self.staged_path.unlink(missing_ok=True)
            self.staged_path = None


# ---------------------------------------------------------------- memory-mapped Arrow tables


def read_arrow_table(path: Path) -> pa.Table:
    """Memory-map an Arrow IPC file: the table's buffers are the file's pages (zero-copy, no anon memory)."""
    path = Path(path)
    if not path.exists():
        raise StorageError(f"{path} does not exist: materialize the upstream asset first")
    try:
        return ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, "Arrow IPC file", exc) from exc


def _mapped(path: Path, size: int) -> pa.Buffer:
    """A zero-copy buffer over a scratch file's pages (empty files cannot be mapped)."""
    if size == 0:
        return pa.py_buffer(b"")
    return pa.memory_map(str(path), "r").read_buffer(size)


class _ColumnFiles:
    """The buffers of one Arrow array (and its children), appended to scratch files.

    Supports what the project's tables hold: fixed-width primitives, string/binary (large ones too)
    and lists of those. Validity is spooled as one byte per row and bit-packed at finish."""

    def __init__(self, type_: pa.DataType, scratch: "Callable[[str], Path]", name: str):
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

    def _open(self, scratch, part: str):
        path = scratch(f"{self.name}.{part}")
        fh = open(path, "wb")
        self._files[part] = (path, fh)
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

    def paths(self) -> list[Path]:
        own = [p for p, _ in self._files.values()]
        return own + (self.child.paths() if self.child is not None else [])

    def array(self, scratch) -> pa.Array:
        """The whole column as one Arrow array over memory-mapped scratch files."""
        self.close()
        validity = None
        if self.null_count:
            # One byte per row -> Arrow's bitmap (LSB first), blockwise so memory stays flat.
            src_path = self._files["valid"][0]
            bitmap_path = scratch(f"{self.name}.bitmap")
            self._files["bitmap"] = (bitmap_path, open(bitmap_path, "wb"))
            src = np.memmap(src_path, dtype=np.uint8, mode="r", shape=(self.length,))
            fh = self._fh("bitmap")
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


class ColumnSpool:
    """Streams record batches of one schema into a staged Arrow IPC file with ONE record batch.

    Anonymous memory stays flat in the number of rows: appended batches go to per-column scratch
    files; `finish()` assembles the record batch over those files memory-mapped and writes it
    (the copy reads file pages and writes file pages). `publish()` renames the staged file into place,
    then any side files registered with `add_side_file` (so a side file never describes a file that
    was not published). Columns are `string` (int32 offsets): a column over 2 GiB of text raises,
    and would need `large_string` in the schema.
    """

    def __init__(self, final_path: Path, schema: pa.Schema):
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale_temps(self.final_path.parent)
        self.schema = schema
        self._scratch_paths: list[Path] = []
        self._columns = [_ColumnFiles(f.type, self._scratch, f.name) for f in schema]
        self.rows = 0
        self.staged_path: Path | None = None
        self.content_digest: str | None = None  # sha256 of the staged file, set by finish()
        self._side: list[tuple[Path, Path]] = []

    def _scratch(self, part: str) -> Path:
        path = temp_path_for(self.final_path.with_name(f"{self.final_path.name}.{part}"))
        self._scratch_paths.append(path)
        return path

    def append(self, batch: pa.RecordBatch | pa.Table) -> None:
        if self.staged_path is not None:
            raise ValueError(f"{self.final_path.name}: spool already finished")
        if not batch.schema.equals(self.schema, check_metadata=False):
            batch = batch.select(self.schema.names).cast(self.schema)
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        for b in batches:
            for col, arr in zip(self._columns, b.columns):
                col.append(arr)
            self.rows += b.num_rows

    def finish(self) -> Path:
        if self.staged_path is not None:
            return self.staged_path
        arrays = [col.array(self._scratch) for col in self._columns]
        record_batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        staged = temp_path_for(self.final_path)
        try:
            with pa.OSFile(str(staged), "wb") as sink:
                with ipc.new_file(sink, self.schema) as writer:
                    writer.write_batch(record_batch)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        finally:
            del record_batch, arrays
            self._drop_scratch()
        self.staged_path = staged
        self.content_digest = file_digest(staged)
        return staged

    def read(self) -> pa.Table:
        """The staged table, memory-mapped (for checks before publishing)."""
        return read_arrow_table(self.finish())

    def add_side_file(self, staged: Path, final: Path) -> None:
        """A file published (renamed) right after the main file, e.g. a manifest describing it."""
        self._side.append((Path(staged), Path(final)))

    def publish(self) -> Path:
        publish(self.finish(), self.final_path)
        self.staged_path = None
        for staged, final in self._side:
            final.parent.mkdir(parents=True, exist_ok=True)
            publish(staged, final)
        self._side = []
        return self.final_path

    def abort(self) -> None:
        self._drop_scratch()
        if self.staged_path is not None:
            self.staged_path.unlink(missing_ok=True)
            self.staged_path = None
        for staged, _ in self._side:
            staged.unlink(missing_ok=True)
        self._side = []

    def _drop_scratch(self) -> None:
        for col in self._columns:
            col.close()
        for path in self._scratch_paths:
            path.unlink(missing_ok=True)  # a mapped file stays readable until unmapped
        self._scratch_paths = []


def write_arrow_table(table: pa.Table, path: Path) -> int:
    """Small-table convenience: one record batch, atomically; returns bytes written."""
    spool = ColumnSpool(path, table.schema)
    try:
        spool.append(table)
        spool.publish()
    except BaseException:
        spool.abort()
        raise
    return Path(path).stat().st_size


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


def ids_absent(wanted: set[str], ids: "pa.Array | pa.ChunkedArray") -> set[str]:
    """Which of a few wanted ids (cited by queries, rankings) the ids column (maybe millions) lacks, without a
    Python set of the column: Arrow matches the column against the small set."""
    if not wanted:
        return set()
    import pyarrow.compute as pc

    present = pc.unique(pc.filter(ids, pc.is_in(ids, value_set=pa.array(sorted(wanted), pa.string()))))
    return set(wanted) - set(present.to_pylist())


# ---------------------------------------------------------------- embeddings

Strings = "Sequence[str] | pa.Array | pa.ChunkedArray"


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


def embedding_schema(dim: int, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    return pa.schema(
        [
            ("chunk_id", pa.string()),
            ("content_hash", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ],
        metadata={k: str(v) for k, v in (metadata or {}).items()},
    )


class EmbeddingWriter:
    """Streams batches of rows (in any order) into a staged Arrow IPC file.

    Batches land in a disk-backed scratch matrix, so host memory stays flat in collection size;
    `finish()` turns it into the Arrow file (still staged) and `publish_to()` renames it into place.
    Every row must be written exactly once before finish(). `chunk_ids` / `content_hashes` may be
    Arrow arrays or chunked columns (e.g. `chunks.column("chunk_id")`: written without Python lists)
    or lists.
    """

    def __init__(self, final_path: Path, chunk_ids: Strings, content_hashes: Strings, dim: int,
                 metadata: Mapping[str, str] | None = None):
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        # A run killed mid-encode leaves its scratch matrix (as large as the output) and staged file here.
        reclaim_stale_temps(self.final_path.parent)
        self.ids = as_string_array(chunk_ids)
        self.hashes = as_string_array(content_hashes)
        if len(self.ids) != len(self.hashes):
            raise ValueError("chunk_ids and content_hashes differ in length")
        self.dim = int(dim)
        self.metadata = dict(metadata or {})
        n = len(self.ids)
        self._scratch_path = temp_path_for(self.final_path.with_suffix(".scratch.npy"))
        self._scratch = np.lib.format.open_memmap(self._scratch_path, mode="w+", dtype=np.float32, shape=(n, self.dim))
        self._written = np.zeros(n, dtype=bool)
        self.staged_path: Path | None = None

    def write(self, row_indices: np.ndarray, vectors: np.ndarray) -> None:
        row_indices = np.asarray(row_indices, dtype=np.int64)
        if vectors.shape != (len(row_indices), self.dim):
            raise ValueError(f"batch shape {vectors.shape} != ({len(row_indices)}, {self.dim}) for {self.final_path.name}")
        if self._written[row_indices].any():
            raise ValueError(f"rows written twice into {self.final_path.name}")
        self._scratch[row_indices] = vectors
        self._written[row_indices] = True

    @property
    def rows_written(self) -> int:
        return int(self._written.sum())

    def finish(self) -> Path:
        missing = np.flatnonzero(~self._written)
        if len(missing):
            raise ValueError(f"{len(missing)} rows never written into {self.final_path.name} "
                             f"(first: {self.ids[int(missing[0])].as_py()})")
        self._scratch.flush()
        staged = temp_path_for(self.final_path)
        flat = pa.array(self._scratch.reshape(-1), type=pa.float32())  # zero-copy over the memmap
        table = pa.table(
            {
                "chunk_id": self.ids,
                "content_hash": self.hashes,
                "embedding": pa.FixedSizeListArray.from_arrays(flat, self.dim),
            },
            schema=embedding_schema(self.dim, self.metadata),
        )
        with pa.OSFile(str(staged), "wb") as sink:
            # One record batch: readers get one contiguous buffer to memory-map.
            with ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(len(table), 1))
        del flat, table
        self._drop_scratch()
        self.staged_path = staged
        return staged

    def publish(self) -> Path:
        if self.staged_path is None:
            self.finish()
        publish(self.staged_path, self.final_path)
        self.staged_path = None
        return self.final_path

    def abort(self) -> None:
        self._drop_scratch()
        if self.staged_path is not None:
            self.staged_path.unlink(missing_ok=True)
            self.staged_path = None

    def _drop_scratch(self) -> None:
        self._scratch = None  # dropping the last reference unmaps it
        self._scratch_path.unlink(missing_ok=True)


def write_embeddings(path: Path, chunk_ids: Strings, content_hashes: Strings, vectors: np.ndarray,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Small-matrix convenience: write all rows at once, atomically."""
    writer = EmbeddingWriter(path, chunk_ids, content_hashes, vectors.shape[1], metadata)
    try:
        writer.write(np.arange(len(writer.ids)), np.ascontiguousarray(vectors, dtype=np.float32))
        writer.finish()
        return writer.publish()
    except BaseException:
        writer.abort()
        raise


def read_embeddings(path: Path) -> EmbeddingSet:
    """Memory-map an embeddings file; `vectors` is a zero-copy read-only view."""
    path = Path(path)
    if not path.exists():
        raise StorageError(f"{path} does not exist: materialize the upstream asset first")
    try:
        source = pa.memory_map(str(path), "r")
        table = ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, "Arrow IPC embeddings file", exc) from exc
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


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
