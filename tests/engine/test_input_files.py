"""What a collection folder may hold, and how bad input is reported (hardening issue, items 2, 3, 6).

Symlinks out of the data root, hidden entries and front-matter-only documents are skipped and
counted; lone surrogates, non-UTF-8 query files and truncated stored files fail with one line that
names the file and the record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.chunking import ChunkingError, read_collection
from rag_clean.retrieval.flat import QueryFileError, load_queries
from rag_clean.storage.embeddings import read_embeddings, write_embeddings
from rag_clean.storage.errors import StorageError
from rag_clean.storage.parquet import read_table, write_table
from file_helpers import write

GOOD_MD = "# Guide\n\nGuide text that is embedded.\n"


@pytest.fixture
def roots(tmp_path):
    """<tmp>/data/coll (the collection, under the data root) and <tmp>/outside (not under it)."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    write(data / "coll", "guide.md", GOOD_MD)
    write(outside, "secret.md", "# Secret\n\nOUTSIDE-SECRET must never become a chunk.\n")
    write(outside, "docs/a.md", "# A\n\nOUTSIDE-FOLDER text.\n")
    return data, data / "coll", outside


def skips_of(result, file: str) -> list[str]:
    return [s.reason for s in result.skipped if s.file == file]


def all_text(result) -> str:
    return "\n".join(result.table.column("text").to_pylist())


# --------------------------------------------------------------------------- symlinks (item 2)


def test_symlinked_file_outside_data_root_is_skipped_and_counted(roots):
    _, coll, outside = roots
    (coll / "hostname.md").symlink_to(outside / "secret.md")
    result = read_collection(coll)
    assert "OUTSIDE-SECRET" not in all_text(result)
    assert "hostname.md" not in result.files_read
    [reason] = skips_of(result, "hostname.md")
    assert reason == (f"symlink hostname.md -> {(outside / 'secret.md').resolve()} resolves outside the data root "
                      f"{coll.parent.resolve()}: not read")


@pytest.mark.skipif(not Path("/etc/hostname").is_file(), reason="needs /etc/hostname")
def test_symlink_to_etc_hostname_is_not_ingested(roots):
    _, coll, _ = roots
    (coll / "host.txt").symlink_to("/etc/hostname")
    result = read_collection(coll)
    assert "host.txt" not in result.table.column("source_file").to_pylist()
    [reason] = skips_of(result, "host.txt")
    assert "/etc/hostname" in reason and "outside the data root" in reason


def test_symlinked_folder_outside_data_root_is_skipped_and_counted(roots):
    _, coll, outside = roots
    (coll / "external").symlink_to(outside / "docs", target_is_directory=True)
    result = read_collection(coll)
    assert "OUTSIDE-FOLDER" not in all_text(result)
    [reason] = skips_of(result, "external")
    assert f"external -> {(outside / 'docs').resolve()} resolves outside the data root" in reason


def test_symlinks_that_stay_inside_the_data_root_are_followed(roots):
    data, coll, _ = roots
    write(data / "other", "shared.md", "# Shared\n\nShared text from another collection.\n")
    write(data / "other", "sub/deep.md", "# Deep\n\nDeep text.\n")
    (coll / "shared.md").symlink_to(data / "other" / "shared.md")
    (coll / "linked").symlink_to(data / "other" / "sub", target_is_directory=True)
    result = read_collection(coll)
    assert result.files_read == ["guide.md", "linked/deep.md", "shared.md"]
    assert "Shared text from another collection." in all_text(result)
    assert "Deep text." in all_text(result)
    assert result.skipped == []
    # A narrower root (the collection itself) refuses the same links.
    narrow = read_collection(coll, root=coll)
    assert narrow.files_read == ["guide.md"]
    assert {s.file for s in narrow.skipped} == {"linked", "shared.md"}


def test_symlink_loop_is_read_once_and_counted(roots):
    _, coll, _ = roots
    write(coll, "sub/page.md", "# Page\n\nPage text.\n")
    (coll / "sub" / "loop").symlink_to(coll, target_is_directory=True)
    result = read_collection(coll)
    assert result.files_read == ["guide.md", "sub/page.md"]
    [reason] = skips_of(result, "sub/loop")
    assert reason == f"folder sub/loop -> {coll.resolve()} is already read as .: not read twice"


# --------------------------------------------------------------------------- nothing dropped uncounted (item 3)


def test_hidden_files_and_folders_are_skipped_and_counted(roots):
    _, coll, _ = roots
    write(coll, "...spread-syntax.md", "# Spread\n\nA crawled page whose name starts with dots.\n")
    write(coll, "._guide.md", b"\x00\x05\x16\x07\xff AppleDouble")  # would fail UTF-8 decoding if read
    write(coll, ".git/config.txt", "not a document\n")
    write(coll, "sub/.DS_Store", b"\x00\x00\x00\x01Bud1")
    result = read_collection(coll)
    assert result.files_read == ["guide.md"]
    assert sorted((s.file, s.index, s.reason) for s in result.skipped) == [
        ("...spread-syntax.md", None, "hidden file (name starts with '.'): not read"),
        ("._guide.md", None, "hidden file (name starts with '.'): not read"),
        (".git", None, "hidden folder (name starts with '.'): not read"),
        ("sub/.DS_Store", None, "hidden file (name starts with '.'): not read"),
    ]


