"""dagster-webserver serves the real Definitions: GraphQL lists every asset and the collections partitions."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 90
CORE_ASSETS = {"chunks", "dense_embeddings/tiny_a", "dense_embeddings/tiny_b", "fused_embeddings", "sparse_vectors",
               "queries", "reranked"}

ASSETS_QUERY = """
query {
  assetNodes {
    assetKey { path }
    partitionDefinition { type dimensionTypes { dynamicPartitionsDefinitionName } }
    partitionKeys
  }
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server and the code-server children it started, each by PID; kill what remains."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()


@pytest.fixture(scope="module")
def webserver(tmp_path_factory, tiny_registry_path):
    tmp = tmp_path_factory.mktemp("webserver")
    (tmp / "data" / "demo").mkdir(parents=True)
    (tmp / "data" / "demo" / "guide.md").write_text("# Guide\n\n## Install\n\nInstall the gpu driver.\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDER_", "RAG_CLEAN_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(tmp / "home"), RAG_CLEAN_MODEL_REGISTRY=str(tiny_registry_path),
               RAG_CLEAN_DATA_ROOT=str(tmp / "data"), RAG_CLEAN_STORAGE_ROOT=str(tmp / "storage"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for args in (["init-home"], ["add", "demo"]):
        subprocess.run([sys.executable, "-m", "rag_clean_assets.collections", *args], env=env, cwd=tmp,
                       check=True, capture_output=True, timeout=120)
    config = (tmp / "home" / "dagster.yaml").read_text()
    assert "telemetry:\n  enabled: false" in config and "nux:\n  enabled: false" in config

    port = _free_port()
    log_path = tmp / "webserver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                 "-m", "rag_clean_assets.definitions"], env=env, cwd=tmp, stdout=log,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster-webserver exited {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            try:
                if requests.get(f"{base}/server_info", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster-webserver not up after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        yield base
    finally:
        _stop(proc)


def _graphql(base: str, query: str) -> dict:
    response = requests.post(f"{base}/graphql", json={"query": query}, timeout=60)
    assert response.status_code == 200, response.text[:2000]
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


def test_server_info_reports_dagster_version(webserver):
    info = requests.get(f"{webserver}/server_info", timeout=10).json()
    assert info["dagster_version"] == __import__("dagster").__version__


def test_graphql_lists_every_asset_and_the_collection_partitions(webserver, tiny_registry_path):
    from rag_clean_assets.definitions import build_assets

    expected = set(CORE_ASSETS)
    in_process = {key.to_user_string() for a in build_assets(str(tiny_registry_path)) for key in a.keys}
    if "exports" in in_process:
        expected.add("exports")
    assert expected <= in_process

    # The code location loads in the background: retry until its asset nodes appear.
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        nodes = _graphql(webserver, ASSETS_QUERY)["assetNodes"]
        if nodes or time.monotonic() > deadline:
            break
        time.sleep(1)
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert set(by_key) == expected
    for key, node in by_key.items():
        partitions = node["partitionDefinition"]
        assert partitions["type"] == "DYNAMIC", key
        assert [d["dynamicPartitionsDefinitionName"] for d in partitions["dimensionTypes"]] == ["collections"], key
        assert node["partitionKeys"] == ["demo"], key
