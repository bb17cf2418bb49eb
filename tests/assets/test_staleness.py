"""Staleness through Dagster's own instance APIs: a folder edit or a registry edit marks exactly the
affected assets of exactly the affected collection as out of date, a no-op rerun leaves all in sync, and
the opt-in automation condition requests only the changed partition."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster._core.definitions.data_version import StaleStatus

from pipeline_helpers import MD_DOC, write_collection
from rag_clean.chunking.folder_version import folder_version
from rag_clean_assets.definitions import build_assets
from rag_clean_assets.observe import COLLECTION_FILES, observe_collections, recorded_version
from rag_clean_assets.staleness import partition_status, resolver
from resources.paths import PathsResource

OTHER = "other"


def _defs(pipeline, registry_path=None, automation: bool = False) -> dg.Definitions:
    return dg.Definitions(assets=build_assets(str(registry_path or pipeline.registry_path), automation=automation),
                          resources=pipeline.resources())


def _paths(pipeline) -> PathsResource:
    return PathsResource(data_root=str(pipeline.data_root), storage_root=str(pipeline.storage_root))


def _statuses(pipeline, defs, collection) -> dict[str, str]:
    """Every asset but exports, which is off by default and so never materialized ("missing")."""
    statuses = {name: s.status for name, s in partition_status(pipeline.instance, defs, collection).items()}
    assert statuses.pop("exports") == "missing"
    return statuses


def _dagster(pipeline, defs, key: str, collection: str | None) -> StaleStatus:
    return resolver(pipeline.instance, defs.resolve_asset_graph()).get_status(dg.AssetKey.from_user_string(key),
                                                                               collection)


def test_folder_version_cache_and_content(tmp_path):
    folder = tmp_path / "data" / "c"
    folder.mkdir(parents=True)
    (folder / "a.md").write_text("# A\n\nalpha\n")
    (folder / ".hidden").write_text("litter")
    cache = tmp_path / "state" / "c.json"
    first = folder_version(folder, cache)
    assert (first.files, first.hashed) == (1, 1) and cache.exists()
    again = folder_version(folder, cache)
    assert again == type(first)(first.digest, 1, 0)  # served from the cache: nothing re-read
    (folder / ".hidden").write_text("other litter")  # hidden entries are not read by chunks: no change
    assert folder_version(folder, cache).digest == first.digest
    (folder / "a.md").write_text("# A\n\nalpha beta\n")
    edited = folder_version(folder, cache)
    assert edited.digest != first.digest and edited.hashed == 1
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text("b")
    assert folder_version(folder, cache).files == 2
    cache.write_text("{not json")  # a broken cache is only a slower path
    assert folder_version(folder, cache).digest == folder_version(folder, None).digest


def test_folder_edit_and_registry_edit_mark_only_their_assets_stale(pipeline, tmp_path):
    write_collection(pipeline.data_root, OTHER)
    paths = _paths(pipeline)
    pipeline.materialize("demo")
    pipeline.materialize(OTHER)
    defs = _defs(pipeline)
    materializable = set(_statuses(pipeline, defs, "demo"))
    assert {"chunks", "fused_embeddings", "sparse_vectors", "queries", "reranked",
            "dense_embeddings/tiny_a", "dense_embeddings/tiny_b"} <= materializable
    for collection in ("demo", OTHER):
        assert set(_statuses(pipeline, defs, collection).values()) == {"fresh"}, collection
        # chunks recorded the folder version it read
        assert recorded_version(pipeline.instance, collection) is not None

    # The sensor's observation of unchanged folders records nothing, and nothing goes stale.
    assert observe_collections(pipeline.instance, paths) == []

    # A no-op rerun keeps the whole graph in sync.
    pipeline.materialize("demo")
    assert set(_statuses(pipeline, defs, "demo").values()) == {"fresh"}

    # Edit one file of "demo", observe (what the sensor does on its next tick).
    guide = pipeline.data_root / "demo" / "guide.md"
    guide.write_text(MD_DOC + "\n## Upgrades\n\nUpgrade the gpu driver before the index.\n", encoding="utf-8")
    assert observe_collections(pipeline.instance, paths) == ["demo"]
    demo = _statuses(pipeline, defs, "demo")
    # Dagster itself: the folder's direct readers are STALE ...
    assert _dagster(pipeline, defs, "chunks", "demo") == StaleStatus.STALE
    assert _dagster(pipeline, defs, "queries", "demo") == StaleStatus.STALE
    cause = partition_status(pipeline.instance, defs, "demo")["chunks"].causes
    assert any("collection_files" in c for c in cause), cause
    # ... and everything below them is out of date too, in Dagster's own resolver (what the UI asks).
    assert {k: v for k, v in demo.items() if v == "fresh"} == {}
    assert demo["chunks"] == demo["queries"] == "stale"
    below = ("dense_embeddings/tiny_a", "dense_embeddings/tiny_b", "fused_embeddings", "sparse_vectors", "reranked")
    assert all(demo[k] == "upstream stale" for k in below)
    graph = defs.resolve_asset_graph()
    stale = resolver(pipeline.instance, graph)
    for key in below:
        assert _dagster(pipeline, defs, key, "demo") == StaleStatus.STALE, key
        # the root cause the UI's "Unsynced" popover shows: the folder's new data version
        roots = stale.get_stale_root_causes(dg.AssetKey.from_user_string(key), "demo")
        assert {c.asset_key for c in roots} == {COLLECTION_FILES}, (key, roots)
    assert set(_statuses(pipeline, defs, OTHER).values()) == {"fresh"}
    # Asked without a partition (the catalog, the graph, "Materialize unsynced"): stale when one partition is.
    assert _dagster(pipeline, defs, "reranked", None) == StaleStatus.STALE
    causes = stale.get_stale_root_causes(dg.AssetKey("reranked"))
    assert {c.partition_key for c in causes} == {"demo"}

    # Once chunks reran with the new rows, Dagster marks its readers STALE directly.
    pipeline.materialize("demo", selection=["chunks"])
    for key in ("dense_embeddings/tiny_a", "dense_embeddings/tiny_b", "fused_embeddings", "sparse_vectors",
                "queries", "reranked"):
        assert _dagster(pipeline, defs, key, "demo") == StaleStatus.STALE, key
        assert _dagster(pipeline, defs, key, OTHER) == StaleStatus.FRESH, key
    pipeline.materialize("demo")
    assert set(_statuses(pipeline, defs, "demo").values()) == {"fresh"}
    assert _dagster(pipeline, defs, "reranked", None) == StaleStatus.FRESH

    # A registry edit (max_length of one dense model) is a new code version of that dense asset. Raised, not
    # lowered: the model with the smallest max length packs the chunks (issue 25), checked below.
    text = pipeline.registry_path.read_text(encoding="utf-8")
    head, sep, tail = text.partition('name = "tiny-b"')
    edited = tmp_path / "edited" / "models.toml"
    edited.parent.mkdir()
    edited.write_text(head + sep + tail.replace("max_length = 48", "max_length = 56", 1), encoding="utf-8")
    defs2 = _defs(pipeline, edited)
    for collection in ("demo", OTHER):
        status = _statuses(pipeline, defs2, collection)
        assert status["dense_embeddings/tiny_b"] == "stale"
        assert any("code version" in c for c in
                   partition_status(pipeline.instance, defs2, collection)["dense_embeddings/tiny_b"].causes)
        assert status["dense_embeddings/tiny_a"] == status["chunks"] == status["sparse_vectors"] == "fresh"
        assert status["queries"] == "fresh"
        assert status["fused_embeddings"] == status["reranked"] == "upstream stale"
    # Lowered below every other model's, tiny-b's tokenizer becomes the strictest: documents are packed within
    # 40 tokens, so chunks is a new code version too.
    narrower = tmp_path / "narrower" / "models.toml"
    narrower.parent.mkdir()
    narrower.write_text(head + sep + tail.replace("max_length = 48", "max_length = 40", 1), encoding="utf-8")
    assert _statuses(pipeline, _defs(pipeline, narrower), "demo")["chunks"] == "stale"

    # A sparse model's entry (top_k) is a new code version of sparse_vectors; the dense side stays in sync.
    edited_sparse = tmp_path / "edited_sparse" / "models.toml"
    edited_sparse.parent.mkdir()
    assert "top_k = 32" in text
    edited_sparse.write_text(text.replace("top_k = 32", "top_k = 16"), encoding="utf-8")
    status = _statuses(pipeline, _defs(pipeline, edited_sparse), "demo")
    assert status["sparse_vectors"] == "stale"
    assert status["reranked"] == "upstream stale"
    assert all(status[k] == "fresh" for k in ("chunks", "dense_embeddings/tiny_a", "dense_embeddings/tiny_b",
                                               "fused_embeddings", "queries"))


def test_automation_requests_only_the_changed_partition(pipeline):
    write_collection(pipeline.data_root, OTHER)
    paths = _paths(pipeline)
    pipeline.materialize("demo")
    pipeline.materialize(OTHER)
    defs = _defs(pipeline, automation=True)
    assert all(spec.automation_condition is not None for a in defs.assets if isinstance(a, dg.AssetsDefinition)
               and a.is_materializable for spec in a.specs)
    first = dg.evaluate_automation_conditions(defs=defs, instance=pipeline.instance)
    assert first.total_requested == 0  # everything materialized, nothing changed
    quiet = dg.evaluate_automation_conditions(defs=defs, instance=pipeline.instance, cursor=first.cursor)
    assert quiet.total_requested == 0

    (pipeline.data_root / OTHER / "notes.jsonl").write_text(
        '{"id": "note-1", "text": "install the gpu driver and reboot", "author": "ops"}\n', encoding="utf-8")
    assert observe_collections(pipeline.instance, paths) == [OTHER]
    result = dg.evaluate_automation_conditions(defs=defs, instance=pipeline.instance, cursor=quiet.cursor)
    graph = defs.resolve_asset_graph()
    # exports is off by default: never materialized, so not "changed" (the condition skips missing partitions)
    expected = {k for k in graph.toposorted_asset_keys if graph.get(k).is_materializable} - {dg.AssetKey("exports")}
    requested = {k for k in expected if result.get_requested_partitions(k)}
    # One run for the edited collection: chunks and everything below it, and no other partition.
    assert requested == expected
    assert all(result.get_requested_partitions(k) == {OTHER} for k in requested)
    assert dg.AssetKey("chunks") in requested and COLLECTION_FILES not in requested
