"""What the Dagster UI shows (issue 10): table metadata, readable sizes, the metrics table, code and data
versions (no-op reruns leave the graph in sync), disabled stages, the new checks, one short rerank warning.

One module-scoped pipeline is materialized twice on one instance (`twice`); read-only tests come first,
tests that rematerialize parts of it sit at the end, in the order they run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from types import SimpleNamespace

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.storage.arrow_io import read_arrow_table
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from rag_clean.telemetry.readable import compact, human_bytes, human_duration, human_rate
from rag_clean.telemetry.records import DenseRecord
from rag_clean.config.registry import load_registry
from rag_clean_assets import versions
from rag_clean_assets.partitions import collections_partitions
from resources.columns import type_name
from tiny_models import write_tiny_registry

from pipeline_helpers import Pipeline, write_collection
from project_env import clear_settings

QUERIES = [
    {"query_id": "q-rerank", "text": "rerank the retrieval results with a cross encoder", "gold_chunk_ids": ["legacy-2"]},
    {"query_id": "q-embed", "text": "embedding model vector", "gold_chunk_ids": ["legacy-1"]},
]
TABLE_ASSETS = ("chunks", "sparse_vectors", "queries", "reranked", "exports")
EMBEDDING_ASSETS = ("dense_embeddings/tiny_a", "dense_embeddings/tiny_b", "fused_embeddings")



def _events(result) -> dict[str, dg.AssetMaterialization]:
    return {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}


def _statuses(pipeline: Pipeline) -> dict[str, StaleStatus]:
    resolver = get_stale_status_resolver(pipeline.instance, pipeline.assets)
    return {k.to_user_string(): resolver.get_status(k, "demo") for a in pipeline.assets for k in a.keys}


def _run_checks_only(pipeline: Pipeline, asset_key: dg.AssetKey):
    job = dg.define_asset_job("checks_only", selection=dg.AssetSelection.checks_for_assets(asset_key),
                              partitions_def=collections_partitions)
    defs = dg.Definitions(assets=pipeline.assets, asset_checks=pipeline.checks, jobs=[job],
                          resources=pipeline.resources())
    pipeline.instance.add_dynamic_partitions("collections", ["demo"])
    return defs.resolve_job_def("checks_only").execute_in_process(
        tags={"dagster/partition": "demo"}, instance=pipeline.instance, raise_on_error=False)


@pytest.fixture(scope="module")
def twice(tmp_path_factory, tiny_registry_path):
    tmp = tmp_path_factory.mktemp("metadata")
    with pytest.MonkeyPatch.context() as mp:
        clear_settings(mp, tmp)
        write_collection(tmp / "data", queries=QUERIES)
        pipeline = Pipeline(tmp / "data", tmp / "storage", tiny_registry_path, tmp / "locks")
        export_dir = str(tmp / "exported")
        first = pipeline.materialize(enable_exports=True, export_dir=export_dir)
        second = pipeline.materialize(enable_exports=True, export_dir=export_dir)
        assert first.success and second.success
        yield SimpleNamespace(pipeline=pipeline, first=first, second=second, events=_events(second), tmp=tmp,
                              export_dir=export_dir, mp=mp)


# ---------------------------------------------------------------- helpers render what they say


def test_readable_values():
    assert [human_bytes(n) for n in (0, 1023, 1536, int(1.2 * 1024 ** 2), 3 * 1024 ** 3)] == [
        "0 B", "1023 B", "1.5 KiB", "1.2 MiB", "3.0 GiB"]
    assert [human_rate(x, "tokens") for x in (12.34, 1000, 230_400, 1_500_000)] == [
        "12.3 tokens/s", "1k tokens/s", "230k tokens/s", "1.5M tokens/s"]
    assert [human_duration(s) for s in (0.0123, 4.2, 185, 7300)] == ["12 ms", "4.2 s", "3 min 5 s", "2 h 1 min"]
    assert compact({"a": None, "b": [], "c": {"d": None}, "e": 0, "f": False, "g": [{"h": "", "i": 1}]}) == {
        "e": 0, "f": False, "g": [{"i": 1}]}


# ---------------------------------------------------------------- metadata of a good run


def test_tables_carry_row_count_and_column_schema(twice):
    for name in TABLE_ASSETS:
        if name == "chunks":
            stored = read_arrow_table(twice.pipeline.file("chunks", "demo.arrow"))
        else:
            stored = pq.read_table(twice.pipeline.file(*name.split("/"), "demo.parquet"))
        meta = twice.events[name].metadata
        assert meta["dagster/row_count"].value == stored.num_rows > 0, name
        schema = meta["dagster/column_schema"].value
        assert isinstance(schema, dg.TableSchema), name
        assert [(c.name, c.type) for c in schema.columns] == [(f.name, type_name(f.type)) for f in stored.schema], name
    n_chunks = twice.events["chunks"].metadata["dagster/row_count"].value
    for name in EMBEDDING_ASSETS:
        assert twice.events[name].metadata["dagster/row_count"].value == n_chunks, name


def _stored_schema(pipeline: Pipeline, name: str) -> pa.Schema:
    """The schema of the file the asset stored for "demo" (Arrow IPC or Parquet, as the layout chose)."""
    arrow = pipeline.file(*name.split("/"), "demo.arrow")
    if arrow.exists():
        return read_arrow_table(arrow).schema
    return pq.read_schema(pipeline.file(*name.split("/"), "demo.parquet"))


def test_declared_columns_are_the_stored_files_columns_with_descriptions(twice):
    """Before any run the catalog shows each table's columns with what they mean (definition metadata);
    they are the columns of the file the run stores, and the run's metadata says the same."""
    declared = {key.to_user_string(): spec.metadata["dagster/column_schema"].value
                for a in twice.pipeline.assets for key, spec in a.specs_by_key.items()
                if "dagster/column_schema" in spec.metadata}
    assert set(TABLE_ASSETS) | set(EMBEDDING_ASSETS) | {"vector_index"} <= set(declared)
    for name, schema in declared.items():
        stored = _stored_schema(twice.pipeline, name)
        assert [c.name for c in schema.columns] == stored.names, name
        assert all(c.description for c in schema.columns), (name, [c.name for c in schema.columns if not c.description])
        if name != "fused_embeddings":  # its vector width depends on the run's ensemble: declared without it
            assert [c.type for c in schema.columns] == [type_name(f.type) for f in stored], name
        after_run = twice.events[name].metadata["dagster/column_schema"].value
        assert [(c.name, c.description) for c in after_run.columns] == [(c.name, c.description) for c in schema.columns]
    assert {c.name: c.type for c in declared["sparse_vectors"].columns}["term_ids"] == "list<int32>"
    assert "sha256" in {c.name: c.description for c in declared["chunks"].columns}["content_hash"]


