"""FlagEmbedding backends on the tiny random models, checked against FlagEmbedding's own encode/score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rag_clean.encoders.base import EncoderError
from rag_clean.encoders.flag import (
    BGEM3Encoder,
    FlagRerankerAdapter,
    flag_dense_encoder,
    flag_sparse_encoder,
    lexical_top_k,
)
from rag_clean.config.registry import ModelSpec

MAX_LEN = 48
TEXTS = [
    "how to install the gpu driver on linux",
    "configure embedding retrieval for each chunk",
    "query",
    "zebra xylophone gpu gpu gpu",
    "the cache server stores vectors and sparse weights for every document in the collection",
    "restart the docker service",
    "rerank the top documents by score",
]


def spec(models_dir: Path, name: str, role: str = "dense", **kw) -> ModelSpec:
    kw.setdefault("max_length", MAX_LEN)
    return ModelSpec(name=name, role=role, source=f"path:{models_dir / name}", backend="flagembedding", **kw)


def m3_spec(models_dir: Path, role: str = "dense", **kw) -> ModelSpec:
    kw.setdefault("dim", 32)
    return spec(models_dir, "tiny-bge-m3", role, flag_class="bge-m3", **kw)


@pytest.fixture(scope="module")
def m3_reference(tiny_models_dir):
    """What BGEM3FlagModel itself returns for TEXTS."""
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(str(tiny_models_dir / "tiny-bge-m3"), use_fp16=False, devices="cpu")
    return model.encode(TEXTS, max_length=MAX_LEN, return_dense=True, return_sparse=True, return_colbert_vecs=True)


def as_dict(row) -> dict[int, float]:
    ids, weights = row
    return {int(i): float(w) for i, w in zip(ids, weights)}


class CountForwards:
    """Counts real forward passes of a module through a forward hook (outputs untouched)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def raise_oom_times(n: int):
    """A forward pre-hook that raises CUDA OOM on its first n calls, then lets forwards run."""
    state = {"left": n}

    def hook(*_):
        if state["left"] > 0:
            state["left"] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by test)")

    return hook


# ---------------------------------------------------------------------------------------------
# Dense: FlagModel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, dim", [("tiny-a", 32), ("tiny-b", 48)])
def test_flag_dense_matches_flagmodel(tiny_models_dir, name, dim):
    from FlagEmbedding import FlagModel

    enc = flag_dense_encoder(spec(tiny_models_dir, name, dim=dim, pooling="mean"), "cpu")
    out = enc.encode_all(TEXTS)
    assert enc.dim == dim and out.shape == (len(TEXTS), dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    reference = FlagModel(str(tiny_models_dir / name), pooling_method="mean", use_fp16=False, devices="cpu")
    np.testing.assert_allclose(out, reference.encode(TEXTS, max_length=MAX_LEN), atol=1e-5)
    enc.close()


def test_flag_dense_deterministic_and_pooling_matters(tiny_models_dir):
    mean_a = flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32, pooling="mean"), "cpu").encode_all(TEXTS)
    mean_b = flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32, pooling="mean"), "cpu").encode_all(TEXTS)
    cls = flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32, pooling="cls"), "cpu").encode_all(TEXTS)
    np.testing.assert_array_equal(mean_a, mean_b)
    assert not np.allclose(mean_a, cls)
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-5)


def test_flag_dense_streams_batches_with_real_token_counts(tiny_models_dir):
    from transformers import AutoTokenizer

    # A 64-token budget forces several batches on 7 short texts.
    enc = flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32), "cpu", token_budget=64)
    seen = []
    for batch in enc.encode(TEXTS):
        rows, vecs = batch.rows, batch.dense
        assert rows.dtype == np.int64 and vecs.shape == (len(rows), 32)
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(TEXTS)))
    stats = enc.stats
    assert len(stats.batches) >= 2
    tok = AutoTokenizer.from_pretrained(str(tiny_models_dir / "tiny-a"))
    real_tokens = sum(len(ids) for ids in tok(TEXTS, truncation=True, max_length=MAX_LEN)["input_ids"])
    assert stats.items == len(TEXTS) and stats.tokens == real_tokens
    assert all(b.padded_tokens >= b.tokens and b.padded_tokens <= 64 for b in stats.batches if b.items > 1)
    assert all(b.seconds > 0 and b.token_budget == 64 for b in stats.batches)
    assert stats.device == "cpu" and stats.dtype == "float32" and stats.backend == "flagembedding"
    assert stats.load_seconds > 0 and stats.wall_seconds > 0 and stats.oom_mitigations == []


