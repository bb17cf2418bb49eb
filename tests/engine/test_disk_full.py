"""Disk full (issue 22 item 4), on a real 1 MiB tmpfs: every writer's abort removes all it staged even when
closing its buffered files fails with ENOSPC again, the previous file stays, the error names the file, the
storage root and the full filesystem, and one long process reclaims its own leftovers."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.storage.arrow_io import ColumnSpool, read_arrow_table, write_arrow_table
from rag_clean.storage.atomic import reclaim_stale_temps, temp_path_for, write_json
from rag_clean.storage.embeddings import EmbeddingWriter, read_embeddings, write_embeddings
from rag_clean.storage.errors import DiskFullError
from rag_clean.storage.parquet import TableWriter


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: the storage root of these tests."""
    root = tmp_path / "root"
    root.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): needs root")
    try:
        yield root
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], check=True)  # never leave a mount behind
            pytest.fail("the tmpfs was still busy: a writer kept a file open or mapped after it failed")


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob(".*"))


def _text_table(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)  # incompressible text: the spool writes every byte
    return pa.table({"chunk_id": [f"c{seed}-{i}" for i in range(rows)],
                     "text": [rng.bytes(200).hex() for _ in range(rows)]})


def _names_file_and_root(exc: DiskFullError, path, root) -> None:
    text = str(exc)
    assert f"no space left on device while writing {path}" in text
    assert f"filesystem at {root}" in text  # the tmpfs mount point: what is full
    assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC


def test_spool_abort_removes_everything_although_closing_its_files_fails_again(full_disk):
    previous = write_arrow_table(_text_table(20), full_disk / "chunks.arrow")
    before = (full_disk / "chunks.arrow").read_bytes()
    spool = ColumnSpool(full_disk / "chunks.arrow", _text_table(1).schema, root=full_disk)
    with pytest.raises(DiskFullError) as info:
        for block in range(100):
            spool.append(_text_table(200, seed=block))
    _names_file_and_root(info.value, full_disk / "chunks.arrow", full_disk)
    assert f"storage root {full_disk}" in str(info.value)
    # Its buffered scratch files still hold bytes the full disk refused: closing them raises ENOSPC again.
    assert any(not fh.closed for fh in spool.scratch.handles)
    spool.abort()
    assert _leftovers(full_disk) == []
    assert (full_disk / "chunks.arrow").read_bytes() == before and previous == len(before)


def test_embedding_writer_on_a_full_disk_fails_up_front_and_leaves_nothing(full_disk):
    write_embeddings(full_disk / "e.arrow", ["a"], ["h"], np.ones((1, 4), np.float32))
    before = (full_disk / "e.arrow").read_bytes()
    # The scratch matrix (2 MiB) is reserved when the writer opens: ENOSPC there, not a SIGBUS mid-write.
    with pytest.raises(DiskFullError) as info:
        EmbeddingWriter(full_disk / "e.arrow", [f"c{i}" for i in range(2048)], ["h"] * 2048, 256)
    _names_file_and_root(info.value, full_disk / "e.arrow", full_disk)
    assert _leftovers(full_disk) == []
    assert (full_disk / "e.arrow").read_bytes() == before


def test_embedding_writer_whose_staged_file_does_not_fit_removes_its_scratch(full_disk):
    n, dim = 1024, 160  # 640 KiB scratch fits; the staged file of the same size next to it does not
    writer = EmbeddingWriter(full_disk / "e.arrow", [f"c{i}" for i in range(n)], ["h"] * n, dim)
    writer.write(np.arange(n), np.ones((n, dim), np.float32))
    with pytest.raises(DiskFullError):
        writer.publish()  # publish aborts on failure
    assert _leftovers(full_disk) == [] and not (full_disk / "e.arrow").exists()


def test_parquet_writer_and_its_attached_side_file_are_removed_together(full_disk):
    schema = _text_table(1).schema
    main = ColumnSpool(full_disk / "chunks.arrow", schema)
    side = TableWriter(full_disk / "_files" / "manifest.parquet", schema, root=full_disk)
    main.attach(side)
    with pytest.raises(DiskFullError) as info:
        for block in range(100):
            side.write(_text_table(200, seed=block))
    assert f"while writing {full_disk / '_files' / 'manifest.parquet'} (storage root {full_disk}" in str(info.value)
    main.abort()  # aborts what is attached too
    assert _leftovers(full_disk) == [] and not (full_disk / "_files" / "manifest.parquet").exists()


def test_sparse_scratch_close_cleans_up_on_a_full_disk(full_disk):
    from rag_clean.stages.sparse_rows import SparseScratch

    scratch = SparseScratch(full_disk / "sparse_vectors" / "c.parquet", 4096, 256, "m")
    with pytest.raises(DiskFullError) as info:
        for start in range(0, 4096, 64):
            rows = np.arange(start, start + 64)
            scratch.write(rows, [np.arange(256)] * 64, [np.ones(256, np.float32)] * 64)
    assert str(full_disk / "sparse_vectors" / "c.parquet") in str(info.value)
    scratch.close()
    assert _leftovers(full_disk) == []


def test_atomic_json_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(full_disk):
    target = full_disk / "state" / "summary.json"
    write_json(target, {"v": 1})
    filler = full_disk / "filler"
    with pytest.raises(OSError):
        with open(filler, "wb") as fh:
            fh.write(b"x" * (2 << 20))
    with pytest.raises(DiskFullError) as info:
        write_json(target, {"v": "y" * 100_000})
    assert str(target) in str(info.value)
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert _leftovers(full_disk) == []
    filler.unlink()


def test_one_process_reclaims_its_own_leftovers_but_not_a_file_it_still_writes(tmp_path):
    """rag-clean runs many collections in one process: a temp file of this pid that no writer of this process
    holds (its clean-up failed) is removed by the next writer in the folder; one a writer holds is kept."""
    held = temp_path_for(tmp_path / "a.arrow")
    held.write_bytes(b"being written")
    orphan = tmp_path / f".b.arrow.{os.getpid()}@{held.name.split('@')[1].split('.')[0]}.{uuid.uuid4().hex[:8]}.tmp"
    orphan.write_bytes(b"left by a failed abort of an earlier collection")
    removed = reclaim_stale_temps(tmp_path)
    assert removed == [orphan] and held.exists()
    writer = EmbeddingWriter(tmp_path / "c.arrow", ["x"], ["h"], 2)
    writer.write(np.array([0]), np.ones((1, 2), np.float32))
    assert read_embeddings(writer.publish()).chunk_ids == ["x"]
    assert held.exists()


def test_a_writer_dropped_without_publish_or_abort_removes_its_files(tmp_path):
    spool = ColumnSpool(tmp_path / "c.arrow", _text_table(1).schema)
    spool.append(_text_table(10))
    spool.finish()
    assert _leftovers(tmp_path)
    del spool  # an exception before the caller's try: no abort was called
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "c.arrow").exists()
    assert read_arrow_table  # (imported for the spool tests above)