def test_each_fact_is_one_typed_value(twice):
    for name, event in twice.events.items():
        meta = event.metadata
        assert isinstance(meta["bytes"].value, int) and meta["bytes"].value > 0, name
        assert isinstance(meta["duration_s"].value, float), name
        # no second, human-formatted copy of the same fact
        assert not {"size", "duration", "peak_rss_anon", "throughput", "executed", "lease", "exported_size",
                    "rows_reused", "rows_computed"} & set(meta), (name, sorted(meta))
    first = _events(twice.first)
    for name in (*EMBEDDING_ASSETS[:2], "reranked"):
        assert first[name].metadata["tokens_per_second"].value > 0, name
    # The second run reuses every dense vector: nothing encoded, so no rate over zero work.
    for name in EMBEDDING_ASSETS[:2]:
        meta = twice.events[name].metadata
        assert meta["chunks_computed"].value == 0 and "tokens_per_second" not in meta, name
    # chunks counts its reuse in files (its rows are chunks): the names say which.
    chunks = twice.events["chunks"].metadata
    assert (chunks["files_reused"].value, chunks["files_computed"].value) == (3, 0)
    assert chunks["rows"].value == chunks["dagster/row_count"].value
    exports = twice.events["exports"].metadata
    assert exports["bytes_written"].value > 0


