"""The old embedder's export files, written from stored assets (the `exports` stage).

Under `<export_dir>/<collection>/`:

  <collection>_embeddings.npy            fused vectors, float32 (chunks x fused dim), chunk order
  <collection>_<model>_embeddings.npy    one per dense model of the ensemble, float32
  <collection>_qdrant.jsonl              one {"id", "payload", "vectors"} per chunk, chunk order
  <collection>_sparse.jsonl              one {"chunk_id", "model", "indices", "values", "fallback"} per chunk
                                         and sparse model (only when the sparse stage ran)
  <collection>_metadata.json             chunk ids and metadata in row order, models, fusion, file list
  <collection>_stats.json                norms and sparsity per model
  <collection>_processing_summary.json   copy of the telemetry summary

Row i of every matrix is chunk i of the `chunks` table. Every file is written to a temp file beside
it and renamed into place. Everything streams in row blocks (a .npy header, then its rows; JSONL lines
block by block) from the memory-mapped stored vectors, so host memory stays flat in collection size.
No query text is ever read here.

Reuse: formatting floats is what JSONL lines cost. Each qdrant/sparse line gets a key, a hash of
everything the line is made of (point id, payload, the bytes of every vector in it); a line index side
file (`StorageLayout.export_line_index`) keeps each key's byte range in the file written last. A line
whose key is there is copied from the previous file instead of formatted: the output is byte for byte
what a full export writes. The index is trusted only while that file has the size and mtime it recorded.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rag_clean.telemetry.records import ExportsRecord, ReuseCount
from rag_clean.chunking.duplicates import duplicate_id_rows
from rag_clean.storage.atomic import atomic_path, write_json
from rag_clean.storage.digests import file_digest
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.storage.errors import StorageError
from rag_clean.storage.names import check_name, path_under
from rag_clean.storage.parquet import write_table

TEXT_PREVIEW_CHARS = 500
EXPORT_BLOCK_ROWS = 4096
FUSED_VECTOR_NAME = "fused"
SPARSE_VECTOR_NAME = "sparse"
# Fixed namespace: the same (collection, chunk_id) always gets the same point id, across runs and machines.
POINT_ID_NAMESPACE = uuid.UUID("5b0d7f3e-8f1c-4c55-9a57-3f1f4d2e6a10")

FILES_SCHEMA = pa.schema([("name", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string())])
LINE_KEY_BYTES = 16
LINE_INDEX_VERSION = "export-lines/1"


class ExportError(StorageError):
    """Stored assets do not line up (other chunks, other order) or a name cannot become a file name."""


def point_id(collection: str, chunk_id: str) -> str:
    """Qdrant accepts only unsigned integers or UUIDs as point ids: a UUIDv5 of collection and chunk_id."""
    return str(uuid.uuid5(POINT_ID_NAMESPACE, f"{collection}/{chunk_id}"))


def model_file_part(model: str) -> str:
    """A model name as it appears in a file name ('BAAI/bge-m3' -> 'BAAI_bge-m3')."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._")
    if not part:
        raise ExportError(f"model name {model!r} gives an empty file name part")
    return part


@dataclass(frozen=True)
class ExportFiles:
    """Where each export file of one collection goes."""

    folder: Path
    collection: str

    def _f(self, suffix: str) -> Path:
        return self.folder / f"{self.collection}_{suffix}"

    @property
    def fused(self) -> Path:
        return self._f("embeddings.npy")

    def model(self, name: str) -> Path:
        return self._f(f"{model_file_part(name)}_embeddings.npy")

    @property
    def qdrant(self) -> Path:
        return self._f("qdrant.jsonl")

    @property
    def sparse(self) -> Path:
        return self._f("sparse.jsonl")

    @property
    def metadata(self) -> Path:
        return self._f("metadata.json")

    @property
    def stats(self) -> Path:
        return self._f("stats.json")

    @property
    def summary(self) -> Path:
        return self._f("processing_summary.json")


def export_files(export_dir: Path, collection: str) -> ExportFiles:
    return ExportFiles(path_under(Path(export_dir), check_name(collection)), collection)


