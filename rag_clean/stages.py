"""Each pipeline stage as a plain function: inputs in, (value, stage record) out.

The Dagster assets are thin wrappers over these, and the same functions run on a GPU box with
no Dagster. Records hold measured values only; the telemetry layer turns them into the summary.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from rag_clean.encoders.base import EncodeStats
from rag_clean.fusion import fuse_block, fuse_queries, fused_dim, truncate_and_normalize
from rag_clean.registry import ModelSpec, Registry
from rag_clean.retrieval import (
    RERANKED_SCHEMA,
    Query,
    SparseIndex,
    dense_search,
    ranking_metrics,
    reciprocal_rank_fusion,
)
from rag_clean.storage import (
    EmbeddingSet,
    EmbeddingWriter,
    StorageError,
    TableWriter,
    check_name,
    path_under,
    publish,
    temp_path_for,
)

log = logging.getLogger(__name__)

FUSION_BLOCK_ROWS = 65536


def _encode_record(stats: EncodeStats) -> dict:
    return {
        "encode": stats.to_dict(),
        "batch_seconds": [round(b.seconds, 6) for b in stats.batches],
        "batch_items": [b.items for b in stats.batches],
    }


def model_fingerprint(spec: ModelSpec) -> str:
    """What must match for stored vectors of an unchanged chunk to be reused."""
    return json.dumps({"backend": spec.backend, "source": spec.source, "pooling": spec.pooling,
                       "max_length": spec.max_length, "dim": spec.dim, "truncate_dim": spec.truncate_dim},
                      sort_keys=True)


# ---------------------------------------------------------------- dense


def run_dense_stage(spec: ModelSpec, chunks: pa.Table, device: str | list[str], staging_path: Path, *,
                    previous: EmbeddingSet | None = None, budget_store=None, token_budget: int | None = None,
                    joint: JointOutputs | None = None) -> tuple[EmbeddingWriter, dict]:
    """Embed every chunk with one model (reusing vectors of unchanged chunks), streaming to a staged file.

    The model is loaded, used and released inside this call: one model resident at a time.
    With `joint` (a bge-m3 entry, see plan_joint_outputs) the same forward pass also yields the partner
    sparse model's lexical rows and/or ColBERT vectors, written to side files published before returning.
    """
    from rag_clean.encoders.factory import load_dense_encoder

    chunk_ids = chunks.column("chunk_id").to_pylist()
    hashes = chunks.column("content_hash").to_pylist()
    texts = chunks.column("text")
    fingerprint = model_fingerprint(spec)
    out_dim = spec.output_dim

    reuse_rows: dict[int, int] = {}
    if previous is not None and previous.metadata.get("fingerprint") == fingerprint and (out_dim is None or previous.dim == out_dim):
        by_hash = {h: i for i, h in enumerate(previous.content_hashes)}
        reuse_rows = {i: by_hash[h] for i, h in enumerate(hashes) if h in by_hash}
    to_compute = np.array([i for i in range(len(chunk_ids)) if i not in reuse_rows], dtype=np.int64)

    side = _JointSideFiles(spec, joint, chunk_ids, hashes) if joint is not None and joint.active else None
    # Rows the forward pass runs over: the dense rows to compute, plus unchanged chunks whose side rows
    # (lexical / ColBERT) the previous side files lack. Dense vectors of the latter stay the reused ones.
    pass_rows = to_compute
    if side is not None:
        side.load_previous([i for i in reuse_rows])
        pass_rows = np.union1d(to_compute, np.fromiter(side.missing, dtype=np.int64, count=len(side.missing)))
    computes_dense = np.zeros(len(chunk_ids), dtype=bool)
    computes_dense[to_compute] = True

    writer: EmbeddingWriter | None = None
    stats = None
    native_dim = spec.dim
    try:
        if len(pass_rows):
            encoder = _load_joint_encoder(spec, joint, device) if side is not None else \
                load_dense_encoder(spec, device, budget_store=budget_store, token_budget=token_budget)
            try:
                native_dim = encoder.dim
                if spec.dim is not None and encoder.dim != spec.dim:
                    raise StorageError(f"model {spec.name}: produces {encoder.dim}-d vectors, registry says dim={spec.dim}")
                out_dim = spec.truncate_dim or encoder.dim
                writer = EmbeddingWriter(staging_path, chunk_ids, hashes, out_dim,
                                         {"model": spec.name, "fingerprint": fingerprint, "normalized": "l2"})
                subset = texts.take(pa.array(pass_rows)).to_pylist()
                if side is None:
                    for local_idx, vectors in encoder.encode(subset):
                        writer.write(pass_rows[local_idx], truncate_and_normalize(vectors, spec.truncate_dim, model=spec.name))
                else:
                    side.loaded_source = encoder.source
                    for local_idx, vectors, sparse_rows, colbert_rows in encoder.encode_joint(subset):
                        rows = pass_rows[local_idx]
                        dense_mask = computes_dense[rows]
                        if dense_mask.any():
                            writer.write(rows[dense_mask], truncate_and_normalize(vectors[dense_mask], spec.truncate_dim,
                                                                                  model=spec.name))
                        side.write(rows, sparse_rows, colbert_rows)
                stats = encoder.stats
            finally:
                encoder.close()  # released before the next model of the ensemble hydrates
        else:
            out_dim = previous.dim
            writer = EmbeddingWriter(staging_path, chunk_ids, hashes, out_dim,
                                     {"model": spec.name, "fingerprint": fingerprint, "normalized": "l2"})
        if reuse_rows:
            dst = np.fromiter(reuse_rows.keys(), dtype=np.int64)
            src = np.fromiter(reuse_rows.values(), dtype=np.int64)
            for start in range(0, len(dst), FUSION_BLOCK_ROWS):
                writer.write(dst[start:start + FUSION_BLOCK_ROWS], np.asarray(previous.vectors[src[start:start + FUSION_BLOCK_ROWS]]))
        writer.finish()
        if side is not None:
            # Published now, not with the dense file (the IO manager publishes that after this returns). If
            # that later publish fails, this cache stays; the sparse stage checks it row by row against the
            # current chunks' content hashes and the model fingerprint, so it can never serve stale rows.
            side.finish(exclude=pass_rows)
    except BaseException:
        if writer is not None:
            writer.abort()
        if side is not None:
            side.abort()
        raise

    record = {
        "stage": "dense",
        "model": spec.name,
        "rows": len(chunk_ids),
        "dim": out_dim,
        "native_dim": native_dim,
        "weight": spec.weight,
        "reuse": {"reused": len(reuse_rows), "computed": int(len(to_compute))},
        "exclusive": True,
    }
    if side is not None:
        record["joint"] = side.record(extra_pass_rows=int(len(pass_rows) - len(to_compute)))
    if stats is not None:
        record.update(_encode_record(stats))
        record["device"] = stats.device
    return writer, record


# ---------------------------------------------------------------- bge-m3: one pass for dense + sparse (+ ColBERT)

# The lexical rows of a joint pass: a cache beside sparse_vectors, keyed by content hash, not an asset.
JOINT_SPARSE_SCHEMA = pa.schema([
    ("chunk_id", pa.string()),
    ("content_hash", pa.string()),
    ("term_ids", pa.list_(pa.int32())),
    ("weights", pa.list_(pa.float32())),
])
JOINT_DIR = "_joint"  # not a valid collection name (check_name), so it never clashes with sparse_vectors/<collection>


def colbert_schema(dim: int, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    return pa.schema([
        ("chunk_id", pa.string()),
        ("content_hash", pa.string()),
        ("token_vectors", pa.list_(pa.list_(pa.float32(), dim))),
    ], metadata={k: str(v) for k, v in (metadata or {}).items()})


def sparse_fingerprint(spec: ModelSpec) -> str:
    """What must match for stored lexical rows to stand for `spec`'s output (weights, tokens, pruning)."""
    return json.dumps({"backend": spec.backend, "source": spec.source, "fallbacks": list(spec.fallbacks),
                       "flag_class": spec.flag_class, "max_length": spec.max_length, "dtype": spec.dtype,
                       "top_k": spec.top_k}, sort_keys=True)