def test_reranked_has_one_markdown_metrics_table(twice):
    meta = twice.events["reranked"].metadata
    table = meta["metrics_table"]
    assert isinstance(table, dg.MarkdownMetadataValue)
    lines = table.value.splitlines()
    # Metrics as rows, phases as a few short columns: it fits the UI's metadata column.
    assert lines[0] == "| metric | before | after | held-out before | held-out after |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in lines[2:] if line.startswith("| ")}
    labels = {"recall@1": "recall@1", "recall@10": "recall@10", "mrr": "MRR", "mrr@10": "MRR@10", "ndcg@10": "nDCG@10"}
    for column, phase in enumerate(("before_rerank", "after_rerank")):
        for key, label in labels.items():
            assert rows[label][column] == f"{meta[f'{phase}/{key}'].value:.3f}", (phase, key)
    # The quality check reads the held-out final ranking; the table shows the same numbers.
    assert rows["recall@10"][3] == f"{meta['quality/recall@10'].value:.3f}"
    assert max(len(line) for line in lines if line.startswith("|")) <= 72
    sources = meta["candidate_sources"].value.split(", ")
    assert sources[0] == "dense:fused" and any(s.startswith("sparse:") for s in sources)
    assert "Candidate sources: " + ", ".join(f"`{s}`" for s in sources) in lines
    assert f"Final order by: `{meta['scorer'].value}`" in lines


def test_lease_metadata_is_device_wait_and_held(twice):
    stages = twice.pipeline.summary()["stages"]
    leased = [k for k, e in twice.events.items() if "lease_held_s" in e.metadata]
    assert {"dense_embeddings/tiny_a", "sparse_vectors", "reranked"} <= set(leased)
    for key in leased:
        meta, lease = twice.events[key].metadata, stages[key]["lease"]
        assert meta["lease_devices"].value == ", ".join(lease["devices"]), key
        assert meta["lease_wait_s"].value == round(lease["wait_seconds"], 3), key
        assert meta["lease_held_s"].value == round(lease["held_seconds"], 3), key
        assert lease["holder"] and "events" in lease  # the summary keeps every field


def test_lease_metadata_from_a_record():
    lease = {"lease_id": "abc", "devices": ["cuda:0"], "cpu_fallback": False, "reason": None, "wait_seconds": 1.23456,
             "held_seconds": 7.0, "vram_before": [], "holder": {"pid": 1, "owner": ""}, "events": []}
    meta = DenseRecord(model="m", lease=lease, rows=3, bytes=10).to_metadata("summary.json")
    assert (meta["lease_devices"], meta["lease_wait_s"], meta["lease_held_s"]) == ("cuda:0", 1.235, 7.0)
    assert DenseRecord(model="m", lease=lease).to_summary()["lease"] == lease


def test_every_asset_has_its_code_version(twice):
    registry = load_registry(twice.pipeline.registry_path)
    expected = {"chunks": versions.chunks_code_version(registry), "fused_embeddings": versions.fused_code_version(registry),
                "sparse_vectors": versions.sparse_code_version(registry), "queries": versions.QUERIES,
                "reranked": versions.reranked_code_version(registry), "exports": versions.EXPORTS,
                "vector_index": versions.INDEX}
    expected |= {f"dense_embeddings/{s.asset_name}": versions.dense_code_version(s) for s in registry.dense}
    found = {k.to_user_string(): a.code_versions_by_key[k] for a in twice.pipeline.assets if a.is_materializable
             for k in a.keys}  # collection_files is observed, not materialized: it has no code version
    assert found == expected and all(found.values())
    assert len(set(expected[f"dense_embeddings/{s.asset_name}"] for s in registry.dense)) == len(registry.dense)
    for name, event in twice.events.items():
        assert event.tags["dagster/code_version"] == expected[name], name


def test_no_asset_description_holds_an_html_like_placeholder(twice):
    for assets_def in twice.pipeline.assets:
        for key, text in assets_def.descriptions_by_key.items():
            assert not re.search(r"<[A-Za-z_/][^>]*>", text or ""), (key, text)
    exports = next(a for a in twice.pipeline.assets if dg.AssetKey("exports") in a.keys)
    assert "{export_dir}/{collection}/" in exports.descriptions_by_key[dg.AssetKey("exports")]


def test_new_checks_pass_on_a_good_run(twice):
    checks = {(c.asset_key.to_user_string(), c.check_name): c for c in twice.second.get_asset_check_evaluations()}
    for key in (("queries", "queries_valid"), ("exports", "exports_valid")):
        assert checks[key].passed, checks[key].description
    assert checks[("exports", "exports_valid")].metadata["files"].value == 8
    assert checks[("queries", "queries_valid")].metadata["queries"].value == len(QUERIES)


