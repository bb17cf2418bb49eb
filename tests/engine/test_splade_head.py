"""SPLADE's MLM head computed one vocabulary slice at a time (RAG_CLEAN_SPLADE_VOCAB_SLICE) gives the same
top terms as the token-chunked head, on real text, for the tiny test model and the real SPLADE-tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag_clean.chunking.collection import read_collection
from rag_clean.config.registry import load_registry
from rag_clean.encoders.factory import load_sparse_encoder

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "collections" / "sample"


@pytest.fixture(scope="module")
def sample_texts() -> list[str]:
    return read_collection(SAMPLE).table.column("text").to_pylist()


def _top_terms(spec, texts, monkeypatch, vocab_slice: int):
    monkeypatch.setenv("RAG_CLEAN_SPLADE_VOCAB_SLICE", str(vocab_slice))
    enc = load_sparse_encoder(spec)
    try:
        assert enc.sliced_head == (vocab_slice > 0)
        out = [None] * len(texts)
        for batch in enc.encode(texts):
            for i, (terms, weights) in zip(batch.rows, batch.lexical):
                out[i] = (terms, weights)
        return out
    finally:
        enc.close()


def _agreement(a, b, k: int = 10) -> float:
    same = [set(ta[:k].tolist()) == set(tb[:k].tolist()) for (ta, _), (tb, _) in zip(a, b)]
    return float(np.mean(same))


@pytest.mark.parametrize("model,vocab_slice", [("tiny", 7), ("splade-tiny", 1024)])
def test_vocab_sliced_head_keeps_the_top_terms(tiny_registry_path, sample_texts, monkeypatch, model, vocab_slice):
    spec = load_registry(tiny_registry_path).sparse[0] if model == "tiny" else load_registry().get("splade-tiny")
    texts = sample_texts
    base = _top_terms(spec, texts, monkeypatch, 0)
    sliced = _top_terms(spec, texts, monkeypatch, vocab_slice)
    assert _agreement(base, sliced) >= 0.99
    for (tb, wb), (ts, ws) in zip(base, sliced):
        np.testing.assert_allclose(ws[:10], wb[:10], rtol=1e-4, atol=1e-5)
    assert sum(len(t) for t, _ in base) > 10 * len(texts)  # rows do have terms


def test_the_cpu_default_is_the_sliced_head(tiny_registry_path, monkeypatch):
    from rag_clean.encoders.st_sparse import CPU_VOCAB_SLICE

    monkeypatch.delenv("RAG_CLEAN_SPLADE_VOCAB_SLICE", raising=False)
    enc = load_sparse_encoder(load_registry(tiny_registry_path).sparse[0])
    try:
        assert enc.sliced_head and enc.vocab_slice == CPU_VOCAB_SLICE
    finally:
        enc.close()
