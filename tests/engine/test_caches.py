"""Caches are caches (issue 22 item 5): every state file that only speeds things up -- token budgets,
model-file digests, a collection's folder hashes, the export line index (the token cache is covered in
test_token_cache.py) -- when it holds garbage bytes or valid content of the wrong shape is discarded with ONE
warning naming the file, and the run gives what it gives without the file."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rag_clean.encoders.budget import DEFAULT_CPU_TOKEN_BUDGET, BudgetController, BudgetStore
from rag_clean.storage.digests import DigestCache, file_digest

GARBAGE = b"\xff\xfe\x00garbage\x80"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _one_warning_naming(caplog, path) -> None:
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and "discarded" in warnings[0]
    assert "model" not in warnings[0].split(str(path))[1]  # nothing blames a model


@pytest.mark.parametrize("content", [GARBAGE, b"[1, 2, 3]", b'{"m|cpu": "4096"}', b'{"m|cpu": {"token_budget": -5}}'])
def test_corrupt_token_budget_store_is_discarded_with_one_warning(tmp_path, caplog, content):
    path = tmp_path / "state" / "token_budgets.json"
    path.parent.mkdir()
    path.write_bytes(content)
    store = BudgetStore(path)
    with caplog.at_level(logging.WARNING):
        # What every encode step does first: the remembered budget, else the default. No error.
        controller = BudgetController.create("m", torch.device("cpu"), token_budget=None, store=store, floor=16,
                                             bytes_per_token=1)
        assert controller.budget == DEFAULT_CPU_TOKEN_BUDGET
        assert store.get("other", "cpu") is None  # asked again: no second warning
    _one_warning_naming(caplog, path)
    store.put("m", "cpu", 512)  # the next write starts a fresh store
    assert store.get("m", "cpu") == 512
    assert json.loads(path.read_text())["m|cpu"]["token_budget"] == 512


@pytest.mark.parametrize("content", [GARBAGE, b'{"format": 3, "files": []}',
                                     b'{"format": 3, "files": {"a": [1, 2, 12345]}}', b'"text"'])
def test_corrupt_weights_digest_cache_is_discarded_with_one_warning(tmp_path, caplog, content):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"weights" * 100)
    cache_file = tmp_path / "state" / "weights_digests.json"
    cache_file.parent.mkdir()
    cache_file.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        cache = DigestCache(cache_file)
        assert cache.digest(str(weights), weights) == file_digest(weights)
        cache.save()
    _one_warning_naming(caplog, cache_file)
    again = DigestCache(cache_file)  # rewritten: read back without hashing
    assert again.digest(str(weights), weights) == file_digest(weights) and again.hashed == 0


@pytest.mark.parametrize("content", [GARBAGE, b'{"format": 3, "files": {"a.md": "not a list"}}'])
def test_corrupt_folder_hash_cache_is_discarded_with_one_warning(tmp_path, caplog, content):
    from rag_clean.chunking.folder_version import folder_version
    from rag_clean.storage.layout import StorageLayout

    folder = tmp_path / "data" / "docs"
    folder.mkdir(parents=True)
    (folder / "a.md").write_text("# A\n\nsome text\n")
    cache_file = StorageLayout(tmp_path / "storage").folder_hash_cache_file("docs")
    want = folder_version(folder).digest  # no cache at all
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        got = folder_version(folder, cache_file)
    assert got.digest == want and got.hashed == 1
    _one_warning_naming(caplog, cache_file)


def _export_inputs(tmp_path):
    from rag_clean.chunking import CHUNK_SCHEMA
    from rag_clean.storage.embeddings import read_embeddings, write_embeddings

    n = 6
    ids = [f"c{i}" for i in range(n)]
    hashes = [f"{i:064x}" for i in range(n)]
    chunks = pa.table({"chunk_id": ids, "text": [f"text {i}" for i in range(n)], "content_hash": hashes,
                       "source_file": ["a.md"] * n, "chunk_index": pa.array(range(n), pa.int32()),
                       "heading": ["H"] * n, "section_path": [["H"]] * n,
                       "token_count": pa.array([3] * n, pa.int32()), "metadata_json": ["{}"] * n}, schema=CHUNK_SCHEMA)
    vecs = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    dense = read_embeddings(write_embeddings(tmp_path / "d.arrow", ids, hashes, vecs))
    return chunks, {"m": dense}, dense


@pytest.mark.parametrize("content", ["garbage", "wrong shape"])
def test_corrupt_export_line_index_is_discarded_with_one_warning(tmp_path, caplog, content):
    from rag_clean.exports.write import write_exports
    from rag_clean.storage.layout import StorageLayout

    chunks, dense, fused = _export_inputs(tmp_path)
    layout = StorageLayout(tmp_path / "storage")
    index = lambda kind: layout.export_line_index("docs", kind)  # noqa: E731
    write_exports(tmp_path / "out", "docs", chunks, dense, fused, line_index=index)
    path = index("qdrant")
    if content == "garbage":
        path.write_bytes(GARBAGE)
    else:  # describes the file as it is (size, mtime) but its byte ranges point past its end
        meta = pq.read_schema(path).metadata
        table = pq.read_table(path)
        wrong = table.set_column(1, "offset", pa.array([10 ** 9] * table.num_rows, pa.int64()))
        pq.write_table(wrong.replace_schema_metadata(meta), path)
    with caplog.at_level(logging.WARNING):
        table, record = write_exports(tmp_path / "out", "docs", chunks, dense, fused, line_index=index)
    _one_warning_naming(caplog, path)
    full, _ = write_exports(tmp_path / "full", "docs", chunks, dense, fused)
    assert table.column("sha256").to_pylist() == full.column("sha256").to_pylist()
    assert record.reuse_counts["qdrant_lines"].reused == 0
    _, again = write_exports(tmp_path / "out", "docs", chunks, dense, fused, line_index=index)
    assert again.reuse_counts["qdrant_lines"].reused == chunks.num_rows  # the index was rewritten
