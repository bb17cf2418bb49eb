"""Token-budget batching, OOM budget control and the budget store (no models, no dagster)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rag_clean.encoders.base import EncodeStats, EncoderError
from rag_clean.encoders.batching import BatchSource, plan_batches
from rag_clean.encoders.budget import BudgetController, BudgetStore
from rag_clean.encoders.runner import iter_batches
from rag_clean.encoders.tokenize import TokenWindow
from rag_clean.encoders.tokens import TokenSource


def _window(rows: list[list[int]], types: list[list[int]] | None = None, start: int = 0) -> TokenWindow:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    ids = np.array([t for r in rows for t in r], dtype=np.int32)
    ty = None if types is None else np.array([t for r in types for t in r], dtype=np.int32)
    return TokenWindow(start=start, ids=ids, offsets=offsets, type_ids=ty)


def test_plan_batches_covers_every_row_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    budget = 2048
    batches = plan_batches(lengths, budget)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for b in batches:
        padded = int(lengths[b].max()) * len(b)
        assert padded <= budget or len(b) == 1
        # longest first inside a batch: the first row sets the padded width
        assert lengths[b[0]] == lengths[b].max()
    # batches are length-sorted: widths never increase
    widths = [int(lengths[b].max()) for b in batches]
    assert widths == sorted(widths, reverse=True)


def test_a_row_longer_than_the_budget_still_gets_a_batch_of_its_own():
    lengths = np.array([500, 10, 10])
    batches = plan_batches(lengths, 100)
    assert [b.tolist() for b in batches][0] == [0]
    assert sorted(np.concatenate(batches).tolist()) == [0, 1, 2]


def test_batch_source_resplits_given_back_rows_under_a_smaller_budget():
    lengths = np.array([10] * 8)
    source = BatchSource(lengths)
    first = source.take(80)
    assert len(first) == 8
    source.give_back(first)
    halves = [source.take(40), source.take(40)]
    assert [len(h) for h in halves] == [4, 4]
    assert sorted(np.concatenate(halves).tolist()) == sorted(first.tolist())
    assert source.take(40) is None


def test_token_window_padded_and_unpadded_layouts():
    w = _window([[5, 6, 7], [8], [9, 10]], types=[[0, 0, 1], [0], [1, 1]])
    p = w.padded(np.array([0, 2, 1]), pad_id=0)
    assert p["input_ids"].tolist() == [[5, 6, 7], [9, 10, 0], [8, 0, 0]]
    assert p["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert p["token_type_ids"].tolist() == [[0, 0, 1], [1, 1, 0], [0, 0, 0]]
    u = w.unpadded(np.array([2, 0]))
    assert u["input_ids"].tolist() == [9, 10, 5, 6, 7]
    assert u["position_ids"].tolist() == [0, 1, 0, 1, 2]
    assert u["cu_seqlens"].tolist() == [0, 2, 5]
    assert u["max_seqlen"] == 3


class _FakeTokenizer:
    """Stands in for rag_clean.encoders.tokenize.Tokenizer: one token per word."""

    def encode(self, texts, pairs=None, start=0):
        return _window([[len(w) for w in t.split()] or [0] for t in texts], start=start)


def test_tokenize_windows_streams_fixed_size_windows_in_order():
    texts = [f"w{i} " * (i % 5 + 1) for i in range(23)]
    windows = list(TokenSource(texts).windows(_FakeTokenizer(), window=10))
    assert [w.start for w in windows] == [0, 10, 20]
    assert [w.rows for w in windows] == [10, 10, 3]


def test_tokenize_windows_surfaces_tokenizer_errors():
    class Broken:
        def encode(self, texts, pairs=None, start=0):
            raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        list(TokenSource(["a", "b"]).windows(Broken(), window=1))


def test_budget_store_round_trip_and_atomic_file(tmp_path):
    store = BudgetStore(tmp_path / "budgets.json")
    assert store.get("m", "cpu") is None
    store.put("m", "cpu", 4096)
    store.put("other", "NVIDIA H100", 65536)
    assert store.get("m", "cpu") == 4096
    assert BudgetStore(tmp_path / "budgets.json").get("other", "NVIDIA H100") == 65536
    data = json.loads((tmp_path / "budgets.json").read_text())
    assert data["m|cpu"]["token_budget"] == 4096
    # no temp files left behind; updates lock beside the store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budgets.json", "budgets.json.lock"]


def test_budget_store_names_the_file_when_corrupt(tmp_path, caplog):
    """A cache (issue 22 item 5): discarded with one warning naming the file, never an error."""
    path = tmp_path / "budgets.json"
    path.write_text("{not json")
    with caplog.at_level("WARNING"):
        assert BudgetStore(path).get("m", "cpu") is None
    assert [r.getMessage() for r in caplog.records if "budgets.json" in r.getMessage()]


def test_budget_controller_starts_from_given_then_remembered_then_default(tmp_path):
    store = BudgetStore(tmp_path / "b.json")
    cpu = torch.device("cpu")
    c = BudgetController.create("m", cpu, token_budget=None, store=store, floor=16, bytes_per_token=1)
    assert c.budget == 8192  # CPU default
    store.put("m", "cpu", 1000)
    assert BudgetController.create("m", cpu, token_budget=None, store=store, floor=16, bytes_per_token=1).budget == 1000
    assert BudgetController.create("m", cpu, token_budget=300, store=store, floor=16, bytes_per_token=1).budget == 300


def test_budget_controller_halves_records_and_gives_up_at_the_floor():
    stats = EncodeStats(model="m", backend="b", device="cpu", dtype="float32")
    c = BudgetController("m", torch.device("cpu"), start=400, floor=64, store=None, stats=stats)
    assert c.on_oom(batch_index=3, rows=4, tokens=400) == 200
    assert stats.oom_mitigations[0] == {
        "event": "oom_backoff", "batch_index": 3, "old_budget": 400, "new_budget": 200, "device": "cpu",
        "rows": 4, "padded_tokens": 400,
    }
    assert stats.token_budget_start == 400 and stats.token_budget_final == 200
    assert c.on_oom(batch_index=4, rows=2, tokens=200) == 100
    with pytest.raises(EncoderError, match="floor 64"):
        c.on_oom(batch_index=5, rows=2, tokens=100)
    with pytest.raises(EncoderError, match="1 rows"):
        BudgetController("m", torch.device("cpu"), start=400, floor=8, store=None).on_oom(0, rows=1, tokens=300)


def test_iter_batches_retries_the_same_rows_after_an_oom_and_loses_nothing():
    lengths = np.array([10] * 16)
    source = BatchSource(lengths)
    stats = EncodeStats(model="m", backend="b", device="cpu", dtype="float32")
    controller = BudgetController("m", torch.device("cpu"), start=160, floor=10, store=None, stats=stats)
    launched = []

    def launch(rows):
        if len(rows) * 10 > 40:
            raise torch.cuda.OutOfMemoryError("injected")
        launched.append(rows.tolist())
        return len(rows)

    done = list(iter_batches(source, controller, launch, lambda: len(launched)))
    assert sorted(r for rows, _ in done for r in rows.tolist()) == list(range(16))
    assert all(n <= 4 for _, n in done)
    assert [m["new_budget"] for m in stats.oom_mitigations] == [80, 40]
    assert controller.budget == 40


def test_iter_batches_does_not_swallow_other_errors():
    source = BatchSource(np.array([3, 3]))
    controller = BudgetController("m", torch.device("cpu"), start=100, floor=1, store=None)

    def launch(rows):
        raise ValueError("model bug")

    with pytest.raises(ValueError, match="model bug"):
        list(iter_batches(source, controller, launch, lambda: 0))
