"""run_stage owns the shared plumbing; models are resolved once; one reader decides previous rows."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rag_clean.chunking.collection as collection
import rag_clean.storage.digests as digests
from fake_devices import FakeDeviceBackend
from rag_clean.chunking import ChunkingConfig
from rag_clean.chunking.folder_version import folder_version
from rag_clean.config.models import ModelResolver, ResolvedModel, declared_identity
from rag_clean.encoders.factory import load_dense_encoder
from rag_clean.gpu.lease import GpuLeaseManager
from rag_clean.stages.chunks import CHUNKS
from rag_clean.stages.context import Stage, run_stage
from rag_clean.stages.dense import DENSE
from rag_clean.storage.embeddings import EmbeddingWriter, write_embeddings
from rag_clean.storage.previous import read_previous
from rag_clean.telemetry.records import DenseRecord
from stage_helpers import stage_ctx

TEXTS = ["install the gpu driver", "rerank the results", "query the index"]


def _chunks(texts=TEXTS):
    return pa.table({"chunk_id": [f"c{i}" for i in range(len(texts))],
                     "content_hash": [hashlib.sha256(t.encode()).hexdigest() for t in texts], "text": texts})


class Lines:
    """A logger that keeps its lines (what a Dagster log manager or a Logger receives)."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, line):
        self.lines.append(line)

    warning = info


def test_a_disabled_stage_writes_nothing_and_says_why(registry, tmp_path):
    a, b = registry.get("tiny-a"), registry.get("tiny-b")
    ctx = stage_ctx(tmp_path, a, b, ensemble_models=("tiny-a",))
    ctx.log = Lines()
    out = run_stage(ctx, DENSE, b, _chunks())
    assert out.disabled and out.record.status == "disabled"
    assert out.record.reason.startswith("dense stage skipped: tiny-b is not in ensemble_models")
    assert ctx.log.lines == [out.record.reason] and out.record.toggles["ensemble_models"] == ["tiny-a"]
    assert not (tmp_path / "dense_embeddings").exists()


def test_what_a_failing_stage_staged_is_aborted(registry, tmp_path):
    def compute(ctx, io, rows):
        io.stage(EmbeddingWriter(io.target, ["c0"], ["h0"], 2)).write(np.array([0]), np.ones((1, 2), np.float32))
        raise RuntimeError("encoder died")

    ctx = stage_ctx(tmp_path, registry.get("tiny-a"))
    with pytest.raises(RuntimeError, match="encoder died"):
        run_stage(ctx, Stage("x", compute, asset=lambda rows: ["fused_embeddings"]), 1)
    assert list((tmp_path / "fused_embeddings").iterdir()) == []  # scratch matrix and staged file removed


def test_a_gpu_stage_holds_the_lease_it_is_given(registry, tmp_path):
    manager = GpuLeaseManager(tmp_path / "locks", backend=FakeDeviceBackend(2))
    entered = []

    def acquire():
        entered.append(True)
        return manager.lease(owner="test")

    def compute(ctx, io):
        return pa.table({"x": [1]}), DenseRecord(model="m", device=None)

    ctx = stage_ctx(tmp_path, registry.get("tiny-a"))
    ctx.lease = acquire
    out = run_stage(ctx, Stage("gpu", compute, lease=lambda plan: "gpu"))
    assert entered and ctx.device == "cuda:0"
    assert out.record.device == "cuda:0" and "lease.acquired" in [e["event"] for e in out.record.events]
    assert out.record.lease is not None  # the summary, taken at release
    entered.clear()
    run_stage(ctx, Stage("cpu", compute))
    assert not entered


