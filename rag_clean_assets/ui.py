"""`rag-clean ui`: the Dagster UI (webserver + daemon) for this project, stoppable with Ctrl-C, SIGINT or SIGTERM.

    rag-clean ui [--host 127.0.0.1] [--port 3000]

It is `dagster dev -w workspace.yaml` with three differences from typing that command:

- The code location is workspace.yaml's (`rag_clean`, also pyproject's [tool.dagster]); `-m MODULE` would
  name it after the module, so URLs and run origins would differ between commands.
- Started in the background by a non-interactive shell (`cmd &`), a process inherits SIGINT *ignored*;
  `dagster dev` then maps SIGTERM to that same disposition (dagster._utils.interrupts.setup_interrupt_handlers),
  so it ignored both. And even when it stops, its code server and the runs that server launched live on
  (they wait for a heartbeat timeout, or for the run to end). Here `dagster dev` runs in a process group of
  its own with SIGINT at its default; SIGINT or SIGTERM to this process is passed to that whole group, as a
  terminal's Ctrl-C would be, and whatever is left after a grace period is terminated, then killed.
- `dagster dev` warns that `dg dev` supersedes it. `dg` comes with dagster-dg-cli, whose newest release
  (1.13.27) pins dagster==1.13.27, not this project's 1.13.28, and `dg dev` starts `dagster dev` underneath
  anyway; so this keeps `dagster dev` and silences that one warning.

$DAGSTER_HOME defaults to <project>/.dagster_home (where rag-clean and the main job write), and its
dagster.yaml is (re)written by init-home first: the queued run coordinator that the daemon started here
dequeues every second (rag_clean_assets/instance.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

WORKSPACE_FILE = Path(__file__).resolve().parents[1] / "workspace.yaml"
# The warning `dagster dev` prints at start, matched by message (its category class would need an import).
SUPERSEDED_WARNING = "ignore:Function `dev_command` is superseded"
# Seconds the group gets to stop after the forwarded SIGINT (dagster dev waits for its webserver and daemon),
# then after SIGTERM, before SIGKILL.
STOP_GRACE_S = 20.0
TERM_GRACE_S = 5.0


def dagster_dev_argv(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "dagster", "dev", "-w", str(WORKSPACE_FILE), "-h", host, "-p", str(port)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rag-clean ui", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address the webserver binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=3000, help="webserver port (default 3000)")
    args = p.parse_args(argv)
    if not WORKSPACE_FILE.is_file():
        print(f"error: {WORKSPACE_FILE} not found: run rag-clean ui from a checkout of the project", file=sys.stderr)
        return 2
    from rag_clean.config.paths import DEFAULT_DAGSTER_HOME
    from rag_clean_assets.collections import init_home

    os.environ.setdefault("DAGSTER_HOME", str(DEFAULT_DAGSTER_HOME))
    print(f"Dagster instance: {init_home().parent}", flush=True)
    warnings = [w for w in (os.environ.get("PYTHONWARNINGS"), SUPERSEDED_WARNING) if w]
    os.environ["PYTHONWARNINGS"] = ",".join(warnings)
    return supervise(dagster_dev_argv(args.host, args.port))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_group(proc: subprocess.Popen, pgid: int, seconds: float) -> bool:
    """Reap the leader and wait until nobody of the group is left; True if it emptied in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not _group_alive(pgid):
            return True
        time.sleep(0.2)
    return False


def supervise(argv: list[str]) -> int:
    """Run argv in its own process group until it ends or this process gets SIGINT / SIGTERM; then stop the
    whole group (SIGINT, then SIGTERM, then SIGKILL). Returns the exit status (128 + signal when stopped)."""
    received: list[int] = []

    def _stop(signum, _frame):
        received.append(signum)

    # Installed before the child starts, so a signal that arrives during its start is not lost.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    # SIGINT at its default in the child (an inherited SIG_IGN would survive exec, see above).
    proc = subprocess.Popen(argv, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pgid = proc.pid
    while proc.poll() is None and not received:
        time.sleep(0.2)
    if not received:
        return proc.returncode
    print(f"rag-clean ui: {signal.Signals(received[0]).name} received, stopping the Dagster services", flush=True)
    _signal_group(pgid, signal.SIGINT)
    if not _wait_group(proc, pgid, STOP_GRACE_S):
        _signal_group(pgid, signal.SIGTERM)
        if not _wait_group(proc, pgid, TERM_GRACE_S):
            _signal_group(pgid, signal.SIGKILL)
            _wait_group(proc, pgid, TERM_GRACE_S)
    return 128 + received[0]