# ---------------------------------------------------------------- inputs


def _ids(emb: EmbeddingSet, column: str) -> pa.ChunkedArray:
    arrow = getattr(emb, "ids" if column == "chunk_id" else "hashes", None)  # zero-copy where EmbeddingSet has them
    if arrow is None:
        arrow = pa.array(emb.chunk_ids if column == "chunk_id" else emb.content_hashes, pa.string())
    arrow = arrow if isinstance(arrow, pa.ChunkedArray) else pa.chunked_array([arrow])
    return arrow.cast(pa.string())


def _check_aligned(name: str, emb: EmbeddingSet, chunks: pa.Table) -> None:
    if len(emb) != chunks.num_rows or not all(
            _ids(emb, c).equals(chunks.column(c).cast(pa.string())) for c in ("chunk_id", "content_hash")):
        raise ExportError(f"{name} was computed for other chunks than the current `chunks` "
                          f"({len(emb)} rows vs {chunks.num_rows}); rematerialize it before exporting")


SPARSE_COLUMNS = ["chunk_id", "term_ids", "weights", "fallback"]


@dataclass
class _SparseModelRows:
    """One model's sparse rows in chunk order, handed out in blocks: from an in-memory table, or streamed
    from the Parquet file (row groups) when the file holds them in chunk order (what the sparse stage writes)."""

    model: str
    table: pa.Table | None = None
    file: pq.ParquetFile | None = None
    rows: int = 0

    def blocks(self, block_rows: int) -> Iterator[pa.Table]:
        if self.table is not None:
            for start in range(0, self.table.num_rows, block_rows):
                yield self.table.slice(start, block_rows)
            return
        pending: list[pa.Table] = []
        count = 0
        for sub in _model_batches(self.file, self.model, SPARSE_COLUMNS, block_rows):
            pending.append(sub)
            count += sub.num_rows
            while count >= block_rows:
                joined = pa.concat_tables(pending)
                yield joined.slice(0, block_rows)
                rest = joined.slice(block_rows)
                pending, count = ([rest] if rest.num_rows else []), rest.num_rows
        if count:
            yield pa.concat_tables(pending)


def _model_batches(file: pq.ParquetFile, model: str, columns: list[str], block_rows: int) -> Iterator[pa.Table]:
    for batch in file.iter_batches(batch_size=block_rows, columns=[*columns, "model"]):
        same = pc.equal(batch.column("model"), model)
        if not pc.any(same).as_py():
            continue
        sub = batch if pc.all(same).as_py() else batch.filter(same)
        yield pa.Table.from_batches([sub]).select(columns)


def _in_chunk_order(file: pq.ParquetFile, model: str, chunks: pa.Table, block_rows: int) -> bool:
    """Whether the file holds exactly one row per chunk for `model`, in chunk order (ids only are read)."""
    ids, cursor = chunks.column("chunk_id").cast(pa.string()), 0
    for sub in _model_batches(file, model, ["chunk_id"], block_rows):
        n = sub.num_rows
        if cursor + n > len(ids) or not sub.column("chunk_id").cast(pa.string()).equals(ids.slice(cursor, n)):
            return False
        cursor += n
    return cursor == len(ids)


