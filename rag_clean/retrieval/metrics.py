"""Ranking metrics against gold chunk ids: recall@k, MRR (whole list and @10), nDCG@10.

Relevance is binary (a chunk is gold or not). Queries without gold ids are left out of every mean;
a metric over no such query is None.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)


def _pairs(ranked: Sequence[Sequence[str]], gold: Sequence[Iterable[str]]) -> list[tuple[Sequence[str], set]]:
    return [(r, set(g)) for r, g in zip(ranked, gold) if set(g)]


def recall_at_k(ranked: Sequence[Sequence[str]], gold: Sequence[Iterable[str]], k: int) -> float:
    """Share of queries (with gold) that have at least one gold chunk in their top k."""
    pairs = _pairs(ranked, gold)
    if not pairs:
        return float("nan")
    return float(np.mean([bool(set(r[:k]) & g) for r, g in pairs]))


def reciprocal_ranks(ranked: Sequence[Sequence[str]], gold: Sequence[Iterable[str]],
                     cutoff: int | None = None) -> np.ndarray:
    """Per query with gold: 1 / rank of its first gold chunk (0 when none is in the first `cutoff`, if given)."""
    rr = []
    for r, g in _pairs(ranked, gold):
        head = r if cutoff is None else r[:cutoff]
        rr.append(next((1.0 / i for i, cid in enumerate(head, start=1) if cid in g), 0.0))
    return np.asarray(rr, dtype=np.float64)


def mean_reciprocal_rank(ranked: Sequence[Sequence[str]], gold: Sequence[Iterable[str]],
                         cutoff: int | None = None) -> float:
    """Mean of 1 / rank of the first gold chunk (0 when none is in the first `cutoff`, if given)."""
    rr = reciprocal_ranks(ranked, gold, cutoff)
    return float(rr.mean()) if len(rr) else float("nan")


def ndcg_at_k(ranked: Sequence[Sequence[str]], gold: Sequence[Iterable[str]], k: int = 10) -> float:
    """Binary-relevance nDCG@k: DCG = sum of 1 / log2(rank + 1) over gold chunks in the top k, divided
    by the DCG of an ideal list that puts min(|gold|, k) gold chunks first."""
    pairs = _pairs(ranked, gold)
    if not pairs:
        return float("nan")
    scores = []
    for r, g in pairs:
        dcg = sum(1.0 / math.log2(i + 1) for i, cid in enumerate(r[:k], start=1) if cid in g)
        ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(g), k) + 1))
        scores.append(dcg / ideal)
    return float(np.mean(scores))


def ranking_metrics(ranked: Sequence[Sequence[str]], gold: Sequence[Iterable[str]], ks=DEFAULT_KS) -> dict[str, float]:
    out = {f"recall@{k}": recall_at_k(ranked, gold, k) for k in ks}
    out["mrr"] = mean_reciprocal_rank(ranked, gold)
    if ks == DEFAULT_KS:
        out["mrr@10"] = mean_reciprocal_rank(ranked, gold, cutoff=10)
        out["ndcg@10"] = ndcg_at_k(ranked, gold, 10)
    return {k: (round(v, 6) if v == v else None) for k, v in out.items()}
