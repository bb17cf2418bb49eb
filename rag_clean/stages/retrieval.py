"""Retrieval stage: hybrid candidates (dense + sparse, weights tuned on held-out queries), cross-encoder
rerank of the top K, metrics per candidate system before and after the rerank."""

from __future__ import annotations

import logging
import re
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag_clean.candidates import DenseScorer, SparseScorer, build_pools
from rag_clean.fusion import fuse_queries, truncate_and_normalize
from rag_clean.hybrid import QueryPool, choose_weights, default_weights, evaluate, split_queries
from rag_clean.metrics import ranking_metrics
from rag_clean.plan import RetrievalConfig
from rag_clean.records import RerankRecord
from rag_clean.registry import ModelSpec
from rag_clean.retrieval import RERANKED_SCHEMA, Query, SparseIndex, masked_gold_texts, rrf_fuse
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


def _encode_dense(specs: Sequence[ModelSpec], q_texts: list[str], masked: dict[int, str], device):
    """Per model: query vectors and the masked gold chunks' vectors (one model on the device at a time)."""
    from rag_clean.encoders.factory import load_dense_encoder

    queries, overrides = [], []
    rows = sorted(masked)
    for spec in specs:
        encoder = load_dense_encoder(spec, device)
        try:
            queries.append(truncate_and_normalize(encoder.encode_queries(q_texts), spec.truncate_dim, model=spec.name))
            docs = encoder.encode_all([masked[r] for r in rows]) if rows else None
            overrides.append({} if docs is None else
                             dict(zip(rows, truncate_and_normalize(docs, spec.truncate_dim, model=spec.name))))
        finally:
            encoder.close()
    return queries, overrides


def _sparse_scorers(specs, sparse: pa.Table, chunk_ids, q_texts, masked: dict[int, str], device, record):
    """One scorer per sparse model that can encode the queries (with the masked gold rows swapped in)."""
    from rag_clean.encoders.factory import load_sparse_encoder

    scorers, names = [], []
    for spec in specs:
        term_rows, weight_rows = _sparse_rows(sparse, spec.name, chunk_ids)
        try:
            encoder = load_sparse_encoder(spec, device)
        except Exception as exc:
            # Chunks may hold metadata-fallback vectors, but queries have no metadata: leave this
            # model out of the candidates, say so, and keep the other systems.
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
            rows = sorted(masked)
            for idx, batch in (encoder.encode([masked[r] for r in rows]) if rows else ()):
                for i, (terms, weights) in zip(idx, batch):
                    term_rows[rows[i]], weight_rows[rows[i]] = terms, weights
        finally:
            encoder.close()
        scorers.append(SparseScorer(SparseIndex(term_rows, weight_rows), q_rows))
        names.append(f"sparse:{spec.name}")
    return scorers, names


