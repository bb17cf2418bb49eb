"""reranked reuse: query-side encodings and rerank scores come from the caches, and an incremental run equals
a full recompute; blockwise sparse scoring equals one inverted index over the whole collection."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rag_clean.retrieval.candidates import SparseScorer
from rag_clean.storage.layout import StorageLayout
from rag_clean.config.plan import RetrievalConfig
from rag_clean.config.registry import load_registry
from rag_clean.retrieval.flat import SparseIndex
from rag_clean.stages import query_side as retrieval_stage
from rag_clean.stages.query_side import sparse_blocks as _sparse_blocks
from stage_helpers import dense as run_dense, fuse, retrieve, sparse as run_sparse
from rag_clean.storage.embeddings import read_embeddings

WORDS = ["install", "rerank", "query", "vector", "chunk", "model", "config", "server"]


def _chunks(n: int, edit: int | None = None, drop: int | None = None, add: bool = False) -> pa.Table:
    import hashlib

    rows = [(f"c{i}", f"# Topic {i}\n\nthe gpu driver and the index number {i} need {WORDS[i % 8]}", f"Topic {i}")
            for i in range(n)]
    if edit is not None:
        cid, text, heading = rows[edit]
        rows[edit] = (cid, text + " and the cuda memory of the cluster", heading)
    if drop is not None:
        del rows[drop]
    if add:
        rows.append(("c-new", "# Topic new\n\nthe docker service and the search api key", "Topic new"))
    return pa.table({"chunk_id": [r[0] for r in rows],
                     "content_hash": [hashlib.sha256(r[1].encode()).hexdigest() for r in rows],
                     "text": [r[1] for r in rows], "heading": [r[2] for r in rows],
                     "source_file": ["a.md"] * len(rows), "metadata_json": ["{}"] * len(rows)})


def _upstream(registry, chunks, folder):
    """dense, fused and sparse of `chunks`, computed in full (both runs below read the same files)."""
    specs = [registry.get("tiny-a"), registry.get("tiny-b")]
    sets = {}
    for spec in specs:
        writer, _ = run_dense(spec, chunks, folder / f"{spec.asset_name}.arrow")
        sets[spec.name] = read_embeddings(writer.publish())
    weights = {s.name: s.weight for s in specs}
    writer, _ = fuse(sets, weights, "concat", folder / "fused.arrow", chunks)
    fused = read_embeddings(writer.publish())
    sparse, _ = run_sparse([registry.get("tiny-splade")], chunks, root=folder / "_sparse")
    return specs, weights, sets, fused, sparse


def _run(registry, chunks, upstream, root):
    specs, weights, sets, fused, sparse = upstream
    return retrieve(chunks, fused, specs, sparse, [registry.get("tiny-splade")], registry.get("tiny-reranker"),
                    RetrievalConfig(top_k_candidates=12, rerank_top_k=5, tune_min_queries=10), root=root,
                    dense_sets=sets)


def test_incremental_reranked_equals_a_full_recompute(tiny_registry_path, tmp_path):
    registry = load_registry(tiny_registry_path)
    before = _chunks(30)
    first, rec0 = _run(registry, before, _upstream(registry, before, tmp_path / "v1"), tmp_path / "inc")
    assert rec0.reuse_counts["query_vectors/tiny-a"].to_dict() == {"unit": "queries", "reused": 0, "computed": 30}
    assert rec0.rerank_executed and rec0.reuse_counts["rerank_pairs"].reused == 0

    # Nothing changed: nothing encoded, nothing loaded, the same bytes.
    again, rec1 = _run(registry, before, _upstream(registry, before, tmp_path / "v1b"), tmp_path / "inc")
    assert again.equals(first)
    assert all(c.computed == 0 for c in rec1.reuse_counts.values())
    assert rec1.encode is None and rec1.scorer == rec0.scorer  # the reranker was not even loaded

    # Edit chunk 3, remove chunk 7, add one.
    after = _chunks(30, edit=3, drop=7, add=True)
    upstream = _upstream(registry, after, tmp_path / "v2")
    incremental, rec = _run(registry, after, upstream, tmp_path / "inc")
    full, rec_full = _run(registry, after, upstream, tmp_path / "fresh")

    counts = {k: c.to_dict() for k, c in rec.reuse_counts.items()}
    # 30 queries: "Topic 7" went, "Topic new" came: one query encoded per model.
    assert counts["query_vectors/tiny-a"] == {"unit": "queries", "reused": 29, "computed": 1}
    assert counts["query_vectors/tiny-b"] == {"unit": "queries", "reused": 29, "computed": 1}
    assert counts["sparse_queries/tiny-splade"] == {"unit": "queries", "reused": 29, "computed": 1}
    # Gold chunks are scored with their heading masked: the edited and the added chunk are new texts.
    assert counts["masked_gold/tiny-a"] == {"unit": "chunks", "reused": 28, "computed": 2}
    assert counts["sparse_masked/tiny-splade"] == {"unit": "chunks", "reused": 28, "computed": 2}
    # Tuned hybrid weights may move with the collection, so candidates (and pairs) can shift widely.
    assert counts["rerank_pairs"]["computed"] > 0 and counts["rerank_pairs"]["reused"] > 0
    assert rec_full.reuse_counts["rerank_pairs"].reused == 0

    # Removed chunks are gone; query-side values are pinned (one text per forward), so every column is
    # identical; cross-encoder scores are reused from other batches: equal within the documented tolerance.
    assert "c7" not in incremental.column("chunk_id").to_pylist()
    for name in ("query_id", "rank", "chunk_id", "retrieval_score", "scorer"):
        assert incremental.column(name).equals(full.column(name)), name
    np.testing.assert_allclose(incremental.column("rerank_score").to_numpy(zero_copy_only=False),
                               full.column("rerank_score").to_numpy(zero_copy_only=False), rtol=0, atol=1e-5)
    assert rec.metrics["before_rerank"] == rec_full.metrics["before_rerank"]
    assert rec.hybrid == rec_full.hybrid and rec.ensemble == rec_full.ensemble

    # The caches hold keyed hashes only, and only what this run used.
    layout = StorageLayout(tmp_path / "inc")
    for kind, model in (("query_vectors", "tiny_a"), ("masked_gold", "tiny_a"), ("sparse_queries", "tiny_splade"),
                        ("rerank_pairs", "tiny_reranker")):
        keys = pq.read_table(layout.retrieval_cache_file(kind, model, "c")).column("key").to_pylist()
        assert keys and all(k.startswith("hmac-sha256:") for k in keys), kind
        assert not any("Topic" in k or "gpu" in k for k in keys)
    assert pq.read_table(layout.retrieval_cache_file("query_vectors", "tiny_a", "c")).num_rows == 30


def test_a_corrupt_cache_is_recomputed_and_reported(tiny_registry_path, tmp_path):
    registry = load_registry(tiny_registry_path)
    chunks = _chunks(12)
    upstream = _upstream(registry, chunks, tmp_path / "v1")
    first, _ = _run(registry, chunks, upstream, tmp_path / "root")
    path = StorageLayout(tmp_path / "root").retrieval_cache_file("query_vectors", "tiny_a", "c")
    path.write_bytes(b"not parquet")
    again, rec = _run(registry, chunks, upstream, tmp_path / "root")
    assert again.equals(first)
    assert rec.reuse_counts["query_vectors/tiny-a"].computed == 12
    assert any("unreadable cache ignored" in w and path.name in w for w in rec.warnings)


# None: the numpy inverted index; "cpu": the torch path (one sparse x dense product per block, as on CUDA).
SCAN_DEVICES = [None, "cpu"]


@pytest.mark.parametrize("device", SCAN_DEVICES)
def test_blockwise_sparse_scores_equal_one_whole_index(monkeypatch, device):
    rng = np.random.default_rng(3)
    n = 53
    chunks = pa.table({"chunk_id": [f"d{i}" for i in range(n)]})
    rows_t = [np.sort(rng.choice(40, size=rng.integers(0, 6), replace=False)).astype(np.int32) for _ in range(n)]
    rows_w = [rng.random(len(t)).astype(np.float32) + 0.1 for t in rows_t]
    # Stored out of chunk order, with another model's rows and a row of a removed chunk mixed in.
    order = rng.permutation(n)
    table = pa.table({
        "chunk_id": [f"d{i}" for i in order] + ["gone", "d0"],
        "model": ["m"] * n + ["m", "other"],
        "term_ids": [rows_t[i].tolist() for i in order] + [[1, 2], [3]],
        "weights": [rows_w[i].tolist() for i in order] + [[1.0, 1.0], [9.0]],
    })
    monkeypatch.setattr(retrieval_stage, "SPARSE_BLOCK_ROWS", 8)
    queries = [(np.array([3, 7, 11]), np.array([1.0, 0.5, 2.0], np.float32)),
               (np.array([0, 39]), np.array([0.3, 0.9], np.float32)), (np.array([99]), np.array([1.0], np.float32))]
    overrides = {5: (np.array([3, 11], np.int32), np.array([4.0, 4.0], np.float32))}
    scorer = SparseScorer(_sparse_blocks(table, "m", chunks), n, queries, overrides, device=device)
    dense_top = [np.array([0, 1, 2]), np.array([50]), np.array([4])]
    scorer.prepare(10, dense_top)
    scorer.fill([np.arange(n)] * 3)

    whole_t, whole_w = list(rows_t), list(rows_w)
    whole_t[5], whole_w[5] = overrides[5]
    index = SparseIndex(whole_t, whole_w)
    for qi, (t, w) in enumerate(queries):
        want = index.score_all(t, w)
        hits = np.flatnonzero(want > 0)
        assert scorer.top_k(qi, 10).tolist() == hits[np.lexsort((hits, -want[hits]))][:10].tolist()
        np.testing.assert_array_equal(scorer.scores(qi, np.arange(n)), want)


@pytest.mark.parametrize("device", SCAN_DEVICES)
def test_sparse_rows_missing_a_chunk_are_refused(device):
    chunks = pa.table({"chunk_id": ["a", "b"]})
    table = pa.table({"chunk_id": ["a"], "model": ["m"], "term_ids": [[1]], "weights": [[1.0]]})
    scorer = SparseScorer(_sparse_blocks(table, "m", chunks), 2, [(np.array([1]), np.array([1.0], np.float32))],
                          device=device)
    with pytest.raises(Exception, match="sparse_vectors lacks 1 of the current chunks"):
        scorer.prepare(5, [np.array([0])])


@pytest.mark.parametrize("device", SCAN_DEVICES)
def test_blockwise_top_k_smaller_than_a_block_keeps_ties_by_row(monkeypatch, device):
    # k below a block's hit count: only scores >= the block's k-th largest are merged; with many equal
    # scores the winners must still be the lowest rows, as over one whole index.
    n = 40
    chunks = pa.table({"chunk_id": [f"d{i}" for i in range(n)]})
    rows_t = [np.array([1, 2], np.int32) if i % 3 else np.array([1], np.int32) for i in range(n)]
    rows_w = [np.ones(len(t), np.float32) for t in rows_t]
    table = pa.table({"chunk_id": [f"d{i}" for i in range(n)], "model": ["m"] * n,
                      "term_ids": [t.tolist() for t in rows_t], "weights": [w.tolist() for w in rows_w]})
    monkeypatch.setattr(retrieval_stage, "SPARSE_BLOCK_ROWS", 16)
    queries = [(np.array([1, 2]), np.array([1.0, 1.0], np.float32)), (np.array([1]), np.array([0.5], np.float32))]
    scorer = SparseScorer(_sparse_blocks(table, "m", chunks), n, queries, device=device)
    scorer.prepare(3, [np.array([], np.int64)] * 2)
    index = SparseIndex(rows_t, rows_w)
    for qi, (t, w) in enumerate(queries):
        want = index.score_all(t, w)
        hits = np.flatnonzero(want > 0)
        assert scorer.top_k(qi, 3).tolist() == hits[np.lexsort((hits, -want[hits]))][:3].tolist()
    assert scorer.top_k(0, 3).tolist() == [1, 2, 4]  # score 2 (two shared terms), lowest rows first


def test_sparse_index_with_a_repeated_term_in_a_row_sums_both_postings():
    index = SparseIndex([np.array([4, 4]), np.array([4])], [np.array([1.0, 2.0]), np.array([1.0])])
    np.testing.assert_allclose(index.score_all(np.array([4]), np.array([1.0])), [3.0, 1.0])


def test_torch_scan_gives_the_numpy_scans_candidates_on_a_larger_collection(monkeypatch):
    # Many queries and blocks, weights on a 1/16 grid (sums exact in any order), so any difference between
    # the two scans is a selection bug, not rounding: top-k, tie order and the pool scores must be identical.
    rng = np.random.default_rng(11)
    n, vocab = 700, 300
    chunks = pa.table({"chunk_id": [f"d{i}" for i in range(n)]})
    rows_t = [np.sort(rng.choice(vocab, size=rng.integers(0, 30), replace=False)) for _ in range(n)]
    rows_w = [rng.integers(1, 16, len(t)).astype(np.float32) / 16 for t in rows_t]
    table = pa.table({"chunk_id": [f"d{i}" for i in range(n)], "model": ["m"] * n,
                      "term_ids": [t.tolist() for t in rows_t], "weights": [w.tolist() for w in rows_w]})
    monkeypatch.setattr(retrieval_stage, "SPARSE_BLOCK_ROWS", 128)
    terms = [rng.choice(vocab, size=rng.integers(1, 12)) for _ in range(40)]
    queries = [(t, rng.integers(1, 8, len(t)).astype(np.float32) / 8) for t in terms]
    overrides = {3: (np.array([1, 2, 3]), np.array([0.5, 0.5, 0.5], np.float32))}
    wanted = [rng.choice(n, 20) for _ in queries]
    extra = [rng.choice(n, 5) for _ in queries]
    got = []
    for device in SCAN_DEVICES:
        scorer = SparseScorer(_sparse_blocks(table, "m", chunks), n, queries, overrides, device=device)
        scorer.prepare(25, wanted)
        pools = [np.unique(np.concatenate([w, scorer.top_k(qi, 25), extra[qi]])) for qi, w in enumerate(wanted)]
        scorer.fill(pools)
        got.append(([scorer.top_k(qi, 25).tolist() for qi in range(len(queries))],
                    [scorer.scores(qi, p).tolist() for qi, p in enumerate(pools)]))
    assert got[0] == got[1]
    assert sum(len(t) for t in got[0][0]) > 500  # the queries do hit documents