def joint_sparse_file(storage_root: Path, dense_spec: ModelSpec, collection: str) -> Path:
    """<storage>/sparse_vectors/_joint/<dense asset_name>/<collection>.parquet"""
    return path_under(storage_root, "sparse_vectors", JOINT_DIR, check_name(dense_spec.asset_name, "model"),
                      check_name(collection) + ".parquet")


def colbert_file(storage_root: Path, dense_spec: ModelSpec, collection: str) -> Path:
    """<storage>/colbert_vectors/<dense asset_name>/<collection>.arrow"""
    return path_under(storage_root, "colbert_vectors", check_name(dense_spec.asset_name, "model"),
                      check_name(collection) + ".arrow")


@dataclass(frozen=True)
class JointOutputs:
    """What a bge-m3 dense stage writes besides its dense vectors, from the same forward pass."""

    sparse_spec: ModelSpec | None = None  # the sparse partner whose lexical rows go to sparse_path
    sparse_path: Path | None = None
    colbert_path: Path | None = None

    @property
    def active(self) -> bool:
        return self.sparse_path is not None or self.colbert_path is not None


def plan_joint_outputs(registry: Registry, dense_spec: ModelSpec, *, sparse_enabled: bool,
                       sparse_models: Sequence[str] | None, storage_root: Path, collection: str) -> JointOutputs | None:
    """Side outputs for `dense_spec`'s pass: lexical rows when sparse is on and its partner is selected,
    ColBERT vectors when the entry says `colbert = true`. None when the plain dense path suffices."""
    partner = registry.joint_sparse_partner(dense_spec) if sparse_enabled else None
    if partner is not None and partner not in registry.select_sparse(sparse_models):
        partner = None
    joint = JointOutputs(
        sparse_spec=partner,
        sparse_path=joint_sparse_file(storage_root, dense_spec, collection) if partner is not None else None,
        colbert_path=colbert_file(storage_root, dense_spec, collection) if dense_spec.colbert else None,
    )
    return joint if joint.active else None


