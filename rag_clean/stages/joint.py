"""bge-m3: one forward pass for dense, lexical (sparse) and optional ColBERT outputs, with side files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from rag_clean.layout import StorageLayout
from rag_clean.plan import JointPlan
from rag_clean.registry import ModelSpec
from rag_clean.storage import StorageError, publish, temp_path_for
from rag_clean.stages.common import ROW_BLOCK, model_fingerprint

log = logging.getLogger(__name__)


# The lexical rows of a joint pass: a cache beside sparse_vectors, keyed by content hash, not an asset.
JOINT_SPARSE_SCHEMA = pa.schema([
    ("chunk_id", pa.string()),
    ("content_hash", pa.string()),
    ("term_ids", pa.list_(pa.int32())),
    ("weights", pa.list_(pa.float32())),
])


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


@dataclass(frozen=True)
class JointOutputs:
    """What a bge-m3 dense stage writes besides its dense vectors, from the same forward pass."""

    sparse_spec: ModelSpec | None = None  # the sparse partner whose lexical rows go to sparse_path
    sparse_path: Path | None = None
    colbert_path: Path | None = None

    @property
    def active(self) -> bool:
        return self.sparse_path is not None or self.colbert_path is not None


def joint_outputs(plan: JointPlan, layout: StorageLayout, dense_spec: ModelSpec, collection: str) -> JointOutputs | None:
    """Where the side outputs planned for `dense_spec`'s pass go; None when the plain dense path suffices."""
    if not plan.active:
        return None
    return JointOutputs(
        sparse_spec=plan.sparse_spec,
        sparse_path=layout.joint_sparse_file(dense_spec.asset_name, collection) if plan.sparse_spec is not None else None,
        colbert_path=layout.colbert_file(dense_spec.asset_name, collection) if plan.colbert else None,
    )


def load_joint_encoder(spec: ModelSpec, joint: JointOutputs, device: str | list[str], *, budget_store=None,
                       token_budget: int | None = None):
    from rag_clean.encoders.flag import BGEM3JointEncoder

    if spec.backend != "flagembedding" or spec.flag_class != "bge-m3":
        raise StorageError(f"model {spec.name}: a joint dense/sparse/ColBERT pass needs backend flagembedding "
                           f"with flag_class bge-m3, not {spec.backend}/{spec.flag_class}")
    # Lexical rows are pruned to the sparse partner's top_k (the encoder prunes with its spec's top_k).
    # Same token budget (given or remembered) as the factory's dense bge-m3 encoder, so batches, and with
    # them the dense vectors, match a run without the sparse stage.
    joint_spec = replace(spec, top_k=joint.sparse_spec.top_k) if joint.sparse_spec is not None else spec
    return BGEM3JointEncoder(joint_spec, device, return_colbert=joint.colbert_path is not None,
                             budget_store=budget_store, token_budget=token_budget)


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


class JointSideFiles:
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
        for start in range(0, len(rows), ROW_BLOCK):
            block = rows[start:start + ROW_BLOCK]
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
