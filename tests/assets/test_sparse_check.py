"""The sparse_vectors check, on hand-made tables: order, coverage and row shape."""

import pyarrow as pa

from rag_clean.stages.sparse import SPARSE_SCHEMA
from rag_clean_assets.checks import sparse_rows_result

CHUNKS = pa.table({"chunk_id": ["a", "b", "c"]})


def sparse_valid(chunks, sparse_vectors):
    return sparse_rows_result(chunks, sparse_vectors.to_batches(max_chunksize=2))  # several batches, as a file gives


def _sparse(ids, term_ids, weights, model="m"):
    n = len(ids)
    return pa.table({"chunk_id": ids, "content_hash": ["h"] * n, "model": [model] * n, "term_ids": term_ids,
                     "weights": weights, "fallback": [False] * n}, schema=SPARSE_SCHEMA)


def test_good_rows_pass_and_count_empty_rows():
    result = sparse_valid(chunks=CHUNKS, sparse_vectors=_sparse(["a", "b", "c"], [[1, 2], [], [3]], [[0.9, 0.5], [], [0.1]]))
    assert result.passed and result.metadata["empty_rows"].value == 1


def test_rows_out_of_chunk_order_or_malformed_fail():
    result = sparse_valid(chunks=CHUNKS, sparse_vectors=_sparse(["b", "a", "c"], [[1], [2], [3]], [[0.5], [0.4], [0.3]]))
    assert not result.passed and "not one per chunk in chunk order" in result.description
    rising = _sparse(["a", "b", "c"], [[1, 2], [3], [4, 5]], [[0.1, 0.9], [0.2], [0.5, -1.0]])
    result = sparse_valid(chunks=CHUNKS, sparse_vectors=rising)
    assert not result.passed and "2 malformed rows" in result.description
