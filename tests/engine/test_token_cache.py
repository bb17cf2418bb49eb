"""Tokenize once per tokenizer (rag_clean.encoders.token_cache): cached token ids are the ids direct
tokenization gives, at any max_length; a second model of the same tokenizer reads them instead of
tokenizing; models whose tokenizers differ never share a file."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from rag_clean.encoders.factory import load_dense_encoder, load_sparse_encoder
from rag_clean.chunking.rows import content_hash
from rag_clean.encoders.token_cache import TokenCache, chunk_tokens
from rag_clean.encoders.tokenize import Tokenizer
from rag_clean.encoders.tokens import TokenSource
from rag_clean.storage.layout import StorageLayout
from rag_clean.config.registry import load_registry

TEXTS = [
    "how to install the cuda driver on linux",
    "x",
    "configure the embedding model and the vector index for retrieval " * 12,  # longer than every max_length
    "GPU memory error when the batch is too large: reduce --batch-size to 16",
    "restart the server after an upgrade of the database " * 5,
] + [f"query {i}: search documents with sparse and dense fusion " + "tokens " * (3 * i) for i in range(25)]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(load_registry().get("all-minilm-l6-v2").resolve_source())


def _ids(tokenizer, texts, window=7, source=None):
    """Every row's ids, in input order, through the windows the runner uses."""
    rows = [None] * len(texts)
    truncated = 0
    for w in (source or TokenSource(texts)).windows(tokenizer, window=window, first_window=3):
        truncated += w.truncated
        for r in range(w.rows):
            rows[w.start + r] = w.ids[w.offsets[r]:w.offsets[r + 1]].tolist()
    return rows, truncated


def _cached_ids(cache, tokenizer, texts):
    with cache.tokens(tokenizer, texts, [content_hash(t) for t in texts]) as source:
        assert source.cache is not None
        got = _ids(tokenizer, texts, source=source)
    return got, cache.last


def test_cached_ids_equal_direct_tokenization_at_any_max_length(tmp_path, minilm_tokenizer):
    cache = TokenCache(lambda fp: tmp_path / f"{fp}.arrow")
    first, info = _cached_ids(cache, Tokenizer(minilm_tokenizer, 64, lowercase=True), TEXTS)
    assert info["hits"] == 0 and info["misses"] == len(TEXTS)
    assert (tmp_path / info["file"]).exists()
    assert first == _ids(Tokenizer(minilm_tokenizer, 64, lowercase=True), TEXTS)

    # Shorter max_length: every row read from the file, cut after the lookup exactly as the tokenizer cuts.
    shorter, info = _cached_ids(cache, Tokenizer(minilm_tokenizer, 20, lowercase=True), TEXTS)
    assert info["misses"] == 0 and info["hits"] == len(TEXTS)
    direct = _ids(Tokenizer(minilm_tokenizer, 20, lowercase=True), TEXTS)
    assert shorter == direct and direct[1] > 0  # same ids and the same truncated count

    # Longer max_length than the file was written at: only the rows it cut are tokenized again.
    longer, info = _cached_ids(cache, Tokenizer(minilm_tokenizer, 128, lowercase=True), TEXTS)
    assert longer == _ids(Tokenizer(minilm_tokenizer, 128, lowercase=True), TEXTS)
    lengths_64 = [len(r) for r in first[0]]
    assert info["misses"] == sum(1 for n in lengths_64 if n == 64) > 0
    assert info["hits"] == len(TEXTS) - info["misses"]


def test_new_rows_are_tokenized_and_the_file_rewritten_for_the_pass(tmp_path, minilm_tokenizer):
    cache = TokenCache(lambda fp: tmp_path / f"{fp}.arrow")
    _cached_ids(cache, Tokenizer(minilm_tokenizer, 64, lowercase=True), TEXTS[:10])
    texts = TEXTS[5:] + ["a chunk nobody tokenized before"]
    got, info = _cached_ids(cache, Tokenizer(minilm_tokenizer, 64, lowercase=True), texts)
    assert got == _ids(Tokenizer(minilm_tokenizer, 64, lowercase=True), texts)
    assert info == {"file": info["file"], "hits": 5, "misses": len(texts) - 5}
    _, info = _cached_ids(cache, Tokenizer(minilm_tokenizer, 64, lowercase=True), texts)
    assert info["misses"] == 0  # the rewrite holds every row of the last pass


