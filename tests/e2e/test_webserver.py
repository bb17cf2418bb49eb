"""dagster-webserver serves the real Definitions: GraphQL lists every asset and the collections partitions."""

from __future__ import annotations

import time

import pytest

from ui_helpers import graphql, wait_for_asset_nodes

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


LOCATIONS_QUERY = """
query { workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError {
  ... on RepositoryLocation { repositories { name jobs { name } } } } } } } }
"""
LAUNCH_MUTATION = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN_QUERY = 'query Run($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }'
RUN_BUDGET_S = 180


def _embed_job_selector(base: str) -> dict:
    for entry in graphql(base, LOCATIONS_QUERY)["workspaceOrError"]["locationEntries"]:
        for repo in (entry.get("locationOrLoadError") or {}).get("repositories", []):
            if any(job["name"] == "embed_collection" for job in repo["jobs"]):
                return {"repositoryLocationName": entry["name"], "repositoryName": repo["name"],
                        "pipelineName": "embed_collection"}
    pytest.fail("embed_collection job not found in the workspace")


def test_run_launched_from_the_ui_command_reaches_success(ui_server):
    """The README's UI command runs the daemon: with our dagster.yaml (QueuedRunCoordinator, no backfill-dialog
    warning) a launched run must leave the queue at once and finish, not sit QUEUED."""
    assert "QueuedRunCoordinator" in (ui_server.tmp / "home" / "dagster.yaml").read_text()
    assert graphql(ui_server.base, "query { instance { runQueuingSupported } }")["instance"]["runQueuingSupported"]
    wait_for_asset_nodes(ui_server.base, "query { assetNodes { id } }")
    params = {"selector": _embed_job_selector(ui_server.base), "runConfigData": {},
              "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "demo"}]}}
    launched = graphql(ui_server.base, LAUNCH_MUTATION, {"params": params})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline, seen = time.monotonic() + RUN_BUDGET_S, []
    while time.monotonic() < deadline:
        status = graphql(ui_server.base, RUN_QUERY, {"id": run_id})["runOrError"]["status"]
        seen.append(status)
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(1)
    assert seen[-1] == "SUCCESS", f"run {run_id} statuses {sorted(set(seen))}:\n{ui_server.log.read_text()[-3000:]}"
    assert (ui_server.storage / "reranked" / "demo.parquet").is_file()
