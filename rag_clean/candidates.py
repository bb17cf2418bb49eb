"""Candidate scoring for evaluation queries: each system scores every document of a query's pool.

- `DenseScorer`: inner products against a (memory-mapped) matrix, with some rows replaced by other
  vectors (the heading-masked text of generated queries' gold chunks, see retrieval.mask_heading).
- `SparseScorer`: the inverted index's exact scores for any document.
- `build_pools`: per query, the union of every system's top-k, scored by every system and normalized.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rag_clean.hybrid import QueryPool, normalize
from rag_clean.retrieval import SparseIndex, dense_search


class DenseScorer:
    def __init__(self, doc_vectors: np.ndarray, query_vectors: np.ndarray,
                 overrides: Mapping[int, np.ndarray] | None = None):
        self.docs, self.queries = doc_vectors, np.asarray(query_vectors, dtype=np.float32)
        self.override_rows = np.array(sorted(overrides or {}), dtype=np.int64)
        self.override_vectors = (np.stack([overrides[r] for r in self.override_rows]).astype(np.float32)
                                 if len(self.override_rows) else np.zeros((0, self.queries.shape[1]), np.float32))

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k per query, overridden rows scored with their replacement vectors."""
        n_over = len(self.override_rows)
        idx, scores = dense_search(self.queries, self.docs, k + n_over)
        if not n_over:
            return idx[:, :k], scores[:, :k]
        over_scores = self.queries @ self.override_vectors.T
        out_idx, out_scores = [], []
        for qi in range(len(self.queries)):
            keep = ~np.isin(idx[qi], self.override_rows)
            docs = np.concatenate([idx[qi][keep], self.override_rows])
            vals = np.concatenate([scores[qi][keep], over_scores[qi]])
            order = np.lexsort((docs, -vals))[:k]
            out_idx.append(docs[order])
            out_scores.append(vals[order])
        return np.array(out_idx), np.array(out_scores)

    def scores(self, qi: int, docs: np.ndarray) -> np.ndarray:
        out = np.asarray(self.docs[docs], dtype=np.float32) @ self.queries[qi]
        if len(self.override_rows):
            hit = np.isin(docs, self.override_rows)
            if hit.any():
                pos = np.searchsorted(self.override_rows, docs[hit])
                out[hit] = self.override_vectors[pos] @ self.queries[qi]
        return out


class SparseScorer:
    def __init__(self, index: SparseIndex, query_rows: Sequence[tuple[np.ndarray, np.ndarray]]):
        self.index, self.query_rows = index, list(query_rows)
        self._cache: tuple[int, np.ndarray] | None = None

    def _all(self, qi: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != qi:  # pools are built query by query
            self._cache = (qi, self.index.score_all(*self.query_rows[qi]))
        return self._cache[1]

    def top_k(self, qi: int, k: int) -> np.ndarray:
        scores = self._all(qi)
        hits = np.flatnonzero(scores > 0)
        return hits[np.lexsort((hits, -scores[hits]))][:k]

    def scores(self, qi: int, docs: np.ndarray) -> np.ndarray:
        return self._all(qi)[docs].astype(np.float32)


def build_pools(dense_top: np.ndarray, dense_score, sparse: Sequence[SparseScorer], top_k: int,
                normalization: str) -> tuple[list[QueryPool], list[list[np.ndarray]]]:
    """(pool per query, each sparse system's top-k per query). `dense_score(qi, docs)` scores a pool for
    the dense system (the fused vectors, or the tuned ensemble's weighted sum of per-model scores)."""
    pools, sparse_tops = [], [[] for _ in sparse]
    for qi in range(len(dense_top)):
        tops = [s.top_k(qi, top_k) for s in sparse]
        for j, t in enumerate(tops):
            sparse_tops[j].append(t)
        docs = np.unique(np.concatenate([dense_top[qi], *tops])).astype(np.int64)
        raw = [dense_score(qi, docs)] + [s.scores(qi, docs) for s in sparse]
        pools.append(QueryPool(docs, np.stack([normalize(r, normalization) for r in raw])))
    return pools, sparse_tops
