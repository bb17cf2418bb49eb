"""Dense stage: embed every chunk with one model, reusing vectors of unchanged chunks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rag_clean.retrieval.fusion import truncate_and_normalize
from rag_clean.config.plan import RunPlan
from rag_clean.telemetry.progress import ProgressLog, announce_loading, track
from rag_clean.telemetry.records import DenseRecord
from rag_clean.config.registry import ModelSpec
from rag_clean.storage.embeddings import EmbeddingSet, EmbeddingWriter
from rag_clean.storage.errors import StorageError
from rag_clean.storage.previous import read_previous
from rag_clean.storage.reuse import ArrowTexts, complement
from rag_clean.stages.common import ROW_BLOCK
from rag_clean.stages.context import Stage, StageContext, StageIO
from rag_clean.stages.joint import JointSideFiles, joint_outputs, load_joint_encoder

log = logging.getLogger(__name__)


def dense_asset(spec: ModelSpec, chunks=None) -> list[str]:
    return ["dense_embeddings", spec.asset_name]


def _disabled(plan: RunPlan, spec: ModelSpec, chunks=None) -> DenseRecord | None:
    reason = plan.dense_disabled_reason(plan.dense_spec(spec.name))
    return None if reason is None else DenseRecord(model=spec.name, reason=f"dense stage skipped: {reason}")


def _lease(plan: RunPlan, spec: ModelSpec, chunks=None) -> str:
    # A bge-m3 joint pass always runs here (rag_clean.distributed shards single-output encodes only).
    return "remote" if plan.ray is not None and not plan.joint(spec).active else "gpu"


def dense_stage(ctx: StageContext, io: StageIO, spec: ModelSpec, chunks: pa.Table) -> tuple[EmbeddingWriter, DenseRecord]:
    """Embed every chunk with one model (reusing vectors of unchanged chunks), streaming to a staged file.

    The model is loaded, used and released inside this call: one model resident at a time.
    When the plan gives `spec`'s pass side outputs (RunPlan.joint: a bge-m3 entry) the same forward pass
    also yields the partner sparse model's lexical rows and/or ColBERT vectors, written to side files
    attached to the returned writer (published right after it). With `ctx.plan.ray` the rows to compute are
    encoded data-parallel on a Ray actor pool (rag_clean.distributed) and written into the same writer; a
    joint pass still runs in-process. `ctx.progress` gets "loading model <name>", then a done/total, rate and
    ETA line at most every 10 s while the model encodes. The token cache (`ctx.token_cache()`) shares chunk token ids with other
    models of the same tokenizer.
    """
    from rag_clean.encoders.factory import load_dense_encoder
    from rag_clean.encoders.token_cache import chunk_tokens

    spec = ctx.plan.dense_spec(spec.name)  # the run's registry entry (assets are defined from an earlier load)
    staging_path, device, ray = io.target, ctx.device, ctx.plan.ray
    budget_store, token_budget, token_cache = ctx.budget_store(), ctx.token_budget, ctx.token_cache()
    model = ctx.model(spec)
    joint = joint_outputs(ctx.plan.joint(spec), ctx.layout, spec, ctx.collection)
    chunk_ids = chunks.column("chunk_id")
    hashes = chunks.column("content_hash")
    texts = chunks.column("text")
    n = len(chunks)
    fingerprint = model.fingerprint
    out_dim = spec.output_dim

    # Reuse keyed by (model fingerprint, content hash); no dict of every row (rag_clean.storage.reuse).
    prior = read_previous(io.previous, {"fingerprint": fingerprint}, hashes, dim=out_dim)
    if prior.why == "unreadable":
        ctx.log.warning(f"previous vectors unreadable, recomputing all: {prior.error}")
    previous, reuse_dst, reuse_src = prior.opened, prior.current, prior.stored
    to_compute = complement(reuse_dst, n)

    side = io.stage(JointSideFiles(spec, joint, chunk_ids, hashes, ctx.model)) if joint is not None else None
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
    # On error run_stage aborts what io.stage registered (the writer, the side files).
    if len(pass_rows):
        announce_loading(ctx.progress, spec.name)
        if side is not None:
            encoder = load_joint_encoder(spec, joint, device, budget_store=budget_store,
                                         token_budget=token_budget)
        elif ray is not None:
            from rag_clean.distributed import ray_dense_encoder

            encoder = ray_dense_encoder(spec, ray, budget_store=budget_store, token_budget=token_budget)
        else:
            encoder = load_dense_encoder(spec, device, budget_store=budget_store, token_budget=token_budget,
                                         model=model)
        try:
            native_dim = encoder.dim
            if spec.dim is not None and encoder.dim != spec.dim:
                raise StorageError(f"model {spec.name}: produces {encoder.dim}-d vectors, registry says dim={spec.dim}")
            out_dim = spec.truncate_dim or encoder.dim
            writer = io.stage(EmbeddingWriter(staging_path, chunk_ids, hashes, out_dim,
                                              {"model": spec.name, "fingerprint": fingerprint, "normalized": "l2"}))
            # Taken window by window as the encoder tokenizes; the hashes key the token cache.
            subset, subset_hashes = ArrowTexts(texts, pass_rows), ArrowTexts(hashes, pass_rows)
            meter = ProgressLog(f"{spec.name}", len(subset), ctx.progress)
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
        writer = io.stage(EmbeddingWriter(staging_path, chunk_ids, hashes, out_dim,
                                          {"model": spec.name, "fingerprint": fingerprint, "normalized": "l2"}))
    for start in range(0, len(reuse_dst), ROW_BLOCK):
        writer.write(reuse_dst[start:start + ROW_BLOCK], np.asarray(previous.vectors[reuse_src[start:start + ROW_BLOCK]]))
    truncation = _truncation(stats, pass_rows, computes_dense, reuse_dst, hashes, previous)
    writer.metadata.update(truncation.metadata())
    writer.finish()
    if side is not None:
        # Published right after the dense file, with it (writer.publish: the IO manager's one call).
        for staged in side.finish(exclude=pass_rows):
            writer.attach(staged)

    record = DenseRecord(model=spec.name, rows=n, dim=out_dim, native_dim=native_dim, weight=spec.weight,
                         reused=len(reuse_dst), computed=int(len(to_compute)), encode=stats,
                         device=stats.device if stats is not None else None)
    record.truncated, record.truncated_reused = truncation.total, truncation.reused
    warning = truncation.warning(spec.name, n)
    if warning:
        record.warnings.append(warning)
    if side is not None:
        record.joint = side.record(extra_pass_rows=int(len(pass_rows) - len(to_compute)))
        record.warnings += record.joint["warnings"]
        if record.joint["sparse_partner"]:
            ctx.log.info(f"{spec.name}: same pass wrote lexical rows for {record.joint['sparse_partner']} to "
                         f"{record.joint['sparse_file']}")
    return writer, record


_TRUNCATED_KEY, _MAX_LENGTH_KEY = "truncated_hashes", "max_length"


@dataclass
class _Truncation:
    """Which stored vectors come from a truncated text: the rows encoded now that the tokenizer cut, and
    the reused rows the previous file said were cut. Kept in the file's metadata (short content hashes), so
    a rerun that reuses every vector still reports them."""

    hashes: list[str]
    reused: int
    max_length: int | None

    @property
    def total(self) -> int:
        return len(self.hashes)

    def metadata(self) -> dict[str, str]:
        out = {_TRUNCATED_KEY: json.dumps(self.hashes)}
        if self.max_length is not None:
            out[_MAX_LENGTH_KEY] = str(self.max_length)
        return out

    def warning(self, model: str, rows: int) -> str | None:
        if not self.hashes:
            return None
        reused = f"; {self.reused} of them reused from an earlier run" if self.reused else ""
        return (f"{model}: {self.total} of {rows} chunks are longer than its max_length ({self.max_length} tokens) "
                f"and were encoded from their first {self.max_length} tokens{reused}")


def _short(h: str) -> str:
    return h[:16]  # a count, not a key: 64 bits keep collisions out of reach and the metadata small


def _truncation(stats, pass_rows: np.ndarray, computes_dense: np.ndarray, reuse_dst: np.ndarray,
                hashes: pa.ChunkedArray, previous: EmbeddingSet | None) -> _Truncation:
    cut = np.zeros(0, np.int64)
    if stats is not None and stats.truncated_rows:
        rows = pass_rows[np.asarray(stats.truncated_rows, np.int64)]
        cut = rows[computes_dense[rows]]  # a joint pass also encodes rows whose dense vector is reused
    now = {_short(h) for h in hashes.take(pa.array(cut)).to_pylist()} if len(cut) else set()
    before: set[str] = set()
    previous_length = None
    if previous is not None and len(reuse_dst):
        before = set(json.loads(previous.metadata.get(_TRUNCATED_KEY) or "[]"))
        previous_length = previous.metadata.get(_MAX_LENGTH_KEY)
    reused = {_short(h) for h in hashes.take(pa.array(reuse_dst)).to_pylist()} & before if before else set()
    length = stats.max_length if stats is not None else (int(previous_length) if previous_length else None)
    return _Truncation(sorted(now | reused), len(reused), length)


DENSE = Stage("dense", dense_stage, asset=dense_asset, disabled=_disabled, lease=_lease)
