"""Hybrid candidate fusion: per-query normalized scores, a weighted sum, weights tuned on held-out splits.

Each retrieval system (the dense ensemble, each sparse model) scores every candidate of a query's pool
(the union of the systems' top-k). Scores are normalized per query (min-max or z-score) and combined
as a weighted sum, a convex combination that beats reciprocal-rank fusion in and out of domain
(Bruch et al., "An Analysis of Fusion Functions for Hybrid Retrieval", TOIS 2023). The weights are
chosen on a tuning split of the collection's queries and reported on the held-out rest, never on the
queries they were tuned on; they replace the documented default only when cross-validation on the tuning
split shows a gain above its noise (choose_weights). With too few queries the default is used.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from rag_clean.retrieval.metrics import ranking_metrics, reciprocal_ranks

# On chunked documentation with heading queries (738 chunks, 557 queries, default offline models) the
# best dense share was 0.3 (MRR 0.756 vs 0.691 for RRF); used when a collection has too few queries to tune.
DEFAULT_DENSE_WEIGHT = 0.3
GRID_STEP = 0.1
COARSE_GRID_STEP = 0.2  # three or more systems: 21 grid points instead of 66
SPLIT_SALT = b"rag_clean/query-split/v1"
OBJECTIVE = "mrr@10"


def split_queries(query_ids: Sequence[str], tune_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(tuning indices, held-out indices): a stable split by a hash of each query id, so adding a query
    never moves the others between splits."""
    position = np.array([int.from_bytes(hashlib.sha256(SPLIT_SALT + q.encode()).digest()[:8], "big") / 2**64
                         for q in query_ids])
    tune = np.flatnonzero(position < tune_fraction)
    return tune, np.setdiff1d(np.arange(len(query_ids)), tune)


def normalize(scores: np.ndarray, method: str) -> np.ndarray:
    """Per-query normalization of one system's scores over the query's pool (NaN = not retrieved: lowest)."""
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    if not finite.any():
        return np.zeros_like(s)
    lo = s[finite].min()
    if method == "zscore":
        mean, std = s[finite].mean(), s[finite].std()
        out = (s - mean) / std if std > 0 else np.zeros_like(s)
        return np.where(finite, out, (lo - mean) / std if std > 0 else 0.0)
    hi = s[finite].max()
    out = (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)
    return np.where(finite, out, 0.0)


