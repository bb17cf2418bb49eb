"""How a query is ranked, once, for the `reranked` stage (every evaluation query against the whole collection)
and for search (one query against the vector index's candidates): query-side encodings, the fused query
vector, the dense system's score, the hybrid candidates from per-query pools and the cross-encoder reorder.

Both callers go through these functions, so the metrics `reranked` reports are the quality search gives.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from rag_clean.config.registry import ModelSpec
from rag_clean.retrieval.cache import one_text_per_forward
from rag_clean.retrieval.candidates import DenseScorer
from rag_clean.retrieval.flat import rrf_fuse
from rag_clean.retrieval.fusion import fuse_queries, truncate_and_normalize
from rag_clean.retrieval.hybrid import QueryPool

log = logging.getLogger(__name__)

SparseRow = tuple[np.ndarray, np.ndarray]   # (term ids, weights)


# ---------------------------------------------------------------- query side

def encode_dense_texts(encoder, texts: Sequence[str], device, *, queries: bool, progress=None) -> np.ndarray:
    """Native-width vectors of `texts`, one text per forward (cache.one_text_per_forward: the same bits
    whatever else is encoded). `queries`: with the model's query instruction (DenseEncoder.encode_queries).
    `progress`: a telemetry.progress.ProgressLog counting the texts done."""
    with one_text_per_forward(encoder, device):
        return (encoder.encode_queries(list(texts), progress) if queries
                else encoder.encode_all(list(texts), progress))


def encode_sparse_texts(encoder, texts: Sequence[str], device, progress=None) -> list[SparseRow]:
    """(term ids, weights) of each text in input order, one text per forward; `progress` as above."""
    from rag_clean.telemetry.progress import track

    out: list = [None] * len(texts)
    if not texts:
        return out
    with one_text_per_forward(encoder, device):
        batches = encoder.encode(list(texts))
        for batch in (batches if progress is None else track(batches, progress)):
            for i, row in zip(batch.rows, batch.lexical):
                out[int(i)] = row
    return out


def model_query_vectors(spec: ModelSpec, native: np.ndarray) -> np.ndarray:
    """A model's query vectors as its stored document vectors are: Matryoshka-truncated, renormalized."""
    return truncate_and_normalize(native, spec.truncate_dim, model=spec.name)


def fused_query_vectors(specs: Sequence[ModelSpec], per_model: Sequence[np.ndarray],
                        fusion_weights: Mapping[str, float], method: str) -> np.ndarray:
    """The per-model query vectors fused as fused_embeddings fused the documents."""
    return fuse_queries(per_model, [fusion_weights[s.name] for s in specs], method)


def ensemble_score(per_model: Sequence[DenseScorer], weights: Sequence[float]) -> Callable[[int, np.ndarray], np.ndarray]:
    """The dense system's score with tuned ensemble weights: the weighted sum of each model's cosine."""
    weights = list(weights)
    return lambda qi, docs: sum(wi * m.scores(qi, docs) for wi, m in zip(weights, per_model))


# ---------------------------------------------------------------- candidates

def hybrid_method(systems: Sequence[str], fusion: str) -> str:
    """"dense" when only the dense system ran, else the hybrid_fusion setting ("weighted" or "rrf")."""
    return fusion if len(systems) > 1 else "dense"


def rrf_rankings(dense_top: np.ndarray, sparse_tops: Sequence[Sequence[np.ndarray]], rrf_k: int,
                 top_k: int) -> list[tuple[list[int], dict[int, float]]]:
    """Per query: the reciprocal-rank fusion of the dense top-k and each sparse system's top-k."""
    return [rrf_fuse([dense_top[qi], *[t[qi] for t in sparse_tops]], k=rrf_k, top_k=top_k)
            for qi in range(len(dense_top))]


def hybrid_candidates(method: str, pools: Sequence[QueryPool], dense_top: np.ndarray, dense_scores: np.ndarray,
                      sparse_tops: Sequence[Sequence[np.ndarray]], weights: Sequence[float], top_k: int,
                      rrf_k: int) -> tuple[list[list[int]], list[dict[int, float]]]:
    """(candidate docs per query in retrieval order, each one's retrieval score) for `method` (hybrid_method):
    the dense top-k as ranked; RRF of the systems' top-k; or the pool ranked by the weighted sum of the
    normalized scores, `weights` in system order."""
    if method == "rrf":
        rrf = rrf_rankings(dense_top, sparse_tops, rrf_k, top_k)
        return [list(map(int, r)) for r, _ in rrf], [{int(d): float(s[d]) for d in r} for r, s in rrf]
    if method == "weighted":
        ranked = [p.ranking(weights, top_k) for p in pools]
        return [list(map(int, d)) for d, _ in ranked], [dict(zip(map(int, d), map(float, s))) for d, s in ranked]
    if method == "dense":
        return ([list(map(int, row)) for row in dense_top],
                [dict(zip(map(int, i), map(float, s))) for i, s in zip(dense_top, dense_scores)])
    raise ValueError(f"unknown hybrid method {method!r}; expected dense, weighted or rrf")


# ---------------------------------------------------------------- rerank

def rerank_order(candidates: Sequence[list[int]], rerank_scores: Sequence[Mapping[int, float]],
                 top_k: int) -> list[list[int]]:
    """Each query's first `top_k` candidates by cross-encoder score (ties keep retrieval order), the rest as
    they were."""
    out = []
    for qi, c in enumerate(candidates):
        head = sorted(c[:top_k], key=lambda d: -rerank_scores[qi][d])
        out.append(head + list(c[top_k:]))
    return out


# "...: LocalEntryNotFoundError: ..." inside an error's text: the chained cause, the same for every hub source.
_NESTED_ERROR = re.compile(r": [A-Z]\w*(?:Error|Exception): ")


def first_line(text: str, limit: int = 240) -> str:
    """The first line of an error, without a chained cause, at most `limit` characters."""
    line = next((l.strip() for l in str(text).splitlines() if l.strip()), "")
    line = _NESTED_ERROR.split(line, maxsplit=1)[0]
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


NO_RERANKER_SCORER = "retrieval (no cross-encoder could be loaded)"


def rerank_unavailable_warning(resolution: dict) -> str:
    """One header line, then one line per source tried with the first line of its error: a hub error
    repeats the whole offline explanation, which made the old one-line message 1,400 characters long."""
    lines = ["rerank: no cross-encoder could be loaded; results keep retrieval order."]
    attempts = resolution.get("attempts") or []
    if attempts:
        lines += [f"  - {a.get('source')}: {first_line(a.get('error', ''))}" for a in attempts]
    elif resolution.get("reason"):
        lines.append(f"  - {first_line(resolution['reason'])}")
    return "\n".join(lines)
