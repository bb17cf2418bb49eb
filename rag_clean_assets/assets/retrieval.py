"""queries and reranked: evaluation queries, hybrid candidates, cross-encoder rerank, recall@k / MRR."""


import dagster as dg
import pyarrow as pa

from rag_clean.retrieval import check_queries_match, load_queries, queries_table
from rag_clean.stages.common import StageOutput, StageTimer
from rag_clean.stages import RetrievalConfig, run_retrieval_stage
from rag_clean.storage import EmbeddingSet
from rag_clean_assets.assets.common import IO_MANAGER_KEY, add_lease, base_record, lease_target
from rag_clean_assets.assets.fused import ensemble_specs
from rag_clean_assets.assets.sparse import selected_sparse_specs
from rag_clean_assets.partitions import collections_partitions
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource


@dg.asset(
    partitions_def=collections_partitions,
    io_manager_key=IO_MANAGER_KEY,
    group_name="retrieval",
    kinds={"python", "parquet"},
    description="Evaluation queries: the collection's queries.jsonl, else one query per chunk heading (gold = "
                "the chunks under it). Stores ids, text hashes and gold ids; never the raw query text.",
)
def queries(context: dg.AssetExecutionContext, chunks: pa.Table, paths: PathsResource,
            settings: EmbedderSettingsResource) -> StageOutput:
    timer = StageTimer()
    resolved = settings.resolve()
    found, source = load_queries(paths.collection_dir(context.partition_key), chunks)
    with_gold = sum(1 for q in found if q.gold_chunk_ids)
    record = base_record(resolved) | {"stage": "queries", "rows": len(found), "source": source,
                                      "with_gold": with_gold, "device": "cpu"}
    return StageOutput(queries_table(found), timer.stamp(record), {"source": source, "queries_with_gold": with_gold})


@dg.asset(
    partitions_def=collections_partitions,
    io_manager_key=IO_MANAGER_KEY,
    group_name="retrieval",
    kinds={"pytorch", "parquet"},
    pool="gpu",
    description="Per query: candidates from fused vectors (+ sparse by reciprocal-rank fusion when enabled), the top K "
                "reranked by a cross-encoder (fallback chain from the registry), ranked chunk ids with retrieval and "
                "rerank scores and the scorer that produced them. Recall@k and MRR before/after rerank as metadata.",
)
def reranked(context: dg.AssetExecutionContext, chunks: pa.Table, queries: pa.Table,
             fused_embeddings: EmbeddingSet, sparse_vectors: pa.Table | None, gpu_lease: GpuLeaseResource,
             registry: ModelRegistryResource, settings: EmbedderSettingsResource, paths: PathsResource) -> StageOutput:
    timer = StageTimer()
    resolved = settings.resolve()
    reg = registry.load()
    found, _ = load_queries(paths.collection_dir(context.partition_key), chunks)
    check_queries_match(found, queries)
    dense_specs = ensemble_specs(reg, resolved.ensemble_models)
    method = resolved.fusion_method or reg.fusion_method
    sparse_specs = selected_sparse_specs(reg, resolved.sparse_models) if resolved.enable_sparse else []
    if resolved.enable_sparse and sparse_vectors is None:
        raise ValueError("sparse is enabled but sparse_vectors has no stored file for this collection: materialize it first")
    config = RetrievalConfig(top_k_candidates=resolved.top_k_candidates, rerank_top_k=resolved.rerank_top_k,
                             rrf_k=resolved.rrf_k, enable_sparse=resolved.enable_sparse,
                             enable_rerank=resolved.enable_rerank)
    with gpu_lease.lease(context) as lease:
        table, stage_record = run_retrieval_stage(
            found, chunks, fused_embeddings, dense_specs, method, {s.name: s.weight for s in dense_specs},
            sparse_vectors if resolved.enable_sparse else None, sparse_specs, reg.rerank, config,
            lease_target(lease))
    for warning in stage_record["warnings"]:
        context.log.warning(warning)
    record = base_record(resolved) | stage_record
    add_lease(record, lease)
    metrics = stage_record["metrics"]
    metadata = {"scorer": stage_record["scorer"], "rerank_executed": stage_record["rerank_executed"],
                "candidate_sources": ", ".join(stage_record["candidate_sources"]), "queries": len(found)}
    for phase, values in metrics.items():
        for name, value in values.items():
            if value is not None:
                metadata[f"{phase}/{name}"] = float(value)
    resolution = stage_record.get("resolution") or {}
    metadata["rerank_fallback_applied"] = bool(resolution.get("fallback_applied", False))
    return StageOutput(table, timer.stamp(record), metadata)
