"""queries and reranked: evaluation queries, hybrid candidates, cross-encoder rerank, recall@k / MRR."""


from typing import Optional

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.telemetry.privacy import query_key
from rag_clean.telemetry.records import QueriesRecord
from rag_clean.config.registry import Registry
from rag_clean.retrieval.flat import check_queries_match, load_queries, queries_table
from rag_clean.stages import run_retrieval_stage
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets.assets.common import (
    add_lease,
    lease_target,
    log_warnings,
    run_plan,
    stage_asset,
    start_record,
)
from rag_clean_assets import versions
from rag_clean_assets.observe import COLLECTION_FILES
from rag_clean_assets.versions import versioned
from resources.gpu_lease import GpuLeaseResource
from resources.io_manager import LAZY_INPUT
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource


def queries(context: dg.AssetExecutionContext, chunks: pa.Table, paths: PathsResource,
            registry: ModelRegistryResource, settings: EmbedderSettingsResource) -> dg.Output[StageOutput]:
    timer = StageTimer()
    plan = run_plan(context, registry, settings)
    found, source = load_queries(paths.collection_dir(context.partition_key), chunks)
    record = QueriesRecord(rows=len(found), source=source, with_gold=sum(1 for q in found if q.gold_chunk_ids),
                           text_mode=plan.query_text_mode, device="cpu")
    return versioned(context, StageOutput(queries_table(found, plan.query_text_mode, paths.layout().root), timer.stamp(start_record(record, plan))))


def build_queries_asset() -> dg.AssetsDefinition:
    """Built when the definitions are (its pod tags read the executor and pod config), not at import."""
    return dg.asset(
        **stage_asset(group="retrieval", kinds={"python", "parquet"}, code_version=versions.QUERIES,
                      gpu=False),
        deps=[COLLECTION_FILES],  # it reads the folder's queries.jsonl, which chunks does not
        description="Evaluation queries: the collection's queries.jsonl, else one query per chunk heading (gold = "
                    "the chunks under it). Stores ids, text hashes, gold ids and the text as query_text_mode allows "
                    "(hash by default, or the first 100 characters); never the whole raw query.",
    )(queries)


def build_reranked_asset(registry: Registry) -> dg.AssetsDefinition:
    # The per-model matrices are inputs for tune_ensemble_weights (memory-mapped: loading them costs nothing).
    dense_ins = {spec.asset_name: dg.AssetIn(key=dense_asset_key(spec)) for spec in registry.dense}

    @dg.asset(
        ins={"chunks": dg.AssetIn(key="chunks"), "queries": dg.AssetIn(key="queries"),
             "fused_embeddings": dg.AssetIn(key="fused_embeddings"), "sparse_vectors": dg.AssetIn(key="sparse_vectors", metadata={LAZY_INPUT: True}),
             **dense_ins},
        **stage_asset(group="retrieval", kinds={"pytorch", "parquet"}, code_version=versions.reranked_code_version(registry), gpu=True),
        description="Per query: hybrid candidates (dense + sparse, a weighted sum of normalized scores tuned on a "
                    "held-out split, or RRF), the top K reranked by a cross-encoder (fallback chain from the "
                    "registry): ranked chunk ids with retrieval and rerank scores and the scorer. Metrics of every "
                    "candidate system and before/after rerank as metadata (docs/retrieval.md).",
    )
    def reranked(context: dg.AssetExecutionContext, chunks: pa.Table, queries: pa.Table,
                 fused_embeddings: EmbeddingSet, sparse_vectors: pq.ParquetFile | None, gpu_lease: GpuLeaseResource,
                 registry: ModelRegistryResource, settings: EmbedderSettingsResource, paths: PathsResource,
                 **dense_sets: Optional[EmbeddingSet]) -> dg.Output[StageOutput]:
        timer = StageTimer()
        plan = run_plan(context, registry, settings)
        found, _ = load_queries(paths.collection_dir(context.partition_key), chunks)
        check_queries_match(found, queries, paths.layout().root)
        if plan.sparse_enabled and sparse_vectors is None:
            raise ValueError("sparse is enabled but sparse_vectors has no stored file for this collection: "
                             "materialize it first")
        per_model = {s.name: dense_sets.get(s.asset_name) for s in plan.dense}
        layout, collection = paths.layout(), context.partition_key
        with gpu_lease.lease(context) as lease:
            table, record = run_retrieval_stage(
                found, chunks, fused_embeddings, plan.dense, plan.fusion_method, plan.fusion_weights,
                sparse_vectors if plan.sparse_enabled else None, plan.sparse, plan.rerank, plan.retrieval,
                lease_target(lease), dense_sets=per_model if all(per_model.values()) else None,
                cache_path=lambda kind, model: layout.retrieval_cache_file(kind, model, collection),
                hash_key=query_key(layout.root), digest_cache=layout.weights_digest_file(),
                state_path=layout.ranking_state_file(collection))
        add_lease(start_record(record, plan), lease)
        log_warnings(context, record)
        return versioned(context, StageOutput(table, timer.stamp(record)))

    return reranked