def test_queries_check_fails_on_duplicate_ids_and_unknown_gold(twice, tmp_path):
    storage = tmp_path / "storage"
    shutil.copytree(twice.pipeline.storage_root, storage)
    pipeline = Pipeline(twice.pipeline.data_root, storage, twice.pipeline.registry_path, tmp_path / "locks")
    path = storage / "queries" / "demo.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows.append(dict(rows[0], gold_chunk_ids=["no-such-chunk"]))
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    [evaluation] = _run_checks_only(pipeline, dg.AssetKey("queries")).get_asset_check_evaluations()
    assert evaluation.passed is False
    assert f"1 duplicate query ids: {rows[0]['query_id']}" in evaluation.description
    assert "1 gold chunk ids not in chunks: no-such-chunk" in evaluation.description


def test_exports_check_fails_on_a_changed_or_missing_file(twice, tmp_path):
    storage, exported = tmp_path / "storage", tmp_path / "exported"
    shutil.copytree(twice.pipeline.storage_root, storage)
    shutil.copytree(twice.export_dir, exported)
    summary_file = storage / "telemetry" / "demo" / "processing_summary.json"
    summary = json.loads(summary_file.read_text())
    summary["stages"]["exports"]["export_dir"] = str(exported / "demo")
    summary_file.write_text(json.dumps(summary))
    pipeline = Pipeline(twice.pipeline.data_root, storage, twice.pipeline.registry_path, tmp_path / "locks")
    [good] = _run_checks_only(pipeline, dg.AssetKey("exports")).get_asset_check_evaluations()
    assert good.passed, good.description

    manifest = pq.read_table(storage / "exports" / "demo.parquet").to_pylist()
    grown, same_size, gone = (exported / "demo" / m["name"] for m in manifest[:3])
    grown.write_bytes(grown.read_bytes() + b"x")
    data = bytearray(same_size.read_bytes())
    data[-1] ^= 1
    same_size.write_bytes(bytes(data))
    gone.unlink()
    [bad] = _run_checks_only(pipeline, dg.AssetKey("exports")).get_asset_check_evaluations()
    assert bad.passed is False
    assert f"{grown.name} is {grown.stat().st_size} bytes, manifest says {manifest[0]['bytes']}" in bad.description
    assert f"{same_size.name} sha256 differs from the manifest" in bad.description
    assert f"{gone.name} missing" in bad.description


# ---------------------------------------------------------------- versions (rematerialize parts of `twice`)


def test_noop_reruns_leave_every_asset_in_sync(twice):
    assert set(_statuses(twice.pipeline).values()) == {StaleStatus.FRESH}
    first, second = _events(twice.first), twice.events
    for name in ("chunks", "queries", *EMBEDDING_ASSETS, "sparse_vectors", "reranked"):
        assert first[name].tags["dagster/data_version"] == second[name].tags["dagster/data_version"], name
    # Rerunning only the root (nothing changed) must not mark the rest unsynced.
    result = twice.pipeline.materialize(selection=dg.AssetSelection.assets("chunks"), enable_exports=True,
                                        export_dir=twice.export_dir)
    assert _events(result)["chunks"].tags["dagster/data_version"] == second["chunks"].tags["dagster/data_version"]
    assert set(_statuses(twice.pipeline).values()) == {StaleStatus.FRESH}


def test_disabled_stage_says_so_and_keeps_its_data_version(twice):
    before = {k: twice.events[k].tags["dagster/data_version"] for k in ("sparse_vectors", "exports")}
    result = twice.pipeline.materialize(selection=dg.AssetSelection.assets("sparse_vectors", "exports"),
                                        enable_sparse=False, enable_exports=False)
    assert result.success
    # sparse still materializes, as "disabled" (reranked reads it); exports leaves no materialization at all.
    assert set(_events(result)) == {"sparse_vectors"}
    for name, event in _events(result).items():
        meta = event.metadata
        assert event.tags[versions.STATUS_TAG] == "disabled", name
        assert meta["status"].value == "disabled" and meta["reason"].value, name
        assert "dagster/row_count" not in meta and "rows" not in meta and "bytes" not in meta, name
        assert event.tags["dagster/data_version"] == before[name], name
    assert set(_statuses(twice.pipeline).values()) == {StaleStatus.FRESH}  # reranked is not marked changed
    assert twice.events["reranked"].tags[versions.STATUS_TAG] == "ok"


