"""Stored matrices as .npy export files: a header, then row blocks (host memory flat in collection size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rag_clean.storage.atomic import atomic_path
from rag_clean.storage.embeddings import EmbeddingSet


def write_npy(path: Path, emb: EmbeddingSet, block_rows: int) -> dict:
    """Stream a stored matrix into a .npy (header, then row blocks; temp file, then rename) and measure its
    norms on the way."""
    n, dim = len(emb), emb.dim
    norms = np.empty(n, dtype=np.float64)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                  "fortran_order": False, "shape": (n, dim)})
        for start in range(0, n, block_rows):
            block = np.ascontiguousarray(emb.vectors[start:start + block_rows], dtype="<f4")
            fh.write(block.tobytes())
            norms[start:start + len(block)] = np.linalg.norm(block.astype(np.float64), axis=1)
    return {
        "rows": n,
        "dim": dim,
        "norm": {"min": float(norms.min()) if n else 0.0, "mean": float(norms.mean()) if n else 0.0,
                 "max": float(norms.max()) if n else 0.0},
    }
