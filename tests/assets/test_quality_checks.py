"""Checks across materializations: held-out quality vs the previous run; outputs citing current chunks."""

from __future__ import annotations

import dagster as dg

from pipeline_helpers import Pipeline, write_collection
from project_env import clear_settings

RERANKED = dg.AssetSelection.assets("reranked")  # checks of a selected asset run with it


def _check(result, name: str) -> dg.AssetCheckEvaluation:
    return next(e for e in result.get_asset_check_evaluations() if e.check_name == name)


def _pipeline(tmp_path, tiny_registry_path, monkeypatch) -> Pipeline:
    clear_settings(monkeypatch, tmp_path)
    write_collection(tmp_path / "data")
    return Pipeline(tmp_path / "data", tmp_path / "storage", tiny_registry_path, tmp_path / "locks")


def test_quality_check_compares_with_the_previous_materialization(tmp_path, tiny_registry_path, monkeypatch):
    pipeline = _pipeline(tmp_path, tiny_registry_path, monkeypatch)
    first = pipeline.materialize()
    check = _check(first, "quality_vs_previous")
    assert check.passed and "nothing to compare" in check.description
    recall10 = check.metadata["current/recall@10"].value

    second = pipeline.materialize()
    same = _check(second, "quality_vs_previous")
    assert same.passed and same.metadata["previous/recall@10"].value == recall10
    # Nothing changed: every query vector, masked gold text and rerank pair came from the caches.
    reranked = second.asset_materializations_for_node("reranked")[0].metadata
    computed = {k: v.value for k, v in reranked.items() if k.endswith("_computed")}
    reused = {k: v.value for k, v in reranked.items() if k.endswith("_reused")}
    assert computed and set(computed.values()) == {0} and sum(reused.values()) > 0, (computed, reused)
    assert "rerank_pairs" in reranked["reuse"].value

    # One candidate per query: recall@10 can only be what recall@1 was, far below the previous run.
    # (From here on only reranked and its checks run: the assets above it are stored and unchanged.)
    worse = pipeline.materialize(selection=RERANKED, top_k_candidates=1, raise_on_error=False)
    check = _check(worse, "quality_vs_previous")
    assert recall10 > check.metadata["current/recall@10"].value + 0.02
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "got worse than the previous materialization" in check.description and "recall@10" in check.description

    strict = _check(pipeline.materialize(selection=RERANKED, top_k_candidates=1, quality_severity="error",
                                         quality_margin=0.0, raise_on_error=False), "quality_vs_previous")
    assert strict.passed  # the previous run was just as bad: no drop
    again = _check(pipeline.materialize(selection=RERANKED, quality_severity="error", raise_on_error=False),
                   "quality_vs_previous")
    assert again.passed  # better than the previous run
    dropped = _check(pipeline.materialize(selection=RERANKED, top_k_candidates=1, quality_severity="error",
                                          raise_on_error=False), "quality_vs_previous")
    assert not dropped.passed and dropped.severity == dg.AssetCheckSeverity.ERROR


def test_outputs_citing_removed_chunks_are_made_visible(tmp_path, tiny_registry_path, monkeypatch):
    pipeline = _pipeline(tmp_path, tiny_registry_path, monkeypatch)
    first = pipeline.materialize()
    assert _check(first, "outputs_cite_current_chunks").passed
    assert pipeline.summary()["runs"]["stages_from_other_runs"] == []

    # A run that replaces chunks and stops before queries / reranked (as a failed run would).
    (tmp_path / "data" / "demo" / "notes.jsonl").unlink()
    partial = pipeline.materialize(selection=["chunks"])
    check = _check(partial, "outputs_cite_current_chunks")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "reranked (run " in check.description and "rematerialize reranked" in check.description
    assert check.metadata["reranked/unknown_chunk_ids"].value == 1
    runs = pipeline.summary()["runs"]
    assert runs["chunks_run_id"] == partial.run_id
    assert {"reranked", "queries", "fused_embeddings"} <= set(runs["stages_from_other_runs"])
    assert runs["by_stage"]["reranked"] == first.run_id

    assert _check(pipeline.materialize(), "outputs_cite_current_chunks").passed


def test_a_failed_queries_step_does_not_certify_the_stale_outputs(tmp_path, tiny_registry_path, monkeypatch):
    """Issue 22.2: an input file removed, then `queries` fails: `reranked` still cites the removed chunks, so
    the check must not pass claiming they were rematerialized; it runs after queries / reranked or not at all."""
    pipeline = _pipeline(tmp_path, tiny_registry_path, monkeypatch)
    pipeline.materialize()
    folder = tmp_path / "data" / "demo"
    (folder / "notes.jsonl").unlink()
    (folder / "queries.jsonl").write_text("{not json\n", encoding="utf-8")
    failed = pipeline.materialize(raise_on_error=False)
    assert not failed.success
    assert not [e for e in failed.get_asset_check_evaluations()
                if e.check_name == "outputs_cite_current_chunks" and e.passed]
    # A later run without queries / reranked reads the stored files and says they are stale.
    stale = _check(pipeline.materialize(selection=["chunks"]), "outputs_cite_current_chunks")
    assert not stale.passed and "reranked (run " in stale.description
