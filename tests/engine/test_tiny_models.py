"""The tiny test models load through the real classes, give the promised shapes, and are deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from rag_clean.config.registry import load_registry
from tiny_models import TEST_WORDS, TINY_MAX_LENGTH, build_bert_tokenizer, build_bge_m3, build_sentence_transformer

TEXTS = ["how to install the gpu driver", "configure embedding retrieval for each chunk", "query"]


def test_bert_tokenizer_knows_test_words(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build_bert_tokenizer(tmp_path / "tok")))
    words = ["install", "gpu", "embedding", "retrieval", "chunk", "query"]
    assert set(words) <= set(TEST_WORDS)
    assert tok.tokenize(" ".join(words)) == words
    # Unknown words split into characters instead of collapsing to [UNK].
    assert tok.tokenize("zebra") == ["z", "##e", "##b", "##r", "##a"]


@pytest.mark.parametrize("name, dim", [("tiny-a", 32), ("tiny-b", 48)])
def test_sentence_transformer_shapes_and_determinism(tiny_models_dir, name, dim):
    from sentence_transformers import SentenceTransformer

    first = SentenceTransformer(str(tiny_models_dir / name), device="cpu").encode(TEXTS)
    second = SentenceTransformer(str(tiny_models_dir / name), device="cpu").encode(TEXTS)
    assert first.shape == (3, dim)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first[0], first[1])  # different texts, different vectors


def test_same_seed_builds_identical_weights(tmp_path):
    from sentence_transformers import SentenceTransformer

    a = SentenceTransformer(str(build_sentence_transformer(tmp_path / "a", seed=5)), device="cpu").encode(TEXTS)
    b = SentenceTransformer(str(build_sentence_transformer(tmp_path / "b", seed=5)), device="cpu").encode(TEXTS)
    c = SentenceTransformer(str(build_sentence_transformer(tmp_path / "c", seed=6)), device="cpu").encode(TEXTS)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_cross_encoder_and_flag_reranker(tiny_models_dir):
    from FlagEmbedding import FlagReranker
    from sentence_transformers import CrossEncoder

    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[0]), (TEXTS[1], TEXTS[1])]
    path = str(tiny_models_dir / "tiny-reranker")
    ce1 = CrossEncoder(path, device="cpu").predict(pairs)
    ce2 = CrossEncoder(path, device="cpu").predict(pairs)
    assert ce1.shape == (3,)
    np.testing.assert_array_equal(ce1, ce2)
    flag = FlagReranker(path, use_fp16=False, devices="cpu").compute_score(pairs, max_length=TINY_MAX_LENGTH)
    flag_again = FlagReranker(path, use_fp16=False, devices="cpu").compute_score(pairs, max_length=TINY_MAX_LENGTH)
    assert len(flag) == 3
    assert flag == flag_again
    # Same weights, same head: both libraries rank the pairs identically.
    assert list(np.argsort(flag)) == list(np.argsort(ce1))


def test_splade_sparse_encoder(tiny_models_dir):
    from sentence_transformers import SparseEncoder

    path = str(tiny_models_dir / "tiny-splade")
    m1, m2 = SparseEncoder(path, device="cpu"), SparseEncoder(path, device="cpu")
    out1 = m1.encode(TEXTS, convert_to_tensor=True).to_dense()
    out2 = m2.encode(TEXTS, convert_to_tensor=True).to_dense()
    assert out1.shape == (3, m1.tokenizer.vocab_size)
    assert bool((out1 >= 0).all()) and bool((out1 > 0).any())
    assert bool((out1 == out2).all())


def test_flag_model_dense(tiny_models_dir):
    from FlagEmbedding import FlagModel

    path = str(tiny_models_dir / "tiny-b")
    kwargs = dict(pooling_method="mean", use_fp16=False, devices="cpu")
    v1 = FlagModel(path, **kwargs).encode(TEXTS, max_length=TINY_MAX_LENGTH)
    v2 = FlagModel(path, **kwargs).encode(TEXTS, max_length=TINY_MAX_LENGTH)
    assert v1.shape == (3, 48)
    np.testing.assert_array_equal(v1, v2)


def test_bge_m3_loads_deterministically(tiny_models_dir, tmp_path):
    from FlagEmbedding import BGEM3FlagModel

    def run(path):
        model = BGEM3FlagModel(str(path), use_fp16=False, devices="cpu")
        return model.encode(TEXTS, max_length=TINY_MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True)

    path = tiny_models_dir / "tiny-bge-m3"
    first, second = run(path), run(path)
    assert first["dense_vecs"].shape == (3, 32)
    np.testing.assert_array_equal(first["dense_vecs"], second["dense_vecs"])
    assert first["lexical_weights"] == second["lexical_weights"]
    assert all(len(w) > 0 for w in first["lexical_weights"])
    for a, b in zip(first["colbert_vecs"], second["colbert_vecs"]):
        assert a.shape[1] == 32
        np.testing.assert_array_equal(a, b)
    # Heads come from the saved files, so a rebuild with the same seed gives the same sparse output.
    rebuilt = run(build_bge_m3(tmp_path / "m3", seed=30))
    assert rebuilt["lexical_weights"] == first["lexical_weights"]


def test_tiny_registry_loads(tiny_registry_path):
    reg = load_registry(tiny_registry_path)
    assert [(m.name, m.dim) for m in reg.dense] == [("tiny-a", 32), ("tiny-b", 48)]
    assert reg.sparse[0].name == "tiny-splade" and reg.rerank.name == "tiny-reranker"
    assert reg.fusion_method == "concat"
    assert all(m.max_length <= 64 for m in reg.models)
    for m in reg.models:
        assert m.resolve_source()  # every path: source exists
