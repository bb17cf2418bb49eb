"""Storage: atomic writes, streaming embedding writer, zero-copy reads, path safety."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.storage.arrow_io import write_arrow_table
from rag_clean.storage.atomic import atomic_path, write_json
from rag_clean.storage.embeddings import EmbeddingWriter, read_embeddings, write_embeddings
from rag_clean.storage.errors import StorageError
from rag_clean.storage.names import check_name, path_under
from rag_clean.storage.parquet import read_table, write_table


def _leftovers(folder):
    """Temp / scratch files a writer may leave behind: all start with '.'."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_path_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "data.json"
    write_json(target, {"version": 1})
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half a file")
            raise RuntimeError("boom")
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_write_table_replaces_atomically_and_cleans_temp(tmp_path):
    target = tmp_path / "t.parquet"
    write_table(pa.table({"x": [1, 2]}), target)
    write_table(pa.table({"x": [3, 4, 5]}), target)
    assert read_table(target).column("x").to_pylist() == [3, 4, 5]
    assert _leftovers(tmp_path) == []


def test_failed_embedding_write_keeps_previous_file(tmp_path):
    target = tmp_path / "e.arrow"
    write_embeddings(target, ["a", "b"], ["ha", "hb"], np.eye(2, dtype=np.float32))
    before = target.read_bytes()
    with pytest.raises(ValueError, match="batch shape"):
        write_embeddings(target, ["a", "b"], ["ha", "hb"], np.ones((3, 2), dtype=np.float32))
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_embedding_writer_accepts_rows_in_any_order(tmp_path):
    ids = [f"c{i}" for i in range(5)]
    vectors = np.arange(15, dtype=np.float32).reshape(5, 3)
    writer = EmbeddingWriter(tmp_path / "e.arrow", ids, [f"h{i}" for i in range(5)], 3, {"model": "m"})
    writer.write(np.array([4, 1]), vectors[[4, 1]])
    writer.write(np.array([0, 3, 2]), vectors[[0, 3, 2]])
    assert writer.rows_written == 5
    path = writer.publish()
    got = read_embeddings(path)
    assert got.chunk_ids == ids
    assert got.content_hashes == [f"h{i}" for i in range(5)]
    np.testing.assert_array_equal(got.vectors, vectors)
    assert got.metadata["model"] == "m"
    assert _leftovers(tmp_path) == []


def test_embedding_writer_refuses_missing_rows(tmp_path):
    writer = EmbeddingWriter(tmp_path / "e.arrow", ["a", "b", "c"], ["1", "2", "3"], 2)
    writer.write(np.array([0, 2]), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"1 rows never written into e.arrow \(first: b\)"):
        writer.finish()
    writer.abort()
    assert not (tmp_path / "e.arrow").exists()
    assert _leftovers(tmp_path) == []


def test_embedding_writer_refuses_duplicate_rows(tmp_path):
    writer = EmbeddingWriter(tmp_path / "e.arrow", ["a", "b"], ["1", "2"], 2)
    writer.write(np.array([1]), np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="rows written twice into e.arrow"):
        writer.write(np.array([0, 1]), np.ones((2, 2), np.float32))
    writer.abort()
    assert _leftovers(tmp_path) == []


def test_abort_after_finish_removes_staged_file_and_keeps_old(tmp_path):
    target = tmp_path / "e.arrow"
    write_embeddings(target, ["a"], ["h"], np.ones((1, 4), np.float32))
    before = target.read_bytes()
    writer = EmbeddingWriter(target, ["a"], ["h"], 4)
    writer.write(np.array([0]), np.zeros((1, 4), np.float32))
    writer.finish()
    writer.abort()
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_read_embeddings_is_zero_copy_memmap(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    path = write_embeddings(tmp_path / "e.arrow", [str(i) for i in range(50)], ["h"] * 50, vectors)
    got = read_embeddings(path)
    assert not got.vectors.flags.owndata
    assert not got.vectors.flags.writeable
    assert got.vectors.shape == (50, 8) and got.dim == 8 and len(got) == 50
    np.testing.assert_array_equal(got.vectors, vectors)


def test_read_embeddings_errors_name_the_file(tmp_path):
    with pytest.raises(StorageError, match="missing.arrow does not exist"):
        read_embeddings(tmp_path / "missing.arrow")
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(StorageError, match="bad.arrow is not a valid Arrow IPC"):
        read_embeddings(bad)


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", ".hidden", "", "a\\b", "x" * 200])
def test_check_name_refuses_unsafe_names(name):
    with pytest.raises(StorageError, match="not allowed"):
        check_name(name)


def test_check_name_accepts_plain_names():
    assert check_name("sample_v2.1-x") == "sample_v2.1-x"


def test_path_under_refuses_traversal(tmp_path):
    assert path_under(tmp_path, "a", "b.arrow") == (tmp_path / "a" / "b.arrow").resolve()
    with pytest.raises(StorageError, match="escapes its root"):
        path_under(tmp_path, "..", "outside")
    with pytest.raises(StorageError, match="escapes its root"):
        path_under(tmp_path, "/etc/passwd")


# ---------------------------------------------------------------- memory-mapped tables (ColumnSpool)


def _chunk_like(n: int, start: int = 0) -> pa.Table:
    from rag_clean.chunking import CHUNK_SCHEMA

    rows = [{"chunk_id": f"c{i}", "text": "é" * (i % 7), "content_hash": f"h{i}", "source_file": f"f{i // 5}",
             "chunk_index": i, "heading": None if i % 3 else f"H{i}", "section_path": ["a", "b"][: i % 3],
             "token_count": i * 2, "metadata_json": "{}"} for i in range(start, start + n)]
    return pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)