def _sparse_by_model(sparse: "pa.Table | pq.ParquetFile", models: Sequence[str], chunks: pa.Table,
                     block_rows: int = EXPORT_BLOCK_ROWS) -> list[_SparseModelRows]:
    """Each model's rows in chunk order. A Parquet file whose rows are in chunk order is streamed; rows
    stored in another order are put in order by an Arrow join on chunk_id (that model's rows in memory)."""
    out = []
    ids = chunks.column("chunk_id").cast(pa.string())
    value_set = ids.combine_chunks()
    for model in models:
        if isinstance(sparse, pq.ParquetFile):
            if _in_chunk_order(sparse, model, chunks, max(block_rows, 65536)):
                out.append(_SparseModelRows(model, file=sparse, rows=len(ids)))
                continue
            parts = list(_model_batches(sparse, model, SPARSE_COLUMNS, 65536))
            sub = pa.concat_tables(parts) if parts else pa.table(
                {c: pa.array([], sparse.schema_arrow.field(c).type) for c in SPARSE_COLUMNS})
        else:
            sub = sparse.filter(pc.equal(sparse.column("model"), model)).select(SPARSE_COLUMNS)
        if not (sub.num_rows == len(ids) and sub.column("chunk_id").cast(pa.string()).equals(ids)):
            position = pc.index_in(sub.column("chunk_id").cast(pa.string()), value_set=value_set)
            pos = position.fill_null(-1).to_numpy(zero_copy_only=False)
            covered = np.zeros(len(ids), bool)
            covered[pos[pos >= 0]] = True
            if not covered.all() or sub.num_rows != len(ids):
                missing = take_ids(chunks, np.flatnonzero(~covered)[:3])
                raise ExportError(f"sparse_vectors for model {model!r} does not cover the current chunks "
                                  f"(missing e.g. {missing}); rematerialize sparse_vectors before exporting")
            sub = sub.take(pa.array(np.argsort(pos, kind="stable")))
        out.append(_SparseModelRows(model, table=sub, rows=sub.num_rows))
    return out


def take_ids(chunks: pa.Table, rows) -> list[str]:
    return chunks.column("chunk_id").take(pa.array(np.asarray(rows, np.int64))).to_pylist() if len(rows) else []


# ---------------------------------------------------------------- writers


def _write_npy(path: Path, emb: EmbeddingSet, block_rows: int) -> dict:
    """Stream a stored matrix into a .npy (header, then row blocks; temp file, then rename) and measure its
    norms on the way."""
    n, dim = len(emb), emb.dim
    norms = np.empty(n, dtype=np.float64)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                  "fortran_order": False, "shape": (n, dim)})
        for start in range(0, n, block_rows):
            block = np.ascontiguousarray(emb.vectors[start:start + block_rows], dtype="<f4")
            fh.write(block.tobytes())
            norms[start:start + len(block)] = np.linalg.norm(block.astype(np.float64), axis=1)
    return {
        "rows": n,
        "dim": dim,
        "norm": {"min": float(norms.min()) if n else 0.0, "mean": float(norms.mean()) if n else 0.0,
                 "max": float(norms.max()) if n else 0.0},
    }


def _chunk_metadata(row: Mapping) -> dict:
    """The chunk's original metadata plus the fields the chunks table keeps in columns."""
    try:
        original = json.loads(row["metadata_json"] or "{}")
    except ValueError as exc:
        raise ExportError(f"chunk {row['chunk_id']!r}: metadata_json is not valid JSON: {exc}") from exc
    base = {
        "chunk_id": row["chunk_id"],
        "source_file": row["source_file"],
        "chunk_index": row["chunk_index"],
        "heading_text": row["heading"],
        "section_path": row["section_path"],
        "token_count": row["token_count"],
        "content_hash": row["content_hash"],
    }
    return {**base, **original} if isinstance(original, dict) else {**base, "original": original}


def _row_blocks(chunks: pa.Table, block_rows: int) -> Iterator[tuple[int, list[dict]]]:
    for start in range(0, chunks.num_rows, block_rows):
        yield start, chunks.slice(start, block_rows).to_pylist()


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _jsonl(fh: IO[str], obj: dict) -> None:
    fh.write(_dumps(obj) + "\n")


def _sparse_vector(term_ids: list[int], weights: list[float]) -> dict:
    return {"indices": [int(t) for t in term_ids], "values": [float(w) for w in weights]}


