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
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rag_clean.retrieval.candidates import DenseScorer, SparseBlock, SparseScorer, build_pools
from rag_clean.retrieval.sparse_scan import sparse_scan_device
from rag_clean.retrieval.hybrid import QueryPool, choose_weights, default_weights, evaluate, split_queries
from rag_clean.retrieval.ranking import (NO_RERANKER_SCORER, encode_dense_texts, encode_sparse_texts, ensemble_score,
                                         first_line, fused_query_vectors, hybrid_candidates, hybrid_method,
                                         model_query_vectors, rerank_order, rerank_unavailable_warning, rrf_rankings)
from rag_clean.retrieval.ranking_state import RankingState, write_ranking_state
from rag_clean.retrieval.metrics import ranking_metrics
from rag_clean.config.plan import RetrievalConfig
from rag_clean.telemetry.privacy import query_hash, query_key
from rag_clean.telemetry.records import RerankRecord
from rag_clean.config.registry import ModelSpec
from rag_clean.retrieval.flat import RERANKED_SCHEMA, Query, chunk_rows, masked_gold_texts, take_column
from rag_clean.retrieval.cache import RetrievalCaches, fingerprint
from rag_clean.stages.common import model_fingerprint, sparse_fingerprint
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean.storage.errors import StorageError

log = logging.getLogger(__name__)

SparseSource = pa.Table | pq.ParquetFile | Path | str
# Sparse rows per block: each block becomes a small inverted index (~50 bytes per posting while built), so
# smaller blocks keep the peak low; more blocks cost more per-query index lookups (linear, cheap).
SPARSE_BLOCK_ROWS = 16384


def _ids_column(emb: EmbeddingSet) -> pa.ChunkedArray:
    ids = getattr(emb, "ids", None)  # zero-copy Arrow ids where EmbeddingSet has them
    if ids is None:
        ids = pa.array(emb.chunk_ids, pa.string())
    return ids if isinstance(ids, pa.ChunkedArray) else pa.chunked_array([ids])


def _same_chunks(emb: EmbeddingSet, chunks: pa.Table) -> bool:
    ids, want = _ids_column(emb), chunks.column("chunk_id")
    return len(ids) == len(want) and ids.cast(pa.string()).equals(want.cast(pa.string()))


