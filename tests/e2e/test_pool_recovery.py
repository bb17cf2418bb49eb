"""A run killed with SIGKILL mid-dense must not block the `gpu` pool, and a waiting run must be cheap and stoppable.

Real parts only: a DAGSTER_HOME written by init-home (pool limit 1 forced through RAG_CLEAN_GPU_POOL_LIMIT, as
on a one-GPU machine), real `dagster asset materialize` subprocesses with tiny models, a real kill -9.

Before the fix: the killed run stayed STARTED holding its slot, later runs looped on "Step blocked by limit for
pool gpu" at ~100% CPU forever and ignored SIGTERM, and the killed writer's scratch file stayed on disk.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from project_env import init_instance, project_env

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
BIG_ROWS = 6000  # enough that the test catches run A inside its dense step (then SIGSTOPs it there)
RECOVERY_BUDGET_S = 60


def _write_jsonl(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "notes.jsonl", "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"n{i}", "text": f"install the gpu driver {i} then restart the server "
                                                        f"and query the index {i % 97}"}) + "\n")


@pytest.fixture()
def home(tmp_path, tiny_registry_path):
    data = tmp_path / "data"
    _write_jsonl(data / "big", BIG_ROWS)
    _write_jsonl(data / "small", 3)
    env = project_env(tmp_path, tiny_registry_path, data, RAG_CLEAN_GPU_POOL_LIMIT="1")
    init_instance(env, tmp_path, ["big", "small"])
    assert "default_limit: 1" in (tmp_path / "home" / "dagster.yaml").read_text()
    procs: list[subprocess.Popen] = []
    yield tmp_path, env, procs
    for proc in procs:  # only the runs this test started, by pid
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _start(collection: str, tmp: Path, env: dict, procs: list, name: str) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(BIN / "dagster"), "asset", "materialize", "--select", "*", "--partition",
                                 collection, "-m", "rag_clean_assets.definitions"], env=env, cwd=tmp, stdout=fh,
                                stderr=subprocess.STDOUT)
    procs.append(proc)
    return proc, log


def _slots(tmp: Path) -> list[tuple[str, str]]:
    """(run_id, step_key) of every claimed slot of the gpu pool (straight from the instance's index DB)."""
    db = tmp / "home" / "history" / "runs" / "index.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("select run_id, step_key from concurrency_slots "
                                "where concurrency_key = 'gpu' and run_id is not null").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []


