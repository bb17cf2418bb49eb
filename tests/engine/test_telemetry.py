"""Telemetry: the v4.2 summary keeps every v4.1 key, percentiles, versioned reads, the store."""

from __future__ import annotations

import json

import pytest

from rag_clean.storage.layout import StorageLayout
from rag_clean.telemetry.summary import (
    SCHEMA_VERSION,
    V41_KEYS,
    TelemetryError,
    TelemetryStore,
    build_summary,
    percentiles,
    read_summary,
)

TOGGLES = {"enable_sparse": True, "enable_rerank": False, "sparse_models": []}
PROVENANCE = {"enable_sparse": "default", "enable_rerank": "override via env", "sparse_models": "default"}


def _stages():
    return {
        "chunks": {"stage": "chunks", "rows": 10, "skipped": 2, "duration_s": 0.5, "device": "cpu"},
        "dense_embeddings/m1": {"stage": "dense", "model": "m1", "asset_key": "dense_embeddings/m1", "rows": 10,
                                "dim": 32, "reuse": {"reused": 4, "computed": 6}, "duration_s": 2.0, "device": "cpu",
                                "batch_seconds": [0.1, 0.2, 0.3], "batch_items": [2, 2, 2],
                                "encode": {"tokens_per_second": 100.0, "oom_mitigations": [{"from": 8, "to": 4}]}},
        "dense_embeddings/m2": {"stage": "dense", "model": "m2", "asset_key": "dense_embeddings/m2", "rows": 10,
                                "dim": 48, "reuse": {"reused": 0, "computed": 10}, "duration_s": 1.0, "device": "cpu",
                                "batch_seconds": [0.4], "batch_items": [10], "encode": {}},
        "sparse_vectors": {"stage": "sparse", "status": "ok", "model_names": ["s"],
                           "vectors": {"total": 10, "available": 8}, "batch_seconds": [0.01, 0.03]},
        "reranked": {"stage": "reranked", "rerank_enabled": False, "rerank_executed": False, "status": "ok",
                     "scorer": "retrieval (rerank disabled)", "warnings": ["w2", "w1"]},
    }


def test_summary_has_every_v41_key_and_v42_stages():
    summary = build_summary("demo", _stages(), TOGGLES, PROVENANCE)
    assert set(V41_KEYS) <= set(summary)
    assert summary["schema_version"] == SCHEMA_VERSION == "v4.2"
    assert summary["collection"] == "demo" and summary["chunk_count"] == 10
    assert set(summary["stages"]) == set(_stages())
    json.dumps(summary)  # must be plain JSON


def test_summary_values_are_derived_from_stage_records():
    s = build_summary("demo", _stages(), TOGGLES, PROVENANCE)
    dense = s["dense_run"]
    assert dense["models_executed"] == ["m1", "m2"]
    assert dense["total_embeddings_generated"] == 16 and dense["chunks_reused"] == 4
    assert dense["batch_size"] == 2  # median items per batch of [2, 2, 2, 10]
    assert dense["latency_seconds"]["p50"] == pytest.approx(0.25)
    assert s["sparse_run"]["vectors"]["coverage_ratio"] == pytest.approx(0.8)
    assert s["sparse_run"]["executed"] is True
    assert s["rerank_run"]["enabled"] is False and s["rerank_run"]["executed"] is False
    assert s["feature_toggles"]["enable_rerank"] is False
    assert s["feature_toggles"]["provenance"]["enable_rerank"] == "override via env"
    assert "enable_rerank=false (override via env)" in s["feature_toggles"]["provenance_lines"]
    assert s["warnings"] == ["w1", "w2"]
    assert s["telemetry"]["metrics"]["chunks_skipped"] == 2
    assert s["telemetry"]["metrics"]["oom_mitigations_total"] == 1
    assert {sp["name"] for sp in s["telemetry"]["spans"]} == {"rag.chunk", "rag.dense", "rag.sparse", "rag.rerank"}


def test_summary_of_unmaterialized_stages():
    s = build_summary("demo", {}, {"enable_sparse": False}, {})
    assert s["chunk_count"] == 0
    assert s["sparse_run"]["status"] == "not_materialized" and s["sparse_run"]["enabled"] is False
    assert s["rerank_run"]["status"] == "not_materialized" and s["rerank_run"]["enabled"] is True
    assert s["dense_run"]["models_executed"] == []


def test_percentiles():
    assert percentiles([]) == {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    assert percentiles([5.0]) == {"p50": 5.0, "p95": 5.0, "p99": 5.0}
    p = percentiles(range(1, 101))
    assert p == {"p50": pytest.approx(50.5), "p95": pytest.approx(95.05), "p99": pytest.approx(99.01)}


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_read_summary_accepts_known_versions_and_refuses_others(tmp_path):
    current = build_summary("demo", _stages(), TOGGLES, PROVENANCE)
    assert read_summary(_write(tmp_path / "a.json", current))["collection"] == "demo"
    legacy = {k: current[k] for k in V41_KEYS} | {"schema_version": "v4.1"}
    assert read_summary(_write(tmp_path / "b.json", legacy))["stages"] == {}
    with pytest.raises(TelemetryError, match=r"c.json: schema_version 'v5.0' is not one of"):
        read_summary(_write(tmp_path / "c.json", current | {"schema_version": "v5.0"}))
    with pytest.raises(TelemetryError, match=r"schema_version None"):
        read_summary(_write(tmp_path / "d.json", [1, 2]))
    incomplete = {k: v for k, v in legacy.items() if k != "sparse_run"}
    with pytest.raises(TelemetryError, match=r"v4.1 summary lacks keys \['sparse_run'\]"):
        read_summary(_write(tmp_path / "e.json", incomplete))
    (tmp_path / "f.json").write_text("{trunc")
    with pytest.raises(TelemetryError, match="f.json: cannot read processing summary"):
        read_summary(tmp_path / "f.json")


def test_store_merges_stage_records_and_appends_events(tmp_path):
    store = TelemetryStore(StorageLayout(tmp_path))
    stages = _stages()
    store.record_stage("demo", "chunks", stages["chunks"], TOGGLES, PROVENANCE)
    store.record_stage("demo", "dense_embeddings/m1", stages["dense_embeddings/m1"], TOGGLES, PROVENANCE)
    summary = read_summary(store.summary_path("demo"))
    assert set(summary["stages"]) == {"chunks", "dense_embeddings/m1"}
    assert summary["chunk_count"] == 10
    store.append_events("demo", [{"event": "a"}, {"event": "b"}])
    store.append_events("demo", [{"event": "c"}])
    assert [e["event"] for e in store.read_events("demo")] == ["a", "b", "c"]
    assert store.read_events("other") == []


def test_store_refuses_unsafe_collection_names(tmp_path):
    with pytest.raises(ValueError, match="not allowed"):
        TelemetryStore(StorageLayout(tmp_path)).summary_path("../x")


def test_read_summary_refuses_a_v41_file_missing_a_nested_v41_key(tmp_path):
    current = build_summary("demo", _stages(), TOGGLES, PROVENANCE)
    legacy = {k: current[k] for k in V41_KEYS} | {"schema_version": "v4.1"}
    legacy["rerank_run"] = {k: v for k, v in legacy["rerank_run"].items() if k != "device_state"}
    with pytest.raises(TelemetryError, match=r"lacks keys \['rerank_run.device_state'\]"):
        read_summary(_write(tmp_path / "g.json", legacy))