def weight_grid(n_systems: int, step: float = GRID_STEP) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex with `step` resolution (n_systems = 1: just (1.0,))."""
    units = int(round(1 / step))
    out = []
    for cut in itertools.combinations(range(units + n_systems - 1), n_systems - 1):
        parts = np.diff([-1, *cut, units + n_systems - 1]) - 1
        out.append(tuple(round(p / units, 6) for p in parts))
    return out


def default_weights(systems: Sequence[str], dense_weight: float = DEFAULT_DENSE_WEIGHT) -> tuple[float, ...]:
    """The dense system at `dense_weight`, the sparse systems sharing the rest equally."""
    if len(systems) == 1:
        return (1.0,)
    sparse_share = (1.0 - dense_weight) / (len(systems) - 1)
    return tuple(dense_weight if s == "dense" else sparse_share for s in systems)


@dataclass
class QueryPool:
    """One query's candidates and each system's normalized score for them ([systems, candidates])."""

    docs: np.ndarray
    normalized: np.ndarray

    def ranking(self, weights: Sequence[float], top_k: int) -> tuple[np.ndarray, np.ndarray]:
        fused = np.asarray(weights, dtype=np.float64) @ self.normalized
        order = np.lexsort((self.docs, -fused))[:top_k]  # highest first, ties to the lower doc index
        return self.docs[order], fused[order]


def evaluate(rankings: Sequence[Sequence[int]], gold: Sequence[Sequence], chunk_ids: Sequence[str] | None,
             subset: np.ndarray) -> dict[str, float | None]:
    """`chunk_ids` None: `gold` holds row indices like the rankings (no list of every chunk id needed)."""
    if chunk_ids is None:
        return ranking_metrics([list(rankings[i]) for i in subset], [gold[i] for i in subset])
    return ranking_metrics([[chunk_ids[d] for d in rankings[i]] for i in subset], [gold[i] for i in subset])


# Robust choice (docs/retrieval.md, "Choosing the weights"): with a few hundred queries the best grid point on
# the tuning split beat the default by less than its noise (0.761 vs 0.755 MRR@10) and lost to it on the
# held-out split (0.750 vs 0.765). So a weight only replaces the default when k-fold cross-validation over
# the tuning split says the *procedure* of tuning beats the default by more than a bootstrap interval.
CV_FOLDS = 5
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
INTERVAL = 0.95
CUTOFF = 10  # the objective is MRR@10


def bootstrap_interval(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = INTERVAL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query values (fixed seed: the same data, the same
    interval). Empty input: (0, 0)."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return round(float(lo), 6), round(float(hi), 6)


def gain_summary(chosen: np.ndarray, default: np.ndarray) -> dict:
    """Per-query reciprocal ranks of the choice and of the default -> mean gain with its interval."""
    diff = np.asarray(chosen, np.float64) - np.asarray(default, np.float64)
    return {"metric": OBJECTIVE, "queries": int(len(diff)),
            "chosen": round(float(np.mean(chosen)), 6) if len(diff) else None,
            "default": round(float(np.mean(default)), 6) if len(diff) else None,
            "gain": round(float(diff.mean()), 6) if len(diff) else 0.0,
            "interval": list(bootstrap_interval(diff)), "level": INTERVAL}


def _reciprocal_ranks(rankings, gold, chunk_ids, subset: np.ndarray) -> np.ndarray:
    ranked = [list(rankings[i]) if chunk_ids is None else [chunk_ids[d] for d in rankings[i]] for i in subset]
    return reciprocal_ranks(ranked, [gold[i] for i in subset], CUTOFF)


def _best(rr: np.ndarray, distance: np.ndarray, columns: np.ndarray) -> int:
    """Grid row with the highest mean over `columns`; ties to the weights nearest the default (no columns:
    a fold left nothing to pick on, so the default)."""
    if not len(columns):
        return int(np.argmin(distance))
    means = rr[:, columns].mean(axis=1).round(12)
    return int(np.lexsort((distance, -means))[0])


def _folds(n: int, k: int) -> list[np.ndarray]:
    order = np.random.default_rng(BOOTSTRAP_SEED).permutation(n)
    return [np.sort(order[f::k]) for f in range(min(k, n))]


@dataclass
class Tuning:
    """What was chosen and why, on which split, and how it compares with the default on held-out queries."""

    systems: list[str]
    weights: dict[str, float]
    tuned: bool
    reason: str
    tune_queries: int
    heldout_queries: int
    grid: int = 0
    heldout: dict[str, dict] = field(default_factory=dict)   # candidate name -> metrics on held-out
    all_queries: dict[str, dict] = field(default_factory=dict)  # candidate name -> metrics on every query
    default: dict[str, float] = field(default_factory=dict)  # the weights kept unless tuning beats them
    tune_scored: int = 0       # queries of each split with gold chunks: the ones that are scored
    heldout_scored: int = 0
    cv: dict = field(default_factory=dict)            # k-fold gain of tuning over the default, with interval
    heldout_gain: dict = field(default_factory=dict)  # chosen vs default on the held-out split, with interval

    @property
    def kept_default(self) -> bool:
        return self.weights == self.default

    def to_dict(self) -> dict:
        return {"systems": self.systems, "weights": self.weights, "tuned": self.tuned, "reason": self.reason,
                "default_weights": self.default,
                "split": {"tune": self.tune_queries, "heldout": self.heldout_queries,
                          "tune_scored": self.tune_scored, "heldout_scored": self.heldout_scored},
                "grid_size": self.grid, "objective": OBJECTIVE, "cv": self.cv, "heldout_gain": self.heldout_gain,
                "heldout": self.heldout, "all_queries": self.all_queries}


def _fmt(weights: Sequence[float], systems: Sequence[str]) -> str:
    return ", ".join(f"{s} {w:.2f}" for s, w in zip(systems, weights))


def choose_weights(systems: Sequence[str], rank_with: Callable[[Sequence[float]], list[np.ndarray]],
                   gold: Sequence[Sequence], chunk_ids: Sequence[str] | None, tune: np.ndarray, heldout: np.ndarray,
                   *, fallback: Sequence[float], min_queries: int, what: str) -> Tuning:
    """Weights for the systems: `fallback` (the documented default) unless tuning demonstrably beats it.

    The best grid point on the tuning split (MRR@10; ties to the one nearest the default) replaces the default
    only when `CV_FOLDS`-fold cross-validation over the tuning split -- pick on k-1 folds, score the pick
    against the default on the fold left out -- gives a mean gain whose bootstrap interval lies above 0.
    Either way the choice's gain over the default on the held-out split is reported with its interval.
    Queries without gold chunks are not scored; fewer than `min_queries` scored queries: the default."""
    systems, fallback = list(systems), tuple(float(w) for w in fallback)
    scored_tune = np.array([i for i in tune if gold[i]], dtype=np.int64)
    scored_held = np.array([i for i in heldout if gold[i]], dtype=np.int64)
    with_gold = sum(1 for g in gold if g)
    out = Tuning(systems, dict(zip(systems, fallback)), False, "", int(len(tune)), int(len(heldout)),
                 default=dict(zip(systems, fallback)), tune_scored=int(len(scored_tune)),
                 heldout_scored=int(len(scored_held)))
    if with_gold < min_queries or len(scored_tune) == 0 or len(scored_held) == 0:
        out.reason = (f"{what}: {with_gold} queries with gold chunks, fewer than {min_queries} needed to tune; "
                      "documented default weights used")
        return out
    grid = weight_grid(len(systems), GRID_STEP if len(systems) <= 2 else COARSE_GRID_STEP)
    if fallback not in grid:
        grid.append(fallback)
    out.grid = len(grid)
    rankings = [rank_with(w) for w in grid]
    rr = np.stack([_reciprocal_ranks(r, gold, chunk_ids, scored_tune) for r in rankings])  # [grid, tune queries]
    distance = np.array([np.abs(np.subtract(w, fallback)).sum() for w in grid])
    d = grid.index(fallback)
    best = _best(rr, distance, np.arange(rr.shape[1]))
    # Out-of-fold gain of the tuning procedure: each query scored by the weights picked without it.
    oof = np.zeros(rr.shape[1])
    for test in _folds(rr.shape[1], CV_FOLDS):
        pick = _best(rr, distance, np.setdiff1d(np.arange(rr.shape[1]), test))
        oof[test] = rr[pick, test] - rr[d, test]
    lo, hi = bootstrap_interval(oof)
    out.cv = {"folds": min(CV_FOLDS, rr.shape[1]), "gain": round(float(oof.mean()), 6), "interval": [lo, hi],
              "level": INTERVAL, "seed": BOOTSTRAP_SEED, "best_on_tune": dict(zip(systems, grid[best])),
              "best_tune_mrr@10": round(float(rr[best].mean()), 6), "default_tune_mrr@10": round(float(rr[d].mean()), 6)}
    cv_text = (f"{CV_FOLDS}-fold CV on {len(scored_tune)} tune queries: gain {oof.mean():+.3f} MRR@10, "
               f"{INTERVAL:.0%} interval [{lo:+.3f}, {hi:+.3f}]")
    if best == d:
        out.reason = f"{what}: default kept ({_fmt(fallback, systems)}): no grid point beats it on the tune split"
    elif lo > 0:
        out.weights, out.tuned = dict(zip(systems, grid[best])), True
        out.reason = f"{what}: tuned to {_fmt(grid[best], systems)}; {cv_text} is above 0"
    else:
        out.reason = (f"{what}: default kept ({_fmt(fallback, systems)}); the best on the tune split "
                      f"({_fmt(grid[best], systems)}, MRR@10 {rr[best].mean():.3f} vs {rr[d].mean():.3f}) is within "
                      f"the noise: {cv_text} includes 0")
    chosen = grid.index(tuple(out.weights.values()))
    out.heldout_gain = gain_summary(_reciprocal_ranks(rankings[chosen], gold, chunk_ids, scored_held),
                                    _reciprocal_ranks(rankings[d], gold, chunk_ids, scored_held))
    return out
