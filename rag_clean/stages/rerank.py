"""The rerank step of the reranked stage: cross-encoder scores of each query's top K (cached by query and
passage hash), the registry's fallback chain, and the one warning when no cross-encoder loads."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pyarrow as pa

from rag_clean.config.models import ResolvedModel
from rag_clean.config.plan import RetrievalConfig
from rag_clean.config.registry import ModelSpec
from rag_clean.retrieval.cache import RetrievalCaches, fingerprint
from rag_clean.retrieval.flat import take_column
from rag_clean.retrieval.ranking import NO_RERANKER_SCORER, rerank_order, rerank_unavailable_warning
from rag_clean.telemetry.progress import ProgressLog, announce_loading
from rag_clean.telemetry.downstream_records import RerankRecord

log = logging.getLogger(__name__)

RERANK_STEP = 2048  # (query, passage) pairs scored per call: a progress line can follow each


def first_device(device: str | list[str]) -> str:
    first = device[0] if isinstance(device, (list, tuple)) else str(device).split(",")[0]
    return str(first)


def rerank(candidates, q_texts, q_keys, chunks: pa.Table, masked: dict[int, str], m_keys: dict[int, str],
           rerank_spec: ModelSpec | None, model_of: Callable[[ModelSpec], ResolvedModel], config: RetrievalConfig,
           device, record: RerankRecord, caches: RetrievalCaches, progress=None):
    """Cross-encoder scores of each query's top `rerank_top_k`, reordered; retrieval order otherwise. Scores
    of (query, passage) pairs scored before (same reranker, same query hash, same passage hash) are reused.
    `progress` (StageContext.progress) gets "loading model <name>", then done/total, rate and ETA lines while
    pairs are scored."""
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
                        fingerprint(model_of(rerank_spec).fingerprint, device, sources=rerank_spec.candidate_sources()))
    need = cache.missing(k for ks in pair_keys for k in ks)
    # Every pair scored before by the registry's first choice: nothing to load (a fallback is re-resolved,
    # since the first choice may load now).
    cached = cache.extra.get("resolution") or {}
    if not need and cached.get("resolved") == rerank_spec.source and cache.extra.get("scorer"):
        record.resolution, scorer = cached, cache.extra["scorer"]
        record.device = first_device(device)
    else:
        announce_loading(progress, rerank_spec.name)
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
            meter = ProgressLog(f"{rerank_spec.name} pairs", len(pairs), progress, unit="pairs")
            scores = np.zeros(0, np.float32)
            for start in range(0, len(pairs), RERANK_STEP):  # in steps, so the run log shows progress
                scores = np.concatenate([scores, reranker.score(pairs[start:start + RERANK_STEP])])
                meter.update(min(RERANK_STEP, len(pairs) - start))
            meter.finish()
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


