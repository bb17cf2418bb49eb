"""dagster-webserver serves the real Definitions: GraphQL lists every asset and the collections partitions."""

from __future__ import annotations

import pytest

from ui_helpers import graphql, launch_partition_run, wait_for_asset_nodes, wait_for_run

requests = pytest.importorskip("requests")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.e2e

CORE_ASSETS = {"collection_files", "chunks", "dense_embeddings/tiny_a", "dense_embeddings/tiny_b", "fused_embeddings",
               "sparse_vectors", "queries", "reranked", "vector_index"}

ASSETS_QUERY = """
query {
  assetNodes {
    assetKey { path }
    partitionDefinition { type dimensionTypes { dynamicPartitionsDefinitionName } }
    partitionKeys
  }
}
"""


@pytest.fixture(scope="module")
def webserver(ui_server) -> str:
    return ui_server.base


def _graphql(base: str, query: str, variables: dict | None = None) -> dict:
    return graphql(base, query, variables)


def test_server_info_reports_dagster_version(webserver):
    info = requests.get(f"{webserver}/server_info", timeout=10).json()
    assert info["dagster_version"] == __import__("dagster").__version__


def test_graphql_lists_every_asset_and_the_collection_partitions(webserver, tiny_registry_path):
    from rag_clean_assets.definitions import build_assets

    expected = set(CORE_ASSETS)
    # collection_files is a SourceAsset (one key), the rest AssetsDefinitions
    in_process = {key.to_user_string() for a in build_assets(str(tiny_registry_path))
                  for key in (a.keys if hasattr(a, "keys") else [a.key])}
    if "exports" in in_process:
        expected.add("exports")
    assert expected <= in_process

    nodes = wait_for_asset_nodes(webserver, ASSETS_QUERY)
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert set(by_key) == expected
    for key, node in by_key.items():
        partitions = node["partitionDefinition"]
        assert partitions["type"] == "DYNAMIC", key
        assert [d["dynamicPartitionsDefinitionName"] for d in partitions["dimensionTypes"]] == ["collections"], key
        assert node["partitionKeys"] == ["demo"], key


RUN_BUDGET_S = 180


def test_run_launched_from_the_ui_command_reaches_success(ui_server):
    """The README's UI command runs the daemon: with our dagster.yaml (QueuedRunCoordinator, no backfill-dialog
    warning) a launched run must leave the queue at once and finish, not sit QUEUED."""
    assert "QueuedRunCoordinator" in (ui_server.tmp / "home" / "dagster.yaml").read_text()
    assert graphql(ui_server.base, "query { instance { runQueuingSupported } }")["instance"]["runQueuingSupported"]
    wait_for_asset_nodes(ui_server.base, "query { assetNodes { id } }")
    run_id = launch_partition_run(ui_server.base, "demo")
    seen = wait_for_run(ui_server.base, run_id, RUN_BUDGET_S)
    assert seen[-1] == "SUCCESS", f"run {run_id} statuses {sorted(set(seen))}:\n{ui_server.log.read_text()[-3000:]}"
    assert (ui_server.storage / "reranked" / "demo.parquet").is_file()
