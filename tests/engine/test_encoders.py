"""Encoders behind the contracts: same outputs as sentence-transformers fp32, streaming, OOM backoff,
factory dispatch and offline fallbacks. Tiny random models, plus the real MiniLM / SPLADE packages."""

from __future__ import annotations

import sys
import types
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from rag_clean.encoders.base import EncoderError
from rag_clean.encoders.budget import BudgetStore
from rag_clean.encoders.factory import ModelLoadError, load_dense_encoder, load_reranker, load_sparse_encoder
from rag_clean.config.registry import load_registry

TEXTS = [
    "how to install the cuda driver on linux",
    "gpu memory error when the batch is too large",
    "",
    "x",
    "configure the embedding model and the vector index for retrieval " * 6,
    "restart the server after an upgrade of the database",
    "What is the dimension of the dense vectors?",
    "docker kubernetes cluster node disk network",
] + [f"query {i}: search documents with sparse and dense fusion " + "tokens " * (i % 9) for i in range(30)]


def _st_reference(path: str, texts, max_length: int) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = max_length
    return st.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)


def _collect_dense(encoder, texts):
    seen, out = [], np.full((len(texts), encoder.dim), np.nan, dtype=np.float32)
    for batch in encoder.encode(texts):
        idx, vecs = batch.rows, batch.dense
        assert idx.dtype == np.int64 and vecs.dtype == np.float32 and vecs.shape == (len(idx), encoder.dim)
        seen.extend(idx.tolist())
        out[idx] = vecs
    assert sorted(seen) == list(range(len(texts)))  # every index exactly once
    return out


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_dense_matches_sentence_transformers_fp32(registry, name):
    spec = registry.get(name)
    enc = load_dense_encoder(spec, "cpu", token_budget=128)  # small budget: many batches
    got = _collect_dense(enc, TEXTS)
    ref = _st_reference(spec.resolve_source(), TEXTS, enc.max_length)
    assert enc.dim == spec.dim
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * ref).sum(1).min() >= 0.999
    stats = enc.stats
    assert len(stats.batches) > 1 and stats.items == len(TEXTS)
    assert all(b.padded_tokens >= b.tokens > 0 and b.seconds >= 0 for b in stats.batches)
    assert all(b.padded_tokens <= 128 or b.items == 1 for b in stats.batches)
    assert stats.load_seconds > 0 and stats.wall_seconds > 0 and stats.tokenize_seconds > 0
    assert stats.token_budget_start == stats.token_budget_final == 128
    enc.close()


