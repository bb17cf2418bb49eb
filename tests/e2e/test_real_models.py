"""The default registry's real models (all-MiniLM-L6-v2, sre-embedding-model, SPLADE-tiny) on the bundled
sample collection, materialized in process: outputs are consistent and retrieval actually works.

Measured on the sample's 12 queries (147 chunks, 2-3 gold chunks each), CPU, 2026-11-24:
recall@5 1.0 and MRR 0.94 (dense + sparse RRF), recall@5 1.0 and MRR 0.89 with dense only;
a random ranking averages recall@5 0.08 (max 0.42 over 200 draws). The bounds below sit well
between, so a pipeline that ranks at random (broken vectors, misaligned rows) fails them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from project_env import clear_settings
from rag_clean.config.registry import DEFAULT_REGISTRY_PATH, load_registry
from rag_clean.retrieval.metrics import ranking_metrics
from rag_clean.storage.arrow_io import read_arrow_table
from rag_clean.storage.embeddings import read_embeddings
from rag_clean.telemetry.summary import read_summary
from rag_clean_assets.checks import build_checks
from rag_clean_assets.definitions import build_assets, build_resources
from resources.gpu_lease import GpuLeaseResource
from resources.settings import EmbedderSettingsResource

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ROOT = REPO_ROOT / "data" / "collections"
COLLECTION = "sample"
MIN_RECALL_AT_5 = 0.75
MIN_MRR = 0.6
DENSE = {"all_minilm_l6_v2": 384, "sre_embedding_model": 384}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real_models")
    with pytest.MonkeyPatch.context() as mp:
        clear_settings(mp, tmp)  # RAG_CLEAN_MODEL_REGISTRY included: the bundled default registry
        registry = load_registry(None)  # registry unset: the bundled default
        assert registry.path == DEFAULT_REGISTRY_PATH
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("collections", [COLLECTION])
        resources = build_resources(data_root=str(DATA_ROOT), storage_root=str(tmp / "storage"), registry_path="",
                                    settings=EmbedderSettingsResource(dotenv_file=str(tmp / "absent.env")),
                                    gpu_lease=GpuLeaseResource(lock_dir=str(tmp / "locks")))
        result = dg.materialize([*build_assets(None), *build_checks(registry)], partition_key=COLLECTION,
                                resources=resources, instance=instance)
        yield SimpleNamespace(result=result, storage=tmp / "storage",
                              metadata={e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
                                        for e in result.get_asset_materialization_events()})


def test_real_models_outputs_are_consistent(real_run):
    assert real_run.result.success
    checks = real_run.result.get_asset_check_evaluations()
    assert checks
    failed = {(c.asset_key.to_user_string(), c.check_name): c for c in checks if not c.passed}
    # Only the documented degraded states may fail, and only as WARN (rag_clean_assets/degraded.py): the
    # sample's 12 gold queries are too few to tune the hybrid weights, and no cross-encoder ships on PyPI,
    # so offline the registry's reranker (and its fallbacks) may not load. Every other check passes.
    assert set(failed) <= {("reranked", "hybrid_weights_tuned"), ("reranked", "cross_encoder_loaded")}, \
        [(key, c.description) for key, c in failed.items()]
    assert all(c.severity == dg.AssetCheckSeverity.WARN for c in failed.values()), failed
    hybrid = failed.get(("reranked", "hybrid_weights_tuned"))
    assert hybrid and "fewer than 30 needed to tune" in hybrid.description
    storage = real_run.storage
    chunk_ids = read_arrow_table(storage / "chunks" / f"{COLLECTION}.arrow").column("chunk_id").to_pylist()
    assert len(chunk_ids) > 50
    per_model = {}
    for name, dim in DENSE.items():
        vectors = read_embeddings(storage / "dense_embeddings" / name / f"{COLLECTION}.arrow")
        assert vectors.chunk_ids == chunk_ids and vectors.dim == dim
        np.testing.assert_allclose(np.linalg.norm(vectors.vectors, axis=1), 1.0, atol=1e-4)
        per_model[name] = np.array(vectors.vectors)
    # Two different models: their vectors of the same chunks are not the same.
    assert not np.allclose(per_model["all_minilm_l6_v2"], per_model["sre_embedding_model"], atol=1e-3)
    fused = read_embeddings(storage / "fused_embeddings" / f"{COLLECTION}.arrow")
    assert fused.chunk_ids == chunk_ids and fused.dim == 768
    sparse = pq.read_table(storage / "sparse_vectors" / f"{COLLECTION}.parquet")
    assert sparse.num_rows == len(chunk_ids) and set(sparse.column("model").to_pylist()) == {"splade-tiny"}
    assert not any(sparse.column("fallback").to_pylist())
    assert sum(1 for ids in sparse.column("term_ids").to_pylist() if ids) == len(chunk_ids)
    summary = read_summary(storage / "telemetry" / COLLECTION / "processing_summary.json")
    assert summary["dense_run"]["models_executed"] == ["all-minilm-l6-v2", "sre-embedding-model"]
    assert summary["sparse_run"]["status"] == "ok"
    rerank = summary["rerank_run"]
    # No cross-encoder ships on PyPI: offline it falls back to retrieval order, and says so in the summary and
    # in a WARN check that names the registry's model and why its source did not load.
    warn = failed.get(("reranked", "cross_encoder_loaded"))
    if rerank["executed"] and not rerank["device_state"]["fallback_applied"]:
        assert warn is None
    else:
        assert rerank["device_state"]["fallback_applied"] and rerank["fallback_reason"]
        assert warn is not None and rerank["fallback_reason"][:80] in warn.description
        if not rerank["executed"]:
            assert warn.description.startswith("no cross-encoder could be loaded: results keep retrieval order")
            assert "bge-reranker-v2-m3" in warn.description


def test_real_models_retrieve_the_gold_chunks(real_run):
    queries = [json.loads(line) for line in (DATA_ROOT / COLLECTION / "queries.jsonl").read_text().splitlines() if line]
    table = pq.read_table(real_run.storage / "reranked" / f"{COLLECTION}.parquet").to_pylist()
    ranked: dict[str, list[tuple[int, str]]] = {}
    for row in table:
        ranked.setdefault(row["query_id"], []).append((row["rank"], row["chunk_id"]))
    assert set(ranked) == {q["query_id"] for q in queries}
    lists = [[cid for _, cid in sorted(ranked[q["query_id"]])] for q in queries]
    metrics = ranking_metrics(lists, [q["gold_chunk_ids"] for q in queries], ks=(5,))
    assert metrics["recall@5"] >= MIN_RECALL_AT_5, metrics
    assert metrics["mrr"] >= MIN_MRR, metrics
    # The asset's own metadata reports the same numbers (final order = retrieval order or reranked).
    meta = real_run.metadata["reranked"]
    phase = "after_rerank" if meta["rerank_executed"] else "before_rerank"
    assert meta[f"{phase}/recall@5"] == pytest.approx(metrics["recall@5"])
    assert meta[f"{phase}/mrr"] == pytest.approx(metrics["mrr"])
