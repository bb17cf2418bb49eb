"""Settings that must change what a run does: query_text_mode, rrf_k, and a retired setting reported."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from rag_clean.telemetry.privacy import query_hash

from pipeline_helpers import Pipeline, write_collection

LONG_QUERY = "how do I install the gpu driver " * 6  # 192 characters
QUERIES = [{"query_id": "q-long", "text": LONG_QUERY, "gold_chunk_ids": ["note-1"]},
           {"query_id": "q-short", "text": "rerank results", "gold_chunk_ids": ["legacy-2"]}]


@pytest.fixture
def pipeline(tmp_path, tiny_registry_path, clean_settings) -> Pipeline:
    write_collection(tmp_path / "data", queries=QUERIES)
    return Pipeline(tmp_path / "data", tmp_path / "storage", tiny_registry_path, tmp_path / "locks")


def _queries(pipeline) -> dict[str, dict]:
    return {r["query_id"]: r for r in pq.read_table(pipeline.file("queries", "demo.parquet")).to_pylist()}


def test_query_text_mode_decides_what_the_queries_asset_keeps(pipeline):
    assert pipeline.materialize(selection=["chunks", "queries"]).success
    rows = _queries(pipeline)
    assert rows["q-long"]["text_display"] == query_hash(LONG_QUERY)  # default: hash only
    assert pipeline.summary()["stages"]["queries"]["query_text_mode"] == "hash"

    assert pipeline.materialize(selection=["chunks", "queries"], query_text_mode="truncate").success
    rows = _queries(pipeline)
    assert rows["q-long"]["text_display"] == LONG_QUERY[:100] and len(LONG_QUERY) > 100
    assert rows["q-short"]["text_display"] == "rerank results"
    assert pipeline.summary()["feature_toggles"]["provenance"]["query_text_mode"] == "run config"


def test_rrf_k_from_run_config_changes_the_fused_scores(pipeline):
    """RRF score = sum over rankings of 1 / (k + rank): the top score is <= 2 / (k + 1) and depends on k."""
    def top_scores(**settings) -> list[float]:
        assert pipeline.materialize(enable_rerank=False, hybrid_fusion="rrf", **settings).success
        table = pq.read_table(pipeline.file("reranked", "demo.parquet")).to_pylist()
        assert pipeline.summary()["stages"]["reranked"]["candidate_sources"][-1].startswith("sparse:")
        return [r["retrieval_score"] for r in table if r["rank"] == 1]

    default, small_k = top_scores(), top_scores(rrf_k=1)
    assert max(default) <= 2 / 61 + 1e-9
    assert max(small_k) > 0.5  # 1 / (1 + 1) from a single first place already


def test_retired_exclusive_ensemble_is_a_warning(pipeline):
    assert pipeline.materialize(selection=["chunks"], exclusive_ensemble=False).success
    warnings = pipeline.summary()["warnings"]
    assert any(w.startswith("exclusive_ensemble is retired and ignored") and "run config" in w for w in warnings)
