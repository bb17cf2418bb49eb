"""Engine: the old embedder's export files written from stored vectors (no Dagster, no models)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.chunking import read_collection
from rag_clean.exports.files import (
    POINT_ID_NAMESPACE,
    TEXT_PREVIEW_CHARS,
    ExportError,
    export_files,
    model_file_part,
    point_id,
)
from rag_clean.exports.write import write_exports
from rag_clean.retrieval.fusion import fuse_block
from rag_clean.stages.sparse import SPARSE_SCHEMA
from rag_clean.storage.digests import file_digest
from rag_clean.storage.embeddings import read_embeddings, write_embeddings

LONG_TEXT = "install the gpu driver " * 40  # > 500 chars: the preview must cut it


def _chunk_folder(root: Path) -> Path:
    folder = root / "Chunked" / "docs"
    folder.mkdir(parents=True)
    records = [
        {"text": LONG_TEXT if i == 1 else f"chunk number {i} about the embedding model",
         "metadata": {"chunk_id": f"docs-{i}", "source_file": "guide.md", "filename": "guide.md", "chunk_index": i,
                      "section_path": ["Guide", f"Part {i}"], "heading_text": f"Part {i}", "content_type": "text",
                      "parent_chunk_id": None, "char_count": 40}}
        for i in range(5)
    ]
    (folder / "guide_chunks.json").write_text(json.dumps(records), encoding="utf-8")
    return folder


@pytest.fixture
def stored(tmp_path):
    """Chunks table + stored dense (8-d, 12-d) and fused vectors + a sparse table, like the assets leave them."""
    chunks = read_collection(_chunk_folder(tmp_path)).table
    ids = chunks.column("chunk_id").to_pylist()
    hashes = chunks.column("content_hash").to_pylist()
    rng = np.random.default_rng(0)
    dense = {}
    for name, dim in (("model-a", 8), ("org/model-b", 12)):
        vecs = rng.normal(size=(len(ids), dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        dense[name] = read_embeddings(write_embeddings(tmp_path / "store" / f"{model_file_part(name)}.arrow", ids, hashes, vecs))
    fused_vecs = fuse_block([dense[n].vectors for n in dense], [0.5, 0.5], "concat")
    fused = read_embeddings(write_embeddings(tmp_path / "store" / "fused.arrow", ids, hashes, fused_vecs,
                                             {"method": "concat"}))
    # Stored in reverse chunk order: the exporter must put rows back in chunk order.
    rows = [{"chunk_id": cid, "model": "splade", "term_ids": [i + 1, i + 7], "weights": [1.5, 0.25], "fallback": i == 2}
            for i, cid in enumerate(ids)][::-1]
    sparse = pa.Table.from_pylist(rows, schema=SPARSE_SCHEMA)
    return chunks, dense, fused, sparse


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_file_matches_the_chunks(tmp_path, stored):
    chunks, dense, fused, sparse = stored
    ids = chunks.column("chunk_id").to_pylist()
    texts = chunks.column("text").to_pylist()
    summary = {"schema_version": "v4.2", "collection": "docs"}
    table, record = write_exports(tmp_path / "out", "docs", chunks, dense, fused, sparse=sparse,
                                  sparse_models=["splade"], summary=summary, block_rows=2)
    f = export_files(tmp_path / "out", "docs")
    assert f.folder == (tmp_path / "out" / "docs").resolve()

    fused_npy = np.load(f.fused)
    assert fused_npy.dtype == np.float32 and fused_npy.shape == (5, 20)
    np.testing.assert_array_equal(fused_npy, fused.vectors)
    for name, emb in dense.items():
        arr = np.load(f.model(name))
        assert arr.shape == (5, emb.dim)
        np.testing.assert_array_equal(arr, emb.vectors)
    assert f.model("org/model-b").name == "docs_org_model-b_embeddings.npy"

    points = _lines(f.qdrant)
    assert [p["payload"]["chunk_id"] for p in points] == ids
    assert [p["id"] for p in points] == [str(uuid.uuid5(POINT_ID_NAMESPACE, f"docs/{c}")) for c in ids]
    assert all(str(uuid.UUID(p["id"])) == p["id"] for p in points)  # Qdrant accepts UUID ids
    assert [p["payload"]["text_preview"] for p in points] == [t[:TEXT_PREVIEW_CHARS] for t in texts]
    assert len(points[1]["payload"]["text_preview"]) == TEXT_PREVIEW_CHARS < len(texts[1])
    meta = points[3]["payload"]["metadata"]
    assert meta["section_path"] == ["Guide", "Part 3"] and meta["heading_text"] == "Part 3"
    assert meta["filename"] == "guide.md" and meta["parent_chunk_id"] is None and meta["chunk_index"] == 3
    for i, p in enumerate(points):
        assert set(p["vectors"]) == {"model-a", "org/model-b", "fused", "sparse"}
        np.testing.assert_array_equal(np.asarray(p["vectors"]["fused"], np.float32), fused.vectors[i])
        np.testing.assert_array_equal(np.asarray(p["vectors"]["model-a"], np.float32), dense["model-a"].vectors[i])
        assert p["vectors"]["sparse"] == {"indices": [i + 1, i + 7], "values": [1.5, 0.25]}

    sparse_lines = _lines(f.sparse)
    assert [s["chunk_id"] for s in sparse_lines] == ids
    assert [s["fallback"] for s in sparse_lines] == [False, False, True, False, False]

    metadata = json.loads(f.metadata.read_text())
    assert [c["chunk_id"] for c in metadata["chunks"]] == ids
    assert [c["index"] for c in metadata["chunks"]] == list(range(5))
    assert metadata["models"]["org/model-b"] == {"file": "docs_org_model-b_embeddings.npy", "dim": 12,
                                                 "vector_name": "org/model-b"}
    stats = json.loads(f.stats.read_text())
    assert stats["fused"]["dim"] == 20 and stats["sparse"]["splade"]["fallback_rows"] == 1
    assert json.loads(f.summary.read_text()) == summary

    # The returned table lists exactly the files on disk, with their real sizes and digests.
    on_disk = sorted(p.name for p in f.folder.iterdir())
    assert sorted(table.column("name").to_pylist()) == on_disk  # no temp file left behind
    for row in table.to_pylist():
        assert row["bytes"] == (f.folder / row["name"]).stat().st_size
        assert row["sha256"] == file_digest(f.folder / row["name"])
    assert record.stage == "exports" and record.rows == 5 and record.sparse_models == ["splade"]


def test_block_size_does_not_change_the_bytes(tmp_path, stored):
    chunks, dense, fused, sparse = stored
    small, _ = write_exports(tmp_path / "a", "docs", chunks, dense, fused, sparse=sparse, sparse_models=["splade"],
                             block_rows=1)
    large, _ = write_exports(tmp_path / "b", "docs", chunks, dense, fused, sparse=sparse, sparse_models=["splade"])
    assert small.to_pylist() == large.to_pylist()


def test_without_sparse_the_stale_sparse_file_is_removed(tmp_path, stored):
    chunks, dense, fused, sparse = stored
    write_exports(tmp_path, "docs", chunks, dense, fused, sparse=sparse, sparse_models=["splade"],
                  summary={"x": 1})
    only_a = {"model-a": dense["model-a"]}
    table, record = write_exports(tmp_path, "docs", chunks, only_a, fused)
    f = export_files(tmp_path, "docs")
    assert not f.sparse.exists() and not f.model("org/model-b").exists() and not f.summary.exists()
    assert record.removed_stale == sorted([f.sparse.name, f.model("org/model-b").name, f.summary.name])
    assert all(set(p["vectors"]) == {"model-a", "fused"} for p in _lines(f.qdrant))
    assert "docs_sparse.jsonl" not in table.column("name").to_pylist()


def test_summary_callable_sees_the_files_written_so_far(tmp_path, stored):
    chunks, dense, fused, _ = stored
    seen = {}

    def summary(partial):
        seen.update(partial)
        return {"files": partial["files"]}

    write_exports(tmp_path, "docs", chunks, dense, fused, summary=summary)
    assert seen["stage"] == "exports" and "docs_embeddings.npy" in seen["files"]


def test_vectors_for_other_chunks_are_refused(tmp_path, stored):
    chunks, dense, fused, _ = stored
    fewer = chunks.slice(0, 4)
    with pytest.raises(ExportError, match=r"dense_embeddings/model-a was computed for other chunks.*rematerialize"):
        write_exports(tmp_path, "docs", fewer, dense, fused)


def test_sparse_rows_missing_a_chunk_are_refused(tmp_path, stored):
    chunks, dense, fused, sparse = stored
    with pytest.raises(ExportError, match=r"sparse_vectors for model 'splade' does not cover the current chunks"):
        write_exports(tmp_path, "docs", chunks, dense, fused, sparse=sparse.slice(1), sparse_models=["splade"])


def test_collection_name_cannot_leave_the_export_dir(tmp_path, stored):
    chunks, dense, fused, _ = stored
    with pytest.raises(ValueError, match="not allowed"):
        write_exports(tmp_path, "../elsewhere", chunks, dense, fused)


def test_point_ids_are_stable_and_per_collection():
    assert point_id("docs", "a") == point_id("docs", "a") != point_id("other", "a")


def test_npy_files_are_what_numpy_saves(tmp_path, stored):
    chunks, dense, fused, _ = stored
    write_exports(tmp_path / "out", "docs", chunks, dense, fused, block_rows=2)
    np.save(tmp_path / "want.npy", np.asarray(fused.vectors, np.float32))
    assert export_files(tmp_path / "out", "docs").fused.read_bytes() == (tmp_path / "want.npy").read_bytes()


def _changed(tmp_path, stored):
    """The stored assets after an edit (row 2: new text and vectors), a removal (row 0) and an addition."""
    from rag_clean.storage.embeddings import read_embeddings as read, write_embeddings as write

    chunks, dense, fused, sparse = stored
    rows = chunks.to_pylist()
    rows[2] = dict(rows[2], text=rows[2]["text"] + " edited", content_hash="edited-hash")
    rows = rows[1:] + [dict(rows[3], chunk_id="docs-new", chunk_index=9, content_hash="new-hash", text="a new chunk")]
    new_chunks = pa.Table.from_pylist(rows, schema=chunks.schema)
    ids, hashes = [r["chunk_id"] for r in rows], [r["content_hash"] for r in rows]
    rng = np.random.default_rng(1)

    def moved(name, emb):
        vecs = np.concatenate([emb.vectors[1:], rng.normal(size=(1, emb.dim))]).astype(np.float32)
        vecs[1] = rng.normal(size=emb.dim)  # the edited chunk (old row 2)
        return read(write(tmp_path / "store2" / f"{model_file_part(name)}.arrow", ids, hashes, vecs, emb.metadata))

    new_dense = {name: moved(name, emb) for name, emb in dense.items()}
    new_fused = moved("fused", fused)
    srows = sparse.to_pylist()
    by_id = {r["chunk_id"]: r for r in srows}
    new_sparse = pa.Table.from_pylist(
        [dict(by_id.get(c, by_id["docs-1"]), chunk_id=c, weights=[2.0, 0.5] if c in ("docs-2", "docs-new") else
              by_id[c]["weights"]) for c in ids], schema=sparse.schema)
    return new_chunks, new_dense, new_fused, new_sparse


def test_unchanged_lines_are_copied_and_the_export_equals_a_full_one(tmp_path, stored):
    from rag_clean.storage.layout import StorageLayout

    layout = StorageLayout(tmp_path / "storage")
    index = lambda kind: layout.export_line_index("docs", kind)  # noqa: E731
    chunks, dense, fused, sparse = stored
    _, first = write_exports(tmp_path / "inc", "docs", chunks, dense, fused, sparse=sparse, sparse_models=["splade"],
                             block_rows=2, line_index=index)
    assert first.reuse_counts["qdrant_lines"].to_dict() == {"unit": "lines", "reused": 0, "computed": 5}

    new = _changed(tmp_path, stored)
    inc, record = write_exports(tmp_path / "inc", "docs", *new[:3], sparse=new[3], sparse_models=["splade"],
                                block_rows=2, line_index=index)
    full, _ = write_exports(tmp_path / "full", "docs", *new[:3], sparse=new[3], sparse_models=["splade"], block_rows=3)
    assert inc.to_pylist() == full.to_pylist()  # every file: same name, size and sha256
    # 5 rows: docs-1, 3, 4 unchanged; docs-2 edited, docs-new added (docs-0 removed).
    assert record.reuse_counts["qdrant_lines"].to_dict() == {"unit": "lines", "reused": 3, "computed": 2}
    assert record.reuse_counts["sparse_lines"].to_dict() == {"unit": "lines", "reused": 3, "computed": 2}
    assert record.to_summary()["reuse_counts"]["qdrant_lines"]["reused"] == 3

    # Unchanged again: everything copied.
    _, again = write_exports(tmp_path / "inc", "docs", *new[:3], sparse=new[3], sparse_models=["splade"],
                             line_index=index)
    assert again.reuse_counts["qdrant_lines"].computed == 0

    # A file changed behind the index's back: the index is not trusted, the lines are formatted again.
    qdrant = export_files(tmp_path / "inc", "docs").qdrant
    qdrant.write_bytes(qdrant.read_bytes().replace(b'"fused"', b'"fused-by-hand"'))
    table, after_edit = write_exports(tmp_path / "inc", "docs", *new[:3], sparse=new[3], sparse_models=["splade"],
                                      line_index=index)
    assert after_edit.reuse_counts["qdrant_lines"].reused == 0
    assert table.to_pylist() == full.to_pylist()


def test_sparse_from_the_parquet_file_streams_and_equals_the_table(tmp_path, stored):
    import pyarrow.parquet as pq

    from rag_clean.exports.inputs import sparse_by_model

    chunks, dense, fused, sparse = stored
    want, _ = write_exports(tmp_path / "table", "docs", chunks, dense, fused, sparse=sparse, sparse_models=["splade"])
    in_order = sparse.take(pa.array(list(range(sparse.num_rows))[::-1]))  # the fixture stores them reversed
    other = in_order.set_column(in_order.schema.get_field_index("model"), "model", pa.array(["other"] * 5))
    for name, table in (("ordered", pa.concat_tables([other, in_order])), ("reversed", sparse)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=2)
        file = pq.ParquetFile(path)
        rows = sparse_by_model(file, ["splade"], chunks, block_rows=2)[0]
        assert (rows.file is not None) == (name == "ordered")  # streamed only when stored in chunk order
        got, _ = write_exports(tmp_path / name, "docs", chunks, dense, fused, sparse=file, sparse_models=["splade"],
                               block_rows=2)
        assert got.to_pylist() == want.to_pylist(), name


def test_duplicate_chunk_ids_are_refused(tmp_path, stored):
    chunks, dense, fused, _ = stored
    ids = chunks.column("chunk_id").to_pylist()
    dup = chunks.set_column(0, "chunk_id", pa.array([ids[0]] + ids[:-1]))
    with pytest.raises(ExportError, match="chunk ids are not unique"):
        write_exports(tmp_path, "docs", dup, dense, fused)