def run_retrieval_stage(queries: Sequence[Query], chunks: pa.Table, fused: EmbeddingSet,
                        dense_specs: Sequence[ModelSpec], fusion_method: str, fusion_weights: Mapping[str, float],
                        sparse: pa.Table | None, sparse_specs: Sequence[ModelSpec], rerank_spec: ModelSpec | None,
                        config: RetrievalConfig, device: str | list[str],
                        dense_sets: Mapping[str, EmbeddingSet] | None = None) -> tuple[pa.Table, RerankRecord]:
    """Hybrid candidates, cross-encoder rerank of the top K, metrics; see docs/retrieval.md."""
    chunk_ids = chunks.column("chunk_id").to_pylist()
    if fused.chunk_ids != chunk_ids:
        raise StorageError("fused_embeddings was computed for other chunks than the current `chunks`; rematerialize it")
    q_texts = [q.text for q in queries]
    gold = [list(q.gold_chunk_ids) for q in queries]
    k = config.top_k_candidates
    record = RerankRecord(queries=len(queries), top_k_candidates=k, rerank_top_k=config.rerank_top_k,
                          rerank_enabled=config.enable_rerank)
    masked = masked_gold_texts(queries, chunks)
    record.masked_gold_chunks = len(masked)

    per_model_q, per_model_over = _encode_dense(dense_specs, q_texts, masked, device)
    weights = [fusion_weights[s.name] for s in dense_specs]
    q_fused = fuse_queries(per_model_q, weights, fusion_method)
    if q_fused.shape[1] != fused.dim:
        raise StorageError(f"query vectors are {q_fused.shape[1]}-d but fused_embeddings is {fused.dim}-d: "
                           "the ensemble changed; rematerialize fused_embeddings")
    rows = sorted(masked)
    fused_over = {} if not rows else dict(zip(rows, fuse_queries(
        [np.stack([over[r] for r in rows]) for over in per_model_over], weights, fusion_method)))
    dense = DenseScorer(fused.vectors, q_fused, fused_over)
    dense_idx, dense_scores = dense.top_k(k)

    scorers, systems = [], ["dense"]
    if config.enable_sparse and sparse is not None and len(sparse) and sparse_specs:
        scorers, names = _sparse_scorers(sparse_specs, sparse, chunk_ids, q_texts, masked, device, record)
        systems += names
    tune, heldout = split_queries([q.query_id for q in queries], config.tune_fraction)
    report = heldout if len(tune) and len(heldout) and sum(1 for g in gold if g) >= config.tune_min_queries \
        else np.arange(len(queries))

    dense_score = dense.scores
    if config.tune_ensemble_weights and len(dense_specs) > 1 and dense_sets:
        per_model = [DenseScorer(dense_sets[s.name].vectors, q, over)
                     for s, q, over in zip(dense_specs, per_model_q, per_model_over)]
        names = [s.name for s in dense_specs]
        registry_weights = list(np.asarray(weights) / np.sum(weights))
        # Each model's raw cosine over each query's fused candidates, once: a weight vector is then a
        # weighted sum of those rows (QueryPool.ranking), however many the grid tries.
        per_model_pools = [QueryPool(docs, np.stack([m.scores(qi, docs) for m in per_model]))
                           for qi, docs in enumerate(np.unique(row) for row in dense_idx)]

        def by_ensemble(w):
            return [p.ranking(w, k)[0] for p in per_model_pools]
        ensemble = choose_weights(names, by_ensemble, gold, chunk_ids, tune, heldout, fallback=registry_weights,
                                  min_queries=config.tune_min_queries, what="dense ensemble weights")
        ensemble.heldout = {"registry weights": evaluate(by_ensemble(registry_weights), gold, chunk_ids, report),
                            "tuned weights": evaluate(by_ensemble(list(ensemble.weights.values())), gold, chunk_ids,
                                                      report)}
        record.ensemble = ensemble.to_dict()
        w_tuned = list(ensemble.weights.values())
        dense_score = lambda qi, docs: sum(wi * m.scores(qi, docs) for wi, m in zip(w_tuned, per_model))  # noqa: E731

    pools, sparse_tops = build_pools(dense_idx, dense_score, scorers, k, config.score_normalization)
    rrf = [rrf_fuse([dense_idx[qi], *[t[qi] for t in sparse_tops]], k=config.rrf_k, top_k=k) for qi in range(len(queries))]

    def weighted(w):
        return [p.ranking(w, k)[0] for p in pools]

    if len(systems) == 1:
        tuning = choose_weights(systems, weighted, gold, chunk_ids, tune, heldout, fallback=(1.0,),
                                min_queries=len(queries) + 1, what="hybrid weights")
        tuning.reason = "dense candidates only (no sparse system ran): nothing to weigh"
    else:
        tuning = choose_weights(systems, weighted, gold, chunk_ids, tune, heldout,
                                fallback=default_weights(systems, config.hybrid_dense_weight),
                                min_queries=config.tune_min_queries, what="hybrid weights")
    chosen = [tuning.weights[s] for s in systems]
    tuning.heldout = {"dense": evaluate([list(r) for r in dense_idx], gold, chunk_ids, report)}
    for name, tops in zip(systems[1:], sparse_tops):
        tuning.heldout[name] = evaluate(tops, gold, chunk_ids, report)
    if len(systems) > 1:
        tuning.heldout["rrf"] = evaluate([r for r, _ in rrf], gold, chunk_ids, report)
        tuning.heldout["weighted"] = evaluate(weighted(chosen), gold, chunk_ids, report)
    record.hybrid = tuning.to_dict() | {"method": config.hybrid_fusion if len(systems) > 1 else "dense",
                                        "normalization": config.score_normalization,
                                        "report_split": "heldout" if report is heldout else "all queries"}
    if not tuning.tuned and len(systems) > 1:
        record.warnings.append(tuning.reason)

    if len(systems) > 1 and config.hybrid_fusion == "rrf":
        candidates = [list(map(int, r)) for r, _ in rrf]
        retrieval_scores = [{int(d): float(s[d]) for d in r} for r, s in rrf]
    elif len(systems) > 1:
        ranked = [p.ranking(chosen, k) for p in pools]
        candidates = [list(map(int, d)) for d, _ in ranked]
        retrieval_scores = [dict(zip(map(int, d), map(float, s))) for d, s in ranked]
    else:
        candidates = [list(map(int, row)) for row in dense_idx]
        retrieval_scores = [dict(zip(map(int, i), map(float, s))) for i, s in zip(dense_idx, dense_scores)]
    record.candidate_sources = ["dense:fused", *systems[1:]]

    texts = chunks.column("text").to_pylist()
    for r, t in masked.items():
        texts[r] = t
    before = [[chunk_ids[d] for d in c] for c in candidates]
    record.metrics = {"before_rerank": ranking_metrics(before, gold)}
    candidates, rerank_scores, scorer = _rerank(candidates, q_texts, texts, rerank_spec, config, device, record)
    record.scorer = scorer
    after = [[chunk_ids[d] for d in c] for c in candidates]
    heldout_metrics = {"before_rerank": ranking_metrics([before[i] for i in report], [gold[i] for i in report])}
    if record.rerank_executed:
        record.metrics["after_rerank"] = ranking_metrics(after, gold)
        heldout_metrics["after_rerank"] = ranking_metrics([after[i] for i in report], [gold[i] for i in report])
        b, a = heldout_metrics["before_rerank"], heldout_metrics["after_rerank"]
        record.reranker_gain = {m: round(a[m] - b[m], 6) for m in ("recall@10", "mrr@10", "ndcg@10")
                                if a.get(m) is not None and b.get(m) is not None}
        if record.reranker_gain.get("mrr@10", 0.0) < 0:
            record.warnings.append(f"the reranker lowers held-out MRR@10 by {-record.reranker_gain['mrr@10']:.3f} "
                                   f"({b['mrr@10']:.3f} -> {a['mrr@10']:.3f}) against retrieval order")
    record.metrics["heldout"] = heldout_metrics

    table = _table(queries, candidates, chunk_ids, retrieval_scores, rerank_scores, scorer)
    record.rows = len(table)
    return table, record


