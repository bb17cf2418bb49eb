"""Each pipeline stage as a plain function: inputs in, (value, stage record) out.

The Dagster assets are thin wrappers over these, and the same functions run on a GPU box with
no Dagster. Records hold measured values only; the telemetry layer turns them into the summary.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag_clean.encoders.base import EncodeStats
from rag_clean.fusion import fuse_block, fuse_queries, fused_dim, truncate_and_normalize
from rag_clean.registry import ModelSpec
from rag_clean.retrieval import (
    RERANKED_SCHEMA,
    Query,
    SparseIndex,
    dense_search,
    ranking_metrics,
    reciprocal_rank_fusion,
)
from rag_clean.storage import EmbeddingSet, EmbeddingWriter, StorageError

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
                    ) -> tuple[EmbeddingWriter, dict]:
    """Embed every chunk with one model (reusing vectors of unchanged chunks), streaming to a staged file.

    The model is loaded, used and released inside this call: one model resident at a time.
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

    writer: EmbeddingWriter | None = None
    stats = None
    native_dim = spec.dim
    try:
        if len(to_compute):
            encoder = load_dense_encoder(spec, device, budget_store=budget_store, token_budget=token_budget)
            try:
                native_dim = encoder.dim
                if spec.dim is not None and encoder.dim != spec.dim:
                    raise StorageError(f"model {spec.name}: produces {encoder.dim}-d vectors, registry says dim={spec.dim}")
                out_dim = spec.truncate_dim or encoder.dim
                writer = EmbeddingWriter(staging_path, chunk_ids, hashes, out_dim,
                                         {"model": spec.name, "fingerprint": fingerprint, "normalized": "l2"})
                subset = texts.take(pa.array(to_compute)).to_pylist()
                for local_idx, vectors in encoder.encode(subset):
                    writer.write(to_compute[local_idx], truncate_and_normalize(vectors, spec.truncate_dim, model=spec.name))
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
    except BaseException:
        if writer is not None:
            writer.abort()
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
    if stats is not None:
        record.update(_encode_record(stats))
        record["device"] = stats.device
    return writer, record


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


def run_sparse_stage(specs: Sequence[ModelSpec], chunks: pa.Table, device: str | list[str], *,
                     budget_store=None) -> tuple[pa.Table, dict]:
    from rag_clean.encoders.factory import load_sparse_encoder

    texts = chunks.column("text").to_pylist()
    chunk_ids = chunks.column("chunk_id").to_pylist()
    columns = {name: [] for name in SPARSE_SCHEMA.names}
    record = {"stage": "sparse", "model_names": [s.name for s in specs], "per_model": {}, "batch_seconds": [],
              "devices": [], "fallback_used": False, "fallback_reason": None, "warnings": [],
              "top_k": {s.name: s.top_k for s in specs}}
    for spec in specs:
        ids_rows: list[np.ndarray] = [np.zeros(0, np.int32)] * len(texts)
        weight_rows: list[np.ndarray] = [np.zeros(0, np.float32)] * len(texts)
        fallback = False
        try:
            encoder = load_sparse_encoder(spec, device, budget_store=budget_store)
            try:
                for idx, rows in encoder.encode(texts):
                    for i, (term_ids, weights) in zip(idx, rows):
                        ids_rows[i], weight_rows[i] = term_ids, weights
                record["per_model"][spec.name] = _encode_record(encoder.stats)["encode"]
                record["batch_seconds"] += [round(b.seconds, 6) for b in encoder.stats.batches]
                record["devices"].append(encoder.stats.device)
            finally:
                encoder.close()
        except Exception as exc:  # inference failed: the old embedder's metadata fallback, recorded
            reason = f"{spec.name}: sparse inference failed ({type(exc).__name__}: {exc}); rebuilt from metadata term weights"
            log.warning(reason)
            ids_rows, weight_rows = sparse_from_metadata(spec, chunks)
            fallback = True
            record["fallback_used"] = True
            record["fallback_reason"] = reason
            record["warnings"].append(reason)
        columns["chunk_id"] += chunk_ids
        columns["model"] += [spec.name] * len(texts)
        columns["term_ids"] += [r.tolist() for r in ids_rows]
        columns["weights"] += [r.tolist() for r in weight_rows]
        columns["fallback"] += [fallback] * len(texts)
    table = pa.table(columns, schema=SPARSE_SCHEMA)
    available = sum(1 for r in columns["term_ids"] if r)
    record.update(rows=len(table), vectors={"total": len(table), "available": available},
                  status="fallback" if record["fallback_used"] else "ok")
    return table, record


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
