"""Storage: atomic writes, streaming embedding writer, zero-copy reads, path safety."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.storage import (
    EmbeddingWriter,
    StorageError,
    atomic_path,
    check_name,
    path_under,
    read_embeddings,
    read_table,
    write_embeddings,
    write_json,
    write_table,
)


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