def _rerank(candidates, q_texts, texts, rerank_spec, config: RetrievalConfig, device, record: RerankRecord):
    """Cross-encoder scores of each query's top `rerank_top_k`, reordered; retrieval order otherwise."""
    from rag_clean.encoders.factory import load_reranker

    rerank_scores: list[dict[int, float]] = [{} for _ in candidates]
    if not config.enable_rerank:
        return candidates, rerank_scores, "retrieval (rerank disabled)"
    if rerank_spec is None:
        reranker, resolution = None, {"requested": None, "resolved": None, "attempts": [], "fallback_applied": True,
                                      "reason": "the registry names no rerank model"}
    else:
        reranker, resolution = load_reranker(rerank_spec, device, max_batch_pairs=config.rerank_batch_size)
    record.resolution = resolution
    if reranker is None:
        resolution["fallback_applied"] = True
        record.status = "fallback"
        msg = _rerank_unavailable_warning(resolution)
        log.debug(msg)  # surfaced once, by whoever runs the stage, from record.warnings
        record.warnings.append(msg)
        return candidates, rerank_scores, "retrieval (no cross-encoder could be loaded)"
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
        record.rerank_executed = True
        if resolution.get("fallback_applied"):
            record.status = "fallback"
        scorer = reranker.scorer_id
    finally:
        reranker.close()
    reordered = []
    for qi, c in enumerate(candidates):
        head = sorted(c[: config.rerank_top_k], key=lambda d: -rerank_scores[qi][d])
        reordered.append(head + c[config.rerank_top_k:])
    return reordered, rerank_scores, scorer


def _table(queries, candidates, chunk_ids, retrieval_scores, rerank_scores, scorer) -> pa.Table:
    rows = {name: [] for name in RERANKED_SCHEMA.names}
    for qi, q in enumerate(queries):
        for rank, d in enumerate(candidates[qi], start=1):
            rows["query_id"].append(q.query_id)
            rows["rank"].append(rank)
            rows["chunk_id"].append(chunk_ids[d])
            rows["retrieval_score"].append(retrieval_scores[qi].get(d))
            rows["rerank_score"].append(rerank_scores[qi].get(d))
            rows["scorer"].append(scorer if d in rerank_scores[qi] else "retrieval")
    return pa.table(rows, schema=RERANKED_SCHEMA)
