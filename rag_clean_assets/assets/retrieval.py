"""queries and reranked: evaluation queries, hybrid candidates, cross-encoder rerank, recall@k / MRR."""


from typing import Optional

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from rag_clean.config.registry import Registry
from rag_clean.retrieval.flat import QUERY_SCHEMA, RERANKED_SCHEMA
from rag_clean.stages.context import EmbeddedChunks, StageOutput
from rag_clean.stages.retrieval import QUERIES, RERANKED
from rag_clean.storage.embeddings import EmbeddingSet
from rag_clean_assets.assets.dense import embedded_chunks_ins
from rag_clean_assets.assets.common import run_asset, stage_asset
from rag_clean_assets import versions
from rag_clean_assets.observe import COLLECTION_FILES
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource


def queries(context: dg.AssetExecutionContext, chunks: pa.Table, paths: PathsResource,
            registry: ModelRegistryResource, settings: EmbedderSettingsResource) -> dg.Output[StageOutput]:
    return run_asset(context, QUERIES, chunks, paths=paths, registry=registry, settings=settings)


def build_queries_asset() -> dg.AssetsDefinition:
    """Built when the definitions are (its pod tags read the executor and pod config), not at import."""
    return dg.asset(
        **stage_asset(group="retrieval", kinds={"python", "parquet"}, code_version=versions.QUERIES,
                      gpu=False, columns=QUERY_SCHEMA),
        deps=[COLLECTION_FILES],  # it reads the folder's queries.jsonl, which chunks does not
        description="Evaluation queries: the collection's queries.jsonl, else one query per chunk heading (gold = "
                    "the chunks under it). Stores ids, text hashes, gold ids and the text as query_text_mode allows "
                    "(hash by default, or the first 100 characters); never the whole raw query.",
    )(queries)


def build_reranked_asset(registry: Registry) -> dg.AssetsDefinition:
    # The per-model matrices are inputs for tune_ensemble_weights (memory-mapped: loading them costs nothing).
    @dg.asset(
        ins={"queries": dg.AssetIn(key="queries"), **embedded_chunks_ins(registry)},
        **stage_asset(group="retrieval", kinds={"pytorch", "parquet"}, code_version=versions.reranked_code_version(registry), gpu=True,
                      columns=RERANKED_SCHEMA),
        description="Per query: hybrid candidates (dense + sparse, a weighted sum of normalized scores tuned on a "
                    "held-out split, or RRF), the top K reranked by a cross-encoder (fallback chain from the "
                    "registry): ranked chunk ids with retrieval and rerank scores and the scorer. Metrics of every "
                    "candidate system and before/after rerank as metadata (docs/retrieval.md).",
    )
    def reranked(context: dg.AssetExecutionContext, chunks: pa.Table, queries: pa.Table,
                 fused_embeddings: EmbeddingSet, sparse_vectors: pq.ParquetFile | None, gpu_lease: GpuLeaseResource,
                 registry: ModelRegistryResource, settings: EmbedderSettingsResource, paths: PathsResource,
                 **dense_sets: Optional[EmbeddingSet]) -> dg.Output[StageOutput]:
        return run_asset(context, RERANKED, queries, EmbeddedChunks(chunks, fused_embeddings, dense_sets, sparse_vectors),
                         paths=paths, registry=registry, settings=settings, gpu_lease=gpu_lease)

    return reranked