def test_dense_streams_in_windows_and_keeps_input_order(registry):
    spec = registry.get("tiny-a")
    whole = load_dense_encoder(spec).encode_all(TEXTS)
    windowed = load_dense_encoder(spec)
    windowed.window_items = 5  # tokenized 5 rows at a time, ahead of the model
    starts = [int(batch.rows.min()) // 5 for batch in windowed.encode(TEXTS)]
    assert starts == sorted(starts)  # windows come in order; within one, any order
    assert np.allclose(windowed.encode_all(TEXTS), whole, atol=1e-6)


def test_dense_real_minilm_matches_sentence_transformers():
    spec = load_registry().get("all-minilm-l6-v2")
    enc = load_dense_encoder(spec)
    got = _collect_dense(enc, TEXTS[:12])
    ref = _st_reference(spec.resolve_source(), TEXTS[:12], enc.max_length)
    assert enc.dim == 384
    assert (got * ref).sum(1).min() >= 0.999
    enc.close()


def test_dense_dim_mismatch_names_model_and_both_dims(registry):
    spec = replace(registry.get("tiny-a"), dim=64)
    with pytest.raises(EncoderError, match=r"tiny-a.*registry dim 64.*32-d"):
        load_dense_encoder(spec)


def test_dense_rejects_non_string_rows(registry):
    enc = load_dense_encoder(registry.get("tiny-a"))
    with pytest.raises(EncoderError, match="row 1"):
        enc.encode_all(["ok", None])


def test_oom_backoff_gives_identical_outputs_records_mitigations_and_remembers_budget(registry, tmp_path):
    spec = registry.get("tiny-a")
    reference = load_dense_encoder(spec, token_budget=4096).encode_all(TEXTS)

    store = BudgetStore(tmp_path / "budgets.json")
    enc = load_dense_encoder(spec, budget_store=store, token_budget=4096)
    real_forward = enc.forward
    limit = 200
    ooms = []

    def forward_that_ooms_over_limit(replica, batch):
        padded = int(batch.window.lengths[batch.rows].max()) * len(batch.rows)
        if padded > limit:
            ooms.append(padded)
            raise torch.cuda.OutOfMemoryError(f"injected: {padded} tokens > {limit}")
        return real_forward(replica, batch)

    enc.forward = forward_that_ooms_over_limit
    got = enc.encode_all(TEXTS)
    assert ooms, "the injected OOM never fired"
    assert np.allclose(got, reference, atol=1e-6)
    mitigations = enc.stats.oom_mitigations
    assert len(mitigations) == len(ooms)
    assert all(m["event"] == "oom_backoff" and m["new_budget"] < m["old_budget"] for m in mitigations)
    assert enc.stats.token_budget_start == 4096 and enc.stats.token_budget_final <= limit
    assert all(b.padded_tokens <= limit for b in enc.stats.batches)
    assert store.get(spec.name, "cpu") == enc.stats.token_budget_final
    # the next run starts from the remembered budget and needs no backoff
    again = load_dense_encoder(spec, budget_store=store)
    assert again.stats.token_budget_start == enc.stats.token_budget_final


def test_oom_on_a_single_row_is_a_clear_error(registry):
    enc = load_dense_encoder(registry.get("tiny-a"), token_budget=4096)

    def always_oom(replica, batch):
        raise torch.cuda.OutOfMemoryError("injected")

    enc.forward = always_oom
    with pytest.raises(EncoderError, match="out of device memory"):
        enc.encode_all(TEXTS[:3])


def test_several_devices_spread_batches_over_replicas(registry):
    spec = registry.get("tiny-b")
    single = load_dense_encoder(spec, token_budget=96).encode_all(TEXTS)
    multi = load_dense_encoder(spec, "cpu,cpu", token_budget=96)
    assert len(multi.replicas) == 2
    assert np.allclose(multi.encode_all(TEXTS), single, atol=1e-6)
    assert multi.stats.items == len(TEXTS)


def test_close_releases_the_model(registry):
    enc = load_dense_encoder(registry.get("tiny-a"))
    model_ref = weakref.ref(enc.replicas[0].hf)
    enc.close()
    assert model_ref() is None
    assert enc.replicas == []


def _sparse_reference(path: str, texts, max_length: int):
    from sentence_transformers import SparseEncoder

    st = SparseEncoder(path, device="cpu")
    st.max_seq_length = max_length
    return st.encode(list(texts), convert_to_tensor=True).to_dense().numpy()


def _check_sparse(enc, texts, top_k):
    ref = _sparse_reference(enc.source, texts, enc.max_length)
    rows = {}
    for batch in enc.encode(texts):
        for i, (terms, weights) in zip(batch.rows.tolist(), batch.lexical):
            assert terms.dtype == np.int32 and weights.dtype == np.float32
            assert len(terms) <= top_k and np.all(weights > 0)
            assert np.all(np.diff(weights) <= 0)  # sorted by weight, descending
            rows[i] = (terms, weights)
    assert sorted(rows) == list(range(len(texts)))
    for i, (terms, weights) in rows.items():
        r = ref[i]
        assert np.allclose(r[terms], weights, rtol=1e-4, atol=1e-5)
        expected = np.sort(r)[::-1][: len(terms)]
        assert np.allclose(weights, expected, rtol=1e-4, atol=1e-5)  # the same top weights
        top10 = [t for t in np.argsort(-r, kind="stable")[:10] if r[t] > 0]
        strong = [t for t in top10 if r[t] > (r[top10[-1]] + 1e-4 if top10 else 0)]
        assert set(strong) <= set(terms.tolist())  # the same top terms (ties at the cut aside)
    return rows


def test_sparse_matches_sparse_encoder_top_terms(registry):
    spec = registry.sparse[0]
    enc = load_sparse_encoder(spec, token_budget=96)
    _check_sparse(enc, TEXTS, spec.top_k)
    assert enc.vocab_size > 100
    assert len(enc.stats.batches) > 1
    enc.close()


def test_sparse_real_splade_matches_and_decodes_terms():
    spec = load_registry().get("splade-tiny")
    enc = load_sparse_encoder(spec)
    assert enc.vocab_size == 30522
    rows = _check_sparse(enc, TEXTS[:6], spec.top_k)
    words = enc.decode_terms(rows[0][0][:20])
    assert "cuda" in words or "driver" in words or "install" in words
    enc.close()


def test_rerank_matches_cross_encoder_predict(registry):
    from sentence_transformers import CrossEncoder

    spec = registry.rerank
    reranker, record = load_reranker(spec, token_budget=128)
    pairs = [(TEXTS[i], TEXTS[-1 - i]) for i in range(len(TEXTS))]
    got = reranker.score(pairs)
    ce = CrossEncoder(spec.resolve_source(), device="cpu")
    ce.max_length = reranker.max_length
    ref = ce.predict(pairs)
    assert got.dtype == np.float32 and got.shape == (len(pairs),)
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert reranker.scorer_id == f"cross-encoder:{spec.source}"
    assert record == {"requested": spec.source, "resolved": spec.source, "attempts": [],
                      "fallback_applied": False, "reason": None}
    assert reranker.score([]).shape == (0,)


def test_rerank_batch_pairs_cap_bounds_every_batch(registry):
    """rerank_batch_size: at most that many pairs per forward, whatever the token budget allows."""
    pairs = [(TEXTS[i], TEXTS[-1 - i]) for i in range(len(TEXTS))]
    free, _ = load_reranker(registry.rerank)
    capped, _ = load_reranker(registry.rerank, max_batch_pairs=3)
    reference, got = free.score(pairs), capped.score(pairs)
    assert max(b.items for b in free.stats.batches) > 3  # the budget alone would batch more pairs
    assert all(b.items <= 3 for b in capped.stats.batches)
    assert sum(b.items for b in capped.stats.batches) == len(pairs)
    assert np.allclose(got, reference, rtol=1e-4, atol=1e-6)


def test_rerank_falls_back_in_order_and_records_why(registry, tiny_models_dir):
    good = "path:" + str(tiny_models_dir / "tiny-reranker")
    spec = replace(registry.rerank, source="BAAI/not-in-the-cache", fallbacks=("path:/no/such/folder", good))
    reranker, record = load_reranker(spec)
    assert reranker is not None and record["resolved"] == good
    assert record["fallback_applied"] is True
    assert [a["source"] for a in record["attempts"]] == ["BAAI/not-in-the-cache", "path:/no/such/folder"]
    assert "cache" in record["attempts"][0]["error"] and "does not exist" in record["attempts"][1]["error"]
    assert "BAAI/not-in-the-cache" in record["reason"]
    assert reranker.scorer_id == f"cross-encoder:{good}"
    assert reranker.stats.fallback["applied"] is True


def test_rerank_none_when_nothing_loads(registry):
    spec = replace(registry.rerank, source="BAAI/missing-a", fallbacks=("BAAI/missing-b",))
    reranker, record = load_reranker(spec)
    assert reranker is None and record["resolved"] is None
    assert len(record["attempts"]) == 2 and "BAAI/missing-b" in record["reason"]


def test_uncached_hub_id_fails_fast_offline(registry):
    spec = replace(registry.get("tiny-a"), source="sentence-transformers/not-cached-here")
    with pytest.raises(ModelLoadError, match="not-cached-here.*offline"):
        load_dense_encoder(spec)


def test_wrong_role_is_rejected(registry):
    with pytest.raises(EncoderError, match="role 'dense'"):
        load_sparse_encoder(registry.get("tiny-a"))


def test_flagembedding_backend_dispatches_to_flag_module(registry, monkeypatch):
    calls = []
    fake = types.ModuleType("rag_clean.encoders.flag")
    fake.flag_dense_encoder = lambda spec, device, **budget: calls.append(("dense", spec.name, device)) or "dense"
    fake.flag_sparse_encoder = lambda spec, device, **budget: calls.append(("sparse", spec.name, device)) or "sparse"

    class FakeReranker:
        stats = None

        def __init__(self, spec, device, **budget):
            calls.append(("rerank", spec.source, device))

    fake.FlagRerankerAdapter = FakeReranker
    monkeypatch.setitem(sys.modules, "rag_clean.encoders.flag", fake)
    assert load_dense_encoder(replace(registry.get("tiny-a"), backend="flagembedding")) == "dense"
    assert load_sparse_encoder(replace(registry.sparse[0], backend="flagembedding"), "cpu") == "sparse"
    reranker, record = load_reranker(replace(registry.rerank, backend="flagembedding"))
    assert isinstance(reranker, FakeReranker) and record["resolved"] == registry.rerank.source
    assert [c[0] for c in calls] == ["dense", "sparse", "rerank"]


def test_unpadded_fast_path_is_used_and_equals_the_hf_module_path(registry):
    from rag_clean.encoders.st_dense import STDenseEncoder
    from rag_clean.encoders.st_rerank import STCrossEncoderReranker
    from rag_clean.encoders.st_sparse import STSparseEncoder

    dense_spec = registry.get("tiny-b")
    fast = STDenseEncoder(dense_spec, token_budget=96)
    slow = STDenseEncoder(dense_spec, token_budget=96, fast=False)
    assert fast.replicas[0].fast is not None and slow.replicas[0].fast is None
    assert np.allclose(fast.encode_all(TEXTS), slow.encode_all(TEXTS), atol=1e-5)
    assert all(b.padded_tokens == b.tokens for b in fast.stats.batches)  # no pad tokens computed
    assert sum(b.padded_tokens for b in slow.stats.batches) > sum(b.tokens for b in slow.stats.batches)

    sparse_spec = registry.sparse[0]
    fast_sparse = STSparseEncoder(sparse_spec, token_budget=96)
    slow_sparse = STSparseEncoder(sparse_spec, token_budget=96, fast=False)
    assert fast_sparse.replicas[0].fast is not None
    a = {i: r for batch in fast_sparse.encode(TEXTS) for i, r in zip(batch.rows.tolist(), batch.lexical)}
    b = {i: r for batch in slow_sparse.encode(TEXTS) for i, r in zip(batch.rows.tolist(), batch.lexical)}
    for i in range(len(TEXTS)):
        assert np.allclose(a[i][1], b[i][1], rtol=1e-4, atol=1e-6)
        assert set(a[i][0][:5].tolist()) == set(b[i][0][:5].tolist())

    rr_spec = registry.rerank
    pairs = [(TEXTS[i], TEXTS[-1 - i]) for i in range(len(TEXTS))]
    fast_rr = STCrossEncoderReranker(rr_spec, token_budget=128)
    slow_rr = STCrossEncoderReranker(rr_spec, token_budget=128, fast=False)
    assert fast_rr.replicas[0].fast is not None
    assert np.allclose(fast_rr.score(pairs), slow_rr.score(pairs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_fast_bert_forward_equals_the_hf_module_on_unpadded_tokens(family):
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    from rag_clean.encoders.fast_bert import FastBert, pool_unpadded

    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if family == "bert":
        model = BertModel(BertConfig(max_position_embeddings=40, pad_token_id=0, **common)).eval()
    else:  # positions start after the padding index
        model = XLMRobertaModel(XLMRobertaConfig(max_position_embeddings=42, pad_token_id=1, type_vocab_size=1,
                                                 **common)).eval()
    fast = FastBert.build(model, model.config)
    assert fast is not None
    lengths = [7, 3, 12, 1]
    rows = [torch.randint(3, 50, (n,)) for n in lengths]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    flat = torch.cat(rows)
    within = torch.cat([torch.arange(n) for n in lengths])
    with torch.inference_mode():
        got = fast(flat, within, torch.zeros_like(flat), cu, max(lengths))
        pad = model.config.pad_token_id
        ids = torch.full((len(rows), max(lengths)), pad)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got, ref[mask.bool()], atol=1e-5)
    mean = pool_unpadded(got, cu, "mean")
    assert torch.allclose(mean[2], ref[2, :12].mean(0), atol=1e-5)
    assert torch.allclose(pool_unpadded(got, cu, "cls"), ref[:, 0], atol=1e-5)


def test_truncated_weights_file_names_the_model_and_folder(registry, tiny_models_dir, tmp_path):
    import shutil

    folder = tmp_path / "tiny-a"
    shutil.copytree(tiny_models_dir / "tiny-a", folder)
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # cut short, as an interrupted download leaves it
    spec = replace(registry.get("tiny-a"), source=f"path:{folder}")
    with pytest.raises(ModelLoadError) as info:
        load_dense_encoder(spec)
    message = str(info.value)
    assert message.startswith(f"model tiny-a: cannot load {folder}") and "\n" not in message
    assert "truncated or corrupt weights file" in message
