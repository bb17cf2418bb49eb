"""Engine: a sharded Qdrant Edge index (several shards in one collection folder, written by one writer
process per shard) holds and answers exactly what a one-shard index does. Real Edge, real processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rag_clean.index import VectorIndexError
from rag_clean.index import qdrant_edge
from rag_clean.index import sync as sync_mod
from rag_clean.index.qdrant_edge import SCHEMA_FILE, EdgeIndex, auto_shards, shard_of
from rag_clean.index.shard_writer import ShardWriterPool
from rag_clean.index.sync import sync_index
from tests.index_helpers import Store, assert_same_index


@pytest.fixture(autouse=True)
def small_writes(monkeypatch):
    monkeypatch.setattr(sync_mod, "BLOCK", 16)               # several blocks at test sizes
    monkeypatch.setattr(qdrant_edge, "PARALLEL_MIN_POINTS", 1)  # writer processes even for a few points
    monkeypatch.setattr(qdrant_edge, "usable_cores", lambda: 4)


def test_sharded_build_and_edits_equal_one_shard(tmp_path):
    store = Store(tmp_path / "store", 60)
    sources = store.write()
    sharded = EdgeIndex(tmp_path / "sharded", "demo", shards=3)
    result = sync_index(sharded, sources)
    assert (result.upserted, result.points, result.recreated) == (60, 60, True)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir() if p.is_dir()) == ["shard-0", "shard-1", "shard-2"]
    per_shard = [store_.count() for store_ in sharded.stores]
    assert sum(per_shard) == 60 and min(per_shard) > 0       # every shard got points
    one = EdgeIndex(tmp_path / "one", "demo", shards=1)
    sync_index(one, sources)
    assert_same_index(sharded, one, list(store.rows))

    # Edits, additions, removals and a model re-encode go through the writer processes too.
    for i in range(0, 60, 7):
        store.put(f"c{i}", f"edited text {i}")
    for i in range(60, 66):
        store.put(f"c{i}", f"new chunk {i}")
    for i in (3, 4, 5):
        del store.rows[f"c{i}"]
    store.reencode("model-a", "fp-2")
    sources = store.write()
    sharded.close(), one.close()
    result = sync_index(sharded, sources)
    assert (result.deleted, result.upserted, result.rewritten.get("model-a")) == (3, 9 + 6, 63 - 15)
    sync_index(one, sources)
    assert_same_index(sharded, one, list(store.rows))

    # Search fans out to every shard: the same hits as one shard.
    query = sources.fused.vectors[10]
    assert sharded.dense_search("fused", query, 10) == one.dense_search("fused", query, 10)
    assert [h.chunk_id for h in sharded.dense_search("model-a", sources.dense["model-a"].vectors[4], 5)] == \
           [h.chunk_id for h in one.dense_search("model-a", sources.dense["model-a"].vectors[4], 5)]
    terms = np.array(store.rows["c20"]["sparse"]["splade"][0] or [1]), np.ones(1, np.float32)
    weights = np.ones(len(terms[0]), np.float32)
    assert sharded.sparse_search("splade", terms[0], weights, 8) == one.sparse_search("splade", terms[0], weights, 8)
    sharded.close(), one.close()

    # Reopened from disk: the stored shard count is kept, nothing rewritten.
    again = EdgeIndex(tmp_path / "sharded", "demo")
    result = sync_index(again, sources)
    assert (again.shards, result.wrote, result.recreated, result.points) == (3, False, False, 63)
    again.close()


def test_a_writer_process_that_dies_fails_the_sync_naming_the_shard(tmp_path, monkeypatch):
    store = Store(tmp_path / "store", 40)
    sources = store.write()
    real_write = ShardWriterPool.write

    def die_then_write(self, batch):
        self.writers[1].process.kill()   # as a SIGBUS on a full disk would
        return real_write(self, batch)

    monkeypatch.setattr(ShardWriterPool, "write", die_then_write)
    index = EdgeIndex(tmp_path / "idx", "demo", shards=2)
    with pytest.raises(VectorIndexError, match=r"writing shard 1 \(.*shard-1\) failed: its writer process died"):
        sync_index(index, sources)
    index.close()
    monkeypatch.setattr(ShardWriterPool, "write", real_write)
    # The next sync repairs the index: writes are idempotent.
    index = EdgeIndex(tmp_path / "idx", "demo")
    sync_index(index, sources)
    one = EdgeIndex(tmp_path / "one", "demo", shards=1)
    sync_index(one, sources)
    assert_same_index(index, one, list(store.rows))
    index.close(), one.close()


def test_shard_count_rules(tmp_path, monkeypatch):
    assert [auto_shards(n) for n in (0, 24_999, 25_000, 60_000, 10**7)] == [1, 1, 2, 2, 2]   # 4 cores: 2 at most
    monkeypatch.setattr(qdrant_edge, "usable_cores", lambda: 32)
    assert auto_shards(10**7) == qdrant_edge.MAX_SHARDS
    ids = [f"{i:08x}-0000-5000-8000-000000000000" for i in range(12)]
    assert shard_of(ids, 4).tolist() == [i % 4 for i in range(12)] and not shard_of(ids, 1).any()

    store = Store(tmp_path / "store", 20)
    sources = store.write()
    index = EdgeIndex(tmp_path / "idx", "demo")          # auto: 20 points -> one shard, files in the folder
    sync_index(index, sources)
    assert index.shards == 1 and not (tmp_path / "idx" / "shard-0").exists()
    index.close()
    # An index written before shards existed (no count in its schema file) reads as one shard, kept as it is.
    schema_file = tmp_path / "idx" / SCHEMA_FILE
    data = json.loads(schema_file.read_text())
    del data["shards"]
    schema_file.write_text(json.dumps(data))
    index = EdgeIndex(tmp_path / "idx", "demo")
    assert not sync_index(index, sources).recreated and index.count() == 20
    index.close()
    # Another explicit count rebuilds it.
    index = EdgeIndex(tmp_path / "idx", "demo", shards=2)
    result = sync_index(index, sources)
    assert (result.recreated, result.upserted, index.shards, index.count()) == (True, 20, 2, 20)
    index.close()