def _load_joint_encoder(spec: ModelSpec, joint: JointOutputs, device: str | list[str]):
    from rag_clean.encoders.flag import BGEM3JointEncoder

    if spec.backend != "flagembedding" or spec.flag_class != "bge-m3":
        raise StorageError(f"model {spec.name}: a joint dense/sparse/ColBERT pass needs backend flagembedding "
                           f"with flag_class bge-m3, not {spec.backend}/{spec.flag_class}")
    # Lexical rows are pruned to the sparse partner's top_k (the encoder prunes with its spec's top_k).
    # Constructed like the factory's dense bge-m3 encoder (no stored token budget), so batches, and with
    # them the dense vectors, are byte-identical to a run without the sparse stage.
    joint_spec = replace(spec, top_k=joint.sparse_spec.top_k) if joint.sparse_spec is not None else spec
    return BGEM3JointEncoder(joint_spec, device, return_colbert=joint.colbert_path is not None)


def _list_array(rows: Sequence[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """list<value_type> from per-row arrays without a Python list per element."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _colbert_array(rows: Sequence[np.ndarray], dim: int) -> pa.ListArray:
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.concatenate([np.asarray(r, np.float32).reshape(-1) for r in rows]) if rows else np.zeros(0, np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


class _JointSideFiles:
    """The staged side files of one joint pass: lexical rows for the sparse partner, ColBERT vectors.

    Rows stream to temp files in the order batches finish (readers look rows up by chunk_id /
    content_hash); rows of unchanged chunks are copied from the previous files when those match the
    model fingerprint, so the published files cover every current chunk.
    """

    def __init__(self, spec: ModelSpec, joint: JointOutputs, chunk_ids: list[str], hashes: list[str]):
        self.spec, self.joint = spec, joint
        self.chunk_ids, self.hashes = chunk_ids, hashes
        self.sparse_fp = sparse_fingerprint(joint.sparse_spec) if joint.sparse_spec is not None else None
        self.colbert_fp = model_fingerprint(spec)
        self.loaded_source: str | None = None
        self.missing: set[int] = set()
        self.warnings: list[str] = []
        self._prev_sparse: pa.Table | None = None
        self._prev_sparse_pos: dict[str, int] = {}
        self._prev_colbert: pa.Table | None = None
        self._prev_colbert_pos: dict[str, int] = {}
        self._sparse_tmp = temp_path_for(joint.sparse_path) if joint.sparse_path else None
        self._colbert_tmp = temp_path_for(joint.colbert_path) if joint.colbert_path else None
        self._sparse_writer = None
        self._colbert_sink = self._colbert_writer = self._colbert_schema = None
        self.colbert_dim: int | None = None
        self.counts = {"sparse_rows": 0, "sparse_reused": 0, "colbert_rows": 0, "colbert_reused": 0}

    # ---- previous files

    def _read_previous(self, path: Path, fingerprint: str, what: str, reader) -> pa.Table | None:
        if not path.exists():
            return None
        try:
            table = reader(path)
        except (OSError, pa.ArrowException) as exc:
            self.warnings.append(f"previous {what} {path} unreadable, recomputing its rows: {exc}")
            return None
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("fingerprint") != fingerprint:
            self.warnings.append(f"previous {what} {path} is from another model configuration; recomputing its rows")
            return None
        return table

    def load_previous(self, reused: Sequence[int]) -> None:
        """Find each reused chunk's previous side rows; chunks without them join the forward pass."""
        if not reused:
            return
        if self.joint.sparse_path is not None:
            self._prev_sparse = self._read_previous(self.joint.sparse_path, self.sparse_fp, "lexical rows",
                                                    lambda p: pq.read_table(p, memory_map=True))
            if self._prev_sparse is not None:
                self._prev_sparse_pos = {h: i for i, h in enumerate(self._prev_sparse.column("content_hash").to_pylist())}
            self.missing.update(i for i in reused if self.hashes[i] not in self._prev_sparse_pos)
        if self.joint.colbert_path is not None:
            self._prev_colbert = self._read_previous(self.joint.colbert_path, self.colbert_fp, "ColBERT vectors",
                                                     lambda p: ipc.open_file(pa.memory_map(str(p), "r")).read_all())
            if self._prev_colbert is not None:
                self._prev_colbert_pos = {h: i for i, h in enumerate(self._prev_colbert.column("content_hash").to_pylist())}
                self.colbert_dim = self._prev_colbert.schema.field("token_vectors").type.value_type.list_size
            self.missing.update(i for i in reused if self.hashes[i] not in self._prev_colbert_pos)

    # ---- writing

    def _ids(self, rows: np.ndarray) -> tuple[pa.Array, pa.Array]:
        return (pa.array([self.chunk_ids[i] for i in rows], pa.string()),
                pa.array([self.hashes[i] for i in rows], pa.string()))

    def _write_sparse(self, table: pa.Table) -> None:
        if self._sparse_writer is None:
            self.joint.sparse_path.parent.mkdir(parents=True, exist_ok=True)
            schema = JOINT_SPARSE_SCHEMA.with_metadata({
                "fingerprint": self.sparse_fp, "model": self.joint.sparse_spec.name, "dense_model": self.spec.name,
                "loaded_source": self.loaded_source or self.spec.source})
            self._sparse_writer = pq.ParquetWriter(self._sparse_tmp, schema, compression="zstd")
        self._sparse_writer.write_table(table.cast(self._sparse_writer.schema))
        self.counts["sparse_rows"] += len(table)

    def _write_colbert(self, table: pa.Table) -> None:
        if self._colbert_writer is None:
            self.joint.colbert_path.parent.mkdir(parents=True, exist_ok=True)
            schema = colbert_schema(self.colbert_dim, {"fingerprint": self.colbert_fp, "model": self.spec.name,
                                                       "loaded_source": self.loaded_source or self.spec.source})
            self._colbert_sink = pa.OSFile(str(self._colbert_tmp), "wb")
            self._colbert_writer = ipc.new_file(self._colbert_sink, schema)
            self._colbert_schema = schema
        self._colbert_writer.write_table(table.cast(self._colbert_schema))
        self.counts["colbert_rows"] += len(table)

    def write(self, rows: np.ndarray, sparse_rows, colbert_rows) -> None:
        """One batch of the pass: `rows` are chunk indices."""
        ids, hashes = self._ids(rows)
        if self.joint.sparse_path is not None:
            self._write_sparse(pa.table([ids, hashes, _list_array([r[0] for r in sparse_rows], pa.int32()),
                                         _list_array([r[1] for r in sparse_rows], pa.float32())],
                                        names=JOINT_SPARSE_SCHEMA.names))
        if self.joint.colbert_path is not None:
            if self.colbert_dim is None:
                self.colbert_dim = int(colbert_rows[0].shape[1])
            self._write_colbert(pa.table([ids, hashes, _colbert_array(colbert_rows, self.colbert_dim)],
                                         names=["chunk_id", "content_hash", "token_vectors"]))

    def _copy_previous(self, previous: pa.Table, pos: dict[str, int], rows: np.ndarray, columns: list[str], write) -> int:
        copied = 0
        for start in range(0, len(rows), FUSION_BLOCK_ROWS):
            block = rows[start:start + FUSION_BLOCK_ROWS]
            taken = previous.select(columns).take(pa.array([pos[self.hashes[i]] for i in block], pa.int64()))
            ids, hashes = self._ids(block)
            write(pa.table([ids, hashes, *taken.columns], names=["chunk_id", "content_hash", *columns]))
            copied += len(block)
        return copied

    def finish(self, exclude: np.ndarray) -> None:
        """Copy previous rows of chunks the pass skipped, then publish both files atomically."""
        skipped = np.setdiff1d(np.arange(len(self.chunk_ids), dtype=np.int64), exclude)
        if self.joint.sparse_path is not None:
            if len(skipped):
                self.counts["sparse_reused"] = self._copy_previous(self._prev_sparse, self._prev_sparse_pos, skipped,
                                                                   ["term_ids", "weights"], self._write_sparse)
            if self._sparse_writer is None:  # no chunks at all: still publish an empty, valid file
                self._write_sparse(JOINT_SPARSE_SCHEMA.empty_table())
            self._sparse_writer.close()
        if self.joint.colbert_path is not None:
            if len(skipped):
                self.counts["colbert_reused"] = self._copy_previous(self._prev_colbert, self._prev_colbert_pos, skipped,
                                                                    ["token_vectors"], self._write_colbert)
            if self._colbert_writer is None:
                self.colbert_dim = self.colbert_dim or self.spec.dim or 0
                self._write_colbert(colbert_schema(self.colbert_dim).empty_table())
            self._colbert_writer.close()
            self._colbert_sink.close()
        self._prev_sparse = self._prev_colbert = None  # drop memory maps of the files about to be replaced
        if self._sparse_tmp is not None:
            publish(self._sparse_tmp, self.joint.sparse_path)
        if self._colbert_tmp is not None:
            publish(self._colbert_tmp, self.joint.colbert_path)

    def abort(self) -> None:
        for closer in (self._sparse_writer, self._colbert_writer, self._colbert_sink):
            if closer is not None:
                try:
                    closer.close()
                except Exception:  # already closed or half written: the temp file is removed below anyway
                    pass
        for tmp in (self._sparse_tmp, self._colbert_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def record(self, *, extra_pass_rows: int) -> dict:
        return {
            "sparse_partner": self.joint.sparse_spec.name if self.joint.sparse_spec is not None else None,
            "sparse_file": str(self.joint.sparse_path) if self.joint.sparse_path else None,
            "sparse_rows": self.counts["sparse_rows"], "sparse_rows_reused": self.counts["sparse_reused"],
            "colbert_file": str(self.joint.colbert_path) if self.joint.colbert_path else None,
            "colbert_rows": self.counts["colbert_rows"], "colbert_rows_reused": self.counts["colbert_reused"],
            "colbert_dim": self.colbert_dim if self.joint.colbert_path else None,
            # Unchanged chunks re-run only for their side rows (their dense vectors were reused).
            "extra_pass_rows": extra_pass_rows,
            "loaded_source": self.loaded_source,
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------- fusion


def run_fusion_stage(sets: Mapping[str, EmbeddingSet], weights: Mapping[str, float], method: str,
                     staging_path: Path, chunks: pa.Table) -> tuple[EmbeddingWriter, dict]:
    """Weighted fusion, row block by row block, of the models' stored (memory-mapped) vectors."""
    names = list(sets)
    if not names:
        raise ValueError("fusion needs at least one dense model")
    chunk_ids = chunks.column("chunk_id").to_pylist()
    hashes = chunks.column("content_hash").to_pylist()
    for name in names:
        if sets[name].chunk_ids != chunk_ids or sets[name].content_hashes != hashes:
            raise StorageError(
                f"dense_embeddings/{name} was computed for other chunks than the current `chunks`; rematerialize it first"
            )
    dims = [sets[n].dim for n in names]
    dim = fused_dim(dims, method)
    w = [weights[n] for n in names]
    writer = EmbeddingWriter(staging_path, chunk_ids, hashes, dim,
                             {"method": method, "models": json.dumps(names), "weights": json.dumps(w), "normalized": "l2"})
    t0 = time.perf_counter()
    try:
        for start in range(0, len(chunk_ids), FUSION_BLOCK_ROWS):
            stop = min(start + FUSION_BLOCK_ROWS, len(chunk_ids))
            block = fuse_block([np.asarray(sets[n].vectors[start:stop]) for n in names], w, method)
            writer.write(np.arange(start, stop), block)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    total = float(sum(w))
    return writer, {
        "stage": "fused",
        "method": method,
        "models": names,
        "weights": {n: round(weights[n] / total, 6) for n in names},
        "rows": len(chunk_ids),
        "dim": dim,
        "fuse_seconds": round(time.perf_counter() - t0, 6),
    }


# ---------------------------------------------------------------- sparse

SPARSE_SCHEMA = pa.schema([
    ("chunk_id", pa.string()),
    ("model", pa.string()),
    ("term_ids", pa.list_(pa.int32())),
    ("weights", pa.list_(pa.float32())),
    ("fallback", pa.bool_()),     # rebuilt from metadata term weights because inference failed
])


def _metadata_term_weights(metadata_json: str) -> dict[str, float]:
    try:
        meta = json.loads(metadata_json or "{}")
    except ValueError:
        return {}
    weights = (meta.get("sparse_features") or {}).get("term_weights") if isinstance(meta, dict) else None
    return {str(k): float(v) for k, v in weights.items()} if isinstance(weights, dict) else {}


def sparse_from_metadata(spec: ModelSpec, chunks: pa.Table) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fallback: rows from the chunk files' sparse_features.term_weights, mapped through the model's vocab."""
    from transformers import AutoTokenizer

    from rag_clean.encoders.factory import resolve_local_source

    vocab = AutoTokenizer.from_pretrained(resolve_local_source(spec, spec.source)).get_vocab()
    ids_rows, weight_rows = [], []
    for meta in chunks.column("metadata_json").to_pylist():
        pairs = sorted(((vocab[t], w) for t, w in _metadata_term_weights(meta).items() if t in vocab and w > 0),
                       key=lambda p: -p[1])[: spec.top_k]
        ids_rows.append(np.array([p[0] for p in pairs], dtype=np.int32))
        weight_rows.append(np.array([p[1] for p in pairs], dtype=np.float32))
    return ids_rows, weight_rows


@dataclass(frozen=True)
class SharedSparseSource:
    """Where a sparse model's rows may already lie: the side file of its bge-m3 dense partner's pass."""

    dense_model: str
    path: Path


def shared_sparse_sources(registry: Registry, specs: Sequence[ModelSpec], storage_root: Path,
                          collection: str) -> dict[str, SharedSparseSource]:
    """Sparse model name -> its dense partner's side file, for every selected spec that has a partner."""
    out = {}
    for spec in specs:
        dense = registry.joint_dense_partner(spec)
        if dense is not None:
            out[spec.name] = SharedSparseSource(dense.name, joint_sparse_file(storage_root, dense, collection))
    return out


def load_shared_sparse_rows(spec: ModelSpec, source: SharedSparseSource, chunks: pa.Table,
                            ) -> tuple[tuple[list, list] | None, str | None]:
    """((term_ids per chunk, weights per chunk), None) from the side file, or (None, why it cannot be used).

    Usable only when the file was written for this exact sparse configuration (fingerprint) and holds a
    row for every current chunk's content hash: rows are looked up by hash, so they are never stale.
    """
    path = source.path
    prefix = f"{spec.name}: shared pass with {source.dense_model} not used:"
    if not path.exists():
        return None, (f"{prefix} {path} does not exist (dense_embeddings for {source.dense_model} has not run "
                      "with this sparse model enabled)")
    try:
        table = pq.read_table(path, memory_map=True)
    except (OSError, pa.ArrowException) as exc:
        return None, f"{prefix} {path} is unreadable ({type(exc).__name__}: {exc})"
    missing_cols = {"content_hash", "term_ids", "weights"} - set(table.schema.names)
    if missing_cols:
        return None, f"{prefix} {path} lacks columns {sorted(missing_cols)}"
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("fingerprint") != sparse_fingerprint(spec):
        return None, f"{prefix} {path} was written for another model configuration (fingerprint differs)"
    pos = {h: i for i, h in enumerate(table.column("content_hash").to_pylist())}
    hashes = chunks.column("content_hash").to_pylist()
    absent = [i for i, h in enumerate(hashes) if h not in pos]
    if absent:
        first = chunks.column("chunk_id")[absent[0]].as_py()
        return None, f"{prefix} {path} lacks {len(absent)} of {len(hashes)} chunks (first: {first})"
    rows = table.select(["term_ids", "weights"]).take(pa.array([pos[h] for h in hashes], pa.int64()))
    return (rows.column("term_ids").to_pylist(), rows.column("weights").to_pylist()), None


def _sparse_table(spec: ModelSpec, chunk_ids: Sequence[str], rows: Sequence[int], term_ids: Sequence, weights: Sequence,
                  fallback: bool) -> pa.Table:
    return pa.table({
        "chunk_id": [chunk_ids[i] for i in rows],
        "model": [spec.name] * len(rows),
        "term_ids": [np.asarray(t, np.int32).tolist() for t in term_ids],
        "weights": [np.asarray(w, np.float32).tolist() for w in weights],
        "fallback": [fallback] * len(rows),
    }, schema=SPARSE_SCHEMA)


def run_sparse_stage(specs: Sequence[ModelSpec], chunks: pa.Table, device: str | list[str], *,
                     budget_store=None, shared: Mapping[str, SharedSparseSource] | None = None,
                     sink: TableWriter | None = None) -> tuple[pa.Table | TableWriter, dict]:
    """Term weights per chunk from each spec, streamed batch by batch into `sink` (a staged Parquet file).

    Rows are written in encode order (length-sorted), not chunk order: readers join on chunk_id.
    Each model writes to a part file first, so a model whose inference fails midway is replaced whole by
    the metadata fallback. A spec listed in `shared` (see shared_sparse_sources) takes its rows from its
    bge-m3 dense partner's pass when that file covers every chunk: no encoder, no forward pass.
    Without `sink`, the rows are returned as an in-memory table (small inputs, tests).
    """
    from rag_clean.encoders.factory import load_sparse_encoder

    scratch_dir = None
    if sink is None:
        import tempfile

        scratch_dir = Path(tempfile.mkdtemp(prefix="rag_clean_sparse_"))
        out = TableWriter(scratch_dir / "sparse.parquet", SPARSE_SCHEMA)
    else:
        out = sink
    texts = chunks.column("text").to_pylist()
    chunk_ids = chunks.column("chunk_id").to_pylist()
    everything = range(len(chunk_ids))
    record = {"stage": "sparse", "model_names": [s.name for s in specs], "per_model": {}, "batch_seconds": [],
              "devices": [], "fallback_used": False, "fallback_reason": None, "warnings": [],
              "top_k": {s.name: s.top_k for s in specs}, "shared_pass_with_dense": [], "shared_pass": {}}
    available = 0
    try:
        for spec in specs:
            part = TableWriter(out.final_path.with_name(f"{out.final_path.stem}.{spec.asset_name}.part"), SPARSE_SCHEMA)
            part_available = 0
            try:
                source = (shared or {}).get(spec.name)
                rows = None
                if source is not None:
                    rows, reason = load_shared_sparse_rows(spec, source, chunks)
                    record["shared_pass"][spec.name] = {"dense_model": source.dense_model, "file": str(source.path),
                                                        "used": rows is not None, "reason": reason}
                    if rows is None:
                        log.info(reason)
                if rows is not None:
                    record["shared_pass_with_dense"].append(source.dense_model)
                    record["per_model"][spec.name] = {"model": spec.name, "items": len(texts),
                                                      "shared_pass_with_dense": source.dense_model}
                    part.write(_sparse_table(spec, chunk_ids, everything, *rows, fallback=False))
                    part_available = sum(1 for t in rows[0] if len(t))
                else:
                    try:
                        encoder = load_sparse_encoder(spec, device, budget_store=budget_store)
                        try:
                            for idx, batch in encoder.encode(texts):
                                part.write(_sparse_table(spec, chunk_ids, idx, [t for t, _ in batch],
                                                         [w for _, w in batch], fallback=False))
                                part_available += sum(1 for t, _ in batch if len(t))
                            record["per_model"][spec.name] = _encode_record(encoder.stats)["encode"]
                            record["batch_seconds"] += [round(b.seconds, 6) for b in encoder.stats.batches]
                            record["devices"].append(encoder.stats.device)
                        finally:
                            encoder.close()
                    except Exception as exc:  # inference failed: the old embedder's metadata fallback, recorded
                        reason = (f"{spec.name}: sparse inference failed ({type(exc).__name__}: {exc}); "
                                  "rebuilt from metadata term weights")
                        log.warning(reason)
                        part.abort()
                        part = TableWriter(part.final_path, SPARSE_SCHEMA)
                        ids_rows, weight_rows = sparse_from_metadata(spec, chunks)
                        part.write(_sparse_table(spec, chunk_ids, everything, ids_rows, weight_rows, fallback=True))
                        part_available = sum(1 for t in ids_rows if len(t))
                        record["fallback_used"] = True
                        record["fallback_reason"] = reason
                        record["warnings"].append(reason)
                out.append_file(part)
                available += part_available
            except BaseException:
                part.abort()
                raise
    except BaseException:
        out.abort()
        if scratch_dir is not None:
            scratch_dir.rmdir()
        raise
    record.update(rows=out.rows, vectors={"total": out.rows, "available": available},
                  status="fallback" if record["fallback_used"] else "ok")
    if scratch_dir is not None:
        table = out.read()
        out.abort()
        scratch_dir.rmdir()
        return table, record
    return out, record


# ---------------------------------------------------------------- retrieval + rerank


@dataclass
class RetrievalConfig:
    top_k_candidates: int = 100
    rerank_top_k: int = 20
    rrf_k: int = 60
    enable_sparse: bool = True
    enable_rerank: bool = True


def _sparse_rows(table: pa.Table, model: str, chunk_ids: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    sub = table.filter(pc.equal(table.column("model"), model))
    pos = {cid: i for i, cid in enumerate(sub.column("chunk_id").to_pylist())}
    term_ids = sub.column("term_ids").to_pylist()
    weights = sub.column("weights").to_pylist()
    missing = [c for c in chunk_ids if c not in pos]
    if missing:
        raise StorageError(f"sparse_vectors for {model} lacks chunks {missing[:3]}: rematerialize sparse_vectors")
    return ([np.asarray(term_ids[pos[c]], np.int32) for c in chunk_ids],
            [np.asarray(weights[pos[c]], np.float32) for c in chunk_ids])


def run_retrieval_stage(queries: Sequence[Query], chunks: pa.Table, fused: EmbeddingSet,
                        dense_specs: Sequence[ModelSpec], fusion_method: str, fusion_weights: Mapping[str, float],
                        sparse: pa.Table | None, sparse_specs: Sequence[ModelSpec], rerank_spec: ModelSpec | None,
                        config: RetrievalConfig, device: str | list[str]) -> tuple[pa.Table, dict]:
    """Candidates from fused vectors (+ sparse by RRF), cross-encoder rerank of the top K, metrics."""
    from rag_clean.encoders.factory import load_dense_encoder, load_reranker, load_sparse_encoder

    chunk_ids = chunks.column("chunk_id").to_pylist()
    if fused.chunk_ids != chunk_ids:
        raise StorageError("fused_embeddings was computed for other chunks than the current `chunks`; rematerialize it")
    texts = chunks.column("text").to_pylist()
    q_texts = [q.text for q in queries]
    record: dict = {"stage": "reranked", "queries": len(queries), "top_k_candidates": config.top_k_candidates,
                    "rerank_top_k": config.rerank_top_k, "warnings": [], "rerank_enabled": config.enable_rerank,
                    "rerank_executed": False, "resolution": None}

    # Query vectors: one dense model on the device at a time, then fused exactly like the chunks.
    per_model = []
    for spec in dense_specs:
        encoder = load_dense_encoder(spec, device)
        try:
            per_model.append(truncate_and_normalize(encoder.encode_queries(q_texts), spec.truncate_dim, model=spec.name))
        finally:
            encoder.close()
    q_fused = fuse_queries(per_model, [fusion_weights[s.name] for s in dense_specs], fusion_method)
    if q_fused.shape[1] != fused.dim:
        raise StorageError(f"query vectors are {q_fused.shape[1]}-d but fused_embeddings is {fused.dim}-d: "
                           "the ensemble changed; rematerialize fused_embeddings")
    dense_idx, dense_scores = dense_search(q_fused, fused.vectors, config.top_k_candidates)
    candidates = [list(map(int, row)) for row in dense_idx]
    retrieval_scores = [dict(zip(map(int, i), map(float, s))) for i, s in zip(dense_idx, dense_scores)]
    sources = ["dense:fused"]

    if config.enable_sparse and sparse is not None and len(sparse) and sparse_specs:
        sparse_rankings = []
        for spec in sparse_specs:
            index = SparseIndex(*_sparse_rows(sparse, spec.name, chunk_ids))
            try:
                encoder = load_sparse_encoder(spec, device)
            except Exception as exc:
                # Chunks may hold metadata-fallback vectors, but queries have no metadata: leave this
                # model out of the candidates, say so, and keep the dense candidates.
                msg = (f"sparse candidates from {spec.name} skipped: its encoder cannot be loaded for the queries "
                       f"({type(exc).__name__}: {exc})")
                log.warning(msg)
                record["warnings"].append(msg)
                continue
            try:
                q_rows = [None] * len(q_texts)
                for idx, rows in encoder.encode(q_texts):
                    for i, row in zip(idx, rows):
                        q_rows[i] = row
            finally:
                encoder.close()
            sparse_rankings.append([list(map(int, index.search(t, w, config.top_k_candidates)[0])) for t, w in q_rows])
            sources.append(f"sparse:{spec.name}")
        if sparse_rankings:  # else every sparse model was skipped: keep the dense ranking and its scores
            fused_candidates, fused_scores = [], []
            for qi in range(len(queries)):
                ranking = reciprocal_rank_fusion([candidates[qi]] + [r[qi] for r in sparse_rankings], k=config.rrf_k,
                                                 top_k=config.top_k_candidates)
                scores: dict[int, float] = {}
                for lst in [candidates[qi]] + [r[qi] for r in sparse_rankings]:
                    for rank, d in enumerate(lst, start=1):
                        scores[d] = scores.get(d, 0.0) + 1.0 / (config.rrf_k + rank)
                fused_candidates.append(ranking)
                fused_scores.append({d: scores[d] for d in ranking})
            candidates, retrieval_scores = fused_candidates, fused_scores
    record["candidate_sources"] = sources

    gold = [q.gold_chunk_ids for q in queries]
    before = [[chunk_ids[d] for d in c] for c in candidates]
    record["metrics"] = {"before_rerank": ranking_metrics(before, gold)}

    rerank_scores: list[dict[int, float]] = [{} for _ in queries]
    scorer = "retrieval (rerank disabled)"
    record["status"] = "ok"
    if config.enable_rerank:
        if rerank_spec is None:
            reranker, resolution = None, {"requested": None, "resolved": None, "attempts": [], "fallback_applied": True,
                                          "reason": "the registry names no rerank model"}
        else:
            reranker, resolution = load_reranker(rerank_spec, device)
        record["resolution"] = resolution
        if reranker is None:
            resolution["fallback_applied"] = True
            scorer = "retrieval (no cross-encoder could be loaded)"
            record["status"] = "fallback"
            msg = f"rerank: no cross-encoder could be loaded; results keep retrieval order. {resolution['reason']}"
            log.warning(msg)
            record["warnings"].append(msg)
        else:
            try:
                pairs, owners = [], []
                for qi, c in enumerate(candidates):
                    for d in c[: config.rerank_top_k]:
                        pairs.append((q_texts[qi], texts[d]))
                        owners.append((qi, d))
                scores = reranker.score(pairs) if pairs else np.zeros(0, np.float32)
                for (qi, d), s in zip(owners, scores):
                    rerank_scores[qi][d] = float(s)
                record.update(_encode_record(reranker.stats))
                record["device"] = reranker.stats.device
                scorer = reranker.scorer_id
                record["rerank_executed"] = True
                if resolution.get("fallback_applied"):
                    record["status"] = "fallback"
            finally:
                reranker.close()
            for qi in range(len(queries)):
                head = sorted(candidates[qi][: config.rerank_top_k], key=lambda d: -rerank_scores[qi][d])
                candidates[qi] = head + candidates[qi][config.rerank_top_k:]
    else:
        record["status"] = "ok"
    record["scorer"] = scorer
    after = [[chunk_ids[d] for d in c] for c in candidates]
    if record["rerank_executed"]:
        record["metrics"]["after_rerank"] = ranking_metrics(after, gold)

    rows = {name: [] for name in RERANKED_SCHEMA.names}
    for qi, q in enumerate(queries):
        for rank, d in enumerate(candidates[qi], start=1):
            rows["query_id"].append(q.query_id)
            rows["rank"].append(rank)
            rows["chunk_id"].append(chunk_ids[d])
            rows["retrieval_score"].append(retrieval_scores[qi].get(d))
            rows["rerank_score"].append(rerank_scores[qi].get(d))
            rows["scorer"].append(scorer if d in rerank_scores[qi] else "retrieval")
    table = pa.table(rows, schema=RERANKED_SCHEMA)
    record["rows"] = len(table)
    return table, record