def _record_batches(sparse: SparseSource, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if isinstance(sparse, pa.Table):
        yield from sparse.select(columns).to_batches(max_chunksize=SPARSE_BLOCK_ROWS)
        return
    source = sparse if isinstance(sparse, pq.ParquetFile) else pq.ParquetFile(str(sparse), memory_map=True)
    yield from source.iter_batches(batch_size=SPARSE_BLOCK_ROWS, columns=columns)


def _sparse_blocks(sparse: SparseSource, model: str, chunks: pa.Table) -> Callable[[], Iterator[SparseBlock]]:
    """The stored rows of one model as (chunk rows, lengths, flat term ids, flat weights) blocks. Rows written
    in chunk order map by position; any other order is joined on chunk_id (Arrow hash lookup)."""
    ids_column = chunks.column("chunk_id")

    def blocks() -> Iterator[SparseBlock]:
        cursor = 0
        for batch in _record_batches(sparse, ["chunk_id", "model", "term_ids", "weights"]):
            same = pc.equal(batch.column("model"), model)
            sub = batch if pc.all(same).as_py() else batch.filter(same)  # one model per file: no copy
            n = sub.num_rows
            if not n:
                continue
            ids = sub.column("chunk_id")
            if cursor >= 0 and cursor + n <= len(ids_column) and \
                    ids_column.slice(cursor, n).cast(pa.string()).equals(pa.chunked_array([ids]).cast(pa.string())):
                rows, keep = np.arange(cursor, cursor + n, dtype=np.int64), None
                cursor += n
            else:
                cursor = -1  # not in chunk order: join every later block on chunk_id
                rows = chunk_rows(chunks, ids.to_pylist())
                keep = rows >= 0  # rows of chunks no longer in the collection are not candidates
            lengths = pc.list_value_length(sub.column("term_ids")).fill_null(0).to_numpy(zero_copy_only=False)
            terms = pc.list_flatten(sub.column("term_ids")).to_numpy(zero_copy_only=False)
            weights = pc.list_flatten(sub.column("weights")).to_numpy(zero_copy_only=False)
            if keep is not None and not keep.all():
                per_entry = np.repeat(keep, lengths)
                rows, lengths, terms, weights = rows[keep], lengths[keep], terms[per_entry], weights[per_entry]
            yield rows, lengths.astype(np.int64), terms, weights

    return blocks


def _dense_query_side(specs: Sequence[ModelSpec], q_texts: list[str], q_keys: list[str], masked: dict[int, str],
                      m_keys: dict[int, str], device, caches: RetrievalCaches, record: RerankRecord):
    """Per model: query vectors and the masked gold chunks' vectors, from the cache where it has them; the
    rest encoded one text per forward (one model on the device at a time, and only if something is missing)."""
    from rag_clean.encoders.factory import load_dense_encoder

    queries, overrides = [], []
    rows = sorted(masked)
    first_q = {k: i for i, k in reversed(list(enumerate(q_keys)))}
    text_of_m = {m_keys[r]: masked[r] for r in rows}
    for spec in specs:
        fp = fingerprint(model_fingerprint(spec, caches.digest_cache), device, query_instruction=spec.query_instruction or "")
        qc = caches.open("query_vectors", spec, "vector", fp)
        mc = caches.open("masked_gold", spec, "vector", fp)
        need_q, need_m = qc.missing(q_keys), mc.missing(m_keys[r] for r in rows)
        if need_q or need_m:
            encoder = load_dense_encoder(spec, device)
            try:
                if need_q:
                    vectors = encode_dense_texts(encoder, [q_texts[first_q[k]] for k in need_q], device, queries=True)
                    for k, v in zip(need_q, vectors):
                        qc.put(k, v)
                if need_m:
                    vectors = encode_dense_texts(encoder, [text_of_m[k] for k in need_m], device, queries=False)
                    for k, v in zip(need_m, vectors):
                        mc.put(k, v)
            finally:
                encoder.close()
        width = spec.truncate_dim or spec.dim
        native = np.stack([qc.get(k) for k in q_keys]) if q_keys else np.zeros((0, width or 0), np.float32)
        queries.append(model_query_vectors(spec, native))
        if rows:
            docs = model_query_vectors(spec, np.stack([mc.get(m_keys[r]) for r in rows]))
            overrides.append(dict(zip(rows, docs)))
        else:
            overrides.append({})
        record.reuse_counts[f"query_vectors/{spec.name}"] = qc.count("queries")
        if rows:
            record.reuse_counts[f"masked_gold/{spec.name}"] = mc.count("chunks")
    return queries, overrides


def _sparse_scorers(specs, sparse: SparseSource, chunks: pa.Table, q_texts, q_keys, masked: dict[int, str],
                    m_keys: dict[int, str], device, caches: RetrievalCaches, record):
    """One scorer per sparse model that can encode the queries (with the masked gold rows swapped in)."""
    from rag_clean.encoders.factory import load_sparse_encoder

    scorers, names = [], []
    rows = sorted(masked)
    first_q = {k: i for i, k in reversed(list(enumerate(q_keys)))}
    text_of_m = {m_keys[r]: masked[r] for r in rows}
    for spec in specs:
        fp = fingerprint(model_fingerprint(spec, caches.digest_cache), device, top_k=getattr(spec, "top_k", None))
        qc = caches.open("sparse_queries", spec, "sparse", fp)
        mc = caches.open("sparse_masked", spec, "sparse", fp)
        need_q, need_m = qc.missing(q_keys), mc.missing(m_keys[r] for r in rows)
        if need_q or need_m:
            try:
                encoder = load_sparse_encoder(spec, device)
            except Exception as exc:
                # Chunks may hold metadata-fallback vectors, but queries have no metadata: leave this
                # model out of the candidates, say so, and keep the other systems.
                msg = (f"sparse candidates from {spec.name} skipped: its encoder cannot be loaded for the queries "
                       f"({type(exc).__name__}: {first_line(exc)})")
                log.debug(msg)  # surfaced once, by whoever runs the stage, from record.warnings
                record.warnings.append(msg)
                continue
            try:
                for cache, keys, texts in ((qc, need_q, [q_texts[first_q[k]] for k in need_q]),
                                           (mc, need_m, [text_of_m[k] for k in need_m])):
                    for key, row in zip(keys, encode_sparse_texts(encoder, texts, device)):
                        cache.put(key, row)
            finally:
                encoder.close()
        q_rows = [qc.get(k) for k in q_keys]
        overrides = {r: mc.get(m_keys[r]) for r in rows}
        record.reuse_counts[f"sparse_queries/{spec.name}"] = qc.count("queries")
        if rows:
            record.reuse_counts[f"sparse_masked/{spec.name}"] = mc.count("chunks")
        scorers.append(SparseScorer(_sparse_blocks(sparse, spec.name, chunks), chunks.num_rows, q_rows, overrides,
                                    device=sparse_scan_device(_first_device(device))))
        names.append(f"sparse:{spec.name}")
    return scorers, names


def run_retrieval_stage(queries: Sequence[Query], chunks: pa.Table, fused: EmbeddingSet,
                        dense_specs: Sequence[ModelSpec], fusion_method: str, fusion_weights: Mapping[str, float],
                        sparse: SparseSource | None, sparse_specs: Sequence[ModelSpec], rerank_spec: ModelSpec | None,
                        config: RetrievalConfig, device: str | list[str],
                        dense_sets: Mapping[str, EmbeddingSet] | None = None,
                        cache_path: Callable[[str, str], Path] | None = None,
                        hash_key: bytes | None = None,
                        digest_cache: Path | None = None,
                        state_path: Path | None = None) -> tuple[pa.Table, RerankRecord]:
    """Hybrid candidates, cross-encoder rerank of the top K, metrics; see docs/retrieval.md.

    `sparse`: the stored sparse_vectors (a table, or its Parquet file, read block by block). `cache_path(kind,
    model asset name)`: where the retrieval caches live (StorageLayout.retrieval_cache_file); None: no cache.
    `hash_key`: the query HMAC key (privacy.query_key), which keys the caches. `digest_cache`: the model weights
    digest cache (StorageLayout.weights_digest_file) behind the fingerprints. `state_path`
    (StorageLayout.ranking_state_file): where what was chosen goes for search (ranking_state.py); None: nowhere."""
    if not _same_chunks(fused, chunks):
        raise StorageError("fused_embeddings was computed for other chunks than the current `chunks`; rematerialize it")
    search_device = _first_device(device)
    clock = _PhaseClock()
    key = query_key() if hash_key is None else hash_key
    caches = RetrievalCaches(cache_path, digest_cache)
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
    masked = masked_gold_texts(queries, chunks)
    m_keys = {r: query_hash(t, key) for r, t in masked.items()}
    record.masked_gold_chunks = len(masked)
    clock.lap("gold_rows")

    per_model_q, per_model_over = _dense_query_side(dense_specs, q_texts, q_keys, masked, m_keys, device, caches,
                                                    record)
    weights = [fusion_weights[s.name] for s in dense_specs]
    q_fused = fused_query_vectors(dense_specs, per_model_q, fusion_weights, fusion_method)
    if q_fused.shape[1] != fused.dim:
        raise StorageError(f"query vectors are {q_fused.shape[1]}-d but fused_embeddings is {fused.dim}-d: "
                           "the ensemble changed; rematerialize fused_embeddings")
    clock.lap("dense_queries")
    rows = sorted(masked)
    fused_over = {} if not rows else dict(zip(rows, fused_query_vectors(
        dense_specs, [np.stack([over[r] for r in rows]) for over in per_model_over], fusion_weights, fusion_method)))
    dense = DenseScorer(fused.vectors, q_fused, fused_over, device=search_device)
    dense_idx, dense_scores = dense.top_k(k)
    clock.lap("dense_search")

    scorers, systems = [], ["dense"]
    if config.enable_sparse and sparse is not None and sparse_specs and _has_rows(sparse):
        scorers, names = _sparse_scorers(sparse_specs, sparse, chunks, q_texts, q_keys, masked, m_keys, device,
                                         caches, record)
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
    tuning.heldout = {"dense": evaluate([list(r) for r in dense_idx], gold, None, report)}
    for name, tops in zip(systems[1:], sparse_tops):
        tuning.heldout[name] = evaluate(tops, gold, None, report)
    if len(systems) > 1:
        tuning.heldout["rrf"] = evaluate([r for r, _ in rrf], gold, None, report)
        tuning.heldout["weighted"] = evaluate(weighted(chosen), gold, None, report)
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
    candidates, rerank_scores, scorer = _rerank(candidates, q_texts, q_keys, chunks, masked, m_keys, rerank_spec,
                                                config, device, record, caches)
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
    if state_path is not None:
        write_ranking_state(state_path, _ranking_state(dense_specs, fusion_method, fusion_weights, ensemble_weights,
                                                       tuning, method, config, rerank_spec, record, sparse_specs,
                                                       caches.digest_cache))
    clock.lap("table_and_caches")
    record.phase_seconds = clock.laps
    return table, record


class _PhaseClock:
    """Wall seconds of consecutive parts of the stage (telemetry `phase_seconds`): where a slow run went."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _first_device(device: str | list[str]) -> str:
    first = device[0] if isinstance(device, (list, tuple)) else str(device).split(",")[0]
    return str(first)


def _has_rows(sparse: SparseSource) -> bool:
    if isinstance(sparse, pa.Table):
        return sparse.num_rows > 0
    source = sparse if isinstance(sparse, pq.ParquetFile) else pq.ParquetFile(str(sparse))
    return source.metadata.num_rows > 0


def _rerank(candidates, q_texts, q_keys, chunks: pa.Table, masked: dict[int, str], m_keys: dict[int, str],
            rerank_spec, config: RetrievalConfig, device, record: RerankRecord, caches: RetrievalCaches):
    """Cross-encoder scores of each query's top `rerank_top_k`, reordered; retrieval order otherwise. Scores
    of (query, passage) pairs scored before (same reranker, same query hash, same passage hash) are reused."""
    from rag_clean.encoders.factory import load_reranker

    rerank_scores: list[dict[int, float]] = [{} for _ in candidates]
    if not config.enable_rerank:
        return candidates, rerank_scores, "retrieval (rerank disabled)"
    if rerank_spec is None:
        record.resolution = {"requested": None, "resolved": None, "attempts": [], "fallback_applied": True,
                             "reason": "the registry names no rerank model"}
        return _no_reranker(candidates, rerank_scores, record)
    heads = [c[: config.rerank_top_k] for c in candidates]
    rows = np.unique(np.fromiter((d for h in heads for d in h), np.int64)) if any(heads) else np.zeros(0, np.int64)
    hashes = dict(zip(rows.tolist(), take_column(chunks, "content_hash", rows)))
    # A masked gold chunk is scored on its masked text: key it by that text's keyed hash.
    passage_key = {d: m_keys.get(d, hashes[d]) for d in rows.tolist()}
    pair_keys = [[f"{q_keys[qi]}|{passage_key[d]}" for d in h] for qi, h in enumerate(heads)]
    cache = caches.open("rerank_pairs", rerank_spec, "score",
                        fingerprint(model_fingerprint(rerank_spec, caches.digest_cache), device, sources=rerank_spec.candidate_sources()))
    need = cache.missing(k for ks in pair_keys for k in ks)
    # Every pair scored before by the registry's first choice: nothing to load (a fallback is re-resolved,
    # since the first choice may load now).
    cached = cache.extra.get("resolution") or {}
    if not need and cached.get("resolved") == rerank_spec.source and cache.extra.get("scorer"):
        record.resolution, scorer = cached, cache.extra["scorer"]
        record.device = _first_device(device)
    else:
        reranker, resolution = load_reranker(rerank_spec, device, max_batch_pairs=config.rerank_batch_size)
        record.resolution = resolution
        if reranker is None:
            return _no_reranker(candidates, rerank_scores, record)
        try:
            if cached.get("resolved") != resolution.get("resolved") and cache.rows:
                cache.discard_stored("another reranker source resolved; pairs rescored")
                need = cache.missing(k for ks in pair_keys for k in ks)
            text_rows = sorted({d for qi, h in enumerate(heads) for d, pk in zip(h, pair_keys[qi]) if pk in need})
            texts = dict(zip(text_rows, take_column(chunks, "text", text_rows)))
            texts.update({d: masked[d] for d in text_rows if d in masked})
            first = {}
            for qi, h in enumerate(heads):
                for d, pk in zip(h, pair_keys[qi]):
                    if d in texts:
                        first.setdefault(pk, (q_texts[qi], texts[d]))
            pairs = [first[pk] for pk in need]
            scores = reranker.score(pairs) if pairs else np.zeros(0, np.float32)
            for pk, s in zip(need, scores):
                cache.put(pk, np.float32(s))
            record.encode = reranker.stats
            record.device = reranker.stats.device
            scorer = reranker.scorer_id
        finally:
            reranker.close()
        cache.extra = {"resolution": resolution, "scorer": scorer}
    record.rerank_executed = True
    if (record.resolution or {}).get("fallback_applied"):
        record.status = "fallback"
    for qi, h in enumerate(heads):
        for d, pk in zip(h, pair_keys[qi]):
            rerank_scores[qi][d] = float(cache.get(pk))
    record.reuse_counts["rerank_pairs"] = cache.count("pairs")
    return rerank_order(candidates, rerank_scores, config.rerank_top_k), rerank_scores, scorer


def _no_reranker(candidates, rerank_scores, record: RerankRecord):
    record.resolution["fallback_applied"] = True
    record.status = "fallback"
    msg = rerank_unavailable_warning(record.resolution)
    log.debug(msg)  # surfaced once, by whoever runs the stage, from record.warnings
    record.warnings.append(msg)
    return candidates, rerank_scores, NO_RERANKER_SCORER


def _ranking_state(dense_specs, fusion_method, fusion_weights, ensemble_weights, tuning, method,
                   config: RetrievalConfig, rerank_spec, record: RerankRecord, sparse_specs, digest_cache) -> RankingState:
    """What this run chose, for search: the systems that ran (a sparse model whose encoder did not load is
    not one), their weights, the pool sizes and the reranker that resolved (None: retrieval order)."""
    ran_sparse = {s.split(":", 1)[1] for s in tuning.systems[1:]}
    fingerprints = {s.name: model_fingerprint(s, digest_cache) for s in dense_specs}
    fingerprints |= {s.name: sparse_fingerprint(s, digest_cache) for s in sparse_specs if s.name in ran_sparse}
    resolved = (record.resolution or {}).get("resolved") if record.rerank_executed else None
    if rerank_spec is not None and resolved:
        fingerprints[rerank_spec.name] = model_fingerprint(rerank_spec, digest_cache)
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
