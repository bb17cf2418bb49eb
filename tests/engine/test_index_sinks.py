"""Engine: opening a sink: the embedded shard under the storage root, a Qdrant URL that does not answer
(one line after a bounded timeout, no hang), an empty URL, vector names."""

from __future__ import annotations

import socket
import time

import pytest

from rag_clean.index import IndexSchema, VectorIndexError, open_index, vector_name
from rag_clean.storage.layout import StorageLayout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # closed again on exit: nothing listens there


def test_unanswered_url_fails_with_one_line_quickly(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_QDRANT_KEY", "secret-key")
    url = f"http://user:pw@127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(VectorIndexError) as info:
        open_index("qdrant", StorageLayout(tmp_path), "demo", url=url, api_key_env="MY_QDRANT_KEY", timeout_s=1)
    assert time.perf_counter() - t0 < 15
    message = str(info.value)
    assert "\n" not in message and "did not answer within 1s" in message
    assert "pw" not in message and "secret-key" not in message and "127.0.0.1" in message


def test_empty_url_and_unknown_sink_are_one_clear_line(tmp_path):
    with pytest.raises(VectorIndexError, match="qdrant_url is empty"):
        open_index("qdrant", StorageLayout(tmp_path), "demo")
    with pytest.raises(VectorIndexError, match="cannot be opened"):
        open_index("lancedb", StorageLayout(tmp_path), "demo")


def test_edge_shard_lives_under_the_storage_root(tmp_path):
    index = open_index("qdrant-edge", StorageLayout(tmp_path), "demo")
    assert index.ensure_schema(IndexSchema.build(4, {"BAAI/bge-m3": 4}, ["splade"]))
    assert index.location == str(tmp_path / "vector_index" / "_edge" / "demo") and index.count() == 0
    index.close()
    with pytest.raises(Exception, match="not allowed"):
        StorageLayout(tmp_path).index_dir("../escape")


def test_vector_names():
    assert vector_name("BAAI/bge-m3") == "BAAI_bge-m3" and vector_name("minilm") == "minilm"
    with pytest.raises(ValueError, match="reserved"):
        IndexSchema.build(4, {"fused": 4})
    with pytest.raises(ValueError, match="collide"):
        IndexSchema.build(4, {"a/b": 4, "a_b": 4})
