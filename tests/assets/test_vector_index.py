"""The vector_index asset on the real graph with tiny models: built in the embedded Qdrant Edge sink, synced
incrementally after an edit, checked against the chunks table, and skipped (not materialized) when off."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rag_clean.index import open_index
from rag_clean.index.base import FUSED
from rag_clean.storage.arrow_io import read_arrow_table
from rag_clean.storage.embeddings import read_embeddings
from rag_clean.storage.layout import StorageLayout

SELECTION = None


def _check(result, name="index_matches_chunks"):
    evaluations = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    assert len(evaluations) == 1
    return evaluations[0]


def _index_meta(result):
    return next(m for m in result.get_asset_materialization_events()
                if m.asset_key.to_user_string() == "vector_index").materialization.metadata


def test_vector_index_builds_syncs_and_is_checked(pipeline):
    result = pipeline.materialize(enable_rerank=False)
    assert result.success
    meta = _index_meta(result)
    chunks = read_arrow_table(pipeline.file("chunks", "demo.arrow"))
    n = chunks.num_rows
    assert meta["sink"].value == "qdrant-edge" and meta["rows_upserted"].value == n
    assert meta["index_rows"].value == n and meta["rows_deleted"].value == 0
    assert _check(result).passed

    index = open_index("qdrant-edge", StorageLayout(pipeline.storage_root), "demo")
    fused = read_embeddings(pipeline.file("fused_embeddings", "demo.arrow"))
    hits = index.dense_search(FUSED, fused.vectors[0], 3)
    assert hits[0].chunk_id == chunks.column("chunk_id")[0].as_py() and abs(hits[0].score - 1.0) < 1e-5
    point = index.retrieve([hits[0].chunk_id], with_vectors=[FUSED])[0]
    assert point["text"] == chunks.column("text")[0].as_py()
    assert np.abs(point["vectors"][FUSED] - fused.vectors[0]).max() <= 1e-6
    index.close()

    # A no-op rerun writes nothing; an edited document rewrites only its chunks.
    result = pipeline.materialize(enable_rerank=False)
    meta = _index_meta(result)
    assert (meta["rows_upserted"].value, meta["rows_deleted"].value, meta["rows_unchanged"].value) == (0, 0, n)
    notes = pipeline.data_root / "demo" / "notes.jsonl"
    notes.write_text(notes.read_text().replace("first", "second"), encoding="utf-8")
    result = pipeline.materialize(enable_rerank=False)
    meta = _index_meta(result)
    assert meta["rows_upserted"].value == 1 and meta["rows_unchanged"].value == n - 1
    assert _check(result).passed


def test_check_fails_when_the_index_drifts(pipeline):
    assert pipeline.materialize(enable_rerank=False).success
    chunks = read_arrow_table(pipeline.file("chunks", "demo.arrow"))
    victim = chunks.column("chunk_id")[1].as_py()
    index = open_index("qdrant-edge", StorageLayout(pipeline.storage_root), "demo")
    index.delete([victim])
    index.commit()
    index.close()
    import dagster as dg
    result = pipeline.materialize(selection=dg.AssetSelection.checks_for_assets("vector_index")
                                  | dg.AssetSelection.assets("chunks"), enable_rerank=False)
    check = _check(result)
    assert not check.passed and "1 chunks without a point" in check.description and victim in check.description


def test_sink_off_skips_the_asset(pipeline):
    result = pipeline.materialize(enable_rerank=False, index_sink="off")
    assert result.success
    keys = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert "vector_index" not in keys and "fused_embeddings" in keys
    assert not pipeline.file("vector_index").exists()
