"""Sparse stage: term weights per chunk, streamed; metadata fallback; rows shared from a bge-m3 pass."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.layout import StorageLayout
from rag_clean.plan import RayPlan
from rag_clean.progress import ProgressLog, track
from rag_clean.records import SparseRecord, truncation_warning
from rag_clean.registry import ModelSpec, Registry
from rag_clean.storage import TableWriter
from rag_clean.stages.joint import sparse_fingerprint

log = logging.getLogger(__name__)


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


def shared_sparse_sources(registry: Registry, specs: Sequence[ModelSpec], layout: StorageLayout,
                          collection: str) -> dict[str, SharedSparseSource]:
    """Sparse model name -> its dense partner's side file, for every selected spec that has a partner."""
    out = {}
    for spec in specs:
        dense = registry.joint_dense_partner(spec)
        if dense is not None:
            out[spec.name] = SharedSparseSource(dense.name, layout.joint_sparse_file(dense.asset_name, collection))
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
                     sink: TableWriter | None = None, ray: RayPlan | None = None,
                     progress: Callable[[str], None] | None = None,
                     token_cache=None) -> tuple[pa.Table | TableWriter, SparseRecord]:
    """Term weights per chunk from each spec, streamed batch by batch into `sink` (a staged Parquet file).

    Rows are written in encode order (length-sorted), not chunk order: readers join on chunk_id.
    Each model writes to a part file first, so a model whose inference fails midway is replaced whole by
    the metadata fallback. A spec listed in `shared` (see shared_sparse_sources) takes its rows from its
    bge-m3 dense partner's pass when that file covers every chunk: no encoder, no forward pass.
    Without `sink`, the rows are returned as an in-memory table (small inputs, tests).
    With `ray` (RunPlan.ray) each model encodes on a Ray actor pool (rag_clean.distributed); a failure
    there takes the same metadata fallback as a local one.
    `token_cache` (encoders.token_cache.TokenCache) shares chunk token ids with other models of the same tokenizer.
    """
    from rag_clean.encoders import token_cache as tc
    from rag_clean.encoders.factory import load_sparse_encoder

    scratch_dir = None
    if sink is None:
        import tempfile

        scratch_dir = Path(tempfile.mkdtemp(prefix="rag_clean_sparse_"))
        out = TableWriter(scratch_dir / "sparse.parquet", SPARSE_SCHEMA)
    else:
        out = sink
    if ray is not None:
        from rag_clean.distributed.ray_encode import connect

        connect(ray)  # a missing extra or an unreachable cluster fails the run here, never as a metadata fallback
    texts = chunks.column("text").to_pylist()
    chunk_ids = chunks.column("chunk_id").to_pylist()
    everything = range(len(chunk_ids))
    record = SparseRecord(model_names=[s.name for s in specs], top_k={s.name: s.top_k for s in specs})
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
                    record.shared_pass[spec.name] = {"dense_model": source.dense_model, "file": str(source.path),
                                                        "used": rows is not None, "reason": reason}
                    if rows is None:
                        log.info(reason)
                if rows is not None:
                    record.shared_pass_with_dense.append(source.dense_model)
                    record.per_model[spec.name] = {"model": spec.name, "items": len(texts),
                                                      "shared_pass_with_dense": source.dense_model}
                    part.write(_sparse_table(spec, chunk_ids, everything, *rows, fallback=False))
                    part_available = sum(1 for t in rows[0] if len(t))
                else:
                    try:
                        if ray is not None:
                            from rag_clean.distributed import ray_sparse_encoder

                            encoder = ray_sparse_encoder(spec, ray, budget_store=budget_store)
                        else:
                            encoder = load_sparse_encoder(spec, device, budget_store=budget_store)
                        try:
                            meter = ProgressLog(spec.name, len(texts), progress)
                            with tc.scope(token_cache, encoder):
                                for idx, batch in track(encoder.encode(texts), meter, encoder.stats):
                                    part.write(_sparse_table(spec, chunk_ids, idx, [t for t, _ in batch],
                                                             [w for _, w in batch], fallback=False))
                                    part_available += sum(1 for t, _ in batch if len(t))
                            record.per_model[spec.name] = encoder.stats.to_dict()
                            record.batch_seconds += [round(b.seconds, 6) for b in encoder.stats.batches]
                            record.devices.append(encoder.stats.device)
                            warning = truncation_warning(encoder.stats, len(texts))
                            if warning:
                                record.warnings.append(warning)
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
                        record.fallback_used = True
                        record.fallback_reason = reason
                        record.warnings.append(reason)
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
    record.rows, record.vectors_available = out.rows, available
    record.status = "fallback" if record.fallback_used else "ok"
    if scratch_dir is not None:
        table = out.read()
        out.abort()
        scratch_dir.rmdir()
        return table, record
    return out, record