@pytest.mark.parametrize("content", ["---\ntitle: Only metadata\ntags: [a]\n---\n", "---\ntitle: x\n---\n\n  \n\n"])
def test_markdown_with_only_front_matter_is_skipped_and_counted(roots, content):
    _, coll, _ = roots
    write(coll, "meta-only.md", content)
    result = read_collection(coll)
    assert "meta-only.md" not in result.table.column("source_file").to_pylist()
    assert skips_of(result, "meta-only.md") == ["front matter only, no text to embed"]


def test_file_that_gives_no_chunks_and_no_skip_is_counted(roots):
    _, coll, _ = roots
    write(coll, "blank-lines.jsonl", "\n   \n\n")
    result = read_collection(coll)
    assert skips_of(result, "blank-lines.jsonl") == ["no text to embed"]


# --------------------------------------------------------------------------- errors name the file and record (item 6)


@pytest.mark.parametrize(("rel", "content", "message"), [
    ("notes.jsonl", '{"id": "n1", "text": "fine"}\n{"id": "n2", "text": "bad \\ud800 here"}\n',
     "notes.jsonl line 2: field 'text' holds a lone surrogate \\ud800 at character 4"),
    ("notes.jsonl", '{"id": "n1", "text": "fine", "tags": {"k": ["ok", "\\udfff"]}}\n',
     "notes.jsonl line 1: field 'tags.k[1]' holds a lone surrogate \\udfff"),
    ("old_chunks.json", '[{"text": "ok", "metadata": {"chunk_id": "a"}},'
                        ' {"text": "x\\uD800", "metadata": {"chunk_id": "b"}}]',
     "old_chunks.json record index 1: field 'text' holds a lone surrogate \\ud800 at character 1"),
    ("old_chunks.json", '[{"text": "ok", "metadata": {"chunk_id": "a\\udc00"}}]',
     "old_chunks.json record index 0: field 'metadata.chunk_id' holds a lone surrogate \\udc00"),
])
def test_lone_surrogate_names_file_record_and_field(roots, rel, content, message):
    _, coll, _ = roots
    write(coll, rel, content)
    with pytest.raises(ChunkingError) as info:
        read_collection(coll)
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text
    assert info.value.__cause__ is None  # no chained UnicodeEncodeError traceback


def _chunks_table() -> pa.Table:
    return pa.table({"chunk_id": ["c1", "c2"]})


def test_query_file_with_non_utf8_byte_names_file_and_line(tmp_path):
    write(tmp_path, "queries.jsonl", b'{"text": "fine", "gold_chunk_ids": ["c1"]}\n{"text": "caf\xe9"}\n')
    with pytest.raises(QueryFileError) as info:
        load_queries(tmp_path, _chunks_table())
    text = str(info.value)
    assert text.startswith("queries.jsonl line 2: not valid UTF-8 (byte 0xe9 at byte 14 of the line")
    assert "\n" not in text and info.value.__cause__ is None


def test_query_file_with_lone_surrogate_names_file_and_line(tmp_path):
    write(tmp_path, "queries.jsonl", '{"text": "fine"}\n\n{"text": "bad \\ud800"}\n')
    with pytest.raises(QueryFileError, match=r"^queries\.jsonl line 3: 'text' holds a lone surrogate"):
        load_queries(tmp_path, _chunks_table())


def _truncate(path: Path, keep: int) -> None:
    """Keep the first `keep` bytes (negative: drop that many from the end), as a killed copy would."""
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("keep", [0, 6, 200, -3])
def test_truncated_parquet_raises_storage_error_naming_file_and_fix(tmp_path, keep):
    path = tmp_path / "chunks" / "demo.parquet"
    write_table(pa.table({"chunk_id": [f"c{i}" for i in range(500)]}), path)
    _truncate(path, keep)
    with pytest.raises(StorageError) as info:
        read_table(path)
    text = str(info.value)
    assert text.startswith(f"{path} is not a valid Parquet file (truncated or corrupt: ")
    assert "rematerialize the asset that writes it" in text and "\n" not in text


@pytest.mark.parametrize("keep", [0, 8, 100, -4])
def test_truncated_embeddings_raise_storage_error_naming_file_and_fix(tmp_path, keep):
    path = tmp_path / "fused_embeddings" / "demo.arrow"
    write_embeddings(path, ["a", "b", "c"], ["h"] * 3, np.ones((3, 16), np.float32))
    _truncate(path, keep)
    with pytest.raises(StorageError) as info:
        read_embeddings(path)
    text = str(info.value)
    assert text.startswith(f"{path} is not a valid Arrow IPC embeddings file (truncated or corrupt: ")
    assert "rematerialize the asset that writes it" in text and "\n" not in text

