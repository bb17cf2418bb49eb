"""processing_summary compatibility with the old embedder: v4.0 / v4.1 files are read, v4.2 keeps every
v4.1 key with its meaning, and the two fallbacks (sparse from metadata, reranker chain) are recorded."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from v41_spec import V41_NESTED
from rag_clean.chunking import read_collection
from rag_clean.config.plan import RetrievalConfig
from rag_clean.config.registry import load_registry
from rag_clean.storage.embeddings import read_embeddings
from rag_clean.telemetry.summary import SCHEMA_VERSION, V41_KEYS, TelemetryError, build_summary, read_summary
from stage_helpers import dense, fuse, retrieve, sparse as run_sparse

# A v4.1 summary as the old embedder wrote it (hand-written from the key list).
V41_SUMMARY = {
    "schema_version": "v4.1",
    "generated_at": "2025-06-01T10:00:00Z",
    "collection": "docs",
    "chunk_count": 3,
    "feature_toggles": {
        "enable_rerank": True, "enable_sparse": False, "sparse_models": ["naver/splade-cocondenser-ensembledistil"],
        "provenance": {"enable_rerank": "default", "enable_sparse": "override via env", "sparse_models": "default"},
        "provenance_lines": ["enable_rerank=True (default)", "enable_sparse=False (override via env)"],
    },
    "dense_run": {"total_embeddings_generated": 3, "models_executed": ["bge-m3"], "device": "cuda:0",
                  "batch_size": 32, "latency_seconds": {"p50": 0.1, "p95": 0.2, "p99": 0.3}},
    "rerank_run": {"enabled": True, "executed": True, "status": "fallback", "model_name": "BAAI/bge-reranker-base",
                   "fallback_count": 1, "fallback_reason": "BAAI/bge-reranker-v2-m3 could not be loaded",
                   "device_state": {"requested": "cuda", "resolved": "cuda:0", "fallback_applied": True}},
    "sparse_run": {"enabled": False, "model_names": [], "vectors": {"total": 0, "available": 0, "coverage_ratio": 0.0},
                   "devices": [], "latency_ms": {"p50": 0.0, "p95": 0.0, "p99": 0.0}, "fallback_used": False},
    "compatibility": {"current": "v4.1", "legacy": ["v4.0"], "warnings": []},
    "telemetry": {"spans": [{"name": "rag.dense"}, {"name": "rag.export"}], "metrics": {}},
    "warnings": [],
    "performance_baseline": {"dense_seconds": 1.0},
}
V40_SUMMARY = {k: v for k, v in V41_SUMMARY.items() if k not in ("compatibility", "telemetry", "performance_baseline")}
V40_SUMMARY["schema_version"] = "v4.0"



def _write(tmp_path: Path, data: dict, name: str = "processing_summary.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("summary", [V40_SUMMARY, V41_SUMMARY], ids=["v4.0", "v4.1"])
def test_reader_accepts_legacy_summaries(tmp_path, summary):
    data = read_summary(_write(tmp_path, summary))
    assert data["schema_version"] == summary["schema_version"]
    assert data["rerank_run"]["fallback_count"] == 1
    assert data["feature_toggles"]["provenance"]["enable_sparse"] == "override via env"
    assert data["stages"] == {}  # legacy files have no per-stage records


def test_reader_refuses_unknown_versions_and_missing_keys(tmp_path):
    with pytest.raises(TelemetryError, match=r"schema_version 'v3.9' is not one of"):
        read_summary(_write(tmp_path, dict(V41_SUMMARY, schema_version="v3.9")))
    lacking = {k: v for k, v in V41_SUMMARY.items() if k != "performance_baseline"}
    with pytest.raises(TelemetryError, match=r"v4.1 summary lacks keys \['performance_baseline'\]"):
        read_summary(_write(tmp_path, lacking))
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TelemetryError, match=r"broken.json: cannot read processing summary"):
        read_summary(tmp_path / "broken.json")


def test_v42_summary_carries_every_v41_key_and_reads_back(tmp_path):
    toggles = {"enable_rerank": False, "enable_sparse": True, "sparse_models": ["splade"]}
    provenance = {"enable_rerank": "cli", "enable_sparse": ".env", "sparse_models": "config file"}
    summary = build_summary("docs", {}, toggles, provenance)
    assert set(V41_KEYS) <= set(summary)
    for key, nested in V41_NESTED.items():
        assert nested <= set(summary[key]), (key, nested - set(summary[key]))
    assert set(summary["rerank_run"]["device_state"]) >= {"requested", "resolved", "fallback_applied"}
    assert set(summary["dense_run"]["latency_seconds"]) == set(summary["sparse_run"]["latency_ms"]) == {"p50", "p95", "p99"}
    assert summary["compatibility"]["current"] == SCHEMA_VERSION == "v4.2"
    assert summary["compatibility"]["legacy"] == ["v4.1", "v4.0"]
    assert summary["feature_toggles"]["provenance_lines"][:3] == [
        "enable_rerank=false (cli)", "enable_sparse=true (.env)", 'sparse_models=["splade"] (config file)']
    assert read_summary(_write(tmp_path, summary))["collection"] == "docs"


def test_disabled_rerank_reads_as_disabled():
    stage = {"stage": "reranked", "rerank_enabled": False, "rerank_executed": False, "status": "ok", "resolution": None}
    run = build_summary("docs", {"reranked": stage}, {"enable_rerank": False}, {"enable_rerank": "cli"})["rerank_run"]
    assert (run["enabled"], run["executed"], run["status"], run["fallback_count"]) == (False, False, "disabled", 0)


# ---------------------------------------------------------------- fallbacks recorded, with real tiny models

DOCS = {
    "guide_chunks.json": [
        {"text": "install the gpu driver before the embedding service",
         "metadata": {"chunk_id": "c1", "heading_text": "Install gpu driver", "section_path": ["Guide", "Install"],
                      "sparse_features": {"term_weights": {"gpu": 1.5, "driver": 0.75, "notaword": 3.0}}}},
        {"text": "configure the vector index and the query server",
         "metadata": {"chunk_id": "c2", "heading_text": "Configure index", "section_path": ["Guide", "Configure"]}},
        {"text": "rerank the search results with a cross encoder model",
         "metadata": {"chunk_id": "c3", "heading_text": "Rerank results", "section_path": ["Guide", "Rerank"],
                      "sparse_features": {"term_weights": {"rerank": 2.0}}}},
    ]
}


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Chunked") / "docs"
    folder.mkdir()
    for name, records in DOCS.items():
        (folder / name).write_text(json.dumps(records), encoding="utf-8")
    return read_collection(folder).table


@pytest.fixture(scope="module")
def broken_splade(tiny_models_dir, tmp_path_factory) -> Path:
    """tiny-splade with its weights file truncated: the tokenizer loads, the model does not."""
    folder = tmp_path_factory.mktemp("broken") / "tiny-splade"
    shutil.copytree(tiny_models_dir / "tiny-splade", folder)
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return folder


def test_sparse_metadata_fallback_is_recorded(chunks, tiny_registry_path, broken_splade, tmp_path):
    spec = replace(load_registry(tiny_registry_path).get("tiny-splade"), source=f"path:{broken_splade}")
    table, record = run_sparse([spec], chunks, root=tmp_path)
    rows = table.to_pylist()
    assert [r["fallback"] for r in rows] == [True, True, True]
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(broken_splade)).get_vocab()
    # Terms from metadata, mapped through the model's vocab, heaviest first; unknown terms dropped.
    assert rows[0]["term_ids"] == [vocab["gpu"], vocab["driver"]] and rows[0]["weights"] == [1.5, 0.75]
    assert rows[1]["term_ids"] == []  # no term weights in its metadata
    summary = build_summary("docs", {"sparse_vectors": record.to_summary()}, {"enable_sparse": True}, {})
    sparse = summary["sparse_run"]
    assert sparse["fallback_used"] is True and sparse["status"] == "fallback"
    assert "tiny-splade: sparse inference failed" in sparse["fallback_reason"]
    assert sparse["vectors"] == {"total": 3, "available": 2, "coverage_ratio": round(2 / 3, 6)}
    assert sparse["fallback_reason"] in summary["warnings"]


@pytest.fixture(scope="module")
def fused(chunks, tiny_registry_path, tmp_path_factory):
    spec = load_registry(tiny_registry_path).get("tiny-a")
    store = tmp_path_factory.mktemp("store")
    writer, _ = dense(spec, chunks, store / "tiny_a.arrow")
    vectors = read_embeddings(writer.publish())
    writer, _ = fuse({"tiny-a": vectors}, {"tiny-a": 1.0}, "concat", store / "fused.arrow", chunks)
    return spec, read_embeddings(writer.publish())


@pytest.mark.parametrize("sources, resolved_index, status", [
    (["BAAI/not-in-cache-1", "{tiny}"], 1, "fallback"),
    (["BAAI/not-in-cache-1", "BAAI/not-in-cache-2", "{tiny}"], 2, "fallback"),
    (["BAAI/not-in-cache-1", "BAAI/not-in-cache-2"], None, "fallback"),
], ids=["first-fallback", "second-fallback", "none-loads"])
def test_reranker_fallback_chain_is_recorded(chunks, fused, tiny_registry_path, tiny_models_dir,
                                             sources, resolved_index, status, tmp_path):
    dense_spec, fused_set = fused
    sources = [s.replace("{tiny}", f"path:{tiny_models_dir / 'tiny-reranker'}") for s in sources]
    rerank = replace(load_registry(tiny_registry_path).rerank, source=sources[0], fallbacks=tuple(sources[1:]))
    _, record = retrieve(chunks, fused_set, [dense_spec], None, [], rerank, RetrievalConfig(enable_sparse=False),
                         root=tmp_path)
    run = build_summary("docs", {"reranked": record.to_summary()}, {"enable_rerank": True}, {})["rerank_run"]
    assert run["status"] == status
    failures = len(sources) if resolved_index is None else resolved_index
    assert run["fallback_count"] == failures
    assert run["device_state"]["fallback_applied"] is True
    assert run["device_state"]["requested"] == sources[0]
    assert "BAAI/not-in-cache-1" in run["fallback_reason"]
    if resolved_index is None:
        assert run["executed"] is False and run["model_name"] is None
    else:
        assert run["executed"] is True and run["model_name"] == sources[resolved_index]


def test_retrieval_survives_a_sparse_model_that_fell_back(chunks, fused, tiny_registry_path, broken_splade, tmp_path):
    """After the metadata fallback the sparse encoder still cannot encode queries: rerank keeps dense candidates."""
    dense_spec, fused_set = fused
    spec = replace(load_registry(tiny_registry_path).get("tiny-splade"), source=f"path:{broken_splade}")
    sparse_table, _ = run_sparse([spec], chunks, root=tmp_path / "s")
    table, record = retrieve(chunks, fused_set, [dense_spec], sparse_table, [spec], None,
                             RetrievalConfig(enable_sparse=True, enable_rerank=False), root=tmp_path / "r")
    assert record.candidate_sources == ["dense:fused"]
    assert table.num_rows > 0
    summary = build_summary("docs", {"reranked": record.to_summary()}, {"enable_rerank": False}, {})
    assert any(w.startswith("sparse candidates from tiny-splade skipped") for w in summary["warnings"])
