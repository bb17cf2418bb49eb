"""Degraded states are visible: a disabled exports stage leaves no materialization, a disabled sparse stage
still lets reranked run and says so in a WARN check, a fallback reranker and default hybrid weights fail WARN
checks with the reason, and every check runs on its own (the check_collection job) from stored files."""

from __future__ import annotations

import dagster as dg

from pipeline_helpers import Pipeline, write_collection
from rag_clean_assets.definitions import CHECK_JOB_NAME, build_definitions
from tiny_models import write_tiny_registry

WARN = dg.AssetCheckSeverity.WARN


def _checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {f"{e.asset_key.to_user_string()}/{e.check_name}": e for e in
            (ev.event_specific_data for ev in result.all_events if ev.event_type_value == "ASSET_CHECK_EVALUATION")}


def _materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def test_degraded_states_show_as_warn_checks_and_disabled_exports_leave_nothing(tiny_models_dir, tmp_path,
                                                                                 clean_settings):
    missing = tmp_path / "no-such-reranker"
    registry = write_tiny_registry(tmp_path / "registry", tiny_models_dir,
                                   rerank_sources=["BAAI/not-in-any-cache", f"path:{missing}"])
    write_collection(tmp_path / "data")
    pipeline = Pipeline(tmp_path / "data", tmp_path / "storage", registry, tmp_path / "locks")

    result = pipeline.materialize()
    assert result.success
    # exports is off by default: no materialization at all (not a green one with 0 rows), and its check
    # does not certify anything.
    materialized = _materialized(result)
    assert "exports" not in materialized and {"reranked", "sparse_vectors"} <= materialized
    checks = _checks(result)
    assert "exports/exports_valid" not in checks
    assert any("exports skipped:" in (e.user_message or "") for e in pipeline.instance.all_logs(result.run_id))

    reranker = checks["reranked/cross_encoder_loaded"]
    assert not reranker.passed and reranker.severity == WARN
    assert reranker.description.startswith("no cross-encoder could be loaded: results keep retrieval order; ")
    assert "BAAI/not-in-any-cache" in reranker.description  # the first load error, as the reason
    hybrid = checks["reranked/hybrid_weights_tuned"]
    assert not hybrid.passed and hybrid.severity == WARN
    assert "fewer than" in hybrid.description and "default weights" in hybrid.description
    assert checks["sparse_vectors/stage_enabled"].passed

    # Sparse disabled: it still materializes (reranked reads it), reranked runs, and a WARN check says why.
    result = pipeline.materialize(enable_sparse=False)
    assert result.success and {"sparse_vectors", "reranked"} <= _materialized(result)
    sparse = _checks(result)["sparse_vectors/stage_enabled"]
    assert not sparse.passed and sparse.severity == WARN
    assert sparse.description.startswith("sparse stage disabled (") and "dense candidates only" in sparse.description

    # Every check of the collection, alone: nothing materializes, each check evaluates the stored state.
    defs = build_definitions(str(registry), automation=False, data_root=str(pipeline.data_root),
                             storage_root=str(pipeline.storage_root),
                             settings=pipeline.resources()["settings"], gpu_lease=pipeline.resources()["gpu_lease"])
    # (a partition tag, as the launchpad sets it: execute_in_process(partition_key=) wants partitioned assets)
    alone = defs.resolve_job_def(CHECK_JOB_NAME).execute_in_process(tags={"dagster/partition": "demo"},
                                                                    instance=pipeline.instance)
    assert alone.success and _materialized(alone) == set()
    evaluated = _checks(alone)
    assert {"chunks/chunks_valid", "reranked/cross_encoder_loaded", "reranked/quality_vs_previous",
            "sparse_vectors/stage_enabled"} <= set(evaluated)
    assert not evaluated["sparse_vectors/stage_enabled"].passed
    trend = evaluated["reranked/quality_vs_previous"].metadata["trend"].value
    assert len([line for line in trend.splitlines() if line.startswith("| ") and "run" not in line]) == 2
