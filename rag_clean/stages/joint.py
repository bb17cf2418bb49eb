"""bge-m3: one forward pass for dense, lexical (sparse) and optional ColBERT outputs, with side files."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pyarrow as pa

from rag_clean.config.models import ResolvedModel

from rag_clean.storage.layout import StorageLayout
from rag_clean.config.plan import JointPlan
from rag_clean.config.registry import ModelSpec
from rag_clean.storage.arrow_io import ArrowFileWriter
from rag_clean.storage.errors import StorageError
from rag_clean.storage.parquet import TableWriter
from rag_clean.storage.staged import StagedFile
from rag_clean.storage.previous import PreviousRows, read_previous
from rag_clean.storage.reuse import complement
from rag_clean.stages.common import ROW_BLOCK
from rag_clean.stages.sparse_rows import SparseScratch, VectorRowsScratch, scatter_previous

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


@dataclass(frozen=True)
class JointOutputs:
    """What a bge-m3 dense stage writes besides its dense vectors, from the same forward pass."""

    sparse_spec: ModelSpec | None = None  # the sparse partner whose lexical rows go to sparse_path
    sparse_path: Path | None = None
    colbert_path: Path | None = None

    @property
    def active(self) -> bool:
        return self.sparse_path is not None or self.colbert_path is not None

    @property
    def heads(self) -> tuple[str, ...]:
        """The bge-m3 heads the pass computes: dense always, lexical / colbert for the side files it writes."""
        return ("dense",) + (("lexical",) if self.sparse_path is not None else ()) + \
            (("colbert",) if self.colbert_path is not None else ())


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
    from rag_clean.encoders.factory import quiet_third_party_progress
    from rag_clean.encoders.flag import BGEM3Encoder

    quiet_third_party_progress()  # it loads without the factory's load_* functions
    if spec.backend != "flagembedding" or spec.flag_class != "bge-m3":
        raise StorageError(f"model {spec.name}: a joint dense/sparse/ColBERT pass needs backend flagembedding "
                           f"with flag_class bge-m3, not {spec.backend}/{spec.flag_class}")
    # Lexical rows are pruned to the sparse partner's top_k (the encoder prunes with its spec's top_k).
    # Same token budget (given or remembered) as the factory's dense bge-m3 encoder, so batches, and with
    # them the dense vectors, match a run without the sparse stage.
    joint_spec = replace(spec, top_k=joint.sparse_spec.top_k) if joint.sparse_spec is not None else spec
    return BGEM3Encoder(joint_spec, device, heads=joint.heads, budget_store=budget_store, token_budget=token_budget)


class JointSideFiles:
    """The staged side files of one joint pass: lexical rows for the sparse partner, ColBERT vectors.

    Lexical rows and ColBERT vectors are gathered in scratch files (stages.sparse_rows) in any order and
    written in chunk order, so an incremental file equals a full one. Rows of unchanged chunks are copied from the
    previous files when those match the fingerprint, so the published files cover every current chunk.
    """

    def __init__(self, spec: ModelSpec, joint: JointOutputs, chunk_ids: pa.ChunkedArray, hashes: pa.ChunkedArray,
                 model_of: Callable[[ModelSpec], ResolvedModel]):
        """`model_of`: the run plan's model resolution (StageContext.model), for the fingerprints."""
        self.spec, self.joint = spec, joint
        self.chunk_ids, self.hashes = chunk_ids, hashes
        self.n = len(chunk_ids)
        self.sparse_fp = model_of(joint.sparse_spec).sparse_fingerprint if joint.sparse_spec is not None else None
        self.colbert_fp = model_of(spec).fingerprint
        self.loaded_source: str | None = None
        self.missing = np.zeros(0, dtype=np.int64)
        self.warnings: list[str] = []
        self._prev_sparse: tuple[np.ndarray, np.ndarray] | None = None   # (current rows, file rows)
        self._prev_colbert: pa.Table | None = None
        self._prev_colbert_rows: tuple[np.ndarray, np.ndarray] | None = None
        self._staged: list[StagedFile] = []  # the side files, once written (published with the dense file)
        self._scratch = (SparseScratch(joint.sparse_path, self.n, joint.sparse_spec.top_k, "joint")
                         if joint.sparse_path is not None else None)
        self._colbert_scratch: VectorRowsScratch | None = None
        self.colbert_dim: int | None = None
        self.counts = {"sparse_rows": 0, "sparse_reused": 0, "colbert_rows": 0, "colbert_reused": 0}

    # ---- previous files

    def _previous(self, path: Path, fingerprint: str, what: str) -> PreviousRows:
        prior = read_previous(path, {"fingerprint": fingerprint}, self.hashes)
        if prior.why == "unreadable":
            self.warnings.append(f"previous {what} {path} unreadable, recomputing its rows: {prior.error}")
        elif prior.why is not None and prior.why != "absent":
            self.warnings.append(f"previous {what} {path} is from another model configuration; recomputing its rows")
        return prior

    def _covered(self, reused: np.ndarray, current: np.ndarray) -> np.ndarray:
        """Of the `reused` chunk rows, those `current` (matched rows) lacks."""
        return np.setdiff1d(reused, current, assume_unique=True)

    def load_previous(self, reused: np.ndarray) -> None:
        """Find each reused chunk's previous side rows; chunks without them join the forward pass."""
        reused = np.asarray(reused, dtype=np.int64)
        if not len(reused):
            return
        missing = []
        if self.joint.sparse_path is not None:
            prior = self._previous(self.joint.sparse_path, self.sparse_fp, "lexical rows")
            if prior.matched:
                self._prev_sparse = (prior.current, prior.stored)
            missing.append(self._covered(reused, prior.current))
        if self.joint.colbert_path is not None:
            prior = self._previous(self.joint.colbert_path, self.colbert_fp, "ColBERT vectors")
            if prior.matched:
                self._prev_colbert = prior.opened
                self._prev_colbert_rows = (prior.current, prior.stored)
                self.colbert_dim = self._prev_colbert.schema.field("token_vectors").type.value_type.list_size
            missing.append(self._covered(reused, prior.current))
        self.missing = np.unique(np.concatenate(missing)) if missing else self.missing

    # ---- writing

    def _colbert_rows(self) -> VectorRowsScratch:
        if self._colbert_scratch is None:
            self._colbert_scratch = VectorRowsScratch(self.joint.colbert_path, self.n, self.colbert_dim, "colbert")
        return self._colbert_scratch

    def write(self, rows: np.ndarray, sparse_rows, colbert_rows) -> None:
        """One batch of the pass: `rows` are chunk indices."""
        if self._scratch is not None:
            self._scratch.write(rows, [r[0] for r in sparse_rows], [r[1] for r in sparse_rows])
        if self.joint.colbert_path is not None:
            if self.colbert_dim is None:
                self.colbert_dim = int(colbert_rows[0].shape[1])
            self._colbert_rows().write(rows, colbert_rows)

    def _copy_previous_colbert(self, rows: np.ndarray) -> int:
        cur, src = self._prev_colbert_rows
        pos = np.searchsorted(cur, rows)  # cur is ascending; every row in `rows` is in it (load_previous)
        column = self._prev_colbert.column("token_vectors")
        for start in range(0, len(rows), ROW_BLOCK):
            taken = column.take(pa.array(src[pos[start:start + ROW_BLOCK]]))
            self._colbert_rows().write_lists(rows[start:start + ROW_BLOCK], taken)
        return int(len(rows))

    def finish(self, exclude: np.ndarray) -> list[StagedFile]:
        """Copy previous rows of chunks the pass skipped, then write both staged side files; the caller
        attaches them to the dense writer, which publishes them right after the dense file."""
        skipped = complement(exclude, self.n)
        if self._scratch is not None:
            if len(skipped):
                cur, src = self._prev_sparse
                pos = np.searchsorted(cur, skipped)
                scatter_previous(self._scratch, self.joint.sparse_path, skipped, src[pos])
                self.counts["sparse_reused"] = int(len(skipped))
            schema = JOINT_SPARSE_SCHEMA.with_metadata({
                "fingerprint": self.sparse_fp, "model": self.joint.sparse_spec.name, "dense_model": self.spec.name,
                "loaded_source": self.loaded_source or self.spec.source})
            out = self._stage(TableWriter(self.joint.sparse_path, schema))
            for start, stop, term_ids, weights in self._scratch.blocks():
                out.write(pa.table([self.chunk_ids.slice(start, stop - start),
                                    self.hashes.slice(start, stop - start), term_ids, weights], schema=schema))
            out.finish()
            self.counts["sparse_rows"] = self.n
            self._scratch.close()
            self._scratch = None
        if self.joint.colbert_path is not None:
            if len(skipped):
                self.counts["colbert_reused"] = self._copy_previous_colbert(skipped)
            if self.colbert_dim is None:  # no row at all
                self.colbert_dim = self.spec.dim or 0
            scratch = self._colbert_rows()
            schema = colbert_schema(self.colbert_dim, {"fingerprint": self.colbert_fp, "model": self.spec.name,
                                                       "loaded_source": self.loaded_source or self.spec.source})
            # In chunk order, block by block: an incremental file equals a full one.
            out = self._stage(ArrowFileWriter(self.joint.colbert_path, schema))
            for start, stop, vectors in scratch.blocks():
                out.write(pa.table([self.chunk_ids.slice(start, stop - start),
                                    self.hashes.slice(start, stop - start), vectors], schema=schema))
            out.finish()
            self.counts["colbert_rows"] = self.n
            scratch.close()
            self._colbert_scratch = None
        self._prev_colbert = None  # drop the memory map of the file about to be replaced
        return list(self._staged)

    def _stage(self, writer: StagedFile) -> StagedFile:
        self._staged.append(writer)
        return writer

    def abort(self) -> None:
        if self._colbert_scratch is not None:
            self._colbert_scratch.close()
            self._colbert_scratch = None
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
        staged, self._staged = self._staged, []
        for writer in staged:
            writer.abort()

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
