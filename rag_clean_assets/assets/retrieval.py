"""queries and reranked: evaluation queries, hybrid candidates, cross-encoder rerank, recall@k / MRR."""


import dagster as dg
import pyarrow as pa

from rag_clean.records import QueriesRecord
from rag_clean.retrieval import check_queries_match, load_queries, queries_table
from rag_clean.stages import run_retrieval_stage
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean.storage import EmbeddingSet
from rag_clean_assets.assets.common import (
    add_lease,
    lease_target,
    log_warnings,
    run_plan,
    stage_asset,
    start_record,
)
from rag_clean_assets import versions
from rag_clean_assets.versions import versioned
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource


@dg.asset(
    **stage_asset(group="retrieval", kinds={"python", "parquet"}, code_version=versions.QUERIES,
                  gpu=False),
    description="Evaluation queries: the collection's queries.jsonl, else one query per chunk heading (gold = "
                "the chunks under it). Stores ids, text hashes, gold ids and the text as query_text_mode allows "
                "(hash by default, or the first 100 characters); never the whole raw query.",
)
def queries(context: dg.AssetExecutionContext, chunks: pa.Table, paths: PathsResource,
            registry: ModelRegistryResource, settings: EmbedderSettingsResource) -> dg.Output[StageOutput]:
    timer = StageTimer()
    plan = run_plan(context, registry, settings)
    found, source = load_queries(paths.collection_dir(context.partition_key), chunks)
    record = QueriesRecord(rows=len(found), source=source, with_gold=sum(1 for q in found if q.gold_chunk_ids),
                           text_mode=plan.query_text_mode, device="cpu")
    return versioned(context, StageOutput(queries_table(found, plan.query_text_mode), timer.stamp(start_record(record, plan))))


@dg.asset(
    **stage_asset(group="retrieval", kinds={"pytorch", "parquet"}, code_version=versions.RERANKED,
                  gpu=True),
    description="Per query: candidates from fused vectors (+ sparse by reciprocal-rank fusion when enabled), the top K "
                "reranked by a cross-encoder (fallback chain from the registry), ranked chunk ids with retrieval and "
                "rerank scores and the scorer that produced them. Recall@k and MRR before/after rerank as metadata.",
)
def reranked(context: dg.AssetExecutionContext, chunks: pa.Table, queries: pa.Table,
             fused_embeddings: EmbeddingSet, sparse_vectors: pa.Table | None, gpu_lease: GpuLeaseResource,
             registry: ModelRegistryResource, settings: EmbedderSettingsResource, paths: PathsResource) -> dg.Output[StageOutput]:
    timer = StageTimer()
    plan = run_plan(context, registry, settings)
    found, _ = load_queries(paths.collection_dir(context.partition_key), chunks)
    check_queries_match(found, queries)
    if plan.sparse_enabled and sparse_vectors is None:
        raise ValueError("sparse is enabled but sparse_vectors has no stored file for this collection: materialize it first")
    with gpu_lease.lease(context) as lease:
        table, record = run_retrieval_stage(
            found, chunks, fused_embeddings, plan.dense, plan.fusion_method, plan.fusion_weights,
            sparse_vectors if plan.sparse_enabled else None, plan.sparse, plan.rerank, plan.retrieval,
            lease_target(lease))
    add_lease(start_record(record, plan), lease)
    log_warnings(context, record)
    return versioned(context, StageOutput(table, timer.stamp(record)))
