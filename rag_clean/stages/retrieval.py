"""Retrieval stage: hybrid candidates (dense + sparse, weights tuned on held-out queries), cross-encoder
rerank of the top K, metrics per candidate system before and after the rerank.

Flat in collection size: dense candidates scan the memory-mapped fused matrix in row blocks (on the leased
GPU when there is one), sparse candidates scan the stored sparse rows block by block, and only candidate
rows of `chunks` are read (ids, texts, hashes). Query-side encodings and cross-encoder scores are cached
(rag_clean/retrieval/cache.py), so a rerun encodes only what it has not encoded before.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.retrieval.cache import RetrievalCaches
from rag_clean.retrieval.candidates import DenseScorer, build_pools
from rag_clean.retrieval.flat import (
    RERANKED_SCHEMA,
    Query,
    check_queries_match,
    chunk_rows,
    heading_queries,
    load_queries,
    masked_gold_texts,
    queries_table,
    scoring_gold,
    take_column,
)
from rag_clean.retrieval.hybrid import QueryPool, choose_weights, default_weights, evaluate, split_queries
from rag_clean.retrieval.ranking import ensemble_score, fused_query_vectors, hybrid_candidates, hybrid_method, rrf_rankings
from rag_clean.retrieval.ranking_state import RankingState, write_ranking_state
from rag_clean.retrieval.metrics import ranking_metrics
from rag_clean.config.plan import RetrievalConfig
from rag_clean.stages.context import EmbeddedChunks, Stage, StageContext, StageIO
from rag_clean.stages.query_side import SparseSource, dense_query_side, sparse_scorers
from rag_clean.stages.rerank import first_device, rerank
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.storage.errors import StorageError
from rag_clean.telemetry.privacy import query_hash, query_key
from rag_clean.telemetry.records import QueriesRecord, RerankRecord

log = logging.getLogger(__name__)


def _ids_column(emb: EmbeddingSet) -> pa.ChunkedArray:
    ids = getattr(emb, "ids", None)  # zero-copy Arrow ids where EmbeddingSet has them
    if ids is None:
        ids = pa.array(emb.chunk_ids, pa.string())
    return ids if isinstance(ids, pa.ChunkedArray) else pa.chunked_array([ids])


def _same_chunks(emb: EmbeddingSet, chunks: pa.Table) -> bool:
    ids, want = _ids_column(emb), chunks.column("chunk_id")
    return len(ids) == len(want) and ids.cast(pa.string()).equals(want.cast(pa.string()))


def read_queries(ctx: StageContext, chunks: pa.Table) -> tuple[list[Query], str]:
    """The collection's queries (its queries.jsonl, else chunk headings) and where they came from. The raw
    text is read from its origin every time: the queries asset stores only hashes."""
    if ctx.collection_dir is None:  # no collection folder (engine callers): heading queries
        return heading_queries(chunks), "headings"
    return load_queries(ctx.folder, chunks)


def queries_stage(ctx: StageContext, io: StageIO, chunks: pa.Table) -> tuple[pa.Table, QueriesRecord]:
    """Evaluation queries: ids, text hashes, gold ids, and the text only as query_text_mode allows."""
    found, source = read_queries(ctx, chunks)
    mode = ctx.plan.query_text_mode
    record = QueriesRecord(rows=len(found), source=source, with_gold=sum(1 for q in found if q.gold_chunk_ids),
                           text_mode=mode, device="cpu")
    return queries_table(found, mode, ctx.layout.root), record


def reranked_stage(ctx: StageContext, io: StageIO, stored_queries: pa.Table | None,
                   inputs: EmbeddedChunks) -> tuple[pa.Table, RerankRecord]:
    """Hybrid candidates, cross-encoder rerank of the top K, metrics; see docs/retrieval.md.

    The queries are re-read from their origin (read_queries) and checked against the stored `queries`
    asset (`stored_queries`; None: not checked). Models, weights and sizes come from the run plan;
    query-side encodings and rerank scores are cached under the layout (StorageLayout.retrieval_cache_file),
    keyed by the query HMAC key of the storage root (privacy.query_key)."""
    plan, chunks, fused = ctx.plan, inputs.chunks, inputs.fused
    queries, _ = read_queries(ctx, chunks)
    if stored_queries is not None:
        check_queries_match(queries, stored_queries, ctx.layout.root)
    if plan.sparse_enabled and inputs.sparse is None:
        raise ValueError("sparse is enabled but sparse_vectors has no stored file for this collection: "
                         "materialize it first")
    if not _same_chunks(fused, chunks):
        raise StorageError("fused_embeddings was computed for other chunks than the current `chunks`; rematerialize it")
    per_model = {s.name: inputs.dense_sets.get(s.asset_name) for s in plan.dense}
    dense_sets = per_model if all(per_model.values()) else None
    sparse = inputs.sparse if plan.sparse_enabled else None
    dense_specs, fusion_method, fusion_weights = plan.dense, plan.fusion_method, plan.fusion_weights
    sparse_specs, rerank_spec, config, device, model_of = plan.sparse, plan.rerank, plan.retrieval, ctx.device, ctx.model
    search_device = first_device(device)
    clock = _PhaseClock()
    key = query_key(ctx.layout.root)
    caches = RetrievalCaches(lambda kind, model: ctx.layout.retrieval_cache_file(kind, model, ctx.collection))
    q_texts = [q.text for q in queries]
    q_keys = [query_hash(t, key) for t in q_texts]
    gold_ids = [list(q.gold_chunk_ids) for q in queries]
    flat_rows = chunk_rows(chunks, [g for gs in gold_ids for g in gs])
    gold, pos = [], 0
    for gs in gold_ids:  # gold as chunk rows: metrics compare rows, no list of every chunk id
        gold.append([int(r) for r in flat_rows[pos:pos + len(gs)] if r >= 0])
        pos += len(gs)
    k = config.top_k_candidates
    record = RerankRecord(queries=len(queries), top_k_candidates=k, rerank_top_k=config.rerank_top_k,
                          rerank_enabled=config.enable_rerank)
    masked_all = masked_gold_texts(queries, chunks)
    m_keys = {r: query_hash(t, key) for r, t in masked_all.items()}
    record.masked_gold_chunks = len(masked_all)
    scored = scoring_gold(gold, masked_all)
    gold = scored.rows
    record.gold = scored.to_dict()
    if scored.warning(len(queries)):
        record.warnings.append(scored.warning(len(queries)))
    # Chunks left empty by the mask are encoded as nothing (see empty_overrides): they cannot be found.
    masked = {r: t for r, t in masked_all.items() if t}
    clock.lap("gold_rows")

    per_model_q, per_model_over = dense_query_side(dense_specs, model_of, q_texts, q_keys, masked, m_keys, device,
                                                   caches, record, ctx.progress)
    weights = [fusion_weights[s.name] for s in dense_specs]
    q_fused = fused_query_vectors(dense_specs, per_model_q, fusion_weights, fusion_method)
    if q_fused.shape[1] != fused.dim:
        raise StorageError(f"query vectors are {q_fused.shape[1]}-d but fused_embeddings is {fused.dim}-d: "
                           "the ensemble changed; rematerialize fused_embeddings")
    clock.lap("dense_queries")
    rows = sorted(masked)
    fused_over = {} if not rows else dict(zip(rows, fused_query_vectors(
        dense_specs, [np.stack([over[r] for r in rows]) for over in per_model_over], fusion_weights, fusion_method)))
    emptied = sorted(set(masked_all) - set(masked))
    fused_over |= {r: np.zeros(q_fused.shape[1], np.float32) for r in emptied}
    for over, q in zip(per_model_over, per_model_q):
        over |= {r: np.zeros(q.shape[1], np.float32) for r in emptied}
    dense = DenseScorer(fused.vectors, q_fused, fused_over, device=search_device)
    dense_idx, dense_scores = dense.top_k(k)
    clock.lap("dense_search")

    scorers, systems = [], ["dense"]
    if config.enable_sparse and sparse is not None and sparse_specs and _has_rows(sparse):
        scorers, names = sparse_scorers(sparse_specs, model_of, sparse, chunks, q_texts, q_keys, masked, m_keys, device,
                                        caches, record, emptied, ctx.progress)
        systems += names
    clock.lap("sparse_queries_and_search")
    tune, heldout = split_queries([q.query_id for q in queries], config.tune_fraction)
    report = heldout if len(tune) and len(heldout) and sum(1 for g in gold if g) >= config.tune_min_queries \
        else np.arange(len(queries))

    dense_score, ensemble_weights = dense.scores, None
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
        ensemble = choose_weights(names, by_ensemble, gold, None, tune, heldout, fallback=registry_weights,
                                  min_queries=config.tune_min_queries, what="dense ensemble weights")
        ensemble.heldout = {"registry weights": evaluate(by_ensemble(registry_weights), gold, None, report),
                            "tuned weights": evaluate(by_ensemble(list(ensemble.weights.values())), gold, None,
                                                      report)}
        record.ensemble = ensemble.to_dict()
        ensemble_weights = dict(ensemble.weights)
        dense_score = ensemble_score(per_model, list(ensemble_weights.values()))
        clock.lap("ensemble_tuning")

    pools, sparse_tops = build_pools(dense_idx, dense_score, scorers, k, config.score_normalization)
    rrf = rrf_rankings(dense_idx, sparse_tops, config.rrf_k, k)

    def weighted(w):
        return [p.ranking(w, k)[0] for p in pools]

    if len(systems) == 1:
        tuning = choose_weights(systems, weighted, gold, None, tune, heldout, fallback=(1.0,),
                                min_queries=len(queries) + 1, what="hybrid weights")
        tuning.reason = "dense candidates only (no sparse system ran): nothing to weigh"
    else:
        tuning = choose_weights(systems, weighted, gold, None, tune, heldout,
                                fallback=default_weights(systems, config.hybrid_dense_weight),
                                min_queries=config.tune_min_queries, what="hybrid weights")
    chosen = [tuning.weights[s] for s in systems]
    rankings = {"dense": [list(r) for r in dense_idx], **dict(zip(systems[1:], sparse_tops))}
    if len(systems) > 1:
        rankings |= {"rrf": [r for r, _ in rrf], "weighted": weighted(chosen)}
    # Every system on the reported split (held-out when tuned) and on all queries, each labelled.
    tuning.heldout = {name: evaluate(r, gold, None, report) for name, r in rankings.items()}
    tuning.all_queries = {name: evaluate(r, gold, None, np.arange(len(queries))) for name, r in rankings.items()}
    method = hybrid_method(systems, config.hybrid_fusion)
    record.hybrid = tuning.to_dict() | {"method": method,
                                        "normalization": config.score_normalization,
                                        "report_split": "heldout" if report is heldout else "all queries"}
    if not tuning.tuned and len(systems) > 1:
        record.warnings.append(tuning.reason)

    candidates, retrieval_scores = hybrid_candidates(method, pools, dense_idx, dense_scores, sparse_tops, chosen, k,
                                                     config.rrf_k)
    record.candidate_sources = ["dense:fused", *systems[1:]]

    clock.lap("hybrid_pools_and_tuning")
    before = [list(c) for c in candidates]
    record.metrics = {"before_rerank": ranking_metrics(before, gold)}
    candidates, rerank_scores, scorer = rerank(candidates, q_texts, q_keys, chunks, masked_all, m_keys, rerank_spec,
                                               model_of, config, device, record, caches, ctx.progress)
    record.scorer = scorer
    clock.lap("rerank")
    after = [list(c) for c in candidates]
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

    table = _table(queries, candidates, chunks, retrieval_scores, rerank_scores, scorer)
    record.rows = len(table)
    record.warnings += caches.notes()
    caches.save_all()
    write_ranking_state(ctx.layout.ranking_state_file(ctx.collection),
                        _ranking_state(dense_specs, fusion_method, fusion_weights, ensemble_weights, tuning, method,
                                       config, rerank_spec, record, sparse_specs, model_of))
    clock.lap("table_and_caches")
    record.phase_seconds = clock.laps
    return table, record


class _PhaseClock:
    """Wall seconds of consecutive parts of the stage (telemetry `phase_seconds`): where a slow run went."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _has_rows(sparse: SparseSource) -> bool:
    if isinstance(sparse, pa.Table):
        return sparse.num_rows > 0
    source = sparse if isinstance(sparse, pq.ParquetFile) else pq.ParquetFile(str(sparse))
    return source.metadata.num_rows > 0


