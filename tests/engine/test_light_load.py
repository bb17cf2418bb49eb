"""The light loader (transformers alone) against sentence-transformers: the same weights, tokenizer and
vectors; folders it does not cover fall back with the reason; the light path never imports
sentence-transformers or sklearn."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rag_clean.config.registry import load_registry
from rag_clean.encoders.factory import load_dense_encoder, load_reranker, load_sparse_encoder
from rag_clean.encoders.model_folder import NotLight, light_plan
from rag_clean.encoders.model_load import FULL, LIGHT

TEXTS = [
    "how to install the cuda driver on linux",
    "GPU Memory Error when the batch is too large",
    "",
    "configure the embedding model and the vector index for retrieval " * 6,
    "What is the dimension of the dense vectors?",
] + [f"query {i}: search documents with sparse and dense fusion " + "tokens " * (i % 7) for i in range(20)]
PAIRS = [(TEXTS[i], TEXTS[-1 - i]) for i in range(len(TEXTS))]


def _both(monkeypatch, load):
    """(light, sentence-transformers) encoders from `load()`."""
    monkeypatch.delenv("RAG_CLEAN_LIGHT_LOAD", raising=False)
    light = load()
    monkeypatch.setenv("RAG_CLEAN_LIGHT_LOAD", "0")
    full = load()
    monkeypatch.delenv("RAG_CLEAN_LIGHT_LOAD")
    return light, full


def _same_model(light, full):
    assert light.loader == LIGHT and full.loader == FULL
    assert type(light.replicas[0].hf) is type(full.replicas[0].hf)
    a, b = light.replicas[0].hf.state_dict(), full.replicas[0].hf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert light.max_length == full.max_length
    assert light.tokenizer.rust.to_str() == full.tokenizer.rust.to_str()
    assert light.tokenizer.lowercase == full.tokenizer.lowercase
    assert light.unpadded == full.unpadded


def _sparse_rows(enc):
    return {i: r for batch in enc.encode(TEXTS) for i, r in zip(batch.rows.tolist(), batch.lexical)}


def _check_dense(monkeypatch, spec):
    light, full = _both(monkeypatch, lambda: load_dense_encoder(spec, token_budget=96))
    _same_model(light, full)
    assert light.dim == full.dim and light.pooling_mode == full.pooling_mode
    np.testing.assert_allclose(light.encode_all(TEXTS), full.encode_all(TEXTS), rtol=0, atol=1e-6)


def _check_sparse(monkeypatch, spec):
    light, full = _both(monkeypatch, lambda: load_sparse_encoder(spec, token_budget=96))
    _same_model(light, full)
    assert light.double_log == full.double_log
    a, b = _sparse_rows(light), _sparse_rows(full)
    assert a.keys() == b.keys() == set(range(len(TEXTS)))
    for i in a:
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_allclose(a[i][1], b[i][1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_dense_light_equals_sentence_transformers(registry, monkeypatch, name):
    _check_dense(monkeypatch, registry.get(name))


def test_dense_real_minilm_light_equals_sentence_transformers(monkeypatch):
    spec = load_registry().get("all-minilm-l6-v2")
    _check_dense(monkeypatch, spec)
    assert light_plan(spec.resolve_source(), "dense").max_seq_length == 256  # sentence_bert_config.json's


def test_sparse_light_equals_sentence_transformers(registry, monkeypatch):
    _check_sparse(monkeypatch, registry.sparse[0])


def test_sparse_real_splade_light_equals_sentence_transformers(monkeypatch):
    _check_sparse(monkeypatch, load_registry().get("splade-tiny"))  # a folder without modules.json


def test_rerank_light_equals_cross_encoder(registry, monkeypatch):
    light, full = _both(monkeypatch, lambda: load_reranker(registry.rerank, token_budget=128)[0])
    _same_model(light, full)
    assert type(light.activation) is type(full.activation) is torch.nn.Sigmoid
    assert light.tokenizer.with_type_ids == full.tokenizer.with_type_ids
    np.testing.assert_allclose(light.score(PAIRS), full.score(PAIRS), rtol=0, atol=1e-6)


def _copy(src: Path, dst: Path, edit: dict[str, dict]) -> Path:
    """A copy of model folder `src` with JSON files updated: {relative path: {key: value (None: delete)}}."""
    shutil.copytree(src, dst)
    for rel, changes in edit.items():
        path = dst / rel
        data = json.loads(path.read_text()) if path.exists() else {}
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        path.write_text(json.dumps(data))
    return dst


def test_lowercasing_folder_loads_light_with_the_same_tokenizer(registry, monkeypatch, tmp_path):
    src = Path(registry.get("tiny-a").resolve_source())
    folder = _copy(src, tmp_path / "lower", {"sentence_bert_config.json": {"do_lower_case": True,
                                                                           "max_seq_length": 40}})
    spec = registry.get("tiny-a")
    plan = light_plan(folder, "dense")
    assert plan.do_lower_case is True and plan.max_seq_length == 40
    light, full = _both(monkeypatch, lambda: load_dense_encoder(replace(spec, source=f"path:{folder}")))
    _same_model(light, full)
    assert light.tokenizer.lowercase and light.max_length == 40
    np.testing.assert_allclose(light.encode_all(TEXTS), full.encode_all(TEXTS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rel, changes, reason", [
    ("1_Pooling/config.json", {"pooling_mode": "weightedmean"}, "pooling mode 'weightedmean'"),
    ("1_Pooling/config.json", {"pooling_mode": ["mean", "max"]}, "pooling concatenates mean\\+max"),
    ("1_Pooling/config.json", {"include_prompt": False}, "include_prompt"),
    ("config_sentence_transformers.json", {"default_prompt_name": "query",
                                           "prompts": {"query": "query: "}}, "default prompt 'query'"),
    ("config_sentence_transformers.json", {"model_type": "SparseEncoder"}, "is a SparseEncoder"),
    ("sentence_bert_config.json", {"model_kwargs": {"dtype": "float16"}}, "sets model_kwargs"),
    ("sentence_bert_config.json", {"processor_kwargs": {"do_lower_case": False}}, "sets processor_kwargs"),
    ("config.json", {"model_type": "distilbert"}, "model_type 'distilbert'"),
])
def test_folders_outside_the_light_shapes_say_why(registry, tmp_path, rel, changes, reason):
    folder = _copy(Path(registry.get("tiny-a").resolve_source()), tmp_path / "m", {rel: changes})
    with pytest.raises(NotLight, match=reason):
        light_plan(folder, "dense")


def test_extra_module_falls_back_to_sentence_transformers(registry, tmp_path):
    folder = _copy(Path(registry.get("tiny-a").resolve_source()), tmp_path / "m", {})
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                       "type": "sentence_transformers.base.modules.dense.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(NotLight, match="Transformer -> Pooling -> Dense -> Normalize"):
        light_plan(folder, "dense")
    with pytest.raises(NotLight, match="is a SentenceTransformer, not a SparseEncoder"):
        light_plan(registry.get("tiny-a").resolve_source(), "sparse")
    with pytest.raises(NotLight, match="custom module"):
        modules[1]["type"] = "my_package.MyPooling"
        (folder / "modules.json").write_text(json.dumps(modules))
        light_plan(folder, "dense")


def test_fallback_loads_through_sentence_transformers_and_logs_why(registry, tmp_path, caplog):
    """weightedmean pooling: the light loader refuses, sentence-transformers loads it and its own
    Pooling module pools (padded), as before."""
    from sentence_transformers import SentenceTransformer

    folder = _copy(Path(registry.get("tiny-a").resolve_source()), tmp_path / "wm",
                   {"1_Pooling/config.json": {"pooling_mode": "weightedmean"}})
    with caplog.at_level(logging.DEBUG, logger="rag_clean.encoders.model_load"):
        enc = load_dense_encoder(replace(registry.get("tiny-a"), source=f"path:{folder}"))
    assert enc.loader == FULL and "weightedmean" in enc.loader_reason
    assert any("weightedmean" in r.getMessage() and str(folder) in r.getMessage() for r in caplog.records)
    assert enc.replicas[0].fast is None  # the model's own modules pool
    ref = SentenceTransformer(str(folder), device="cpu")
    ref.max_seq_length = enc.max_length
    want = ref.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(enc.encode_all(TEXTS), want, rtol=0, atol=1e-5)


def test_rerank_plain_and_cross_encoder_folders(registry, tmp_path):
    plain = Path(registry.rerank.resolve_source())
    assert light_plan(plain, "rerank").activation is None  # the default: sigmoid for one label
    folder = _copy(plain, tmp_path / "ce", {"config.json": {"sentence_transformers": {
        "activation_fn": "torch.nn.modules.linear.Identity"}}})
    assert light_plan(folder, "rerank").activation == "torch.nn.modules.linear.Identity"
    from rag_clean.encoders.model_load import load_model

    from sentence_transformers import CrossEncoder

    assert isinstance(load_model(str(folder), "rerank").activation, torch.nn.Identity)
    assert isinstance(CrossEncoder(str(folder), device="cpu").activation_fn, torch.nn.Identity)
    bad = _copy(plain, tmp_path / "custom", {"config.json": {"sentence_transformers": {
        "activation_fn": "my_pkg.Act"}}})
    with pytest.raises(NotLight, match="not a torch class"):
        light_plan(bad, "rerank")
    base = _copy(plain, tmp_path / "base", {"config.json": {"architectures": ["BertModel"]}})
    with pytest.raises(NotLight, match="no sequence classifier"):
        light_plan(base, "rerank")


_FRESH = """
import sys
from rag_clean.config.registry import load_registry
from rag_clean.encoders.factory import load_dense_encoder, load_reranker, load_sparse_encoder
reg = load_registry()
dense = load_dense_encoder(reg.get("tiny-a"))
assert dense.loader == "transformers", dense.loader_reason
assert dense.encode_all(["install the cuda driver", "gpu memory"]).shape == (2, 32)
sparse = load_sparse_encoder(reg.sparse[0])
assert sparse.loader == "transformers", sparse.loader_reason
assert sum(len(b.lexical) for b in sparse.encode(["install the cuda driver"])) == 1
reranker, _ = load_reranker(reg.rerank)
assert reranker.loader == "transformers", reranker.loader_reason
assert reranker.score([("a query", "a passage")]).shape == (1,)
print(sorted(m for m in ("sentence_transformers", "sklearn") if m in sys.modules))
"""


def test_fresh_process_never_imports_sentence_transformers_or_sklearn(tiny_registry_path):
    env = {**os.environ, "RAG_CLEAN_MODEL_REGISTRY": str(tiny_registry_path), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[2]),
                                                     os.environ.get("PYTHONPATH", "")] if p)}
    env.pop("RAG_CLEAN_LIGHT_LOAD", None)
    out = subprocess.run([sys.executable, "-c", _FRESH], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_rerank_folder_saved_by_cross_encoder_loads_light(registry, tmp_path):
    """sentence-transformers 6 saves a CrossEncoder with modules.json and module_output_name "scores": the light
    path takes it and scores as CrossEncoder does."""
    from sentence_transformers import CrossEncoder

    from rag_clean.encoders.model_load import load_model

    saved = tmp_path / "saved"
    CrossEncoder(str(registry.rerank.resolve_source()), device="cpu").save(str(saved))
    assert json.loads((saved / "sentence_bert_config.json").read_text()).get("module_output_name") in (None, "scores")
    loaded = load_model(str(saved), "rerank")
    assert loaded.loader == "transformers"
    pairs = [("a query", "a passage about it"), ("another query", "something else entirely")]
    batch = loaded.tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = loaded.activation(loaded.hf(**batch).logits).squeeze(-1).numpy()
    theirs = CrossEncoder(str(saved), device="cpu").predict(pairs)
    assert np.abs(ours - np.asarray(theirs)).max() <= 1e-6