def test_column_spool_writes_one_memory_mapped_batch_equal_to_its_input(tmp_path):
    from rag_clean.storage.arrow_io import ColumnSpool, read_arrow_table

    table = _chunk_like(40)
    spool = ColumnSpool(tmp_path / "c.arrow", table.schema)
    # Slices with offsets, an empty batch, a record batch: the file holds the rows in append order.
    spool.append(table.slice(0, 13))
    spool.append(table.slice(13, 0))
    spool.append(table.slice(13, 27).to_batches()[0])
    assert spool.publish() == tmp_path / "c.arrow"
    loaded = read_arrow_table(tmp_path / "c.arrow")
    assert loaded.equals(table)
    assert all(loaded.column(name).num_chunks == 1 for name in loaded.schema.names)
    assert _leftovers(tmp_path) == []
    # The same rows appended in one piece give the same bytes (what incremental runs rely on).
    write_arrow_table(_chunk_like(40), tmp_path / "d.arrow")
    assert (tmp_path / "c.arrow").read_bytes() == (tmp_path / "d.arrow").read_bytes()


def test_column_spool_abort_leaves_nothing_and_old_file_intact(tmp_path):
    from rag_clean.storage.arrow_io import ColumnSpool, read_arrow_table

    write_arrow_table(_chunk_like(3), tmp_path / "c.arrow")
    spool = ColumnSpool(tmp_path / "c.arrow", _chunk_like(1).schema)
    spool.append(_chunk_like(5))
    spool.finish()
    spool.abort()
    assert read_arrow_table(tmp_path / "c.arrow").num_rows == 3
    assert _leftovers(tmp_path) == []


def test_read_arrow_table_names_truncated_file(tmp_path):
    from rag_clean.storage.arrow_io import read_arrow_table

    path = tmp_path / "c.arrow"
    write_arrow_table(_chunk_like(10), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StorageError, match=r"c\.arrow is not a valid Arrow IPC file \(truncated or corrupt: "):
        read_arrow_table(path)


def test_embedding_writer_takes_arrow_columns_and_set_exposes_zero_copy_ids(tmp_path):
    from rag_clean.storage.arrow_io import read_arrow_table

    write_arrow_table(_chunk_like(30), tmp_path / "c.arrow")
    chunks = read_arrow_table(tmp_path / "c.arrow")
    vectors = np.eye(30, 4, dtype=np.float32)
    vectors[4:] = 0.5
    write_embeddings(tmp_path / "e.arrow", chunks.column("chunk_id"), chunks.column("content_hash"), vectors)
    emb = read_embeddings(tmp_path / "e.arrow")
    assert isinstance(emb.ids, pa.Array) and emb.ids.equals(chunks.column("chunk_id").chunk(0))
    assert emb.hashes.equals(chunks.column("content_hash").chunk(0))
    assert emb.chunk_ids == [f"c{i}" for i in range(30)] and emb.content_hashes[2] == "h2"
    np.testing.assert_array_equal(emb.vectors, vectors)
    # A list input writes the same file as the Arrow column.
    write_embeddings(tmp_path / "f.arrow", [f"c{i}" for i in range(30)], [f"h{i}" for i in range(30)], vectors)
    assert (tmp_path / "e.arrow").read_bytes() == (tmp_path / "f.arrow").read_bytes()


def test_duplicate_id_rows_finds_every_repeat_across_blocks(tmp_path):
    from rag_clean.chunking.duplicates import duplicate_id_rows

    ids = [f"id{i}" for i in range(1000)] + ["id7", "id999", "id7"]
    groups = duplicate_id_rows(pa.array(ids), block=64)
    assert [g.tolist() for g in groups] == [[7, 1000, 1002], [999, 1001]]
    assert duplicate_id_rows(pa.chunked_array([pa.array(ids[:1000])]), block=64) == []


def test_ids_absent_names_only_the_missing_wanted_ids():
    from rag_clean.storage.arrow_io import ids_absent

    column = pa.chunked_array([pa.array([f"c{i}" for i in range(5000)])])
    assert ids_absent({"c3", "c4999", "gone", "x"}, column) == {"gone", "x"}
    assert ids_absent(set(), column) == set()
