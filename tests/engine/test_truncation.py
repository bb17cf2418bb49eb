"""Chunks longer than a model's max length are counted per model, warned about once, and summarized."""

from __future__ import annotations

import pyarrow as pa

from rag_clean.config.registry import load_registry
from stage_helpers import dense as run_dense, sparse as run_sparse
from rag_clean.telemetry.summary import build_summary


def _chunks(texts):
    n = len(texts)
    return pa.table({"chunk_id": [f"c{i}" for i in range(n)], "content_hash": [f"h{i}" for i in range(n)],
                     "text": texts, "metadata_json": ["{}"] * n})


TEXTS = ["install the gpu driver", "rerank the results", "gpu " * 5000, "query the index"]


def test_dense_and_sparse_count_truncated_chunks(tiny_registry_path, tmp_path):
    registry = load_registry(tiny_registry_path)
    dense, sparse = registry.get("tiny-a"), registry.get("tiny-splade")
    writer, record = run_dense(dense, _chunks(TEXTS), tmp_path / "a.arrow")
    writer.abort()
    assert record.encode.truncated_inputs == 1
    limit = record.encode.max_length
    assert [w for w in record.warnings if "max_length" in w] == [
        f"tiny-a: 1 of 4 chunks are longer than its max_length ({limit} tokens) and were encoded from their "
        f"first {limit} tokens"]
    _, sparse_record = run_sparse([sparse], _chunks(TEXTS), root=tmp_path)
    assert sparse_record.per_model["tiny-splade"]["truncated_inputs"] == 1
    assert any(w.startswith("tiny-splade: 1 of 4 chunks are longer") for w in sparse_record.warnings)

    summary = build_summary("docs", {"dense_embeddings/tiny_a": record.to_summary(),
                                     "sparse_vectors": sparse_record.to_summary()}, {}, {})
    assert summary["telemetry"]["metrics"]["chunks_truncated"] == {"tiny-a": 1, "tiny-splade": 1}
    assert summary["dense_run"]["per_model"]["tiny-a"]["truncated_chunks"] == 1
    assert record.to_metadata("summary.json")["chunks_truncated"] == 1


def test_nothing_truncated_means_no_warning(tiny_registry_path, tmp_path):
    dense = load_registry(tiny_registry_path).get("tiny-a")
    writer, record = run_dense(dense, _chunks(TEXTS[:2]), tmp_path / "a.arrow")
    writer.abort()
    assert record.encode.truncated_inputs == 0 and not record.warnings


def test_a_reuse_rerun_still_reports_the_truncated_vectors_it_keeps(tiny_registry_path, tmp_path):
    dense = load_registry(tiny_registry_path).get("tiny-a")
    writer, first = run_dense(dense, _chunks(TEXTS), tmp_path / "a.arrow")
    previous = writer.publish()
    assert first.truncated == 1
    # Every vector reused: nothing is encoded, the stored vector of the long chunk is still from its first tokens.
    writer, again = run_dense(dense, _chunks(TEXTS), tmp_path / "b.arrow", previous)
    assert again.reused == 4 and again.encode is None
    assert (again.truncated, again.truncated_reused) == (1, 1)
    assert any("1 of 4 chunks are longer than its max_length" in w and "reused" in w for w in again.warnings)
    summary = build_summary("docs", {"dense_embeddings/tiny_a": again.to_summary()}, {}, {})
    assert summary["telemetry"]["metrics"]["chunks_truncated"] == {"tiny-a": 1}
    assert again.to_metadata("summary.json")["chunks_truncated"] == 1
    # Carried from file to file; a long chunk added now is counted beside the reused one.
    texts = TEXTS + ["index " * 5000]
    chunks = _chunks(texts)
    writer, third = run_dense(dense, chunks, tmp_path / "c.arrow", writer.publish())
    assert (third.reused, third.truncated, third.truncated_reused) == (4, 2, 1)
