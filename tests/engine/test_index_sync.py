"""Engine: incremental sync of stored assets into the vector index, on the real embedded engine (Qdrant Edge)
and on qdrant-client's local mode (the client calls a Qdrant server receives). No models, no mocks."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.index.blocks import InProcessWriter
from rag_clean.index.qdrant_edge import EdgeIndex
from rag_clean.index.qdrant_server import ServerIndex
from rag_clean.index import VectorIndexError
from rag_clean.index import sync as sync_mod
from rag_clean.index.sync import sync_index
from tests.index_helpers import VECTOR_NAMES, Store, assert_same_index, snapshot


def _open(kind: str, path, collection: str = "demo"):
    return EdgeIndex(path, collection) if kind == "edge" else ServerIndex.local(path, collection)


@pytest.fixture(params=["edge", "local"])
def kind(request):
    return request.param


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(sync_mod, "BLOCK", 16)  # several blocks at test sizes


def _fresh(kind, tmp_path, sources, name="fresh"):
    index = _open(kind, tmp_path / name)
    sync_index(index, sources)
    return index


def test_full_build_holds_the_stored_vectors_and_payload(kind, tmp_path):
    store = Store(tmp_path / "store", 40)
    sources = store.write()
    index = _open(kind, tmp_path / "idx")
    result = sync_index(index, sources)
    assert (result.upserted, result.deleted, result.unchanged, result.points, result.recreated) == (40, 0, 0, 40, True)
    snap = snapshot(index, list(store.rows))
    for row_i, cid in enumerate(sources.chunks.column("chunk_id").to_pylist()):
        payload, vectors = snap[cid]
        row = store.rows[cid]
        assert {k: payload[k] for k in ("chunk_id", "source_file", "heading", "section_path", "chunk_index",
                                        "content_hash", "text")} == {k: row[k] for k in payload if k in row}
        assert payload["metadata"] == {"k": cid}
        assert np.abs(vectors["model-a"] - sources.dense["model-a"].vectors[row_i]).max() <= 1e-6
        assert np.abs(vectors["fused"] - sources.fused.vectors[row_i]).max() <= 1e-6
        assert vectors["splade"] == pytest.approx(dict(zip(*row["sparse"]["splade"])), abs=1e-6)
    assert set(vectors) == set(VECTOR_NAMES)
    index.close()


def test_edits_additions_removals_equal_a_fresh_build(kind, tmp_path):
    store = Store(tmp_path / "store", 50)
    index = _open(kind, tmp_path / "idx")
    sync_index(index, store.write())
    store.put("c3", "an edited text")                    # text changed
    store.put("c7", store.rows["c7"]["text"], heading="Renamed")   # payload only
    for cid in ("c10", "c11", "c40"):
        del store.rows[cid]                              # removed
    store.put("new-1", "an added chunk")
    store.put("new-2", "another added chunk")
    sources = store.write()
    result = sync_index(index, sources)
    assert (result.upserted, result.deleted, result.unchanged) == (4, 3, 45)
    assert result.rewritten == {}
    fresh = _fresh(kind, tmp_path, sources)
    assert_same_index(index, fresh, list(store.rows))
    index.close(), fresh.close()


class Counting:
    """The real sink, with a count of its write calls (every write still reaches the engine)."""

    def __init__(self, index):
        self.index, self.writes = index, []

    def writer(self, points, spec):
        return InProcessWriter(self, spec)   # the sink's own writer would call the unwrapped index

    def __getattr__(self, name):
        attr = getattr(self.index, name)
        if name in ("upsert", "update_vectors", "delete", "commit"):
            def write(*args, **kwargs):
                self.writes.append(name)
                return attr(*args, **kwargs)
            return write
        return attr


def test_noop_sync_writes_nothing(kind, tmp_path):
    store = Store(tmp_path / "store", 30)
    sources = store.write()
    index = _open(kind, tmp_path / "idx")
    sync_index(index, sources)
    index.close()
    index = Counting(_open(kind, tmp_path / "idx"))
    result = sync_index(index, sources)
    assert (result.upserted, result.deleted, result.unchanged, result.rewritten, result.wrote) == (0, 0, 30, {}, False)
    assert index.writes == [] and result.points == 30
    store.put("c4", "one edit")
    result = sync_index(index, store.write())
    assert index.writes == ["upsert", "commit"] and (result.upserted, result.unchanged) == (1, 29)
    index.close()


def test_fingerprint_change_rewrites_that_models_vectors_only(kind, tmp_path):
    store = Store(tmp_path / "store", 30)
    index = _open(kind, tmp_path / "idx")
    sync_index(index, store.write())
    store.reencode("model-a", "fp-2")     # dense model-a changed; fused changes with it (its inputs)
    store.reencode("splade", "sp-2")
    sources = store.write()
    result = sync_index(index, sources)
    assert (result.upserted, result.deleted) == (0, 0)
    assert result.rewritten == {"fused": 30, "model-a": 30, "splade": 30}   # org_model-b untouched
    fresh = _fresh(kind, tmp_path, sources)
    assert_same_index(index, fresh, list(store.rows))
    index.close(), fresh.close()


def test_sync_killed_midway_is_repaired_by_the_next(kind, tmp_path):
    store = Store(tmp_path / "store", 80)
    index = _open(kind, tmp_path / "idx")
    sync_index(index, store.write())
    for i in range(0, 80, 3):
        store.put(f"c{i}", f"edited {i}")
    for i in (1, 5, 50):
        del store.rows[f"c{i}"]
    store.put("added", "a new one")
    store.reencode("org/model-b", "fp-9")
    sources = store.write()

    def die(progress):
        if progress.blocks == 2:
            raise KeyboardInterrupt("killed")
    with pytest.raises(KeyboardInterrupt):
        sync_index(index, sources, progress=die)
    index.close()
    index = _open(kind, tmp_path / "idx")   # reopened, as the next run would
    result = sync_index(index, sources)
    assert result.upserted + sum(result.rewritten.values()) > 0   # it redid what the killed run had not done
    fresh = _fresh(kind, tmp_path, sources)
    assert_same_index(index, fresh, list(store.rows))
    again = sync_index(index, sources)
    assert not again.wrote
    index.close(), fresh.close()


def test_schema_change_recreates_the_collection(kind, tmp_path):
    store = Store(tmp_path / "store", 20)
    index = _open(kind, tmp_path / "idx")
    sources = store.write()
    sync_index(index, sources)
    without_sparse = sync_mod.SyncSources(sources.chunks, sources.fused, sources.dense)
    result = sync_index(index, without_sparse)
    assert result.recreated and result.upserted == 20 and result.points == 20
    assert set(index.retrieve(["c0"], with_vectors=["fused", "model-a"])[0]["vectors"]) == {"fused", "model-a"}
    with pytest.raises(VectorIndexError, match="has no vector 'splade'"):
        index.retrieve(["c0"], with_vectors=["splade"])
    index.close()


def test_the_index_stage_reports_progress_and_its_write_and_commit_times(tmp_path, monkeypatch):
    """A full build shows done/total lines over the chunk rows and one line before the commit (where Edge builds
    the HNSW graph); the record splits the time into writing and committing; a no-op sync commits nothing."""
    from rag_clean.stages.index import run_index_stage
    from rag_clean.telemetry import progress as progress_mod

    monkeypatch.setattr(progress_mod, "MIN_STEP_GAP_S", 0.0)
    sources = Store(tmp_path / "store", 80).write()
    lines: list[str] = []
    _, record = run_index_stage(EdgeIndex(tmp_path / "idx", "demo"), sources, progress=lines.append)
    assert any(line.startswith("vector_index: ") and "/80 chunks" in line for line in lines)
    commit = [line for line in lines if "committing" in line]
    assert len(commit) == 1 and commit[0].startswith("80 points written") and "HNSW graph of fused" in commit[0]
    assert record.upserted == 80 and record.write_s > 0 and record.commit_s > 0
    assert record.to_summary()["commit_s"] == record.commit_s
    lines.clear()
    _, again = run_index_stage(EdgeIndex(tmp_path / "idx", "demo"), sources, progress=lines.append)
    assert again.upserted == 0 and again.commit_s == 0 and not [line for line in lines if "committing" in line]


def test_existing_without_fingerprints_reads_ids_and_hashes_only(kind, tmp_path):
    store = Store(tmp_path / "store", 20)
    sources = store.write()
    index = _fresh(kind, tmp_path, sources)
    full = pa.concat_batches(list(index.existing(8)))
    light = pa.concat_batches(list(index.existing(8, fingerprints=False)))
    assert light.schema == full.schema and light.num_rows == full.num_rows == 20
    assert sorted(zip(*(light.column(c).to_pylist() for c in ("chunk_id", "content_hash")))) == \
           sorted(zip(*(full.column(c).to_pylist() for c in ("chunk_id", "content_hash"))))
    fingerprint_columns = [c for c in full.schema.names if c.startswith("fingerprints.")]
    assert all(full.column(c).null_count == 0 for c in fingerprint_columns)
    assert all(light.column(c).null_count == 20 for c in fingerprint_columns)
    assert sync_mod.index_drift(index, sources.chunks)["missing"] == 0
    index.close()
