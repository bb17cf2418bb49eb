"""sparse_vectors: SPLADE-style term weights per chunk, pruned to top-k, as term ids + weights.

A sparse model that is the joint partner of a bge-m3 dense model (same source, see
Registry.joint_sparse_partner) takes its rows from that dense stage's forward pass when it can, so the
asset depends (non-data) on those dense assets: Dagster then runs them first.
"""


import dagster as dg
import pyarrow as pa

from rag_clean.config.registry import Registry
from rag_clean.stages.context import StageOutput
from rag_clean.stages.sparse import SPARSE, SPARSE_SCHEMA
from rag_clean_assets.assets.common import run_asset, stage_asset
from rag_clean_assets.assets.dense import dense_asset_key
from rag_clean_assets import versions
from resources.gpu_lease import GpuLeaseResource
from resources.paths import PathsResource
from resources.registry import ModelRegistryResource
from resources.settings import EmbedderSettingsResource

SPARSE_KEY = dg.AssetKey("sparse_vectors")


def joint_dense_deps(registry: Registry) -> list[dg.AssetKey]:
    """Dense assets whose forward pass can also yield a sparse model's rows (bge-m3 partners)."""
    return [dense_asset_key(d) for d in registry.dense if registry.joint_sparse_partner(d) is not None]


def build_sparse_asset(registry: Registry) -> dg.AssetsDefinition:
    @dg.asset(
        key=SPARSE_KEY,
        ins={"chunks": dg.AssetIn(key="chunks")},
        deps=joint_dense_deps(registry),
        **stage_asset(group="embeddings", kinds={"pytorch", "parquet"}, code_version=versions.sparse_code_version(registry),
                      gpu=True, columns=SPARSE_SCHEMA),
        description="Sparse term weights per chunk from each selected sparse model. Opt out with "
                    "EMBEDDER_ENABLE_SPARSE=0 (then nothing is written and the previous file stays). A bge-m3 "
                    "sparse model reuses the lexical rows of its dense partner's forward pass when they cover "
                    "every chunk (no second pass over the collection).",
    )
    def sparse_vectors(context: dg.AssetExecutionContext, chunks: pa.Table, gpu_lease: GpuLeaseResource,
                       registry: ModelRegistryResource, settings: EmbedderSettingsResource,
                       paths: PathsResource) -> dg.Output[StageOutput]:
        return run_asset(context, SPARSE, chunks, paths=paths, registry=registry, settings=settings,
                         gpu_lease=gpu_lease)

    return sparse_vectors