def test_edited_collection_marks_downstream_unsynced(twice):
    notes = twice.pipeline.data_root / "demo" / "notes.jsonl"
    notes.write_text(json.dumps({"id": "note-1", "text": "install the cuda driver first", "author": "ops"}) + "\n")
    result = twice.pipeline.materialize(selection=dg.AssetSelection.assets("chunks"))
    assert _events(result)["chunks"].tags["dagster/data_version"] != twice.events["chunks"].tags["dagster/data_version"]
    statuses = _statuses(twice.pipeline)
    assert statuses["chunks"] == StaleStatus.FRESH
    for name in ("queries", "dense_embeddings/tiny_a", "dense_embeddings/tiny_b", "fused_embeddings",
                 "sparse_vectors", "reranked"):
        assert statuses[name] == StaleStatus.STALE, name


# ---------------------------------------------------------------- the rerank fallback warning


def test_rerank_fallback_warning_is_one_line_per_source_logged_once(tiny_models_dir, tmp_path, monkeypatch, caplog):
    clear_settings(monkeypatch, tmp_path)
    # A short name: the line length bound below counts this path twice, and pytest-xdist's worker folder
    # (popen-gwN/) already makes tmp_path longer.
    missing = tmp_path / "gone"
    sources = ["BAAI/not-in-any-cache", "cross-encoder/also-not-cached", f"path:{missing}"]
    registry = write_tiny_registry(tmp_path / "registry", tiny_models_dir, rerank_sources=sources)
    write_collection(tmp_path / "data")
    pipeline = Pipeline(tmp_path / "data", tmp_path / "storage", registry, tmp_path / "locks")
    with caplog.at_level(logging.DEBUG):
        result = pipeline.materialize(enable_sparse=False, selection=dg.AssetSelection.all() - dg.AssetSelection.assets("exports"))
    assert result.success
    warnings = [e.user_message for e in pipeline.instance.all_logs(result.run_id)
                if e.level == logging.WARNING and "no cross-encoder could be loaded" in (e.user_message or "")]
    assert len(warnings) == 1, warnings
    lines = warnings[0].splitlines()
    assert lines[0] == "rerank: no cross-encoder could be loaded; results keep retrieval order."
    assert [line.split(": ", 1)[0] for line in lines[1:]] == [f"  - {s}" for s in sources]
    attempts = pipeline.summary()["rerank_run"]["attempts"]
    for line, attempt in zip(lines[1:], attempts):
        shown, first = line.split(": ", 1)[1], attempt["error"].strip().splitlines()[0].strip()
        assert first.startswith(shown.rstrip("\u2026")) and len(shown) <= 240, (shown, first)
        assert shown.startswith("ModelLoadError: ") and "Error: " not in shown[len("ModelLoadError: "):], shown
    # The hub's offline explanation (a chained cause) was repeated once per source; it is gone.
    assert "LocalEntryNotFoundError" in attempts[0]["error"] and "LocalEntryNotFoundError" not in warnings[0]
    assert len(warnings[0]) < 200 * len(lines)
    # The engine's own logger does not repeat it as a warning.
    assert not [r for r in caplog.records if r.name.startswith("rag_clean") and r.levelno >= logging.WARNING
                and "no cross-encoder" in r.getMessage()]
    assert [w for w in pipeline.summary()["warnings"] if "no cross-encoder" in w] == [warnings[0]]


def test_every_asset_reports_its_peak_anonymous_rss(twice):
    stages = twice.pipeline.summary()["stages"]
    for key, event in twice.events.items():
        peak = event.metadata["peak_rss_anon_bytes"].value
        # A Python process with torch and Dagster loaded holds tens of MB of heap at least.
        assert 10 * 2 ** 20 < peak < 64 * 2 ** 30, key
        assert stages[key]["peak_rss_anon_bytes"] > 10 * 2 ** 20, key  # (the latest materialization's)
