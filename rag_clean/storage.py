"""On-disk formats and atomic writes.

Tables are Parquet; embedding matrices are uncompressed Arrow IPC files with one record batch,
so a reader memory-maps them and gets a zero-copy numpy view. Nothing is pickled. Every write
goes to a temp file in the target folder, is fsynced, then renamed: a killed run never leaves a
half file where a reader looks, and the previous materialization survives until the rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

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


# ---------------------------------------------------------------- embeddings


@dataclass
class EmbeddingSet:
    """Row-aligned vectors for a collection; `vectors` may be a read-only memory-mapped view."""

    chunk_ids: list[str]
    content_hashes: list[str]
    vectors: np.ndarray
    metadata: dict[str, str]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.chunk_ids)


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
    Every row must be written exactly once before finish().
    """

    def __init__(self, final_path: Path, chunk_ids: Sequence[str], content_hashes: Sequence[str], dim: int,
                 metadata: Mapping[str, str] | None = None):
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        # A run killed mid-encode leaves its scratch matrix (as large as the output) and staged file here.
        reclaim_stale_temps(self.final_path.parent)
        self.chunk_ids = list(chunk_ids)
        self.content_hashes = list(content_hashes)
        if len(self.chunk_ids) != len(self.content_hashes):
            raise ValueError("chunk_ids and content_hashes differ in length")
        self.dim = int(dim)
        self.metadata = dict(metadata or {})
        n = len(self.chunk_ids)
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
            raise ValueError(f"{len(missing)} rows never written into {self.final_path.name} (first: {self.chunk_ids[missing[0]]})")
        self._scratch.flush()
        staged = temp_path_for(self.final_path)
        flat = pa.array(self._scratch.reshape(-1), type=pa.float32())  # zero-copy over the memmap
        table = pa.table(
            {
                "chunk_id": pa.array(self.chunk_ids, pa.string()),
                "content_hash": pa.array(self.content_hashes, pa.string()),
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


def write_embeddings(path: Path, chunk_ids: Sequence[str], content_hashes: Sequence[str], vectors: np.ndarray,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Small-matrix convenience: write all rows at once, atomically."""
    writer = EmbeddingWriter(path, chunk_ids, content_hashes, vectors.shape[1], metadata)
    try:
        writer.write(np.arange(len(chunk_ids)), np.ascontiguousarray(vectors, dtype=np.float32))
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
    else:
        values = pa.concat_arrays([c.values for c in column.chunks])
    vectors = values.to_numpy(zero_copy_only=len(table) > 0 and column.num_chunks == 1).reshape(len(table), dim)
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return EmbeddingSet(
        chunk_ids=table.column("chunk_id").to_pylist(),
        content_hashes=table.column("content_hash").to_pylist(),
        vectors=vectors,
        metadata=metadata,
    )


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