class _FlatLists:
    """A block of list<...> rows as flat numpy values + offsets: row i's raw bytes without Python lists."""

    def __init__(self, column):
        lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        self.lengths = lengths

    def row_bytes(self, i: int) -> bytes:
        return self.values[self.offsets[i]:self.offsets[i + 1]].tobytes()


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
        except (pa.ArrowException, OSError):
            return  # only a cache: the lines are formatted again
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        st = file.stat()
        if meta.get("version") != LINE_INDEX_VERSION or meta.get("file") != file.name or \
                meta.get("size") != str(st.st_size) or meta.get("mtime_ns") != str(st.st_mtime_ns) or not st.st_size:
            return
        keys = table.column("key").combine_chunks()
        raw = np.frombuffer(keys.buffers()[1], dtype=f"S{LINE_KEY_BYTES}", count=len(keys), offset=keys.offset * LINE_KEY_BYTES)
        order = np.argsort(raw, kind="stable")
        self.keys = raw[order]
        self.offsets = table.column("offset").to_numpy()[order]
        self.lengths = table.column("length").to_numpy()[order]
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


class _LineFile:
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


def _key(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=LINE_KEY_BYTES)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _sparse_names(models: Sequence[str]) -> dict[str, str]:
    """Named sparse vector per model: "sparse" for a single model, "sparse_<model>" for several."""
    if len(models) == 1:
        return {models[0]: SPARSE_VECTOR_NAME}
    return {m: f"{SPARSE_VECTOR_NAME}_{model_file_part(m)}" for m in models}