def _wait_for(what: str, predicate, timeout: float, procs=(), logs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                pytest.fail(f"{what}: process exited {proc.returncode} first:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            tails = "\n".join(log.read_text()[-3000:] for log in logs)
            pytest.fail(f"{what}: not after {timeout} s\n{tails}")
        time.sleep(0.1)


def _run_status(tmp: Path, env: dict, run_id: str) -> tuple[str, str]:
    code = ("import dagster as dg, sys; i = dg.DagsterInstance.get(); r = i.get_run_by_id(sys.argv[1]); "
            "f = [e.message for e in i.all_logs(r.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)]; "
            "print(r.status.value); print(f[-1].replace(chr(10), ' ') if f else '')")
    out = subprocess.run([sys.executable, "-c", code, run_id], env=env, cwd=tmp, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    return out[0], (out[1] if len(out) > 1 else "")


def _pending_runs(tmp: Path) -> set[str]:
    db = tmp / "home" / "history" / "runs" / "index.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return {row[0] for row in conn.execute("select run_id from pending_steps where concurrency_key = 'gpu'")}


def test_sigkilled_run_releases_the_gpu_pool_and_its_scratch_files(home):
    tmp, env, procs = home
    dense_dir = tmp / "storage" / "dense_embeddings" / "tiny_a"

    # 1. Run A holds the gpu slot mid-dense (its scratch matrix exists: EmbeddingWriter's "matrix.npy" part,
    #    named by temp_path_for beside big.arrow). SIGSTOP freezes it there: a live
    #    holder for as long as the test needs, whatever the machine's speed.
    a, a_log = _start("big", tmp, env, procs, "a")
    _wait_for("run A in its dense step holding the gpu slot",
              lambda: any(step.startswith("dense_embeddings") for _, step in _slots(tmp))
              and any(dense_dir.glob(f".big.arrow.matrix.npy.{a.pid}@*.tmp")), 180, [a], [a_log])
    a.send_signal(signal.SIGSTOP)
    (a_run, _), = _slots(tmp)

    # 2. Run B waits for the slot: cheaply, and SIGTERM ends it promptly, releasing its claim.
    b, b_log = _start("small", tmp, env, procs, "b")
    # Blocked = a pending claim on the pool in the instance (Dagster's "Step blocked by limit for pool gpu" is a
    # DEBUG event: the terminal log of `dagster asset materialize` runs stops at INFO, instance python_log_level).
    _wait_for("run B blocked on the gpu pool", lambda: bool(_pending_runs(tmp) - {a_run}), 180, [b], [b_log])
    # It settles to sleep: the run's background warm-up (rag_clean.gpu.warmup: torch and transformers imports,
    # a few seconds of one core) may still be running when the claim appears, a spinning wait never settles.
    waiting, shares = psutil.Process(b.pid), []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cpu_before, t0 = sum(waiting.cpu_times()[:2]), time.monotonic()
        time.sleep(3)
        shares.append((sum(waiting.cpu_times()[:2]) - cpu_before) / (time.monotonic() - t0))
        if shares[-1] < 0.3:
            break
    assert shares[-1] < 0.3, f"a blocked run should sleep, it used {[f'{s:.0%}' for s in shares]} of a core"
    b.send_signal(signal.SIGTERM)
    try:
        b.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a blocked run ignored SIGTERM:\n{b_log.read_text()[-3000:]}")
    assert b.returncode != 0
    assert [run for run, _ in _slots(tmp)] == [a_run], "only the live (stopped) run A may hold the slot"
    assert _pending_runs(tmp) <= {a_run}, "the interrupted run left a pending claim"

    # 3. kill -9 A mid-dense; a new run of another collection must get the slot and finish.
    a.kill()
    a.wait(timeout=30)
    killed_at = time.monotonic()
    c, c_log = _start("small", tmp, env, procs, "c")
    try:
        c.wait(timeout=RECOVERY_BUDGET_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run C not done {RECOVERY_BUDGET_S} s after run A was killed:\n{c_log.read_text()[-3000:]}")
    recovery_s = time.monotonic() - killed_at
    assert c.returncode == 0, c_log.read_text()[-4000:]
    print(f"run C finished {recovery_s:.1f} s after run A was killed")

    status, message = _run_status(tmp, env, a_run)
    assert status == "FAILURE" and f"pid {a.pid}" in message and "slots were freed" in message, (status, message)
    assert _slots(tmp) == [] and _pending_runs(tmp) == set()
    leftovers = [p.name for p in dense_dir.iterdir() if p.name.startswith(".big.")]
    assert leftovers == [], f"the killed writer's temp files stayed: {leftovers}"
    assert (dense_dir / "small.arrow").is_file()


def test_next_writer_removes_only_dead_writers_temp_files(tmp_path):
    """Temp names carry the writer's pid: a new writer in the folder removes a dead writer's files and keeps a
    live writer's (here: a sleeping child process), its own, and files it cannot attribute."""
    import numpy as np

    from rag_clean.storage.atomic import temp_path_for
    from rag_clean.storage.embeddings import EmbeddingWriter

    def temp_of(pid: int, name: str) -> Path:
        own = temp_path_for(tmp_path / name)
        path = own.with_name(own.name.replace(f".{os.getpid()}@", f".{pid}@"))
        path.write_bytes(b"x" * 16)
        return path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [temp_of(dead.pid, "big.arrow"), temp_of(dead.pid, "big.arrow.matrix.npy")]
        kept = [temp_of(live.pid, "other.arrow"), tmp_path / ".legacy.arrow.0123456789ab.tmp"]
        kept[1].write_bytes(b"old format: no pid, left alone")
        writer = EmbeddingWriter(tmp_path / "small.arrow", ["a"], ["h"], 2)
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in kept)
        writer.write(np.array([0]), np.ones((1, 2), dtype=np.float32))
        writer.publish()
    finally:
        live.kill()
        live.wait()
    assert (tmp_path / "small.arrow").is_file()


def test_init_home_pool_limit_follows_the_machine_and_keeps_a_users_file(tmp_path, monkeypatch):
    from rag_clean_assets.collections import init_home
    from rag_clean_assets.instance import gpu_pool_limit

    assert gpu_pool_limit({"RAG_CLEAN_FORCE_CPU": "1"}) is None  # no CUDA: no limit
    assert gpu_pool_limit({"RAG_CLEAN_GPU_DEVICES": "0,1,2"}) == 3
    assert gpu_pool_limit({"RAG_CLEAN_GPU_POOL_LIMIT": "0", "RAG_CLEAN_GPU_DEVICES": "0"}) is None
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAG_CLEAN_GPU_POOL_LIMIT", "2")
    config = init_home()
    assert "default_limit: 2" in config.read_text() and "QueuedRunCoordinator" in config.read_text()
    monkeypatch.setenv("RAG_CLEAN_GPU_POOL_LIMIT", "0")
    assert "default_limit" not in init_home().read_text()  # our own file is rewritten
    config.write_text("telemetry:\n  enabled: false\n")
    init_home()
    assert config.read_text() == "telemetry:\n  enabled: false\n"  # a user's file is left alone
