"""Engine: faults of the vector index stage (issue 22): a disk that fills during a sync (a small tmpfs under
the Edge shard), a sync killed by a signal midway, and a model whose dimension changed. Real Qdrant Edge and
qdrant-client local mode; no mocks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rag_clean.index import VectorIndexError
from rag_clean.index.qdrant_edge import EdgeIndex
from rag_clean.index.qdrant_server import ServerIndex
from rag_clean.index.sync import sync_index
from tests import index_helpers
from tests.index_helpers import Store, assert_same_index, snapshot

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk (root only); yields a function that resizes it to used + `free` MiB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("tmpfs mount refused here")

    def resize(free_mib: int) -> None:
        used_mib = -(-shutil.disk_usage(disk).used >> 20)
        subprocess.run(["mount", "-o", f"remount,size={used_mib + free_mib}m", str(disk)], check=True)
    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_sync_is_refused_in_one_line_and_the_next_run_completes(tmp_path, small_disk):
    disk, resize = small_disk
    store = Store(tmp_path / "store", 40)
    index = EdgeIndex(disk / "idx", "demo")
    sync_index(index, store.write())
    before = snapshot(index, list(store.rows))
    index.close()
    for i in range(3000):
        store.put(f"more-{i}", f"added chunk number {i} " * 100)
    sources = store.write()
    resize(120)        # room to open the shard (3 dense vectors: 104 MiB), not to write 3000 points after it
    index = EdgeIndex(disk / "idx", "demo")
    with pytest.raises(VectorIndexError) as info:
        sync_index(index, sources)
    message = str(info.value)
    assert "\n" not in message and str(disk / "idx") in message and "no space" in message and "MiB free" in message
    after = snapshot(index, list(before))
    assert sorted(after) == sorted(before)                                        # untouched
    for cid, (payload, vectors) in before.items():
        assert after[cid][0] == payload and all(np.array_equal(np.asarray(after[cid][1][n]), np.asarray(v))
                                                 if not isinstance(v, dict) else after[cid][1][n] == v
                                                 for n, v in vectors.items())
    assert index.count() == 40
    index.close()
    resize(512)
    index = EdgeIndex(disk / "idx", "demo")
    result = sync_index(index, sources)
    assert result.upserted == 3000 and result.points == 3040
    fresh = EdgeIndex(tmp_path / "fresh", "demo")
    sync_index(fresh, sources)
    assert_same_index(index, fresh, list(store.rows))
    index.close(), fresh.close()


def test_too_little_space_to_open_the_shard_is_one_line_not_a_crash(tmp_path, small_disk):
    disk, resize = small_disk
    store = Store(tmp_path / "store", 10)
    index = EdgeIndex(disk / "idx", "demo")
    sync_index(index, store.write())
    index.close()
    resize(8)      # Edge allocates 32 MiB per dense vector on load: without the check, a SIGBUS kills the process
    index = EdgeIndex(disk / "idx", "demo")
    with pytest.raises(VectorIndexError, match=r"no space for the vector index at .*: opening it needs about 104 MiB"):
        index.count()


_KILLED_SYNC = textwrap.dedent("""
    import sys
    from pathlib import Path
    from rag_clean.index import qdrant_edge
    from rag_clean.index.sync import sync_index
    from tests.index_helpers import Store
    qdrant_edge.CHUNK_BYTES = qdrant_edge.SLACK_BYTES = qdrant_edge.WRITE_FACTOR = 0   # no space check
    store = Store(Path(sys.argv[1]), 40)
    sync_index(qdrant_edge.EdgeIndex(Path(sys.argv[2]), "demo"), store.write())
    print("built", flush=True)
    for i in range(4000):
        store.put(f"more-{i}", f"added chunk number {i} " * 100)
    sync_index(qdrant_edge.EdgeIndex(Path(sys.argv[2]), "demo"), store.write())
    print("not reached", flush=True)
""")


def test_a_sync_killed_by_the_full_disk_is_repaired_by_the_next_run(tmp_path, small_disk):
    """Without the space check Edge dies of SIGBUS mid-write (what any kill -9 midway does): the shard it
    leaves loads, and the next sync brings it to a fresh build's state."""
    disk, resize = small_disk
    resize(110)        # opening takes ~98 MiB: the 4000 points' writes meet the full disk
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SYNC, str(tmp_path / "s1"), str(disk / "idx")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert "built" in proc.stdout and "not reached" not in proc.stdout and proc.returncode != 0, proc.stderr[-500:]
    resize(1024)
    store = Store(tmp_path / "s2", 40)       # the same rows the killed process wrote (same seed, same edits)
    for i in range(4000):
        store.put(f"more-{i}", f"added chunk number {i} " * 100)
    sources = store.write()
    index = EdgeIndex(disk / "idx", "demo")
    result = sync_index(index, sources)
    assert result.points == 4040 and not sync_index(index, sources).wrote
    fresh = EdgeIndex(tmp_path / "fresh", "demo")
    sync_index(fresh, sources)
    assert_same_index(index, fresh, list(store.rows))
    index.close(), fresh.close()


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_a_models_dimension_changed_recreates_the_collection(tmp_path, monkeypatch, kind):
    """The registry now gives model-a 16 dims: the sink's schema no longer matches; the collection is
    recreated with the new dims and every point written again (Qdrant cannot resize a named vector)."""
    def open_(path):
        return EdgeIndex(path, "demo") if kind == "edge" else ServerIndex.local(path, "demo")
    store = Store(tmp_path / "store", 20)
    index = open_(tmp_path / "idx")
    sync_index(index, store.write())
    index.close()
    monkeypatch.setitem(index_helpers.DENSE, "model-a", 16)
    resized = Store(tmp_path / "store2", 20, seed=3)
    sources = resized.write()
    index = open_(tmp_path / "idx")
    result = sync_index(index, sources)
    assert result.recreated and result.upserted == 20 and result.points == 20 and result.deleted == 0
    vectors = index.retrieve(["c0"], with_vectors=["model-a", "fused"])[0]["vectors"]
    assert vectors["model-a"].shape == (16,) and vectors["fused"].shape == (28,)
    assert np.abs(vectors["model-a"] - sources.dense["model-a"].vectors[0]).max() <= 1e-6
    index.close()
