"""Matryoshka truncation and weighted fusion of per-model unit vectors."""

from __future__ import annotations

from typing import Sequence

import numpy as np

_EPS = 1e-12


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, _EPS)).astype(np.float32, copy=False)


def truncate_and_normalize(vectors: np.ndarray, target_dim: int | None, *, model: str = "") -> np.ndarray:
    """Keep the first `target_dim` components, then renormalize. Never pads a short vector."""
    if target_dim is None or target_dim == vectors.shape[1]:
        return vectors
    if target_dim > vectors.shape[1]:
        raise ValueError(
            f"model {model!r}: Matryoshka target dim {target_dim} exceeds the model's {vectors.shape[1]}; vectors are never padded"
        )
    return l2_normalize(np.ascontiguousarray(vectors[:, :target_dim]))


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any():
        raise ValueError(f"fusion weights must be > 0, got {list(weights)}")
    return w / w.sum()


def fused_dim(dims: Sequence[int], method: str) -> int:
    if method == "concat":
        return int(sum(dims))
    if method == "mean":
        if len(set(dims)) != 1:
            raise ValueError(f"fusion 'mean' needs equal dimensions, got {list(dims)}; use 'concat'")
        return int(dims[0])
    raise ValueError(f"unknown fusion method {method!r}")


def fuse_block(blocks: Sequence[np.ndarray], weights: Sequence[float], method: str) -> np.ndarray:
    """Fuse one row block of each model's unit vectors.

    concat: each model's vector scaled by sqrt(w), concatenated; with weights summing to 1 the result is
    already unit-norm and cosine(fused) = sum_i w_i * cosine_i. Models of different widths combine.
    mean: the old embedder's weighted mean of equal-width vectors, then renormalized.
    """
    w = normalized_weights(weights)
    if method == "concat":
        out = np.concatenate([b * np.float32(np.sqrt(wi)) for b, wi in zip(blocks, w)], axis=1)
    elif method == "mean":
        fused_dim([b.shape[1] for b in blocks], "mean")
        out = sum(b * np.float32(wi) for b, wi in zip(blocks, w))
    else:
        raise ValueError(f"unknown fusion method {method!r}")
    return l2_normalize(np.asarray(out, dtype=np.float32))


def fuse_queries(per_model: Sequence[np.ndarray], weights: Sequence[float], method: str) -> np.ndarray:
    return fuse_block(per_model, weights, method)
