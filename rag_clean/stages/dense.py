"""Dense stage: embed every chunk with one model, reusing vectors of unchanged chunks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from rag_clean.retrieval.fusion import truncate_and_normalize
from rag_clean.config.plan import RayPlan
from rag_clean.telemetry.progress import ProgressLog, track
from rag_clean.telemetry.records import DenseRecord, truncation_warning
from rag_clean.config.registry import ModelSpec
from rag_clean.storage.embeddings import EmbeddingSet, EmbeddingWriter
from rag_clean.storage.errors import StorageError
from rag_clean.storage.reuse import ArrowTexts, complement, match_rows
from rag_clean.stages.common import ROW_BLOCK, model_fingerprint
from rag_clean.stages.joint import JointOutputs, JointSideFiles, load_joint_encoder

log = logging.getLogger(__name__)


def run_dense_stage(spec: ModelSpec, chunks: pa.Table, device: str | list[str], staging_path: Path, *,
                    previous: EmbeddingSet | None = None, budget_store=None, token_budget: int | None = None,
                    joint: JointOutputs | None = None, ray: RayPlan | None = None,
                    progress: Callable[[str], None] | None = None,
                    digest_cache: Path | None = None, token_cache=None) -> tuple[EmbeddingWriter, DenseRecord]:
    """Embed every chunk with one model (reusing vectors of unchanged chunks), streaming to a staged file.

    The model is loaded, used and released inside this call: one model resident at a time.
    With `joint` (a bge-m3 entry, see RunPlan.joint and stages.joint.joint_outputs) the same forward pass also yields the partner
    sparse model's lexical rows and/or ColBERT vectors, written to side files attached to the returned writer (published right after it).
    With `ray` (RunPlan.ray) the rows to compute are encoded data-parallel on a Ray actor pool
    (rag_clean.distributed) and written into the same writer; a joint pass still runs in-process.
    `progress` gets a done/total, rate and ETA line at most every 10 s while the model encodes.
    `digest_cache` (StorageLayout.weights_digest_file) keeps the model files' digests across runs.
    `token_cache` (encoders.token_cache.TokenCache) shares chunk token ids with other models of the same tokenizer.
    """
    from rag_clean.encoders.factory import load_dense_encoder
    from rag_clean.encoders.token_cache import chunk_tokens

    chunk_ids = chunks.column("chunk_id")
    hashes = chunks.column("content_hash")
    texts = chunks.column("text")
    n = len(chunks)
    fingerprint = model_fingerprint(spec, digest_cache)
    out_dim = spec.output_dim

    # Reuse keyed by (model fingerprint, content hash); no dict of every row (rag_clean.storage.reuse).
    reuse_dst = reuse_src = np.zeros(0, dtype=np.int64)
    if previous is not None and previous.metadata.get("fingerprint") == fingerprint and (out_dim is None or previous.dim == out_dim):
        reuse_dst, reuse_src = match_rows(hashes, previous.hashes)
    to_compute = complement(reuse_dst, n)

    side = JointSideFiles(spec, joint, chunk_ids, hashes, digest_cache) if joint is not None and joint.active else None
    # Rows the forward pass runs over: the dense rows to compute, plus unchanged chunks whose side rows
    # (lexical / ColBERT) the previous side files lack. Dense vectors of the latter stay the reused ones.
    pass_rows = to_compute
    if side is not None:
        side.load_previous(reuse_dst)
        pass_rows = np.union1d(to_compute, side.missing)
    computes_dense = np.zeros(n, dtype=bool)
    computes_dense[to_compute] = True

    writer: EmbeddingWriter | None = None
    stats = None
    native_dim = spec.dim
    try:
        if len(pass_rows):
            if side is not None:
                encoder = load_joint_encoder(spec, joint, device, budget_store=budget_store,
                                             token_budget=token_budget)
            elif ray is not None:
                from rag_clean.distributed import ray_dense_encoder

                encoder = ray_dense_encoder(spec, ray, budget_store=budget_store, token_budget=token_budget)
            else:
                encoder = load_dense_encoder(spec, device, budget_store=budget_store, token_budget=token_budget)
            try:
                native_dim = encoder.dim
                if spec.dim is not None and encoder.dim != spec.dim:
                    raise StorageError(f"model {spec.name}: produces {encoder.dim}-d vectors, registry says dim={spec.dim}")
                out_dim = spec.truncate_dim or encoder.dim
                writer = EmbeddingWriter(staging_path, chunk_ids, hashes, out_dim,
                                         {"model": spec.name, "fingerprint": fingerprint, "normalized": "l2"})
                # Taken window by window as the encoder tokenizes; the hashes key the token cache.
                subset, subset_hashes = ArrowTexts(texts, pass_rows), ArrowTexts(hashes, pass_rows)
                meter = ProgressLog(f"{spec.name}", len(subset), progress)
                if side is not None:
                    side.loaded_source = encoder.source
                with chunk_tokens(token_cache, encoder, subset, subset_hashes) as tokens:
                    for batch in track(encoder.encode(tokens), meter, encoder.stats):
                        rows = pass_rows[batch.rows]
                        dense_mask = computes_dense[rows]  # all true unless a joint pass re-runs reused rows
                        if dense_mask.all():
                            writer.write(rows, truncate_and_normalize(batch.dense, spec.truncate_dim, model=spec.name))
                        elif dense_mask.any():
                            writer.write(rows[dense_mask], truncate_and_normalize(batch.dense[dense_mask],
                                                                                  spec.truncate_dim, model=spec.name))
                        if side is not None:
                            side.write(rows, batch.lexical, batch.colbert)
                stats = encoder.stats
            finally:
                encoder.close()  # released before the next model of the ensemble hydrates
        else:  # every row reused (or no chunks at all)
            out_dim = previous.dim if len(reuse_dst) else (spec.output_dim or 0)
            writer = EmbeddingWriter(staging_path, chunk_ids, hashes, out_dim,
                                     {"model": spec.name, "fingerprint": fingerprint, "normalized": "l2"})
        for start in range(0, len(reuse_dst), ROW_BLOCK):
            writer.write(reuse_dst[start:start + ROW_BLOCK], np.asarray(previous.vectors[reuse_src[start:start + ROW_BLOCK]]))
        writer.finish()
        if side is not None:
            # Published right after the dense file, with it (writer.publish: the IO manager's one call).
            for staged in side.finish(exclude=pass_rows):
                writer.attach(staged)
    except BaseException:
        if writer is not None:
            writer.abort()
        if side is not None:
            side.abort()
        raise

    record = DenseRecord(model=spec.name, rows=n, dim=out_dim, native_dim=native_dim, weight=spec.weight,
                         reused=len(reuse_dst), computed=int(len(to_compute)), encode=stats,
                         device=stats.device if stats is not None else None)
    warning = truncation_warning(stats, len(pass_rows))
    if warning:
        record.warnings.append(warning)
    if side is not None:
        record.joint = side.record(extra_pass_rows=int(len(pass_rows) - len(to_compute)))
        record.warnings += record.joint["warnings"]
    return writer, record
