"""Sparse stage: term weights per chunk, streamed; metadata fallback; rows shared from a bge-m3 pass.

Reuse is keyed by (sparse fingerprint, content hash): a model's rows of unchanged chunks are copied from
the previous sparse_vectors file (or its bge-m3 partner's side file) when that file's fingerprint for
the model matches; only the rest are encoded. Each model's rows are written in chunk order (through
scratch files, see stages.sparse_rows), so an incremental file equals a full one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag_clean.config.plan import RunPlan
from rag_clean.telemetry.progress import ProgressLog, announce_loading, track
from rag_clean.telemetry.records import ReuseCount, SparseRecord, truncation_warning
from rag_clean.config.registry import ModelSpec
from rag_clean.storage.columns import column
from rag_clean.storage.previous import read_previous
from rag_clean.storage.reuse import ArrowTexts, complement
from rag_clean.storage.parquet import TableWriter
from rag_clean.stages.common import ROW_BLOCK
from rag_clean.stages.context import Stage, StageContext, StageIO
from rag_clean.stages.sparse_rows import SparseScratch, scatter_previous

log = logging.getLogger(__name__)


# Rows: model by model (registry order), each model's rows in chunk order. Schema metadata:
# "fingerprint.<model>" per model (what its rows were computed with; a fallback model's rows are marked
# fallback=True and are never reused as model rows).
SPARSE_SCHEMA = pa.schema([
    column("chunk_id", pa.string(), "the chunk (chunks.chunk_id)"),
    column("content_hash", pa.string(), "sha256 of the chunk text these weights were computed from"),
    column("model", pa.string(), "the sparse registry model of this row"),
    column("term_ids", pa.list_(pa.int32()), "vocabulary ids of the kept terms (top-k by weight)"),
    column("weights", pa.list_(pa.float32()), "weight of each term in term_ids, same order"),
    column("fallback", pa.bool_(), "true: rebuilt from the chunk's metadata term weights because inference failed"),
])
FINGERPRINT_KEY = "fingerprint.{}"


def _metadata_term_weights(metadata_json: str) -> dict[str, float]:
    try:
        meta = json.loads(metadata_json or "{}")
    except ValueError:
        return {}
    weights = (meta.get("sparse_features") or {}).get("term_weights") if isinstance(meta, dict) else None
    return {str(k): float(v) for k, v in weights.items()} if isinstance(weights, dict) else {}


def _metadata_vocab(spec: ModelSpec) -> dict[str, int]:
    from transformers import AutoTokenizer

    from rag_clean.encoders.factory import resolve_local_source

    return AutoTokenizer.from_pretrained(resolve_local_source(spec, spec.source)).get_vocab()


def _metadata_rows(spec: ModelSpec, vocab: Mapping[str, int], metadata_json: Sequence[str]
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    ids_rows, weight_rows = [], []
    for meta in metadata_json:
        pairs = sorted(((vocab[t], w) for t, w in _metadata_term_weights(meta).items() if t in vocab and w > 0),
                       key=lambda p: -p[1])[: spec.top_k]
        ids_rows.append(np.array([p[0] for p in pairs], dtype=np.int32))
        weight_rows.append(np.array([p[1] for p in pairs], dtype=np.float32))
    return ids_rows, weight_rows


def sparse_from_metadata(spec: ModelSpec, chunks: pa.Table) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fallback: rows from the chunk files' sparse_features.term_weights, mapped through the model's vocab."""
    return _metadata_rows(spec, _metadata_vocab(spec), chunks.column("metadata_json").to_pylist())


@dataclass(frozen=True)
class SharedSparseSource:
    """Where a sparse model's rows may already lie: the side file of its bge-m3 dense partner's pass."""

    dense_model: str
    path: Path


def shared_sparse_source(ctx: StageContext, spec: ModelSpec) -> SharedSparseSource | None:
    """`spec`'s dense partner's side file (RunPlan.joint_dense_partner), or None when it has no partner."""
    dense = ctx.plan.joint_dense_partner(spec)
    if dense is None:
        return None
    return SharedSparseSource(dense.name, ctx.layout.joint_sparse_file(dense.asset_name, ctx.collection))


@dataclass
class StoredRows:
    """Rows of one model that a stored file holds for current chunks: chunk `current[i]` is row `rows[i]`."""

    path: Path
    current: np.ndarray
    rows: np.ndarray


