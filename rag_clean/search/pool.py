"""One query's candidates from the vector index, ranked exactly as `reranked` ranks them.

`reranked` scores every chunk of the collection; search asks the index for each system's top-k only. The
union of those top-k lists (the pool) is all that `reranked` ever ranks for the query (its pool is that same
union), so the same scorers (retrieval/candidates.py) run over the pool's points, with the vectors the index
returns, and the same pool building and hybrid ranking (retrieval/ranking.py) follow.

Points are numbered in chunk-row order (`chunks` table order, when the storage root has it): every tie that
`reranked` breaks "to the lower row" breaks the same way here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from rag_clean.index.base import FUSED, vector_name
from rag_clean.retrieval.candidates import DenseScorer, SparseScorer, build_pools
from rag_clean.retrieval.flat import chunk_rows
from rag_clean.retrieval.ranking import SparseRow, ensemble_score, hybrid_candidates
from rag_clean.retrieval.ranking_state import RankingState


class SearchIndexError(RuntimeError):
    """The index lacks a point or a vector the ranking needs; the message says which and what to do."""


@dataclass
class QueryVectors:
    """One query's side, as encoded by the Searcher: fused and per-model dense vectors (1 x dim each) and one
    (term ids, weights) row per sparse system, in RankingState.systems order."""

    fused: np.ndarray
    per_model: list[np.ndarray]
    sparse: list[SparseRow]


@dataclass
class Pool:
    """The pool's points in chunk-row order (payloads with "vectors") and the ranking of them."""

    points: list[dict]
    candidates: list[int]           # indices into points, retrieval order
    scores: dict[int, float]        # retrieval score of each candidate


def pool_chunk_ids(index, state: RankingState, query: QueryVectors, top_k: int) -> list[str]:
    """The union of every system's top-k from the index, each id once (first-seen order)."""
    ids = [h.chunk_id for h in index.dense_search(FUSED, query.fused[0], top_k, exact=True)]
    for model, (terms, weights) in zip(state.sparse_models, query.sparse):
        if len(terms):
            ids += [h.chunk_id for h in index.sparse_search(vector_name(model), terms, weights, top_k)]
    return list(dict.fromkeys(ids))


def row_order(chunk_ids: Sequence[str], chunks: pa.Table | None) -> np.ndarray:
    """Positions of `chunk_ids` sorted by their row in `chunks` (reranked's doc numbering); ids not there (or
    no table) after them, by chunk_id."""
    rows = chunk_rows(chunks, list(chunk_ids)) if chunks is not None else np.full(len(chunk_ids), -1, np.int64)
    keys = [(0, int(r), "") if r >= 0 else (1, 0, c) for r, c in zip(rows.tolist(), chunk_ids)]
    return np.array(sorted(range(len(chunk_ids)), key=keys.__getitem__), dtype=np.int64)


def rank_pool(index, state: RankingState, query: QueryVectors, top_k: int, chunks: pa.Table | None) -> Pool:
    ids = pool_chunk_ids(index, state, query, top_k)
    ensemble = state.ensemble_weights is not None
    names = [FUSED, *([vector_name(m) for m in state.dense_models] if ensemble else []),
             *(vector_name(m) for m in state.sparse_models)]
    points = index.retrieve(ids, with_vectors=names) if ids else []
    if len(points) != len(ids):
        found = {p.get("chunk_id") for p in points}
        gone = [c for c in ids if c not in found]
        raise SearchIndexError(f"the index returned ids it cannot retrieve ({gone[:3]}): it changed during the "
                               "query; search again")
    points = [points[i] for i in row_order([p["chunk_id"] for p in points], chunks)]
    if not points:
        return Pool([], [], {})

    dense = DenseScorer(_dense_matrix(points, FUSED), query.fused)
    dense_top, dense_scores = dense.top_k(top_k)
    dense_score = dense.scores
    if ensemble:
        per_model = [DenseScorer(_dense_matrix(points, vector_name(m)), q)
                     for m, q in zip(state.dense_models, query.per_model)]
        dense_score = ensemble_score(per_model, [state.ensemble_weights[m] for m in state.dense_models])
    sparse = [_sparse_scorer(points, vector_name(m), row) for m, row in zip(state.sparse_models, query.sparse)]
    pools, sparse_tops = build_pools(dense_top, dense_score, sparse, top_k, state.normalization)
    candidates, scores = hybrid_candidates(state.method, pools, dense_top, dense_scores, sparse_tops,
                                           state.system_weights(), top_k, state.rrf_k)
    return Pool(points, candidates[0], scores[0])


def _dense_matrix(points: list[dict], name: str) -> np.ndarray:
    try:
        return np.stack([np.asarray(p["vectors"][name], dtype=np.float32) for p in points])
    except KeyError:
        missing = next(p["chunk_id"] for p in points if name not in p.get("vectors", {}))
        raise SearchIndexError(f"index point {missing!r} has no {name!r} vector: rematerialize vector_index "
                               "(the ensemble changed since it was built?)") from None


def _sparse_scorer(points: list[dict], name: str, query_row: SparseRow) -> SparseScorer:
    """The pool's stored term weights as one block (a point without them scores 0, as an empty row)."""
    rows = [p.get("vectors", {}).get(name) for p in points]
    lengths = np.array([0 if r is None else len(r[0]) for r in rows], dtype=np.int64)
    terms = np.concatenate([np.asarray(r[0], np.int64) for r in rows if r is not None] or [np.zeros(0, np.int64)])
    weights = np.concatenate([np.asarray(r[1], np.float32) for r in rows if r is not None]
                             or [np.zeros(0, np.float32)])
    block = (np.arange(len(points), dtype=np.int64), lengths, terms, weights)
    return SparseScorer(lambda: iter([block]), len(points), [query_row])
