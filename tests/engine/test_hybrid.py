"""Hybrid fusion: splits, normalization, the weight grid, tuning on a split, honest generated queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.chunking import ChunkingConfig, read_collection
from rag_clean.retrieval.hybrid import QueryPool, choose_weights, default_weights, normalize, split_queries, weight_grid
from rag_clean.config.plan import RetrievalConfig
from rag_clean.config.registry import load_registry
from rag_clean.retrieval.flat import heading_pattern, heading_queries, mask_heading, masked_gold_texts
from stage_helpers import dense as run_dense, fuse, retrieve, sparse as run_sparse
from rag_clean.storage.embeddings import read_embeddings

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "collections" / "sample"


def test_split_is_stable_and_roughly_the_fraction():
    ids = [f"q{i}" for i in range(1000)]
    tune, held = split_queries(ids, 0.5)
    assert len(set(tune) | set(held)) == 1000 and not set(tune) & set(held)
    assert 400 < len(tune) < 600
    tune2, _ = split_queries(ids + ["new-query"], 0.5)
    assert set(tune) <= set(tune2)  # adding a query moves no other query between splits
    assert split_queries(ids, 0.5)[0].tolist() == tune.tolist()


def test_normalize_minmax_and_zscore():
    s = np.array([1.0, 3.0, 2.0])
    assert normalize(s, "minmax").tolist() == [0.0, 1.0, 0.5]
    z = normalize(s, "zscore")
    assert z.mean() == pytest.approx(0) and z.std() == pytest.approx(1)
    assert normalize(np.array([2.0, 2.0]), "minmax").tolist() == [1.0, 1.0]


def test_weight_grid_covers_the_simplex():
    two, three = weight_grid(2), weight_grid(3)
    assert len(two) == 11 and len(three) == 66
    assert all(abs(sum(w) - 1) < 1e-9 for w in two + three)
    assert (0.3, 0.7) in two and (1.0,) == weight_grid(1)[0]
    assert default_weights(["dense", "sparse:a", "sparse:b"], 0.3) == (0.3, 0.35, 0.35)


def _pools(n_queries: int, rng) -> tuple[list[QueryPool], list[list[str]], list[str]]:
    """Sparse ranks the gold doc first; dense ranks it last: tuning must move weight to sparse."""
    chunk_ids = [f"c{i}" for i in range(20)]
    pools, gold = [], []
    for qi in range(n_queries):
        docs = rng.choice(20, size=10, replace=False)
        target = int(docs[qi % 10])
        sparse = np.where(docs == target, 1.0, rng.random(10) * 0.5)
        dense = np.where(docs == target, 0.0, 0.5 + rng.random(10) * 0.5)
        pools.append(QueryPool(docs, np.stack([normalize(dense, "minmax"), normalize(sparse, "minmax")])))
        gold.append([chunk_ids[target]])
    return pools, gold, chunk_ids


def test_tuning_picks_the_weights_that_win_on_the_tuning_split():
    pools, gold, chunk_ids = _pools(60, np.random.default_rng(0))
    tune, held = split_queries([f"q{i}" for i in range(60)], 0.5)
    result = choose_weights(["dense", "sparse:x"], lambda w: [p.ranking(w, 10)[0] for p in pools], gold, chunk_ids,
                            tune, held, fallback=(0.9, 0.1), min_queries=30, what="hybrid weights")
    assert result.tuned and result.weights["sparse:x"] > 0.5
    assert result.tune_queries == len(tune) and result.heldout_queries == len(held)
    assert "tuned to" in result.reason and result.cv["interval"][0] > 0
    # A real gain shows on the held-out split, with its interval.
    gain = result.heldout_gain
    assert gain["queries"] == len(held) and gain["gain"] > 0.2 and gain["interval"][0] > 0


def _noise_pools(n_queries: int, seed: int) -> tuple[list[QueryPool], list[list[str]], list[str]]:
    """Pure noise: every doc's score, the gold doc's included, is random for both systems, so every weight
    has the same expected MRR and any tuned gain is selection on noise."""
    rng = np.random.default_rng(seed)
    chunk_ids = [f"c{i}" for i in range(30)]
    pools, gold = [], []
    for _ in range(n_queries):
        docs = rng.choice(30, size=15, replace=False)
        pools.append(QueryPool(docs, np.stack([normalize(rng.random(15), "minmax"),
                                               normalize(rng.random(15), "minmax")])))
        gold.append([chunk_ids[int(docs[0])]])
    return pools, gold, chunk_ids


def test_tuning_on_pure_noise_is_never_worse_than_the_default_beyond_its_interval():
    ids = [f"q{i}" for i in range(160)]
    tune, held = split_queries(ids, 0.5)
    kept = 0
    for seed in range(40):
        pools, gold, chunk_ids = _noise_pools(160, seed)
        result = choose_weights(["dense", "sparse:x"], lambda w: [p.ranking(w, 10)[0] for p in pools], gold,
                                chunk_ids, tune, held, fallback=(0.3, 0.7), min_queries=30, what="hybrid weights")
        gain = result.heldout_gain
        lo, hi = gain["interval"]
        assert lo <= gain["gain"] <= hi
        # Never worse than the default on held-out queries by more than the reported interval.
        assert hi >= 0, (seed, result.reason, gain)
        kept += result.kept_default
        assert result.cv["folds"] == 5 and result.cv["seed"] == 0
    # Tuning on noise almost always keeps the default (the old arg-max on the tune split almost never did).
    assert kept >= 36


def test_too_few_queries_use_the_documented_default():
    pools, gold, chunk_ids = _pools(12, np.random.default_rng(1))
    tune, held = split_queries([f"q{i}" for i in range(12)], 0.5)
    result = choose_weights(["dense", "sparse:x"], lambda w: [p.ranking(w, 10)[0] for p in pools], gold, chunk_ids,
                            tune, held, fallback=(0.3, 0.7), min_queries=30, what="hybrid weights")
    assert not result.tuned and result.weights == {"dense": 0.3, "sparse:x": 0.7}
    assert "fewer than 30" in result.reason


def test_mask_heading_removes_the_query_from_its_gold_chunk():
    text = "## Enabling the service\n\nTo keep enabling the Service at boot, run it.\n\n### Next\nmore"
    masked = mask_heading(text, "Enabling the service")
    assert "enabling the service" not in masked.lower() and "run it" in masked and "#" not in masked


def test_generated_queries_cannot_be_answered_by_exact_match_on_the_sample():
    """The default is honest: no heading query appears verbatim in the text its gold chunk is scored by."""
    chunks = read_collection(SAMPLE, ChunkingConfig()).table
    queries = heading_queries(chunks)
    masked = masked_gold_texts(queries, chunks)
    row = {cid: i for i, cid in enumerate(chunks.column("chunk_id").to_pylist())}
    texts = chunks.column("text").to_pylist()
    assert len(queries) > 20
    assert sum(1 for q in queries for g in q.gold_chunk_ids if q.text.lower() in texts[row[g]].lower()) > 0
    for q in queries:
        for g in q.gold_chunk_ids:
            assert not heading_pattern(q.text).search(masked[row[g]]), (q.text, g)


def _topic_chunks() -> pa.Table:
    """40 chunks under 40 headings: 40 generated queries, each with one gold chunk."""
    texts = [f"# Topic {i}\n\nthe gpu driver and the index number {i} need {w}" for i, w in
             enumerate(["install", "rerank", "query", "vector", "chunk", "model", "config", "server"] * 5)]
    return pa.table({"chunk_id": [f"c{i}" for i in range(40)], "content_hash": [f"h{i}" for i in range(40)],
                     "text": texts, "heading": [f"Topic {i}" for i in range(40)],
                     "source_file": ["a.md"] * 40, "metadata_json": ["{}"] * 40})


def test_retrieval_stage_reports_every_candidate_system(tiny_registry_path, tmp_path):
    registry = load_registry(tiny_registry_path)
    chunks = _topic_chunks()
    dense_spec, sparse_spec = registry.get("tiny-a"), registry.get("tiny-splade")
    writer, _ = run_dense(dense_spec, chunks, tmp_path / "a.arrow")
    dense = read_embeddings(writer.publish())
    writer, _ = fuse({"tiny-a": dense}, {"tiny-a": 1.0}, "concat", tmp_path / "f.arrow", chunks)
    fused = read_embeddings(writer.publish())
    sparse, _ = run_sparse([sparse_spec], chunks, root=tmp_path / "s")
    table, record = retrieve(chunks, fused, [dense_spec], sparse, [sparse_spec], None,
                             RetrievalConfig(enable_rerank=False, tune_min_queries=30), root=tmp_path / "r1")
    hybrid = record.hybrid
    assert hybrid["split"]["tune"] + hybrid["split"]["heldout"] == 40
    assert hybrid["default_weights"] == {"dense": 0.3, "sparse:tiny-splade": 0.7}
    assert hybrid["weights"] == hybrid["default_weights"] or hybrid["cv"]["interval"][0] > 0
    assert len(hybrid["heldout_gain"]["interval"]) == 2
    assert set(hybrid["heldout"]) == {"dense", "sparse:tiny-splade", "rrf", "weighted"}
    assert abs(sum(hybrid["weights"].values()) - 1) < 1e-6
    assert record.masked_gold_chunks == 40
    # Where the stage's time went, in order (one dense model: no ensemble tuning).
    assert list(record.phase_seconds) == ["gold_rows", "dense_queries", "dense_search", "sparse_queries_and_search",
                                          "hybrid_pools_and_tuning", "rerank", "table_and_caches"]
    assert all(seconds >= 0 for seconds in record.phase_seconds.values())
    assert {"mrr@10", "ndcg@10", "recall@20"} <= set(record.metrics["before_rerank"])
    assert set(record.metrics["heldout"]) == {"before_rerank"}
    assert record.quality()["recall@10"] == record.metrics["heldout"]["before_rerank"]["recall@10"]
    assert table.num_rows == 40 * 40

    _, few = retrieve(chunks, fused, [dense_spec], sparse, [sparse_spec], None,
                      RetrievalConfig(enable_rerank=False, tune_min_queries=100), root=tmp_path / "r2")
    assert not few.hybrid["tuned"] and few.hybrid["weights"] == {"dense": 0.3, "sparse:tiny-splade": 0.7}
    assert any("fewer than 100 needed to tune" in w for w in few.warnings)


def test_ensemble_weights_tuned_and_reported_on_held_out(tiny_registry_path, tmp_path):
    registry = load_registry(tiny_registry_path)
    chunks = _topic_chunks()
    specs = [registry.get("tiny-a"), registry.get("tiny-b")]
    sets = {}
    for spec in specs:
        writer, _ = run_dense(spec, chunks, tmp_path / f"{spec.asset_name}.arrow")
        sets[spec.name] = read_embeddings(writer.publish())
    weights = {s.name: s.weight for s in specs}
    writer, _ = fuse(sets, weights, "concat", tmp_path / "f.arrow", chunks)
    fused = read_embeddings(writer.publish())
    config = RetrievalConfig(enable_rerank=False, enable_sparse=False, tune_ensemble_weights=True)
    _, record = retrieve(chunks, fused, specs, None, [], None, config, root=tmp_path / "r1", dense_sets=sets)
    ensemble = record.ensemble
    assert ensemble["systems"] == ["tiny-a", "tiny-b"]
    # Random tiny models: the registry weights stay unless cross-validation shows a gain above the noise.
    assert ensemble["tuned"] == (ensemble["cv"]["interval"][0] > 0 and ensemble["weights"] != ensemble["default_weights"])
    assert abs(sum(ensemble["weights"].values()) - 1) < 1e-6 and ensemble["grid_size"] in (11, 12)
    assert set(ensemble["heldout"]) == {"registry weights", "tuned weights"}
    assert ensemble["split"]["tune"] + ensemble["split"]["heldout"] == 40
    _, off = retrieve(chunks, fused, specs, None, [], None, RetrievalConfig(enable_rerank=False, enable_sparse=False),
                      root=tmp_path / "r2", dense_sets=sets)
    assert off.ensemble is None  # off by default


def test_mask_heading_keeps_the_text_after_a_one_line_heading():
    """The old embedder's chunks are one line that starts with the heading: only the heading goes."""
    assert mask_heading("## System Purpose  Docling is a document converter.", "System Purpose") == \
        "Docling is a document converter."
    assert mask_heading("## System Purpose", "System Purpose") == ""
    long = "## Install\n\n" + "Run the installer and check the gpu driver. " * 40
    assert mask_heading(long, "Install").startswith("Run the installer") and len(mask_heading(long, "Install")) > 1000


