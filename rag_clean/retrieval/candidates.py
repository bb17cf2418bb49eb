"""Candidate scoring for evaluation queries: each system scores every document of a query's pool.

- `DenseScorer`: inner products against a (memory-mapped) matrix, with some rows replaced by other
  vectors (the heading-masked text of generated queries' gold chunks, see retrieval.mask_heading).
- `SparseScorer`: exact sparse scores from a pass over the stored rows in blocks (one inverted index per
  block, never one for the whole collection): each query's top-k, then its scores for the pool documents.
  With a torch `device` each block is one sparse x dense product for all queries (`sparse_scan`).
- `build_pools`: per query, the union of every system's top-k, scored by every system and normalized.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from rag_clean.retrieval.hybrid import QueryPool, normalize
from rag_clean.retrieval.flat import SparseIndex, dense_search


class DenseScorer:
    def __init__(self, doc_vectors: np.ndarray, query_vectors: np.ndarray,
                 overrides: Mapping[int, np.ndarray] | None = None, device: str | None = None):
        self.docs, self.queries = doc_vectors, np.asarray(query_vectors, dtype=np.float32)
        self.device = device
        self.override_rows = np.array(sorted(overrides or {}), dtype=np.int64)
        self.override_vectors = (np.stack([overrides[r] for r in self.override_rows]).astype(np.float32)
                                 if len(self.override_rows) else np.zeros((0, self.queries.shape[1]), np.float32))
        # On CUDA the matrix is copied to the device once and every search and pool score reads it there
        # (before: each search streamed it from host memory block by block, and pools were scored on the host).
        self.resident = resident_matrix(doc_vectors, device) if device and str(device).startswith("cuda") else None

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k per query, overridden rows scored with their replacement vectors."""
        n_over = len(self.override_rows)
        idx, scores = dense_search(self.queries, self.docs if self.resident is None else self.resident, k + n_over,
                                   device=self.device)
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
        if self.resident is not None:
            import torch

            rows = torch.from_numpy(np.asarray(docs, np.int64)).to(self.resident.device)
            query = torch.from_numpy(self.queries[qi]).to(self.resident.device)
            out = (self.resident.index_select(0, rows) @ query).cpu().numpy()
        else:
            out = np.asarray(self.docs[docs], dtype=np.float32) @ self.queries[qi]
        if len(self.override_rows):
            hit = np.isin(docs, self.override_rows)
            if hit.any():
                pos = np.searchsorted(self.override_rows, docs[hit])
                out[hit] = self.override_vectors[pos] @ self.queries[qi]
        return out


def resident_matrix(doc_vectors: np.ndarray, device: str, block_rows: int = 65536, headroom: float = 0.5):
    """`doc_vectors` as one float32 tensor on `device`, copied block by block (no whole host copy), or None
    when it would take more than `headroom` of the device's free memory (searches then stream it)."""
    import torch

    n, d = doc_vectors.shape
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    if n * d * 4 > headroom * free:
        return None
    out = torch.empty((n, d), dtype=torch.float32, device=device)
    for start in range(0, n, block_rows):
        block = np.ascontiguousarray(doc_vectors[start:start + block_rows], dtype=np.float32)
        out[start:start + len(block)].copy_(torch.from_numpy(block))
    return out