def load_shared_sparse_rows(spec: ModelSpec, source: SharedSparseSource, chunks: pa.Table,
                            fingerprint: str) -> tuple[StoredRows | None, str | None]:
    """(where each chunk's row lies in the side file, None), or (None, why it cannot be used).

    Usable only when the file was written for this exact sparse configuration (`fingerprint`) and holds a
    row for every current chunk's content hash: rows are looked up by hash, so they are never stale.
    """
    path = source.path
    prefix = f"{spec.name}: shared pass with {source.dense_model} not used:"
    prior = read_previous(path, {"fingerprint": fingerprint}, chunks.column("content_hash"),
                          required=("term_ids", "weights"))
    if prior.why == "absent":
        return None, (f"{prefix} {path} does not exist (dense_embeddings for {source.dense_model} has not run "
                      "with this sparse model enabled)")
    if prior.why in ("no_hashes", "missing_columns"):
        lacking = ["content_hash"] if prior.why == "no_hashes" else prior.detail
        return None, f"{prefix} {path} lacks columns {lacking}"
    if prior.why == "other_config":
        return None, f"{prefix} {path} was written for another model configuration (fingerprint differs)"
    if prior.why == "unreadable":
        return None, f"{prefix} {path} is unreadable ({type(prior.error).__name__}: {prior.error})"
    if len(prior.current) < len(chunks):
        absent = complement(prior.current, len(chunks))
        first = chunks.column("chunk_id")[int(absent[0])].as_py()
        return None, f"{prefix} {path} lacks {len(absent)} of {len(chunks)} chunks (first: {first})"
    return StoredRows(path, prior.current, prior.stored), None


def previous_model_rows(spec: ModelSpec, previous: Path | None, chunks: pa.Table, fingerprint: str
                        ) -> tuple[StoredRows | None, str | None]:
    """Rows of `spec` in the previous sparse_vectors file that current chunks may reuse (same fingerprint,
    same content hash, not fallback rows), or (None, why none)."""
    prior = read_previous(
        previous, {FINGERPRINT_KEY.format(spec.name): fingerprint}, chunks.column("content_hash"),
        columns=["model", "fallback"],
        keep=lambda b: pc.and_(pc.equal(b.column("model"), spec.name),
                               pc.invert(b.column("fallback"))).to_numpy(zero_copy_only=False))
    if prior.why == "no_hashes":
        return None, f"{spec.name}: previous {previous} predates content hashes; encoding every chunk"
    if prior.why == "unreadable":
        return None, (f"{spec.name}: previous {previous} unreadable, encoding every chunk "
                      f"({type(prior.error).__name__}: {prior.error})")
    # Absent, or another model configuration (or none stored): nothing to reuse.
    return (StoredRows(previous, prior.current, prior.stored), None) if len(prior.current) else (None, None)


def _model_table(spec: ModelSpec, chunks: pa.Table, start: int, stop: int, term_ids: pa.Array, weights: pa.Array,
                 fallback: bool) -> pa.Table:
    n = stop - start
    return pa.table([chunks.column("chunk_id").slice(start, n), chunks.column("content_hash").slice(start, n),
                     pa.repeat(pa.scalar(spec.name), n), term_ids, weights, pa.repeat(pa.scalar(fallback), n)],
                    schema=pa.schema(SPARSE_SCHEMA, metadata=None))


def sparse_schema(fingerprints: Mapping[str, str]) -> pa.Schema:
    return SPARSE_SCHEMA.with_metadata({FINGERPRINT_KEY.format(m): fp for m, fp in fingerprints.items()})


def _disabled(plan: RunPlan, chunks=None) -> SparseRecord | None:
    reason = plan.sparse_disabled_reason()
    return None if reason is None else SparseRecord(reason=reason)


