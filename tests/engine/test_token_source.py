"""The runner's input and output: a TokenSource carries the rows' content hashes and reads cached ids by
them (no re-hashing, no text read on a full hit); every encoder yields one Encoded shape with its heads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from transformers import AutoTokenizer

from rag_clean.chunking.rows import content_hash
from rag_clean.config.registry import ModelSpec, load_registry
from rag_clean.encoders.base import Encoded, EncoderError
from rag_clean.encoders.factory import load_dense_encoder, load_sparse_encoder
from rag_clean.encoders.token_cache import TokenCache
from rag_clean.encoders.tokenize import Tokenizer
from rag_clean.encoders.tokens import TokenSource

TEXTS = [f"row {i}: how to install the cuda driver " + "and more words " * (i % 4) for i in range(17)]


@pytest.fixture(scope="module")
def tokenizer(tiny_registry_path):
    path = load_registry(tiny_registry_path).get("tiny-a").resolve_source()
    return Tokenizer(AutoTokenizer.from_pretrained(path), 48, lowercase=True)


class Unreadable(Sequence):
    """Texts that fail when read: a source that touches them is caught."""

    def __len__(self):
        return len(TEXTS)

    def __getitem__(self, item):
        raise AssertionError("the texts were read")


def _rows(windows) -> dict[int, list[int]]:
    return {w.start + r: w.ids[w.offsets[r]:w.offsets[r + 1]].tolist() for w in windows for r in range(w.rows)}


def test_windows_carry_the_given_content_hashes(tokenizer):
    hashes = [content_hash(t) for t in TEXTS]
    windows = list(TokenSource(TEXTS, hashes=hashes).windows(tokenizer, window=5, first_window=2))
    assert [w.start for w in windows] == [0, 2, 7, 12]
    for w in windows:
        assert w.hashes == hashes[w.start:w.start + w.rows]
    assert all(w.hashes is None for w in TokenSource(TEXTS).windows(tokenizer, window=5))


def test_cache_hit_reads_ids_by_the_given_hashes_without_reading_or_hashing_texts(tmp_path, tokenizer):
    # Keys that are not the texts' sha256: a cache that hashed the texts itself would miss every row.
    keys = [f"stage-key-{i}" for i in range(len(TEXTS))]
    cache = TokenCache(lambda fp: tmp_path / f"{fp}.arrow")
    with cache.tokens(tokenizer, TEXTS, keys) as source:
        first = _rows(source.windows(tokenizer, window=5, first_window=2))
    assert cache.last["misses"] == len(TEXTS)
    direct = _rows(TokenSource(TEXTS).windows(tokenizer, window=5))
    assert first == direct

    with cache.tokens(tokenizer, Unreadable(), keys) as source:
        again = _rows(source.windows(tokenizer, window=5, first_window=2))
    assert again == direct
    assert cache.last["hits"] == len(TEXTS) and cache.last["misses"] == 0

    # One unknown key: only its window reads texts (the others are served from the file).
    with pytest.raises(AssertionError, match="texts were read"):
        with cache.tokens(tokenizer, Unreadable(), keys[:-1] + ["new"]) as source:
            list(source.windows(tokenizer, window=5, first_window=2))


def test_token_source_refuses_inconsistent_input(tmp_path, tokenizer):
    with pytest.raises(EncoderError, match="3 texts but 2 content hashes"):
        TokenSource(["a", "b", "c"], hashes=["x", "y"])
    with pytest.raises(EncoderError, match="2 texts but 1 passages"):
        TokenSource(["a", "b"], pairs=["p"])
    with TokenCache(lambda fp: tmp_path / f"{fp}.arrow").tokens(tokenizer, ["a"], ["h"]) as source:
        with pytest.raises(EncoderError, match="another tokenizer"):
            list(source.windows(Tokenizer(tokenizer.hf, 48, lowercase=True)))
        with pytest.raises(EncoderError, match="keyed by their content hashes"):
            TokenSource(["a"], cache=source.cache)


def test_encoded_head_names_what_a_batch_holds():
    batch = Encoded(np.arange(2), dense=np.zeros((2, 4), np.float32))
    assert batch.head("dense").shape == (2, 4)
    with pytest.raises(EncoderError, match=r"no 'lexical' head \(it has \['dense'\]\)"):
        batch.head("lexical")


def test_each_encoder_yields_exactly_its_heads(tiny_registry_path):
    registry = load_registry(tiny_registry_path)
    for encoder, head in ((load_dense_encoder(registry.get("tiny-a")), "dense"),
                          (load_sparse_encoder(registry.get("tiny-splade")), "lexical")):
        try:
            assert encoder.heads == (head,)
            seen = []
            for batch in encoder.encode(TEXTS):
                assert [h for h in ("dense", "lexical", "colbert", "score") if getattr(batch, h) is not None] == [head]
                assert len(batch.head(head)) == len(batch.rows)
                seen += batch.rows.tolist()
            assert sorted(seen) == list(range(len(TEXTS)))
        finally:
            encoder.close()


def test_bge_m3_heads_are_one_backend_and_do_not_change_the_dense_vectors(tiny_models_dir):
    from rag_clean.encoders.flag import BGEM3Encoder

    spec = ModelSpec(name="tiny-bge-m3", role="dense", source=f"path:{tiny_models_dir / 'tiny-bge-m3'}",
                     backend="flagembedding", flag_class="bge-m3", max_length=48, dim=32)
    dense_only = BGEM3Encoder(spec, "cpu", heads=("dense",), token_budget=96)
    every = BGEM3Encoder(spec, "cpu", heads=("colbert", "lexical", "dense"), token_budget=96)
    assert every.heads == ("dense", "lexical", "colbert")  # the model's order, whatever order was asked
    plain = dense_only.encode_all(TEXTS)
    joint = np.zeros_like(plain)
    for batch in every.encode(TEXTS):
        joint[batch.rows] = batch.dense
        assert len(batch.lexical) == len(batch.colbert) == len(batch.rows) and batch.score is None
    np.testing.assert_array_equal(joint, plain)
    with pytest.raises(EncoderError, match="bge-m3 heads"):
        BGEM3Encoder(spec, "cpu", heads=("dense", "score"))
