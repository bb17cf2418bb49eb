"""Model fingerprints: what forces a model's stored rows to be recomputed, and what lets them be reused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rag_clean.storage.digests as digests
import rag_clean.encoders.factory as factory
import rag_clean.config.models as common
from rag_clean.config.registry import load_registry
from rag_clean.config.models import model_fingerprint, sparse_fingerprint
from stage_helpers import dense as run_dense, fuse, sparse as run_sparse
from rag_clean.storage.embeddings import read_embeddings

TEXTS = ["install the gpu driver", "rerank the results", "query the index", "the embedding model"]


def _chunks(texts=TEXTS, metadata=None):
    return pa.table({"chunk_id": [f"c{i}" for i in range(len(texts))],
                     "content_hash": [hashlib.sha256(t.encode()).hexdigest() for t in texts],
                     "text": texts, "metadata_json": metadata or ["{}"] * len(texts)})


@pytest.fixture
def model_copy(tiny_models_dir, tiny_registry_path, tmp_path):
    """tiny-a and tiny-splade on a private copy of their folders (so a test may touch the weights)."""
    registry = load_registry(tiny_registry_path)
    specs = {}
    for name in ("tiny-a", "tiny-splade"):
        folder = shutil.copytree(tiny_models_dir / name, tmp_path / "models" / name)
        specs[name] = dataclasses.replace(registry.get(name), source="path:" + str(folder))
    return specs


def _weights_file(spec):
    folder = factory.resolve_local_source(spec, spec.source)
    return next(p for p in sorted(__import__("pathlib").Path(folder).rglob("*.safetensors")))


@pytest.mark.parametrize("change", [
    {"pooling": "cls"}, {"max_length": 16}, {"dtype": "float32"}, {"truncate_dim": 16}, {"source_weights": True},
    {"code_version": True},
])
def test_each_input_of_the_fingerprint_changes_it(model_copy, change, monkeypatch, tmp_path):
    spec = model_copy["tiny-a"]
    before = model_fingerprint(spec)
    assert model_fingerprint(spec) == before  # unchanged: same fingerprint
    if "source_weights" in change:
        path = _weights_file(spec)
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        after = model_fingerprint(spec)
    elif "code_version" in change:
        monkeypatch.setitem(common.ENCODER_CODE_VERSIONS, spec.backend, "bumped")
        after = model_fingerprint(spec)
    else:
        after = model_fingerprint(dataclasses.replace(spec, **change))
    assert after != before


def test_the_same_weights_elsewhere_keep_the_fingerprint(model_copy, tmp_path):
    spec = model_copy["tiny-a"]
    folder = factory.resolve_local_source(spec, spec.source)
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    other = dataclasses.replace(spec, source="path:" + str(moved))
    assert json.loads(model_fingerprint(other))["weights"] == json.loads(model_fingerprint(spec))["weights"]


def test_weight_digests_are_cached_by_size_and_mtime(model_copy, tmp_path, monkeypatch):
    spec = model_copy["tiny-a"]
    cache = tmp_path / "state" / "weights_digests.json"
    hashed = []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda p: hashed.append(p) or real(p))
    monkeypatch.setattr(common, "_DIGESTS", {})
    first = model_fingerprint(spec, cache)
    assert hashed and cache.exists()
    hashed.clear()
    monkeypatch.setattr(common, "_DIGESTS", {})  # a new process: only the cache file remains
    assert model_fingerprint(spec, cache) == first and hashed == []
    path = _weights_file(spec)
    path.write_bytes(path.read_bytes() + b"\0")  # size (and mtime) change: that file is hashed again
    assert model_fingerprint(spec, cache) != first and hashed == [path]


def test_dense_reuses_only_under_the_same_fingerprint(model_copy, tmp_path):
    spec = model_copy["tiny-a"]
    chunks = _chunks()
    writer, record = run_dense(spec, chunks, tmp_path / "a.arrow")
    writer.publish()
    assert (record.reused, record.computed) == (0, 4)
    previous = tmp_path / "a.arrow"
    writer, record = run_dense(spec, chunks, tmp_path / "b.arrow", previous=previous)
    writer.abort()
    assert (record.reused, record.computed) == (4, 0)
    changed = dataclasses.replace(spec, max_length=spec.max_length - 1)
    writer, record = run_dense(changed, chunks, tmp_path / "c.arrow", previous=previous)
    writer.abort()
    assert (record.reused, record.computed) == (0, 4)


def _sparse(specs, chunks, path, previous=None):
    staged, record = run_sparse(specs, chunks, path, previous, root=path.parent / "_state")
    staged.publish()
    return pq.read_table(path), record


def test_sparse_reuses_rows_by_fingerprint_and_hash_in_chunk_order(model_copy, tmp_path):
    spec = model_copy["tiny-splade"]
    full, record = _sparse([spec], _chunks(), tmp_path / "s.parquet")
    assert record.reuse_counts["tiny-splade"].computed == 4
    assert full.column("chunk_id").to_pylist() == ["c0", "c1", "c2", "c3"]  # chunk order, not encode order
    assert full.column("content_hash").to_pylist() == _chunks().column("content_hash").to_pylist()
    assert full.schema.metadata[b"fingerprint.tiny-splade"] == sparse_fingerprint(spec).encode()

    texts = [TEXTS[3], "a brand new chunk", TEXTS[0]]  # reordered, one new, two removed
    again, record = _sparse([spec], _chunks(texts), tmp_path / "s.parquet", previous=tmp_path / "s.parquet")
    counts = record.reuse_counts["tiny-splade"]
    assert (counts.reused, counts.computed) == (2, 1)
    fresh, _ = _sparse([spec], _chunks(texts), tmp_path / "fresh.parquet")
    # Same rows as a fresh run (weights of the encoded row agree to float32 rounding: batch shapes differ;
    # tests/assets/test_incremental_identity.py pins batches and compares bytes).
    for column in ("chunk_id", "content_hash", "model", "term_ids", "fallback"):
        assert again.column(column).equals(fresh.column(column)), column
    for got, want in zip(again.column("weights").to_pylist(), fresh.column("weights").to_pylist()):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)

    pruned = dataclasses.replace(spec, top_k=4)  # another fingerprint: everything recomputed
    _, record = _sparse([pruned], _chunks(texts), tmp_path / "s.parquet", previous=tmp_path / "s.parquet")
    assert record.reuse_counts["tiny-splade"].computed == 3


def test_fallback_rows_are_never_reused_as_model_rows(model_copy, tmp_path, monkeypatch):
    spec = model_copy["tiny-splade"]
    meta = [json.dumps({"sparse_features": {"term_weights": {"gpu": 1.0}}})] * 4
    real = factory.load_sparse_encoder

    def broken(*args, **kwargs):
        raise RuntimeError("no inference today")

    monkeypatch.setattr(factory, "load_sparse_encoder", broken)
    fallback, record = _sparse([spec], _chunks(metadata=meta), tmp_path / "s.parquet")
    assert record.fallback_used and all(fallback.column("fallback").to_pylist())
    assert record.reuse_counts["tiny-splade"].computed == 4
    monkeypatch.setattr(factory, "load_sparse_encoder", real)
    model_rows, record = _sparse([spec], _chunks(metadata=meta), tmp_path / "s.parquet", previous=tmp_path / "s.parquet")
    counts = record.reuse_counts["tiny-splade"]
    assert (counts.reused, counts.computed) == (0, 4) and not any(model_rows.column("fallback").to_pylist())


def test_sparse_stage_on_no_chunks(model_copy, tmp_path):
    table, record = _sparse([model_copy["tiny-splade"]], _chunks([]), tmp_path / "s.parquet")
    assert table.num_rows == 0 and record.rows == 0


def test_fusion_reuses_rows_only_with_the_same_inputs(model_copy, tmp_path):
    spec = model_copy["tiny-a"]
    texts = TEXTS + ["one more chunk"]
    writer, _ = run_dense(spec, _chunks(texts), tmp_path / "a.arrow")
    writer.publish()
    dense = {"tiny-a": read_embeddings(tmp_path / "a.arrow")}
    writer, record = fuse(dense, {"tiny-a": 1.0}, "concat", tmp_path / "f.arrow", _chunks(texts))
    writer.publish()
    assert record.reuse_counts["fused"].computed == 5
    previous = tmp_path / "f.arrow"

    # The stored fused rows stand for 4 of the current chunks (one text differs).
    chunks = _chunks(TEXTS[:4] + ["an edited chunk"])
    writer, _ = run_dense(spec, chunks, tmp_path / "b.arrow", previous=tmp_path / "a.arrow")
    writer.publish()
    current = {"tiny-a": read_embeddings(tmp_path / "b.arrow")}
    writer, record = fuse(current, {"tiny-a": 1.0}, "concat", tmp_path / "g.arrow", chunks, previous=previous)
    writer.publish()
    counts = record.reuse_counts["fused"]
    assert (counts.reused, counts.computed) == (4, 1)
    full, _ = fuse(current, {"tiny-a": 1.0}, "concat", tmp_path / "h.arrow", chunks)
    full.publish()
    assert (tmp_path / "g.arrow").read_bytes() == (tmp_path / "h.arrow").read_bytes()

    # Other weights, or a dense model with another fingerprint: nothing is reused.
    writer, record = fuse(current, {"tiny-a": 2.0}, "concat", tmp_path / "i.arrow", chunks, previous=previous)
    writer.abort()
    assert record.reuse_counts["fused"].reused == 0
    current["tiny-a"].metadata["fingerprint"] = "another model"
    writer, record = fuse(current, {"tiny-a": 1.0}, "concat", tmp_path / "j.arrow", chunks, previous=previous)
    writer.abort()
    assert record.reuse_counts["fused"].reused == 0


def test_dense_stage_on_no_chunks_without_a_previous_file(model_copy, tmp_path):
    writer, record = run_dense(model_copy["tiny-a"], _chunks([]), tmp_path / "a.arrow")
    writer.publish()
    assert (record.rows, record.reused, record.computed) == (0, 0, 0)
    assert len(read_embeddings(tmp_path / "a.arrow")) == 0
