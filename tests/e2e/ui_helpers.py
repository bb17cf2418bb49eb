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


def start_ui_server(tmp_path_factory, tiny_registry_path) -> UiServer:
    """`rag-clean ui --port PORT` (the README's UI command: dagster dev -w workspace.yaml, location
    LOCATION_NAME) over a home written by init-home, with one collection partition `demo`."""
    requests = pytest.importorskip("requests")
    pytest.importorskip("psutil")
    tmp = tmp_path_factory.mktemp("webserver")
    (tmp / "data" / "demo").mkdir(parents=True)
    (tmp / "data" / "demo" / "guide.md").write_text(
        "# Guide\n\n## Install\n\nInstall the gpu driver.\n\n## Query\n\nRun the query server and search the index.\n")
    env = project_env(tmp, tiny_registry_path, tmp / "data")
    init_instance(env, tmp, ["demo"])

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
