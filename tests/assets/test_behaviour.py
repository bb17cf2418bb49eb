"""Behaviour of the asset graph (issue 3): toggles, privacy, reuse, bad input, rerank fallback, checks.

One module-scoped materialization (`full_run`) on a persistent Dagster instance is shared by the
tests that only read it; tests that need other inputs build their own small pipeline.
Tests that rematerialize parts of `full_run` sit at the end of the file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from rag_clean.storage.embeddings import read_embeddings, write_embeddings
from rag_clean_assets.assets.fused import FUSED_KEY
from rag_clean_assets.partitions import collections_partitions
from tiny_models import write_tiny_registry

from pipeline_helpers import Pipeline, write_collection
from project_env import clear_settings

PLANTED_QUERY = "zebra-quasar-7731 how do I install"
# Any stored fragment of the planted query (a truncated copy included) contains this.
PLANTED_MARKER = "zebra-quasar-7731"
QUERIES = [
    {"query_id": "q-planted", "text": PLANTED_QUERY, "gold_chunk_ids": ["note-1"]},
    {"query_id": "q-rerank", "text": "rerank the retrieval results with a cross encoder", "gold_chunk_ids": ["legacy-2"]},
    {"query_id": "q-embed", "text": "embedding model vector", "gold_chunk_ids": ["legacy-1"]},
]
RERANK_TOP_K = 3



def _materializations(result) -> dict[str, dict]:
    return {e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}


def _failure_text(result) -> str:
    return "\n".join(e.step_failure_data.error.to_string() for e in result.get_step_failure_events())


def _run_checks_only(pipeline: Pipeline, asset_key: dg.AssetKey, collection: str = "demo"):
    """Execute only the checks of one asset against what is stored (the asset itself is not rerun)."""
    job = dg.define_asset_job("checks_only", selection=dg.AssetSelection.checks_for_assets(asset_key),
                              partitions_def=collections_partitions)
    defs = dg.Definitions(assets=pipeline.assets, asset_checks=pipeline.checks, jobs=[job],
                          resources=pipeline.resources())
    pipeline.instance.add_dynamic_partitions("collections", [collection])
    # The partition goes in as a tag: Dagster 1.13 refuses partition_key= when no asset is selected.
    return defs.resolve_job_def("checks_only").execute_in_process(
        tags={"dagster/partition": collection}, instance=pipeline.instance, raise_on_error=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_registry_path):
    """Every asset (exports on, rerank top 3) with a planted query, on a persistent sqlite instance."""
    tmp = tmp_path_factory.mktemp("behaviour")
    home = tmp / "dagster_home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp, dg.instance_for_test(temp_dir=str(home)) as instance:
        clear_settings(mp, tmp)
        # The query key at its default place (user config), to check it lands outside storage and instance.
        mp.delenv("RAG_CLEAN_QUERY_KEY", raising=False)
        mp.delenv("RAG_CLEAN_QUERY_KEY_FILE", raising=False)
        mp.setenv("XDG_CONFIG_HOME", str(tmp / "user_config"))
        write_collection(tmp / "data", queries=QUERIES)
        pipeline = Pipeline(tmp / "data", tmp / "storage", tiny_registry_path, tmp / "locks")
        pipeline.instance = instance
        result = pipeline.materialize(rerank_top_k=RERANK_TOP_K, enable_exports=True)
        yield SimpleNamespace(pipeline=pipeline, result=result, home=home, tmp=tmp,
                              metadata=_materializations(result))


# ---------------------------------------------------------------- a good run


def test_good_run_materializes_every_asset_and_checks_pass(full_run):
    assert full_run.result.success
    assert set(full_run.metadata) == {"chunks", "dense_embeddings/tiny_a", "dense_embeddings/tiny_b", "fused_embeddings",
                                      "sparse_vectors", "queries", "reranked", "exports", "vector_index"}
    checks = full_run.result.get_asset_check_evaluations()
    checked = {(c.asset_key.to_user_string(), c.check_name) for c in checks}
    assert {("chunks", "chunks_valid"), ("fused_embeddings", "vectors_valid"), ("sparse_vectors", "sparse_valid"),
            ("reranked", "reranked_valid"), ("dense_embeddings/tiny_a", "vectors_valid"),
            ("dense_embeddings/tiny_b", "vectors_valid"), ("vector_index", "index_matches_chunks")} <= checked
    failed = [(c.asset_key.to_user_string(), c.check_name, c.severity, c.description) for c in checks if not c.passed]
    # The one honest degraded state of this run: 3 planted queries are too few to tune the hybrid weights,
    # which is a WARN check saying why (issue 21), never an error.
    assert [f[:3] for f in failed] == [("reranked", "hybrid_weights_tuned", dg.AssetCheckSeverity.WARN)], failed
    assert "fewer than 30 needed to tune" in failed[0][3]


def test_rerank_scores_fill_top_k_and_metrics_are_metadata(full_run):
    table = pq.read_table(full_run.pipeline.file("reranked", "demo.parquet")).to_pylist()
    by_query: dict[str, list[dict]] = {}
    for row in table:
        by_query.setdefault(row["query_id"], []).append(row)
    assert set(by_query) == {q["query_id"] for q in QUERIES}
    n_chunks = full_run.metadata["chunks"]["rows"]
    for rows in by_query.values():
        rows.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        assert len(rows) == n_chunks > RERANK_TOP_K  # top_k_candidates (100) covers the whole tiny collection
        head, tail = rows[:RERANK_TOP_K], rows[RERANK_TOP_K:]
        assert all(r["rerank_score"] is not None and r["scorer"] != "retrieval" for r in head)
        assert all(r["rerank_score"] is None and r["scorer"] == "retrieval" for r in tail)
        head_scores = [r["rerank_score"] for r in head]
        assert head_scores == sorted(head_scores, reverse=True)
    meta = full_run.metadata["reranked"]
    assert meta["rerank_executed"] is True and meta["rerank_fallback_applied"] is False
    assert not meta["scorer"].startswith("retrieval")
    for phase in ("before_rerank", "after_rerank"):
        for name in ("recall@1", "recall@5", "mrr"):
            assert 0.0 <= meta[f"{phase}/{name}"] <= 1.0
    # Every chunk is a candidate, so recall@20 before rerank is exactly 1.
    assert meta["before_rerank/recall@20"] == 1.0
    rerank = full_run.pipeline.summary()["rerank_run"]
    assert rerank["executed"] is True and rerank["rerank_top_k"] == RERANK_TOP_K
    assert rerank["device_state"]["fallback_applied"] is False


def _scan_for(root: Path, needle: str) -> tuple[list[str], int]:
    """Files under root whose bytes (or decoded Parquet cells: Parquet pages are compressed) hold needle."""
    raw = needle.encode("utf-8")
    hits, scanned = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        scanned += 1
        data = path.read_bytes()
        found = raw in data or raw.lower() in data.lower()
        if not found and data[:4] == b"PAR1":
            found = needle.lower() in json.dumps(pq.read_table(path).to_pylist(), default=str).lower()
        if found:
            hits.append(str(path.relative_to(root)))
    return hits, scanned


def test_query_text_never_lands_in_storage_or_instance(full_run):
    data_hits, _ = _scan_for(full_run.pipeline.data_root, PLANTED_MARKER)
    assert data_hits == ["demo/queries.jsonl"]  # the scanner does find the planted text where it is input
    storage_hits, storage_files = _scan_for(full_run.pipeline.storage_root, PLANTED_MARKER)
    home_hits, home_files = _scan_for(full_run.home, PLANTED_MARKER)
    assert storage_hits == [] and home_hits == []
    # The scan covered the asset files, telemetry, exports and the instance's sqlite event log.
    stored = {str(p.relative_to(full_run.pipeline.storage_root)) for p in full_run.pipeline.storage_root.rglob("*")}
    assert {"queries/demo.parquet", "reranked/demo.parquet", "telemetry/demo/processing_summary.json",
            "telemetry/demo/events.jsonl"} <= stored
    assert any(p.startswith("exports/demo/") for p in stored)
    assert storage_files >= 10 and home_files >= 2
    assert list(full_run.home.rglob("*.db"))


def test_query_hash_is_keyed_by_a_secret_outside_storage_and_instance(full_run):
    key_file = full_run.tmp / "user_config" / "rag_clean" / "query_key"
    assert key_file.is_file() and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    for root in (full_run.pipeline.storage_root, full_run.home):
        assert root.resolve() not in key_file.resolve().parents
        assert not [p for p in root.rglob("*") if p.is_file() and key_file.read_bytes().strip() in p.read_bytes()]
    stored = pq.read_table(full_run.pipeline.file("queries", "demo.parquet")).to_pylist()
    planted = next(r for r in stored if r["query_id"] == "q-planted")
    key = key_file.read_bytes().strip()
    assert planted["text_hash"] == "hmac-sha256:" + hmac.new(key, PLANTED_QUERY.encode(), hashlib.sha256).hexdigest()[:16]
    assert hashlib.sha256(PLANTED_QUERY.encode()).hexdigest()[:16] not in json.dumps(stored)
    assert full_run.result.success  # reranked's check_queries_match agreed with the same keyed hash


def test_checks_fail_on_corrupted_fused_file(full_run, tmp_path):
    storage = tmp_path / "storage"
    shutil.copytree(full_run.pipeline.storage_root, storage)
    pipeline = Pipeline(full_run.pipeline.data_root, storage, full_run.pipeline.registry_path, tmp_path / "locks")
    good = _run_checks_only(pipeline, FUSED_KEY)
    assert good.success and not good.get_asset_materialization_events()
    [evaluation] = good.get_asset_check_evaluations()
    assert (evaluation.check_name, evaluation.passed) == ("vectors_valid", True)

    path = storage / "fused_embeddings" / "demo.arrow"
    fused = read_embeddings(path)
    vectors = np.array(fused.vectors)
    vectors[1] = np.nan
    write_embeddings(path, fused.chunk_ids, fused.content_hashes, vectors, fused.metadata)
    bad = _run_checks_only(pipeline, FUSED_KEY)
    [evaluation] = bad.get_asset_check_evaluations()
    assert evaluation.passed is False
    assert "1 rows with NaN/inf" in evaluation.description
    assert evaluation.metadata["nan_rows"].value == 1


# ---------------------------------------------------------------- toggles (rematerialize parts of full_run)


def test_sparse_and_rerank_off_leave_dense_and_fused_byte_identical(full_run, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDER_ENABLE_SPARSE", "0")
    monkeypatch.setenv("EMBEDDER_ENABLE_RERANK", "0")
    off = Pipeline(full_run.pipeline.data_root, tmp_path / "storage", full_run.pipeline.registry_path, tmp_path / "locks")
    result = off.materialize()
    assert result.success
    for parts in (("dense_embeddings", "tiny_a", "demo.arrow"), ("dense_embeddings", "tiny_b", "demo.arrow"),
                  ("fused_embeddings", "demo.arrow")):
        assert off.file(*parts).read_bytes() == full_run.pipeline.file(*parts).read_bytes(), parts
    assert not off.file("sparse_vectors", "demo.parquet").exists()

    summary = off.summary()
    toggles = summary["feature_toggles"]
    assert (toggles["enable_sparse"], toggles["enable_rerank"]) == (False, False)
    assert toggles["provenance"]["enable_sparse"] == toggles["provenance"]["enable_rerank"] == "override via env"
    assert summary["sparse_run"]["enabled"] is False and summary["sparse_run"]["executed"] is False
    assert summary["sparse_run"]["status"] == "disabled"
    assert summary["rerank_run"]["enabled"] is False and summary["rerank_run"]["executed"] is False
    meta = _materializations(result)
    assert meta["sparse_vectors"]["status"] == "disabled"
    assert meta["reranked"]["scorer"] == "retrieval (rerank disabled)"
    assert meta["reranked"]["candidate_sources"] == "dense:fused"
    reranked = pq.read_table(off.file("reranked", "demo.parquet"))
    assert set(reranked.column("rerank_score").to_pylist()) == {None}


def test_disabled_sparse_keeps_previous_file_and_run_config_beats_env(full_run, monkeypatch):
    pipeline = full_run.pipeline
    sparse_file = pipeline.file("sparse_vectors", "demo.parquet")
    before, mtime = sparse_file.read_bytes(), sparse_file.stat().st_mtime_ns
    sparse_only = dg.AssetSelection.assets("sparse_vectors")

    monkeypatch.setenv("EMBEDDER_ENABLE_SPARSE", "0")
    result = pipeline.materialize(selection=sparse_only)
    assert result.success and _materializations(result)["sparse_vectors"]["status"] == "disabled"
    assert sparse_file.read_bytes() == before and sparse_file.stat().st_mtime_ns == mtime
    summary = pipeline.summary()
    assert summary["sparse_run"]["status"] == "disabled"
    assert summary["feature_toggles"]["provenance"]["enable_sparse"] == "override via env"

    monkeypatch.setenv("EMBEDDER_ENABLE_SPARSE", "1")
    result = pipeline.materialize(selection=sparse_only, enable_sparse=False)
    assert result.success and _materializations(result)["sparse_vectors"]["status"] == "disabled"
    assert sparse_file.read_bytes() == before and sparse_file.stat().st_mtime_ns == mtime
    summary = pipeline.summary()
    assert summary["feature_toggles"]["enable_sparse"] is False
    assert summary["feature_toggles"]["provenance"]["enable_sparse"] == "run config"
    assert "enable_sparse=false (run config)" in summary["feature_toggles"]["provenance_lines"]
    assert "run config" in summary["sparse_run"]["reason"]


# ---------------------------------------------------------------- reuse and bad input (own pipelines)


DENSE_KEYS = [dg.AssetKey(["dense_embeddings", "tiny_a"]), dg.AssetKey(["dense_embeddings", "tiny_b"])]


def test_reuse_recomputes_only_the_edited_chunk(pipeline):
    selection = dg.AssetSelection.assets("chunks", *DENSE_KEYS)
    first = pipeline.materialize(selection=selection)
    n = _materializations(first)["chunks"]["rows"]
    old = {k: read_embeddings(pipeline.file(*k.path, "demo.arrow")) for k in DENSE_KEYS}
    old = {k: (v.chunk_ids, np.array(v.vectors)) for k, v in old.items()}

    notes = pipeline.data_root / "demo" / "notes.jsonl"
    notes.write_text(json.dumps({"id": "note-1", "text": "install the cuda driver first", "author": "ops"}) + "\n")
    second = pipeline.materialize(selection=selection)
    meta = _materializations(second)
    for key in DENSE_KEYS:
        name = key.to_user_string()
        assert (meta[name]["chunks_computed"], meta[name]["chunks_reused"]) == (1, n - 1), name
        new = read_embeddings(pipeline.file(*key.path, "demo.arrow"))
        old_ids, old_vectors = old[key]
        assert new.chunk_ids == old_ids
        changed = old_ids.index("note-1")
        keep = [i for i in range(n) if i != changed]
        np.testing.assert_array_equal(new.vectors[keep], old_vectors[keep])
        assert not np.allclose(new.vectors[changed], old_vectors[changed])
    dense_run = pipeline.summary()["dense_run"]
    assert dense_run["chunks_reused"] == 2 * (n - 1)
    assert dense_run["total_embeddings_generated"] == 2
    assert {m: (v["computed"], v["reused"]) for m, v in dense_run["per_model"].items()} == {
        "tiny-a": (1, n - 1), "tiny-b": (1, n - 1)}


def test_malformed_chunk_file_fails_naming_file_and_index_and_keeps_chunks(pipeline):
    assert pipeline.materialize(selection=dg.AssetSelection.assets("chunks")).success
    chunks_file = pipeline.file("chunks", "demo.arrow")
    before = chunks_file.read_bytes()
    records = [{"text": "fine", "metadata": {"chunk_id": "ok-1"}}, {"text": "no metadata here"}]
    (pipeline.data_root / "demo" / "old_chunks.json").write_text(json.dumps(records))
    result = pipeline.materialize(selection=dg.AssetSelection.assets("chunks"), raise_on_error=False)
    assert not result.success
    assert "old_chunks.json record index 1: 'metadata' must be an object" in _failure_text(result)
    assert chunks_file.read_bytes() == before


def test_registry_dim_mismatch_fails_dense_and_keeps_previous_vectors(pipeline, tiny_models_dir, tmp_path):
    dense_a = dg.AssetSelection.assets("chunks", DENSE_KEYS[0])
    assert pipeline.materialize(selection=dense_a).success
    dense_file = pipeline.file("dense_embeddings", "tiny_a", "demo.arrow")
    before = dense_file.read_bytes()

    registry = write_tiny_registry(tmp_path / "bad_registry", tiny_models_dir)
    text = registry.read_text()
    assert text.count("dim = 32\n") == 1
    registry.write_text(text.replace("dim = 32\n", "dim = 64\n"))
    wrong = Pipeline(pipeline.data_root, pipeline.storage_root, registry, pipeline.lock_dir)
    result = wrong.materialize(selection=dg.AssetSelection.assets(DENSE_KEYS[0]), raise_on_error=False)
    assert not result.success
    # Names the model and both dimensions (registry 64, model 32), whichever layer catches it.
    message = next(line for line in _failure_text(result).splitlines() if "model tiny-a" in line)
    assert re.search(r"64\b", message) and "32-d" in message, message
    assert dense_file.read_bytes() == before
    assert not [p.name for p in dense_file.parent.iterdir() if p.name.startswith(".")]  # no staged leftovers


def test_rerank_falls_back_to_retrieval_order_when_no_reranker_loads(tiny_models_dir, tmp_path, monkeypatch):
    clear_settings(monkeypatch, tmp_path)
    missing = tmp_path / "no-such-reranker"
    registry = write_tiny_registry(tmp_path / "registry", tiny_models_dir,
                                   rerank_sources=["BAAI/not-in-any-cache", f"path:{missing}"])
    write_collection(tmp_path / "data")  # no queries.jsonl: heading queries with gold chunks
    pipeline = Pipeline(tmp_path / "data", tmp_path / "storage", registry, tmp_path / "locks")
    result = pipeline.materialize(enable_sparse=False)
    assert result.success
    meta = _materializations(result)["reranked"]
    assert meta["scorer"] == "retrieval (no cross-encoder could be loaded)"
    assert meta["rerank_fallback_applied"] is True and meta["rerank_executed"] is False
    assert "before_rerank/mrr" in meta and not any(k.startswith("after_rerank/") for k in meta)
    rerank = pipeline.summary()["rerank_run"]
    assert rerank["status"] == "fallback" and rerank["executed"] is False
    assert rerank["device_state"]["fallback_applied"] is True
    assert "BAAI/not-in-any-cache" in rerank["fallback_reason"] and str(missing) in rerank["fallback_reason"]
    assert [a["source"] for a in rerank["attempts"]] == ["BAAI/not-in-any-cache", f"path:{missing}"]
    table = pq.read_table(pipeline.file("reranked", "demo.parquet"))
    assert set(table.column("rerank_score").to_pylist()) == {None}
    assert set(table.column("scorer").to_pylist()) == {"retrieval"}
    assert any("no cross-encoder could be loaded" in w for w in pipeline.summary()["warnings"])


def test_ensemble_models_runs_only_the_chosen_dense_models(pipeline):
    result = pipeline.materialize(ensemble_models=["tiny-a"])
    assert result.success
    assert pipeline.file("dense_embeddings", "tiny_a", "demo.arrow").exists()
    assert not pipeline.file("dense_embeddings", "tiny_b", "demo.arrow").exists()
    meta = {e.asset_key.to_user_string(): e.materialization.metadata
            for e in result.get_asset_materialization_events()}
    assert meta["dense_embeddings/tiny_b"]["status"].value == "disabled"
    fused = read_embeddings(pipeline.file("fused_embeddings", "demo.arrow"))
    assert fused.dim == 32  # tiny-a alone
    summary = pipeline.summary()
    assert summary["dense_run"]["models_executed"] == ["tiny-a"]
    assert summary["dense_run"]["models_skipped"] == ["tiny-b"]
    assert summary["feature_toggles"]["provenance"]["ensemble_models"] == "run config"