def test_flag_dense_fp16_request_runs_float32_on_cpu(tiny_models_dir):
    enc = flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32, dtype="float16"), "cpu")
    assert enc.stats.dtype == "float32"
    assert enc.encode_all(TEXTS[:2]).dtype == np.float32


def test_flag_dense_dim_mismatch_names_model(tiny_models_dir):
    with pytest.raises(EncoderError, match=r"tiny-a .*produces 32-d vectors but the registry says dim = 64"):
        flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=64), "cpu")


def test_flag_dense_rejects_max_length_beyond_positions(tiny_models_dir):
    with pytest.raises(EncoderError, match=r"tiny-a .*max_length 512 exceeds the model's 64 positions"):
        flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32, max_length=512), "cpu")


def test_flag_dense_rejects_unknown_pooling(tiny_models_dir):
    with pytest.raises(EncoderError, match="pooling 'max'"):
        flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32, pooling="max"), "cpu")


def test_flag_dense_falls_back_to_next_source(tiny_models_dir, tmp_path):
    s = ModelSpec(name="fb", role="dense", backend="flagembedding", source=f"path:{tmp_path / 'missing'}",
                  fallbacks=(f"path:{tiny_models_dir / 'tiny-a'}",), dim=32, max_length=MAX_LEN)
    enc = flag_dense_encoder(s, "cpu")
    assert enc.source == f"path:{tiny_models_dir / 'tiny-a'}"
    assert enc.stats.fallback["applied"] is True and "missing" in enc.stats.fallback["reason"]
    assert enc.encode_all(TEXTS[:2]).shape == (2, 32)


def test_flag_dense_all_sources_failing_lists_each(tmp_path):
    s = ModelSpec(name="nothing", role="dense", backend="flagembedding", source=f"path:{tmp_path / 'a'}",
                  fallbacks=(f"path:{tmp_path / 'b'}",), max_length=MAX_LEN)
    with pytest.raises(EncoderError, match=r"nothing: no source could be loaded .*/a.*\|.*/b"):
        flag_dense_encoder(s, "cpu")


def test_flag_dense_query_instruction_prefix(tiny_models_dir):
    enc = flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32, query_instruction="query: "), "cpu")
    np.testing.assert_array_equal(enc.encode_queries(["install gpu"]), enc.encode_all(["query: install gpu"]))
    assert not np.allclose(enc.encode_queries(["install gpu"]), enc.encode_all(["install gpu"]))


def test_flag_dense_oom_halves_budget_and_retries_same_rows(tiny_models_dir):
    clean = flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32), "cpu", token_budget=4096).encode_all(TEXTS)
    enc = flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32), "cpu", token_budget=4096)
    enc.transformer.register_forward_pre_hook(raise_oom_times(1))
    np.testing.assert_allclose(enc.encode_all(TEXTS), clean, atol=1e-6)
    [event] = enc.stats.oom_mitigations
    assert event["event"] == "oom_backoff" and event["new_budget"] < event["old_budget"]
    assert enc.stats.token_budget_final == event["new_budget"] and enc.stats.items == len(TEXTS)


# ---------------------------------------------------------------------------------------------
# BGE-M3: dense, sparse, joint
# ---------------------------------------------------------------------------------------------


def test_m3_dense_matches_bgem3(tiny_models_dir, m3_reference):
    enc = flag_dense_encoder(m3_spec(tiny_models_dir), "cpu")
    out = enc.encode_all(TEXTS)
    assert out.shape == (len(TEXTS), 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, m3_reference["dense_vecs"], atol=1e-5)


def test_m3_dim_mismatch(tiny_models_dir):
    with pytest.raises(EncoderError, match=r"tiny-bge-m3 .*32-d .*dim = 1024"):
        flag_dense_encoder(m3_spec(tiny_models_dir, dim=1024), "cpu")


def test_sparse_matches_bgem3_lexical_weights(tiny_models_dir, m3_reference):
    enc = flag_sparse_encoder(m3_spec(tiny_models_dir, role="sparse", dim=None, top_k=1000), "cpu")
    rows = [None] * len(TEXTS)
    for batch in enc.encode(TEXTS):
        for i, row in zip(batch.rows, batch.lexical):
            rows[i] = row
    for row, expected in zip(rows, m3_reference["lexical_weights"]):
        ids, weights = row
        assert ids.dtype == np.int32 and weights.dtype == np.float32
        assert np.all(np.diff(weights) <= 0) and np.all(weights > 0)
        assert as_dict(row) == pytest.approx({int(k): float(v) for k, v in expected.items()}, abs=1e-5)
        assert ids.max() < enc.vocab_size
    # "gpu gpu gpu" is one term, weighted by its heaviest occurrence.
    assert len(set(rows[3][0].tolist())) == len(rows[3][0])
    assert "\u2581gpu" in enc.decode_terms(rows[3][0])


