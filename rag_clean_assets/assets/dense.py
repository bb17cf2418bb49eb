"""dense_embeddings/<model>: one asset per dense model of the registry, built by a factory."""


import dagster as dg
import pyarrow as pa

from rag_clean.config.registry import ModelSpec
from rag_clean.stages.context import StageOutput
from rag_clean.stages.dense import DENSE
from rag_clean.storage.embeddings import embedding_schema
from rag_clean_assets.assets.common import run_asset, stage_asset
from rag_clean_assets import versions
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource


def dense_asset_key(spec: ModelSpec) -> dg.AssetKey:
    return dg.AssetKey(["dense_embeddings", spec.asset_name])


def embedded_chunks_ins(registry) -> dict[str, dg.AssetIn]:
    """The inputs of a stage that reads stages.context.EmbeddedChunks (reranked, exports, vector_index): chunks,
    fused, sparse_vectors as an open Parquet file (never decoded whole), and every dense model's matrix."""
    from resources.io_manager import LAZY_INPUT

    return {"chunks": dg.AssetIn(key="chunks"), "fused_embeddings": dg.AssetIn(key="fused_embeddings"),
            "sparse_vectors": dg.AssetIn(key="sparse_vectors", metadata={LAZY_INPUT: True}),
            **{spec.asset_name: dg.AssetIn(key=dense_asset_key(spec)) for spec in registry.dense}}


def build_dense_asset(spec: ModelSpec) -> dg.AssetsDefinition:
    key = dense_asset_key(spec)

    @dg.asset(
        key=key,
        ins={"chunks": dg.AssetIn(key="chunks")},
        **stage_asset(group="embeddings", kinds={"pytorch", "arrow"}, code_version=versions.dense_code_version(spec),
                      gpu=True, tags={"model": spec.asset_name}, columns=embedding_schema(spec.output_dim),
                      metadata={"model": spec.name, "backend": spec.backend, "source": spec.source,
                                "dim": int(spec.output_dim or 0), "fusion_weight": float(spec.weight)}),
        description=f"L2-normalized float32 vectors of every chunk from dense model {spec.name} "
                    f"({spec.backend}, {spec.source}). Vectors of unchanged chunks are reused.",
    )
    def _dense(context: dg.AssetExecutionContext, chunks: pa.Table, gpu_lease: GpuLeaseResource,
               registry: ModelRegistryResource, settings: EmbedderSettingsResource, paths: PathsResource) -> dg.Output[StageOutput]:
        return run_asset(context, DENSE, spec, chunks, paths=paths, registry=registry, settings=settings,
                         gpu_lease=gpu_lease)

    return _dense