def _one_line_heading_chunks() -> pa.Table:
    """The old embedder's shape: 30 one-line chunks '## <heading>  <text>', 10 that hold only their heading."""
    words = ["install", "rerank", "query", "vector", "chunk", "model", "config", "server"]
    texts = [f"## Topic {i}  the gpu driver and the index number {i} need {words[i % 8]}" for i in range(30)]
    texts += [f"## Empty {i}" for i in range(10)]
    headings = [f"Topic {i}" for i in range(30)] + [f"Empty {i}" for i in range(10)]
    return pa.table({"chunk_id": [f"c{i}" for i in range(40)], "content_hash": [f"h{i}" for i in range(40)],
                     "text": texts, "heading": headings, "source_file": ["a_chunks.json"] * 40,
                     "metadata_json": ["{}"] * 40})


def test_queries_with_empty_gold_are_dropped_and_counted_never_scored(tiny_registry_path, tmp_path):
    registry = load_registry(tiny_registry_path)
    chunks = _one_line_heading_chunks()
    queries = heading_queries(chunks)
    masked = masked_gold_texts(queries, chunks)
    assert sum(1 for t in masked.values() if t) == 30  # every one-line chunk keeps its text
    spec = registry.get("tiny-a")
    writer, _ = run_dense(spec, chunks, tmp_path / "a.arrow")
    writer, _ = fuse({"tiny-a": read_embeddings(writer.publish())}, {"tiny-a": 1.0}, "concat",
                     tmp_path / "f.arrow", chunks)
    fused = read_embeddings(writer.publish())
    sparse_spec = registry.get("tiny-splade")
    sparse, _ = run_sparse([sparse_spec], chunks, root=tmp_path / "s")
    _, record = retrieve(chunks, fused, [spec], sparse, [sparse_spec], None,
                         RetrievalConfig(enable_rerank=False, tune_min_queries=10), root=tmp_path / "r")
    assert record.gold == {"dropped_queries": 10, "empty_gold_chunks": 10, "scored_queries": 30}
    assert any("10 of 40 generated queries dropped" in w for w in record.warnings)
    assert record.to_metadata("s.json")["queries_dropped_empty_gold"] == 10
    # Tuning and metrics see only the 30 scored queries.
    assert record.hybrid["split"]["tune_scored"] + record.hybrid["split"]["heldout_scored"] == 30
