"""Retrieval: exact dense top-k, sparse inverted index, RRF, recall/MRR, queries from file or headings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.telemetry.privacy import query_hash
from rag_clean.retrieval.flat import (
    QueryFileError,
    SparseIndex,
    check_queries_match,
    dense_search,
    heading_queries,
    load_queries,
    queries_table,
    reciprocal_rank_fusion,
)
from rag_clean.retrieval.metrics import mean_reciprocal_rank, ndcg_at_k, ranking_metrics, recall_at_k


def _brute_force(q, d, k):
    scores = q @ d.T
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, 1)


@pytest.mark.parametrize("n_docs,block_rows,top_k", [(37, 8, 5), (37, 37, 5), (40, 10, 10), (12, 5, 50), (64, 7, 1)])
def test_dense_search_equals_brute_force_across_blocks(n_docs, block_rows, top_k):
    rng = np.random.default_rng(n_docs + block_rows)
    docs = rng.standard_normal((n_docs, 16)).astype(np.float32)
    queries = rng.standard_normal((6, 16)).astype(np.float32)
    idx, scores = dense_search(queries, docs, top_k, block_rows=block_rows)
    want_idx, want_scores = _brute_force(queries, docs, min(top_k, n_docs))
    assert idx.shape == (6, min(top_k, n_docs))
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_dense_search_finds_best_document_in_last_block():
    docs = np.zeros((25, 2), np.float32)
    docs[:, 1] = 1.0
    docs[24] = [1.0, 0.0]  # the only match sits alone in the final, partial block
    idx, scores = dense_search(np.array([[1.0, 0.0]], np.float32), docs, 3, block_rows=8)
    assert idx[0, 0] == 24 and scores[0, 0] == pytest.approx(1.0)


def test_sparse_index_scores_are_dot_products():
    rows_ids = [np.array([1, 5]), np.array([5, 9]), np.array([2]), np.array([], np.int32)]
    rows_w = [np.array([1.0, 2.0]), np.array([0.5, 3.0]), np.array([4.0]), np.array([], np.float32)]
    index = SparseIndex(rows_ids, rows_w)
    docs, scores = index.search(np.array([5, 9]), np.array([2.0, 1.0]), top_k=10)
    # doc0: 2*2 = 4; doc1: 0.5*2 + 3*1 = 4 -> tie kept in doc order; doc2/doc3 share no term and are absent.
    assert docs.tolist() == [0, 1]
    np.testing.assert_allclose(scores, [4.0, 4.0])
    docs, scores = index.search(np.array([2, 1]), np.array([1.0, 1.0]), top_k=1)
    assert docs.tolist() == [2] and scores.tolist() == [4.0]
    docs, _ = index.search(np.array([777]), np.array([1.0]), top_k=5)
    assert docs.tolist() == []


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=1)
    # 1: 1/2 + 1/3 = .833; 3: 1/4 + 1/2 = .75; 2: 1/3
    assert fused == [1, 3, 2]
    assert reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=1, top_k=2) == [1, 3]
    # Equal scores: lower doc index first, so results are deterministic.
    assert reciprocal_rank_fusion([[7], [4]], k=60) == [4, 7]


def test_recall_and_mrr_on_hand_examples():
    ranked = [["a", "b", "c"], ["x", "y", "z"], ["p", "q", "g"], ["n", "o"]]
    gold = [{"b"}, {"nope"}, {"g", "p"}, set()]  # the last query has no gold and does not count
    assert recall_at_k(ranked, gold, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, gold, 2) == pytest.approx(2 / 3)
    assert mean_reciprocal_rank(ranked, gold) == pytest.approx((1 / 2 + 0 + 1) / 3)
    metrics = ranking_metrics(ranked, gold, ks=(1, 2))
    assert metrics == {"recall@1": pytest.approx(0.333333), "recall@2": pytest.approx(0.666667),
                       "mrr": pytest.approx(0.5)}
    assert ranking_metrics([["a"]], [set()], ks=(1,)) == {"recall@1": None, "mrr": None}


def _chunks(headings, files=None):
    n = len(headings)
    return pa.table({"chunk_id": [f"c{i}" for i in range(n)], "heading": headings,
                     "source_file": files or ["doc.md"] * n})


def test_heading_queries_gold_is_every_chunk_under_the_heading():
    chunks = _chunks(["Install", "Install", None, "ab", "Configure the index", "Install"],
                     ["a.md", "a.md", "a.md", "a.md", "b.md", "c.md"])
    queries = heading_queries(chunks)
    assert [(q.text, q.gold_chunk_ids, q.origin) for q in queries] == [
        ("Install", ("c0", "c1", "c5"), "heading:a.md"),
        ("Configure the index", ("c4",), "heading:b.md"),
    ]
    assert [q.query_id for q in queries] == ["h0000", "h0001"]
    assert len(heading_queries(_chunks([f"heading {i}" for i in range(10)]), limit=4)) == 4


def test_load_queries_prefers_the_file_and_checks_it(tmp_path):
    chunks = _chunks(["Install", "Other"])
    queries, source = load_queries(tmp_path, chunks)
    assert source == "headings" and len(queries) == 2
    (tmp_path / "queries.jsonl").write_text(
        json.dumps({"query_id": "q1", "text": "how to install", "gold_chunk_ids": ["c0"]}) + "\n\n"
        + json.dumps({"text": "no id here"}) + "\n")
    queries, source = load_queries(tmp_path, chunks)
    assert source == "file"
    assert [(q.query_id, q.gold_chunk_ids, q.origin) for q in queries] == [
        ("q1", ("c0",), "file:queries.jsonl:1"), ("q3", (), "file:queries.jsonl:3")]


@pytest.mark.parametrize("lines,message", [
    (["{bad"], r"queries.jsonl line 1: invalid JSON"),
    ([json.dumps({"text": "ok"}), json.dumps({"text": ""})], r"queries.jsonl line 2: needs a non-empty string 'text'"),
    ([json.dumps({"id": "x", "text": "a"}), json.dumps({"id": "x", "text": "b"})], r"line 2: duplicate query_id 'x'"),
    ([json.dumps({"text": "a", "gold_chunk_ids": "c0"})], r"line 1: gold_chunk_ids must be a list of strings"),
    ([json.dumps({"text": "a", "gold_chunk_ids": ["c9"]})], r"line 1: gold chunk ids not in the collection: \['c9'\]"),
])
def test_bad_query_file_names_line(tmp_path, lines, message):
    (tmp_path / "queries.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(QueryFileError, match=message):
        load_queries(tmp_path, _chunks(["A heading", "B heading"]))


def test_queries_table_stores_hash_not_text_and_detects_changes(tmp_path):
    (tmp_path / "queries.jsonl").write_text(json.dumps({"query_id": "q1", "text": "secret words here"}) + "\n")
    queries, _ = load_queries(tmp_path, _chunks(["x heading"]))
    table = queries_table(queries)
    assert table.column("text_hash").to_pylist() == [query_hash("secret words here")]
    assert table.column("text_chars").to_pylist() == [len("secret words here")]
    assert "secret" not in str(table.to_pylist())
    check_queries_match(queries, table)
    (tmp_path / "queries.jsonl").write_text(json.dumps({"query_id": "q1", "text": "other words"}) + "\n")
    changed, _ = load_queries(tmp_path, _chunks(["x heading"]))
    with pytest.raises(QueryFileError, match="rematerialize `queries` first"):
        check_queries_match(changed, table)


def test_mrr_at_10_and_ndcg_at_10():
    ranked = [["x"] * 10 + ["a"], ["a", "b", "c"], ["b", "x", "a"]]
    gold = [{"a"}, {"a", "b"}, {"a", "b"}]
    assert mean_reciprocal_rank(ranked, gold, cutoff=10) == pytest.approx((0 + 1 + 1) / 3)
    ideal2 = 1 + 1 / np.log2(3)
    expected = [0.0, 1.0, (1 + 1 / np.log2(4)) / ideal2]
    assert ndcg_at_k(ranked, gold, 10) == pytest.approx(np.mean(expected))
    metrics = ranking_metrics(ranked, gold)
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "recall@20", "mrr", "mrr@10", "ndcg@10"}
    assert metrics["mrr"] == pytest.approx((1 / 11 + 1 + 1) / 3, abs=1e-6)


def test_dense_search_on_torch_equals_numpy():
    """The GPU path (torch) run on the CPU: same top-k, ties to the lower index, across blocks."""
    from rag_clean.retrieval.flat import _dense_search_torch

    rng = np.random.default_rng(5)
    docs = rng.standard_normal((90, 16)).astype(np.float32)
    docs[40] = docs[7]  # a tie across blocks
    queries = np.concatenate([rng.standard_normal((4, 16)), docs[7:8]]).astype(np.float32)
    want_idx, want_scores = dense_search(queries, docs, 10, block_rows=32)
    idx, scores = _dense_search_torch(queries, docs, 10, 32, "cpu")
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert idx[4, :2].tolist() == [7, 40]


def test_chunk_rows_scans_the_column_in_blocks():
    from rag_clean.retrieval.flat import chunk_rows, take_column

    chunks = pa.table({"chunk_id": [f"c{i}" for i in range(10)], "text": [f"t{i}" for i in range(10)]})
    rows = chunk_rows(chunks, ["c7", "zz", "c0", "c7", "c9"], block_rows=3)
    assert rows.tolist() == [7, -1, 0, 7, 9]
    assert take_column(chunks, "text", [9, 0]) == ["t9", "t0"] and chunk_rows(chunks, []).tolist() == []


def test_dense_scorer_on_a_resident_matrix_equals_the_streamed_one():
    """The CUDA path keeps the fused matrix on the device (DenseScorer.resident); run here on a CPU tensor:
    same top-k with overrides and the same pool scores as the numpy path."""
    import torch

    from rag_clean.retrieval.candidates import DenseScorer

    rng = np.random.default_rng(8)
    docs = rng.standard_normal((200, 12)).astype(np.float32)
    queries = rng.standard_normal((6, 12)).astype(np.float32)
    overrides = {3: rng.standard_normal(12).astype(np.float32), 150: docs[0] * 2}
    host = DenseScorer(docs, queries, overrides)
    on_device = DenseScorer(docs, queries, overrides)
    on_device.resident = torch.from_numpy(docs.copy())
    want_idx, want_val = host.top_k(15)
    idx, val = on_device.top_k(15)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(val, want_val, rtol=1e-5, atol=1e-5)
    pool = np.array([0, 3, 17, 150, 199])
    for qi in range(len(queries)):
        np.testing.assert_allclose(on_device.scores(qi, pool), host.scores(qi, pool), rtol=1e-5, atol=1e-5)
