"""The dense/fused vector check streams blocks of rows: problems in any block are found and counted."""

import numpy as np
import pyarrow as pa

from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean_assets.checks import CHECK_BLOCK, _vector_problems


def _unit_rows(n: int, dim: int = 8) -> np.ndarray:
    rows = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_bad_rows_in_later_blocks_are_counted():
    n = CHECK_BLOCK + 5
    vectors = _unit_rows(n)
    vectors[3] = np.inf                # first block: one non-finite row
    vectors[CHECK_BLOCK + 2, 0] = np.nan  # second block: another
    vectors[CHECK_BLOCK + 4] *= 1.5    # second block: norm off by 0.5
    ids = pa.array([f"c{i}" for i in range(n)])
    problems, meta = _vector_problems(EmbeddingSet(ids=ids, hashes=ids, vectors=vectors), n, pa.chunked_array([ids]), 8)
    assert meta["nan_rows"] == 2
    assert abs(meta["max_norm_error"] - 0.5) < 1e-5
    assert problems == ["2 rows with NaN/inf", "norms off unit by up to 5.00e-01"]


def test_clean_vectors_pass_and_id_mismatch_is_named():
    vectors = _unit_rows(10)
    ids = pa.array([f"c{i}" for i in range(10)])
    problems, meta = _vector_problems(EmbeddingSet(ids=ids, hashes=ids, vectors=vectors), 10, pa.chunked_array([ids]), 8)
    assert problems == [] and meta["nan_rows"] == 0 and meta["max_norm_error"] < 1e-6
    other = pa.chunked_array([pa.array([f"c{i}" for i in reversed(range(10))])])
    problems, _ = _vector_problems(EmbeddingSet(ids=ids, hashes=ids, vectors=vectors), 10, other, 16)
    assert problems == ["chunk_ids differ from the chunks table (order or content)", "dim 8, expected 16"]
