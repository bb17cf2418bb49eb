"""The real `dagster asset materialize` CLI against a real DAGSTER_HOME, with tiny models.

Materializes one collection fully, and a second one up to fused_embeddings; then rematerializes only
fused_embeddings of the first and checks that nothing else (and nothing of the second) was rewritten.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from project_env import init_instance, project_env

from rag_clean.storage.arrow_io import read_arrow_table
from rag_clean.storage.embeddings import read_embeddings
from rag_clean.telemetry.summary import read_summary

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
DEFS_MODULE = "rag_clean_assets.definitions"

GUIDE = """# Install guide

## Requirements

You need a gpu driver and python to install the embedding service. The query server runs on linux.

## Configure the index

Set the chunk size and the retrieval model in the config file before you install the index.
"""
NOTES = '{"id": "note-1", "text": "install the gpu driver first"}\n{"id": "note-2", "text": "restart the server"}\n'
ASSET_FILES = [  # (path parts under the storage root, reader kind), for collection "{c}"
    (("chunks", "{c}.arrow"), "arrow_table"),
    (("dense_embeddings", "tiny_a", "{c}.arrow"), "vectors"),
    (("dense_embeddings", "tiny_b", "{c}.arrow"), "vectors"),
    (("fused_embeddings", "{c}.arrow"), "vectors"),
    (("sparse_vectors", "{c}.parquet"), "table"),
    (("queries", "{c}.parquet"), "table"),
    (("reranked", "{c}.parquet"), "table"),
]


def _run(args: list[str], env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _materialize(select: str, collection: str, env: dict, cwd: Path) -> None:
    _run([str(BIN / "dagster"), "asset", "materialize", "--select", select, "--partition", collection,
          "-m", DEFS_MODULE], env, cwd)


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root (temp/lock files too) -> (mtime_ns, bytes)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory, tiny_registry_path):
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data"
    for name in ("demo", "other"):
        (data / name).mkdir(parents=True)
        (data / name / "guide.md").write_text(GUIDE, encoding="utf-8")
        (data / name / "notes.jsonl").write_text(NOTES, encoding="utf-8")
    env = project_env(tmp, tiny_registry_path, data)
    cwd = tmp  # not the repo: a stray .env or config/ there must not leak into the run
    init_instance(env, cwd, ["demo", "other"])
    _materialize("*fused_embeddings", "other", env, cwd)
    _materialize("*", "demo", env, cwd)
    return tmp, env, cwd


def test_cli_materializes_every_asset_into_readable_files(cli_home):
    tmp, _, _ = cli_home
    storage = tmp / "storage"
    assert "telemetry:\n  enabled: false" in (tmp / "home" / "dagster.yaml").read_text()
    rows = None
    for parts, kind in ASSET_FILES:
        path = storage.joinpath(*(p.format(c="demo") for p in parts))
        assert path.is_file(), path
        if kind in ("table", "arrow_table"):
            table = pq.read_table(path) if kind == "table" else read_arrow_table(path)
            assert table.num_rows > 0, path
            if parts[0] == "chunks":
                rows = table.num_rows
        else:
            vectors = read_embeddings(path)
            assert len(vectors) == rows and np.isfinite(vectors.vectors).all(), path
            np.testing.assert_allclose(np.linalg.norm(vectors.vectors, axis=1), 1.0, atol=1e-4)
    assert read_embeddings(storage / "fused_embeddings" / "demo.arrow").dim == 32 + 48
    summary = read_summary(storage / "telemetry" / "demo" / "processing_summary.json")
    assert summary["schema_version"] == "v4.2"
    assert summary["collection"] == "demo" and summary["chunk_count"] == rows
    assert summary["dense_run"]["models_executed"] == ["tiny-a", "tiny-b"]
    assert summary["sparse_run"]["executed"] is True and summary["rerank_run"]["executed"] is True


def test_rematerializing_one_asset_rewrites_only_its_file(cli_home):
    tmp, env, cwd = cli_home
    storage = tmp / "storage"
    demo_files = [str(Path(*(p.format(c="demo") for p in parts))) for parts, _ in ASSET_FILES]
    other = {k: v for k, v in _snapshot(storage).items() if Path(k).stem == "other" or "other" in Path(k).parts}
    assert any(k.endswith("fused_embeddings/other.arrow") for k in other)
    before = _snapshot(storage)
    fused_before = read_embeddings(storage / "fused_embeddings" / "demo.arrow")
    fused_before = (fused_before.chunk_ids, np.array(fused_before.vectors))

    _materialize("fused_embeddings", "demo", env, cwd)

    after = _snapshot(storage)
    fused = "fused_embeddings/demo.arrow"
    assert after[fused][0] != before[fused][0], "fused_embeddings was not rewritten"
    fused_after = read_embeddings(storage / fused)
    assert fused_after.chunk_ids == fused_before[0]
    np.testing.assert_array_equal(fused_after.vectors, fused_before[1])  # same inputs, same vectors
    for name in demo_files:
        if name != fused:
            assert after[name] == before[name], f"{name} changed"
    for name, state in other.items():
        assert after[name] == state, f"{name} of the other collection changed"
    summary = read_summary(storage / "telemetry" / "demo" / "processing_summary.json")
    runs = {key: rec["run_id"] for key, rec in summary["stages"].items()}
    assert runs["fused_embeddings"] != runs["chunks"] and runs["chunks"] == runs["reranked"]