def test_sparse_top_k_keeps_heaviest_terms(tiny_models_dir):
    full = flag_sparse_encoder(m3_spec(tiny_models_dir, role="sparse", dim=None, top_k=1000), "cpu")
    pruned = flag_sparse_encoder(m3_spec(tiny_models_dir, role="sparse", dim=None, top_k=2), "cpu")
    long_text = [TEXTS[4]]
    [full_row] = [row for batch in full.encode(long_text) for row in batch.lexical]
    [top_row] = [row for batch in pruned.encode(long_text) for row in batch.lexical]
    assert len(full_row[0]) > 2 and len(top_row[0]) == 2
    np.testing.assert_array_equal(top_row[0], full_row[0][:2])
    np.testing.assert_array_equal(top_row[1], full_row[1][:2])


def test_lexical_top_k_rules():
    ids = np.array([0, 7, 5, 7, 9, 3, 2])
    weights = np.array([5.0, 0.2, 0.5, 0.9, 0.0, 0.5, 1.0], dtype=np.float32)
    # 0 and 2 are special ids, 9 has zero weight, 7 keeps its max, ties (5, 3) break by id.
    term_ids, term_weights = lexical_top_k(ids, weights, np.array([0, 2]), top_k=10)
    assert term_ids.tolist() == [7, 3, 5]
    np.testing.assert_allclose(term_weights, [0.9, 0.5, 0.5])
    empty = lexical_top_k(np.array([0]), np.array([1.0]), np.array([0]), top_k=3)
    assert len(empty[0]) == 0 and empty[0].dtype == np.int32


def test_joint_equals_separate_in_one_forward_per_batch(tiny_models_dir, m3_reference):
    joint = BGEM3Encoder(m3_spec(tiny_models_dir, top_k=1000), "cpu", heads=("dense", "lexical"), token_budget=96)
    counter = CountForwards(joint.transformer)
    dense = np.zeros((len(TEXTS), 32), np.float32)
    sparse = [None] * len(TEXTS)
    for batch in joint.encode(TEXTS):
        rows, d, s, colbert = batch.rows, batch.dense, batch.lexical, batch.colbert
        assert colbert is None and d.dtype == np.float32 and len(s) == len(rows)
        dense[rows] = d
        for i, row in zip(rows, s):
            sparse[i] = row
    assert len(joint.stats.batches) >= 2
    assert counter.calls == len(joint.stats.batches)

    dense_enc = flag_dense_encoder(m3_spec(tiny_models_dir), "cpu", token_budget=96)
    sparse_enc = flag_sparse_encoder(m3_spec(tiny_models_dir, role="sparse", top_k=1000), "cpu", token_budget=96)
    np.testing.assert_allclose(dense, dense_enc.encode_all(TEXTS), atol=1e-6)
    separate = {int(i): row for batch in sparse_enc.encode(TEXTS) for i, row in zip(batch.rows, batch.lexical)}
    for i, row in enumerate(sparse):
        assert as_dict(row) == pytest.approx(as_dict(separate[i]), abs=1e-6)
    np.testing.assert_allclose(dense, m3_reference["dense_vecs"], atol=1e-5)


