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


def test_a_server_that_accepts_but_never_answers_fails_within_the_default_timeout(tmp_path):
    """A listening socket that never replies (a hung server, not a refused port): the default timeout bounds
    the wait (under ~10 s with the client already imported), then one line."""
    import threading

    from rag_clean.index import CONNECT_TIMEOUT_S
    from rag_clean.index import qdrant_server  # noqa: F401  (imported before timing: the wait is the timeout's)

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        held = []
        threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
        t0 = time.perf_counter()
        with pytest.raises(VectorIndexError) as info:
            open_index("qdrant", StorageLayout(tmp_path), "demo", url=f"http://127.0.0.1:{silent.getsockname()[1]}")
        waited = time.perf_counter() - t0
    assert CONNECT_TIMEOUT_S - 0.5 <= waited < 10
    assert "\n" not in str(info.value) and f"did not answer within {CONNECT_TIMEOUT_S:g}s" in str(info.value)


def test_something_else_answering_at_the_url_is_named_as_such(tmp_path):
    """An HTTP server that is not Qdrant (404 for /collections): one line with the status, not "did not answer"."""
    import http.server
    import threading

    class NotQdrant(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotQdrant)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(VectorIndexError) as info:
            open_index("qdrant", StorageLayout(tmp_path), "demo", url=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    message = str(info.value)
    assert "\n" not in message and "answered HTTP 404" in message and "did not answer" not in message


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


@pytest.mark.parametrize("kind", ["edge", "local"])
def test_hnsw_graph_for_fused_only_per_model_vectors_searched_exactly(tmp_path, kind):
    """Only `fused` gets an HNSW graph (m > 0); per-model vectors get m=0, in both sinks' own configs, and an
    approximate query on one returns the exact top k."""
    import json

    import numpy as np

    from rag_clean.index.base import HNSW_EF_CONSTRUCT, HNSW_M, IndexPoint
    from rag_clean.index.qdrant_server import ServerIndex

    schema = IndexSchema.build(8, {"BAAI/bge-m3": 4, "minilm": 4}, ["splade"])
    index = (open_index("qdrant-edge", StorageLayout(tmp_path), "demo") if kind == "edge"
             else ServerIndex.local(tmp_path / "local", "demo"))
    assert index.ensure_schema(schema)
    if kind == "edge":   # Edge's own record of the shard config
        vectors = json.loads((tmp_path / "vector_index" / "_edge" / "demo" / "edge_config.json").read_text())["vectors"]
        m = {name: v["hnsw_config"]["m"] for name, v in vectors.items()}
        ef = {v["hnsw_config"]["ef_construct"] for v in vectors.values()}
    else:
        vectors = index.client.get_collection("demo").config.params.vectors
        m = {name: v.hnsw_config.m for name, v in vectors.items()}
        ef = {v.hnsw_config.ef_construct for v in vectors.values()}
    assert m == {"fused": HNSW_M, "BAAI_bge-m3": 0, "minilm": 0} and ef == {HNSW_EF_CONSTRUCT}
    rng = np.random.default_rng(0)
    index.upsert([IndexPoint(f"c{i}", {"chunk_id": f"c{i}"},
                             {"fused": rng.random(8), "BAAI_bge-m3": rng.random(4), "minilm": rng.random(4)},
                             {"splade": (np.array([1]), np.array([1.0]))}) for i in range(50)])
    index.commit()
    q = rng.random(4)
    approx, exact = (index.dense_search("minilm", q, 5, exact=e) for e in (False, True))
    assert [h.chunk_id for h in approx] == [h.chunk_id for h in exact]
    assert [h.score for h in approx] == pytest.approx([h.score for h in exact], abs=1e-5)
    # Reopened with the same schema: kept; with other HNSW settings: recreated (both sinks compare them).
    assert not index.ensure_schema(schema)
    other = IndexSchema(schema.dense, schema.sparse, schema.graph, (HNSW_M * 2, HNSW_EF_CONSTRUCT))
    assert index.ensure_schema(other) and index.count() == 0
    index.close()


def test_a_shard_stored_before_hnsw_settings_is_rebuilt_once(tmp_path):
    """A schema file without graph / hnsw (an index built by the first version) never equals the current
    schema: the shard is recreated once with the current HNSW settings, then kept."""
    import json

    schema = IndexSchema.build(8, {"minilm": 4})
    index = open_index("qdrant-edge", StorageLayout(tmp_path), "demo")
    index.ensure_schema(schema)
    index.close()
    stored = index.path / "rag_clean_schema.json"
    old = json.loads(stored.read_text())
    del old["graph"], old["hnsw"]
    stored.write_text(json.dumps(old))
    index = open_index("qdrant-edge", StorageLayout(tmp_path), "demo")
    assert index.ensure_schema(schema) and not index.ensure_schema(schema)
    index.close()
