"""Sparse candidate scan on a torch device: one sparse x dense product per block for all queries.

Why: the numpy path (`SparseIndex.score_all`) loops over queries and query terms in Python for every block;
here a block of stored rows is one CSR matrix [rows, query terms] times the queries' dense weights
[query terms, queries] (cuSPARSE on CUDA), and each query's running top-k is kept with one sort over all
queries. Same results as the numpy path: top-k of scores > 0, ties to the lower row, plus each query's
score at the rows it asks for. Only the terms some query uses are kept (the rest cannot score).
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np

# (rows int64 [b], terms per row [b], flat term ids, flat weights): candidates.SparseBlock
Block = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def sparse_scan_device(device) -> str | None:
    """The device the scan runs on, from a step's device ("cuda:0", "cuda:0,cuda:1" or a list: the first):
    a CUDA device; None (the numpy path) for the CPU, where the per-query inverted index needs no torch."""
    first = device[0] if isinstance(device, (list, tuple)) else str(device or "").split(",")[0]
    first = str(first).strip()
    return first if first.startswith("cuda") else None


def query_matrix(query_rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct query terms [t], weights [t, queries] float32; repeated terms of a query add up)."""
    all_terms = [np.asarray(t, np.int64) for t, _ in query_rows]
    vocab = np.unique(np.concatenate(all_terms)) if all_terms else np.zeros(0, np.int64)
    dense = np.zeros((len(vocab), len(query_rows)), np.float32)
    for qi, (terms, weights) in enumerate(query_rows):
        np.add.at(dense[:, qi], np.searchsorted(vocab, np.asarray(terms, np.int64)), np.asarray(weights, np.float32))
    return vocab, dense


def _first_k_per_query(q: np.ndarray, docs: np.ndarray, vals: np.ndarray, k: int):
    """Rows sorted by (query, -score, row) and cut to k per query."""
    order = np.lexsort((docs, -vals, q))
    q, docs, vals = q[order], docs[order], vals[order]
    starts = np.searchsorted(q, q, side="left")
    keep = (np.arange(len(q)) - starts) < k
    return q[keep], docs[keep], vals[keep]


def scan_blocks(blocks: Iterable[Block], n_docs: int, query_rows: Sequence[tuple[np.ndarray, np.ndarray]],
                wanted: Sequence[np.ndarray], k: int | None, device: str):
    """One pass over `blocks` on `device`.

    Returns (top, found): top[qi] = (rows, scores) of query qi's top k (scores > 0, highest first, ties to
    the lower row; empty lists when k is None); found[qi] = (rows, scores) at the rows of wanted[qi] that the
    blocks hold. Raises StorageError when some row of 0..n_docs-1 is in no block.
    """
    import torch

    nq = len(query_rows)
    vocab, q_dense = query_matrix(query_rows)
    q_mat = torch.from_numpy(q_dense).to(device)
    w_q = np.concatenate([np.full(len(np.unique(w)), qi, np.int64) for qi, w in enumerate(wanted)]) if nq else \
        np.zeros(0, np.int64)
    w_d = np.concatenate([np.unique(np.asarray(w, np.int64)) for w in wanted]) if nq else np.zeros(0, np.int64)
    best = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))  # (query, row, score)
    found_q, found_d, found_v = [], [], []
    seen = np.zeros(n_docs, dtype=bool)
    for rows, lengths, terms, weights in blocks:
        seen[rows] = True
        b = len(rows)
        if not b or not nq:
            continue
        terms = np.asarray(terms, np.int64)
        # Keep the postings of terms some query has, renumbered into the query vocabulary.
        pos = np.searchsorted(vocab, terms)
        pos[pos >= len(vocab)] = 0
        used = (vocab[pos] == terms) if len(vocab) else np.zeros(len(terms), bool)
        row_of = np.repeat(np.arange(b), np.asarray(lengths, np.int64))[used]
        crow = np.zeros(b + 1, np.int64)
        np.cumsum(np.bincount(row_of, minlength=b), out=crow[1:])
        if not len(vocab):
            scores = torch.zeros((nq, b), dtype=torch.float32, device=device)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta": the tests pin the results
                csr = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(pos[used]),
                                              torch.from_numpy(np.asarray(weights, np.float32)[used]),
                                              size=(b, len(vocab)), check_invariants=False).to(device)
            scores = (csr @ q_mat).T.contiguous()  # [queries, rows of the block]
        if k is not None:
            kk = min(k, b)
            kth = torch.topk(scores, kk, dim=1).values[:, -1:]
            # >= the k-th largest (ties kept, broken by row below, as the numpy path does) and > 0.
            qi, local = torch.nonzero((scores >= kth) & (scores > 0), as_tuple=True)
            vals = scores[qi, local].cpu().numpy()
            qi, local = qi.cpu().numpy(), local.cpu().numpy()
            best = _first_k_per_query(np.concatenate([best[0], qi]), np.concatenate([best[1], rows[local]]),
                                      np.concatenate([best[2], vals]), k)
        if len(w_d):
            order = np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            at = np.searchsorted(sorted_rows, w_d)
            at[at >= b] = 0
            hit = sorted_rows[at] == w_d
            if hit.any():
                local = torch.from_numpy(order[at[hit]]).to(device)
                qsel = torch.from_numpy(w_q[hit]).to(device)
                found_q.append(w_q[hit])
                found_d.append(w_d[hit])
                found_v.append(scores[qsel, local].cpu().numpy())
    missing = np.flatnonzero(~seen)
    if len(missing):
        from rag_clean.storage.errors import StorageError

        raise StorageError(f"sparse_vectors lacks {len(missing)} of the current chunks (first: row "
                           f"{int(missing[0])}): rematerialize sparse_vectors")
    top = [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(nq)]
    if k is not None and len(best[0]):
        bounds = np.searchsorted(best[0], np.arange(nq + 1))
        top = [(best[1][bounds[i]:bounds[i + 1]], best[2][bounds[i]:bounds[i + 1]]) for i in range(nq)]
    fq = np.concatenate(found_q) if found_q else np.zeros(0, np.int64)
    fd = np.concatenate(found_d) if found_d else np.zeros(0, np.int64)
    fv = np.concatenate(found_v) if found_v else np.zeros(0, np.float32)
    by_q = np.argsort(fq, kind="stable")
    fq, fd, fv = fq[by_q], fd[by_q], fv[by_q]
    bounds = np.searchsorted(fq, np.arange(nq + 1))
    found = [(fd[bounds[i]:bounds[i + 1]], fv[bounds[i]:bounds[i + 1]]) for i in range(nq)]
    return top, found