def test_the_previous_rows_reader_says_why_nothing_is_reusable(tmp_path):
    hashes = pa.chunked_array([pa.array(["h0", "h1", "h2"])])
    assert read_previous(tmp_path / "none.arrow", {"fingerprint": "f"}, hashes).why == "absent"
    path = write_embeddings(tmp_path / "d.arrow", ["a", "b"], ["h2", "h0"], np.eye(2, dtype=np.float32),
                            {"fingerprint": "f"})
    rows = read_previous(path, {"fingerprint": "f"}, hashes)
    assert rows.matched and rows.current.tolist() == [0, 2] and rows.stored.tolist() == [1, 0]
    assert read_previous(path, {"fingerprint": "g"}, hashes).why == "other_config"
    assert read_previous(path, {"fingerprint": "f"}, hashes, dim=3).why == "other_config"
    old = tmp_path / "old.parquet"
    pq.write_table(pa.table({"chunk_id": ["a"]}), old)
    assert read_previous(old, {}, hashes).why == "no_hashes"
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    unreadable = read_previous(bad, {}, hashes)
    assert unreadable.why == "unreadable" and unreadable.error is not None and len(unreadable) == 0


def test_a_model_resolves_once_to_its_first_local_source(registry, tiny_models_dir, tmp_path):
    spec = dataclasses.replace(registry.get("tiny-a"), source="path:" + str(tmp_path / "missing"),
                               fallbacks=("path:" + str(tiny_models_dir / "tiny-a"),))
    resolver = ModelResolver(tmp_path / "digests.json")
    model = resolver.get(spec)
    assert resolver.get(spec) is model and model.fallback_applied
    assert model.folder == tiny_models_dir / "tiny-a" and "does not exist" in model.attempts[0][1]
    plain = ResolvedModel.resolve(registry.get("tiny-a"))
    assert model.weights_digest == plain.weights_digest  # the fingerprint hashes the folder that loads
    encoder = load_dense_encoder(spec, "cpu", model=model)  # sentence-transformers honours the fallback too
    try:
        assert encoder.stats.fallback["applied"] and encoder.stats.fallback["source"] == spec.fallbacks[0]
        assert encoder.encode_all(["gpu"]).shape == (1, spec.dim)
    finally:
        encoder.close()


def test_code_versions_come_from_the_declared_configuration(registry, monkeypatch):
    versions = pytest.importorskip("rag_clean_assets.versions")  # Dagster side; the engine tests need no Dagster
    monkeypatch.setattr(digests, "file_digest", lambda p: pytest.fail(f"a weight file was hashed: {p}"))
    spec = registry.get("tiny-a")
    before = versions.dense_code_version(spec)
    assert versions.dense_code_version(dataclasses.replace(spec, max_length=spec.max_length - 1)) != before
    assert versions.dense_code_version(dataclasses.replace(spec, fallbacks=("x/y",))) != before
    assert versions.sparse_code_version(registry) and versions.reranked_code_version(registry)
    assert "weights" not in declared_identity(spec)


def test_chunks_reads_unchanged_files_neither_for_the_version_nor_for_the_rows(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "docs"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"d{i}.md").write_text(f"# Part {i}\n\n" + f"text of part {i} " * 20)
    (folder / "n.jsonl").write_text('{"id": "n1", "text": "a note"}\n')

    def run(root, version):
        ctx = stage_ctx(root, collection="docs")
        ctx.collection_dir = lambda: folder
        target = ctx.layout.staged_asset_file(["chunks"], "docs")
        out = run_stage(ctx, CHUNKS, ChunkingConfig(max_tokens=32, overlap_tokens=4), version)
        out.value.publish()
        return target

    full = run(tmp_path / "full", None)
    cache = tmp_path / "folder_hashes.json"
    inc = run(tmp_path / "inc", folder_version(folder, cache))
    reads = []
    real_read, real_digest = collection._read_bytes, collection._digest
    monkeypatch.setattr(collection, "_read_bytes", lambda f, rel: reads.append(rel) or real_read(f, rel))
    monkeypatch.setattr(collection, "_digest", lambda f, rel: reads.append(rel) or real_digest(f, rel))
    (folder / "d1.md").write_text("# Part 1\n\nan edited part " * 3)
    before = full.read_bytes()
    inc = run(tmp_path / "inc", folder_version(folder, cache))
    assert reads == ["d1.md"]  # the edited file is read once; the others are neither read nor hashed
    shutil.rmtree(tmp_path / "full")
    monkeypatch.undo()
    assert run(tmp_path / "full", None).read_bytes() == inc.read_bytes() != before
