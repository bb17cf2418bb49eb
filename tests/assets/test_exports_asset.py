"""The exports asset on the real graph with tiny models, and Matryoshka truncation seen through the assets."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from rag_clean.encoders.factory import load_dense_encoder
from rag_clean.exports.files import export_files, point_id
from rag_clean.config.registry import load_registry
from rag_clean.storage.arrow_io import read_arrow_table
from rag_clean.storage.digests import file_digest
from rag_clean.storage.embeddings import read_embeddings

# Words that appear nowhere in the documents: if they show up in an export, query text leaked.
QUERIES = [
    {"query_id": "q1", "text": "zebraquartz how to install the gpu driver", "gold_chunk_ids": ["legacy-1"]},
    {"query_id": "q2", "text": "xylophonia which cross encoder reranks results", "gold_chunk_ids": ["legacy-2"]},
]


def _add_queries(pipeline) -> None:
    path = pipeline.data_root / "demo" / "queries.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUERIES), encoding="utf-8")


def test_exports_off_by_default_then_on_by_run_config(pipeline, tmp_path):
    _add_queries(pipeline)
    result = pipeline.materialize()
    assert result.success
    # Off: no materialization and no summary record (it did not run), the reason in the run log.
    assert "exports" not in {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "exports" not in pipeline.summary()["stages"]
    assert any("exports skipped:" in (e.user_message or "") and "enable_exports=false (default)" in e.user_message
               for e in pipeline.instance.all_logs(result.run_id))
    assert not pipeline.file("exports").exists()  # neither a value file nor the default export folder

    export_dir = tmp_path / "exported"
    result = pipeline.materialize(enable_exports=True, export_dir=str(export_dir))
    assert result.success
    chunks = read_arrow_table(pipeline.file("chunks", "demo.arrow"))
    ids = chunks.column("chunk_id").to_pylist()
    files = export_files(export_dir, "demo")

    fused = read_embeddings(pipeline.file("fused_embeddings", "demo.arrow"))
    np.testing.assert_array_equal(np.load(files.fused), fused.vectors)
    for model, asset in (("tiny-a", "tiny_a"), ("tiny-b", "tiny_b")):
        stored = read_embeddings(pipeline.file("dense_embeddings", asset, "demo.arrow"))
        np.testing.assert_array_equal(np.load(files.model(model)), stored.vectors)

    points = [json.loads(line) for line in files.qdrant.read_text().splitlines()]
    assert [p["payload"]["chunk_id"] for p in points] == ids
    assert [p["id"] for p in points] == [point_id("demo", c) for c in ids]
    assert set(points[0]["vectors"]) == {"tiny-a", "tiny-b", "fused", "sparse"}
    # sparse_vectors rows are in encode order; the export is in chunk order (row i = chunk i).
    stored_terms = {r["chunk_id"]: r["term_ids"] for r in pq.read_table(pipeline.file("sparse_vectors", "demo.parquet")).to_pylist()}
    exported = [json.loads(line) for line in files.sparse.read_text().splitlines()]
    assert [e["chunk_id"] for e in exported] == ids
    assert [e["indices"] for e in exported] == [stored_terms[c] for c in ids]

    # The summary copy already describes the export itself; the stored summary has the final record.
    copy = json.loads(files.summary.read_text())
    assert "rag.export" in [s["name"] for s in copy["telemetry"]["spans"]]
    assert pipeline.summary()["stages"]["exports"]["export_dir"] == str(files.folder)

    # The asset's value: every file written, with its size and digest.
    value = pq.read_table(pipeline.file("exports", "demo.parquet")).to_pylist()
    assert sorted(v["name"] for v in value) == sorted(p.name for p in files.folder.iterdir())
    assert all(v["sha256"] == file_digest(files.folder / v["name"]) for v in value)
    event = next(e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "exports")
    assert event.materialization.metadata["files"].value == len(value) == 8

    # Query text never lands in an export (the queries asset keeps only hashes).
    for path in files.folder.iterdir():
        text = path.read_bytes().decode("utf-8", errors="replace")
        assert "zebraquartz" not in text and "xylophonia" not in text, path.name

    # Sparse off: the stale sparse file goes, and no sparse vector is exported (the stored one is stale).
    assert pipeline.materialize(enable_exports=True, export_dir=str(export_dir), enable_sparse=False).success
    assert not files.sparse.exists()
    assert "sparse" not in json.loads(files.qdrant.read_text().splitlines()[0])["vectors"]


def test_matryoshka_truncate_dim_through_the_assets(pipeline, tmp_path, tiny_registry_path):
    """tiny-b (48-d) with truncate_dim 16: stored, fused and exported vectors are the first 16 components,
    renormalized; never padded."""
    text = tiny_registry_path.read_text(encoding="utf-8")
    marker = 'name = "tiny-b"'
    head, tail = text.split(marker)
    truncated = tmp_path / "registry" / "models.toml"
    truncated.parent.mkdir()
    truncated.write_text(head + marker + "\ntruncate_dim = 16" + tail, encoding="utf-8")
    pipeline.registry_path = truncated
    from rag_clean_assets.checks import build_checks
    from rag_clean_assets.definitions import build_assets

    pipeline.assets = build_assets(str(truncated))
    pipeline.checks = build_checks(load_registry(truncated))
    export_dir = tmp_path / "exported"
    result = pipeline.materialize(selection=["chunks", "dense_embeddings/tiny_a", "dense_embeddings/tiny_b",
                                             "fused_embeddings", "exports"],
                                  enable_sparse=False, enable_exports=True, export_dir=str(export_dir))
    assert result.success

    stored = read_embeddings(pipeline.file("dense_embeddings", "tiny_b", "demo.arrow"))
    assert stored.dim == 16
    np.testing.assert_allclose(np.linalg.norm(stored.vectors, axis=1), 1.0, atol=1e-5)
    # Reference: the untruncated 48-d model, cut to 16 and renormalized by hand.
    chunks = read_arrow_table(pipeline.file("chunks", "demo.arrow"))
    encoder = load_dense_encoder(load_registry(tiny_registry_path).get("tiny-b"), "cpu")
    try:
        full = np.zeros((chunks.num_rows, 48), np.float32)
        for batch in encoder.encode(chunks.column("text").to_pylist()):
            full[batch.rows] = batch.dense
    finally:
        encoder.close()
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(stored.vectors, expected, atol=1e-5)

    assert read_embeddings(pipeline.file("fused_embeddings", "demo.arrow")).dim == 32 + 16
    assert np.load(export_files(export_dir, "demo").model("tiny-b")).shape == (chunks.num_rows, 16)
    assert pipeline.summary()["dense_run"]["per_model"]["tiny-b"]["native_dim"] == 48
