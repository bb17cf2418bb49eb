"""Sparse scratch rows: written in any order (encoded batches, stored list columns), read in chunk order."""

import numpy as np
import pyarrow as pa
import pytest

import rag_clean.stages.sparse_rows as sparse_rows
from rag_clean.stages.sparse_rows import SparseScratch


def test_rows_in_any_order_come_back_in_chunk_order(tmp_path, monkeypatch):
    monkeypatch.setattr(sparse_rows, "BLOCK", 2)
    scratch = SparseScratch(tmp_path / "out.parquet", 5, top_k=3, label="m")
    try:
        scratch.write(np.array([3, 0]), [[7, 8, 9], []], [[0.9, 0.5, 0.1], []])
        stored_ids = pa.array([[1], [2, 3], [4]], pa.list_(pa.int32())).slice(1)  # sliced: offsets not at 0
        stored_w = pa.array([[0.1], [0.8, 0.2], [0.3]], pa.list_(pa.float32())).slice(1)
        scratch.write_lists(np.array([4, 1]), stored_ids, stored_w)
        with pytest.raises(ValueError, match="rows never written"):
            list(scratch.blocks())
        scratch.write(np.array([2]), [[5]], [[0.7]])
        blocks = list(scratch.blocks())
        assert [(s, e) for s, e, _, _ in blocks] == [(0, 2), (2, 4), (4, 5)]
        ids = [x for _, _, t, _ in blocks for x in t.to_pylist()]
        weights = [x for _, _, _, w in blocks for x in w.to_pylist()]
        assert ids == [[], [4], [5], [7, 8, 9], [2, 3]]
        assert [np.round(w, 6).tolist() for w in weights] == [[], [0.3], [0.7], [0.9, 0.5, 0.1], [0.8, 0.2]]
        assert scratch.rows_with_terms == 4
        scratch.reset()
        with pytest.raises(ValueError, match="more than top_k=3"):
            scratch.write(np.array([0]), [[1, 2, 3, 4]], [[1, 1, 1, 1]])
    finally:
        scratch.close()
    assert list(tmp_path.iterdir()) == []  # scratch files removed
