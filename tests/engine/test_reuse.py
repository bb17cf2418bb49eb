"""rag_clean.storage.reuse: matching rows by content hash without a dict of every row."""

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from rag_clean.storage import reuse
from rag_clean.storage.reuse import ArrowTexts, complement, hash_keys, match_rows


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_match_rows_finds_unchanged_rows_in_any_order():
    previous = [sha(f"t{i}") for i in range(10)]
    current = [sha("new"), previous[7], previous[0], sha("other"), previous[3]]
    cur, prev = match_rows(pa.array(current), pa.chunked_array([pa.array(previous[:4]), pa.array(previous[4:])]))
    assert cur.tolist() == [1, 2, 4] and prev.tolist() == [7, 0, 3]
    assert cur.dtype == np.int64 and prev.dtype == np.int64
    assert complement(cur, len(current)).tolist() == [0, 3]


def test_duplicated_content_matches_a_row_with_that_content():
    previous = [sha("a"), sha("b"), sha("a")]
    cur, prev = match_rows(pa.array([sha("a"), sha("a"), sha("c")]), pa.array(previous))
    assert cur.tolist() == [0, 1]
    assert all(previous[p] == sha("a") for p in prev)


def test_a_key_collision_never_reuses_a_different_hash():
    # Same first 16 hex digits (the key), different full strings: the exact compare rejects it.
    a = "0123456789abcdef" + "0" * 48
    b = "0123456789abcdef" + "1" * 48
    cur, prev = match_rows(pa.array([b, a]), pa.array([a]))
    assert cur.tolist() == [1] and prev.tolist() == [0]


def test_non_hex_hashes_and_lists_work():
    cur, prev = match_rows(["x", "yy", "z"], ["z", "x"])
    assert cur.tolist() == [0, 2] and prev.tolist() == [1, 0]
    assert match_rows([], ["a"])[0].size == 0 and match_rows(["a"], [])[1].size == 0


def test_keys_of_hex_digests_are_their_first_16_digits_blockwise(monkeypatch):
    monkeypatch.setattr(reuse, "BLOCK", 3)
    hashes = [sha(str(i)) for i in range(8)]
    keys = hash_keys(pa.array(hashes).slice(1))  # a sliced array (non-zero offset) too
    assert keys.tolist() == [int(h[:16], 16) for h in hashes[1:]]
    cur, prev = match_rows(pa.array(hashes[::-1]), pa.array(hashes))
    assert cur.tolist() == list(range(8)) and prev.tolist() == list(range(7, -1, -1))


def test_arrow_texts_is_a_lazy_sequence_of_selected_rows(monkeypatch):
    monkeypatch.setattr(reuse, "BLOCK", 2)
    column = pa.chunked_array([pa.array(["a", "b"]), pa.array(["c", "d", "e"])])
    texts = ArrowTexts(column, np.array([4, 0, 2]))
    assert len(texts) == 3 and texts[0] == "e" and texts[-1] == "c"
    assert texts[1:3] == ["a", "c"] and list(texts) == ["e", "a", "c"]
    assert list(ArrowTexts(column)) == ["a", "b", "c", "d", "e"]
    with pytest.raises(IndexError):
        texts[3]


def test_a_block_with_odd_strings_keeps_the_keys_of_its_hex_rows(monkeypatch):
    monkeypatch.setattr(reuse, "BLOCK", 4)
    hashes = [sha(str(i)) for i in range(6)]
    cur, prev = match_rows(pa.array(hashes), pa.array(hashes[2:] + ["x" * 64, "ü" * 64]))
    assert cur.tolist() == [2, 3, 4, 5] and prev.tolist() == [0, 1, 2, 3]


def test_match_parquet_reads_row_groups_and_filters_rows(tmp_path):
    import pyarrow.parquet as pq

    from rag_clean.storage.reuse import match_parquet

    hashes = [sha(str(i)) for i in range(6)]
    a = "0123456789abcdef" + "0" * 48
    b = "0123456789abcdef" + "1" * 48  # same key as a, another hash
    table = pa.table({"content_hash": hashes[:3] + [a] + hashes[3:], "model": ["m", "m", "x", "m", "m", "m", "m"]})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=3)
    current = pa.array([hashes[5], b, hashes[2], hashes[0], "new"])
    cur, rows = match_parquet(current, tmp_path / "f.parquet", columns=["model"],
                              keep=lambda g: (g.column("model").to_numpy(zero_copy_only=False) == "m"))
    assert cur.tolist() == [0, 3] and rows.tolist() == [6, 0]  # hashes[2] is another model's row; b collides
    cur, rows = match_parquet(current, tmp_path / "f.parquet")
    assert cur.tolist() == [0, 2, 3] and rows.tolist() == [6, 2, 0]