def sparse_stage(ctx: StageContext, io: StageIO, chunks: pa.Table) -> tuple[pa.Table | TableWriter, SparseRecord]:
    """Term weights per chunk from each sparse model of the plan, into a staged Parquet file at `io.target`
    (published by the caller).

    Each model's rows are gathered in scratch files in any order (encoded rows, rows reused from
    `io.previous` -- the stored sparse_vectors file -- or from a bge-m3 partner's side file) and then
    streamed to the file in chunk order. A model whose inference fails is replaced whole by the metadata
    fallback. A model with a bge-m3 dense partner (RunPlan.joint_dense_partner) takes its rows from that
    partner's pass when its side file covers every chunk: no encoder, no forward pass.
    Without `io.target`, the rows are returned as an in-memory table (small inputs, tests).
    With `ctx.plan.ray` each model encodes on a Ray actor pool (rag_clean.distributed); a failure
    there takes the same metadata fallback as a local one.
    """
    specs, ray, previous, sink_path = ctx.plan.sparse, ctx.plan.ray, io.previous, io.target
    scratch_dir = None
    if sink_path is None:
        import tempfile

        scratch_dir = Path(tempfile.mkdtemp(prefix="rag_clean_sparse_"))
        sink_path = scratch_dir / "sparse.parquet"
    if ray is not None:
        from rag_clean.distributed.ray_encode import connect

        connect(ray)  # a missing extra or an unreachable cluster fails the run here, never as a metadata fallback
    n = len(chunks)
    fingerprints = {spec.name: ctx.model(spec).sparse_fingerprint for spec in specs}
    out = io.stage(TableWriter(sink_path, sparse_schema(fingerprints)))
    record = SparseRecord(model_names=[s.name for s in specs], top_k={s.name: s.top_k for s in specs})
    available = 0
    try:
        for spec in specs:
            scratch = SparseScratch(out.path, n, spec.top_k, spec.asset_name)
            try:
                fallback, reused = False, 0
                source = shared_sparse_source(ctx, spec)
                stored = None
                if source is not None:
                    stored, reason = load_shared_sparse_rows(spec, source, chunks, fingerprints[spec.name])
                    record.shared_pass[spec.name] = {"dense_model": source.dense_model, "file": str(source.path),
                                                     "used": stored is not None, "reason": reason}
                    if stored is None:
                        log.info(reason)
                if stored is not None:
                    record.shared_pass_with_dense.append(source.dense_model)
                    record.per_model[spec.name] = {"model": spec.name, "items": n,
                                                   "shared_pass_with_dense": source.dense_model}
                    scatter_previous(scratch, stored.path, stored.current, stored.rows)
                    reused = n
                else:
                    prior, why = previous_model_rows(spec, previous, chunks, fingerprints[spec.name])
                    if why:
                        log.info(why)
                        record.warnings.append(why)
                    reuse_rows = prior.current if prior is not None else np.zeros(0, dtype=np.int64)
                    to_compute = complement(reuse_rows, n)
                    try:
                        if len(to_compute):
                            _encode_into(ctx, scratch, spec, chunks, to_compute, record)
                        if prior is not None:
                            scatter_previous(scratch, prior.path, prior.current, prior.rows)
                            reused = len(prior.current)
                    except Exception as exc:  # inference failed: the old embedder's metadata fallback, recorded
                        reason = (f"{spec.name}: sparse inference failed ({type(exc).__name__}: {exc}); "
                                  "rebuilt from metadata term weights")
                        log.warning(reason)
                        scratch.reset()
                        _fallback_into(scratch, spec, chunks)
                        fallback, reused = True, 0
                        record.fallback_used = True
                        record.fallback_reason = reason
                        record.warnings.append(reason)
                # Fallback rows are rebuilt every run (no model, a JSON parse per chunk), never reused.
                record.reuse_counts[spec.name] = ReuseCount(reused, n - reused, "chunks")
                for start, stop, term_ids, weights in scratch.blocks():
                    out.write(_model_table(spec, chunks, start, stop, term_ids, weights, fallback))
                available += scratch.rows_with_terms
            finally:
                scratch.close()
    except BaseException:
        if scratch_dir is not None:  # run_stage aborts `out`; a caller without it has only this scratch
            out.abort()
            scratch_dir.rmdir()
        raise
    record.rows, record.vectors_available = out.rows, available
    record.status = "fallback" if record.fallback_used else "ok"
    for name, info in record.shared_pass.items():
        ctx.log.info(f"{name}: rows from the forward pass of {info['dense_model']}" if info["used"] else info["reason"])
    if scratch_dir is not None:
        table = out.read()
        out.abort()
        scratch_dir.rmdir()
        return table, record
    return out, record


def _encode_into(ctx: StageContext, scratch: SparseScratch, spec: ModelSpec, chunks: pa.Table,
                 rows: np.ndarray, record: SparseRecord) -> None:
    from rag_clean.encoders.factory import load_sparse_encoder
    from rag_clean.encoders.token_cache import chunk_tokens

    budget_store = ctx.budget_store()
    announce_loading(ctx.progress, spec.name)
    if ctx.plan.ray is not None:
        from rag_clean.distributed import ray_sparse_encoder

        encoder = ray_sparse_encoder(spec, ctx.plan.ray, budget_store=budget_store)
    else:
        encoder = load_sparse_encoder(spec, ctx.device, budget_store=budget_store, token_budget=ctx.token_budget,
                                      model=ctx.model(spec))
    try:
        meter = ProgressLog(spec.name, len(rows), ctx.progress)
        texts, hashes = ArrowTexts(chunks.column("text"), rows), ArrowTexts(chunks.column("content_hash"), rows)
        with chunk_tokens(ctx.token_cache(), encoder, texts, hashes) as tokens:
            for batch in track(encoder.encode(tokens), meter, encoder.stats):
                scratch.write(rows[batch.rows], [t for t, _ in batch.lexical], [w for _, w in batch.lexical])
        record.per_model[spec.name] = encoder.stats.to_dict()
        record.batch_seconds += [round(b.seconds, 6) for b in encoder.stats.batches]
        record.devices.append(encoder.stats.device)
        warning = truncation_warning(encoder.stats, len(rows))
        if warning:
            record.warnings.append(warning)
    finally:
        encoder.close()


def _fallback_into(scratch: SparseScratch, spec: ModelSpec, chunks: pa.Table) -> None:
    vocab = _metadata_vocab(spec)
    column = chunks.column("metadata_json")
    for start in range(0, len(chunks), ROW_BLOCK):
        block = column.slice(start, ROW_BLOCK).to_pylist()
        ids_rows, weight_rows = _metadata_rows(spec, vocab, block)
        scratch.write(np.arange(start, start + len(block)), ids_rows, weight_rows)


SPARSE = Stage("sparse", sparse_stage, asset=lambda *inputs: ["sparse_vectors"], disabled=_disabled,
               lease=lambda plan, *inputs: "remote" if plan.ray is not None else "gpu")