# One block of stored sparse rows: (chunk rows int64 [b], terms per row int64 [b], flat term ids, flat weights).
SparseBlock = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class SparseScorer:
    """Exact sparse scores of every query, computed blockwise over the stored rows.

    `blocks()` yields the stored rows (any order, any block size; it may be called more than once);
    `overrides` replaces some rows (the masked gold chunks). `prepare(k, wanted)` makes one pass: each
    query's top-k (scores > 0, ties to the lower row) and its scores for `wanted[qi]`; `fill(pools)` adds
    the scores of pool documents not seen yet (one more pass, only when some are missing)."""

    def __init__(self, blocks: Callable[[], Iterator[SparseBlock]], n_docs: int,
                 query_rows: Sequence[tuple[np.ndarray, np.ndarray]],
                 overrides: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None, device: str | None = None):
        self.blocks, self.n_docs = blocks, int(n_docs)
        # None: the numpy inverted index per query (CPU); a torch device: one product per block (sparse_scan).
        self.device = device
        self.query_rows = [(np.asarray(t, np.int64), np.asarray(w, np.float32)) for t, w in query_rows]
        self.override_rows = np.array(sorted(overrides or {}), dtype=np.int64)
        self._over_index = SparseIndex([np.asarray(overrides[r][0]) for r in self.override_rows],
                                       [np.asarray(overrides[r][1]) for r in self.override_rows]) \
            if len(self.override_rows) else None
        self._top: list[np.ndarray] = []
        self._known: list[dict[int, float]] = [{} for _ in self.query_rows]

    def _scan(self, wanted: Sequence[np.ndarray], k: int | None) -> None:
        if self.device is not None:
            from rag_clean.retrieval.sparse_scan import scan_blocks

            top, found = scan_blocks(self._all_blocks(), self.n_docs, self.query_rows, wanted, k, self.device)
            for qi, (docs, vals) in enumerate(found):
                self._known[qi].update(zip(docs.tolist(), vals.tolist()))
            if k is not None:
                for qi, (docs, vals) in enumerate(top):
                    self._known[qi].update(zip(docs.tolist(), vals.tolist()))
                self._top = [docs for docs, _ in top]
            return
        nq = len(self.query_rows)
        best_idx = [np.zeros(0, np.int64) for _ in range(nq)]
        best_val = [np.zeros(0, np.float32) for _ in range(nq)]
        wanted = [np.unique(np.asarray(w, np.int64)) for w in wanted]
        seen = np.zeros(self.n_docs, dtype=bool)
        for rows, lengths, terms, weights in self._all_blocks():
            seen[rows] = True
            index = SparseIndex.from_flat(len(rows), lengths, terms, weights)
            order = np.arange(len(rows)) if np.all(rows[1:] > rows[:-1]) else np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            for qi, (q_terms, q_weights) in enumerate(self.query_rows):
                scores = index.score_all(q_terms, q_weights)
                if k is not None:
                    hits = np.flatnonzero(scores > 0)
                    if len(hits) > k:
                        # Only scores >= the block's k-th largest can reach the top k (ties kept, so the
                        # lexsort below breaks them by row exactly as over every hit).
                        kth = np.partition(scores[hits], len(hits) - k)[len(hits) - k]
                        hits = hits[scores[hits] >= kth]
                    docs = np.concatenate([best_idx[qi], rows[hits]])
                    vals = np.concatenate([best_val[qi], scores[hits]])
                    keep = np.lexsort((docs, -vals))[:k]
                    best_idx[qi], best_val[qi] = docs[keep], vals[keep]
                w = wanted[qi]
                if len(w):
                    pos = np.searchsorted(sorted_rows, w)
                    pos[pos >= len(sorted_rows)] = 0
                    hit = sorted_rows[pos] == w if len(sorted_rows) else np.zeros(len(w), bool)
                    known = self._known[qi]
                    for d, s in zip(w[hit].tolist(), scores[order[pos[hit]]].tolist()):
                        known[d] = s
        missing = np.flatnonzero(~seen)
        if len(missing):
            from rag_clean.storage.errors import StorageError

            raise StorageError(f"sparse_vectors lacks {len(missing)} of the current chunks (first: row "
                               f"{int(missing[0])}): rematerialize sparse_vectors")
        if k is not None:
            for qi in range(nq):
                for d, s in zip(best_idx[qi].tolist(), best_val[qi].tolist()):
                    self._known[qi][d] = s
            self._top = best_idx

    def _all_blocks(self) -> Iterator[SparseBlock]:
        """The stored rows with the overridden rows swapped for their replacements (scored as one block)."""
        over = self.override_rows
        for rows, lengths, terms, weights in self.blocks():
            if len(over) and np.isin(rows, over).any():
                drop = np.isin(rows, over)
                per_row = np.repeat(drop, lengths)
                rows, lengths, terms, weights = rows[~drop], lengths[~drop], terms[~per_row], weights[~per_row]
            yield rows, lengths, terms, weights
        if len(over):
            idx = self._over_index
            lengths = np.bincount(idx.docs, minlength=len(over)) if len(idx.docs) else np.zeros(len(over), np.int64)
            order = np.argsort(idx.docs, kind="stable")
            yield over, lengths, idx.terms[order], idx.weights[order]

    def prepare(self, k: int, wanted: Sequence[np.ndarray]) -> None:
        self._scan(wanted, k)

    def fill(self, pools: Sequence[np.ndarray]) -> None:
        missing = [np.array([d for d in p.tolist() if d not in known], np.int64) for p, known in zip(pools, self._known)]
        if any(len(m) for m in missing):
            self._scan(missing, None)

    def top_k(self, qi: int, k: int) -> np.ndarray:
        return self._top[qi][:k]

    def scores(self, qi: int, docs: np.ndarray) -> np.ndarray:
        known = self._known[qi]
        return np.array([known.get(int(d), 0.0) for d in docs], dtype=np.float32)


def build_pools(dense_top: np.ndarray, dense_score, sparse: Sequence[SparseScorer], top_k: int,
                normalization: str) -> tuple[list[QueryPool], list[list[np.ndarray]]]:
    """(pool per query, each sparse system's top-k per query). `dense_score(qi, docs)` scores a pool for
    the dense system (the fused vectors, or the tuned ensemble's weighted sum of per-model scores)."""
    for s in sparse:
        s.prepare(top_k, list(dense_top))
    sparse_tops = [[s.top_k(qi, top_k) for qi in range(len(dense_top))] for s in sparse]
    docs_of = [np.unique(np.concatenate([dense_top[qi], *[t[qi] for t in sparse_tops]])).astype(np.int64)
               for qi in range(len(dense_top))]
    for s in sparse:
        s.fill(docs_of)
    pools = []
    for qi, docs in enumerate(docs_of):
        raw = [dense_score(qi, docs)] + [s.scores(qi, docs) for s in sparse]
        pools.append(QueryPool(docs, np.stack([normalize(r, normalization) for r in raw])))
    return pools, sparse_tops
