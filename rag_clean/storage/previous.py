"""The one reader of previous rows: (stored file, what must match) -> reusable rows, or why there are none.

Every stage keyed by (model fingerprint, content hash) asks it the same question: may rows of the file
it is about to replace stand for current chunks? The answer is `PreviousRows`: the current rows that
have a stored row with the same content hash, that stored row, the opened file (to copy rows from),
and, when nothing is reusable, why (`why` is a short code a stage words its own message from):

    absent        no file (a first run, or reuse is off)
    unreadable    the file cannot be read (`error` says why)
    no_hashes     the file predates content hashes (no content_hash column)
    missing_columns  it lacks other columns the stage needs (`detail` lists them)
    other_config  its schema metadata differs from `expect` (another model, weights, pruning, ...)

Embedding matrices (.arrow with chunk_id / content_hash / embedding) are memory-mapped
(`opened` is an EmbeddingSet); other Arrow IPC files are read as a table; Parquet files are matched
row group by row group without loading their rows (rag_clean.storage.reuse.match_parquet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from rag_clean.storage.embeddings import EmbeddingSet, read_embeddings
from rag_clean.storage.errors import StorageError
from rag_clean.storage.reuse import HashColumn, match_parquet, match_rows

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class PreviousRows:
    path: Path | None
    current: np.ndarray = field(default_factory=lambda: _EMPTY.copy())   # current rows with a stored row
    stored: np.ndarray = field(default_factory=lambda: _EMPTY.copy())    # that row's number in the file
    why: str | None = "absent"        # None: the file matched (its rows may still be none of the current)
    detail: str = ""
    error: Exception | None = None
    opened: EmbeddingSet | pa.Table | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def matched(self) -> bool:
        """The file was read and is of the expected configuration."""
        return self.why is None

    def __len__(self) -> int:
        return len(self.current)


def _metadata(schema: pa.Schema) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def _open(path: Path, whole: bool) -> tuple[pa.Schema, EmbeddingSet | pa.Table | None]:
    if path.suffix == ".parquet":
        if whole:
            table = pq.read_table(path)
            return table.schema, table
        return pq.read_schema(path), None
    table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    if table.schema.names[:3] == ["chunk_id", "content_hash", "embedding"]:
        return table.schema, read_embeddings(path)
    return table.schema, table


def read_previous(path: Path | None, expect: Mapping[str, str], hashes: HashColumn | None = None, *,
                  dim: int | None = None, keep: Callable[[pa.RecordBatch], np.ndarray] | None = None,
                  columns: Sequence[str] = (), required: Sequence[str] = ()) -> PreviousRows:
    """The rows of `path` that current chunks (`hashes`, their content_hash column) may reuse.

    `expect`: schema metadata the file must carry (e.g. {"fingerprint": ...}); `dim`: the vector width an
    embedding file must have. `keep(batch)` (Parquet only, with `columns` read beside content_hash) limits
    which stored rows may match; `required`: columns the file must have besides content_hash. Without
    `hashes` the file is only checked and opened whole (keyed caches)."""
    if path is None or not Path(path).exists():
        return PreviousRows(path)
    path = Path(path)
    try:
        schema, opened = _open(path, whole=hashes is None)
    except (OSError, pa.ArrowException, StorageError) as exc:
        return PreviousRows(path, why="unreadable", error=exc)
    metadata = _metadata(schema)
    if hashes is not None and "content_hash" not in schema.names:
        return PreviousRows(path, why="no_hashes", metadata=metadata)
    lacking = sorted(set(required) - set(schema.names))
    if lacking:
        return PreviousRows(path, why="missing_columns", detail=str(lacking), metadata=metadata)
    if any(metadata.get(k) != v for k, v in expect.items()) or \
            (dim is not None and isinstance(opened, EmbeddingSet) and opened.dim != dim):
        return PreviousRows(path, why="other_config", metadata=metadata)
    rows = PreviousRows(path, why=None, opened=opened, metadata=metadata)
    if hashes is None:
        return rows
    try:
        if opened is None:
            rows.current, rows.stored = match_parquet(hashes, path, keep=keep, columns=columns)
        else:
            stored = opened.hashes if isinstance(opened, EmbeddingSet) else opened.column("content_hash")
            rows.current, rows.stored = match_rows(hashes, stored)
    except (OSError, pa.ArrowException) as exc:
        return PreviousRows(path, why="unreadable", error=exc)
    return rows