def write_exports(
    export_dir: Path,
    collection: str,
    chunks: pa.Table,
    dense: Mapping[str, EmbeddingSet],
    fused: EmbeddingSet,
    *,
    fusion: Mapping | None = None,
    sparse: "pa.Table | pq.ParquetFile | None" = None,
    sparse_models: Sequence[str] = (),
    summary: Mapping | Callable[[dict], Mapping] | None = None,
    block_rows: int = EXPORT_BLOCK_ROWS,
    line_index: Callable[[str], Path] | None = None,
) -> tuple[pa.Table, ExportsRecord]:
    """Write every export file of one collection; returns (files table: name, bytes, sha256; stage record).

    `dense` maps model name -> stored vectors (the fused ensemble, in fusion order); `sparse` is the
    stored sparse_vectors table, or None when the sparse stage did not run (then no sparse file is
    written and a stale one from an earlier export is removed, so the folder describes this run).
    `summary` is the processing summary to copy, or a function that gets this stage's record so far
    and returns it (so the copy can include the export span). `line_index(file kind)`: where the JSONL
    line index of "qdrant" / "sparse" lives (StorageLayout.export_line_index); None: no line reuse.
    """
    if block_rows <= 0:
        raise ValueError("block_rows must be > 0")
    files = export_files(export_dir, collection)
    files.folder.mkdir(parents=True, exist_ok=True)
    if duplicate_id_rows(chunks.column("chunk_id")):  # streaming check: no set of every id
        raise ExportError(f"collection {collection!r}: chunk ids are not unique; cannot export")
    if not dense:
        raise ExportError(f"collection {collection!r}: no dense model vectors to export")
    for name, emb in dense.items():
        _check_aligned(f"dense_embeddings/{name}", emb, chunks)
    _check_aligned("fused_embeddings", fused, chunks)
    sparse_rows = _sparse_by_model(sparse, list(sparse_models), chunks, block_rows) \
        if sparse is not None and sparse_models else []
    sparse_names = _sparse_names([s.model for s in sparse_rows]) if sparse_rows else {}
    collision = set(sparse_names.values()) & (set(dense) | {FUSED_VECTOR_NAME})
    if FUSED_VECTOR_NAME in dense or collision:
        raise ExportError(f"a model is named like a reserved vector name ({FUSED_VECTOR_NAME!r} / {sorted(collision)})")

    written: list[Path] = []
    reuse: dict[str, ReuseCount] = {}
    stats: dict = {"collection": collection, "chunk_count": chunks.num_rows, "dense": {}, "fused": {}, "sparse": {}}

    # 1. Matrices.
    stats["fused"] = _write_npy(files.fused, fused, block_rows)
    written.append(files.fused)
    model_files = {}
    for name, emb in dense.items():
        path = files.model(name)
        if path in model_files.values() or path == files.fused:
            raise ExportError(f"model {name!r}: its export file name {path.name} collides with another file")
        stats["dense"][name] = _write_npy(path, emb, block_rows)
        model_files[name] = path
        written.append(path)

    # 2. Sparse rows, one line per (chunk, model).
    if sparse_rows:
        lines = _LineFile(files.sparse, line_index("sparse") if line_index else None)
        try:
            with atomic_path(files.sparse) as tmp, open(tmp, "wb") as fh:
                for rows in sparse_rows:
                    nnz_total = nnz_max = available = fallback_rows = 0
                    for block in rows.blocks(block_rows):
                        terms, weights = _FlatLists(block.column("term_ids")), _FlatLists(block.column("weights"))
                        fallback = block.column("fallback").to_numpy(zero_copy_only=False).astype(bool)
                        ids = block.column("chunk_id").to_pylist()
                        model = rows.model.encode()
                        keys = [_key(b"sparse", ids[i].encode(), model, terms.row_bytes(i), weights.row_bytes(i),
                                     bytes([int(fallback[i])])) for i in range(block.num_rows)]
                        pylist: list = []

                        def line(i, block=block, pylist=pylist, model=rows.model):
                            if not pylist:  # formatted only when some line of the block is not reused
                                pylist.extend(block.select(["term_ids", "weights"]).to_pylist())
                            return _dumps({"chunk_id": ids[i], "model": model,
                                           **_sparse_vector(pylist[i]["term_ids"], pylist[i]["weights"]),
                                           "fallback": bool(fallback[i])})
                        lines.write_block(fh, keys, line)
                        nnz_total += int(terms.lengths.sum())
                        nnz_max = max(nnz_max, int(terms.lengths.max()) if len(terms.lengths) else 0)
                        available += int((terms.lengths > 0).sum())
                        fallback_rows += int(fallback.sum())
                    n_rows = rows.rows
                    stats["sparse"][rows.model] = {
                        "rows": n_rows, "available": available,
                        "nnz_mean": float(nnz_total / n_rows) if n_rows else 0.0, "nnz_max": nnz_max,
                        "fallback_rows": fallback_rows,
                    }
        except BaseException:
            lines.abort()
            raise
        lines.finish()
        reuse["sparse_lines"] = ReuseCount(lines.reused, lines.computed, "lines")
        written.append(files.sparse)

    # 3. Qdrant points: one per chunk, named vectors per dense model + fused (+ sparse).
    lines = _LineFile(files.qdrant, line_index("qdrant") if line_index else None)
    names = [n.encode() for n in dense] + [FUSED_VECTOR_NAME.encode()]
    try:
        with atomic_path(files.qdrant) as tmp, open(tmp, "wb") as fh:
            sparse_iters = [s.blocks(block_rows) for s in sparse_rows]  # one reader per model, in step
            for start, block in _row_blocks(chunks, block_rows):
                sparse_blocks = [next(it) for it in sparse_iters]
                stop = start + len(block)
                vector_blocks = [np.ascontiguousarray(emb.vectors[start:stop], dtype="<f4") for emb in dense.values()]
                vector_blocks.append(np.ascontiguousarray(fused.vectors[start:stop], dtype="<f4"))
                sparse_flat = [(sparse_names[s.model].encode(), _FlatLists(b.column("term_ids")), _FlatLists(b.column("weights")))
                               for s, b in zip(sparse_rows, sparse_blocks)]
                heads, keys = [], []
                for i, row in enumerate(block):
                    payload = {"chunk_id": row["chunk_id"], "collection": collection,
                               "text_preview": row["text"][:TEXT_PREVIEW_CHARS], "metadata": _chunk_metadata(row)}
                    head = '{"id":' + _dumps(point_id(collection, row["chunk_id"])) + ',"payload":' + _dumps(payload)
                    heads.append(head)
                    parts = [b"qdrant", head.encode()]
                    for name, vec in zip(names, vector_blocks):
                        parts += [name, vec[i].tobytes()]
                    for name, t, w in sparse_flat:
                        parts += [name, t.row_bytes(i), w.row_bytes(i)]
                    keys.append(_key(*parts))

                sparse_lists: dict = {}

                def line(i, heads=heads, vector_blocks=vector_blocks, lists=sparse_lists, sblocks=sparse_blocks):
                    vectors = {name: vec[i].tolist() for name, vec in zip(dense, vector_blocks)}
                    vectors[FUSED_VECTOR_NAME] = vector_blocks[-1][i].tolist()
                    for s, b in zip(sparse_rows, sblocks):
                        if s.model not in lists:  # read only when some line of the block is formatted
                            lists[s.model] = b.select(["term_ids", "weights"]).to_pylist()
                        r = lists[s.model][i]
                        vectors[sparse_names[s.model]] = _sparse_vector(r["term_ids"], r["weights"])
                    return heads[i] + ',"vectors":' + _dumps(vectors) + "}"
                lines.write_block(fh, keys, line)
    except BaseException:
        lines.abort()
        raise
    lines.finish()
    reuse["qdrant_lines"] = ReuseCount(lines.reused, lines.computed, "lines")
    written.append(files.qdrant)

    # 4. Metadata: row order, models, fusion, which named vectors exist. Streamed: one chunk per line.
    head = {
        "collection": collection,
        "chunk_count": chunks.num_rows,
        "row_order": "row i of every .npy and line i of the qdrant file is chunks[i]",
        "fused": {"file": files.fused.name, "dim": fused.dim, **({k: fusion[k] for k in fusion} if fusion else {})},
        "models": {name: {"file": model_files[name].name, "dim": emb.dim, "vector_name": name}
                   for name, emb in dense.items()},
        "sparse": {m: {"file": files.sparse.name, "vector_name": v} for m, v in sparse_names.items()},
        "point_id": "uuid5(POINT_ID_NAMESPACE, '<collection>/<chunk_id>')",
        "point_id_namespace": str(POINT_ID_NAMESPACE),
    }
    with atomic_path(files.metadata) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(head, indent=2, ensure_ascii=False)[:-2] + ',\n  "chunks": [\n')
        first = True
        for start, block in _row_blocks(chunks, block_rows):
            for i, row in enumerate(block):
                entry = {"index": start + i, "id": point_id(collection, row["chunk_id"]),
                         "chunk_id": row["chunk_id"], "metadata": _chunk_metadata(row)}
                fh.write(("" if first else ",\n") + "    " + json.dumps(entry, ensure_ascii=False))
                first = False
        fh.write("\n  ]\n}\n")
    written.append(files.metadata)

    # 5. Stats, then the summary copy (last, so it can describe this export too).
    write_json(files.stats, stats)
    written.append(files.stats)
    record = ExportsRecord(rows=chunks.num_rows, export_dir=str(files.folder), models=list(dense),
                           sparse_models=[s.model for s in sparse_rows], reuse_counts=reuse)
    if summary is not None:
        partial = dict(record.stage_fields(), stage=record.stage, rows=record.rows, status=record.status,
                       files=[p.name for p in written])
        content = summary(partial) if callable(summary) else summary
        write_json(files.summary, content)
        written.append(files.summary)

    record.removed_stale = _remove_stale(files, {p.name for p in written})
    table = pa.table({"name": [p.name for p in written], "bytes": [p.stat().st_size for p in written],
                      "sha256": [file_digest(p) for p in written]}, schema=FILES_SCHEMA)
    record.files = table.to_pylist()
    return table, record


def _remove_stale(files: ExportFiles, keep: set[str]) -> list[str]:
    """Drop export files of this collection that this run did not write (a model left the ensemble,
    sparse was turned off), so the folder never mixes two runs. Only our own file names are touched."""
    removed = []
    own = [f"{files.collection}_sparse.jsonl", f"{files.collection}_processing_summary.json"]
    candidates = [files.folder / n for n in own]
    candidates += [p for p in files.folder.glob(f"{files.collection}_*_embeddings.npy")]
    for path in candidates:
        if path.name not in keep and path.is_file():
            path.unlink()
            removed.append(path.name)
    return sorted(removed)