def test_joint_colbert_only_when_asked(tiny_models_dir, m3_reference):
    joint = BGEM3Encoder(m3_spec(tiny_models_dir), "cpu", heads=("dense", "lexical", "colbert"))
    counter = CountForwards(joint.transformer)
    colbert = [None] * len(TEXTS)
    for batch in joint.encode(TEXTS):
        rows, vecs = batch.rows, batch.colbert
        for i, v in zip(rows, vecs):
            colbert[i] = v
    assert counter.calls == len(joint.stats.batches)
    for ours, expected in zip(colbert, m3_reference["colbert_vecs"]):
        assert ours.shape == expected.shape and ours.shape[1] == 32
        np.testing.assert_allclose(ours, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Reranker
# ---------------------------------------------------------------------------------------------

PAIRS = [(q, p) for q in ("install gpu driver", "sparse retrieval") for p in TEXTS]


@pytest.fixture(scope="module")
def rerank_spec(tiny_models_dir):
    return spec(tiny_models_dir, "tiny-reranker", role="rerank")


def test_reranker_matches_flagreranker_order(tiny_models_dir, rerank_spec):
    from FlagEmbedding import FlagReranker

    adapter = FlagRerankerAdapter(rerank_spec, "cpu", token_budget=64)
    scores = adapter.score(PAIRS)
    direct = np.array(FlagReranker(str(tiny_models_dir / "tiny-reranker"), use_fp16=False, devices="cpu")
                      .compute_score(PAIRS, max_length=MAX_LEN), dtype=np.float32)
    assert scores.shape == (len(PAIRS),) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, direct, atol=1e-4)
    assert list(np.argsort(-scores)) == list(np.argsort(-direct))
    assert np.ptp(scores) > 0.1  # a real ordering, not near-ties
    assert adapter.scorer_id == f"flag-reranker:path:{tiny_models_dir / 'tiny-reranker'}"
    stats = adapter.stats
    assert len(stats.batches) >= 3 and stats.items == len(PAIRS)  # 14 pairs under a 64-token budget
    assert all(0 < b.tokens <= b.padded_tokens and (b.padded_tokens <= 64 or b.items == 1) for b in stats.batches)
    assert adapter.score([]).shape == (0,)


def test_reranker_rejects_malformed_pairs(rerank_spec):
    adapter = FlagRerankerAdapter(rerank_spec, "cpu")
    with pytest.raises(EncoderError, match="pair 1 is not a"):
        adapter.score([("q", "p"), ("only one",)])


def test_reranker_oom_halves_the_token_budget_and_retries_the_same_pairs(rerank_spec):
    clean = FlagRerankerAdapter(rerank_spec, "cpu", token_budget=4096).score(PAIRS)
    adapter = FlagRerankerAdapter(rerank_spec, "cpu", token_budget=4096)
    batches = []
    adapter.transformer.register_forward_pre_hook(lambda _m, _a, kw: batches.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    adapter.transformer.register_forward_pre_hook(raise_oom_times(2))
    scores = adapter.score(PAIRS)
    np.testing.assert_allclose(scores, clean, atol=1e-5)  # every pair scored, as without the OOMs
    assert batches[0] == len(PAIRS) and batches[1] < batches[0] and batches[2] < batches[1]
    events = adapter.stats.oom_mitigations
    assert len(events) == 2 and all(e["event"] == "oom_backoff" for e in events)
    assert events[0]["old_budget"] == 4096 and events[1]["old_budget"] == events[0]["new_budget"]
    assert events[1]["new_budget"] < events[0]["new_budget"]
    assert adapter.stats.token_budget_final == events[1]["new_budget"]
    assert all(b.padded_tokens <= events[1]["new_budget"] or b.items == 1 for b in adapter.stats.batches)
    assert adapter.stats.items == len(PAIRS)


def test_reranker_oom_on_a_single_pair_is_a_clear_error(rerank_spec):
    adapter = FlagRerankerAdapter(rerank_spec, "cpu", token_budget=4096)
    adapter.transformer.register_forward_pre_hook(raise_oom_times(100))
    with pytest.raises(EncoderError, match=r"tiny-reranker: out of device memory"):
        adapter.score(PAIRS)


def test_reranker_loads_only_its_primary_source(tiny_models_dir, tmp_path):
    # The factory walks the fallbacks (one adapter per source); the adapter must not switch on its own.
    s = ModelSpec(name="r", role="rerank", backend="flagembedding", source=f"path:{tmp_path / 'missing'}",
                  fallbacks=(f"path:{tiny_models_dir / 'tiny-reranker'}",), max_length=MAX_LEN)
    with pytest.raises(EncoderError, match=r"r: cannot load reranker .*missing"):
        FlagRerankerAdapter(s, "cpu")


def test_several_devices_use_the_first_with_a_warning(tiny_models_dir):
    with pytest.warns(UserWarning, match="uses one device; running on cpu"):
        enc = flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32), "cpu,cpu")
    assert enc.stats.device == "cpu"
    assert enc.encode_all(TEXTS[:2]).shape == (2, 32)


def test_cuda_request_without_cuda_is_a_clear_error(tiny_models_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: nothing to refuse")
    with pytest.raises(EncoderError, match="tiny-a: device 'cuda:0' requested but CUDA is not available"):
        flag_dense_encoder(spec(tiny_models_dir, "tiny-a", dim=32), "cuda:0")
