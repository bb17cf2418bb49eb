"""The README's UI command: one code location name everywhere, and it stops on SIGINT / SIGTERM when backgrounded.

`rag-clean ui` is started as a non-interactive shell's `cmd &` starts it (SIGINT ignored, inherited), over a
real DAGSTER_HOME and the tiny registry; the location name is read back from the running webserver.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from project_env import REPO_ROOT, project_env
from ui_helpers import LOCATION_NAME, free_port, graphql, wait_for_server

requests = pytest.importorskip("requests")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.e2e
STOP_BUDGET_S = 45  # the wrapper's grace periods (20 + 5 + 5 s) plus slack for a loaded 2-core machine
LOCATIONS = "query { workspaceOrError { ... on Workspace { locationEntries { name } } } }"
DOCS = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")]


def _documented_commands() -> list[str]:
    """Every `dagster ...` / `dagster-webserver ...` / `rag-clean ui` command line in the README and docs."""
    found = []
    for doc in DOCS:
        for line in doc.read_text(encoding="utf-8").splitlines():
            found += re.findall(r"(?:dagster-webserver|dagster (?:dev|job|asset|sensor)|rag-clean ui)\b[^`\n]*", line)
    return found


def test_readme_commands_workspace_and_pyproject_name_one_location():
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    from rag_clean_assets.ui import WORKSPACE_FILE

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["dagster"]
    origins = WorkspaceFileTarget(paths=[str(WORKSPACE_FILE)]).create_origins()
    assert [o.location_name for o in origins] == [pyproject["code_location_name"]] == [LOCATION_NAME]
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "rag-clean ui" in readme
    commands = _documented_commands()
    assert commands
    for command in commands:
        # A code location is named after -m's module: only `dagster asset materialize` (in-process, no location)
        # may load the module directly; everything that serves or launches uses workspace.yaml.
        if " -m " in f" {command} ":
            assert command.startswith("dagster asset materialize"), command


def _session_pids(proc: subprocess.Popen) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_backgrounded_ui_command_stops_on_signal(sig, tmp_path, tiny_registry_path):
    (tmp_path / "data").mkdir()
    env = project_env(tmp_path, tiny_registry_path, tmp_path / "data")
    port = free_port()
    log = tmp_path / "ui.log"

    def as_background_job():  # what `cmd &` in a script does: SIGINT ignored, and inherited
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rag_clean_assets.cli", "ui", "--port", str(port)],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=as_background_job)
    try:
        wait_for_server(f"http://127.0.0.1:{port}", proc, log)
        entries = graphql(f"http://127.0.0.1:{port}", LOCATIONS)["workspaceOrError"]["locationEntries"]
        assert [e["name"] for e in entries] == [LOCATION_NAME]
        started = _session_pids(proc)
        assert started, "dagster dev started no processes"
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=STOP_BUDGET_S)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid in _session_pids(proc):
                psutil.Process(pid).kill()
    assert proc.returncode == 128 + sig, log.read_text()[-3000:]
    left = [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after {took:.0f} s: {left}"
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", port))  # the port is free again
    text = log.read_text()
    assert "superseded" not in text, text[:2000]
