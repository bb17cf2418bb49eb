"""Retrieval stage: candidates from fused (+ sparse by RRF), cross-encoder rerank, metrics."""

from __future__ import annotations

import logging
import re
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag_clean.fusion import fuse_queries, truncate_and_normalize
from rag_clean.registry import ModelSpec
from rag_clean.retrieval import (
    RERANKED_SCHEMA,
    Query,
    SparseIndex,
    dense_search,
    ranking_metrics,
    rrf_fuse,
)
from rag_clean.plan import RetrievalConfig
from rag_clean.records import RerankRecord
from rag_clean.storage import EmbeddingSet, StorageError

log = logging.getLogger(__name__)


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


# "...: LocalEntryNotFoundError: ..." inside an error's text: the chained cause, the same for every hub source.
_NESTED_ERROR = re.compile(r": [A-Z]\w*(?:Error|Exception): ")


def _first_line(text: str, limit: int = 240) -> str:
    """The first line of an error, without a chained cause, at most `limit` characters."""
    line = next((l.strip() for l in str(text).splitlines() if l.strip()), "")
    line = _NESTED_ERROR.split(line, maxsplit=1)[0]
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def _rerank_unavailable_warning(resolution: dict) -> str:
    """One header line, then one line per source tried with the first line of its error: a hub error
    repeats the whole offline explanation, which made the old one-line message 1,400 characters long."""
    lines = ["rerank: no cross-encoder could be loaded; results keep retrieval order."]
    attempts = resolution.get("attempts") or []
    if attempts:
        lines += [f"  - {a.get('source')}: {_first_line(a.get('error', ''))}" for a in attempts]
    elif resolution.get("reason"):
        lines.append(f"  - {_first_line(resolution['reason'])}")
    return "\n".join(lines)


def run_retrieval_stage(queries: Sequence[Query], chunks: pa.Table, fused: EmbeddingSet,
                        dense_specs: Sequence[ModelSpec], fusion_method: str, fusion_weights: Mapping[str, float],
                        sparse: pa.Table | None, sparse_specs: Sequence[ModelSpec], rerank_spec: ModelSpec | None,
                        config: RetrievalConfig, device: str | list[str]) -> tuple[pa.Table, RerankRecord]:
    """Candidates from fused vectors (+ sparse by RRF), cross-encoder rerank of the top K, metrics."""
    from rag_clean.encoders.factory import load_dense_encoder, load_reranker, load_sparse_encoder

    chunk_ids = chunks.column("chunk_id").to_pylist()
    if fused.chunk_ids != chunk_ids:
        raise StorageError("fused_embeddings was computed for other chunks than the current `chunks`; rematerialize it")
    texts = chunks.column("text").to_pylist()
    q_texts = [q.text for q in queries]
    record = RerankRecord(queries=len(queries), top_k_candidates=config.top_k_candidates,
                          rerank_top_k=config.rerank_top_k, rerank_enabled=config.enable_rerank)

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
                       f"({type(exc).__name__}: {_first_line(exc)})")
                log.debug(msg)  # surfaced once, by whoever runs the stage, from record.warnings
                record.warnings.append(msg)
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
                ranking, scores = rrf_fuse([candidates[qi]] + [r[qi] for r in sparse_rankings], k=config.rrf_k,
                                           top_k=config.top_k_candidates)
                fused_candidates.append(ranking)
                fused_scores.append({d: scores[d] for d in ranking})
            candidates, retrieval_scores = fused_candidates, fused_scores
    record.candidate_sources = sources

    gold = [q.gold_chunk_ids for q in queries]
    before = [[chunk_ids[d] for d in c] for c in candidates]
    record.metrics = {"before_rerank": ranking_metrics(before, gold)}

    rerank_scores: list[dict[int, float]] = [{} for _ in queries]
    scorer = "retrieval (rerank disabled)"
    if config.enable_rerank:
        if rerank_spec is None:
            reranker, resolution = None, {"requested": None, "resolved": None, "attempts": [], "fallback_applied": True,
                                          "reason": "the registry names no rerank model"}
        else:
            reranker, resolution = load_reranker(rerank_spec, device)
        record.resolution = resolution
        if reranker is None:
            resolution["fallback_applied"] = True
            scorer = "retrieval (no cross-encoder could be loaded)"
            record.status = "fallback"
            msg = _rerank_unavailable_warning(resolution)
            log.debug(msg)  # surfaced once, by whoever runs the stage, from record.warnings
            record.warnings.append(msg)
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
                record.encode = reranker.stats
                record.device = reranker.stats.device
                scorer = reranker.scorer_id
                record.rerank_executed = True
                if resolution.get("fallback_applied"):
                    record.status = "fallback"
            finally:
                reranker.close()
            for qi in range(len(queries)):
                head = sorted(candidates[qi][: config.rerank_top_k], key=lambda d: -rerank_scores[qi][d])
                candidates[qi] = head + candidates[qi][config.rerank_top_k:]
    record.scorer = scorer
    after = [[chunk_ids[d] for d in c] for c in candidates]
    if record.rerank_executed:
        record.metrics["after_rerank"] = ranking_metrics(after, gold)

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
    record.rows = len(table)
    return table, record
