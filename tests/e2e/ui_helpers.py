"""Shared by the e2e UI tests (GraphQL and browser): the README's UI command (`rag-clean ui`: webserver + daemon)
over a real DAGSTER_HOME, tiny models."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from project_env import init_instance, project_env

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 90
# workspace.yaml's location (pyproject's [tool.dagster] too): URLs are /locations/<this>/...
LOCATION_NAME = "rag_clean"


@dataclass
class UiServer:
    base: str
    tmp: Path
    env: dict
    log: Path

    @property
    def storage(self) -> Path:
        return self.tmp / "storage"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_tree(proc: subprocess.Popen) -> None:
    """Terminate the server and the code-server / run-worker children it started, each by PID; kill what remains."""
    import psutil

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


GUIDE = "# Guide\n\n## Install\n\nInstall the gpu driver.\n\n## Query\n\nRun the query server and search the index.\n"


def start_ui_server(tmp_path_factory, registry_path, collections=("demo",), **settings: str) -> UiServer:
    """`rag-clean ui --port PORT` (the README's UI command: dagster dev -w workspace.yaml, location
    LOCATION_NAME) over a home written by init-home, with one partition per collection (a folder with
    `guide.md`); `settings`: extra environment (e.g. RAG_CLEAN_AUTOMATION="0")."""
    requests = pytest.importorskip("requests")
    pytest.importorskip("psutil")
    tmp = tmp_path_factory.mktemp("webserver")
    for name in collections:
        (tmp / "data" / name).mkdir(parents=True)
        (tmp / "data" / name / "guide.md").write_text(GUIDE)
    env = project_env(tmp, registry_path, tmp / "data", **settings)
    init_instance(env, tmp, list(collections))

    port = free_port()
    log_path = tmp / "webserver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rag_clean_assets.cli", "ui", "--port", str(port)],
                                env=env, cwd=tmp, stdout=log,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, proc, log_path)
        yield UiServer(base=base, tmp=tmp, env=env, log=log_path)
    finally:
        stop_process_tree(proc)


def wait_for_server(base: str, proc: subprocess.Popen, log_path: Path) -> None:
    """Until GET /server_info answers; fails with the log's tail if the process exits or it takes too long."""
    import requests

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:4]} exited {proc.returncode}:\n{log_path.read_text()[-5000:]}")
        try:
            if requests.get(f"{base}/server_info", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{base} not up after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-5000:]}")
        time.sleep(0.5)


def graphql(base: str, query: str, variables: dict | None = None) -> dict:
    import requests

    response = requests.post(f"{base}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
    assert response.status_code == 200, response.text[:2000]
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


def wait_for_asset_nodes(base: str, query: str) -> list[dict]:
    """The code location loads in the background: retry until its asset nodes appear."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        nodes = graphql(base, query)["assetNodes"]
        if nodes or time.monotonic() > deadline:
            return nodes
        time.sleep(1)


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
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")


def job_selector(base: str, job: str = "embed_collection") -> dict:
    """The job's selector as the UI builds it (code location and repository read from the workspace)."""
    for entry in graphql(base, LOCATIONS_QUERY)["workspaceOrError"]["locationEntries"]:
        for repo in (entry.get("locationOrLoadError") or {}).get("repositories", []):
            if any(j["name"] == job for j in repo["jobs"]):
                return {"repositoryLocationName": entry["name"], "repositoryName": repo["name"], "pipelineName": job}
    pytest.fail(f"{job} job not found in the workspace")


def launch_partition_run(base: str, partition: str, job: str = "embed_collection") -> str:
    """Launch one partition of the job through the mutation the UI's launch buttons call; returns the run id."""
    params = {"selector": job_selector(base, job), "runConfigData": {},
              "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]}}
    launched = graphql(base, LAUNCH_MUTATION, {"params": params})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def wait_for_run(base: str, run_id: str, budget_s: float) -> list[str]:
    """The statuses seen until the run finished (or the budget ran out); the last one is the final one."""
    deadline, seen = time.monotonic() + budget_s, []
    while time.monotonic() < deadline:
        seen.append(graphql(base, RUN_QUERY, {"id": run_id})["runOrError"]["status"])
        if seen[-1] in FINISHED:
            break
        time.sleep(1)
    return seen