def test_second_model_of_the_same_tokenizer_reads_the_cache_and_gives_identical_vectors(tmp_path, registry):
    texts = TEXTS * 3
    layout = StorageLayout(tmp_path)
    cache = TokenCache.for_collection(layout, "docs")
    vectors = {}
    for name in ("tiny-a", "tiny-b"):
        enc = load_dense_encoder(registry.get(name))
        out = np.zeros((len(texts), enc.dim), np.float32)
        with chunk_tokens(cache, enc, texts, [content_hash(t) for t in texts]) as tokens:
            for batch in enc.encode(tokens):
                out[batch.rows] = batch.dense
        plain = np.zeros_like(out)
        for batch in enc.encode(texts):  # no cache: tokenized directly
            plain[batch.rows] = batch.dense
        np.testing.assert_array_equal(out, plain)
        vectors[name] = (enc.stats.token_cache, enc.tokenizer.fingerprint)
        enc.close()
    (first, fp_a), (second, fp_b) = vectors["tiny-a"], vectors["tiny-b"]
    assert fp_a == fp_b
    assert first["misses"] == len(set(texts)) or first["misses"] == len(texts)
    assert second == {"file": first["file"], "hits": len(texts), "misses": 0}
    assert layout.token_cache_file("docs", fp_a).exists()

    # The sparse model of the tiny registry tokenizes alike: it reads the same file too.
    sparse = load_sparse_encoder(registry.get("tiny-splade"))
    with chunk_tokens(cache, sparse, texts, [content_hash(t) for t in texts]) as tokens:
        for _ in sparse.encode(tokens):
            pass
    assert sparse.stats.token_cache["misses"] == 0
    sparse.close()


def test_the_default_models_share_one_tokenizer_fingerprint_and_others_do_not(registry, minilm_tokenizer):
    default = load_registry()
    prints = set()
    for name in ("all-minilm-l6-v2", "sre-embedding-model", "splade-tiny"):
        hf = AutoTokenizer.from_pretrained(default.get(name).resolve_source())
        prints.add(Tokenizer(hf, 256, lowercase=True).fingerprint)
    assert len(prints) == 1
    tiny = AutoTokenizer.from_pretrained(registry.get("tiny-a").resolve_source())
    assert Tokenizer(tiny, 48, lowercase=True).fingerprint not in prints
    assert Tokenizer(minilm_tokenizer, 256, lowercase=False).fingerprint not in prints  # lowercasing changes ids


@pytest.mark.parametrize("content", [b"not arrow", "wrong shape"])
def test_unreadable_cache_file_is_discarded_with_one_warning(tmp_path, minilm_tokenizer, caplog, content):
    """A cache (issue 22 item 5): garbage bytes or an Arrow file of another shape never stop the encode pass;
    one warning names the file, every row is tokenized again and the file is rewritten whole."""
    import pyarrow as pa

    tok = Tokenizer(minilm_tokenizer, 64, lowercase=True)
    cache = TokenCache(lambda fp: tmp_path / f"{fp}.arrow")
    path = tmp_path / f"{tok.fingerprint}.arrow"
    if content == "wrong shape":
        with pa.ipc.new_file(str(path), pa.schema([("x", pa.int64())])) as writer:
            writer.write_table(pa.table({"x": [1, 2]}))
    else:
        path.write_bytes(content)
    with caplog.at_level("WARNING"):
        got, info = _cached_ids(cache, tok, TEXTS)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "discarded" in warnings[0], warnings
    assert got == _ids(Tokenizer(minilm_tokenizer, 64, lowercase=True), TEXTS)
    assert info["hits"] == 0 and info["misses"] == len(TEXTS)
    _, info = _cached_ids(cache, tok, TEXTS)  # rewritten: a readable cache again
    assert info["misses"] == 0


def test_off_switch_and_content_hash(monkeypatch, tmp_path):
    import hashlib

    assert content_hash("é x") == hashlib.sha256("é x".encode()).hexdigest()
    monkeypatch.setenv("RAG_CLEAN_TOKEN_CACHE", "0")
    assert TokenCache.for_collection(StorageLayout(tmp_path), "docs") is None


def test_dense_and_sparse_stages_share_one_tokenization(tmp_path, registry, monkeypatch):
    import pyarrow as pa

    from stage_helpers import dense, sparse
    from rag_clean.storage.embeddings import read_embeddings

    texts = TEXTS * 2
    chunks = pa.table({"chunk_id": [f"c{i}" for i in range(len(texts))],
                       "content_hash": [content_hash(t) for t in texts], "text": texts})
    store = tmp_path / "store"  # the stages' token cache: StorageLayout(store).token_cache_file("c", ...)
    records = {}
    for name in ("tiny-a", "tiny-b"):
        for label in ("cached", "plain"):
            with monkeypatch.context() as env:
                if label == "plain":
                    env.setenv("RAG_CLEAN_TOKEN_CACHE", "0")
                writer, record = dense(registry.get(name), chunks, tmp_path / f"{name}-{label}.arrow", root=store)
            writer.publish()
            records[name, label] = record
        cached = read_embeddings(tmp_path / f"{name}-cached.arrow").vectors
        np.testing.assert_array_equal(cached, read_embeddings(tmp_path / f"{name}-plain.arrow").vectors)
    assert records["tiny-a", "cached"].encode.token_cache["misses"] == len(texts)
    assert records["tiny-b", "cached"].encode.token_cache == {**records["tiny-a", "cached"].encode.token_cache,
                                                              "hits": len(texts), "misses": 0}
    assert records["tiny-a", "plain"].encode.token_cache is None
    _, sparse_record = sparse([registry.get("tiny-splade")], chunks, root=store)
    assert sparse_record.per_model["tiny-splade"]["token_cache"]["misses"] == 0
