"""The chunks stage re-parses only changed files, and its output equals a full re-parse byte for byte."""

from __future__ import annotations

import json
import os

import pytest

from rag_clean.chunking import ChunkingConfig, ChunkingError
from types import SimpleNamespace

from rag_clean.stages.chunks import chunks_stage
from rag_clean.stages.context import StageIO
from stage_helpers import stage_ctx
from rag_clean.storage.arrow_io import read_arrow_table

DOC = "# Guide\n\nInstall the driver first. Then restart the server and check the logs.\n\n## Notes\n\n{}\n"


def _collection(root):
    coll = root / "data" / "demo"
    (coll / "sub").mkdir(parents=True)
    for i in range(4):
        (coll / f"doc{i}.md").write_text(DOC.format(f"Document {i} says something about topic {i}. " * 30))
    (coll / "sub" / "notes.jsonl").write_text(
        "\n".join(json.dumps({"id": f"n{i}", "text": f"note {i}" if i != 2 else " "}) for i in range(5)) + "\n")
    (coll / "old_chunks.json").write_text(json.dumps(
        [{"text": f"old chunk {i}", "metadata": {"chunk_id": f"old-{i}"}} for i in range(3)]))
    (coll / "image.png").write_bytes(b"\x89PNG")
    return coll


def _run(coll, out, reuse=True, config=ChunkingConfig(max_tokens=64, overlap_tokens=8), version=None):
    ctx = stage_ctx(out, reuse_unchanged=reuse, collection="demo")
    ctx.collection_dir = lambda: coll
    target = ctx.layout.staged_asset_file(["chunks"], "demo")
    spool, record = chunks_stage(ctx, StageIO(target, target if target.exists() else None), config, version)
    spool.publish()
    counts = record.reuse_counts["files"]
    result = SimpleNamespace(files_reused=counts.reused, files_parsed=counts.computed,
                             skipped=[SimpleNamespace(**s) for s in record.skips])
    return result, record


def test_incremental_run_parses_only_changed_files_and_equals_a_full_run(tmp_path):
    coll, inc, full = _collection(tmp_path), tmp_path / "inc", tmp_path / "full"
    first, record = _run(coll, inc)
    assert record.reuse_counts["files"].to_dict() == {"unit": "files", "reused": 0, "computed": 6}
    assert (first.files_reused, first.files_parsed) == (0, 6)

    (coll / "doc1.md").write_text(DOC.format("An edited paragraph. " * 40))  # changed
    (coll / "doc9.md").write_text(DOC.format("A new document. " * 10))       # added
    (coll / "doc2.md").unlink()                                              # removed
    second, record = _run(coll, inc)
    assert record.reuse_counts["files"].to_dict() == {"unit": "files", "reused": 4, "computed": 2}
    _run(coll, full, reuse=False)
    chunks = inc / "chunks" / "demo.arrow"
    assert chunks.read_bytes() == (full / "chunks" / "demo.arrow").read_bytes()
    table = read_arrow_table(chunks)
    assert "doc2.md" not in set(table.column("source_file").to_pylist())
    assert record.rows == table.num_rows
    # Skips of a reused file are replayed, so the record equals the full run's.
    assert [s.file for s in second.skipped] == ["image.png", "sub/notes.jsonl"]
    assert second.skipped[1].index == 3 and "empty text" in second.skipped[1].reason

    third, record = _run(coll, inc)
    assert (third.files_reused, third.files_parsed) == (6, 0)
    assert chunks.read_bytes() == (full / "chunks" / "demo.arrow").read_bytes()


def test_changed_config_or_a_foreign_chunks_file_parses_everything(tmp_path):
    coll, out = _collection(tmp_path), tmp_path / "out"
    _run(coll, out)
    result, _ = _run(coll, out, config=ChunkingConfig(max_tokens=48, overlap_tokens=8))
    assert (result.files_reused, result.files_parsed) == (0, 6)
    chunks = out / "chunks" / "demo.arrow"
    os.utime(chunks, ns=(1, 1))  # the manifest no longer describes this file
    result, _ = _run(coll, out, config=ChunkingConfig(max_tokens=48, overlap_tokens=8))
    assert (result.files_reused, result.files_parsed) == (0, 6)


def test_duplicate_id_across_a_reused_and_a_parsed_file_is_named(tmp_path):
    coll, out = _collection(tmp_path), tmp_path / "out"
    _run(coll, out)
    before = (out / "chunks" / "demo.arrow").read_bytes()
    (coll / "sub" / "more.jsonl").write_text(json.dumps({"id": "old-1", "text": "again"}) + "\n")
    with pytest.raises(ChunkingError, match=r"duplicate chunk_id 'old-1': in old_chunks\.json record index 1 and in sub/more\.jsonl line 1"):
        _run(coll, out)
    assert (out / "chunks" / "demo.arrow").read_bytes() == before
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["_files", "demo.arrow"]