def _ranking_state(dense_specs, fusion_method, fusion_weights, ensemble_weights, tuning, method,
                   config: RetrievalConfig, rerank_spec, record: RerankRecord, sparse_specs, model_of) -> RankingState:
    """What this run chose, for search: the systems that ran (a sparse model whose encoder did not load is
    not one), their weights, the pool sizes and the reranker that resolved (None: retrieval order)."""
    ran_sparse = {s.split(":", 1)[1] for s in tuning.systems[1:]}
    fingerprints = {s.name: model_of(s).fingerprint for s in dense_specs}
    fingerprints |= {s.name: model_of(s).sparse_fingerprint for s in sparse_specs if s.name in ran_sparse}
    resolved = (record.resolution or {}).get("resolved") if record.rerank_executed else None
    if rerank_spec is not None and resolved:
        fingerprints[rerank_spec.name] = model_of(rerank_spec).fingerprint
    return RankingState(
        dense_models=tuple(s.name for s in dense_specs), fusion_method=fusion_method,
        fusion_weights={s.name: float(fusion_weights[s.name]) for s in dense_specs},
        ensemble_weights=None if ensemble_weights is None else {n: float(w) for n, w in ensemble_weights.items()},
        systems=tuple(tuning.systems), weights={n: float(w) for n, w in tuning.weights.items()}, tuned=bool(tuning.tuned),
        method=method, normalization=config.score_normalization, top_k_candidates=config.top_k_candidates,
        rrf_k=config.rrf_k, rerank_enabled=config.enable_rerank, rerank_top_k=config.rerank_top_k,
        rerank_model=rerank_spec.name if rerank_spec is not None else None, rerank_source=resolved,
        fingerprints=fingerprints)


def _table(queries, candidates, chunks: pa.Table, retrieval_scores, rerank_scores, scorer) -> pa.Table:
    rows = {name: [] for name in RERANKED_SCHEMA.names}
    used = np.unique(np.fromiter((d for c in candidates for d in c), np.int64)) if any(candidates) else np.zeros(0, np.int64)
    ids = dict(zip(used.tolist(), take_column(chunks, "chunk_id", used)))
    for qi, q in enumerate(queries):
        for rank, d in enumerate(candidates[qi], start=1):
            rows["query_id"].append(q.query_id)
            rows["rank"].append(rank)
            rows["chunk_id"].append(ids[d])
            rows["retrieval_score"].append(retrieval_scores[qi].get(d))
            rows["rerank_score"].append(rerank_scores[qi].get(d))
            rows["scorer"].append(scorer if d in rerank_scores[qi] else "retrieval")
    return pa.table(rows, schema=RERANKED_SCHEMA)


QUERIES = Stage("queries", queries_stage, asset=lambda *inputs: ["queries"])
RERANKED = Stage("reranked", reranked_stage, asset=lambda *inputs: ["reranked"], lease=lambda plan, *inputs: "gpu")
